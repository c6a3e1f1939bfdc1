"""Files an evaluation writes: per-image CSV, and a self-contained HTML page.

The page holds the means, a sortable table, a PSNR histogram and the worst
pairs side by side. Everything is inline (CSS, script, SVG, base64 PNG
thumbnails), so the file can be mailed or archived alone and opens offline.
Both files are written atomically: never half a file under the final name.
"""

from __future__ import annotations

import base64
import csv
import html
import io
import math
import os
from pathlib import Path

import cv2
import numpy as np

from . import atomic, imageio
from .errors import DerestoreError, InputError, UsageError
from .evaluate import PairResult, Summary, read_pixels
from .metrics import PROTOCOLS

THUMB_SIDE = 320  # longest side of a thumbnail, pixels
DIFF_GAIN = 8  # |GT - prediction| is amplified so small errors show

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


def write_report(summary: Summary, path: Path, *, worst: int = 6) -> None:
    """Write the HTML report to `path`."""
    check_output_path(path, "report")
    _write_atomically(path, render_report(summary, worst=worst), "report")


def write_csv(summary: Summary, path: Path) -> None:
    """Per-image rows; `inf` marks an identical pair, an empty cell a missing value."""
    check_output_path(path, "csv")
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["name", "gt", "pred", "psnr", "ssim", "identical", "error"])
    for r in summary.results:
        s = r.score
        writer.writerow([
            r.pair.name, r.pair.gt, r.pair.pred,
            "" if s is None else repr(s.psnr),
            "" if s is None or math.isnan(s.ssim) else repr(s.ssim),
            "" if s is None else str(s.identical).lower(),
            r.error or "",
        ])
    _write_atomically(path, buffer.getvalue(), "csv")


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


def _histogram(values: list[float], bins: int = 20) -> str:
    if not values:
        return "<p>No finite PSNR values.</p>"
    lo, hi = math.floor(min(values)), math.ceil(max(values))
    hi = max(hi, lo + 1)
    counts, edges = np.histogram(values, bins=bins, range=(lo, hi))
    width, height, pad = 600, 160, 24
    bar = (width - 2 * pad) / bins
    top = max(int(counts.max()), 1)
    bars = []
    for i, c in enumerate(counts):
        h = (height - 2 * pad) * int(c) / top
        x, y = pad + i * bar, height - pad - h
        bars.append(
            f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar - 1:.1f}" height="{h:.1f}" fill="#4a78b5">'
            f"<title>{edges[i]:.2f}–{edges[i + 1]:.2f} dB: {int(c)}</title></rect>"
        )
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
