"""A checkpoint's cached, verified ONNX export run on ONNX Runtime's CPU provider without torch.

Once a checkpoint's first use on a machine chose ONNX Runtime (`derestore.onnx_backend`), the network
is no longer needed to run it: the export is verified, and the verdict records the facts the tiling
needs (size rule, channels, scale). `open_cached` then returns an engine on numpy arrays, and `load`
neither imports torch and spandrel (4–5 s of a command's start-up on a 2-core EPYC) nor reads the
checkpoint. Anything missing or different — no verdict for this machine and thread count, a verdict
for PyTorch, another ONNX Runtime, a lost export — returns None, and the caller loads the checkpoint
and decides as at first use.
"""

from __future__ import annotations

import logging
import sys
from dataclasses import dataclass, field
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from . import onnx_cache, stats_choice, tuning
from .errors import ExportError
from .memory import available_bytes
from .onnx_cache import INPUT, OUTPUT, NetworkFacts, ProbeShapes, Verdict
from .tiled_engine import DEFAULT_BATCH, TiledEngine
from .tiling import SizeRule

log = logging.getLogger(__name__)

CPU = "CPUExecutionProvider"


def onnxruntime() -> ModuleType | None:
    """The onnxruntime module, or None where it or onnx (which the exporter writes with) is not installed:
    then PyTorch runs everything."""
    import importlib.util

    if importlib.util.find_spec("onnx") is None:
        return None
    try:
        import onnxruntime as ort
    except ImportError:
        return None
    return ort


def open_session(model: bytes, provider: str, options: dict[str, object], threads: int) -> Any:
    """An ONNX Runtime session of `model` on `provider` (the CPU's for the nodes an accelerator lacks),
    with `threads` intra-op threads; ExportError where the provider does not start."""
    ort = onnxruntime()
    assert ort is not None
    settings = ort.SessionOptions()
    settings.intra_op_num_threads = threads
    settings.inter_op_num_threads = 1
    settings.log_severity_level = 3  # ONNX Runtime's own notes would go straight to stderr
    providers: list[Any] = [(provider, options)] + ([CPU] if provider != CPU else [])
    session = ort.InferenceSession(model, settings, providers=providers)
    if session.get_providers()[0] != provider:
        raise ExportError(f"ONNX Runtime's {provider} did not start here")
    return session


def run_failure(exc: Exception) -> Exception:
    """An ONNX Runtime run's error as the engines raise it: MemoryError where memory ran out (a smaller
    tile is tried, as with PyTorch), else RuntimeError."""
    text = f"ONNX Runtime: {' '.join(str(exc).split())[:300]}"
    lowered = str(exc).lower()
    memory = any(m in lowered for m in ("out of memory", "failed to allocate", "bad_alloc", "bad allocation"))
    return MemoryError(text) if memory else RuntimeError(text)


@dataclass
class CachedEngine(TiledEngine):
    """The engine `load` makes from a cached export: the published (global-statistics) network in fp32
    on the CPU, numpy arrays throughout."""

    facts: NetworkFacts
    session: Any = field(repr=False)
    threads: int
    backend_verdict: Verdict
    channels_last: bool  # PyTorch's layout measured here; the run record reports it as a PyTorch run would
    batch_size: int = DEFAULT_BATCH

    device = device_type = "cpu"
    backend = "onnxruntime"
    precision = "fp32"
    stats = "global"
    verdict = None  # no precision probe: ONNX Runtime runs fp32 only
    compile_seconds = None

    @property
    def arch(self) -> str:
        return self.facts.architecture

    @property
    def conversion(self) -> stats_choice.Conversion:
        return stats_choice.Conversion(arch=self.arch, stats="global")

    def _forward(self, batch: np.ndarray, dtype: Any = None) -> np.ndarray:
        return self._planes(self._run, batch, self.facts.input_channels)

    def _run(self, x: np.ndarray) -> np.ndarray:
        try:
            return self.session.run([OUTPUT], {INPUT: np.ascontiguousarray(x, dtype=np.float32)})[0]
        except Exception as exc:  # onnxruntime's errors derive from Exception only
            raise run_failure(exc) from exc

    def _rule(self) -> SizeRule:
        return self.facts.size_rule()

    def bytes_per_pixel(self) -> float:
        return tuning.bytes_per_pixel(self.arch)

    def _free_memory(self) -> int:
        return available_bytes()

    def _upload(self, image: np.ndarray) -> np.ndarray:
        return image

    def _array(self, values: np.ndarray) -> np.ndarray:
        return values

    def _cat(self, arrays: list[np.ndarray]) -> np.ndarray:
        return np.concatenate(arrays)

    def _zeros(self, shape: tuple[int, ...]) -> np.ndarray:
        return np.zeros(shape, dtype=np.float32)

    def _take(self, x: np.ndarray, indices: np.ndarray, axis: int) -> np.ndarray:
        return np.take(x, indices, axis=axis)

    def _numpy(self, x: np.ndarray) -> np.ndarray:
        return np.clip(x, 0, 1, out=x)


def cpu_only(device: str) -> bool:
    """Whether `device` can only mean the CPU here. Without torch loaded, `auto` counts as the CPU only
    on Linux with no GPU device node (NVIDIA, AMD, WSL); anything else is for torch to decide."""
    if device == "cpu":
        return True
    if device != "auto":
        return False
    if "torch" in sys.modules:
        from .engine import choose_device

        return choose_device(device).type == "cpu"
    nodes = ("/dev/nvidiactl", "/dev/nvidia0", "/dev/kfd", "/dev/dxg")
    return sys.platform.startswith("linux") and not any(Path(node).exists() for node in nodes)


def threads_for(threads: int | None) -> int:
    """The intra-op threads of a cached engine: those given, else torch's where torch is loaded (the
    host may have set them), else the command line's rule (`cpu_threads`)."""
    if threads is not None:
        return threads
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.get_num_threads()
    from .tiled_engine import cpu_threads

    return cpu_threads()


def cached_verdict(sha256: str, threads: int) -> Verdict | None:
    """The first-use verdict for a checkpoint on this CPU with `threads` threads (this ONNX Runtime, the same
    tracing code), where it measured ONNX Runtime exact and recorded the network's facts."""
    ort = onnxruntime()
    if ort is None:
        return None
    verdict = onnx_cache.cached(sha256, onnx_cache.cpu_machine(threads), ort.__version__)
    if verdict is None or verdict.network is None or verdict.provider != CPU or not verdict.exact:
        return None
    return verdict


def open_cached(verdict: Verdict, *, threads: int, backend: str, layout: str, stats: str,
                stats_window: int | None, tile: int, batch_size: int | None) -> CachedEngine | None:
    """The engine for the verdict's checkpoint where its first use chose ONNX Runtime under `backend`
    ("auto", or "onnxruntime", verified exact) and `layout`, for the published network (`stats` global,
    or auto choosing global), timed at the size `tile` asks for; None otherwise (see the module docstring)."""
    facts = verdict.network
    assert facts is not None
    if (stats_choice.default_stats(facts.architecture, stats_window) if stats == "auto" else stats) != "global":
        return None
    if facts.architecture in stats_choice.SPLIT_LINES | stats_choice.PUBLISHED_WINDOW_ARCHS:
        return None
    if not verdict.answers(ProbeShapes.of(facts, tile).probes(), provider=True, layouts=layout == "auto"):
        return None  # timed for another working size, or without both layouts: the caller measures again
    channels_last = verdict.layout(layout, tuning.channels_last(facts.architecture))
    chosen, reason = verdict.pick(backend, channels_last)
    if chosen != "onnxruntime":
        return None
    data = onnx_cache.load_export(verdict)
    if data is None:
        return None
    session = open_session(data, CPU, {}, threads)
    log.info("backend: onnxruntime for %s (%s; measured earlier on this machine; cached export, run without "
             "PyTorch)", facts.architecture, reason)
    return CachedEngine(facts=facts, session=session, threads=threads, backend_verdict=verdict,
                        channels_last=channels_last, batch_size=batch_size or DEFAULT_BATCH)
