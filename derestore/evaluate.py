"""Evaluate folders of predictions against ground truths: pairing, parallel scoring, means, comparison.

The papers' MATLAB scripts pair files by sorted position, which silently
mis-pairs a dataset with one file missing; derestore pairs by name and lists
what it could not pair.

Several prediction folders (models) are compared image by image against the
first (the baseline): the per-image values are those of single-model runs
(the same `score_pair`), each ground truth is decoded once for all models, and
each model's mean difference gets a seeded percentile-bootstrap interval.
"""

from __future__ import annotations

import math
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TypeVar

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
    model: str | None = None  # the prediction folder's label, in a comparison

    @property
    def complete(self) -> bool:
        return not (self.unmatched_gt or self.unmatched_pred or self.ambiguous)


@dataclass(frozen=True)
class PairResult:
    pair: Pair
    score: Score | None
    error: str | None = None
    model: str | None = None  # the prediction folder's label, in a comparison

    def record(self) -> dict[str, object]:
        """The `--json` line: `psnr` is null for identical pairs (`identical: true`) and failures;
        `model` only in a comparison."""
        data: dict[str, object] = {} if self.model is None else {"model": self.model}
        data |= {
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
    model: str | None = None  # the prediction folder's label, in a comparison

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
        """The final `--json` line (in a comparison, one per model, with its `model`)."""
        data: dict[str, object] = {} if self.model is None else {"model": self.model}
        data |= self.means.record(self.protocol)
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


def score_pair(pair: Pair, *, protocol: str, crop_border: int = 0, gt: np.ndarray | None = None) -> PairResult:
    """One pair's result; unreadable files and size mismatches become its `error`.

    `gt`: the ground truth's pixels when already decoded (a comparison decodes each once for all models).
    """
    try:
        gt_pixels = read_pixels(pair.gt) if gt is None else gt
        pred = read_pixels(pair.pred)
    except InputError as exc:  # its message names the file
        return PairResult(pair, None, str(exc))
    try:
        value = score(gt_pixels, pred, protocol=protocol, crop_border=crop_border)
    except InputError as exc:
        return PairResult(pair, None, f"{pair.pred} vs {pair.gt}: {exc}")
    return PairResult(pair, value)


_T = TypeVar("_T")
_R = TypeVar("_R")


def _map_in_order(fn: Callable[[_T], _R], items: list[_T], workers: int | None) -> Iterator[_R]:
    """`fn` of every item, in order, `workers` at a time (decoding and OpenCV release the GIL)."""
    workers = workers or default_workers()
    if workers == 1 or len(items) <= 1:
        yield from map(fn, items)
        return
    with ThreadPoolExecutor(max_workers=min(workers, len(items)), thread_name_prefix="derestore-eval") as pool:
        yield from pool.map(fn, items)


def iter_results(
    pairs: list[Pair], *, protocol: str, crop_border: int = 0, workers: int | None = None
) -> Iterator[PairResult]:
    """Results in pair order, scored `workers` pairs at a time."""
    return _map_in_order(lambda p: score_pair(p, protocol=protocol, crop_border=crop_border), pairs, workers)


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


# ------------------------------------------------------------------ comparison

BOOTSTRAP_SEED = 0
BOOTSTRAP_RESAMPLES = 10_000
MIN_RESAMPLES = 1_000  # fewer make the 2.5th and 97.5th percentiles rest on a handful of values
CONFIDENCE = 0.95
# A per-image difference that would not show at the precision papers print
# (PSNR to 2 decimals, SSIM to 4) is a tie: |difference| < tolerance.
TIE_TOLERANCE = {"psnr": 0.005, "ssim": 0.00005}
EXTREMES = 3  # largest gains and losses listed per model and metric
_BOOTSTRAP_BLOCK = 1 << 20  # resampled values drawn at once: memory stays bounded for any test set


# What `evaluate_folders` takes for each of several predictions: a path (labelled with its folder
# name) or a (label, path) tuple whose label may be None.
PredictionSpec = str | os.PathLike[str] | tuple[str | None, str | os.PathLike[str]]


def parse_prediction(text: str) -> tuple[str | None, str]:
    """The command line's `NAME=DIR` → `(NAME, DIR)`; any other text → `(None, text)`.

    `NAME=` is a label only when NAME is not empty, holds no path separator, and `text` as a
    whole is not an existing file or folder. So a folder named `a=b` is given as `./a=b` (or
    just `a=b` while it exists), and `NAME=./a=b` labels it.
    """
    name, equals, path = text.partition("=")
    separators = {"/", os.sep, os.altsep} - {None}
    if not equals or not name or any(s in name for s in separators) or Path(text).expanduser().exists():
        return None, text
    return name, path


def _predictions(pred: Sequence[PredictionSpec] | Mapping[str, str | os.PathLike[str]]) -> list[tuple[str, Path]]:
    """(label, path) of each prediction folder; a label defaults to the folder's (or file's) name."""
    specs = list(pred.items()) if isinstance(pred, Mapping) else [
        spec if isinstance(spec, tuple) else (None, spec) for spec in pred
    ]
    if not specs:
        raise UsageError("pred= is empty: give at least one prediction folder")
    taken: dict[str, Path] = {}
    found = []
    for label, raw in specs:
        if not os.fspath(raw):  # Path("") would be the current folder
            raise UsageError(f"pred={label}= names no folder; give NAME=DIR")
        path = Path(raw).expanduser()
        if label is None:
            label = path.name or path.resolve().name or str(path)
        if not label or not label.isprintable():
            raise UsageError(f"pred={path}: the name {label!r} is empty or holds control characters; give another")
        if label in taken:
            raise UsageError(
                f"pred={path}: the name {label!r} is already given to pred={taken[label]}; "
                "give each prediction its own name (NAME=DIR)"
            )
        taken[label] = path
        found.append((label, path))
    return found


@dataclass(frozen=True)
class ImageRow:
    """One ground-truth image and the result of each model that paired a prediction with it."""

    name: str
    gt: Path
    results: dict[str, PairResult]  # label → result, in model order


@dataclass(frozen=True)
class Difference:
    """One metric of one model against the baseline over the images compared.

    Per image, the difference is model − baseline (higher is better for PSNR and SSIM).
    PSNR: an image identical to the ground truth on either side (infinite PSNR) counts as
    a win for that side (a tie if both are identical) and is left out of the mean and the
    interval, which are in dB. SSIM: an image too small for SSIM is left out altogether.
    """

    metric: str
    values: list[tuple[str, float]]  # (image, difference) for every image in the mean, in image order
    wins: int
    ties: int
    losses: int
    left_out: int  # compared images not in the mean
    mean: float | None
    ci: tuple[float, float] | None  # the CONFIDENCE percentile-bootstrap interval of `mean`

    def largest_gains(self, n: int = EXTREMES) -> list[tuple[str, float]]:
        wins = [v for v in self.values if v[1] >= TIE_TOLERANCE[self.metric]]
        return sorted(wins, key=lambda v: -v[1])[:n]

    def largest_losses(self, n: int = EXTREMES) -> list[tuple[str, float]]:
        losses = [v for v in self.values if v[1] <= -TIE_TOLERANCE[self.metric]]
        return sorted(losses, key=lambda v: v[1])[:n]

    def record(self) -> dict[str, object]:
        return {
            "mean_difference": self.mean,
            "ci95": None if self.ci is None else list(self.ci),
            "wins": self.wins,
            "ties": self.ties,
            "losses": self.losses,
            "in_mean": len(self.values),
            "left_out": self.left_out,
            "largest_gains": [{"name": n, "difference": d} for n, d in self.largest_gains()],
            "largest_losses": [{"name": n, "difference": d} for n, d in self.largest_losses()],
        }


@dataclass(frozen=True)
class ModelComparison:
    """A model against the baseline."""

    model: str
    psnr: Difference
    ssim: Difference


@dataclass(frozen=True)
class Comparison:
    """Several models scored on one ground truth, each after the first compared with it."""

    protocol: str
    crop_border: int
    summaries: list[Summary]  # one per model, the baseline first; each over that model's own pairs
    rows: list[ImageRow]  # every ground truth some model paired, in name order
    compared: list[ImageRow]  # the rows every model paired and scored
    means: dict[str, RunningMeans]  # each model's means over `compared`
    models: list[ModelComparison]  # each model after the baseline
    seed: int
    resamples: int

    @property
    def labels(self) -> list[str]:
        return [s.model or "" for s in self.summaries]

    @property
    def baseline(self) -> str:
        return self.labels[0]

    @property
    def not_in_all(self) -> int:
        """Images some model has no prediction for."""
        return sum(len(r.results) < len(self.summaries) for r in self.rows)

    @property
    def failed_in_some(self) -> int:
        """Images every model has, left out because some model's pair failed."""
        return len(self.rows) - self.not_in_all - len(self.compared)

    @property
    def exit_code(self) -> int:
        return max(s.exit_code for s in self.summaries)

    def record(self) -> dict[str, object]:
        """The last `--json` line."""
        return {"comparison": {
            "baseline": self.baseline,
            "images": len(self.compared),
            "not_in_all": self.not_in_all,
            "failed_in_some": self.failed_in_some,
            "protocol": self.protocol,
            "crop_border": self.crop_border,
            "bootstrap": {"method": "percentile", "confidence": CONFIDENCE, "resamples": self.resamples,
                          "seed": self.seed},
            "tie_tolerance": dict(TIE_TOLERANCE),
            "mean": {label: {"psnr": m.psnr, "ssim": m.ssim} for label, m in self.means.items()},
            "models": {
                m.model: {"images": len(self.compared), "psnr": m.psnr.record(), "ssim": m.ssim.record()}
                for m in self.models
            },
        }}


def bootstrap_interval(
    values: Sequence[float], *, seed: int = BOOTSTRAP_SEED, resamples: int = BOOTSTRAP_RESAMPLES,
    confidence: float = CONFIDENCE,
) -> tuple[float, float] | None:
    """Percentile-bootstrap interval of the mean of `values` (None when there are none).

    `resamples` means of n values drawn with replacement (numpy's `default_rng(seed)`, a
    fresh generator per call, so the interval depends only on the values, the seed and
    the count); the interval is their (1 - confidence)/2 and (1 + confidence)/2 percentiles
    (numpy's linear interpolation).
    """
    data = np.asarray(values, dtype=np.float64)
    n = data.size
    if n == 0:
        return None
    rng = np.random.default_rng(seed)
    means = np.empty(resamples)
    block = max(1, _BOOTSTRAP_BLOCK // n)
    for start in range(0, resamples, block):
        stop = min(resamples, start + block)
        means[start:stop] = data[rng.integers(0, n, size=(stop - start, n))].mean(axis=1)
    low, high = np.percentile(means, [50 * (1 - confidence), 50 * (1 + confidence)])
    return float(low), float(high)


def _difference(metric: str, pairs: list[tuple[str, Score, Score]], seed: int, resamples: int) -> Difference:
    """`metric` of the model (second score) against the baseline (first) over `pairs`."""
    tolerance = TIE_TOLERANCE[metric]
    values: list[tuple[str, float]] = []
    wins = ties = losses = left_out = 0
    for name, base_score, model_score in pairs:
        base, model = getattr(base_score, metric), getattr(model_score, metric)
        if math.isnan(base) or math.isnan(model):
            left_out += 1
            continue
        if math.isinf(base) or math.isinf(model):  # identical to the ground truth: no dB to subtract
            left_out += 1
            d = 0.0 if model == base else model - base
        else:
            d = model - base
            values.append((name, d))
        if d >= tolerance:
            wins += 1
        elif d <= -tolerance:
            losses += 1
        else:
            ties += 1
    diffs = [d for _, d in values]
    mean = math.fsum(diffs) / len(diffs) if diffs else None
    ci = bootstrap_interval(diffs, seed=seed, resamples=resamples)
    return Difference(metric, values, wins, ties, losses, left_out, mean, ci)


def _row_name(pairs: list[tuple[str, Pair]]) -> str:
    """The name the pairs share; one ground-truth image against single files of other names: its stem."""
    names = {pair.name for _, pair in pairs}
    return names.pop() if len(names) == 1 else pairs[0][1].gt.stem


def compare(
    pairings: Sequence[Pairing],
    *,
    protocol: str,
    crop_border: int = 0,
    workers: int | None = None,
    seed: int = BOOTSTRAP_SEED,
    resamples: int = BOOTSTRAP_RESAMPLES,
    on_result: Callable[[PairResult], None] | None = None,
) -> Comparison:
    """Score every model's pairs (each `Pairing` labelled by its `model`; the first is the baseline)
    and compare each model with the baseline on the images all of them paired and scored.

    Images are scored `workers` at a time, each ground truth decoded once for all models;
    `on_result` sees each result as it is ready: image by image, models in order.
    """
    labels = [p.model for p in pairings]
    if any(label is None for label in labels) or len(set(labels)) != len(labels):
        raise ValueError("every pairing needs its own `model` label")
    groups: dict[Path, list[tuple[str, Pair]]] = {}
    for pairing in pairings:
        for pair in pairing.pairs:
            groups.setdefault(pair.gt, []).append((pairing.model or "", pair))
    order = sorted(groups.values(), key=lambda g: _natural(_row_name(g)))

    def score_image(group: list[tuple[str, Pair]]) -> list[PairResult]:
        try:
            gt = read_pixels(group[0][1].gt)
        except InputError as exc:  # every model's pair fails as a single run's would
            return [PairResult(pair, None, str(exc), model=label) for label, pair in group]
        return [replace(score_pair(pair, protocol=protocol, crop_border=crop_border, gt=gt), model=label)
                for label, pair in group]

    means = {label: RunningMeans() for label in labels}
    results: dict[str, list[PairResult]] = {label: [] for label in labels}
    rows = []
    for group, scored in zip(order, _map_in_order(score_image, order, workers)):
        for result in scored:
            if result.score is not None:
                means[result.model].add(result.score)
            results[result.model].append(result)
            if on_result is not None:
                on_result(result)
        rows.append(ImageRow(_row_name(group), group[0][1].gt, {r.model: r for r in scored}))
    summaries = [Summary(protocol, crop_border, results[p.model], p, means[p.model], model=p.model)
                 for p in pairings]
    compared = [r for r in rows
                if len(r.results) == len(labels) and all(x.score is not None for x in r.results.values())]
    common = {label: RunningMeans() for label in labels}
    for row in compared:
        for label, result in row.results.items():
            common[label].add(result.score)
    baseline = labels[0]
    models = []
    for label in labels[1:]:
        pairs = [(row.name, row.results[baseline].score, row.results[label].score) for row in compared]
        models.append(ModelComparison(label, _difference("psnr", pairs, seed, resamples),
                                      _difference("ssim", pairs, seed, resamples)))
    return Comparison(protocol, crop_border, summaries, rows, compared, common, models, seed, resamples)


# ------------------------------------------------------------------ folders


def evaluate_folders(
    gt: str | Path,
    pred: str | os.PathLike[str] | Sequence[PredictionSpec] | Mapping[str, str | os.PathLike[str]],
    *,
    protocol: str = "restormer",
    crop_border: int = 0,
    csv: str | Path | None = None,
    report: str | Path | None = None,
    match: str | None = None,
    workers: int | None = None,
    seed: int = BOOTSTRAP_SEED,
    resamples: int = BOOTSTRAP_RESAMPLES,
    on_pairing: Callable[[Pairing], None] | None = None,
    on_result: Callable[[PairResult], None] | None = None,
) -> Summary | Comparison:
    """Score the predictions in `pred` against the ground truths in `gt` (folders, or two images) as
    the papers' scripts do, and write the optional `csv` and HTML `report`.

    `pred` one path: a `Summary`. Several models, as a list of paths or (label, path) tuples or
    a {label: path} mapping (labels default to the folder names; the first is the baseline): a
    `Comparison`, whose per-image values are those single runs give; `seed` and `resamples`
    set its bootstrap intervals.

    Every option and output file is checked before any scoring; an output that would replace
    one of the images being scored is refused. `on_pairing(pairing)` is told which files
    paired (and which did not; once per model, `pairing.model` naming it); `on_result(result)`
    receives each pair's scores as they come. `workers`: images scored at once (None: one per CPU core).
    """
    from .report import check_output_path, scored_images, write_csv, write_report

    single = isinstance(pred, (str, os.PathLike))
    # One path: no label, and today's single evaluation.
    predictions: list[tuple[str | None, Path]] = [(None, Path(pred).expanduser())] if single else _predictions(pred)
    gt = Path(gt).expanduser()
    check_protocol(protocol, crop_border)
    if workers is not None and workers < 1:
        raise UsageError(f"workers={workers}: must be at least 1 (or None for one per CPU core)")
    if resamples < MIN_RESAMPLES:
        raise UsageError(f"resamples={resamples}: must be at least {MIN_RESAMPLES} for a 95% interval")
    if seed < 0:
        raise UsageError(f"seed={seed}: must not be negative")
    outputs = {option: Path(path).expanduser() for option, path in (("csv", csv), ("report", report)) if path}
    scored = scored_images(gt, *(path for _, path in predictions)) if outputs else {}
    for option, path in outputs.items():
        check_output_path(path, option, scored)
    if len(outputs) == 2 and outputs["csv"].resolve() == outputs["report"].resolve():
        raise UsageError(f"csv= and report= both name {outputs['csv']}; give them different files")
    pairings = [replace(pair_paths(gt, path, match=match), model=label) for label, path in predictions]
    if on_pairing is not None:
        for pairing in pairings:
            on_pairing(pairing)
    result: Summary | Comparison
    if single:
        result = evaluate(pairings[0], protocol=protocol, crop_border=crop_border, workers=workers,
                          on_result=on_result)
    else:
        result = compare(pairings, protocol=protocol, crop_border=crop_border, workers=workers, seed=seed,
                         resamples=resamples, on_result=on_result)
    if "csv" in outputs:
        write_csv(result, outputs["csv"])
    if "report" in outputs:
        write_report(result, outputs["report"])
    return result
