"""What a task command shows of a run: its events as lines, JSON records and, on a terminal, progress bars.

On a terminal (stderr a TTY, not --quiet, not --json) a live display sits
under the per-image lines: images done of all, failures, megapixels per
second, elapsed time and ETA, and, while a large image is restored, a second
bar with its tiles, so that a single huge image shows movement within
seconds. Anywhere else nothing is redrawn: one line per event, no carriage
returns.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from .common import console, emit_json, say

if TYPE_CHECKING:
    from rich.progress import Progress, TaskID

    from ..pipeline import Result
    from ..runner import Event, RunReport

# An image of at least this many tiles gets a bar of its own.
TILE_BAR_FROM = 4


class RunDisplay:
    """Call it with each event of `derestore.run`; use it as a context manager around the run."""

    def __init__(self, *, quiet: bool, json_out: bool) -> None:
        self.quiet = quiet
        self.json_out = json_out
        # The model's name and digest for the JSON records, not the model: a display that outlives the run
        # must not keep its network (and an ONNX Runtime session) alive until the interpreter shuts down.
        self.model_keys: dict[str, Any] = {}
        self.live = console.is_terminal and not console.is_dumb_terminal and not quiet and not json_out
        self.progress: Progress | None = None
        self.images: TaskID | None = None
        self.tiles: TaskID | None = None
        self.megapixels = 0.0
        self.failed = 0

    def __enter__(self) -> RunDisplay:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.progress is not None:
            self.progress.stop()
            self.progress = None

    def __call__(self, event: Event) -> None:
        from ..runner import Finished, Frames, Loaded, Planned, Started, Tiles

        if isinstance(event, Planned):
            self._start(len(event.jobs))
        elif isinstance(event, Loaded):
            self.model_keys = {"model": event.model.name, "sha256": event.model.sha256}
            if self.progress is not None and self.images is not None:
                self.progress.start_task(self.images)
            if not self.quiet:
                say(None, f"model {event.model.name} ({event.model.arch}) on {event.where}")
        elif isinstance(event, Started):
            self._image_started(event.job.input.name, event.width, event.height)
        elif isinstance(event, Tiles):
            self._tiles(event.job.input.name, event.done, event.total)
        elif isinstance(event, Frames):
            self._frames(event.done, event.total)
        elif isinstance(event, Finished):
            self._finished(event.result)

    # ------------------------------------------------------------ live display

    def _start(self, total: int) -> None:
        if not self.live:
            return
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, \
            TimeElapsedColumn, TimeRemainingColumn

        self.progress = Progress(
            SpinnerColumn(), TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
            TextColumn("{task.fields[extra]}"), TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=console, transient=True,
        )
        # The clock starts when the model is ready: loading is not throughput.
        self.images = self.progress.add_task("images", total=total, extra="", start=False)
        self.progress.start()

    def _image_started(self, name: str, width: int, height: int) -> None:
        if self.progress is None:
            return
        self._drop_tiles()
        # Shown at once, before any tile is done: a huge image is visibly being worked on.
        self.tiles = self.progress.add_task(f"  {name} ({width}×{height})", total=None, extra="tiles")

    def _tiles(self, name: str, done: int, total: int) -> None:
        if self.progress is None or self.tiles is None:
            return
        if total < TILE_BAR_FROM:
            self._drop_tiles()
            return
        self.progress.update(self.tiles, completed=done, total=total)

    def _frames(self, done: int, total: int | None) -> None:
        if self.progress is not None and self.tiles is not None:
            self.progress.update(self.tiles, completed=done, total=total, extra="frames")

    def _drop_tiles(self) -> None:
        if self.progress is not None and self.tiles is not None:
            self.progress.remove_task(self.tiles)
            self.tiles = None

    def _advance(self, result: Result) -> None:
        if self.progress is None or self.images is None:
            return
        self._drop_tiles()
        if result.status == "ok" and result.width and result.height:
            frames = int(result.clip["frames"]) if result.clip else 1  # type: ignore[call-overload]
            self.megapixels += result.width * result.height * frames / 1e6
        self.failed += result.status == "failed"
        elapsed = self.progress.tasks[self.images].elapsed or 0.0
        rate = f"{self.megapixels / elapsed:.2f} MP/s" if elapsed > 0 and self.megapixels else ""
        failed = f"[red]{self.failed} failed[/]" if self.failed else ""
        self.progress.update(self.images, advance=1, extra="  ".join(x for x in (rate, failed) if x))

    # ------------------------------------------------------------ lines and records

    def _finished(self, result: Result) -> None:
        self._advance(result)
        if result.status == "failed":
            say("failed", result.error or str(result.input))
        elif not self.quiet and not self.json_out:
            verb = "skipped (exists)" if result.status == "skipped" else f"({result.seconds:.2f} s)"
            if result.metrics and result.metrics.get("ssim") is not None:
                psnr = result.metrics["psnr"]
                verb += f"  PSNR {'inf' if psnr is None else f'{psnr:.2f}'} dB  SSIM {result.metrics['ssim']:.4f}"
            say(None, f"{result.input} → {result.output} {verb}")
        for note in result.notes:
            say("note", note)
        if self.json_out:
            record = result.record()
            record.update(self.model_keys)
            emit_json(record)

    def summary(self, report: RunReport, output: Path, protocol: str) -> None:
        self.__exit__()
        for note in report.notes:
            say("note", note)
        metrics = report.metrics
        if metrics and not self.quiet and metrics.get("count"):
            mean: Any = metrics["mean"]
            psnr, ssim = mean["psnr"], mean["ssim"]
            say(None, f"mean over {metrics['count']} ({protocol}): PSNR "
                      f"{'inf' if psnr is None else f'{psnr:.4f}'} dB, SSIM {'n/a' if ssim is None else f'{ssim:.4f}'}")
        if report.record_error:
            say("error", report.record_error)
        if report.stopped:
            say("error", f"{report.stopped}; rerun with --skip-existing to finish")
        if self.json_out:
            summary = report.counts()
            if metrics is not None:
                summary["metrics"] = metrics
            if report.cluster is not None:
                summary["ray"] = report.cluster
            emit_json({"summary": summary})
        if report.interrupted:
            say("interrupted", f"{report.ok} done, {report.not_started} not started; "
                               "rerun with --skip-existing to finish")
        elif not self.quiet:
            colour = "yellow" if report.failed or report.stopped else "green"
            say(None, f"{report.ok} restored, {report.skipped} skipped, {report.failed} failed in "
                      f"{report.seconds:.1f} s → {output}", style=colour)
