"""Half precision only where it was measured accurate, per checkpoint and device.

Architecture-level flags ("supports bfloat16") say a network can run in half
precision, not that a given checkpoint keeps its quality there: large
activations overflow fp16, bf16's 8-bit mantissa loses fine detail. So the
first time a checkpoint runs under `precision="auto"` on a device type with
half types, a probe restores three natural photo tiles (shipped with the
package: `probe_tiles.png`, crops of scikit-image's public-domain and CC0
astronaut, chelsea and coffee photographs) in fp32 and in each half type the
device supports. The fastest half type whose output is at least 45 dB PSNR
against fp32, with no NaN/Inf and no tile clipped to black, is chosen;
otherwise fp32. The verdict is cached (`<cache>/precision/`), keyed by the
checkpoint's sha256, the device's name and the torch version, so the probe
is paid once.
"""

from __future__ import annotations

import json
import logging
import math
import platform
import re
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from typing import TYPE_CHECKING

from . import atomic

if TYPE_CHECKING:  # torch is imported where it runs, so `derestore models` can read verdicts without it
    import numpy as np
    import torch

log = logging.getLogger(__name__)

MIN_PSNR = 45.0  # dB against fp32: invisible, and far above any restoration gain measured
PROBE_TILE = 128


def dtype(name: str) -> torch.dtype:
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[name]


def dtype_name(value: torch.dtype) -> str:
    return str(value).removeprefix("torch.").replace("float", "fp").replace("bfp16", "bf16")


@dataclass(frozen=True)
class Verdict:
    """Which precision a checkpoint gets on a device, and the measurements behind it."""

    sha256: str
    device: str  # the device's name, e.g. "NVIDIA H200"
    torch: str
    precision: str  # "fp32", "fp16" or "bf16"
    measured: dict[str, dict[str, object]] = field(default_factory=dict)  # per half type: psnr, ok, seconds
    probe_seconds: float = 0.0

    def accurate(self, precision: str) -> bool | None:
        """Whether `precision` met the bar on this device (None: not measured)."""
        if precision == "fp32":
            return True
        entry = self.measured.get(precision)
        return None if entry is None else bool(entry["ok"])


def half_types(device: torch.device) -> list[torch.dtype]:
    """The half types worth probing on `device`: none on the CPU, where they measured no faster."""
    import torch

    if device.type == "cuda":
        halves = [torch.float16]
        if torch.cuda.is_bf16_supported():
            halves.insert(0, torch.bfloat16)
        return halves
    if device.type == "mps":
        return [torch.float16]
    return []


def device_name(device: torch.device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    if device.type == "mps":
        return f"Apple MPS ({platform.machine()})"
    return f"CPU ({platform.machine()})"


def probe_tiles() -> list[np.ndarray]:
    """The shipped natural tiles as (3, 128, 128) float32 arrays in [0, 1]."""
    import numpy as np
    from PIL import Image

    path = Path(str(resources.files("derestore").joinpath("probe_tiles.png")))
    with Image.open(path) as pil:
        strip = np.asarray(pil.convert("RGB"), dtype=np.float32) / 255.0
    return [strip[:, x:x + PROBE_TILE].transpose(2, 0, 1).copy() for x in range(0, strip.shape[1], PROBE_TILE)]


Restore = Callable[["np.ndarray", "torch.dtype"], "np.ndarray"]  # one (3, H, W) tile in a given precision


def measure(restore: Restore, tiles: list[np.ndarray], halves: list[torch.dtype], *, sha256: str = "",
            device: str = "", sync: Callable[[], None] = lambda: None) -> Verdict:
    """Restore `tiles` in fp32 and each half type; the verdict picks the fastest accurate half type."""
    import numpy as np
    import torch

    started = time.perf_counter()

    def timed(dtype: torch.dtype) -> tuple[list[np.ndarray], float]:
        restore(tiles[0], dtype)  # warm-up: kernels, autotuning, allocator
        sync()
        t0 = time.perf_counter()
        outs = [restore(tile, dtype) for tile in tiles]
        sync()
        return outs, time.perf_counter() - t0

    reference, _ = timed(torch.float32)
    measured: dict[str, dict[str, object]] = {}
    for half in halves:
        outs, seconds = timed(half)
        finite = all(bool(np.isfinite(o).all()) for o in outs)
        black = any(o.max() < 1.0 / 255 and t.max() > 4.0 / 255 for o, t in zip(outs, tiles))
        psnr = _psnr(reference, outs) if finite else None
        ok = finite and not black and psnr is not None and psnr >= MIN_PSNR
        measured[dtype_name(half)] = {"psnr": None if psnr is None or math.isinf(psnr) else round(psnr, 2),
                                        "finite": finite, "black": black, "ok": ok, "seconds": round(seconds, 4)}
    accurate = [name for name, entry in measured.items() if entry["ok"]]
    chosen = min(accurate, key=lambda name: measured[name]["seconds"]) if accurate else "fp32"  # type: ignore
    return Verdict(sha256=sha256, device=device, torch=_torch_version(), precision=chosen, measured=measured,
                   probe_seconds=round(time.perf_counter() - started, 3))


def _psnr(reference: list[np.ndarray], outs: list[np.ndarray]) -> float:
    import numpy as np

    squared = sum(float(np.square(np.clip(o, 0, 1) - np.clip(r, 0, 1), dtype=np.float64).sum())
                  for o, r in zip(outs, reference))
    mse = squared / sum(r.size for r in reference)
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def _torch_version() -> str:
    """torch's version without importing it (importing costs seconds; reading a verdict should not)."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("torch")
    except PackageNotFoundError:
        import torch

        return torch.__version__


def cache_folder() -> Path:
    from .hub import cache_root

    return cache_root() / "precision"


def _cache_path(sha256: str, device: str) -> Path:
    slug = re.sub(r"[^A-Za-z0-9.+-]+", "_", device).strip("_")
    return cache_folder() / f"{sha256[:32]}.{slug}.torch-{_torch_version()}.json"


def cached(sha256: str, device: str) -> Verdict | None:
    try:
        return Verdict(**json.loads(_cache_path(sha256, device).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def cached_verdicts(sha256: str) -> list[Verdict]:
    """Every device's cached verdict for a checkpoint under this torch (what `derestore models` shows)."""
    verdicts = []
    pattern = f"{sha256[:32]}.*.torch-{_torch_version()}.json"
    for path in sorted(cache_folder().glob(pattern)) if sha256 else []:
        try:
            verdicts.append(Verdict(**json.loads(path.read_text())))
        except (OSError, ValueError, TypeError):
            continue
    return verdicts


def save(verdict: Verdict) -> None:
    path = _cache_path(verdict.sha256, verdict.device)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_text(path, json.dumps(asdict(verdict), indent=1))
    except OSError as exc:  # a read-only cache: the probe is simply paid again next time
        log.warning("cannot cache the precision verdict in %s (%s)", path, exc.strerror or exc)


def decide(restore: Restore, device: torch.device, sha256: str) -> Verdict:
    """The cached verdict for this checkpoint and device, or a new measurement (then cached)."""
    import torch

    name = device_name(device)
    found = cached(sha256, name)
    if found is not None:
        return found
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    verdict = measure(restore, probe_tiles(), half_types(device), sha256=sha256, device=name, sync=sync)
    log.info("precision probe on %s: %s chosen in %.1f s (%s)", name, verdict.precision, verdict.probe_seconds,
             ", ".join(f"{k} {v['psnr']} dB" for k, v in verdict.measured.items()) or "no half type")
    save(verdict)
    return verdict
