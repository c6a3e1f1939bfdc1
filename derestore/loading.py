"""Checkpoint file → spandrel model descriptor.

Checkpoints are untrusted: pickles are read with torch's weights-only
unpickler, which refuses any object that could run code.
"""

from __future__ import annotations

import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from spandrel import ImageModelDescriptor, UnsupportedModelError

from .errors import ModelUnavailable

# Container keys in the order they are tried. `params` precedes `params_ema`:
# the seed papers' test scripts (Restormer, DRSformer) load `params`.
_CONTAINER_KEYS = ("model_state_dict", "state_dict", "params", "params_ema", "params-ema", "model", "net")
_PREFIXES = ("module.", "netG.")
# Buffers that thop's profiler leaves in checkpoints saved after profiling.
_PROFILER_SUFFIXES = ("total_ops", "total_params")
_PICKLE_SUFFIXES = {".pth", ".pt", ".ckpt", ".bin", ".tar"}


@dataclass
class LoadedModel:
    descriptor: ImageModelDescriptor
    path: Path
    state_keys: int

    @property
    def arch(self) -> str:
        return self.descriptor.architecture.id


def install_architectures() -> None:
    """Make spandrel know spandrel_extra_arches' and derestore's own architectures (idempotent)."""
    import warnings

    with warnings.catch_warnings():
        # spandrel_extra_arches scripts a helper with torch.jit at import, which torch now
        # deprecates; the notice means nothing to a derestore user.
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.script.*", category=FutureWarning)
        import spandrel_extra_arches

    from . import archs

    spandrel_extra_arches.install(ignore_duplicates=True)
    archs.install()


def read_checkpoint(path: Path) -> Any:
    """The raw object stored in a checkpoint file, without running any code in it."""
    if not path.is_file():
        raise ModelUnavailable(f"checkpoint {path} does not exist; check the path given as weights=")
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return load_file(str(path), device="cpu")
        except (SafetensorError, OSError, ValueError) as exc:
            raise ModelUnavailable(f"checkpoint {path} is not a valid safetensors file ({exc})") from None
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        reason = str(exc).splitlines()[0] if str(exc) else "unsupported pickle content"
        raise ModelUnavailable(
            f"refused to load {path}: it holds pickled objects that could run code ({reason}); "
            "only plain state dicts are loaded — re-save it with torch.save(model.state_dict()) or as .safetensors"
        ) from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, OSError, ValueError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        kind = "a PyTorch checkpoint" if path.suffix.lower() in _PICKLE_SUFFIXES else "a checkpoint"
        raise ModelUnavailable(f"{path} is not {kind} that can be read ({reason}); is the file complete?") from None


def extract_state_dict(obj: Any, container: str = "auto") -> dict[str, torch.Tensor]:
    """Unwrap a training container and normalise key names.

    `container` names the key holding the weights ("auto" tries the usual ones);
    `module.`/`netG.` prefixes and profiler leftovers are removed.
    """
    if not isinstance(obj, dict):
        raise ValueError(f"expected a dict of tensors, found {type(obj).__name__}")
    if container not in ("auto", "bare") and isinstance(obj.get(container), dict):
        obj = obj[container]
    elif container == "auto":
        for key in _CONTAINER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
        else:
            if len(obj) == 1 and isinstance(next(iter(obj.values())), dict):
                obj = next(iter(obj.values()))
    state = {k: v for k, v in obj.items() if isinstance(v, torch.Tensor) and not k.endswith(_PROFILER_SUFFIXES)}
    if not state:
        raise ValueError("no tensors found")
    for prefix in _PREFIXES:
        if all(k.startswith(prefix) for k in state):
            state = {k[len(prefix):]: v for k, v in state.items()}
    return state


def _load_as_core(state: dict[str, torch.Tensor], arch: str) -> Any:
    """The weights loaded as spandrel's own `arch` when it recognises them, else None.

    Skips importing spandrel_extra_arches (about 2 s of start-up) for registry models of a core
    architecture, the bundled lite models among them. Where full detection would pick `arch`,
    the result is the same; where it would pick another architecture first, load_model would
    have refused the file as a mismatch.
    """
    from spandrel import MAIN_REGISTRY, canonicalize_state_dict

    support = MAIN_REGISTRY.get(arch)
    if support is None:
        return None
    state = canonicalize_state_dict(state)
    return support.architecture.load(state) if support.detect(state) else None


def _detect_and_load(state: dict[str, torch.Tensor]) -> Any:
    install_architectures()
    from spandrel import MAIN_REGISTRY

    return MAIN_REGISTRY.load(state)


def load_model(path: str | Path, *, container: str = "auto", expected_arch: str | None = None) -> LoadedModel:
    """Load any checkpoint spandrel or derestore knows; the architecture is detected from its keys.

    Raises `ModelUnavailable` (exit 3) when the file is missing, unsafe, unreadable,
    of an unknown architecture, or not of `expected_arch`.
    """
    path = Path(path)
    obj = read_checkpoint(path)
    try:
        state = extract_state_dict(obj, container)
    except ValueError as exc:
        raise ModelUnavailable(f"{path} holds no model weights ({exc})") from None

    try:
        descriptor = (expected_arch and _load_as_core(state, expected_arch)) or _detect_and_load(state)
    except UnsupportedModelError:
        sample = ", ".join(list(state)[:3])
        raise ModelUnavailable(
            f"{path}: no known architecture matches its weights (first keys: {sample}); "
            "use a checkpoint of a model spandrel or derestore supports (see `derestore models`)"
        ) from None
    except (RuntimeError, KeyError, ValueError, AssertionError) as exc:
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise ModelUnavailable(f"{path}: the weights do not fit the detected architecture ({reason})") from None
    if not isinstance(descriptor, ImageModelDescriptor):
        raise ModelUnavailable(f"{path}: {descriptor.architecture.id} is not an image-to-image model")
    if descriptor.scale != 1:
        raise ModelUnavailable(
            f"{path}: {descriptor.architecture.id} with scale {descriptor.scale} is a super-resolution model; "
            "derestore restores at the same size and needs a scale-1 checkpoint"
        )
    channels = (descriptor.input_channels, descriptor.output_channels)
    if channels not in ((3, 3), (1, 1)):
        raise ModelUnavailable(
            f"{path}: {descriptor.architecture.id} maps {channels[0]} to {channels[1]} channels; derestore "
            "runs RGB (3 to 3) and grayscale (1 to 1) models"
        )
    if expected_arch and descriptor.architecture.id.lower() != expected_arch.lower():
        raise ModelUnavailable(
            f"{path} is a {descriptor.architecture.id} checkpoint, not {expected_arch}; "
            "check that you picked the right file"
        )
    descriptor.model.eval()
    return LoadedModel(descriptor=descriptor, path=path, state_keys=len(state))


def check_loads(path: Path, *, arch: str, container: str = "auto") -> None:
    """Raise `ModelUnavailable` unless `path` loads as architecture `arch` (used before an unpinned
    download or import is recorded in the cache)."""
    load_model(path, container=container, expected_arch=arch)
