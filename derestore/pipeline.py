"""Batch restore jobs: input discovery, output naming, sharding, resume, and
read → infer → write with the I/O overlapped on worker threads.

One bad file is reported and skipped; the others are still written. Outputs
are written atomically by `imageio.write_image`, so a killed run leaves either
whole files or none, and `skip_existing` can finish the job.
"""

from __future__ import annotations

import glob
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

from . import imageio
from .errors import InputError, UsageError

OUTPUT_FORMATS = {"png": ".png", "jpg": ".jpg", "jpeg": ".jpg", "webp": ".webp", "tif": ".tif", "tiff": ".tif", "bmp": ".bmp"}
MANIFEST = "derestore-run.json"


@dataclass(frozen=True)
class Source:
    """An input file and its path relative to the folder it was found under (for `--keep-tree`)."""

    path: Path
    rel: Path


@dataclass(frozen=True)
class Job:
    input: Path
    output: Path


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


def _folder_images(folder: Path, recursive: bool) -> list[Path]:
    pattern = "**/*" if recursive else "*"
    return [p for p in folder.glob(pattern)
            if p.is_file() and imageio.is_image_path(p) and not imageio.is_temp_file(p)]


def read_list(list_file: str) -> list[str]:
    """Paths from a list file (`-` = standard input): one per line; blank lines and `#` comments skipped."""
    try:
        text = sys.stdin.read() if list_file == "-" else Path(list_file).read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--from-list {list_file}: cannot read it ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise UsageError(f"--from-list {list_file}: not a UTF-8 text file with one path per line") from None
    return [line.strip() for line in text.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def discover(inputs: Iterable[str], *, recursive: bool = False, listed: Iterable[str] = ()) -> list[Source]:
    """Image files named by paths, folders and glob patterns (plus `listed` paths), de-duplicated and sorted.

    A command-line path or pattern that matches nothing is a usage error: a
    typo should not turn into an empty, successful run. A listed path that is
    missing becomes a per-file failure instead, so one stale line does not
    stop a batch.
    """
    found: dict[Path, Path | None] = {}  # path → rel (None: relative to the loose files' common folder)
    for text in inputs:
        path = Path(text).expanduser()
        if path.is_dir():
            for p in _folder_images(path, recursive):
                found.setdefault(p, p.relative_to(path))
        elif path.is_file():
            found.setdefault(path, None)
        elif _is_glob(text):
            matches = [Path(m) for m in glob.glob(os.path.expanduser(text), recursive=recursive)]
            files = [m for m in matches if m.is_file() and imageio.is_image_path(m)]
            if not files:
                raise UsageError(f"pattern '{text}' matches no image files; check the pattern or quote it")
            for m in files:
                found.setdefault(m, None)
        else:
            raise UsageError(f"input '{text}' does not exist; check the path")
    for text in listed:
        found.setdefault(Path(text).expanduser(), None)
    if not found:
        raise UsageError("no image files found in the inputs given")
    loose = [p for p, rel in found.items() if rel is None]
    base = Path(os.path.commonpath([str(p.parent.absolute()) for p in loose])) if loose else None
    sources = [Source(p, rel if rel is not None else p.absolute().relative_to(base))  # type: ignore[arg-type]
               for p, rel in found.items()]
    return sorted(sources, key=lambda s: str(s.path))


def output_extension(source: Path, ext: str | None) -> str:
    if ext is None:
        return source.suffix.lower() if imageio.is_image_path(source) else ".png"
    key = ext.lower().lstrip(".")
    if key not in OUTPUT_FORMATS:
        raise UsageError(f"--ext '{ext}' is not a supported format; use one of {', '.join(sorted(set(OUTPUT_FORMATS)))}")
    return OUTPUT_FORMATS[key]


def plan_jobs(sources: list[Source], output: Path, *, ext: str | None = None, suffix: str = "",
              keep_tree: bool = False) -> list[Job]:
    """Map inputs to outputs: `OUT/<stem><suffix>.<ext>` (`OUT/<sub/folders>/…` with `keep_tree`),
    or OUT itself for one input and an image file name.

    Name collisions and outputs that would overwrite an input are refused before any work starts.
    """
    if ext is not None:
        output_extension(sources[0].path, ext)  # validate early
    single_file = len(sources) == 1 and not output.is_dir() and imageio.is_image_path(output)
    jobs = []
    for src in sources:
        if single_file:
            target = output
        else:
            name = f"{src.path.stem}{suffix}{output_extension(src.path, ext)}"
            target = output / src.rel.parent / name if keep_tree else output / name
        jobs.append(Job(src.path, target))
    seen: dict[Path, Path] = {}
    inputs = {s.path.resolve() for s in sources}
    for job in jobs:
        key = job.output.resolve()
        if key in inputs:
            raise UsageError(
                f"output {job.output} would overwrite input {job.input}; choose another -o folder or a --suffix"
            )
        if key in seen:
            raise UsageError(
                f"inputs {seen[key]} and {job.input} would both be written to {job.output}; "
                "use --keep-tree to mirror the input folders, or rename one"
            )
        seen[key] = job.input
    return jobs


def parse_shard(text: str) -> tuple[int, int]:
    """`K/N` with 0 ≤ K < N (K counts from 0, like SLURM_ARRAY_TASK_ID)."""
    try:
        k_text, n_text = text.split("/")
        k, n = int(k_text), int(n_text)
    except ValueError:
        raise UsageError(f"--shard '{text}' is not K/N (e.g. 0/4 for the first of four parts)") from None
    if n < 1 or not 0 <= k < n:
        raise UsageError(f"--shard {text}: K must be in 0…N-1 and N at least 1")
    return k, n


def shard(jobs: list[Job], k: int, n: int) -> list[Job]:
    """The k-th of n disjoint parts of the sorted job list (every n-th job from k), stable across runs."""
    return jobs[k::n]


_STALE_AFTER = 3600.0


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _is_stale(path: Path) -> bool:
    """A temporary output whose writer is gone: its process no longer runs here, or it is an hour old."""
    match = re.search(r"\.derestore-(\d+)-", path.name)
    try:
        age = time.time() - path.stat().st_mtime
    except OSError:
        return False
    return age > _STALE_AFTER or (match is not None and not _pid_alive(int(match.group(1))))


def remove_stale_temp_files(jobs: list[Job]) -> list[Path]:
    """Delete temporary outputs that a killed run left in the output folders."""
    removed = []
    for folder in sorted({job.output.parent for job in jobs}):
        if not folder.is_dir():
            continue
        for path in folder.iterdir():
            if imageio.is_temp_file(path) and _is_stale(path):
                try:
                    path.unlink()
                    removed.append(path)
                except OSError:
                    pass  # another process got there first, or it is not ours to remove
    return removed


@dataclass
class Prepared:
    """An input after decoding, ready for the model: the image and the model-side array."""

    image: imageio.Image
    payload: object


Prepare = Callable[[imageio.Image], object]
Restorer = Callable[[object], tuple[object, list[str]]]
Finish = Callable[[object, imageio.Image], imageio.Image]
Scorer = Callable[[Job, imageio.Image], dict[str, object]]


def _identity(image: imageio.Image) -> object:
    return image


def _keep(restored: object, image: imageio.Image) -> imageio.Image:
    return restored  # type: ignore[return-value]


def run_jobs(
    jobs: list[Job],
    restore: Restorer,
    *,
    prepare: Prepare = _identity,
    finish: Finish = _keep,
    max_pixels: int | None = imageio.DEFAULT_MAX_PIXELS,
    skip_existing: bool = False,
    fail_fast: bool = False,
    score: Scorer | None = None,
    readers: int = 2,
    writers: int = 2,
) -> Iterator[Result]:
    """Decode ahead and encode behind on worker threads while the model runs; yield results in input order.

    Reader threads run `read_image` then `prepare` (e.g. conversion to floats);
    the calling thread runs only `restore`, so a GPU is not left waiting on
    conversions; writer threads run `finish`, `score` and `write_image`. At most
    `readers` prepared inputs and `writers` finished outputs wait at a time, so
    memory stays flat however many files there are. On KeyboardInterrupt the
    image in flight is abandoned, queued writes are completed and reported, and
    the interrupt is re-raised.
    """
    todo = []
    for job in jobs:
        if skip_existing and job.output.is_file():
            yield Result(job.input, job.output, "skipped")
        else:
            todo.append(job)

    def load(job: Job) -> Prepared:
        image = imageio.read_image(job.input, max_pixels=max_pixels)
        return Prepared(image, prepare(image))

    def store(job: Job, result: Result, restored: object, image: imageio.Image) -> list[str]:
        final = finish(restored, image)
        if score is not None:
            result.metrics = score(job, final)
        job.output.parent.mkdir(parents=True, exist_ok=True)
        return imageio.write_image(job.output, final)

    with ThreadPoolExecutor(readers, thread_name_prefix="derestore-read") as read_pool, \
         ThreadPoolExecutor(writers, thread_name_prefix="derestore-write") as write_pool:
        reads: list[Future[Prepared]] = []
        pending: list[tuple[Result, Future[list[str]] | None]] = []
        next_read = 0

        def top_up() -> None:
            nonlocal next_read
            while next_read < len(todo) and len(reads) < readers:
                reads.append(read_pool.submit(load, todo[next_read]))
                next_read += 1

        def finished(block: bool) -> Iterator[Result]:
            while pending and (block or len(pending) > writers or pending[0][1] is None or pending[0][1].done()):
                result, write = pending.pop(0)
                if write is not None:
                    try:
                        result.notes.extend(write.result())
                    except InputError as exc:
                        result.status, result.error = "failed", str(exc)
                    except OSError as exc:
                        result.status, result.error = "failed", f"{result.output}: cannot write ({exc.strerror or exc})"
                yield result

        try:
            top_up()
            for job in todo:
                started = time.perf_counter()
                read = reads.pop(0)
                top_up()
                result = Result(job.input, job.output, "ok")
                write = None
                try:
                    loaded = read.result()
                    result.width, result.height = loaded.image.width, loaded.image.height
                    restored, notes = restore(loaded.payload)
                    result.notes.extend(notes)
                    write = write_pool.submit(store, job, result, restored, loaded.image)
                except InputError as exc:
                    result.status, result.error = "failed", str(exc)
                result.seconds = time.perf_counter() - started
                pending.append((result, write))
                if fail_fast and result.status == "failed":
                    break
                for done in finished(block=False):
                    yield done
                    if fail_fast and done.status == "failed":
                        return
        except KeyboardInterrupt:
            for read in reads:
                read.cancel()
            yield from finished(block=True)
            raise
        yield from finished(block=True)


def manifest_path(output: Path, shard_spec: str | None) -> Path:
    """`derestore-run.json` in the output folder; one per shard so parallel shards do not overwrite each other."""
    folder = output if not imageio.is_image_path(output) else output.parent
    if shard_spec:
        k, n = parse_shard(shard_spec)
        return folder / f"derestore-run.shard-{k}-of-{n}.json"
    return folder / MANIFEST


def write_manifest(path: Path, data: dict[str, object]) -> None:
    """Write the run record atomically (temp file + rename), like every other output."""
    import json

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    os.replace(tmp, path)
