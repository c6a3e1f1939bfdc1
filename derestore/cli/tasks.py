"""Task commands (`derestore derain|desnow|dehaze|deblur|denoise …`), one per registry task."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from ..registry import TaskRecord
from .common import exit_on_error, show_library_logs
from .run_display import RunDisplay

TILING_HELP = (
    "How large images are split. [bold]blend[/]: derestore's tiles with overlap context and "
    "feathered seams (exact for convolutional models). [bold]published[/]: the paper's own test "
    "protocol, to reproduce its numbers (DeRestormer: square windows of --tile px; others: the whole image)."
)
TILE_HELP = (
    "Tile size in pixels; 0 = the whole image at once; auto = the largest tile that fits the free memory "
    "(GPU: measured per model at start-up). Default: the model's hint (e.g. 512, DeRestormer 256). "
    "Tiles bound memory; under --stats local each tile also carries the context its statistics need, so "
    "tiles give the whole image's result."
)
STATS_HELP = (
    "auto | local | global statistics of attention and pooling layers. local: over a window around each "
    "pixel (TLC), so tiles equal the whole image; global: the published network. auto: per checkpoint "
    "(`derestore models` shows it), global with --tiling published."
)


RAY_HELP = (
    "Run on Ray (pip install 'derestore[ray]'): local (a Ray instance on this machine), auto (the cluster of "
    "RAY_ADDRESS / `ray start`) or ray://HOST:PORT. One model replica per GPU; same outputs and run record."
)


def make_task_command(task: TaskRecord):  # noqa: ANN201 - returns a Typer callback
    def command(
        inputs: Optional[List[str]] = typer.Argument(None, help="Image or video files, folders or glob patterns (quote globs).",
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
        stats: str = typer.Option("auto", "--stats", help=STATS_HELP),
        stats_window: Optional[int] = typer.Option(None, "--stats-window",
                                                   help="Side in pixels of the local-statistics window (default: "
                                                        "the model's record, else 1.5 × its training crop).",
                                                   show_default=False),
        batch_size: Optional[int] = typer.Option(None, "--batch-size",
                                                 help="Tiles (or small video frames) per forward pass. Default: 1 "
                                                      "with PyTorch on a CPU, where batches measured slower; else 4.",
                                                 show_default=False),
        device: str = typer.Option("auto", "--device", help="auto | cpu | cuda | cuda:N | mps; several GPUs: cuda:all or cuda:0,1,3 (one model replica per GPU, one queue of inputs). auto: CUDA, else Apple MPS, else CPU."),
        precision: str = typer.Option("auto", "--precision",
                                      help="auto | fp32 | fp16 | bf16. auto: fp32 on CPU, with --gt and with --tiling published; on a GPU the half type measured accurate (>= 45 dB against fp32) for this checkpoint by a one-time probe, else fp32."),
        layout: str = typer.Option("auto", "--layout",
                                   help="auto | channels_last | contiguous memory layout. auto: channels_last where it measured faster for the architecture."),
        compile_model: bool = typer.Option(False, "--compile",
                                           help="Run the network through torch.compile: slow first image (the cost is printed), faster after; pays off on long batches of one size."),
        backend: str = typer.Option("auto", "--backend",
                                    help="auto | torch | onnxruntime. auto: ONNX Runtime (fp32) where this checkpoint's ONNX export was verified against PyTorch (max abs diff <= 1e-4) and measured faster on this machine (once, cached), else PyTorch."),
        ext: Optional[str] = typer.Option(None, "--ext", help="Output format of images (png, jpg, webp, tif, bmp). Default: the input's format; clips keep their container."),
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
        video_codec: Optional[str] = typer.Option(None, "--video-codec",
                                                  help="Encoder of restored clips (libx264, libx265, libvpx-vp9, ffv1…). "
                                                       "Default: H.264 (VP9 for .webm).", show_default=False),
        crf: Optional[int] = typer.Option(None, "--crf", help="Constant quality of restored clips (lower is better; "
                                                               "default near visually lossless: x264 18, VP9 24).",
                                          show_default=False),
        bitrate: Optional[str] = typer.Option(None, "--bitrate", help="Target bitrate of restored clips instead of "
                                                                      "--crf. Example: --bitrate 8M", show_default=False),
        frames_dir: bool = typer.Option(False, "--frames-dir",
                                        help="Write each clip as a folder of numbered PNG frames (OUT/<clip>/000001.png…) "
                                             "instead of a video."),
        temporal: bool = typer.Option(False, "--temporal",
                                      help="Smooth frame-to-frame flicker of restored clips where the input stands still."),
        ray: Optional[str] = typer.Option(None, "--ray", help=RAY_HELP, show_default=False),
        ray_workers: Optional[int] = typer.Option(None, "--ray-workers",
                                                  help="Model replicas on a CPU-only Ray cluster (default: its CPUs / "
                                                       "threads per replica; with GPUs: one per GPU).",
                                                  show_default=False),
        json_out: bool = typer.Option(False, "--json", help="One JSON object per image on stdout, then a summary object."),
        quiet: bool = typer.Option(False, "-q", "--quiet", help="Print only errors."),
    ) -> None:
        from .. import api, imageio
        from ..tiled_engine import cpu_threads
        from .download_progress import download_progress

        show_library_logs(quiet)
        display = RunDisplay(quiet=quiet, json_out=json_out)
        with exit_on_error(), download_progress() as progress, display:
            report = api.run(
                inputs or [], output, task=task.name, model=model, weights=weights, recursive=recursive,
                from_list=from_list, keep_tree=keep_tree, ext=ext, suffix=suffix, tile=tile, overlap=overlap,
                tiling=tiling, stats=stats, stats_window=stats_window, batch_size=batch_size, device=device, precision=precision, layout=layout,
                compile=compile_model, backend=backend, skip_existing=skip_existing, shard=shard, fail_fast=fail_fast,
                max_pixels=imageio.DEFAULT_MAX_PIXELS if max_pixels is None else max_pixels,
                gt=gt, protocol=protocol, crop_border=crop_border, threads=cpu_threads(), tune_kernels=True, video_codec=video_codec, crf=crf, bitrate=bitrate,
                frames_dir=frames_dir, temporal=temporal, ray=ray,
                ray_workers=ray_workers, on_event=display, download_progress=progress,
            )
        display.summary(report, output, protocol)
        raise typer.Exit(report.exit_code)

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
