"""ONNX Runtime as the network's backend, where it is exact and faster than PyTorch.

The first time a checkpoint runs on a machine (with a checkpoint digest to key
the result by), derestore measures how to run it fastest there:

1. export: `torch.onnx.export` of the network and spandrel's clamp to [0, 1]
   (opset 18; batch, height and width dynamic);
2. verification: PyTorch and ONNX Runtime restore two of the shipped photo
   tiles (`probe_tiles.png`) at a batch size, height and width the export did
   not see (a graph with a shape frozen in by tracing fails here); the largest
   absolute difference must be at most 1e-4;
3. timing: one 256×256 tile through ONNX Runtime and through PyTorch — on the
   CPU in both memory layouts, whose winner `layout="auto"` then uses; where
   that takes under half a second, once more at the size the model usually
   runs (its tile hint, at most 768 rows: a photo or a tile), because the
   ranking changes with size (NAFNet w16 on a 2-core EPYC: channels_last
   1.2× faster than ONNX Runtime at 512², ONNX Runtime 1.5× faster at
   1024×768).

`backend="auto"` picks ONNX Runtime when 1 and 2 passed and 3 measured it
faster; otherwise PyTorch, with the reason logged. The export is cached under
`<cache>/onnx/` keyed by the checkpoint's sha256, the opset and the versions
of the code that traced it (torch, spandrel, derestore); the verdict beside
it, also keyed by the ONNX Runtime version and the machine (CPU model and
thread count, or GPU name). Later runs read the verdict and load the file; on
the CPU they run it without torch at all (`derestore.onnx_engine`), since the
verdict records what the tiling needs to know of the network.

ONNX Runtime runs fp32 only: half precision stays with PyTorch on GPUs. Its
CUDA and CoreML execution providers are used for `cuda` and `mps` devices when
the installed build has them, measured the same way.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import io
import logging
import math
import time
import types
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.nn.functional as F

from . import __version__, atomic
from .errors import ExportError as ExportError
from .errors import UsageError
from .onnx_cache import (INPUT, OPSET, OUTPUT, TIMING_SIDE, TOLERANCE, NetworkFacts, ProbeShapes, Verdict,
                         cache_folder, cached, cpu_machine, load_export, save, versions)
from .onnx_engine import onnxruntime as onnxruntime
from .onnx_engine import open_session, run_failure

if TYPE_CHECKING:
    from spandrel import ImageModelDescriptor

log = logging.getLogger(__name__)

# A network this quick at TIMING_SIDE is timed again at its working size (see the module docstring).
STEP_UP_SECONDS = 0.5
# How long a process waits for another one measuring the same checkpoint before measuring itself.
LOCK_WAIT_SECONDS = 1800.0
_LAYOUTS = {"contiguous": torch.contiguous_format, "channels_last": torch.channels_last}


def machine_name(device: torch.device) -> str:
    """What a speed measurement holds for: the CPU model and torch's thread count, or the GPU's name."""
    if device.type == "cpu":
        return cpu_machine(torch.get_num_threads())
    from .precision import device_name

    return device_name(device)


# ---------------------------------------------------------------- export and session


class _Exportable(torch.nn.Module):
    """The network as spandrel's descriptor calls it (its call function, then the clamp to [0, 1])."""

    def __init__(self, descriptor: ImageModelDescriptor) -> None:
        super().__init__()
        self.model = descriptor.model
        self.call = getattr(descriptor, "_call_fn", None) or (lambda model, x: model(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.call(self.model, x).clamp(0, 1)


def probe_batch(shape: tuple[int, int, int, int], device: torch.device) -> torch.Tensor:
    """Natural photo tiles (the precision probe's) in `shape`: cropped, or mirrored out to size;
    grayscale networks get the tiles' mean of R, G and B."""
    from .precision import probe_tiles
    from .tiling import reflect_indices

    b, c, h, w = shape
    tiles = probe_tiles()
    planes = []
    for i in range(b):
        tile = tiles[i % len(tiles)]
        tile = tile.mean(axis=0, keepdims=True) if c == 1 else tile
        rows, cols = reflect_indices(tile.shape[1], h), reflect_indices(tile.shape[2], w)
        planes.append(tile[:, rows][:, :, cols])
    return torch.from_numpy(np.stack(planes)).to(device)


def export(descriptor: ImageModelDescriptor) -> bytes:
    """The network as an ONNX model (opset 18, dynamic batch/height/width, clamped output), with
    derestore's notes on its input in the model's metadata; ExportError where it does not export."""
    shapes = ProbeShapes.of(NetworkFacts.of(descriptor))
    sample = probe_batch(shapes.export, _device(descriptor))
    # The TorchScript exporter: it needs no onnxscript, and its graphs run exact (verified below anyway).
    options: dict[str, Any] = {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    buffer = io.BytesIO()
    try:
        with warnings.catch_warnings(), torch.no_grad(), _export_forms(descriptor.model):
            # Tracer warnings name what the verification checks: the graph at other shapes.
            warnings.simplefilter("ignore")
            torch.onnx.export(
                _Exportable(descriptor), (sample,), buffer, opset_version=OPSET, input_names=[INPUT],
                output_names=[OUTPUT], **options,
                dynamic_axes={INPUT: {0: "batch", 2: "height", 3: "width"},
                              OUTPUT: {0: "batch", 2: "out_height", 3: "out_width"}})
    except Exception as exc:  # any failure of the exporter means: this network runs on PyTorch
        raise ExportError(f"{descriptor.architecture.id} does not export to ONNX ({_brief(exc)})") from exc
    return _annotate(buffer.getvalue(), descriptor)


def _channels_layer_norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """LayerNorm2d (NAFNet, M3SNet: each pixel normalised over its channels) on channels-last pixels."""
    y = F.layer_norm(x.permute(0, 2, 3, 1), module.weight.shape, module.weight, module.bias, module.eps)
    return y.permute(0, 3, 1, 2)


def _pixel_layer_norm(module: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Restormer's LayerNorm with a bias (and derestore's, in its blocks) without the per-op arithmetic."""
    b, c, h, w = x.shape
    body = module.body
    y = F.layer_norm(x.flatten(2).transpose(1, 2), body.weight.shape, body.weight, body.bias, 1e-5)
    return y.transpose(1, 2).reshape(b, c, h, w)


def _forms() -> Callable[[torch.nn.Module], Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None]:
    """A module's export form, where the tracer would spell it out op by op (None: traced as it is)."""
    from .archs import blocks

    by_class: dict[type, Callable[[torch.nn.Module, torch.Tensor], torch.Tensor]] = {}
    with contextlib.suppress(ImportError):
        from spandrel.architectures.NAFNet.__arch.arch_util import LayerNorm2d as NAFNetNorm

        by_class[NAFNetNorm] = _channels_layer_norm
    with contextlib.suppress(ImportError):
        from spandrel_extra_arches.architectures.M3SNet.__arch.arch_utils import LayerNorm2d as M3SNetNorm

        by_class[M3SNetNorm] = _channels_layer_norm
    pixel_norms: tuple[type, ...] = (blocks.LayerNorm,)
    with_bias: tuple[type, ...] = (blocks.WithBiasLayerNorm,)
    with contextlib.suppress(ImportError):
        from spandrel_extra_arches.architectures.Restormer.__arch import restormer_arch

        pixel_norms += (restormer_arch.LayerNorm,)
        with_bias += (restormer_arch.WithBias_LayerNorm,)

    def form_of(module: torch.nn.Module) -> Callable[[torch.nn.Module, torch.Tensor], torch.Tensor] | None:
        if isinstance(module, pixel_norms):
            return _pixel_layer_norm if isinstance(module.body, with_bias) else None
        return by_class.get(type(module))

    return form_of


@contextlib.contextmanager
def _export_forms(model: torch.nn.Module) -> Iterator[None]:
    """Trace layer norms as ONNX's one LayerNormalization node (opset 17) rather than the nine element-wise
    passes their PyTorch code spells out: the same arithmetic, 13–25% faster in ONNX Runtime (lite NAFNet
    at 1024×768, Restormer at 256², 2-core EPYC), verified like any export. Per instance, for the trace
    only: the classes, and the network as PyTorch runs it, are left alone."""
    form_of, swapped = _forms(), []
    for module in model.modules():
        form = form_of(module)
        if form is not None:
            module.forward = types.MethodType(form, module)
            swapped.append(module)
    try:
        yield
    finally:
        for module in swapped:
            del module.forward


def _annotate(data: bytes, descriptor: ImageModelDescriptor) -> bytes:
    """What a deployment needs to feed the graph, in its metadata."""
    import onnx

    req = descriptor.size_requirements
    proto = onnx.load_from_string(data)
    notes = {
        "derestore.version": __version__,
        "derestore.architecture": descriptor.architecture.id,
        "derestore.input": (f"{INPUT}: float32 (batch, {descriptor.input_channels}, height, width), "
                            f"{'RGB' if descriptor.input_channels == 3 else 'grayscale'} in [0, 1]"),
        "derestore.output": f"{OUTPUT}: float32, clamped to [0, 1], scale {descriptor.scale}",
        "derestore.multiple_of": str(req.multiple_of),
        "derestore.minimum": str(req.minimum),
        "derestore.square": str(req.square).lower(),
        "derestore.padding": "pad the bottom and right edges by reflection to the multiple; crop the output back",
    }
    for key, value in notes.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    return proto.SerializeToString()


@dataclass(frozen=True)
class Provider:
    """An ONNX Runtime execution provider for a torch device; `device` is where its inputs live."""

    name: str
    options: dict[str, object]
    device: torch.device


def provider_for(device: torch.device, available: list[str]) -> Provider | None:
    """The execution provider that runs `device`'s work, if this ONNX Runtime build has it."""
    if device.type == "cpu":
        return Provider("CPUExecutionProvider", {}, device)
    if device.type == "cuda" and "CUDAExecutionProvider" in available:
        index = device.index if device.index is not None else torch.cuda.current_device()
        return Provider("CUDAExecutionProvider", {"device_id": index}, torch.device("cuda", index))
    if device.type == "mps" and "CoreMLExecutionProvider" in available:
        return Provider("CoreMLExecutionProvider", {}, torch.device("cpu"))
    return None


class OnnxNetwork:
    """An ONNX Runtime session called like a spandrel descriptor: a (B, C, H, W) float tensor in, the
    restored tensor out on the same device, padded to the size rule and cropped back as spandrel does.

    Its intra-op threads are torch's (`torch.get_num_threads()` when created): the host decides.
    Allocation failures raise MemoryError, so that a smaller tile is tried as with PyTorch.
    """

    def __init__(self, model: bytes, provider: Provider, descriptor: ImageModelDescriptor) -> None:
        self.session = open_session(model, provider.name, provider.options, torch.get_num_threads())
        self.provider = provider
        self.requirements = descriptor.size_requirements
        self.scale = descriptor.scale
        self.out_channels = descriptor.output_channels

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        h, w = batch.shape[-2:]
        pad_w, pad_h = self.requirements.get_padding(w, h)
        x = _pad(batch, pad_w, pad_h).to(self.provider.device, torch.float32).contiguous()
        b, _, ph, pw = x.shape
        out = torch.empty((b, self.out_channels, ph * self.scale, pw * self.scale), device=x.device)
        binding = self.session.io_binding()
        for name, tensor in ((INPUT, x), (OUTPUT, out)):
            bind = binding.bind_input if name == INPUT else binding.bind_output
            bind(name, tensor.device.type, tensor.device.index or 0, np.float32, tuple(tensor.shape),
                 tensor.data_ptr())
        if x.is_cuda:
            torch.cuda.current_stream(x.device).synchronize()  # ONNX Runtime reads on its own stream
        try:
            self.session.run_with_iobinding(binding)
        except Exception as exc:  # onnxruntime's errors derive from Exception only
            raise run_failure(exc) from exc
        if pad_w or pad_h:
            out = out[..., :h * self.scale, :w * self.scale]
        return out.to(batch.device)


def _pad(x: torch.Tensor, pad_w: int, pad_h: int) -> torch.Tensor:
    """spandrel's padding: reflection as far as it reaches, then replication."""
    if not (pad_w or pad_h):
        return x
    h, w = x.shape[-2:]
    rw, rh = min(pad_w, w - 1), min(pad_h, h - 1)
    x = F.pad(x, (0, rw, 0, rh), "reflect")
    return F.pad(x, (0, pad_w - rw, 0, pad_h - rh), "replicate")


def verify(descriptor: ImageModelDescriptor, network: Callable[[torch.Tensor], torch.Tensor],
           shape: tuple[int, int, int, int] | None = None) -> float:
    """The largest absolute difference between PyTorch and `network` on natural tiles in `shape`
    (default: the verification shape, which the export did not see); inf where either is not finite."""
    x = probe_batch(shape or ProbeShapes.of(NetworkFacts.of(descriptor)).verify, _device(descriptor))
    with torch.inference_mode():
        reference = descriptor(x.clone()).float()
        out = network(x.clone()).float()
    if out.shape != reference.shape or not bool(torch.isfinite(out).all() and torch.isfinite(reference).all()):
        return math.inf
    return float((out - reference).abs().max())


# ---------------------------------------------------------------- timing


def time_candidates(candidates: dict[str, Callable[[], object]], *, min_rounds: int = 1, max_rounds: int = 8,
                    min_seconds: float = 0.3, long_call: float = 2.0, sync: Callable[[], None] = lambda: None,
                    clear_win: float = 1.5) -> dict[str, float]:
    """Each candidate's best time over interleaved rounds, after one call each that warms up allocators,
    kernels and ONNX Runtime's memory plan — and that is the only sample where every candidate took
    `long_call` seconds or more (their one-time costs are small beside that; heavy networks then pay
    the timing once). Rounds go on until each candidate ran `min_seconds` in all (short calls are noisy),
    or end early after a round that one candidate won by `clear_win`× in calls of 0.1 s or more."""
    def one_round() -> dict[str, float]:
        seconds = {}
        for name, run in candidates.items():
            started = time.perf_counter()
            run()
            sync()
            seconds[name] = time.perf_counter() - started
        return seconds

    warm = one_round()
    if min(warm.values()) >= long_call:
        return {name: round(seconds, 4) for name, seconds in warm.items()}
    best = {name: math.inf for name in candidates}
    total = dict.fromkeys(candidates, 0.0)
    for done in range(1, max_rounds + 1):
        this_round = one_round()
        for name, seconds in this_round.items():
            best[name] = min(best[name], seconds)
            total[name] += seconds
        ordered = sorted(this_round.values())
        if len(ordered) > 1 and ordered[1] > clear_win * ordered[0] >= clear_win * 0.1:
            break
        if done >= min_rounds and min(total.values()) >= min_seconds:
            break
    return {name: round(seconds, 4) for name, seconds in best.items()}


@contextlib.contextmanager
def _lock(sha256: str) -> Iterator[None]:
    """One process measures a checkpoint at a time; the others wait, then read its verdict. Without a
    usable lock (or after LOCK_WAIT_SECONDS) a process measures on its own: the writes are atomic."""
    import filelock

    from .hub import cache_root

    path = cache_root() / "locks" / f"onnx-{sha256[:32]}.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(path))
        try:
            lock.acquire(timeout=1.0)
        except filelock.Timeout:
            log.info("waiting for another process measuring this checkpoint (lock %s)", path)
            lock.acquire(timeout=LOCK_WAIT_SECONDS)
    except (OSError, NotImplementedError, filelock.Timeout) as exc:
        log.warning("cannot hold lock %s (%s); measuring without it", path, exc)
        yield
        return
    try:
        yield
    finally:
        lock.release()


# ---------------------------------------------------------------- the choice


@dataclass
class Choice:
    """The engine's backend (`network` None: PyTorch) and PyTorch's layout, and the verdict behind them."""

    network: OnnxNetwork | None
    channels_last: bool
    verdict: Verdict | None = None


def choose(descriptor: ImageModelDescriptor, device: torch.device, *, backend: str, sha256: str | None,
           channels_last: bool, layout_auto: bool, tile: int = TIMING_SIDE) -> Choice:
    """The backend for `descriptor` on `device` (`auto`: ONNX Runtime where exact and faster) and, on the
    CPU under `layout_auto`, PyTorch's faster layout; measured at first use (quick networks at `tile`,
    the side they usually run at), cached under `sha256`.

    `backend="onnxruntime"` insists: where ONNX Runtime is missing or has no provider for the device it
    raises UsageError, where the network does not export exactly ExportError."""
    required = backend == "onnxruntime"
    ort = onnxruntime() if backend != "torch" else None
    available = ort.get_available_providers() if ort is not None else []
    provider = provider_for(device, available) if ort is not None else None
    if provider is None and backend != "torch":
        why = ("onnxruntime or onnx is not installed (pip install onnxruntime onnx)" if ort is None else
               f"this onnxruntime has no execution provider for {device.type} (it has {', '.join(available)})")
        if required:
            raise UsageError(f"backend='onnxruntime': {why}")
        log.info("backend: torch (%s)", why)
    want_layout = layout_auto and device.type == "cpu"
    if provider is None and not want_layout:
        return Choice(None, channels_last)
    if sha256 is None:
        if not required:
            if provider is not None:
                log.info("backend: torch (no checkpoint digest to cache a measurement under)")
            return Choice(None, channels_last)
        verdict, data = _measure(descriptor, device, "", provider, channels_last=channels_last, layouts=False,
                                 tile=tile)
        return _decide(descriptor, verdict, data, provider, backend, channels_last, layout_auto, fresh=True)
    machine = machine_name(device)
    # A measurement of layouts alone (backend="torch", or no onnxruntime) is keyed as made without it.
    version = ort.__version__ if provider is not None else None

    probes = ProbeShapes.of(NetworkFacts.of(descriptor), tile).probes()

    def sufficient(found: Verdict | None) -> bool:
        return found is not None and found.answers(probes, provider=provider is not None, layouts=want_layout)

    verdict, data, fresh = cached(sha256, machine, version), None, False
    if not sufficient(verdict):
        with _lock(sha256):
            verdict = cached(sha256, machine, version)
            if not sufficient(verdict):
                verdict, data = _measure(descriptor, device, sha256, provider, channels_last=channels_last,
                                         layouts=want_layout, tile=tile)
                save(verdict, data)
                fresh = True
    assert verdict is not None
    return _decide(descriptor, verdict, data, provider, backend, channels_last, layout_auto, fresh=fresh)


def _decide(descriptor: ImageModelDescriptor, verdict: Verdict, data: bytes | None, provider: Provider | None,
            backend: str, channels_last: bool, layout_auto: bool, *, fresh: bool) -> Choice:
    if layout_auto and verdict.faster_layout() is not None:
        channels_last = bool(verdict.faster_layout())
    choice = Choice(None, channels_last, verdict)
    when = f"measured now in {verdict.measure_seconds:.1f} s" if fresh else "measured earlier on this machine"
    if provider is None:
        if layout_auto and verdict.faster_layout() is not None:
            log.info("layout: %s for %s (%s)", "channels_last" if channels_last else "contiguous",
                     descriptor.architecture.id, when)
        return choice
    chosen, reason = verdict.pick(backend, channels_last)
    if chosen == "onnxruntime":
        data = data or load_export(verdict)
        if data is None:  # the cached file went missing: the same code traces the same graph again
            data = export(descriptor)
            save(dataclasses.replace(verdict, onnx_sha256=hashlib.sha256(data).hexdigest()), data)
        choice.network = OnnxNetwork(data, provider, descriptor)
    elif layout_auto and verdict.faster_layout() is not None:
        reason += f"; layout {'channels_last' if channels_last else 'contiguous'}"
    log.info("backend: %s for %s (%s; %s)", chosen, descriptor.architecture.id, reason, when)
    return choice


def _measure(descriptor: ImageModelDescriptor, device: torch.device, sha256: str, provider: Provider | None, *,
             channels_last: bool, layouts: bool, tile: int = TIMING_SIDE) -> tuple[Verdict, bytes | None]:
    """Export, verify and time (see the module docstring); returns the verdict and the verified export."""
    started = time.perf_counter()
    ort = onnxruntime() if provider is not None else None
    shapes = ProbeShapes.of(NetworkFacts.of(descriptor), tile)
    what = " and ".join(w for w, on in (("ONNX Runtime", provider is not None), ("memory layouts", layouts)) if on)
    log.info("first use of this %s checkpoint here: timing %s against PyTorch (once; cached in %s)",
             descriptor.architecture.id, what, cache_folder())
    current = "channels_last" if channels_last else "contiguous"
    other = "contiguous" if channels_last else "channels_last"
    # A copy in the other layout: converting the weights back and forth would be timed too.
    copy = _copy_in_layout(descriptor.model, other) if layouts else None
    network: OnnxNetwork | None = None

    def candidates_on(shape: tuple[int, int, int, int]) -> dict[str, Callable[[], object]]:
        x = probe_batch(shape, _device(descriptor))
        calls: dict[str, Callable[[], object]] = {current: _torch_call(descriptor, descriptor.model, x, current)}
        if copy is not None:
            calls[other] = _torch_call(descriptor, copy, x, other)
        if network is not None:
            calls["onnxruntime"] = functools.partial(network, x)
        return calls

    data: bytes | None = None
    export_error = diff = export_seconds = None
    if provider is not None:
        t0 = time.perf_counter()
        try:
            data = export(descriptor)
            export_seconds = round(time.perf_counter() - t0, 2)
            network = OnnxNetwork(data, provider, descriptor)
            diff = verify(descriptor, network)
        except ExportError as exc:
            export_error, data = str(exc), None
        except Exception as exc:  # the graph exported, but ONNX Runtime refuses or fails it
            export_error, data = f"ONNX Runtime cannot run the exported graph ({_brief(exc)})", None
        if data is None or diff is None or diff > TOLERANCE:
            data, network = None, None
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    probe, seconds = shapes.timing, {}
    with torch.inference_mode():
        candidates = candidates_on(probe)
        if len(candidates) > 1:
            seconds = time_candidates(candidates, sync=sync)
            if max(seconds.values()) < STEP_UP_SECONDS and shapes.work[2] * shapes.work[3] > probe[2] * probe[3]:
                probe = shapes.work
                seconds = time_candidates(candidates_on(probe), sync=sync)
    verdict = Verdict(
        sha256=sha256, machine=machine_name(device), onnxruntime=ort.__version__ if ort is not None else None,
        provider=provider.name if provider is not None else None, opset=OPSET, versions=versions(), network=NetworkFacts.of(descriptor),
        seconds=seconds, probe="×".join(map(str, probe)), export_error=export_error,
        max_abs_diff=None if diff is None else float(f"{diff:.3g}"),
        onnx_sha256=hashlib.sha256(data).hexdigest() if data is not None else None,
        export_seconds=export_seconds, measure_seconds=round(time.perf_counter() - started, 2))
    return verdict, data


def _device(descriptor: ImageModelDescriptor) -> torch.device:
    return next(descriptor.model.parameters(), torch.empty(0)).device


def _torch_call(descriptor: ImageModelDescriptor, model: torch.nn.Module, x: torch.Tensor,
                layout: str) -> Callable[[], torch.Tensor]:
    """The network in PyTorch as the engine runs it: the descriptor's call, then the clamp."""
    call = _Exportable(descriptor).call
    x = x.contiguous(memory_format=_LAYOUTS[layout])
    return lambda: call(model, x).clamp_(0, 1)


def _copy_in_layout(model: torch.nn.Module, layout: str) -> torch.nn.Module:
    import copy

    return copy.deepcopy(model).to(memory_format=_LAYOUTS[layout])


def _brief(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:240]}" if text else type(exc).__name__


# ---------------------------------------------------------------- `derestore export`


@dataclass(frozen=True)
class ExportReport:
    """A verified ONNX file that `write_export` wrote."""

    path: Path
    size: int
    sha256: str
    architecture: str
    max_abs_diff: float
    probe: str  # the verification input's shape
    multiple_of: int
    opset: int = OPSET


def export_target(output: str | Path, name: str, *, given: list[Path]) -> Path:
    """Where `derestore export` writes: `output`, or `NAME.onnx` inside it when it is a folder. Refused before
    any model loads: a file the user gave (`given`), or a folder that cannot be created or written."""
    path = Path(output).expanduser()
    if path.is_dir() or str(output).endswith(("/", "\\")):
        path = path / f"{name}.onnx"
    resolved = path.resolve()
    if any(resolved == g.expanduser().resolve() for g in given):
        raise UsageError(f"output={path} is the checkpoint itself; it is never overwritten: choose another file")
    existing = path.parent
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if not existing.is_dir():
        raise UsageError(f"output={path}: {existing} is a file, not a folder; choose another output")
    probe = atomic.temp_path_for(existing / "probe")
    try:
        probe.touch(exist_ok=False)
        probe.unlink()
    except OSError as exc:
        raise UsageError(f"output={path}: folder {existing} is not writable ({exc.strerror or exc})") from None
    return path


def write_export(descriptor: ImageModelDescriptor, path: Path) -> ExportReport:
    """Export the network, verify it against PyTorch on the CPU (max abs diff ≤ 1e-4 on natural tiles at a
    shape the export did not see), then write `path` atomically; ExportError, and nothing written, if not."""
    if onnxruntime() is None:
        raise UsageError("exporting needs onnxruntime to verify the file: pip install onnxruntime onnx")
    data = export(descriptor)
    shape = ProbeShapes.of(NetworkFacts.of(descriptor)).verify
    try:
        diff = verify(descriptor, OnnxNetwork(data, Provider("CPUExecutionProvider", {}, torch.device("cpu")),
                                              descriptor), shape)
    except Exception as exc:  # the graph exported, but ONNX Runtime refuses or fails it
        raise ExportError(f"ONNX Runtime cannot run the exported {descriptor.architecture.id} graph "
                          f"({_brief(exc)})") from exc
    if not diff <= TOLERANCE:
        raise ExportError(f"the exported {descriptor.architecture.id} graph differs from PyTorch by {diff:.1e} "
                          f"(more than {TOLERANCE:g}) on the probe tiles; nothing written")
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_bytes(path, data)
    return ExportReport(path=path, size=len(data), sha256=hashlib.sha256(data).hexdigest(),
                        architecture=descriptor.architecture.id, max_abs_diff=float(f"{diff:.3g}"),
                        probe="×".join(map(str, shape)), multiple_of=descriptor.size_requirements.multiple_of)
