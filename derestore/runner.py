"""A whole restore run: validate, plan, load, restore, score, and leave a run record.

`run()` is what `derestore derain …` executes; the CLI only renders the events
it reports and maps the report to an exit code. Every option is checked, and
every output location probed, before the model is loaded. The run record
(`derestore-run.json`) is written whenever work started: after a normal end,
an interrupt (even one during model loading), a device failure or a closed
output stream.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Union

from . import __version__, imageio
from .errors import DerestoreError, DeviceFailure, UsageError
from .pipeline import (Job, Result, check_output_locations, manifest_path, refuse_overwrites,
                       remove_stale_temp_files, run_clip, run_jobs, write_manifest)
from .video import VideoOptions

if TYPE_CHECKING:
    from .api import GroundTruth, Model


@dataclass(frozen=True)
class Planned:
    """The inputs were found and their outputs named; nothing is loaded yet."""

    jobs: list[Job]


@dataclass(frozen=True)
class Loaded:
    """The model is ready; `where` says where it runs, in words (e.g. "cpu in fp32")."""

    model: Model
    where: str


@dataclass(frozen=True)
class Started:
    """The model starts on one input (local runs: Ray workers do not report it)."""

    job: Job
    width: int
    height: int


@dataclass(frozen=True)
class Tiles:
    """`done` of the `total` tiles of the input being restored are done (local runs)."""

    job: Job
    done: int
    total: int


@dataclass(frozen=True)
class Frames:
    """`done` of the `total` frames of a clip are done (`total` None when its container does not say)."""

    job: Job
    done: int
    total: int | None


@dataclass(frozen=True)
class Finished:
    """One input is done: restored, skipped or failed."""

    result: Result


Event = Union[Planned, Loaded, Started, Tiles, Frames, Finished]


@dataclass
class RunReport:
    """What a run did; `exit_code` follows the CLI's convention (0, 1, 130)."""

    total: int = 0
    ok: int = 0
    skipped: int = 0
    failed: int = 0
    seconds: float = 0.0
    interrupted: bool = False
    stopped: str | None = None  # why the run stopped before the end (a device failure), if it did
    model: str | None = None
    threads: int | None = None
    cluster: dict[str, object] | None = None  # the Ray cluster that ran it, if one did
    metrics: dict[str, object] | None = None
    notes: list[str] = field(default_factory=list)
    record: Path | None = None  # the run record, once written
    record_error: str | None = None  # why the run record could not be written

    @property
    def not_started(self) -> int:
        return self.total - self.ok - self.skipped - self.failed

    @property
    def exit_code(self) -> int:
        if self.interrupted:
            return 130
        return 1 if self.failed or self.stopped or self.record_error else 0

    def counts(self) -> dict[str, object]:
        return {"ok": self.ok, "skipped": self.skipped, "failed": self.failed, "total": self.total,
                "seconds": round(self.seconds, 3), "model": self.model, "interrupted": self.interrupted,
                "stopped": self.stopped}


def run(
    inputs: list[str] | str,
    output: str | Path = "restored",
    *,
    task: str | None = None,
    model: str | None = None,
    weights: str | Path | None = None,
    recursive: bool = False,
    from_list: str | None = None,
    keep_tree: bool = False,
    ext: str | None = None,
    suffix: str = "",
    tile: int | str | None = None,
    overlap: int | None = None,
    tiling: str = "blend",
    stats: str = "auto",
    stats_window: int | None = None,
    batch_size: int | None = None,
    device: str = "auto",
    precision: str = "auto",
    layout: str = "auto",
    compile: bool = False,
    skip_existing: bool = False,
    shard: str | None = None,
    fail_fast: bool = False,
    max_pixels: int | None = imageio.DEFAULT_MAX_PIXELS,
    gt: str | Path | None = None,
    protocol: str = "restormer",
    crop_border: int = 0,
    threads: int | None = None,
    tune_kernels: bool = False,
    backend: str = "auto",
    video_codec: str | None = None,
    crf: int | None = None,
    bitrate: str | None = None,
    frames_dir: bool = False,
    temporal: bool = False,
    ray: str | None = None,
    ray_workers: int | None = None,
    on_event: Callable[[Event], None] | None = None,
    download_progress: Callable[[str, int, int | None], None] | None = None,
) -> RunReport:
    """Restore every input into `output` and write the run record; returns what happened.

    The options are those of `plan`, `load`, `restore` and `GroundTruth.open`;
    `max_pixels` 0 or None means no limit. `threads`: the CPU threads (`load`'s: torch's are set
    process-wide, None leaves them as the process has them), `tune_kernels` lets cuDNN autotune
    (both process-wide: only when asked). `precision="auto"` means fp32 for
    `tiling="published"` and for scoring against `gt`, where numbers must be the
    paper's; elsewhere the precision measured accurate for the checkpoint
    (`derestore.precision`). `stats` and `stats_window`: the network's statistics (see
    `load`); `auto` is global for `tiling="published"`. Video clips among the inputs are restored frame by
    frame (`derestore.video`): `video_codec`, `crf` or `bitrate` for the output,
    `frames_dir` for numbered PNG frames instead, `temporal` to smooth flicker;
    `skip_existing` resumes an interrupted clip. `ray` runs the images on a Ray
    cluster ("local", "auto" or "ray://HOST:PORT"; see `derestore.ray`) with
    `ray_workers` model replicas (default: one per GPU, or as many as its CPUs
    allow). `on_event` receives the `Event`s as they happen;
    `download_progress(name, done, total)` follows a checkpoint's download.

    An interrupt (KeyboardInterrupt) ends the run cleanly: finished outputs are
    kept, the record says so, and the report has `interrupted` set. Usage errors
    and an unavailable model raise before anything is written.
    """
    from . import api

    emit = on_event or _ignore
    started = time.perf_counter()
    if threads is not None and threads < 1:
        raise UsageError(f"threads {threads}: must be at least 1")
    if ray is not None:
        from .ray import check_ray_options

        check_ray_options(ray, ray_workers, device)
    elif ray_workers is not None:
        raise UsageError("ray_workers is only meaningful with a Ray address (ray='local', 'auto' or 'ray://…')")
    tile = api.check_tiling(tile, overlap, tiling)
    api.check_statistics(tiling, stats)
    max_pixels = api.check_max_pixels(max_pixels)
    # A Ray run's device is the workers', not this machine's: here only its spelling is checked.
    api.check_engine_options(device=device, precision=precision, layout=layout, batch_size=batch_size,
                             local=ray is None, backend=backend)
    jobs = api.plan(inputs or [], output, recursive=recursive, ext=ext, suffix=suffix, keep_tree=keep_tree,
                    from_list=from_list, shard=shard, frames_dir=frames_dir)
    clip_options = VideoOptions(codec=video_codec, crf=crf, bitrate=bitrate, frames_dir=frames_dir,
                                temporal=temporal, **({"batch": batch_size} if batch_size else {}))
    if any(job.video for job in jobs):
        if ray is not None:
            raise UsageError("video clips are restored on this machine only; run them without ray=")
        clip_options.check()
    truth = api.GroundTruth.open(gt, protocol, crop_border) if gt is not None else None
    if truth is None:
        api.check_protocol(protocol, crop_border)
    else:
        refuse_overwrites(jobs, {truth.folder.resolve(): "the ground-truth folder"})
    record_path: Path | None = manifest_path(Path(output).expanduser(), shard)
    check_output_locations(jobs, record_path)  # type: ignore[arg-type]
    emit(Planned(jobs))

    report = RunReport(total=len(jobs))
    loaded: Model | None = None
    if precision == "auto" and (tiling == "published" or gt is not None):
        precision = "fp32"  # reproducing or measuring a paper's numbers: no half-precision shortcut
    if stats == "auto" and tiling == "published":
        stats = "global"  # the paper's network
    load_options = {"task": task, "model": model, "weights": weights, "device": device, "precision": precision,
                    "batch_size": batch_size, "layout": layout, "compile": compile, "tune_kernels": tune_kernels,
                    "backend": backend, "stats": stats, "stats_window": stats_window,
                    "typical_tile": tile if isinstance(tile, int) else None}
    step_options = {"tile": tile, "overlap": overlap, "tiling": tiling, "max_pixels": max_pixels}
    options = {**load_options, **step_options, "ext": ext, "suffix": suffix, "keep_tree": keep_tree,
               "skip_existing": skip_existing, "shard": shard, "fail_fast": fail_fast,
               "video": asdict(clip_options)}
    for key in ("task", "model", "weights", "typical_tile"):
        options.pop(key)
    try:
        try:
            # On Ray the driver loads the model once on its CPU: it validates the checkpoint (and fetches
            # it into this node's cache) before any worker starts.
            loaded = api.load(**{**load_options, "device": "cpu" if ray else device},  # type: ignore[arg-type]
                              threads=threads, download_progress=download_progress)
        except DerestoreError:
            record_path = None  # nothing was done: no record
            raise
        report.model = loaded.name
        try:
            loaded.check_tiling(tile, overlap, tiling)
        except UsageError:
            record_path = None  # refused before any image: no record
            raise
        remove_stale_temp_files(jobs)
        if ray is None:
            emit(Loaded(loaded, f"{loaded.devices} in {loaded.engine.precision}"))
            results = _local(jobs, loaded, step_options, truth, clip_options, skip_existing, fail_fast, emit,
                             lambda: report.failed > 0)
        else:
            from .ray import run_jobs_on_ray

            def on_cluster(cluster: Any) -> None:
                report.cluster = cluster.record()
                emit(Loaded(loaded, f"Ray ({ray}): {cluster.workers} worker(s), {cluster.why}"))

            gt_options = {"gt": None if truth is None else str(truth.folder), "protocol": protocol,
                          "crop_border": crop_border}
            results = run_jobs_on_ray(jobs, address=ray, workers=ray_workers, load=load_options,
                                      step={**step_options, **gt_options}, skip_existing=skip_existing,
                                      fail_fast=fail_fast, on_cluster=on_cluster)
        try:
            _consume(results, lambda result: _count(report, result, truth, emit))
        finally:
            results.close()  # any other exception in `emit` still lets the writes in flight finish
    except KeyboardInterrupt:
        report.interrupted = True
    except DeviceFailure as exc:
        report.stopped = str(exc)
    finally:
        report.seconds = time.perf_counter() - started
        if truth is not None and truth.means is not None:
            report.metrics = truth.means.record(protocol)
            report.notes += truth.means.warnings()
            if truth.unmatched:
                report.notes.append(f"{len(truth.unmatched)} output(s) have no ground truth in {truth.folder}: "
                                    + ", ".join(p.name for p in truth.unmatched[:5]))
        if record_path is not None:
            _write_record(record_path, report, loaded, task, options)
    return report


def _ignore(event: Event) -> None:
    """No one listens to the run's events."""


def _local(jobs: list[Job], model: Model, step_options: dict[str, Any], truth: GroundTruth | None,
           clip_options: VideoOptions, skip_existing: bool, fail_fast: bool,
           emit: Callable[[Event], None], failed: Callable[[], bool]) -> Iterator[Result]:
    """This machine's executor, in input order: runs of images through the threaded pipeline, each
    clip frame by frame. `failed()`: whether a result handed out so far failed (for `fail_fast`)."""
    step = model.step(**step_options, score=truth)

    def restore_frames(frames: list[Any]) -> list[Any]:
        restored, _ = model.restore_frames(frames, tile=step_options["tile"], overlap=step_options["overlap"],
                                           tiling=step_options["tiling"])
        return restored

    fingerprint = {"sha256": model.sha256, **{k: step_options[k] for k in ("tile", "overlap", "tiling")},
                   "statistics": model.engine.conversion.record() if model.engine.conversion else None,
                   "precision": model.engine.precision}
    for group in _runs_of_a_kind(jobs):
        if fail_fast and failed():
            return
        if group[0].video:
            for job in group:
                yield run_clip(job, restore_frames, clip_options, skip_existing=skip_existing, fingerprint=fingerprint,
                               on_start=lambda job, width, height: emit(Started(job, width, height)),
                               on_frames=lambda job, done, total: emit(Frames(job, done, total)))
                if fail_fast and failed():
                    return
        else:
            # `yield from` hands an interrupt thrown in here to the pipeline, which then finishes and
            # reports the writes in flight; a plain loop would leave them to the garbage collector.
            yield from run_jobs(group, step, skip_existing=skip_existing, fail_fast=fail_fast,
                                on_start=lambda job, prepared: emit(Started(job, prepared.image.width,
                                                                            prepared.image.height)),
                                on_tiles=lambda job, done, total: emit(Tiles(job, done, total)),
                                parallel=len(model.replicas))


def _runs_of_a_kind(jobs: list[Job]) -> Iterator[list[Job]]:
    """Consecutive images together (they share the threaded pipeline), clips one by one."""
    group: list[Job] = []
    for job in jobs:
        if job.video or (group and group[0].video):
            if group:
                yield group
            group = []
        group.append(job)
    if group:
        yield group


def _count(report: RunReport, result: Result, truth: GroundTruth | None, emit: Callable[[Event], None]) -> None:
    setattr(report, result.status, getattr(report, result.status) + 1)
    if truth is not None:
        truth.add(result)
    emit(Finished(result))


def _consume(results: Iterator[Result], handle: Callable[[Result], None]) -> None:
    """`handle` every result; an interrupt that arrives inside `handle` is passed into the pipeline, which
    then reports the outputs already being written before it stops, as when the interrupt reaches it."""
    interrupt: KeyboardInterrupt | None = None
    while True:
        try:
            if interrupt is not None:
                pending, interrupt = interrupt, None
                try:
                    result = results.throw(pending)  # type: ignore[attr-defined]
                finally:
                    # The exception's traceback holds this frame: a reference cycle that would keep the
                    # pipeline, and the model with it, alive until a garbage collection (or exit).
                    del pending
            else:
                result = next(results)
        except StopIteration:
            return
        try:
            handle(result)
        except KeyboardInterrupt as exc:
            interrupt = exc


def _write_record(path: Path, report: RunReport, model: Model | None, task: str | None,
                  options: dict[str, object]) -> None:
    # A Ray run's engine here is the driver's CPU check; the workers' device is the one asked for.
    engine = model.engine if model is not None and report.cluster is None else None
    if engine is not None:
        report.threads = engine.threads
    data = {
        "version": __version__,
        "task": task,
        "model": report.model,
        "arch": model.arch if model else None,
        "checkpoint": str(model.checkpoint) if model else None,
        "sha256": model.sha256 if model else None,
        "device": model.devices if model and engine else options["device"],
        "precision": engine.precision if engine else options["precision"],
        "precision_probe": asdict(engine.verdict) if engine and engine.verdict else None,
        "statistics": engine.conversion.record() if engine and engine.conversion else None,
        "threads": report.threads,
        "ray": report.cluster,
        "options": {**options,
                    "tile": options["tile"] if options["tile"] is not None or model is None else model.tile,
                    "overlap": options["overlap"] if options["overlap"] is not None or model is None
                    else model.overlap,
                    "channels_last": engine.channels_last if engine else None,
                    "batch_size": engine.batch_size if engine else options["batch_size"]},
        "counts": report.counts(),
    }
    if report.metrics is not None:
        data["metrics"] = report.metrics
    try:
        write_manifest(path, data)
    except OSError as exc:
        report.record_error = f"cannot write the run record {path}: {exc.strerror or exc}"
    else:
        report.record = path
