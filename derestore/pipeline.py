"""Batch restore jobs: input discovery, output naming, sharding, resume, and
read → infer → write with the I/O overlapped on worker threads.

One bad file is reported and skipped; the others are still written. Outputs
are written atomically by `imageio.write_image`, so a killed run leaves either
whole files or none, and `skip_existing` can finish the job.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import os
import sys
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

from . import atomic, imageio, jsontext, video
from .errors import DerestoreError, DeviceFailure, InputError, UsageError

T = TypeVar("T")

OUTPUT_FORMATS = {"png": ".png", "jpg": ".jpg", "jpeg": ".jpg", "webp": ".webp", "tif": ".tif", "tiff": ".tif", "bmp": ".bmp"}
MANIFEST = "derestore-run.json"
# Seconds a read may take before its input is given up (decoding included; reads start ahead of use).
READ_TIMEOUT = 120.0
# Seconds an interrupted run still waits for outputs already being written.
WRITE_GRACE = 10.0


@dataclass(frozen=True)
class Source:
    """An input file and its path relative to the folder it was found under (for `--keep-tree`)."""

    path: Path
    rel: Path


@dataclass(frozen=True)
class Job:
    input: Path
    output: Path
    video: bool = False  # a clip: restored frame by frame (derestore.video), not read as an image


@dataclass
class Result:
    input: Path
    output: Path
    status: str  # "ok", "skipped" or "failed"
    error: str | None = None
    seconds: float = 0.0
    width: int | None = None
    height: int | None = None
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, object] | None = None
    clip: dict[str, object] | None = None  # a video's frames, fps and duration

    def record(self) -> dict[str, object]:
        data: dict[str, object] = {
            "input": str(self.input),
            "output": str(self.output),
            "status": self.status,
            "error": self.error,
            "seconds": round(self.seconds, 4),
            "width": self.width,
            "height": self.height,
        }
        if self.clip is not None:
            data.update(self.clip)
        if self.notes:
            data["notes"] = list(self.notes)
        if self.metrics is not None:
            data.update(self.metrics)
        return data


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def _wanted(path: Path) -> bool:
    """An image or video file by its extension, and not a temporary file of ours."""
    return (imageio.is_image_path(path) or video.is_video_path(path)) and not atomic.is_temp_file(path)


def _folder_images(folder: Path, recursive: bool) -> list[Path]:
    """Entries with an image or video extension; those that are not regular files are kept, to be reported."""
    pattern = "**/*" if recursive else "*"
    return [p for p in folder.glob(pattern) if _wanted(p)]


def read_list(list_file: str) -> list[str]:
    """Paths from a list file (`-` = standard input): one per line; blank lines and `#` comments skipped."""
    try:
        text = sys.stdin.read() if list_file == "-" else Path(list_file).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"from_list={list_file}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise UsageError(f"from_list={list_file}: not a UTF-8 text file with one path per line") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def discover(inputs: Iterable[str], *, recursive: bool = False, listed: Iterable[str] = ()) -> list[Source]:
    """Image files named by paths, folders and glob patterns (plus `listed` paths), de-duplicated and sorted.

    A command-line path or pattern that matches nothing is a usage error: a
    typo should not turn into an empty, successful run. A listed path that is
    missing, and an entry of a folder that is not a regular file (a broken
    link, a named pipe), become per-file failures instead, so one stale entry
    does not stop a batch. Files reached twice (through links, or a link loop
    under `**`) are restored once.
    """
    found: dict[str, tuple[Path, Path | None]] = {}  # real path → (path, rel or None: loose file)

    def add(path: Path, rel: Path | None) -> None:
        found.setdefault(os.path.realpath(path), (path, rel))

    for text in inputs:
        path = Path(text).expanduser()
        if path.is_dir():
            for p in _folder_images(path, recursive):
                add(p, p.relative_to(path))
        elif path.is_file():
            add(path, None)
        elif _is_glob(text):
            matches = [Path(m) for m in glob.glob(os.path.expanduser(text), recursive=recursive)]
            files = [m for m in matches if _wanted(m)]
            if not files:
                raise UsageError(f"pattern '{text}' matches no image files; check the pattern or quote it")
            for m in files:
                add(m, None)
        else:
            problem = imageio.file_problem(path) or "cannot be read"
            raise UsageError(f"input '{text}' {problem}; name an image file or a folder")
    for text in listed:
        add(Path(text).expanduser(), None)
    if not found:
        raise UsageError("no image files found in the inputs given")
    loose = [p for p, rel in found.values() if rel is None]
    base = Path(os.path.commonpath([str(p.parent.absolute()) for p in loose])) if loose else None
    sources = [Source(p, rel if rel is not None else p.absolute().relative_to(base))  # type: ignore[arg-type]
               for p, rel in found.values()]
    return sorted(sources, key=lambda s: str(s.path))


def output_extension(source: Path, ext: str | None) -> str:
    if ext is None:
        return source.suffix.lower() if imageio.is_image_path(source) else ".png"
    key = ext.lower().lstrip(".")
    if key not in OUTPUT_FORMATS:
        raise UsageError(f"ext='{ext}' is not a supported format; use one of {', '.join(sorted(set(OUTPUT_FORMATS)))}")
    return OUTPUT_FORMATS[key]


def is_clip(path: Path) -> bool:
    """A video clip, judged by its extension, else by its content (a clip needs no .mp4 to be one)."""
    if imageio.is_image_path(path):
        return False
    return video.is_video_path(path) or video.container_of(path) is not None


def plan_jobs(sources: list[Source], output: Path, *, ext: str | None = None, suffix: str = "",
              keep_tree: bool = False, frames_dir: bool = False) -> list[Job]:
    """Map inputs to outputs: `OUT/<stem><suffix>.<ext>` (`OUT/<sub/folders>/…` with `keep_tree`),
    or OUT itself for one input and a file name of its kind. A clip keeps its container (`ext` is for
    images), or becomes the folder `OUT/<stem><suffix>/` of its frames with `frames_dir`.

    Name collisions and outputs that would overwrite an input are refused before any work starts.
    """
    if ext is not None:
        output_extension(sources[0].path, ext)  # validate early
    jobs = []
    for src in sources:
        clip = is_clip(src.path)
        folder = output / src.rel.parent if keep_tree else output
        if len(sources) == 1 and not output.is_dir() and (
                video.is_video_path(output) and not frames_dir if clip else imageio.is_image_path(output)):
            target = output
        elif clip:
            target = video.output_path(src.path, folder, f"{src.path.stem}{suffix}", frames_dir=frames_dir)
        else:
            target = folder / f"{src.path.stem}{suffix}{output_extension(src.path, ext)}"
        jobs.append(Job(src.path, target, video=clip))
    seen: dict[Path, Path] = {}
    inputs = {s.path.resolve() for s in sources}
    for job in jobs:
        key = job.output.resolve()
        if key in inputs:
            raise UsageError(
                f"output {job.output} would overwrite input {job.input}; choose another output= folder or a suffix="
            )
        if key in seen:
            raise UsageError(
                f"inputs {seen[key]} and {job.input} would both be written to {job.output}; "
                "use keep_tree=True to mirror the input folders, or rename one"
            )
        seen[key] = job.input
    return jobs


def parse_shard(text: str) -> tuple[int, int]:
    """`K/N` with 0 ≤ K < N (K counts from 0, like SLURM_ARRAY_TASK_ID)."""
    try:
        k_text, n_text = text.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise UsageError(f"shard='{text}' is not K/N (e.g. 0/4 for the first of four parts)") from None
    if n < 1 or not 0 <= k < n:
        raise UsageError(f"shard='{text}': K must be in 0…N-1 and N at least 1")
    return k, n


def shard(jobs: list[Job], k: int, n: int) -> list[Job]:
    """The k-th of n disjoint parts of the sorted job list (every n-th job from k), stable across runs."""
    return jobs[k::n]


def refuse_overwrites(jobs: list[Job], protected: dict[Path, str]) -> None:
    """Refuse any output that would replace a file the user gave (`protected`: resolved path → what it is,
    e.g. "ground truth"), or that lands in a protected folder."""
    for job in jobs:
        target = job.output.resolve()
        for path in (target, target.parent):
            what = protected.get(path)
            if what is not None:
                raise UsageError(f"output {job.output} would be written into {what} {path}; "
                                 "choose another output folder")


def check_output_locations(jobs: list[Job], record: Path) -> None:
    """Refuse, before any work, output folders that cannot be created or written (and the run record's)."""
    folders = {job.output.parent for job in jobs} | {record.parent}
    probed: set[Path] = set()
    for folder in sorted(folders):
        existing = folder
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if not existing.is_dir():
            raise UsageError(f"cannot create output folder {folder}: {existing} is a file, not a folder; "
                             "choose another output folder")
        if existing in probed:
            continue
        probed.add(existing)
        probe = atomic.temp_path_for(existing / "probe")
        try:
            probe.touch(exist_ok=False)
            probe.unlink()
        except OSError as exc:
            raise UsageError(f"output folder {existing} is not writable ({exc.strerror or exc}); "
                             "choose another output folder") from None


def remove_stale_temp_files(jobs: list[Job]) -> list[Path]:
    """Delete temporary outputs that a killed run of this machine left in the output folders."""
    removed = []
    for folder in sorted({job.output.parent for job in jobs}):
        removed += atomic.sweep(folder)
    return removed


@dataclass
class Prepared:
    """An input after decoding, ready for the model: the image and the model-side array."""

    image: imageio.Image
    payload: object


Prepare = Callable[[imageio.Image], object]
TileProgress = Callable[[int, int], None]  # (tiles done, tiles in all) of the image being restored
Restorer = Callable[[object, TileProgress | None], tuple[object, list[str]]]
Finish = Callable[[object, imageio.Image], imageio.Image]
Scorer = Callable[[Job, imageio.Image], dict[str, object]]


def _identity(image: imageio.Image) -> object:
    return image


def _keep(restored: object, image: imageio.Image) -> imageio.Image:
    return restored  # type: ignore[return-value]


@dataclass(frozen=True)
class Step:
    """What happens to one input — read, restore, write — whichever executor runs it.

    `prepare` turns the decoded image into the model's input (e.g. floats),
    `restore` runs the model, `finish` turns its output back into an image,
    `score` (optional) measures it against ground truth before it is written.
    """

    restore: Restorer
    prepare: Prepare = _identity
    finish: Finish = _keep
    score: Scorer | None = None
    max_pixels: int | None = imageio.DEFAULT_MAX_PIXELS

    def read(self, job: Job) -> Prepared:
        image = imageio.read_image(job.input, max_pixels=self.max_pixels)
        return Prepared(image, self.prepare(image))

    def compute(self, job: Job, prepared: Prepared, result: Result, on_tiles: TileProgress | None = None) -> object:
        """The model's output for `prepared`, its size and notes recorded in `result`."""
        result.width, result.height = prepared.image.width, prepared.image.height
        if prepared.image.frames > 1:
            result.notes.append(f"{job.input} has {prepared.image.frames} frames or pages; only the first "
                                "was restored")
        restored, notes = self.restore(prepared.payload, on_tiles)
        result.notes.extend(notes)
        return restored

    def write(self, job: Job, result: Result, restored: object, image: imageio.Image) -> list[str]:
        final = self.finish(restored, image)
        if self.score is not None:
            result.metrics = self.score(job, final)
        job.output.parent.mkdir(parents=True, exist_ok=True)
        return imageio.write_image(job.output, final)

    def __call__(self, job: Job) -> Result:
        """One input start to finish, on this thread: its result, `failed` with the reason if anything
        went wrong. Only DeviceFailure and KeyboardInterrupt escape."""
        result = Result(job.input, job.output, "ok")
        with _reported(job, result):
            prepared = self.read(job)
            restored = self.compute(job, prepared, result)
            result.notes.extend(self.write(job, result, restored, prepared.image))
        return result


@contextlib.contextmanager
def _reported(job: Job, result: Result) -> Iterator[None]:
    """Time one input; whatever goes wrong with it becomes its result's error, except a device
    failure, which stops the run."""
    started = time.perf_counter()
    try:
        yield
    except DeviceFailure:
        raise
    except Exception as exc:
        result.status, result.error = "failed", _failure(job, exc)
    finally:
        result.seconds = time.perf_counter() - started


def already_done(job: Job) -> bool:
    """Whether `job`'s output exists; outputs are atomic, so an existing one is complete."""
    return job.output.is_file()


def _in_thread(fn: Callable[..., T], *args: object, track: list[Future[T]] | None = None) -> Future[T]:
    """Run `fn` on a daemon thread of its own: a read stuck on a dead network file system must not
    keep the process alive after the run has given up on it. The future joins `track` before the
    thread starts, so an interrupt cannot fall between the two."""
    future: Future[T] = Future()
    if track is not None:
        track.append(future)

    def target() -> None:
        if future.set_running_or_notify_cancel():
            try:
                future.set_result(fn(*args))
            except BaseException as exc:  # handed to whoever waits on the future
                future.set_exception(exc)

    threading.Thread(target=target, daemon=True, name="derestore-io").start()
    return future


def _settle(futures: list[Future[T]], grace: float | None) -> None:
    """Wait for the started ones (at most `grace` seconds in all), cancel those not started."""
    deadline = None if grace is None else time.monotonic() + grace
    for future in futures:
        if future.cancel():
            continue
        try:
            future.result(timeout=None if deadline is None else max(0.0, deadline - time.monotonic()))
        except BaseException:  # reported where the result is read, or the run is already stopping
            pass


def _failure(job: Job, exc: BaseException) -> str:
    """One line naming the file and what went wrong, whatever raised."""
    if isinstance(exc, DerestoreError):
        return " ".join(str(exc).split())
    if isinstance(exc, OSError) and exc.strerror:
        return f"{job.input}: {exc.strerror}"
    text = " ".join(str(exc).split())
    return f"{job.input}: {type(exc).__name__}: {text}" if text else f"{job.input}: {type(exc).__name__}"


def run_jobs(
    jobs: list[Job],
    step: Step,
    *,
    skip_existing: bool = False,
    fail_fast: bool = False,
    readers: int = 2,
    writers: int = 2,
    read_timeout: float | None = READ_TIMEOUT,
    on_start: Callable[[Job, Prepared], None] | None = None,
    on_tiles: Callable[[Job, int, int], None] | None = None,
    parallel: int = 1,
) -> Iterator[Result]:
    """Run `step` on every job on this machine, decoding ahead and encoding behind on worker threads
    while the model runs; yield results in input order.

    Reader threads run `step.read`; the calling thread runs only `step.compute`,
    so a GPU is not left waiting on conversions; writer threads run `step.write`.
    At most `readers` prepared inputs and `writers` finished outputs wait at a
    time, so memory stays flat however many files there are.

    Any exception of one input (unreadable, a model error, a failed write) makes
    that input's result `failed`; a read that takes longer than `read_timeout`
    seconds is given up. Only `DeviceFailure` (the device cannot go on) and
    KeyboardInterrupt stop the run: the image in flight is abandoned, finished
    writes are completed (for at most WRITE_GRACE seconds) and reported, and the
    exception is re-raised.

    `on_start(job, prepared)` is called as the model starts on an input and
    `on_tiles(job, done, total)` as its tiles are done, on the thread that runs the model.

    `parallel` > 1 (one per model replica, e.g. one per GPU): that many inputs
    are restored at once, each on a thread of its own that also writes it;
    `step` must then be safe to call from several threads (a replica pool).
    """
    todo = []
    for job in jobs:
        if skip_existing and already_done(job):
            yield Result(job.input, job.output, "skipped")
        else:
            todo.append(job)

    reads: list[Future[Prepared]] = []
    writes: list[Future[list[str]]] = []  # every write (or, in parallel, whole task) started, until the run ends
    pending: list[tuple[Result, Future[list[str]] | None]] = []
    next_read = 0
    readers = max(readers, parallel + 1)  # every replica has an input ready when it is done
    slots = threading.BoundedSemaphore(parallel)

    def top_up() -> None:
        nonlocal next_read
        while next_read < len(todo) and len(reads) < readers:
            reads.append(_in_thread(step.read, todo[next_read]))
            next_read += 1

    def finished(block: bool, grace: float | None = None) -> Iterator[Result]:
        deadline = None if grace is None else time.monotonic() + grace
        while pending and (block or len(pending) > writers or pending[0][1] is None or pending[0][1].done()):
            result, write = pending[0]  # popped once settled: an interrupt while waiting keeps it pending
            failure = None
            if write is not None:
                try:
                    wait = None if deadline is None else max(0.0, deadline - time.monotonic())
                    result.notes.extend(write.result(timeout=wait))
                except FutureTimeout:
                    result.status, result.error = "failed", f"{result.output}: the write did not finish in time"
                except Exception as exc:
                    result.status, result.error = "failed", _failure(Job(result.input, result.output), exc)
                    failure = exc if isinstance(exc, DeviceFailure) else None
            pending.pop(0)
            yield result
            if failure is not None:  # a replica's device failed: the run stops here
                raise failure

    def compute(job: Job, read: Future[Prepared], result: Result) -> tuple[object, imageio.Image]:
        try:
            loaded = read.result(timeout=read_timeout)
        except FutureTimeout:
            raise InputError(f"{job.input}: reading took longer than {read_timeout:g} s "
                             "(a stalled network file system or device?); skipped") from None
        if on_start is not None:
            on_start(job, loaded)
        tiles = None if on_tiles is None else functools.partial(on_tiles, job)
        return step.compute(job, loaded, result, tiles), loaded.image

    def compute_and_write(job: Job, read: Future[Prepared], result: Result) -> list[str]:
        """One input on a replica's own thread (several replicas: one queue of inputs, results in order)."""
        started = time.perf_counter()
        try:
            restored, image = compute(job, read, result)
            return step.write(job, result, restored, image)
        finally:
            result.seconds = time.perf_counter() - started
            slots.release()

    stopping = False
    try:
        top_up()
        for job in todo:
            started = time.perf_counter()
            read = reads.pop(0)
            top_up()
            result = Result(job.input, job.output, "ok")
            write = None
            if parallel > 1:
                slots.acquire()
                pending.append((result, _in_thread(compute_and_write, job, read, result, track=writes)))
            else:
                try:
                    restored, image = compute(job, read, result)
                    write = _in_thread(step.write, job, result, restored, image, track=writes)
                except DeviceFailure as exc:
                    result.status, result.error = "failed", _failure(job, exc)
                    pending.append((result, None))
                    raise
                except Exception as exc:
                    result.status, result.error = "failed", _failure(job, exc)
                result.seconds = time.perf_counter() - started
                pending.append((result, write))
            if fail_fast and result.status == "failed":
                break
            for done in finished(block=False):
                yield done
                if fail_fast and done.status == "failed":
                    return
        yield from finished(block=True)
    except (KeyboardInterrupt, DeviceFailure):
        stopping = True
        yield from finished(block=True, grace=WRITE_GRACE)
        raise
    except GeneratorExit:
        stopping = True  # abandoned by the consumer: nothing more can be reported
        raise
    finally:
        # Whatever ends the run, a file being written is finished (or, past the grace, left as a
        # temp file for the next run to sweep), never cut off by the process exiting.
        for future in reads:
            future.cancel()
        _settle(writes, WRITE_GRACE if stopping else None)


def run_clip(job: Job, restore: video.Restore, options: video.VideoOptions, *, skip_existing: bool = False,
             fingerprint: dict[str, object] | None = None,
             on_start: Callable[[Job, int, int], None] | None = None,
             on_frames: Callable[[Job, int, int | None], None] | None = None) -> Result:
    """One clip, frame by frame, through `restore`: its result, `failed` with the reason if anything
    went wrong. With `skip_existing` a finished output is skipped and an interrupted one resumed.
    Only DeviceFailure and KeyboardInterrupt escape."""
    if skip_existing and already_done(job):
        return Result(job.input, job.output, "skipped")
    result = Result(job.input, job.output, "ok")

    def probed(report: video.ClipReport) -> None:
        result.width, result.height = report.width, report.height
        if on_start is not None:
            on_start(job, report.width or 0, report.height or 0)

    with _reported(job, result):
        report = video.restore_clip(job.input, job.output, restore, options, resume=skip_existing,
                                    fingerprint=fingerprint, on_probe=probed,
                                    on_frames=None if on_frames is None else functools.partial(on_frames, job))
        result.clip = {"frames": report.frames, "fps": None if report.fps is None else round(report.fps, 4),
                       "duration": report.duration}
        result.notes += report.notes
        if report.resumed_from:
            result.notes.append(f"{job.input}: resumed after frame {report.resumed_from} of an earlier run")
    return result


def manifest_path(output: Path, shard_spec: str | None) -> Path:
    """`derestore-run.json` in the output folder; one per shard so parallel shards do not overwrite each other."""
    folder = output if not imageio.is_image_path(output) else output.parent
    if shard_spec:
        k, n = parse_shard(shard_spec)
        return folder / f"derestore-run.shard-{k}-of-{n}.json"
    return folder / MANIFEST


def write_manifest(path: Path, data: dict[str, object]) -> None:
    """Write the run record atomically, like every other output; OSError if it cannot be written."""
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic.write_text(path, jsontext.dumps(data, indent=2) + "\n")
