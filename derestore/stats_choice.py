"""Which statistics a checkpoint runs with, and over which window: the per-architecture facts behind
`derestore.local_stats`, kept free of torch so that `derestore models` can show them and a run of a
cached ONNX export (`derestore.onnx_engine`) can decide without the network."""

from __future__ import annotations

from dataclasses import dataclass, field

from .errors import UsageError

STATS = ("local", "global")
WINDOW_FACTOR = 1.5
"""Window side / training crop side: TLC's `base_size = 1.5 × train_size`."""

# Training crop side of each architecture's published training, for checkpoints whose registry record
# gives no `stats_window`: NAFNet GoPro/SIDD/REDS 256; Restormer trains progressively up to 384;
# MPRNet deblur/derain 256 (denoise 128, set per record); M3SNet 256; DRSformer 128
# (Options/Deraining.yml gt_size); DTPNet 96 (96-pixel patches in data/dataset.py); DeRestormer
# states none: 256, the window of its published test.
TRAIN_SIZE: dict[str, int] = {
    "NAFNet": 256,
    "Restormer": 384,
    "MPRNet": 256,
    "M3SNet": 256,
    "DRSformer": 128,
    "DTPNet": 96,
    "DeRestormer": 256,
}

# Statistics under `--tiling blend` where the record does not say (`stats_window = 0`: global).
# Local where the authors' own test or TLC's measurements use it: NAFNet's GoPro/REDS and M3SNet's test
# scripts build the TLC-converted network (NAFNetLocal, M3SNetLocal); TLC reports Restormer +0.65 dB
# and MPRNet gains on GoPro. Global where nobody measured local statistics (DRSformer, DTPNet: no
# trained weights here either) and for DeRestormer, whose FFT blocks and transposed attention sampling
# stay global, so local statistics cannot make its tiles independent.
DEFAULT_STATS: dict[str, str] = {
    "NAFNet": "local",
    "Restormer": "local",
    "MPRNet": "local",
    "M3SNet": "local",
    "DRSformer": "global",
    "DTPNet": "global",
    "DeRestormer": "global",
}

# Architectures whose windows split along the whole image's lines (MPRNet's stage 1 and 2 patches),
# under either statistics: their behaviour follows each tile's place, which an ONNX export freezes.
SPLIT_LINES = frozenset({"MPRNet"})
# Architectures whose paper's test script runs fixed windows (`derestore.archs.PUBLISHED_WINDOWS`, in PyTorch).
PUBLISHED_WINDOW_ARCHS = frozenset({"DeRestormer"})


@dataclass(frozen=True)
class Conversion:
    """What `apply` did, for logs and the run record."""

    arch: str
    stats: str
    window: int | None = None  # image pixels
    cell: int | None = None  # image pixels, attention sums
    replaced: dict[str, int] = field(default_factory=dict)  # kind → modules
    reach: int = 0  # the widest statistic's reach, image pixels
    # Tiles must start (and, but for the last, measure) multiples of this, in image pixels: the cells
    # and the deepest level's grid must fall where the whole image's do. It exceeds the model's own
    # size multiple where a network pads inside its forward (NAFNet: 1 → 2^levels).
    align: int = 1
    split_lines: bool = False  # MPRNet: windows split along the image's lines (see `placed`)

    def record(self) -> dict[str, object]:
        """JSON-ready summary for the run record."""
        return {"stats": self.stats, "window": self.window, "cell": self.cell, "reach": self.reach,
                "align": self.align, "replaced": dict(self.replaced)}


def supports(arch: str) -> bool:
    """Whether `apply` knows the global operations of architecture `arch`."""
    return arch in TRAIN_SIZE


def default_stats(arch: str, stats_window: int | None = None) -> str:
    """The statistics `--tiling blend` should use: "global" where the record's `stats_window` is 0 or
    for an architecture `apply` does not know, else the architecture's default."""
    if stats_window == 0:
        return "global"
    return DEFAULT_STATS.get(arch, "global")


def window_for(arch: str, stats_window: int | None = None) -> int:
    """The statistics window in image pixels: the record's `stats_window`, else 1.5 × the architecture's
    training crop."""
    if stats_window:
        return stats_window
    if arch not in TRAIN_SIZE:
        raise UsageError(f"local statistics are not available for {arch}; use stats='global'")
    return round(WINDOW_FACTOR * TRAIN_SIZE[arch])


def record_choice(arch: str, stats_window: int | None) -> dict[str, object]:
    """What `stats="auto"` runs for a record: its statistics and, when local, the window in pixels."""
    stats = default_stats(arch, stats_window)
    return {"stats": stats, "stats_window": window_for(arch, stats_window) if stats == "local" else None}
