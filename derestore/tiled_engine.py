"""What every engine shares: restoring (3, H, W) float images whole or in blended tiles, the automatic
tile size, and which errors a smaller tile can avoid. Free of torch: the PyTorch engine
(`derestore.engine`) and the one that runs a cached ONNX export without torch (`derestore.onnx_engine`)
supply the network's call and their arrays (torch tensors on a device, or numpy)."""

from __future__ import annotations

import contextlib
import functools
import os
import sys
from collections.abc import Callable
from typing import Any

import numpy as np

from .errors import UsageError
from .tiling import SizeRule, TilePlan, fit_tile, plan_tiles, reflect_pad

# Share of the free memory `--tile auto` plans to use: allocator slack, fragmentation, the image itself.
AUTO_TILE_BUDGET = 0.6
DEFAULT_BATCH = 4  # tiles or frames per forward pass where batches pay (GPUs, ONNX Runtime)
PRECISIONS = ("auto", "fp32", "fp16", "bf16")
LAYOUTS = ("auto", "channels_last", "contiguous")
BACKENDS = ("auto", "torch", "onnxruntime")


def check_backend(backend: str, precision: str = "auto", compile: bool = False) -> None:
    """Refuse an unknown backend, and ONNX Runtime with what only PyTorch does (half precision, compile)."""
    if backend not in BACKENDS:
        raise UsageError(f"backend='{backend}' is not one of {', '.join(BACKENDS)}")
    if backend == "onnxruntime" and precision in ("fp16", "bf16"):
        raise UsageError(f"backend='onnxruntime' runs fp32 only; precision='{precision}' needs backend='torch'")
    if backend == "onnxruntime" and compile:
        raise UsageError("compile=True is PyTorch's torch.compile; it needs backend='torch', not 'onnxruntime'")


class TiledEngine:
    """The tiling and blending around a network's call; subclasses provide the call and the arrays."""

    batch_size: int

    # ---- what a subclass provides

    def _forward(self, batch: Any, dtype: Any = None) -> Any:
        """The network on a (B, C, H, W) array of the engine's kind; sides are multiples of `_rule()`."""
        raise NotImplementedError

    def _rule(self) -> SizeRule:
        raise NotImplementedError

    def bytes_per_pixel(self) -> float:
        raise NotImplementedError

    def _free_memory(self) -> int:
        raise NotImplementedError

    def _upload(self, image: np.ndarray) -> Any:
        """A (B, C, H, W) float32 image batch as the engine's array, where its network runs."""
        raise NotImplementedError

    def _array(self, values: np.ndarray) -> Any:
        raise NotImplementedError

    def _cat(self, arrays: list[Any]) -> Any:
        raise NotImplementedError

    def _zeros(self, shape: tuple[int, ...]) -> Any:
        raise NotImplementedError

    def _take(self, x: Any, indices: np.ndarray, axis: int) -> Any:
        raise NotImplementedError

    def _numpy(self, x: Any) -> np.ndarray:
        """Clamped to [0, 1], as a numpy array on the host."""
        raise NotImplementedError

    def _placed(self, plan: TilePlan, windows: list) -> contextlib.AbstractContextManager:
        return contextlib.nullcontext()

    # ---- shared

    def context(self, overlap: int) -> int:
        """Pixels a tile carries around the part it contributes."""
        return overlap // 2

    def plan(self, height: int, width: int, tile: int, overlap: int) -> TilePlan:
        return self._plan(height, width, tile, overlap, tile, overlap, None)

    def _plan(self, height: int, width: int, tile: int, overlap: int, window: int, shared: int,
              feather: int | None) -> TilePlan:
        try:
            return plan_tiles(height, width, window, shared, self._rule(), feather)
        except ValueError as exc:
            raise UsageError(f"tile={tile} overlap={overlap}: {exc}") from None

    def auto_tile(self, height: int, width: int, overlap: int = 32) -> int:
        """The largest tile (0 = whole image) whose passes fit in the memory free right now."""
        budget = AUTO_TILE_BUDGET * self._free_memory()
        return fit_tile(height, width, self.bytes_per_pixel(), budget, self.batch_size, self._rule())

    @staticmethod
    def _planes(network: Callable[[Any], Any], batch: Any, input_channels: int) -> Any:
        """`network` on (B, 3, H, W); a grayscale network restores each colour plane on its own."""
        if input_channels != 1:
            return network(batch)
        b, c, h, w = batch.shape
        return network(batch.reshape(b * c, 1, h, w)).reshape(b, c, h, w)

    def restore_batch(self, images: list[np.ndarray], dtype: Any = None) -> list[np.ndarray]:
        """Restore several (3, H, W) float32 images of one size whole, `batch_size` per forward pass
        (video frames small enough to need no tiles)."""
        c, h, w = images[0].shape
        plan = self.plan(h, w, 0, 0)
        outs: list[np.ndarray] = []
        for start in range(0, len(images), self.batch_size):
            x = self._upload(np.stack(images[start:start + self.batch_size]))
            padded = reflect_pad(x, plan.padded_height, plan.padded_width, self._take)
            outs.extend(self._numpy(self._forward(padded, dtype)[:, :, :h, :w]))
        return outs

    def restore(self, image: np.ndarray, *, tile: int = 0, overlap: int = 32,
                window_fn: Callable[..., Any] | None = None, dtype: Any = None,
                on_tiles: Callable[[int, int], None] | None = None) -> np.ndarray:
        """Restore one (3, H, W) float32 image in [0, 1]; returns (3, H, W) float32 in [0, 1].

        `window_fn` replaces blended tiling by an architecture's own published
        window protocol (called with the model call, the image and `tile`);
        `dtype` overrides the engine's precision for this call; `on_tiles(done, total)`
        is called after each batch of tiles of a tiled image.
        """
        c, h, w = image.shape
        x = self._upload(np.ascontiguousarray(image)[None])
        forward = functools.partial(self._forward, dtype=dtype)
        if window_fn is not None:
            return self._numpy(window_fn(forward, x, tile)[0, :, :h, :w])
        plan = self.plan(h, w, tile, overlap)
        padded = reflect_pad(x, plan.padded_height, plan.padded_width, self._take)
        if not plan.tiled:
            return self._numpy(forward(padded)[0, :, :h, :w])
        result = self._zeros((c, plan.padded_height, plan.padded_width))
        windows = list(enumerate(plan.windows))
        for start in range(0, len(windows), self.batch_size):
            group = windows[start:start + self.batch_size]
            batch = self._cat([padded[..., win.y0:win.y1, win.x0:win.x1] for _, win in group])
            with self._placed(plan, [win for _, win in group]):
                outputs = forward(batch)
            for (i, win), out in zip(group, outputs):
                result[:, win.y0:win.y1, win.x0:win.x1] += out * self._array(plan.weight(i))
            if on_tiles is not None:
                on_tiles(start + len(group), len(windows))
        return self._numpy(result[:, :h, :w])


def cpu_threads() -> int:
    """The CPU threads a command-line run should use: `OMP_NUM_THREADS`, else `SLURM_CPUS_PER_TASK`,
    else every core this process may run on (its affinity mask). Invalid values are skipped."""
    for name in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK"):
        raw = os.environ.get(name, "").strip().split(",")[0]
        if raw.isdigit() and int(raw) > 0:
            return int(raw)
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return os.cpu_count() or 1


_OOM_MESSAGES = ("out of memory", "can't allocate memory", "cannot allocate memory", "not enough memory")
# CUDA errors after which the context is unusable: every later call fails too.
_FATAL_MESSAGES = ("cuda error", "device-side assert", "cublas_status", "cudnn_status_internal_error",
                   "cuda driver", "illegal memory access", "unspecified launch failure")


def _torch_error(name: str) -> type | tuple[()]:
    """A torch exception class, where torch is loaded at all (without it, no error can be torch's)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return ()
    found = torch
    for part in name.split("."):
        found = getattr(found, part, None)
        if found is None:
            return ()
    return found


def is_out_of_memory(exc: BaseException) -> bool:
    """Out-of-memory errors of CUDA and of the CPU allocator, which a smaller tile can avoid."""
    if isinstance(exc, (MemoryError, _torch_error("cuda.OutOfMemoryError"))):
        return True
    return isinstance(exc, RuntimeError) and any(m in str(exc).lower() for m in _OOM_MESSAGES)


def is_device_failure(exc: BaseException) -> bool:
    """An error that leaves the device unusable for the rest of the process (not out-of-memory)."""
    accelerator_error = _torch_error("AcceleratorError")
    if accelerator_error and isinstance(exc, accelerator_error) and not is_out_of_memory(exc):
        return True
    if not isinstance(exc, RuntimeError) or is_out_of_memory(exc):
        return False
    text = str(exc).lower()
    return any(m in text for m in _FATAL_MESSAGES)
