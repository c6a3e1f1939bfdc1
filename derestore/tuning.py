"""Per-architecture facts measured by `benchmarks/tuning.py`, used by the engine's `auto` choices.

Architectures not listed get the conservative default: contiguous layout, and
the largest memory-per-pixel figure measured here.
"""

from __future__ import annotations

# CPU forward time contiguous / channels_last at 256×256 (fp32, 2 threads); True where channels_last wins.
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
BYTES_PER_PIXEL: dict[str, float] = {}
DEFAULT_BYTES_PER_PIXEL = 20_000.0


def channels_last(arch: str) -> bool:
    return CHANNELS_LAST.get(arch, False)


def bytes_per_pixel(arch: str) -> float:
    return BYTES_PER_PIXEL.get(arch, max(BYTES_PER_PIXEL.values(), default=DEFAULT_BYTES_PER_PIXEL))
