"""Evaluate a folder of predictions against ground truths: pairing, parallel scoring, means.

The papers' MATLAB scripts pair files by sorted position, which silently
mis-pairs a dataset with one file missing; derestore pairs by name and lists
what it could not pair.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import imageio
from .errors import InputError, UsageError
from .metrics import Score, check_protocol, score


@dataclass(frozen=True)
class Pair:
    """A prediction and its ground truth; `name` is the key they were paired by."""

    name: str
    gt: Path
    pred: Path


@dataclass(frozen=True)
class Pairing:
    pairs: list[Pair]
    unmatched_gt: list[Path] = field(default_factory=list)
    unmatched_pred: list[Path] = field(default_factory=list)
    ambiguous: list[str] = field(default_factory=list)  # one message per clashing name

    @property
    def complete(self) -> bool:
        return not (self.unmatched_gt or self.unmatched_pred or self.ambiguous)


@dataclass(frozen=True)
class PairResult:
    pair: Pair
    score: Score | None
    error: str | None = None

    def record(self) -> dict[str, object]:
        """The `--json` line: `psnr` is null for identical pairs (`identical: true`) and failures."""
        data: dict[str, object] = {
            "name": self.pair.name,
            "gt": str(self.pair.gt),
            "pred": str(self.pair.pred),
            "psnr": _finite(self.score.psnr) if self.score else None,
            "ssim": _finite(self.score.ssim) if self.score else None,
            "identical": bool(self.score and self.score.identical),
        }
        if self.score and self.score.warnings:
            data["warnings"] = list(self.score.warnings)
        if self.error is not None:
            data["error"] = self.error
        return data


class RunningMeans:
    """Means of per-image values as they arrive (thread-safe).

    PSNR is averaged in dB over non-identical pairs (an identical pair's
    infinite PSNR would swamp the mean); SSIM over every pair that has one.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._psnr_sum = 0.0
        self._psnr_n = 0
        self._ssim_sum = 0.0
        self._ssim_n = 0
        self.count = 0
        self.identical = 0
        self.no_ssim = 0

    def add(self, value: Score) -> None:
        with self._lock:
            self.count += 1
            if value.identical:
                self.identical += 1
            else:
                self._psnr_sum += value.psnr
                self._psnr_n += 1
            if math.isnan(value.ssim):
                self.no_ssim += 1
            else:
                self._ssim_sum += value.ssim
                self._ssim_n += 1

    @property
    def psnr(self) -> float | None:
        return self._psnr_sum / self._psnr_n if self._psnr_n else None

    @property
    def ssim(self) -> float | None:
        return self._ssim_sum / self._ssim_n if self._ssim_n else None

    def warnings(self) -> list[str]:
        notes = []
        if self.identical:
            notes.append(
                f"{self.identical} of {self.count} pairs are identical (infinite PSNR) and left out of "
                "the PSNR mean; their SSIM of 1 is included"
            )
        if self.no_ssim:
            notes.append(f"{self.no_ssim} pairs are too small for SSIM and left out of the SSIM mean")
        return notes

    def record(self, protocol: str) -> dict[str, object]:
        return {
            "mean": {"psnr": self.psnr, "ssim": self.ssim},
            "count": self.count,
            "identical": self.identical,
            "protocol": protocol,
        }


@dataclass(frozen=True)
class Summary:
    protocol: str
    crop_border: int
    results: list[PairResult]
    pairing: Pairing
    means: RunningMeans

    @property
    def failed(self) -> list[PairResult]:
        return [r for r in self.results if r.error is not None]

    @property
    def warnings(self) -> list[str]:
        return self.means.warnings()

    @property
    def exit_code(self) -> int:
        return 0 if self.pairing.complete and not self.failed else 1

    def record(self) -> dict[str, object]:
        """The final `--json` line."""
        data = self.means.record(self.protocol)
        data.update(
            crop_border=self.crop_border,
            failed=len(self.failed),
            unmatched_gt=[str(p) for p in self.pairing.unmatched_gt],
            unmatched_pred=[str(p) for p in self.pairing.unmatched_pred],
        )
        if self.pairing.ambiguous:
            data["ambiguous"] = list(self.pairing.ambiguous)
        return data


# ------------------------------------------------------------------ pairing


def pair_paths(gt: Path, pred: Path, *, match: str | None = None) -> Pairing:
    """Pair predictions with ground truths by file stem (case-sensitive; extensions may differ).

    `match` is a regular expression searched in each stem on both sides; the
    key becomes its `key` group, else its first group, else the whole match
    (a stem it does not match keeps its full name). E.g. `(norain-\\d+)` pairs
    Rain200H's `norain-1x2.png` with `norain-1.png`.
    """
    pattern = _compile(match)
    if not gt.exists():
        raise UsageError(f"gt={gt}: no such file or folder; give the ground-truth folder or image")
    if not pred.exists():
        raise UsageError(f"pred={pred}: no such file or folder; give the prediction folder or image")
    if gt.is_file() and pred.is_file():
        return Pairing([Pair(_key(pred.stem, pattern), gt, pred)])
    if gt.is_file():
        raise UsageError(f"gt={gt} is one image but pred={pred} is a folder; give two folders or two images")
    gt_index, gt_clash = _index(_images(gt, "gt"), pattern)
    pred_files = [pred] if pred.is_file() else _images(pred, "pred")
    pred_index, pred_clash = _index(pred_files, pattern)
    names = sorted(gt_index.keys() & pred_index.keys(), key=_natural)
    # One prediction against a folder: the folder's other images are not missing anything.
    unmatched_gt = [] if pred.is_file() else [gt_index[n] for n in gt_index.keys() - pred_index.keys()]
    unmatched_pred = [pred_index[n] for n in pred_index.keys() - gt_index.keys()]
    return Pairing(
        pairs=[Pair(n, gt_index[n], pred_index[n]) for n in names],
        unmatched_gt=sorted(unmatched_gt, key=_natural_path),
        unmatched_pred=sorted(unmatched_pred, key=_natural_path),
        ambiguous=gt_clash + pred_clash,
    )


def _compile(match: str | None) -> re.Pattern[str] | None:
    if match is None:
        return None
    try:
        return re.compile(match)
    except re.error as exc:
        raise UsageError(f"match={match!r} is not a valid regular expression: {exc}") from None


def _key(stem: str, pattern: re.Pattern[str] | None) -> str:
    found = pattern.search(stem) if pattern else None
    if found is None:
        return stem
    if "key" in pattern.groupindex:
        key = found.group("key")
    else:
        key = found.group(1) if pattern.groups else found.group(0)
    # An optional group that took no part, or an empty match, names nothing: keep the stem.
    return key or stem


def _images(folder: Path, option: str) -> list[Path]:
    files = [p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".") and imageio.is_image_path(p)]
    if not files:
        raise UsageError(f"{option}={folder}: no images in this folder; point it at the folder that holds them")
    return files


def _index(files: Iterable[Path], pattern: re.Pattern[str] | None) -> tuple[dict[str, Path], list[str]]:
    """Key → file; keys shared by several files are dropped and reported, never guessed."""
    groups: dict[str, list[Path]] = {}
    for f in files:
        groups.setdefault(_key(f.stem, pattern), []).append(f)
    index = {k: v[0] for k, v in groups.items() if len(v) == 1}
    clashes = [
        f"{len(v)} files pair as {k!r}: {', '.join(str(p) for p in sorted(v))}; rename one or adjust match="
        for k, v in sorted(groups.items())
        if len(v) > 1
    ]
    return index, clashes


def _natural(text: str) -> list[object]:
    """Sort `img2` before `img10`, as people number their datasets."""
    return [(0, int(part)) if part.isdigit() else (1, part) for part in re.split(r"(\d+)", text)]


def _natural_path(path: Path) -> list[object]:
    return _natural(path.name)


# ------------------------------------------------------------------ scoring


def read_pixels(path: Path) -> np.ndarray:
    return imageio.read_image(path).pixels


def score_pair(pair: Pair, *, protocol: str, crop_border: int = 0) -> PairResult:
    """One pair's result; unreadable files and size mismatches become its `error`."""
    try:
        gt, pred = read_pixels(pair.gt), read_pixels(pair.pred)
    except InputError as exc:  # its message names the file
        return PairResult(pair, None, str(exc))
    try:
        value = score(gt, pred, protocol=protocol, crop_border=crop_border)
    except InputError as exc:
        return PairResult(pair, None, f"{pair.pred} vs {pair.gt}: {exc}")
    return PairResult(pair, value)


def iter_results(
    pairs: list[Pair], *, protocol: str, crop_border: int = 0, workers: int | None = None
) -> Iterator[PairResult]:
    """Results in pair order, scored `workers` pairs at a time (decoding and OpenCV release the GIL)."""
    workers = workers or default_workers()
    if workers == 1 or len(pairs) <= 1:
        for pair in pairs:
            yield score_pair(pair, protocol=protocol, crop_border=crop_border)
        return
    with ThreadPoolExecutor(max_workers=min(workers, len(pairs)), thread_name_prefix="derestore-eval") as pool:
        yield from pool.map(lambda p: score_pair(p, protocol=protocol, crop_border=crop_border), pairs)


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


def evaluate(
    pairing: Pairing,
    *,
    protocol: str,
    crop_border: int = 0,
    workers: int | None = None,
    on_result: Callable[[PairResult], None] | None = None,
) -> Summary:
    """Score every pair of `pairing`; `on_result` sees each result, in order, as it is ready."""
    means = RunningMeans()
    results = []
    for result in iter_results(pairing.pairs, protocol=protocol, crop_border=crop_border, workers=workers):
        if result.score is not None:
            means.add(result.score)
        results.append(result)
        if on_result is not None:
            on_result(result)
    return Summary(protocol, crop_border, results, pairing, means)


def score_output(pred: np.ndarray, gt_path: Path, *, protocol: str, crop_border: int = 0) -> Score:
    """Score a restored image (pixels as they will be stored) against its ground-truth file."""
    try:
        return score(read_pixels(gt_path), pred, protocol=protocol, crop_border=crop_border)
    except InputError as exc:
        raise InputError(f"{gt_path}: {exc}") from None


def _finite(value: float) -> float | None:
    """JSON has no inf/nan: an identical pair's PSNR and a missing SSIM become null."""
    return value if math.isfinite(value) else None


def evaluate_folders(gt: str | Path, pred: str | Path, *, protocol: str = "restormer", crop_border: int = 0,
                     csv: str | Path | None = None, report: str | Path | None = None, match: str | None = None,
                     workers: int | None = None, on_pairing: Callable[[Pairing], None] | None = None,
                     on_result: Callable[[PairResult], None] | None = None) -> Summary:
    """Score the predictions in `pred` against the ground truths in `gt` (folders, or two images) as
    the papers' scripts do, and write the optional `csv` and HTML `report`.

    Every option and output file is checked before any scoring; an output that would replace
    one of the images being scored is refused. `on_pairing(pairing)` is told which files
    paired (and which did not); `on_result(result)` receives each pair's scores as they come.
    `workers`: pairs scored at once (None: one per CPU core).
    """
    from .report import check_output_path, scored_images, write_csv, write_report

    gt, pred = Path(gt).expanduser(), Path(pred).expanduser()
    check_protocol(protocol, crop_border)
    if workers is not None and workers < 1:
        raise UsageError(f"workers={workers}: must be at least 1 (or None for one per CPU core)")
    outputs = {option: Path(path).expanduser() for option, path in (("csv", csv), ("report", report)) if path}
    scored = scored_images(gt, pred) if outputs else {}
    for option, path in outputs.items():
        check_output_path(path, option, scored)
    if len(outputs) == 2 and outputs["csv"].resolve() == outputs["report"].resolve():
        raise UsageError(f"csv= and report= both name {outputs['csv']}; give them different files")
    pairing = pair_paths(gt, pred, match=match)
    if on_pairing is not None:
        on_pairing(pairing)
    summary = evaluate(pairing, protocol=protocol, crop_border=crop_border, workers=workers,
                          on_result=on_result)
    if "csv" in outputs:
        write_csv(summary, outputs["csv"])
    if "report" in outputs:
        write_report(summary, outputs["report"])
    return summary
