"""Per-architecture facts measured by `benchmarks/tuning.py`, used by the engine's `auto` choices.

Architectures not listed get the conservative defaults: contiguous layout, and a
memory-per-pixel figure well above any measured here.

The layout table is only a default: which layout is faster depends on the CPU
(this table's CPU gained up to 2× from channels_last; others gain nothing), so
on the CPU `layout="auto"` times both layouts at a checkpoint's first use on the
machine and keeps the faster (`derestore.onnx_backend`, cached with the backend
verdict). The table serves where nothing is measured: GPUs, and engines made
without a checkpoint digest to cache a measurement by.
"""

from __future__ import annotations

# CPU forward time contiguous / channels_last at 256×256 (fp32, 2 threads); True where channels_last won
# (NAFNet 1.7×, MPRNet 1.5×, DeRestormer 1.5×, DRSformer 2.0×, DTPNet 1.3×, M3SNet ≥ 1.1×; Restormer 0.46×).
CHANNELS_LAST: dict[str, bool] = {
    "NAFNet": True,
    "MPRNet": True,
    "M3SNet": True,
    "DeRestormer": True,
    "DRSformer": True,
    "DTPNet": True,
    "Restormer": False,
}

# Peak activation memory of one fp32 forward, bytes per input pixel (CPU, from the growth of the
# peak resident set between a 256² and a 384² input).
BYTES_PER_PIXEL: dict[str, float] = {"NAFNet": 1689.0, "M3SNet": 3004.0}
DEFAULT_BYTES_PER_PIXEL = 20_000.0


def channels_last(arch: str) -> bool:
    return CHANNELS_LAST.get(arch, False)


def bytes_per_pixel(arch: str) -> float:
    return BYTES_PER_PIXEL.get(arch, DEFAULT_BYTES_PER_PIXEL)
