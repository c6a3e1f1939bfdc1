"""What a checkpoint's first use measured about ONNX Runtime, kept on disk: the verified export and the
verdict beside it (see `derestore.onnx_backend`). Free of torch, so that a later run can find them and
run the export (`derestore.onnx_engine`) without importing torch or the checkpoint loader."""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import platform
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from . import __version__, atomic
from .errors import ExportError
from .tiling import SizeRule

log = logging.getLogger(__name__)

OPSET = 18
TOLERANCE = 1e-4  # max abs difference from PyTorch on [0, 1] images
# A backend or layout must be this much faster to be chosen: below it, timing noise decides.
MARGIN = 1.05
# Large enough that activations leave the CPU caches, as in real tiles: at 128² PyTorch's unfused
# channels_last NAFNet beat ONNX Runtime here, at 256² and up it was 2–15× slower.
TIMING_SIDE = 256
WORK_ROWS = 768
INPUT, OUTPUT = "image", "restored"
# Bumped when the export or what a verdict records changes: older ones are then made and measured
# again, not misread (3: layer norms exported as one node, see `onnx_backend._export_forms`).
FORMAT = 3


@dataclass(frozen=True)
class NetworkFacts:
    """What running a network's graph needs to know of it, without the network: spandrel's descriptor
    facts, recorded with the verdict."""

    architecture: str
    input_channels: int
    output_channels: int
    scale: int
    multiple_of: int
    minimum: int
    square: bool

    @classmethod
    def of(cls, descriptor: Any) -> NetworkFacts:
        req = descriptor.size_requirements
        return cls(descriptor.architecture.id, descriptor.input_channels, descriptor.output_channels,
                   descriptor.scale, req.multiple_of, req.minimum, req.square)

    def size_rule(self) -> SizeRule:
        return SizeRule(multiple=self.multiple_of, minimum=self.minimum, square=self.square)


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass(frozen=True)
class ProbeShapes:
    """Input shapes of the export (traced), the verification (another batch, height and width), the
    timing, and the working size (`tile`, the model's usual forward) where quick networks are timed again."""

    export: tuple[int, int, int, int]
    verify: tuple[int, int, int, int]
    timing: tuple[int, int, int, int]
    work: tuple[int, int, int, int]

    @classmethod
    def of(cls, facts: NetworkFacts, tile: int = TIMING_SIDE) -> ProbeShapes:
        m, c = facts.multiple_of, facts.input_channels
        side = _round_up(max(facts.minimum, 64), m)
        # Odd where the rule allows: a network that pads itself (NAFNet) runs its padding in the graph too.
        step = _round_up(17, m)
        tall, wide = (side + step, side + step) if facts.square else (side + step, side + 2 * step)
        timing = _round_up(max(facts.minimum, TIMING_SIDE), m)
        tile = max(tile, timing)
        rows = tile if facts.square else min(tile, _round_up(WORK_ROWS, m))
        return cls((1, c, side, side), (2, c, tall, wide), (1, c, timing, timing),
                   (1, c, rows, _round_up(tile, m)))

    def probes(self) -> set[str]:
        """The timing shapes a verdict for these shapes may have been measured at."""
        return {_shape(self.timing), _shape(self.work)}


def _shape(shape: tuple[int, ...]) -> str:
    return "×".join(map(str, shape))


@dataclass(frozen=True)
class Verdict:
    """What was measured for one checkpoint on one machine; `choice` derives the backend from it."""

    sha256: str
    machine: str  # "AMD EPYC (x86_64), 2 threads", or a GPU's name
    onnxruntime: str | None  # its version; None where it is not installed
    provider: str | None  # the execution provider measured; None: ONNX Runtime was not measured
    opset: int
    versions: dict[str, str]  # the code that traced the graph
    seconds: dict[str, float]  # per candidate (contiguous, channels_last, onnxruntime) on the timing probe
    probe: str = ""  # the timing input's shape
    export_error: str | None = None
    max_abs_diff: float | None = None  # on the verification probe
    onnx_sha256: str | None = None  # of the cached .onnx file
    export_seconds: float | None = None
    measure_seconds: float = 0.0  # the whole first-use cost
    network: NetworkFacts | None = None

    @property
    def exact(self) -> bool:
        return self.max_abs_diff is not None and self.max_abs_diff <= TOLERANCE

    def faster_layout(self) -> bool | None:
        """Whether channels_last measured faster than contiguous here (None: not both measured)."""
        s = self.seconds
        if "contiguous" not in s or "channels_last" not in s:
            return None
        return s["channels_last"] * MARGIN < s["contiguous"]

    def choice(self, channels_last: bool) -> tuple[str, str]:
        """The backend `auto` picks against PyTorch in this layout, and why."""
        if self.provider is None:
            return "torch", "ONNX Runtime was not measured for this device"
        if self.export_error:
            return "torch", self.export_error
        if not self.exact:
            return "torch", (f"the exported graph differs from PyTorch by {self.max_abs_diff:.1e} "
                             f"(more than {TOLERANCE:g}) on the probe tiles")
        ort = self.seconds["onnxruntime"]
        layout = "channels_last" if channels_last else "contiguous"
        reference = self.seconds.get(layout, min(v for k, v in self.seconds.items() if k != "onnxruntime"))
        timing = f"{reference:.3f} s vs {ort:.3f} s on {self.probe}"
        if ort * MARGIN < reference:
            return "onnxruntime", (f"exact to {self.max_abs_diff:.0e} and {reference / ort:.2f}× faster "
                                   f"than PyTorch ({timing})")
        return "torch", f"ONNX Runtime is exact but not faster than PyTorch ({timing})"

    def pick(self, backend: str, channels_last: bool) -> tuple[str, str]:
        """The backend under `backend` and why: auto's `choice`, or ONNX Runtime as asked — ExportError
        where its graph was not exact."""
        chosen, reason = self.choice(channels_last)
        if backend != "onnxruntime":
            return chosen, reason
        if self.export_error or not self.exact:
            raise ExportError(f"backend='onnxruntime': {reason}; use backend='auto' or 'torch'")
        return "onnxruntime", "as asked" if chosen == "onnxruntime" else f"as asked; {reason}"

    def answers(self, probes: set[str], *, provider: bool, layouts: bool) -> bool:
        """Whether this verdict was timed at one of `probes` (`ProbeShapes.probes`) with what is asked of it:
        ONNX Runtime measured (`provider`) and both PyTorch layouts (`layouts`)."""
        return (self.probe in probes and (not provider or self.provider is not None)
                and (not layouts or self.faster_layout() is not None))

    def layout(self, layout: str, default: bool) -> bool:
        """PyTorch's layout under `layout` (auto: the one measured faster here, else `default`)."""
        if layout != "auto":
            return layout == "channels_last"
        faster = self.faster_layout()
        return default if faster is None else faster


def cache_folder() -> Path:
    from .hub import cache_root

    return cache_root() / "onnx"


@functools.lru_cache(maxsize=1)
def versions() -> dict[str, str]:
    """The code that traces a graph; read from the installed packages' metadata, so that a run that
    never imports torch finds the export a run with torch made."""
    from importlib.metadata import PackageNotFoundError, version

    found = {"derestore": __version__}
    for package in ("torch", "spandrel", "spandrel_extra_arches"):
        try:
            found[package] = version(package)
        except PackageNotFoundError:
            found[package] = "none"
    return found


def _stem(sha256: str) -> str:
    keyed = {**versions(), "format": str(FORMAT)}
    traced_by = hashlib.sha256(json.dumps(keyed, sort_keys=True).encode()).hexdigest()[:10]
    return f"{sha256[:32]}.opset{OPSET}.code-{traced_by}"


def export_path(sha256: str) -> Path:
    """Where the checkpoint's export is cached (whether or not it is there)."""
    return cache_folder() / f"{_stem(sha256)}.onnx"


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text).strip("_")


def verdict_path(sha256: str, machine: str, ort_version: str | None) -> Path:
    return cache_folder() / f"{_stem(sha256)}.ort-{ort_version or 'none'}.{_slug(machine)}.json"


@functools.lru_cache(maxsize=1)
def cpu_model() -> str:
    with contextlib.suppress(OSError), open("/proc/cpuinfo", encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if line.startswith("model name"):
                return " ".join(line.split(":", 1)[1].split())
    return platform.processor() or "CPU"


def cpu_machine(threads: int) -> str:
    """What a CPU speed measurement holds for: the CPU model and the threads it ran with."""
    return f"{cpu_model()} ({platform.machine()}), {threads} threads"


def cached(sha256: str, machine: str, ort_version: str | None) -> Verdict | None:
    try:
        data = json.loads(verdict_path(sha256, machine, ort_version).read_text())
        network = data.pop("network", None)
        return Verdict(**data, network=NetworkFacts(**network) if network else None)
    except (OSError, ValueError, TypeError):
        return None


def save(verdict: Verdict, onnx_bytes: bytes | None) -> None:
    path = verdict_path(verdict.sha256, verdict.machine, verdict.onnxruntime)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        if onnx_bytes is not None:
            atomic.write_bytes(export_path(verdict.sha256), onnx_bytes)  # before the verdict that names it
        atomic.write_text(path, json.dumps(asdict(verdict), indent=1))
    except OSError as exc:  # a read-only cache: the measurement is simply paid again next time
        log.warning("cannot cache the ONNX export and backend verdict in %s (%s)", path.parent, exc.strerror or exc)


def load_export(verdict: Verdict) -> bytes | None:
    """The cached export the verdict was measured with, or None if it is gone or not the same file."""
    try:
        data = export_path(verdict.sha256).read_bytes()
    except OSError:
        return None
    return data if hashlib.sha256(data).hexdigest() == verdict.onnx_sha256 else None
