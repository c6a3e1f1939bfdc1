"""`derestore eval`: PSNR/SSIM of predictions against ground truths, as the papers compute them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from .common import console, emit_json, exit_on_error, say

if TYPE_CHECKING:
    from ..evaluate import PairResult, Pairing, Summary

# Kept here, not imported from derestore.metrics, so that `derestore --help`
# does not pay for numpy and OpenCV; tests check the names agree.
PROTOCOL_NAMES = ("restormer", "rcdnet", "gopro", "rgb")
PROTOCOL_HELP = (
    "Which paper's evaluation script to reproduce. [bold]restormer[/]: rounded Y, Wang SSIM "
    "(Rain100/Rain200/SPA-Data/Test1200/Test2800; Restormer, MPRNet, DRSformer, DeRestormer). "
    "[bold]rcdnet[/]: unrounded Y, SSIM with downsampling (DID-Data, DDN-Data). "
    "[bold]gopro[/]: MATLAB psnr/ssim on RGB (GoPro, HIDE deblurring). "
    "[bold]rgb[/]: plain PSNR/SSIM on all channels."
)
MATCH_HELP = (
    "Regular expression searched in each file stem (both sides); the pairing key is its 'key' group, "
    "else its first group, else the whole match; stems it does not match keep their name. "
    "Example for Rain200H's norain-1x2.png ↔ norain-1.png: --match '(norain-\\d+)'"
)


def register(app: typer.Typer) -> None:
    app.command(name="eval")(eval_command)


def eval_command(
    gt: Path = typer.Option(..., "--gt", help="Ground-truth folder (or one image).", show_default=False),
    pred: Path = typer.Option(..., "--pred", help="Prediction folder (or one image).", show_default=False),
    protocol: str = typer.Option("restormer", "--protocol", "-p", help=PROTOCOL_HELP),
    crop_border: int = typer.Option(0, "--crop-border", help="Pixels cut from every side before scoring."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per pair on stdout, then the means."),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="Write per-image values to this CSV file.",
                                            show_default=False),
    per_image: bool = typer.Option(False, "--per-image", help="List every pair in the table, not only the means."),
    report_path: Optional[Path] = typer.Option(None, "--report",
                                               help="Write a self-contained HTML report. Example: --report eval.html",
                                               show_default=False),
    match: Optional[str] = typer.Option(None, "--match", help=MATCH_HELP, show_default=False),
    workers: int = typer.Option(0, "--workers", help="Pairs scored at once; 0 = one per CPU core."),
) -> None:
    """Score predictions against ground truths with PSNR and SSIM, exactly as the papers' MATLAB scripts do.

    Files pair by name (stem; extensions may differ). Unmatched files, unreadable files and size mismatches are listed and make the exit code 1; the other pairs are still scored.

    Example: derestore eval --gt Rain100L/target --pred restored/ --protocol restormer --per-image
    """
    with exit_on_error():
        summary = _run(gt, pred, protocol, crop_border, json_out, csv_path, per_image, report_path, match, workers)
    raise typer.Exit(summary.exit_code)


def _run(
    gt: Path,
    pred: Path,
    protocol: str,
    crop_border: int,
    json_out: bool,
    csv_path: Path | None,
    per_image: bool,
    report_path: Path | None,
    match: str | None,
    workers: int,
) -> Summary:
    from rich.progress import Progress

    from .. import api
    from ..errors import UsageError

    if workers < 0:  # the library's None (one per core) is the command line's 0
        raise UsageError(f"--workers {workers}: must be 0 (one per CPU core) or more")

    # Only on a terminal: logs and pipes get the results, not redraws.
    progress = Progress(console=console, transient=True, disable=not console.is_terminal)
    task = progress.add_task("scoring", total=None)

    def on_pairing(pairing: Pairing) -> None:
        for path in pairing.unmatched_gt:
            say("unmatched", f"no prediction for {path}")
        for path in pairing.unmatched_pred:
            say("unmatched", f"no ground truth for {path}")
        for message in pairing.ambiguous:
            say("ambiguous", message)
        progress.update(task, total=len(pairing.pairs))

    def on_result(result: PairResult) -> None:
        progress.advance(task)
        if result.error is not None:
            say("failed", result.error)
        elif result.score is not None:
            for note in result.score.warnings:
                say("warning", f"{result.pair.name}: {note}")
        if json_out:
            emit_json(result.record())

    with progress:
        summary = api.evaluate(gt, pred, protocol=protocol, crop_border=crop_border, csv=csv_path,
                               report=report_path, match=match, workers=workers or None,
                               on_pairing=on_pairing, on_result=on_result)
    for note in summary.warnings:
        say("warning", note)
    if json_out:
        emit_json(summary.record())
    else:
        _print_table(summary, per_image)
    if report_path is not None:
        say(None, f"report written to {report_path}")
    return summary


def _print_table(summary: Summary, per_image: bool) -> None:
    from rich.markup import escape
    from rich.table import Table

    table = Table(title=f"protocol {summary.protocol}, crop border {summary.crop_border}")
    table.add_column("image")
    table.add_column("PSNR (dB)", justify="right")
    table.add_column("SSIM", justify="right")
    if per_image:
        for r in summary.results:
            if r.score is None:
                table.add_row(escape(r.pair.name), "[red]failed[/]", "")
            else:
                table.add_row(escape(r.pair.name), _number(r.score.psnr, 4), _number(r.score.ssim, 4))
        table.add_section()
    means = summary.means
    # Six decimals: what the MATLAB scripts print (%f), so papers' numbers can be compared digit by digit.
    label = f"mean of {means.count}"
    if means.identical:
        label += f" (PSNR of {means.count - means.identical}: identical pairs left out)"
    table.add_row(f"[bold]{label}[/]", _number(means.psnr, 6), _number(means.ssim, 6))
    console.print(table)


def _number(value: float | None, digits: int) -> str:
    if value is None or value != value:  # missing or nan
        return "–"
    if value == float("inf"):
        return "inf (identical)"
    return f"{value:.{digits}f}"

