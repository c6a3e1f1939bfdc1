"""Task commands (`derestore derain|desnow|dehaze|deblur|denoise …`), one per registry task."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..registry import TaskRecord
from .common import console, emit_json, exit_on_error

TILING_HELP = (
    "How large images are split. [bold]blend[/]: derestore's tiles with overlap context and "
    "feathered seams (exact for convolutional models). [bold]published[/]: the model's own paper "
    "protocol, to reproduce its numbers (DeRestormer: square windows of --tile px; others: the whole image)."
)
TILE_HELP = (
    "Tile size in pixels; 0 = the whole image at once. Default: the model's hint (e.g. 512, DeRestormer 256). "
    "Tiles bound memory; models with global attention or pooling (Restormer, DRSformer, MPRNet) then give "
    "slightly tile-size-dependent results — use --tile 0 when the image fits in memory."
)


def _summary_line(ok: int, failed: int, seconds: float, out: Path) -> str:
    text = f"{ok} restored, {failed} failed in {seconds:.1f} s → {out}"
    return f"[green]{text}[/]" if not failed else f"[yellow]{text}[/]"


def make_task_command(task: TaskRecord):  # noqa: ANN201 - returns a Typer callback
    def command(
        inputs: List[str] = typer.Argument(..., help="Image files, folders or glob patterns (quote globs).", show_default=False),
        output: Path = typer.Option(Path("restored"), "-o", "--output",
                                    help="Output folder (created), or a file name when there is one input. Example: -o out/"),
        recursive: bool = typer.Option(False, "-r", "--recursive", help="Descend into sub-folders of folder inputs."),
        model: Optional[str] = typer.Option(None, "-m", "--model",
                                            help=f"Registry model name (see `derestore models`). Default: {task.default}."),
        weights: Optional[Path] = typer.Option(None, "--weights",
                                               help="Use this checkpoint file instead; its architecture is detected. Example: --weights net.pth"),
        tile: Optional[int] = typer.Option(None, "--tile", help=TILE_HELP, show_default=False),
        overlap: Optional[int] = typer.Option(None, "--overlap",
                                              help="Context pixels on each side of a seam between tiles (default: model hint, 32)."),
        tiling: str = typer.Option("blend", "--tiling", help=TILING_HELP),
        batch_size: int = typer.Option(4, "--batch-size", help="Tiles per forward pass. Example: --batch-size 8"),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N. auto picks the GPU when there is one."),
        precision: str = typer.Option("auto", "--precision",
                                      help="auto | fp32 | fp16 | bf16. auto: fp32 on CPU; on GPU a half type only where the architecture is known to be accurate in it."),
        ext: Optional[str] = typer.Option(None, "--ext", help="Output format (png, jpg, webp, tif, bmp). Default: the input's format."),
        suffix: str = typer.Option("", "--suffix", help="Appended to each output's stem. Example: --suffix _derained"),
        json_out: bool = typer.Option(False, "--json", help="One JSON object per image on stdout, then a summary object."),
        quiet: bool = typer.Option(False, "-q", "--quiet", help="Print only errors."),
    ) -> None:
        import time

        from .. import api

        with exit_on_error():
            started = time.perf_counter()
            loaded = api.load(task=task.name, model=model, weights=weights, device=device,
                              precision=precision, batch_size=batch_size)
            if not quiet:
                console.print(f"model {loaded.name} ({loaded.arch}) on {loaded.engine.device} in {loaded.engine.precision}")
            results = api.restore(inputs, output, model=loaded, recursive=recursive, ext=ext, suffix=suffix,
                                  tile=tile, overlap=overlap, tiling=tiling)
            ok = failed = 0
            for result in results:
                if result.status == "ok":
                    ok += 1
                    if not quiet and not json_out:
                        console.print(f"{result.input} → {result.output} ({result.seconds:.2f} s)")
                else:
                    failed += 1
                    console.print(f"[red]failed:[/] {result.error}")
                for note in result.notes:
                    console.print(f"[yellow]note:[/] {result.input}: {note}")
                if json_out:
                    record = result.record()
                    record.update(model=loaded.name, sha256=loaded.sha256)
                    emit_json(record)
            elapsed = time.perf_counter() - started
            if json_out:
                emit_json({"summary": {"ok": ok, "failed": failed, "total": ok + failed,
                                       "seconds": round(elapsed, 3), "model": loaded.name}})
            if not quiet:
                console.print(_summary_line(ok, failed, elapsed, output))
        if failed:
            raise typer.Exit(1)

    command.__doc__ = (
        f"{task.summary.capitalize()} (default model: {task.default}).\n\n"
        f"Example: derestore {task.name} photos/ -o restored/ --tile 512"
    )
    return command


def register(app: typer.Typer, tasks: list[TaskRecord]) -> None:
    for task in tasks:
        app.command(name=task.name, help=None)(make_task_command(task))


def task_records() -> list[TaskRecord]:
    """Tasks for the command list: the merged registry, or the built-in one if a user file is broken
    (the error then surfaces when a task runs)."""
    from ..errors import UsageError
    from ..registry import load_registry

    try:
        registry = load_registry()
    except UsageError:
        registry = load_registry(extra=[])
    return sorted(registry.tasks.values(), key=lambda t: t.name)
