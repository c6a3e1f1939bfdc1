"""Running a model descriptor on images: device and precision choice, tiled batched inference."""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from . import local_stats, tuning
from .errors import UsageError
from .onnx_cache import NetworkFacts
from .tiled_engine import DEFAULT_BATCH, LAYOUTS, PRECISIONS, TiledEngine, check_backend
from .tiling import SizeRule, TilePlan

if TYPE_CHECKING:
    from spandrel import ImageModelDescriptor

    from .local_stats import Conversion
    from .onnx_backend import OnnxNetwork
    from .onnx_backend import Verdict as BackendVerdict
    from .precision import Verdict

log = logging.getLogger(__name__)

AUTO_TILE_FLOOR = 64  # under local statistics the context comes on top of this
_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def mps_available() -> bool:
    """Apple's Metal GPU, where this torch build has it."""
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def parse_device(spec: str) -> torch.device | None:
    """`spec`'s device, checked for spelling only (None for `auto`): auto, cpu, cuda, cuda:N or mps."""
    if spec == "auto":
        return None
    try:
        device = torch.device(spec)
    except RuntimeError:
        raise UsageError(f"device='{spec}' is not a device; use auto, cpu, cuda, cuda:N or mps") from None
    if device.type not in ("cpu", "cuda", "mps"):
        raise UsageError(f"device='{spec}' is not supported; use auto, cpu, cuda, cuda:N or mps")
    return device


def parse_devices(spec: str) -> list[str]:
    """One device spec per model replica: `cuda:all` (every GPU), `cuda:0,1,3` or `cuda:0,cuda:2`
    (bare numbers continue the device type before them), or a single device."""
    if spec == "cuda:all":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise UsageError("device='cuda:all': no CUDA GPU is available here; use device='cpu'")
        return [f"cuda:{i}" for i in range(count)]
    devices: list[str] = []
    for part in (p.strip() for p in spec.split(",")):
        if part.isdigit() and devices:
            part = f"{devices[-1].split(':')[0]}:{part}"
        devices.append(part)
    if len(set(devices)) < len(devices) and any(d.startswith("cuda") for d in devices):
        raise UsageError(f"device='{spec}' names a GPU twice; give each GPU once")
    return devices


def choose_device(spec: str = "auto") -> torch.device:
    """`auto` → the first CUDA device, else Apple's MPS, else the CPU; a named device must exist here."""
    device = parse_device(spec)
    if device is None:
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("mps") if mps_available() else torch.device("cpu")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UsageError(f"device='{spec}': no CUDA GPU is available here; use device='cpu'")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UsageError(
                f"device='{spec}': only {torch.cuda.device_count()} CUDA device(s) present; use cuda:0…"
            )
    if device.type == "mps" and not mps_available():
        raise UsageError(f"device='{spec}': this machine or torch build has no MPS (Apple GPU); use device='cpu'")
    return device


def explicit_precision(spec: str, descriptor: ImageModelDescriptor) -> torch.dtype:
    """The precision a user named; it runs as asked, with a warning where it is known to be inaccurate."""
    if spec not in PRECISIONS or spec == "auto":
        raise UsageError(f"precision='{spec}' is not one of {', '.join(PRECISIONS)}")
    flags = {"fp16": descriptor.supports_half, "bf16": descriptor.supports_bfloat16}
    if spec in flags and not flags[spec]:
        log.warning("%s is marked as not accurate in %s; running in it as asked (precision='auto' measures "
                    "whether this checkpoint is)", descriptor.architecture.id, spec)
    return _DTYPES[spec]


def choose_layout(spec: str, descriptor: ImageModelDescriptor) -> bool:
    """True for channels_last: under `auto`, where measurement showed it faster for the architecture."""
    if spec not in LAYOUTS:
        raise UsageError(f"layout='{spec}' is not one of {', '.join(LAYOUTS)}")
    if spec == "auto":
        return tuning.channels_last(descriptor.architecture.id)
    return spec == "channels_last"


def free_memory(device: torch.device) -> int:
    """Bytes a forward pass may still take: free device memory plus the allocator's idle cache, or the
    RAM this process may still use (its cgroup's limit included)."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return free + torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
    from .memory import available_bytes

    # MPS shares the system's memory.
    return available_bytes()


def set_cpu_threads(threads: int) -> None:
    """Process-wide: only when the caller asks (the CLI does, with `cpu_threads()`)."""
    torch.set_num_threads(threads)


@dataclass
class Engine(TiledEngine):
    """A loaded model on its device, ready to restore (3, H, W) float images."""

    descriptor: ImageModelDescriptor
    device: torch.device
    dtype: torch.dtype
    batch_size: int = 4
    channels_last: bool = False
    compile_pending: bool = False
    compile_seconds: float | None = None
    verdict: Verdict | None = None  # the precision probe's verdict for this checkpoint and device, when there is one
    _bytes_per_pixel: float | None = field(default=None, repr=False)
    onnx: OnnxNetwork | None = field(default=None, repr=False)  # the network on ONNX Runtime, when it runs there
    backend_verdict: BackendVerdict | None = None  # the first-use measurement behind the backend and layout
    conversion: Conversion | None = None  # the network's statistics (`derestore.local_stats.apply`)

    @classmethod
    def create(cls, descriptor: ImageModelDescriptor, *, device: str = "auto", precision: str = "auto",
               batch_size: int | None = None, layout: str = "auto", compile: bool = False,
               tune_kernels: bool = False, checkpoint_sha256: str | None = None,
               backend: str = "auto", conversion: Conversion | None = None, tile_hint: int = 512) -> "Engine":
        """`precision="auto"`: fp32, or on a device with half types the one measured accurate for this
        checkpoint (`derestore.precision`; the verdict is cached by `checkpoint_sha256`).
        `tune_kernels`: let cuDNN pick the fastest kernels for each input shape — a process-wide
        setting (`torch.backends.cudnn.benchmark`), so only when asked (the command line does).
        `backend`: torch, onnxruntime (fp32), or auto — ONNX Runtime where the checkpoint's export measured
        exact and faster on this machine, and under `layout="auto"` PyTorch's layout measured on this CPU
        (`derestore.onnx_backend`; both need `checkpoint_sha256` to cache the measurement by).
        `tile_hint`: the side the model usually runs at, where quick networks are timed.
        `conversion`: what `local_stats.apply` made of the network; tiles then carry the context its
        statistics need, and a network whose behaviour follows the tile's place stays on PyTorch."""
        from . import precision as measured

        check_backend(backend, precision, compile)
        pinned = _torch_only(conversion)
        if pinned and backend == "onnxruntime":
            if conversion is not None and conversion.stats == "local":
                raise UsageError(f"backend='onnxruntime': {pinned}; use stats='global' or backend='torch'")
            from .onnx_backend import ExportError

            raise ExportError(f"backend='onnxruntime': {pinned}; use backend='auto' or 'torch'")
        if backend == "onnxruntime" and precision == "auto":
            precision = "fp32"  # ONNX Runtime's only precision: no half-precision probe

        if batch_size is not None and batch_size < 1:
            raise UsageError(f"batch_size={batch_size}: must be at least 1")
        if precision not in PRECISIONS:
            raise UsageError(f"precision='{precision}' is not one of {', '.join(PRECISIONS)}")
        dev = choose_device(device)
        dtype = torch.float32 if precision == "auto" else explicit_precision(precision, descriptor)
        channels_last = choose_layout(layout, descriptor)
        if tune_kernels and dev.type == "cuda":
            # Tiles and same-size datasets repeat one shape, for which the tuned kernels pay off.
            torch.backends.cudnn.benchmark = True
        if dev.type == "mps":
            if os.environ.get("PYTORCH_ENABLE_MPS_FALLBACK") == "1":
                log.info("operations torch lacks on MPS run on the CPU (PYTORCH_ENABLE_MPS_FALLBACK=1)")
            else:
                log.info("on MPS, operations torch lacks there fail; PYTORCH_ENABLE_MPS_FALLBACK=1 (set before "
                         "torch is imported) runs them on the CPU instead")
        descriptor.to(dev)
        descriptor.eval()
        if channels_last:
            descriptor.model.to(memory_format=torch.channels_last)
        if compile:
            descriptor.model.compile()
        engine = cls(descriptor=descriptor, device=dev, dtype=dtype, batch_size=batch_size or DEFAULT_BATCH,
                     channels_last=channels_last, compile_pending=compile, conversion=conversion)
        if checkpoint_sha256 and (precision == "auto" and measured.half_types(dev) or precision != "auto"):
            engine.verdict = engine._verdict(checkpoint_sha256, probe=precision == "auto")
        if precision == "auto" and engine.verdict is not None:
            engine.dtype = measured.dtype(engine.verdict.precision)
        elif engine.verdict is not None and engine.verdict.accurate(precision) is False:
            log.warning("%s was measured inaccurate for this checkpoint on %s (%s dB against fp32, below %g); "
                        "running in it as asked", precision, engine.verdict.device,
                        engine.verdict.measured[precision]["psnr"], measured.MIN_PSNR)
        if pinned and backend == "auto":
            log.info("backend: torch (%s)", pinned)
            backend = "torch"
        if backend != "torch" or layout == "auto":
            engine._choose_backend(backend, layout == "auto", checkpoint_sha256, compile, tile_hint)
        if batch_size is None and dev.type == "cpu" and engine.backend == "torch":
            # PyTorch on a CPU ran 4 tiles (or whole video frames) per pass 1.6–2× slower than one at a
            # time (lite NAFNet, 256² tiles and 640×360 frames, 2-core EPYC); ONNX Runtime gained from 4.
            engine.batch_size = 1
        return engine

    def _choose_backend(self, backend: str, layout_auto: bool, sha256: str | None, compile: bool,
                        tile_hint: int) -> None:
        """Hand `_call` to ONNX Runtime where asked or measured better, and take PyTorch's measured layout."""
        from . import onnx_backend

        if backend == "auto" and (compile or self.dtype != torch.float32):
            log.info("backend: torch (%s)", "torch.compile was asked for" if compile else
                     f"ONNX Runtime runs fp32 only, and {self.precision} runs here")
            return
        if compile:
            return  # a layout timed without compilation says nothing about the compiled network
        choice = onnx_backend.choose(self.descriptor, self.device, backend=backend, sha256=sha256,
                                     channels_last=self.channels_last, layout_auto=layout_auto, tile=tile_hint)
        if choice.channels_last != self.channels_last:
            self.channels_last = choice.channels_last
            self.descriptor.model.to(memory_format=torch.channels_last if self.channels_last
                                     else torch.contiguous_format)
        self.onnx, self.backend_verdict = choice.network, choice.verdict

    @property
    def backend(self) -> str:
        return "torch" if self.onnx is None else "onnxruntime"

    def _verdict(self, sha256: str, *, probe: bool) -> Verdict | None:
        from . import precision as measured

        if not probe:
            return measured.cached(sha256, measured.device_name(self.device))

        def restore(tile: np.ndarray, dtype: torch.dtype) -> np.ndarray:
            return self.restore(tile, tile=0, dtype=dtype)

        return measured.decide(restore, self.device, sha256)

    @property
    def precision(self) -> str:
        return {v: k for k, v in _DTYPES.items()}[self.dtype]

    @property
    def stats(self) -> str:
        """The network's statistics: local (over windows) or global (as published)."""
        return self.conversion.stats if self.conversion is not None else "global"

    @property
    def arch(self) -> str:
        return self.descriptor.architecture.id

    @property
    def device_type(self) -> str:
        return self.device.type

    @property
    def threads(self) -> int:
        """CPU threads of the network's work: torch's, which ONNX Runtime's sessions follow too."""
        return torch.get_num_threads()

    def context(self, overlap: int) -> int:
        """Pixels a tile carries around the part it contributes: under local statistics their reach on
        top of the convolutional context (`overlap // 2`), so that tiles equal the whole image."""
        if self.stats != "local":
            return overlap // 2
        return local_stats.context(self.conversion, overlap // 2)

    def _rule(self) -> SizeRule:
        rule = NetworkFacts.of(self.descriptor).size_rule()
        if self.stats == "local":
            # Cells and the deepest level's grid of every tile must fall where the whole image's do.
            rule = dataclasses.replace(rule, multiple=math.lcm(rule.multiple, self.conversion.align))
        return rule

    def plan(self, height: int, width: int, tile: int, overlap: int) -> TilePlan:
        """Tiles of `tile` pixels with `overlap` context at each seam; under local statistics `tile` is
        the part each window contributes, and the windows are `2 · context` larger, cut sharply in the
        middle of their shared strips (each side is exact there, a feather would only blur)."""
        if self.stats != "local":
            return super().plan(height, width, tile, overlap)
        context = self.context(overlap)
        return self._plan(height, width, tile, overlap, tile + 2 * context if tile else 0, context, 0)

    def _placed(self, plan: TilePlan, windows: list) -> contextlib.AbstractContextManager:
        """MPRNet splits each window along the whole image's lines."""
        if self.conversion is None or not self.conversion.split_lines:
            return contextlib.nullcontext()
        return local_stats.placed(self.descriptor.model, (plan.padded_height, plan.padded_width),
                                  [(win.y0, win.x0) for win in windows])

    def _forward(self, batch: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
        # Weights stay fp32 and half precision runs under autocast, which keeps the
        # numerically touchy ops (norms, softmax, reductions) in fp32 and makes an
        # fp32 retry of a bad half-precision result free.
        dtype = dtype or self.dtype
        batch = batch.to(self.device, torch.float32, non_blocking=True)
        if self.channels_last and self.onnx is None:
            batch = batch.contiguous(memory_format=torch.channels_last)
        started = time.perf_counter() if self.compile_pending else 0.0
        network = self.descriptor if self.onnx is None else self.onnx
        if dtype == torch.float32:
            out = self._planes(network, batch, self.descriptor.input_channels)
        else:
            with torch.autocast(self.device.type, dtype=dtype):
                out = self._planes(network, batch, self.descriptor.input_channels).float()
        if self.compile_pending:
            self.compile_pending = False
            self.compile_seconds = time.perf_counter() - started
        return out

    def bytes_per_pixel(self) -> float:
        """Peak forward memory per input pixel: probed on a GPU, the measured table on the CPU."""
        if self._bytes_per_pixel is None:
            if self.device.type == "cuda":
                self._bytes_per_pixel = self._probe_bytes_per_pixel()
            else:
                self._bytes_per_pixel = tuning.bytes_per_pixel(self.arch)
        return self._bytes_per_pixel

    @torch.inference_mode()
    def _probe_bytes_per_pixel(self) -> float:
        # The growth of the peak between two sizes excludes weights and fixed buffers.
        sides = (128, 256)
        peaks = []
        for side in sides:
            torch.cuda.synchronize(self.device)
            base = torch.cuda.memory_allocated(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._forward(torch.zeros((1, 3, side, side), device=self.device))
            torch.cuda.synchronize(self.device)
            peaks.append(torch.cuda.max_memory_allocated(self.device) - base)
        return max(1.0, (peaks[1] - peaks[0]) / (sides[1] ** 2 - sides[0] ** 2))

    def _free_memory(self) -> int:
        return free_memory(self.device)

    def auto_tile(self, height: int, width: int, overlap: int = 32) -> int:
        """The largest tile (0 = whole image) whose passes fit in the memory free right now; under local
        statistics the windows forwarded are the tile and its context."""
        side = super().auto_tile(height, width, overlap)
        if side and self.stats == "local":
            side = max(AUTO_TILE_FLOOR, side - 2 * self.context(overlap))
        return side

    def _upload(self, image: np.ndarray) -> torch.Tensor:
        x = torch.from_numpy(image)
        if self.device.type == "cuda":
            # Pinned memory lets the copy run asynchronously; padding and tiling then happen on the device.
            x = x.pin_memory().to(self.device, non_blocking=True)
        return x

    def _array(self, values: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(values).to(self.device)

    def _cat(self, arrays: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat(arrays)

    def _zeros(self, shape: tuple[int, ...]) -> torch.Tensor:
        return torch.zeros(shape, dtype=torch.float32, device=self.device)

    def _take(self, x: torch.Tensor, indices: np.ndarray, axis: int) -> torch.Tensor:
        return x.index_select(axis, torch.from_numpy(indices).to(x.device))

    def _numpy(self, x: torch.Tensor) -> np.ndarray:
        return x.clamp_(0, 1).cpu().numpy()

    @torch.inference_mode()
    def restore_batch(self, images: list[np.ndarray], dtype: torch.dtype | None = None) -> list[np.ndarray]:
        return super().restore_batch(images, dtype)

    @torch.inference_mode()
    def restore(self, image: np.ndarray, **options: Any) -> np.ndarray:
        """See `TiledEngine.restore`; without autograd."""
        return super().restore(image, **options)


def _torch_only(conversion: Conversion | None) -> str | None:
    """Why a converted network must stay on PyTorch (None: it need not): an exported graph freezes
    what the network decides from the input's size or place."""
    if conversion is None:
        return None
    if conversion.stats == "local":
        return "local statistics pick their windows by the input's size, which an ONNX export freezes"
    if conversion.split_lines:
        return "MPRNet's split lines follow each tile's place in the image, which an ONNX export freezes"
    return None
