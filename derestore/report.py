"""Files an evaluation writes: per-image CSV, and a self-contained HTML page.

The page holds the means, a sortable table, a PSNR histogram and the worst
pairs side by side; for a comparison of models, the per-model means, each
model's differences against the baseline (with their bootstrap intervals), a
paired scatter and a histogram of differences, and the images where the models
differ most, with zoomed crops where they disagree most. Everything is inline
(CSS, script, SVG, base64 PNG thumbnails), so the file can be mailed or
archived alone and opens offline. Both files are written atomically: never
half a file under the final name.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import os
from collections.abc import Callable
from pathlib import Path

import cv2
import numpy as np

from . import atomic, imageio
from .errors import DerestoreError, InputError, UsageError
from .evaluate import (
    CONFIDENCE,
    TIE_TOLERANCE,
    Comparison,
    Difference,
    ImageRow,
    ModelComparison,
    PairResult,
    Summary,
    read_pixels,
)
from .metrics import PROTOCOLS

THUMB_SIDE = 320  # longest side of a thumbnail, pixels
DIFF_GAIN = 8  # |GT - prediction| is amplified so small errors show
CROP_SIDE = 64  # side of the zoomed crop where two models disagree most, pixels of the image
CROP_VIEW = 192  # the crop is enlarged (nearest neighbour, whole factors) to about this side

_STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:2em;color:#222;max-width:1200px}
h1{font-size:1.5em}h2{font-size:1.2em;margin-top:2em}
.means{display:flex;gap:2em}.means div{background:#f3f5f8;padding:.8em 1.2em;border-radius:6px}
.means b{display:block;font-size:1.6em}
table{border-collapse:collapse;width:100%}th,td{padding:.25em .6em;border-bottom:1px solid #ddd;text-align:left}
th{cursor:pointer;background:#f3f5f8;user-select:none}th:after{content:" \\2195";color:#999}
td.num{text-align:right;font-variant-numeric:tabular-nums}
.warn{color:#8a5a00}.err{color:#b00020}
.pair{margin:1em 0}.pair figure{display:inline-block;margin:0 .5em 0 0;vertical-align:top}
.pair img{image-rendering:pixelated;border:1px solid #ccc}figcaption{font-size:.85em;color:#555}
svg text{font-size:11px;fill:#444}
"""
_COMPARISON_STYLE = """
.charts{display:flex;flex-wrap:wrap;gap:2em;align-items:flex-start}
table.plain{width:auto}table.plain th{cursor:default}table.plain th:after{content:none}
.gain{color:#1b7a2e}.loss{color:#b00020}
"""

# Click a header to sort by it; numbers sort by their data-v value.
_SCRIPT = """
document.querySelectorAll("table.sortable th").forEach(function(th, col){
  th.addEventListener("click", function(){
    var body = th.closest("table").tBodies[0], rows = Array.from(body.rows);
    var asc = th.dataset.dir !== "asc"; th.dataset.dir = asc ? "asc" : "desc";
    rows.sort(function(a, b){
      var x = a.cells[col].dataset.v, y = b.cells[col].dataset.v;
      var r = (x !== undefined && y !== undefined) ? parseFloat(x) - parseFloat(y)
            : a.cells[col].textContent.localeCompare(b.cells[col].textContent, undefined, {numeric: true});
      return asc ? r : -r;
    });
    rows.forEach(function(r){ body.appendChild(r); });
  });
});
"""


def write_report(result: Summary | Comparison, path: Path, *, worst: int = 6) -> None:
    """Write the HTML report of one model's `Summary` or of a `Comparison` to `path`."""
    check_output_path(path, "report")
    page = render_comparison(result) if isinstance(result, Comparison) else render_report(result, worst=worst)
    _write_atomically(path, page, "report")


def write_csv(result: Summary | Comparison, path: Path) -> None:
    """Per-image rows; `inf` marks an identical pair, an empty cell a missing value.

    A comparison has one row per ground-truth image, with `compared` (whether it is among the
    images every model paired and scored) and the columns `MODEL:pred`, `MODEL:psnr`,
    `MODEL:ssim`, `MODEL:identical`, `MODEL:error` for every model, empty where a model has no
    prediction for the image.
    """
    check_output_path(path, "csv")
    if isinstance(result, Comparison):
        _write_atomically(path, _comparison_csv(result), "csv")
        return
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["name", "gt", *_CSV_FIELDS])
    for r in result.results:
        writer.writerow([r.pair.name, r.pair.gt, *_csv_cells(r)])
    _write_atomically(path, buffer.getvalue(), "csv")


_CSV_FIELDS = ("pred", "psnr", "ssim", "identical", "error")


def _csv_cells(r: PairResult | None) -> list[object]:
    """One result's _CSV_FIELDS; all empty for no result (a model without this image)."""
    if r is None:
        return [""] * len(_CSV_FIELDS)
    s = r.score
    return [
        r.pair.pred,
        "" if s is None else repr(s.psnr),
        "" if s is None or math.isnan(s.ssim) else repr(s.ssim),
        "" if s is None else str(s.identical).lower(),
        r.error or "",
    ]


def _comparison_csv(comparison: Comparison) -> str:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["name", "gt", "compared"] + [f"{m}:{f}" for m in comparison.labels for f in _CSV_FIELDS])
    compared = {id(row) for row in comparison.compared}
    for row in comparison.rows:
        cells: list[object] = [row.name, row.gt, str(id(row) in compared).lower()]
        for label in comparison.labels:
            cells += _csv_cells(row.results.get(label))
        writer.writerow(cells)
    return buffer.getvalue()


def check_output_path(path: Path, option: str, inputs: dict[Path, Path] | None = None) -> None:
    """Refuse a destination that cannot take the file, or that is one of the images being scored
    (`inputs`: resolved path → the path as given), before any time is spent scoring."""
    given = (inputs or {}).get(path.resolve())
    if given is not None:
        raise UsageError(f"{option}={path} would overwrite the image {given} being scored; give another file name")
    folder = path.parent
    if path.is_dir():
        raise UsageError(f"{option}={path} is a folder; give a file name")
    if not folder.is_dir():
        raise UsageError(f"{option}={path}: folder {folder} does not exist; create it first")
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UsageError(f"{option}={path}: folder {folder} is not writable")


def scored_images(*places: Path) -> dict[Path, Path]:
    """Every image file an evaluation reads (the files given, and the images in the folders given)."""
    found: dict[Path, Path] = {}
    for place in places:
        if place.is_dir():
            files = [p for p in place.iterdir() if imageio.is_image_path(p)]
        else:
            files = [place]
        for path in files:
            found.setdefault(path.resolve(), path)
    return found


def _write_atomically(path: Path, text: str, option: str) -> None:
    """Never half a file under `path` (see `atomic.write`)."""
    try:
        atomic.write_text(path, text)
    except OSError as exc:
        raise DerestoreError(f"{option}={path}: cannot write: {exc.strerror or exc}") from None


def render_report(summary: Summary, *, worst: int = 6) -> str:
    scored = [r for r in summary.results if r.score is not None]
    means = summary.means
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>derestore eval: {_e(summary.protocol)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        "<h1>derestore eval</h1>",
        f"<p>Protocol <b>{_e(summary.protocol)}</b>: {_e(PROTOCOLS.get(summary.protocol, ''))}."
        f" Border crop: {summary.crop_border} px. Pairs scored: {means.count}.</p>",
        '<div class="means">',
        f"<div>mean PSNR<b>{_fmt(means.psnr, 4, ' dB')}</b></div>",
        f"<div>mean SSIM<b>{_fmt(means.ssim, 4)}</b></div>",
        "</div>",
        _problems(summary),
        "<h2>PSNR histogram</h2>",
        _histogram([r.score.psnr for r in scored if math.isfinite(r.score.psnr)]),
        "<h2>Worst pairs</h2>",
        f"<p>Ground truth | prediction | |difference| &times; {DIFF_GAIN}, lowest PSNR first.</p>",
        _worst_pairs(scored, worst),
        "<h2>Per image</h2>",
        _table(summary.results),
        f"<script>{_SCRIPT}</script>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _problems(summary: Summary) -> str:
    items = [f'<li class="warn">{_e(w)}</li>' for w in summary.warnings]
    items += [f'<li class="err">no prediction for {_e(str(p))}</li>' for p in summary.pairing.unmatched_gt]
    items += [f'<li class="err">no ground truth for {_e(str(p))}</li>' for p in summary.pairing.unmatched_pred]
    items += [f'<li class="err">{_e(m)}</li>' for m in summary.pairing.ambiguous]
    items += [f'<li class="err">{_e(r.error or "")}</li>' for r in summary.failed]
    return f"<h2>Notes</h2><ul>{''.join(items)}</ul>" if items else ""


def _table(results: list[PairResult]) -> str:
    rows = []
    for r in results:
        s = r.score
        if s is None:
            psnr_cell = ssim_cell = "<td></td>"
            note = f'<span class="err">{_e(r.error or "")}</span>'
        else:
            # Sort keys: identical (inf) pairs sort above every finite PSNR, a missing SSIM below.
            psnr_key = "1e308" if math.isinf(s.psnr) else repr(s.psnr)
            ssim_key = "-1e308" if math.isnan(s.ssim) else repr(s.ssim)
            psnr_cell = f'<td class="num" data-v="{psnr_key}">{_fmt(s.psnr, 4)}</td>'
            ssim_cell = f'<td class="num" data-v="{ssim_key}">{_fmt(s.ssim, 4)}</td>'
            note = "; ".join(_e(w) for w in (["identical"] if s.identical else []) + s.warnings)
        rows.append(
            f"<tr><td>{_e(r.pair.name)}</td>{psnr_cell}{ssim_cell}"
            f"<td>{_e(r.pair.gt.name)}</td><td>{_e(r.pair.pred.name)}</td><td>{note}</td></tr>"
        )
    return (
        '<table class="sortable"><thead><tr><th>name</th><th>PSNR (dB)</th><th>SSIM</th>'
        "<th>ground truth</th><th>prediction</th><th>notes</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _bars(counts: np.ndarray, edges: np.ndarray, width: int, height: int, pad: int,
          colour: Callable[[float], str], title: Callable[[float, float, int], str]) -> tuple[int, list[str]]:
    """The SVG bars of a histogram, scaled to its fullest bin (returned first)."""
    bar = (width - 2 * pad) / len(counts)
    top = max(int(counts.max()), 1)
    bars = []
    for i, c in enumerate(counts):
        h = (height - 2 * pad) * int(c) / top
        x, y = pad + i * bar, height - pad - h
        bars.append(f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar - 1:.1f}" height="{h:.1f}" fill="{colour(edges[i])}">'
                    f"<title>{title(edges[i], edges[i + 1], int(c))}</title></rect>")
    return top, bars


def _histogram(values: list[float], bins: int = 20) -> str:
    if not values:
        return "<p>No finite PSNR values.</p>"
    lo, hi = math.floor(min(values)), math.ceil(max(values))
    hi = max(hi, lo + 1)
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    width, height, pad = 600, 160, 24
    top, bars = _bars(counts, edges, width, height, pad, lambda edge: "#4a78b5",
                      lambda a, b, n: f"{a:.2f}–{b:.2f} dB: {n}")
    labels = (
        f'<text x="{pad}" y="{height - 6}">{lo} dB</text>'
        f'<text x="{width - pad}" y="{height - 6}" text-anchor="end">{hi} dB</text>'
        f'<text x="{pad}" y="{pad - 8}">max {top} per bin</text>'
    )
    return f'<svg width="{width}" height="{height}" role="img" aria-label="PSNR histogram">{"".join(bars)}{labels}</svg>'


def _worst_pairs(scored: list[PairResult], n: int) -> str:
    ranked = sorted((r for r in scored if math.isfinite(r.score.psnr)), key=lambda r: r.score.psnr)[:n]
    if not ranked:
        return "<p>No pairs with a finite PSNR.</p>"
    blocks = []
    for r in ranked:
        caption = f"{_e(r.pair.name)}: {r.score.psnr:.4f} dB, SSIM {_fmt(r.score.ssim, 4)}"
        try:
            gt, pred = (_rgb8(read_pixels(p)) for p in (r.pair.gt, r.pair.pred))
        except InputError as exc:
            blocks.append(f'<div class="pair"><p>{caption}</p><p class="err">{_e(str(exc))}</p></div>')
            continue
        # The difference is taken at full size: shrinking first would average errors away.
        diff = np.clip(np.abs(gt.astype(np.int16) - pred.astype(np.int16)) * DIFF_GAIN, 0, 255).astype(np.uint8)
        figures = "".join(
            f'<figure><img src="{_png_uri(_thumb(img))}" alt="{label}"><figcaption>{label}</figcaption></figure>'
            for label, img in (("ground truth", gt), ("prediction", pred), ("difference", diff))
        )
        blocks.append(f'<div class="pair"><p>{caption}</p>{figures}</div>')
    return "".join(blocks)


def _rgb8(pixels: np.ndarray) -> np.ndarray:
    """Stored pixels as 8-bit RGB for display."""
    a = pixels
    if a.dtype == np.uint16:
        a = (a.astype(np.float32) / 257.0 + 0.5).astype(np.uint8)
    if a.ndim == 2 or a.shape[2] == 1:
        a = np.repeat(a.reshape(a.shape[0], a.shape[1], 1), 3, axis=2)
    return a


def _thumb(a: np.ndarray) -> np.ndarray:
    scale = THUMB_SIDE / max(a.shape[:2])
    if scale < 1:
        size = (max(1, round(a.shape[1] * scale)), max(1, round(a.shape[0] * scale)))
        a = cv2.resize(a, size, interpolation=cv2.INTER_AREA)
    return np.ascontiguousarray(a)


def _png_uri(rgb: np.ndarray) -> str:
    ok, data = cv2.imencode(".png", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR))
    if not ok:
        raise InputError("could not encode a report thumbnail as PNG")
    return "data:image/png;base64," + base64.b64encode(data.tobytes()).decode("ascii")


def _fmt(value: float | None, digits: int, unit: str = "") -> str:
    if value is None or math.isnan(value):
        return "–"
    if math.isinf(value):
        return "∞" + unit
    return f"{value:.{digits}f}{unit}"


def _e(text: str) -> str:
    return html.escape(text, quote=True)


# ------------------------------------------------------------------ comparison


def render_comparison(comparison: Comparison) -> str:
    base = comparison.baseline
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>derestore eval: {_e(', '.join(comparison.labels))}</title>",
        f"<style>{_STYLE}{_COMPARISON_STYLE}</style></head><body>",
        "<h1>derestore eval: comparison</h1>",
        f"<p>Protocol <b>{_e(comparison.protocol)}</b>: {_e(PROTOCOLS.get(comparison.protocol, ''))}."
        f" Border crop: {comparison.crop_border} px. Baseline: <b>{_e(base)}</b>."
        f" Compared on the <b>{len(comparison.compared)}</b> images every model paired and scored"
        f"{_left_aside(comparison)}.</p>",
        "<h2>Means</h2>",
        _means_table(comparison),
        _comparison_problems(comparison),
        f"<h2>Against {_e(base)}</h2>",
        _method(comparison),
        _differences_table(comparison),
    ]
    for model in comparison.models:
        parts += [
            f"<h2>{_e(model.model)} against {_e(base)}</h2>",
            '<div class="charts">',
            _scatter(comparison, model.model),
            _difference_histogram(model.psnr),
            "</div>",
            f"<h3>Where {_e(model.model)} and {_e(base)} differ most</h3>",
            (f"<p>Largest PSNR gains, then losses. Ground truth | {_e(base)} | {_e(model.model)}; below, "
             "the same three enlarged where the two predictions differ most (the frame in the thumbnails).</p>"),
            _disagreements(comparison, model),
        ]
    parts += [
        "<h2>Per image</h2>",
        _comparison_table(comparison),
        f"<script>{_SCRIPT}</script>",
        "</body></html>",
    ]
    return "\n".join(parts) + "\n"


def _left_aside(comparison: Comparison) -> str:
    notes = []
    if comparison.not_in_all:
        notes.append(f"{comparison.not_in_all} missing from some folder")
    if comparison.failed_in_some:
        notes.append(f"{comparison.failed_in_some} failed for some model")
    return f" (left out: {', '.join(notes)})" if notes else ""


def _means_table(comparison: Comparison) -> str:
    n = len(comparison.compared)
    rows = []
    for summary in comparison.summaries:
        own, common = summary.means, comparison.means[summary.model or ""]
        rows.append(
            f"<tr><td>{_e(summary.model or '')}</td><td class=\"num\">{own.count}</td>"
            f'<td class="num">{_fmt(own.psnr, 4)}</td><td class="num">{_fmt(own.ssim, 4)}</td>'
            f'<td class="num">{_fmt(common.psnr, 4)}</td><td class="num">{_fmt(common.ssim, 4)}</td></tr>'
        )
    return (
        '<table class="plain"><thead><tr><th>model</th><th>pairs scored</th><th>PSNR (dB)</th><th>SSIM</th>'
        f"<th>PSNR on the {n} compared</th><th>SSIM on the {n} compared</th></tr></thead>"
        f"<tbody>{''.join(rows)}</tbody></table>"
    )


def _comparison_problems(comparison: Comparison) -> str:
    items = []
    for summary in comparison.summaries:
        label = _e(summary.model or "")
        items += [f'<li class="warn">{label}: {_e(w)}</li>' for w in summary.warnings]
        items += [f'<li class="err">{label}: no prediction for {_e(str(p))}</li>'
                  for p in summary.pairing.unmatched_gt]
        items += [f'<li class="err">{label}: no ground truth for {_e(str(p))}</li>'
                  for p in summary.pairing.unmatched_pred]
        items += [f'<li class="err">{label}: {_e(m)}</li>' for m in summary.pairing.ambiguous]
        items += [f'<li class="err">{label}: {_e(r.error or "")}</li>' for r in summary.failed]
    return f"<h2>Notes</h2><ul>{''.join(items)}</ul>" if items else ""


def _method(comparison: Comparison) -> str:
    return (
        f"<p>Per image, model − {_e(comparison.baseline)}; the mean of these differences with its "
        f"{CONFIDENCE:.0%} percentile-bootstrap interval ({comparison.resamples} resamples of the images, "
        f"seed {comparison.seed}). Ties: |ΔPSNR| &lt; {np.format_float_positional(TIE_TOLERANCE['psnr'])} dB, "
        f"|ΔSSIM| &lt; {np.format_float_positional(TIE_TOLERANCE['ssim'])}. An image identical to the ground truth on either side "
        "(infinite PSNR) counts as a win for that side and is left out of the PSNR mean and interval.</p>"
    )


def _differences_table(comparison: Comparison) -> str:
    rows = []
    for model in comparison.models:
        cells = []
        for diff, digits in ((model.psnr, 4), (model.ssim, 5)):
            ci = "–" if diff.ci is None else f"[{diff.ci[0]:+.{digits}f}, {diff.ci[1]:+.{digits}f}]"
            mean = "–" if diff.mean is None else f"{diff.mean:+.{digits}f}"
            cells.append(f'<td class="num {_sign_class(diff.mean)}">{mean}</td><td class="num">{ci}</td>'
                         f'<td class="num">{diff.wins} / {diff.ties} / {diff.losses}</td>')
        rows.append(f"<tr><td>{_e(model.model)}</td>{''.join(cells)}</tr>")
    if not rows:
        return "<p>Only one model: nothing to compare.</p>"
    return (
        '<table class="plain"><thead><tr><th>model</th><th>ΔPSNR (dB)</th><th>95% interval</th>'
        "<th>wins / ties / losses</th><th>ΔSSIM</th><th>95% interval</th><th>wins / ties / losses</th></tr>"
        f"</thead><tbody>{''.join(rows)}</tbody></table>"
    )


def _sign_class(value: float | None) -> str:
    if value is None or value == 0:
        return ""
    return "gain" if value > 0 else "loss"


def _scatter(comparison: Comparison, label: str) -> str:
    """Each compared image's baseline PSNR (x) against the model's (y); above the diagonal, the model is better."""
    base = comparison.baseline
    points = []
    for row in comparison.compared:
        x, y = row.results[base].score.psnr, row.results[label].score.psnr  # type: ignore[union-attr]
        if math.isfinite(x) and math.isfinite(y):
            points.append((row.name, x, y))
    if not points:
        return "<p>No image with a finite PSNR for both models.</p>"
    lo = math.floor(min(min(p[1], p[2]) for p in points))
    hi = max(math.ceil(max(max(p[1], p[2]) for p in points)), lo + 1)
    side, pad = 320, 36
    span = side - 2 * pad

    def at(v: float) -> float:
        return pad + span * (v - lo) / (hi - lo)

    tolerance = TIE_TOLERANCE["psnr"]
    dots = []
    for name, x, y in points:
        colour = "#1b7a2e" if y - x >= tolerance else "#b00020" if x - y >= tolerance else "#888"
        dots.append(
            f'<circle cx="{at(x):.1f}" cy="{side - at(y):.1f}" r="3" fill="{colour}" fill-opacity=".7">'
            f"<title>{_e(name)}: {_e(base)} {x:.4f} dB, {_e(label)} {y:.4f} dB</title></circle>"
        )
    frame = (
        f'<rect x="{pad}" y="{pad}" width="{span}" height="{span}" fill="none" stroke="#ccc"/>'
        f'<line x1="{pad}" y1="{side - pad}" x2="{side - pad}" y2="{pad}" stroke="#999" stroke-dasharray="4 3"/>'
        f'<text x="{pad}" y="{side - pad + 14}">{lo}</text>'
        f'<text x="{side - pad}" y="{side - pad + 14}" text-anchor="end">{hi}</text>'
        f'<text x="{side / 2}" y="{side - 6}" text-anchor="middle">{_e(base)} PSNR (dB)</text>'
        f'<text x="{pad - 4}" y="{side - pad}" text-anchor="end">{lo}</text>'
        f'<text x="{pad - 4}" y="{pad + 4}" text-anchor="end">{hi}</text>'
        f'<text x="12" y="{side / 2}" text-anchor="middle" transform="rotate(-90 12 {side / 2})">'
        f"{_e(label)} PSNR (dB)</text>"
    )
    return (f'<svg width="{side}" height="{side}" role="img" aria-label="PSNR per image, '
            f'{_e(base)} against {_e(label)}">{frame}{"".join(dots)}</svg>')


def _difference_histogram(diff: Difference, bins: int = 20) -> str:
    """Per-image ΔPSNR on a range symmetric about 0, so gains and losses read left and right of the middle."""
    values = [d for _, d in diff.values]
    if not values:
        return "<p>No finite PSNR differences.</p>"
    reach = max(abs(v) for v in values)
    reach = max(math.ceil(reach * 10) / 10, 0.1)  # a round 0.1 dB
    counts, edges = np.histogram(values, bins=bins, range=(-reach, reach))
    width, height, pad = 420, 200, 24
    top, bars = _bars(counts, edges, width, height, pad, lambda edge: "#1b7a2e" if edge >= 0 else "#b00020",
                      lambda a, b, n: f"{a:+.3f} to {b:+.3f} dB: {n}")
    labels = (
        f'<line x1="{width / 2}" y1="{pad}" x2="{width / 2}" y2="{height - pad}" stroke="#999"/>'
        f'<text x="{pad}" y="{height - 6}">−{reach:g} dB</text>'
        f'<text x="{width / 2}" y="{height - 6}" text-anchor="middle">0</text>'
        f'<text x="{width - pad}" y="{height - 6}" text-anchor="end">+{reach:g} dB</text>'
        f'<text x="{pad}" y="{pad - 8}">ΔPSNR per image, max {top} per bin</text>'
    )
    return (f'<svg width="{width}" height="{height}" role="img" aria-label="histogram of PSNR differences">'
            f'{"".join(bars)}{labels}</svg>')


def _disagreements(comparison: Comparison, model: ModelComparison) -> str:
    shown = model.psnr.largest_gains() + model.psnr.largest_losses()
    if not shown:
        return "<p>No image where the two differ by more than a tie.</p>"
    rows = {row.name: row for row in comparison.compared}
    return "".join(_disagreement(rows[name], comparison.baseline, model.model, d) for name, d in shown)


def _disagreement(row: ImageRow, base: str, label: str, difference: float) -> str:
    a, b = row.results[base], row.results[label]
    caption = (
        f'{_e(row.name)}: {_e(base)} {a.score.psnr:.4f} dB, {_e(label)} {b.score.psnr:.4f} dB '  # type: ignore[union-attr]
        f'(<span class="{_sign_class(difference)}">{difference:+.4f} dB</span>)'
    )
    try:
        gt, pa, pb = (_rgb8(read_pixels(p)) for p in (row.gt, a.pair.pred, b.pair.pred))
    except InputError as exc:
        return f'<div class="pair"><p>{caption}</p><p class="err">{_e(str(exc))}</p></div>'
    top, left, side = _most_different_window(pa, pb, min(CROP_SIDE, *gt.shape[:2]))
    zoom = max(1, CROP_VIEW // side)
    names = ("ground truth", base, label)
    thumbs = "".join(
        f'<figure><img src="{_png_uri(_framed_thumb(img, top, left, side))}" alt="{_e(name)}">'
        f"<figcaption>{_e(name)}</figcaption></figure>"
        for name, img in zip(names, (gt, pa, pb))
    )
    crops = "".join(
        f'<figure><img src="{_png_uri(_zoomed(img[top:top + side, left:left + side], zoom))}" '
        f'alt="{_e(name)}, zoomed"><figcaption>{_e(name)}, ×{zoom}</figcaption></figure>'
        for name, img in zip(names, (gt, pa, pb))
    )
    where = f"{side}×{side} px at x={left}, y={top}"
    return f'<div class="pair"><p>{caption}</p>{thumbs}<br>{crops}<p>crop: {where}</p></div>'


def _most_different_window(a: np.ndarray, b: np.ndarray, side: int) -> tuple[int, int, int]:
    """Top, left and side of the side × side window where the two images differ most (sum of |a − b|)."""
    d = np.abs(a.astype(np.int32) - b.astype(np.int32)).sum(axis=2, dtype=np.int64)
    total = np.zeros((d.shape[0] + 1, d.shape[1] + 1), np.int64)
    np.cumsum(np.cumsum(d, axis=0), axis=1, out=total[1:, 1:])
    window = total[side:, side:] - total[:-side, side:] - total[side:, :-side] + total[:-side, :-side]
    top, left = np.unravel_index(int(np.argmax(window)), window.shape)
    return int(top), int(left), side


def _framed_thumb(rgb: np.ndarray, top: int, left: int, side: int) -> np.ndarray:
    """The thumbnail with the crop's window outlined (dark under light, to show on any picture)."""
    thumb = _thumb(rgb).copy()
    scale = thumb.shape[0] / rgb.shape[0]
    p1 = (int(left * scale), int(top * scale))
    p2 = (max(p1[0] + 2, int((left + side) * scale) - 1), max(p1[1] + 2, int((top + side) * scale) - 1))
    cv2.rectangle(thumb, p1, p2, (0, 0, 0), 3)
    cv2.rectangle(thumb, p1, p2, (255, 220, 0), 1)
    return thumb


def _zoomed(rgb: np.ndarray, factor: int) -> np.ndarray:
    size = (rgb.shape[1] * factor, rgb.shape[0] * factor)
    return np.ascontiguousarray(cv2.resize(rgb, size, interpolation=cv2.INTER_NEAREST))


def _comparison_table(comparison: Comparison) -> str:
    labels = comparison.labels
    head = "".join(f"<th>{_e(m)} PSNR</th><th>{_e(m)} SSIM</th>" for m in labels)
    head += "".join(f"<th>Δ{_e(m.model)} PSNR</th>" for m in comparison.models)
    compared = {id(row) for row in comparison.compared}
    differences = {m.model: dict(m.psnr.values) for m in comparison.models}
    rows = []
    for row in comparison.rows:
        cells = []
        notes = []
        for label in labels:
            r = row.results.get(label)
            if r is None or r.score is None:
                cells.append('<td class="num" data-v="-1e308">–</td><td class="num" data-v="-1e308">–</td>')
                notes.append(f"{label}: " + ("no prediction" if r is None else r.error or "failed"))
                continue
            s = r.score
            # Sort keys: identical (inf) pairs above every finite PSNR; missing values below everything.
            psnr_key = "1e308" if math.isinf(s.psnr) else repr(s.psnr)
            ssim_key = "-1e308" if math.isnan(s.ssim) else repr(s.ssim)
            cells.append(f'<td class="num" data-v="{psnr_key}">{_fmt(s.psnr, 4)}</td>'
                         f'<td class="num" data-v="{ssim_key}">{_fmt(s.ssim, 4)}</td>')
        for label, diffs in differences.items():
            d = diffs.get(row.name) if id(row) in compared else None
            if d is None:
                cells.append('<td class="num" data-v="-1e308">–</td>')
            else:
                cells.append(f'<td class="num {_sign_class(d)}" data-v="{d!r}">{d:+.4f}</td>')
        rows.append(f"<tr><td>{_e(row.name)}</td>{''.join(cells)}<td>{_e('; '.join(notes))}</td></tr>")
    return (
        f'<table class="sortable"><thead><tr><th>name</th>{head}<th>notes</th></tr></thead>'
        f"<tbody>{''.join(rows)}</tbody></table>"
    )

