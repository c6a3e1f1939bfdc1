"""Task commands (`derestore derain|desnow|dehaze|deblur|denoise …`), one per registry task."""

from __future__ import annotations

import signal
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, List, Optional

import typer

from ..registry import TaskRecord
from .common import console, emit_json, exit_on_error

TILING_HELP = (
    "How large images are split. [bold]blend[/]: derestore's tiles with overlap context and "
    "feathered seams (exact for convolutional models). [bold]published[/]: the paper's own test "
    "protocol, to reproduce its numbers (DeRestormer: square windows of --tile px; others: the whole image)."
)
TILE_HELP = (
    "Tile size in pixels; 0 = the whole image at once; auto = the largest tile that fits the free memory "
    "(GPU: measured per model at start-up). Default: the model's hint (e.g. 512, DeRestormer 256). "
    "Tiles bound memory; models with global attention or pooling (Restormer, DRSformer, MPRNet) then give "
    "slightly tile-size-dependent results — use --tile 0 when the image fits in memory."
)


@contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """A scheduler's SIGTERM stops the batch the same clean way as Ctrl-C."""
    previous = signal.signal(signal.SIGTERM, signal.default_int_handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def make_task_command(task: TaskRecord):  # noqa: ANN201 - returns a Typer callback
    def command(
        inputs: Optional[List[str]] = typer.Argument(None, help="Image files, folders or glob patterns (quote globs).",
                                                     show_default=False),
        output: Path = typer.Option(Path("restored"), "-o", "--output",
                                    help="Output folder (created), or a file name when there is one input. Example: -o out/"),
        recursive: bool = typer.Option(False, "-r", "--recursive", help="Descend into sub-folders of folder inputs."),
        from_list: Optional[str] = typer.Option(None, "--from-list",
                                                help="Also read input paths from this file, one per line ('-' = stdin)."),
        keep_tree: bool = typer.Option(False, "--keep-tree",
                                       help="Mirror the input folders under the output folder (avoids name clashes)."),
        model: Optional[str] = typer.Option(None, "-m", "--model",
                                            help=f"Registry model name (see `derestore models`). Default: {task.default}."),
        weights: Optional[Path] = typer.Option(None, "--weights",
                                               help="Use this checkpoint file instead; its architecture is detected. Example: --weights net.pth"),
        tile: Optional[str] = typer.Option(None, "--tile", help=TILE_HELP, show_default=False),
        overlap: Optional[int] = typer.Option(None, "--overlap",
                                              help="Context pixels on each side of a seam between tiles (default: model hint, 32)."),
        tiling: str = typer.Option("blend", "--tiling", help=TILING_HELP),
        batch_size: int = typer.Option(4, "--batch-size", help="Tiles per forward pass. Example: --batch-size 8"),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N. auto picks the GPU when there is one."),
        precision: str = typer.Option("auto", "--precision",
                                      help="auto | fp32 | fp16 | bf16. auto: fp32 on CPU; on GPU a half type only where the architecture is known to be accurate in it."),
        layout: str = typer.Option("auto", "--layout",
                                   help="auto | channels_last | contiguous memory layout. auto: channels_last where it measured faster for the architecture."),
        compile_model: bool = typer.Option(False, "--compile",
                                           help="Run the network through torch.compile: slow first image (the cost is printed), faster after; pays off on long batches of one size."),
        ext: Optional[str] = typer.Option(None, "--ext", help="Output format (png, jpg, webp, tif, bmp). Default: the input's format."),
        suffix: str = typer.Option("", "--suffix", help="Appended to each output's stem. Example: --suffix _derained"),
        skip_existing: bool = typer.Option(False, "--skip-existing",
                                           help="Skip inputs whose output already exists (resume an interrupted batch)."),
        shard: Optional[str] = typer.Option(None, "--shard",
                                            help="Process only part K of N of the sorted inputs, K from 0. Example: --shard $SLURM_ARRAY_TASK_ID/8"),
        fail_fast: bool = typer.Option(False, "--fail-fast", help="Stop at the first input that fails."),
        max_pixels: Optional[int] = typer.Option(None, "--max-pixels",
                                                 help="Refuse larger images (decompression-bomb guard; 0 = no limit)."),
        gt: Optional[Path] = typer.Option(None, "--gt",
                                          help="Score each output against the same-named image in this folder (PSNR/SSIM)."),
        protocol: str = typer.Option("restormer", "--protocol",
                                     help="Metrics protocol for --gt: restormer, rcdnet, gopro or rgb (see `derestore eval --help`)."),
        crop_border: int = typer.Option(0, "--crop-border", help="Pixels cropped from each border before scoring (--gt)."),
        json_out: bool = typer.Option(False, "--json", help="One JSON object per image on stdout, then a summary object."),
        quiet: bool = typer.Option(False, "-q", "--quiet", help="Print only errors."),
    ) -> None:
        import time

        from .. import __version__, api, imageio
        from ..pipeline import manifest_path, write_manifest

        counts = {"ok": 0, "skipped": 0, "failed": 0}
        interrupted = False
        started = time.perf_counter()
        with exit_on_error():
            if max_pixels is not None and max_pixels < 0:
                from ..errors import UsageError

                raise UsageError(f"--max-pixels {max_pixels}: must be 0 (no limit) or positive")
            tile = api.check_tiling(tile, overlap, tiling)
            jobs = api.plan(inputs or [], output, recursive=recursive, ext=ext, suffix=suffix, keep_tree=keep_tree,
                            from_list=from_list, shard=shard)
            truth = api.GroundTruth.open(gt, protocol, crop_border) if gt is not None else None
            loaded = api.load(task=task.name, model=model, weights=weights, device=device,
                              precision=precision, batch_size=batch_size, layout=layout, compile=compile_model)
            if not quiet:
                console.print(f"model {loaded.name} ({loaded.arch}) on {loaded.engine.device} "
                              f"in {loaded.engine.precision}; {len(jobs)} input(s)")
            limit = imageio.DEFAULT_MAX_PIXELS if max_pixels is None else (max_pixels or None)
            results = api.restore(jobs, model=loaded, tile=tile, overlap=overlap, tiling=tiling, max_pixels=limit,
                                  skip_existing=skip_existing, fail_fast=fail_fast, score=truth)
            try:
                with sigterm_as_interrupt():
                    for result in results:
                        counts[result.status] += 1
                        if result.status == "failed":
                            console.print(f"[red]failed:[/] {result.error}")
                        elif not quiet and not json_out:
                            verb = "skipped (exists)" if result.status == "skipped" else f"({result.seconds:.2f} s)"
                            if result.metrics and result.metrics.get("ssim") is not None:
                                psnr = result.metrics["psnr"]
                                verb += f"  PSNR {'inf' if psnr is None else f'{psnr:.2f}'} dB  SSIM {result.metrics['ssim']:.4f}"
                            console.print(f"{result.input} → {result.output} {verb}")
                        for note in result.notes:
                            console.print(f"[yellow]note:[/] {note}")
                        if json_out:
                            record = result.record()
                            record.update(model=loaded.name, sha256=loaded.sha256)
                            emit_json(record)
            except KeyboardInterrupt:
                interrupted = True
            elapsed = time.perf_counter() - started
            summary: dict[str, object] = {**counts, "total": len(jobs), "seconds": round(elapsed, 3),
                                          "model": loaded.name, "interrupted": interrupted}
            if truth is not None and truth.means is not None:
                summary["metrics"] = truth.means.record(protocol)
                for warning in truth.means.warnings():
                    console.print(f"[yellow]note:[/] {warning}")
                if truth.unmatched:
                    console.print(f"[yellow]note:[/] {len(truth.unmatched)} output(s) have no ground truth in {gt}: "
                                  + ", ".join(p.name for p in truth.unmatched[:5]))
                if not quiet and truth.means.count:
                    psnr, ssim = truth.means.psnr, truth.means.ssim
                    console.print(f"mean over {truth.means.count} ({protocol}): PSNR "
                                  f"{'inf' if psnr is None else f'{psnr:.4f}'} dB, SSIM "
                                  f"{'n/a' if ssim is None else f'{ssim:.4f}'}")
            write_manifest(manifest_path(output, shard), {
                "version": __version__,
                "task": task.name,
                "model": loaded.name,
                "arch": loaded.arch,
                "checkpoint": str(loaded.checkpoint),
                "sha256": loaded.sha256,
                "device": str(loaded.engine.device),
                "precision": loaded.engine.precision,
                "options": {"tile": tile if tile is not None else loaded.tile,
                            "overlap": overlap if overlap is not None else loaded.overlap,
                            "tiling": tiling, "batch_size": batch_size, "layout": layout,
                            "channels_last": loaded.engine.channels_last, "compile": compile_model, "ext": ext, "suffix": suffix,
                            "keep_tree": keep_tree, "skip_existing": skip_existing, "shard": shard,
                            "max_pixels": limit},
                "counts": summary,
            })
            if json_out:
                emit_json({"summary": summary})
            if interrupted:
                console.print(f"[yellow]interrupted:[/] {counts['ok']} done, "
                              f"{len(jobs) - sum(counts.values())} not started; rerun with --skip-existing to finish")
                raise typer.Exit(130)
            if not quiet:
                colour = "yellow" if counts["failed"] else "green"
                console.print(f"[{colour}]{counts['ok']} restored, {counts['skipped']} skipped, "
                              f"{counts['failed']} failed in {elapsed:.1f} s → {output}[/]")
        if counts["failed"]:
            raise typer.Exit(1)

    command.__doc__ = (
        f"{task.summary.capitalize()} (default model: {task.default}).\n\n"
        f"Example: derestore {task.name} photos/ -o restored/ --tile 512"
    )
    return command


def register(app: typer.Typer, tasks: list[TaskRecord]) -> None:
    for task in tasks:
        app.command(name=task.name)(make_task_command(task))


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
