"""The public Python API; the CLI is a thin layer over these functions.

    import derestore
    model = derestore.load(task="derain")            # or model="restormer-derain", or weights="file.pth"
    results = derestore.restore(["rainy/"], "out/", model=model)
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from . import imageio
from .errors import UsageError
from .pipeline import Job, Result, discover, plan_jobs, run_jobs
from .registry import ModelRecord, Registry, load_registry

if TYPE_CHECKING:
    from .engine import Engine

TILINGS = ("blend", "published")
DEFAULT_TILE = 512
DEFAULT_OVERLAP = 32


@dataclass
class Model:
    """A loaded checkpoint on its device, with the tiling hints that come with it."""

    name: str
    engine: Engine
    checkpoint: Path
    record: ModelRecord | None
    tile: int
    overlap: int
    _sha256: str | None = None

    @property
    def arch(self) -> str:
        return self.engine.descriptor.architecture.id

    @property
    def sha256(self) -> str:
        if self._sha256 is None:
            from .loading import sha256_file

            self._sha256 = sha256_file(self.checkpoint)
        return self._sha256

    def restore_array(self, image: np.ndarray, *, tile: int | None = None, overlap: int | None = None,
                      tiling: str = "blend") -> np.ndarray:
        """Restore one (3, H, W) float32 array in [0, 1]."""
        if tiling not in TILINGS:
            raise UsageError(f"--tiling '{tiling}' is not one of {', '.join(TILINGS)}")
        tile = self.tile if tile is None else tile
        overlap = self.overlap if overlap is None else overlap
        if tiling == "published":
            from .archs import PUBLISHED_WINDOWS

            window_fn = PUBLISHED_WINDOWS.get(self.arch)
            if window_fn is None:
                return self.engine.restore(image, tile=0)
            return self.engine.restore(image, tile=tile, window_fn=window_fn)
        return self.engine.restore(image, tile=tile, overlap=overlap)

    def restore_image(self, image: imageio.Image, **kwargs: object) -> imageio.Image:
        restored = self.restore_array(imageio.to_float(image), **kwargs)  # type: ignore[arg-type]
        return imageio.from_float(restored, image)


def _hint(registry: Registry, record: ModelRecord | None, arch: str, field_name: str, fallback: int) -> int:
    """A tiling hint from the model's record, else from any record of the same architecture."""
    candidates = [record] if record else []
    candidates += [m for m in registry.models.values() if m.arch.lower() == arch.lower()]
    for m in candidates:
        value = getattr(m, field_name)
        if value is not None:
            return int(value)
    return fallback


def load(*, task: str | None = None, model: str | None = None, weights: str | Path | None = None,
         device: str = "auto", precision: str = "auto", batch_size: int = 4,
         offline: bool | None = None, registry: Registry | None = None) -> Model:
    """Resolve a task / registry name / checkpoint file to a ready-to-run model.

    Precedence: `weights` (a file), then `model` (a registry name), then the task's default.
    """
    from .engine import Engine
    from .loading import load_model

    registry = registry or load_registry()
    if weights is not None and model is not None:
        raise UsageError("give either --model or --weights, not both")
    record: ModelRecord | None = None
    if weights is not None:
        path = Path(weights).expanduser()
        if not path.is_file():
            raise UsageError(f"--weights {path}: no such file; check the path")
        loaded = load_model(path)
        name = path.stem
    else:
        if model is not None:
            record = registry.model(model)
        elif task is not None:
            record = registry.default_for(task)
        else:
            raise UsageError("name a task, a --model or a --weights file")
        from . import hub

        path = hub.fetch(record, offline=offline)
        loaded = load_model(path, container=record.container, expected_arch=record.arch)
        name = record.name
    engine = Engine.create(loaded.descriptor, device=device, precision=precision, batch_size=batch_size)
    return Model(
        name=name,
        engine=engine,
        checkpoint=path,
        record=record,
        tile=_hint(registry, record, loaded.arch, "tile", DEFAULT_TILE),
        overlap=_hint(registry, record, loaded.arch, "overlap", DEFAULT_OVERLAP),
        _sha256=record.sha256 if record else None,
    )


def restore(inputs: list[str] | str, output: str | Path, *, model: Model, recursive: bool = False,
            ext: str | None = None, suffix: str = "", tile: int | None = None, overlap: int | None = None,
            tiling: str = "blend", max_pixels: int | None = imageio.DEFAULT_MAX_PIXELS) -> Iterator[Result]:
    """Restore every image named by `inputs` (files, folders, globs) into `output`; yields one Result per input."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if tile is not None and tile < 0:
        raise UsageError(f"--tile {tile}: must be 0 (whole image) or a positive size")
    if overlap is not None and overlap < 0:
        raise UsageError(f"--overlap {overlap}: must not be negative")
    if tiling not in TILINGS:
        raise UsageError(f"--tiling '{tiling}' is not one of {', '.join(TILINGS)}")
    files = discover(inputs, recursive=recursive)
    jobs: list[Job] = plan_jobs(files, Path(output).expanduser(), ext=ext, suffix=suffix)

    def run_one(image: imageio.Image) -> tuple[imageio.Image, list[str]]:
        return model.restore_image(image, tile=tile, overlap=overlap, tiling=tiling), []

    return run_jobs(jobs, run_one, max_pixels=max_pixels)
