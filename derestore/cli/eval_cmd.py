"""`derestore eval`: PSNR/SSIM of predictions against ground truths, as the papers compute them."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Optional

import typer

from .common import console, emit_json, exit_on_error, say

if TYPE_CHECKING:
    from rich.table import Table

    from ..evaluate import Comparison, PairResult, Pairing, Summary

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
PRED_HELP = (
    "Prediction folder (or one image). Repeat to compare models on the same ground truth, the first "
    "being the baseline: --pred A/ --pred B/. NAME=DIR names a model (default: the folder's name); "
    "NAME= counts only when NAME holds no '/' and the whole argument is no existing path, so give a "
    "folder named a=b as ./a=b."
)
# As derestore.evaluate's BOOTSTRAP_SEED and BOOTSTRAP_RESAMPLES (not imported: see PROTOCOL_NAMES).
DEFAULT_SEED = 0
DEFAULT_RESAMPLES = 10_000


def register(app: typer.Typer) -> None:
    app.command(name="eval")(eval_command)


def eval_command(
    gt: Path = typer.Option(..., "--gt", help="Ground-truth folder (or one image).", show_default=False),
    pred: list[str] = typer.Option(..., "--pred", help=PRED_HELP, metavar="[NAME=]DIR", show_default=False),
    protocol: str = typer.Option("restormer", "--protocol", "-p", help=PROTOCOL_HELP),
    crop_border: int = typer.Option(0, "--crop-border", help="Pixels cut from every side before scoring."),
    json_out: bool = typer.Option(False, "--json", help="One JSON object per pair on stdout, then the means "
                                  "(comparing: one line of means per model, then the comparison)."),
    csv_path: Optional[Path] = typer.Option(None, "--csv", help="Write per-image values to this CSV file.",
                                            show_default=False),
    per_image: bool = typer.Option(False, "--per-image", help="List every pair in the table, not only the means."),
    report_path: Optional[Path] = typer.Option(None, "--report",
                                               help="Write a self-contained HTML report. Example: --report eval.html",
                                               show_default=False),
    match: Optional[str] = typer.Option(None, "--match", help=MATCH_HELP, show_default=False),
    workers: int = typer.Option(0, "--workers", help="Pairs (images, when comparing) scored at once; "
                                "0 = one per CPU core."),
    seed: int = typer.Option(DEFAULT_SEED, "--seed", help="Seed of the comparison's bootstrap intervals."),
    resamples: int = typer.Option(DEFAULT_RESAMPLES, "--resamples",
                                  help="Bootstrap resamples behind each comparison interval (at least 1000)."),
) -> None:
    """Score predictions against ground truths with PSNR and SSIM, exactly as the papers' MATLAB scripts do.

    Files pair by name (stem; extensions may differ). Unmatched files, unreadable files and size mismatches are listed and make the exit code 1; the other pairs are still scored.

    Several --pred compare models image by image against the first: mean difference with a 95% bootstrap interval, wins/ties/losses, largest gains and losses, on the images every folder has.

    Example: derestore eval --gt Rain100L/target --pred restored/ --protocol restormer --per-image

    Example: derestore eval --gt Rain100L/target --pred restormer=out1/ --pred ours=out2/ --report cmp.html
    """
    with exit_on_error():
        result = _run(gt, pred, protocol, crop_border, json_out, csv_path, per_image, report_path, match, workers,
                      seed, resamples)
    raise typer.Exit(result.exit_code)


def _run(
    gt: Path,
    pred: list[str],
    protocol: str,
    crop_border: int,
    json_out: bool,
    csv_path: Path | None,
    per_image: bool,
    report_path: Path | None,
    match: str | None,
    workers: int,
    seed: int,
    resamples: int,
) -> Summary | Comparison:
    from rich.progress import Progress

    from .. import api
    from ..errors import UsageError
    from ..evaluate import Comparison, parse_prediction

    if workers < 0:  # the library's None (one per core) is the command line's 0
        raise UsageError(f"--workers {workers}: must be 0 (one per CPU core) or more")

    # Only on a terminal: logs and pipes get the results, not redraws.
    progress = Progress(console=console, transient=True, disable=not console.is_terminal)
    task = progress.add_task("scoring", total=None)

    specs = [parse_prediction(text) for text in pred]
    # One unnamed --pred is today's single evaluation; several (or a named one) a comparison.
    target = Path(specs[0][1]) if len(specs) == 1 and specs[0][0] is None else specs
    said: set[str] = set()  # a comparison meets the same ground-truth problem once per model
    total = 0

    def once(label: str, message: str) -> None:
        if message not in said:
            said.add(message)
            say(label, message)

    def on_pairing(pairing: Pairing) -> None:
        nonlocal total
        prefix = "" if pairing.model is None else f"{pairing.model}: "
        for path in pairing.unmatched_gt:
            say("unmatched", f"{prefix}no prediction for {path}")
        for path in pairing.unmatched_pred:
            say("unmatched", f"{prefix}no ground truth for {path}")
        for message in pairing.ambiguous:
            once("ambiguous", message)
        total += len(pairing.pairs)
        progress.update(task, total=total)

    def on_result(result: PairResult) -> None:
        progress.advance(task)
        prefix = "" if result.model is None else f"{result.model}: "
        if result.error is not None:
            once("failed", result.error)
        elif result.score is not None:
            for note in result.score.warnings:
                say("warning", f"{prefix}{result.pair.name}: {note}")
        if json_out:
            emit_json(result.record())

    with progress:
        outcome = api.evaluate(gt, target, protocol=protocol, crop_border=crop_border, csv=csv_path,
                               report=report_path, match=match, workers=workers or None, seed=seed,
                               resamples=resamples, on_pairing=on_pairing, on_result=on_result)
    summaries = outcome.summaries if isinstance(outcome, Comparison) else [outcome]
    for summary in summaries:
        prefix = "" if summary.model is None else f"{summary.model}: "
        for note in summary.warnings:
            say("warning", prefix + note)
    if json_out:
        for summary in summaries:
            emit_json(summary.record())
        if isinstance(outcome, Comparison):
            emit_json(outcome.record())
    elif isinstance(outcome, Comparison):
        _print_comparison(outcome, per_image)
    else:
        _print_table(outcome, per_image)
    if report_path is not None:
        say(None, f"report written to {report_path}")
    return outcome


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



def _print_comparison(comparison: Comparison, per_image: bool) -> None:
    """One table with a PSNR/SSIM column pair per model, then each model against the baseline."""
    from rich.markup import escape
    from rich.table import Table

    from ..evaluate import CONFIDENCE, TIE_TOLERANCE

    labels = comparison.labels
    table = Table(title=f"protocol {comparison.protocol}, crop border {comparison.crop_border}")
    table.add_column("image", overflow="fold")  # several models leave names little room: wrap, never cut
    for label in labels:
        table.add_column(f"{escape(label)} PSNR", justify="right", overflow="fold")
        table.add_column(f"{escape(label)} SSIM", justify="right", overflow="fold")
    if per_image:
        for row in comparison.rows:
            cells = []
            for label in labels:
                r = row.results.get(label)
                if r is None:
                    cells += ["[dim]missing[/]", ""]
                elif r.score is None:
                    cells += ["[red]failed[/]", ""]
                else:
                    cells += [_number(r.score.psnr, 4), _number(r.score.ssim, 4)]
            table.add_row(escape(row.name), *cells)
        table.add_section()
    # Six decimals: what the MATLAB scripts print (%f), so papers' numbers can be compared digit by digit.
    table.add_row("[bold]mean[/]", *(_number(v, 6) for s in comparison.summaries for v in (s.means.psnr, s.means.ssim)))
    table.add_row("pairs", *(v for s in comparison.summaries for v in (str(s.means.count), "")))
    n = len(comparison.compared)
    if any(s.means.count != n for s in comparison.summaries):  # the means above cover other images
        table.add_row(f"[bold]mean of {n} in all[/]",
                      *(_number(v, 6) for m in comparison.means.values() for v in (m.psnr, m.ssim)))
    _print_whole(table)

    aside = []
    if comparison.not_in_all:
        aside.append(f"{comparison.not_in_all} missing from some folder")
    if comparison.failed_in_some:
        aside.append(f"{comparison.failed_in_some} failed for some model")
    scope = f"{_count(n, 'image')} in all {len(labels)} folders" + (f" (left out: {', '.join(aside)})" if aside else "")
    if not comparison.models:
        say(None, f"one model ({labels[0]}): nothing to compare; give a second --pred")
        return
    base = comparison.baseline
    against = Table(
        title=escape(f"against {base} (baseline), on {scope}"),
        caption=escape(
            f"mean per-image difference (model − {base}) [{CONFIDENCE:.0%} percentile bootstrap interval, "
            f"{comparison.resamples} resamples, seed {comparison.seed}]; W/T/L: wins/ties/losses, a tie being "
            f"|ΔPSNR| < {_plain(TIE_TOLERANCE['psnr'])} dB, |ΔSSIM| < {_plain(TIE_TOLERANCE['ssim'])}"
        ),
    )
    against.add_column("model", overflow="fold")
    for heading in ("ΔPSNR (dB) [95% CI]", "W/T/L", "ΔSSIM [95% CI]", "W/T/L"):
        against.add_column(escape(heading), justify="right", overflow="fold")
    for model in comparison.models:
        cells = []
        for diff, digits in ((model.psnr, 3), (model.ssim, 4)):
            interval = "" if diff.ci is None else f" [{diff.ci[0]:+.{digits}f}, {diff.ci[1]:+.{digits}f}]"
            cells += [escape(_signed(diff.mean, digits) + interval), f"{diff.wins}/{diff.ties}/{diff.losses}"]
        against.add_row(escape(model.model), *cells)
    _print_whole(against)
    for model in comparison.models:
        gains = ", ".join(f"{name} {d:+.3f} dB" for name, d in model.psnr.largest_gains()) or "none"
        losses = ", ".join(f"{name} {d:+.3f} dB" for name, d in model.psnr.largest_losses()) or "none"
        say(None, f"{model.model}: largest PSNR gains: {gains}; largest losses: {losses}")
        if model.psnr.left_out:
            say("note", f"{model.model}: {_count(model.psnr.left_out, 'image')} identical to the ground truth for "
                "one model or both: counted as wins/ties, left out of the ΔPSNR mean and interval")


def _print_whole(table: Table) -> None:
    """A terminal gets the table at its width (cells wrap, never cut); a log or a pipe gets it whole."""
    if not console.is_terminal:
        whole = console.measure(table, options=console.options.update_width(1 << 16)).maximum
        table.width = whole if whole > console.width else None
    console.print(table, crop=False)


def _signed(value: float | None, digits: int) -> str:
    return "–" if value is None else f"{value:+.{digits}f}"


def _plain(value: float) -> str:
    """0.00005, not 5e-05."""
    return f"{value:.10f}".rstrip("0")


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" if n == 1 else f"{n} {noun}s"
