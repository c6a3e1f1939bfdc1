"""Batch restore jobs: input discovery, output naming, read → infer → write with I/O overlapped.

One bad file is reported and skipped; the others are still written.
"""

from __future__ import annotations

import glob
import os
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import imageio
from .errors import InputError, UsageError

OUTPUT_FORMATS = {"png": ".png", "jpg": ".jpg", "jpeg": ".jpg", "webp": ".webp", "tif": ".tif", "tiff": ".tif", "bmp": ".bmp"}


@dataclass(frozen=True)
class Job:
    input: Path
    output: Path


@dataclass
class Result:
    input: Path
    output: Path
    status: str  # "ok" or "failed"
    error: str | None = None
    seconds: float = 0.0
    width: int | None = None
    height: int | None = None
    notes: list[str] = field(default_factory=list)
    metrics: dict[str, float | None] | None = None

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
        if self.metrics is not None:
            data.update(self.metrics)
        return data


def _is_glob(text: str) -> bool:
    return any(ch in text for ch in "*?[")


def discover(inputs: Iterable[str], *, recursive: bool = False) -> list[Path]:
    """Image files named by paths, directories and glob patterns, de-duplicated, in sorted order.

    A path or pattern that matches nothing is a usage error (exit 2): a typo
    should not turn into an empty, successful run.
    """
    found: dict[Path, None] = {}
    for text in inputs:
        path = Path(text).expanduser()
        if path.is_dir():
            pattern = "**/*" if recursive else "*"
            for p in sorted(path.glob(pattern)):
                if p.is_file() and imageio.is_image_path(p) and not imageio.is_temp_file(p):
                    found.setdefault(p, None)
        elif path.is_file():
            found.setdefault(path, None)
        elif _is_glob(text):
            matches = [Path(m) for m in sorted(glob.glob(os.path.expanduser(text), recursive=recursive))]
            files = [m for m in matches if m.is_file() and imageio.is_image_path(m)]
            if not files:
                raise UsageError(f"pattern '{text}' matches no image files; check the pattern or quote it")
            for m in files:
                found.setdefault(m, None)
        else:
            raise UsageError(f"input '{text}' does not exist; check the path")
    if not found:
        raise UsageError("no image files found in the inputs given (" + ", ".join(inputs) + ")")
    return sorted(found, key=lambda p: str(p))


def output_extension(source: Path, ext: str | None) -> str:
    if ext is None:
        return source.suffix.lower() if imageio.is_image_path(source) else ".png"
    key = ext.lower().lstrip(".")
    if key not in OUTPUT_FORMATS:
        raise UsageError(f"--ext '{ext}' is not a supported format; use one of {', '.join(sorted(set(OUTPUT_FORMATS)))}")
    return OUTPUT_FORMATS[key]


def plan_jobs(files: list[Path], output: Path, *, ext: str | None = None, suffix: str = "") -> list[Job]:
    """Map inputs to outputs: `OUT/<stem><suffix>.<ext>`, or OUT itself for one input and a file name.

    Collisions and outputs that would overwrite an input are refused before any work starts.
    """
    single_file = (
        len(files) == 1 and not output.is_dir() and imageio.is_image_path(output)
    )
    if ext is not None:
        output_extension(files[0], ext)  # validate early
    jobs = []
    for f in files:
        if single_file:
            target = output
        else:
            target = output / f"{f.stem}{suffix}{output_extension(f, ext)}"
        jobs.append(Job(f, target))
    seen: dict[Path, Path] = {}
    inputs = {f.resolve() for f in files}
    for job in jobs:
        key = job.output.resolve()
        if key in inputs:
            raise UsageError(
                f"output {job.output} would overwrite input {job.input}; choose another -o folder or a --suffix"
            )
        if key in seen:
            raise UsageError(
                f"inputs {seen[key]} and {job.input} would both be written to {job.output}; "
                "rename one or use --suffix/--ext"
            )
        seen[key] = job.input
    return jobs


Restorer = Callable[[imageio.Image], tuple[imageio.Image, list[str]]]
Scorer = Callable[[Job, imageio.Image], dict[str, float | None]]


def run_jobs(
    jobs: list[Job],
    restore: Restorer,
    *,
    max_pixels: int | None = imageio.DEFAULT_MAX_PIXELS,
    score: Scorer | None = None,
    readers: int = 2,
    writers: int = 2,
) -> Iterator[Result]:
    """Read ahead and write behind on worker threads while the model runs; yield results in input order.

    At most `readers` decoded images wait for the model and `writers` encoded
    ones for the disk, so memory stays flat however many files there are.
    """
    with ThreadPoolExecutor(readers, thread_name_prefix="derestore-read") as read_pool, \
         ThreadPoolExecutor(writers, thread_name_prefix="derestore-write") as write_pool:
        reads: list[Future[imageio.Image]] = []
        pending: list[tuple[Result, Future[list[str]] | None]] = []
        next_read = 0

        def top_up() -> None:
            nonlocal next_read
            while next_read < len(jobs) and len(reads) < readers:
                reads.append(read_pool.submit(imageio.read_image, jobs[next_read].input, max_pixels=max_pixels))
                next_read += 1

        def drain(block: bool) -> Iterator[Result]:
            while pending and (block or len(pending) > writers or pending[0][1] is None or pending[0][1].done()):
                result, write = pending.pop(0)
                if write is not None:
                    try:
                        result.notes.extend(write.result())
                    except InputError as exc:
                        result.status, result.error = "failed", str(exc)
                yield result

        top_up()
        for job in jobs:
            started = time.perf_counter()
            read = reads.pop(0)
            top_up()
            result = Result(job.input, job.output, "ok")
            write = None
            try:
                image = read.result()
                result.width, result.height = image.width, image.height
                restored, notes = restore(image)
                result.notes.extend(notes)
                if score is not None:
                    result.metrics = score(job, restored)
                job.output.parent.mkdir(parents=True, exist_ok=True)
                write = write_pool.submit(imageio.write_image, job.output, restored)
            except InputError as exc:
                result.status, result.error = "failed", str(exc)
            except OSError as exc:
                result.status, result.error = "failed", f"{job.output}: cannot write ({exc.strerror or exc})"
            result.seconds = time.perf_counter() - started
            pending.append((result, write))
            yield from drain(block=False)
        yield from drain(block=True)
