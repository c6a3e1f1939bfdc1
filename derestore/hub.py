"""Checkpoint hub: turn a registry record into a verified file in the local cache.

Cache layout (root = `$DERESTORE_HOME`, default platformdirs' user cache dir):

    <root>/checkpoints/<name>/<file name>              the checkpoint
    <root>/checkpoints/<name>/<file name>.meta.json    source, sha256, size, time, stat stamp
    <root>/checkpoints/<name>/.<file name>.<src>.<token>.incomplete<ext>(.json)   partial downloads
    <root>/locks/<name>.lock                           one lock per checkpoint

Correctness never rests on the lock (flock silently succeeds for everyone on
some cluster file systems): every process downloads into its own temp file,
verifies it, writes the metadata, then renames it into place. Without a
working lock the worst case is a duplicate download, never a half file.

A file the registry does not pin (no sha256 or git blob id) is trusted only
once the caller's `check` has loaded it as the record's architecture; its
digest is then recorded and every later download must match it.

The hub never prints: it logs to `derestore.hub` and reports download
progress through the caller's `progress(name, done, total)` callback.

Environment:
    DERESTORE_HOME        cache root
    DERESTORE_OFFLINE=1   never touch the network (local and file:// sources still work)
    DERESTORE_MIRROR      base URL (or directory); `<base>/<file name>` is tried first
    DERESTORE_TIMEOUT     read timeout in seconds (default 30; connect timeout ≤ 10)
    DERESTORE_RETRIES     retries per source after dropped or stalled connections, 5xx, short reads,
                          counted afresh only when the partial file grew beyond its best size (default 5);
                          a host that does not resolve or refuses connections is not retried
    DERESTORE_BACKOFF     first backoff sleep in seconds, doubled per retry (default 1)
    DERESTORE_GDRIVE_URL  Google Drive download endpoint (default https://drive.google.com/uc)
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from datetime import datetime, timezone
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote, urlencode, urljoin, urlsplit

import filelock
import requests
import urllib3

from . import __version__, atomic
from .errors import ModelUnavailable, UsageError
from .registry import ModelRecord

ENV_HOME = "DERESTORE_HOME"
ENV_OFFLINE = "DERESTORE_OFFLINE"
ENV_MIRROR = "DERESTORE_MIRROR"
ENV_TIMEOUT = "DERESTORE_TIMEOUT"
ENV_RETRIES = "DERESTORE_RETRIES"
ENV_BACKOFF = "DERESTORE_BACKOFF"
ENV_GDRIVE = "DERESTORE_GDRIVE_URL"

GDRIVE_URL = "https://drive.google.com/uc"
CHUNK = 1 << 20
MAX_BACKOFF = 20.0
# A partial not written for this long (or whose writer on this host is dead) is
# abandoned; the same delay lets a waiter stop trusting a lock nobody serves.
STALE_SECONDS = 60.0
_PART_SUFFIX = ".incomplete"
# .<file name>.<source key>.<token>.incomplete<ext>; the sidecar adds ".json" (see _Partial).
_PART_NAME = re.compile(r"\..+\.[0-9a-f]{12}\.incomplete(\.[A-Za-z0-9_+-]+)?")
_ACTIVE: set[str] = set()  # partials this process is writing right now (any thread)
_SAFE = set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-+")

log = logging.getLogger(__name__)

ProgressCallback = Callable[[str, int, int | None], None]
"""`progress(model name, bytes done, total bytes or None)`, called as a download advances."""
CheckCallback = Callable[[Path], None]
"""`check(path)` raises ModelUnavailable unless the file loads as the record's architecture."""


# ---------------------------------------------------------------- cache layout


def cache_root() -> Path:
    """`$DERESTORE_HOME`, else the platform's user cache dir for derestore."""
    home = os.environ.get(ENV_HOME)
    if home:
        return Path(home).expanduser()
    import platformdirs

    return Path(platformdirs.user_cache_dir("derestore", appauthor=False))


def model_dir(record: ModelRecord) -> Path:
    name = record.name
    if not name or name.startswith(".") or not set(name) <= _SAFE:
        raise UsageError(
            f"{record.origin or 'registry'}: model name '{name}' cannot name a cache folder; "
            "rename it with letters, digits, '.', '_', '-' and '+' only"
        )
    return cache_root() / "checkpoints" / name


def file_name(record: ModelRecord) -> str:
    """The record's file name, without URL query, any character that could escape the folder replaced."""
    name = unquote(record.file_name.split("?", 1)[0].split("#", 1)[0])
    name = "".join(c if c in _SAFE else "_" for c in name).lstrip(".")
    return name or f"{record.name}.pth"


def target_path(record: ModelRecord) -> Path:
    """Where the checkpoint lives once cached (whether or not it is there now)."""
    return model_dir(record) / file_name(record)


def _meta_path(record: ModelRecord) -> Path:
    return target_path(record).with_name(file_name(record) + ".meta.json")


@dataclass(frozen=True)
class CacheEntry:
    """The metadata file beside a cached checkpoint."""

    name: str
    file_name: str
    sha256: str
    size: int
    source: str
    pinned: bool  # False: the digest was recorded on first download (trust on first use)
    fetched_at: str
    stamp: tuple[int, int, int]  # size, mtime_ns, inode at the last full hash


def cache_entry(record: ModelRecord) -> CacheEntry | None:
    try:
        raw = json.loads(_meta_path(record).read_text())
        raw["stamp"] = tuple(raw["stamp"])
        return CacheEntry(**raw)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def _stamp(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ino)


def _write_entry(record: ModelRecord, entry: CacheEntry) -> None:
    atomic.write_text(_meta_path(record), json.dumps(asdict(entry), indent=1))


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def git_blob_sha1(path: Path) -> str:
    """The id git gives the file's content: sha1 of `blob <size>\\0` followed by the bytes."""
    digest = hashlib.sha1(f"blob {path.stat().st_size}\0".encode())
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def pinned(record: ModelRecord) -> bool:
    """True when the registry fixes the content (sha256, or a git blob id where no sha256 is known)."""
    return bool(record.sha256 or record.git_blob_sha1)


def expected_sha256(record: ModelRecord) -> str | None:
    """The registry's pin, else the digest recorded on first download, else None."""
    if record.sha256:
        return record.sha256
    entry = cache_entry(record)
    return entry.sha256 if entry else None


def cached_path(record: ModelRecord) -> Path | None:
    """The cached checkpoint if complete and verified, else None.

    Cheap: the file is re-hashed only when its size/mtime/inode differ from the
    stamp taken at the last hash. A bundled checkpoint is always "cached".
    """
    if record.bundled:
        try:
            return bundled_path(record)
        except ModelUnavailable:
            return None
    path = target_path(record)
    entry = cache_entry(record)
    if entry is None or entry.file_name != path.name:
        return None
    if record.sha256 and entry.sha256 != record.sha256:
        return None
    try:
        st = path.stat()
    except OSError:
        return None
    if entry.stamp == _stamp(st):
        return path
    if st.st_size != entry.size or sha256_file(path) != entry.sha256:
        return None
    try:
        _write_entry(record, replace(entry, stamp=_stamp(st)))
    except OSError:
        pass  # a read-only shared cache is fine: we just re-hash next time
    return path


@dataclass(frozen=True)
class Verification:
    name: str
    status: str  # "ok", "missing" or "corrupt"
    path: Path
    expected: str | None = None
    actual: str | None = None


def verify(record: ModelRecord) -> Verification:
    """Re-hash the cached file; a corrupt one is deleted so the next use downloads it again."""
    if record.bundled:
        try:
            path = bundled_path(record)  # checks the pin, if any
        except ModelUnavailable:
            return Verification(record.name, "missing", target_path(record))
        digest = sha256_file(path)
        return Verification(record.name, "ok", path, record.sha256 or digest, digest)
    path = target_path(record)
    entry = cache_entry(record)
    if entry is None or not path.is_file():
        return Verification(record.name, "missing", path)
    want = record.sha256 or entry.sha256
    st = path.stat()
    got = sha256_file(path)
    if got != want:
        path.unlink(missing_ok=True)
        return Verification(record.name, "corrupt", path, want, got)
    try:
        _write_entry(record, replace(entry, stamp=_stamp(st)))
    except OSError:
        pass
    return Verification(record.name, "ok", path, want, got)


def remove(record: ModelRecord) -> list[Path]:
    """Delete the checkpoint, its metadata (and so its recorded digest) and partial downloads."""
    folder = model_dir(record)
    if not folder.is_dir():
        return []
    with _lock(record):
        removed = sorted(p for p in folder.iterdir() if p.is_file())
        shutil.rmtree(folder, ignore_errors=True)
    return removed


def download_kind(record: ModelRecord) -> str:
    """How a checkpoint reaches the cache: bundled, automatic, automatic (Google Drive), manual import
    or import only."""
    if record.bundled:
        return "bundled"
    if any(not s.startswith("gdrive:") for s in record.sources):
        return "automatic"
    if record.sources:
        return "automatic (Google Drive)"
    if record.manual_url:
        return "manual import"
    return "import only"


def describe(record: ModelRecord) -> dict[str, Any]:
    """The record and its cache state as plain data (what `derestore models --json` prints)."""
    path = cached_path(record)
    entry = cache_entry(record) if path else None
    size = record.size or (entry.size if entry else None) or (path.stat().st_size if path and record.bundled else None)
    return {
        "task": record.task,
        "name": record.name,
        "arch": record.arch,
        "dataset": record.dataset,
        "cached": path is not None,
        "path": str(path) if path else None,
        "size": size,
        "license": record.license,
        "pinned": pinned(record),
        # A bundled file is small: its digest is read, not recorded.
        "sha256": record.sha256 or (entry.sha256 if entry else None)
        or (sha256_file(path) if path and record.bundled else None),
        "download": download_kind(record),
        "sources": list(record.sources),
        "manual_url": record.manual_url,
        "manual_code": record.manual_code,
        "notes": record.notes,
    }


# ---------------------------------------------------------------- messages


def _import_command(record: ModelRecord) -> str:
    return f"`derestore weights import {record.name} FILE`"


def manual_instructions(record: ModelRecord) -> str:
    """How a user gets this checkpoint by hand, as one sentence."""
    if record.manual_url:
        code = f" (extraction code {record.manual_code})" if record.manual_code else ""
        return (
            f"open {record.manual_url}{code} in a browser, download the checkpoint, "
            f"then run {_import_command(record)}"
        )
    if record.manual:
        return f"{record.manual.rstrip('.')}; then run {_import_command(record)}"
    return f"obtain the checkpoint yourself, then run {_import_command(record)}"


# ---------------------------------------------------------------- sources


@dataclass(frozen=True)
class Source:
    kind: str  # "http", "file" or "gdrive"
    target: str  # URL, absolute path or Drive file id
    label: str  # as the user wrote it, for messages

    @property
    def local(self) -> bool:
        return self.kind == "file"

    @property
    def key(self) -> str:
        """Short id of the source, so a partial is only ever resumed from where it came."""
        return hashlib.sha256(self.label.encode()).hexdigest()[:8]


def parse_source(text: str, base_dir: Path | None = None) -> Source:
    """`https://`, `http://`, `file://`, `gdrive:<id>` or a local path (relative to `base_dir`)."""
    if text.startswith(("https://", "http://")):
        return Source("http", text, text)
    if text.startswith("gdrive:"):
        return Source("gdrive", text.removeprefix("gdrive:"), text)
    if text.startswith("file://"):
        return Source("file", unquote(urlsplit(text).path), text)
    if "://" in text:
        raise UsageError(
            f"source '{text}' has an unsupported scheme; use https://, http://, file://, "
            "gdrive:<id> or a local path"
        )
    path = Path(text).expanduser()
    if not path.is_absolute() and base_dir is not None:
        path = base_dir / path
    return Source("file", str(path), text)


def sources(record: ModelRecord) -> list[Source]:
    """The mirror (if `$DERESTORE_MIRROR` is set) and then the record's sources, in order."""
    base_dir = Path(record.origin).parent if record.origin else None
    out: list[Source] = []
    mirror = os.environ.get(ENV_MIRROR, "").strip()
    if mirror:
        name = quote(file_name(record))
        if "://" in mirror:
            out.append(parse_source(f"{mirror.rstrip('/')}/{name}"))
        else:
            out.append(Source("file", str(Path(mirror).expanduser() / file_name(record)), mirror))
    out.extend(parse_source(s, base_dir) for s in record.sources)
    unique: dict[str, Source] = {}
    for src in out:
        unique.setdefault(src.label, src)
    return list(unique.values())


# ---------------------------------------------------------------- settings


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().lower() in ("1", "true", "yes", "on")


def _env_number(name: str, default: float) -> float:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"{name}='{raw}' is not a number; set it to e.g. {default:g}") from None
    if value < 0:
        raise UsageError(f"{name}='{raw}' must not be negative")
    return value


@dataclass(frozen=True)
class Settings:
    timeout: tuple[float, float]
    retries: int
    backoff: float

    @classmethod
    def from_env(cls) -> Settings:
        read = _env_number(ENV_TIMEOUT, 30.0)
        return cls(
            timeout=(min(10.0, read), read),
            retries=int(_env_number(ENV_RETRIES, 5)),
            backoff=_env_number(ENV_BACKOFF, 1.0),
        )


# ---------------------------------------------------------------- locking


def _is_partial(path: Path) -> bool:
    return _PART_NAME.fullmatch(path.name) is not None and not path.name.endswith(".json")


def _partials(folder: Path, prefix: str = "") -> list[Path]:
    if not folder.is_dir():
        return []
    return [p for p in folder.iterdir() if p.name.startswith("." + prefix) and _is_partial(p)]


def _recently_active(folder: Path) -> bool:
    now = time.time()
    for part in _partials(folder):
        try:
            if now - part.stat().st_mtime < STALE_SECONDS:
                return True
        except OSError:
            continue
    return False


@contextmanager
def _lock(record: ModelRecord) -> Iterator[None]:
    """Hold the per-checkpoint lock if the file system gives us one; go on without it otherwise."""
    path = cache_root() / "locks" / f"{record.name}.lock"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(path))
    except OSError as exc:
        log.warning("cannot create lock %s (%s); going on without it", path, exc)
        yield
        return
    started = time.monotonic()
    told = False
    acquired = False
    while True:
        try:
            lock.acquire(timeout=1.0)
            acquired = True
            break
        except filelock.Timeout:
            waited = time.monotonic() - started
            if not told:
                log.info("waiting for another process fetching %s (lock %s)", record.name, path)
                told = True
            # A lock left by a dead process on a file system without flock must not
            # hang a batch job: nobody writing a partial for a while means nobody is coming.
            if waited > STALE_SECONDS and not _recently_active(model_dir(record)):
                log.warning("lock %s looks stale; going on without it", path)
                break
        except (OSError, NotImplementedError) as exc:
            log.warning("cannot lock %s (%s); going on without the lock", path, exc)
            break
    try:
        yield
    finally:
        if acquired:
            lock.release()


# ---------------------------------------------------------------- partial files


class _Partial:
    """A per-process temp file plus a sidecar saying where its bytes came from."""

    def __init__(self, path: Path):
        self.path = path
        self.info_path = path.with_name(path.name + ".json")

    def read_info(self) -> dict:
        try:
            return json.loads(self.info_path.read_text())
        except (OSError, ValueError):
            return {}

    def write_info(self, **info: object) -> None:
        # (tag, pid) name the writer where its PID means something: see atomic.writer_alive.
        info.update(tag=atomic.host_tag(), pid=os.getpid())
        atomic.write_text(self.info_path, json.dumps(info, indent=1))

    def size(self) -> int:
        try:
            return self.path.stat().st_size
        except OSError:
            return 0

    def discard(self) -> None:
        self.path.unlink(missing_ok=True)
        self.info_path.unlink(missing_ok=True)


def _partial_path(folder: Path, name: str, key: str) -> Path:
    # The file's extension is kept last, so a check that goes by it (e.g. .safetensors) sees the real type.
    ext = Path(name).suffix
    if ext.lower() == ".json":
        ext = ""
    return folder / f".{name}.{key}.{uuid.uuid4().hex[:12]}{_PART_SUFFIX}{ext}"


def _new_partial(folder: Path, name: str, key: str) -> _Partial:
    part = _Partial(_partial_path(folder, name, key))
    part.path.touch()
    return part


def _abandoned(part: Path, info: dict) -> bool:
    """Nobody wrote it for STALE_SECONDS, or its writer provably died (same host, boot and PID namespace)."""
    try:
        age = time.time() - part.stat().st_mtime
    except OSError:
        return False
    if age > STALE_SECONDS:
        return True
    tag, pid = info.get("tag"), info.get("pid")
    if tag == atomic.host_tag() and pid == os.getpid():
        return str(part) not in _ACTIVE
    return not atomic.writer_alive(tag, pid)


def _claim_partial(folder: Path, name: str, key: str) -> _Partial | None:
    """Take over an abandoned partial of this source; rename makes the claim exclusive."""
    for old in sorted(_partials(folder, f"{name}.{key}."), key=lambda p: -_Partial(p).size()):
        info = _Partial(old).read_info()
        if not _abandoned(old, info):
            continue
        mine = _Partial(_partial_path(folder, name, key))
        try:
            os.rename(old, mine.path)
        except OSError:
            continue  # another process claimed it first
        try:
            os.rename(_Partial(old).info_path, mine.info_path)
        except OSError:
            pass
        # Mark it ours at once, so no other process takes it for abandoned in turn.
        os.utime(mine.path)
        if mine.info_path.exists():
            mine.write_info(**{k: v for k, v in mine.read_info().items() if k not in ("host", "tag", "pid")})
        return mine
    return None


def _sweep(folder: Path) -> None:
    """Remove partial downloads that nobody will resume, and metadata temp files of dead writers."""
    for part in _partials(folder):
        if _abandoned(part, _Partial(part).read_info()):
            _Partial(part).discard()
    atomic.sweep(folder)


# ---------------------------------------------------------------- transfers


class _SourceFailed(Exception):
    """This source cannot deliver the file; try the next one."""


class _Transient(Exception):
    """A failure worth retrying (connection error, 5xx, short read)."""


_TRANSIENT_ERRORS = (
    requests.ConnectionError,
    requests.Timeout,
    requests.exceptions.ChunkedEncodingError,
    urllib3.exceptions.HTTPError,
    _Transient,
)


@dataclass
class _Result:
    part: _Partial
    sha256: str
    size: int
    content_type: str | None = None  # the server's Content-Type ("" when it gave none); None for a local copy


def _chunks(resp: requests.Response) -> Iterator[bytes]:
    """The body as it arrives: read1 hands over every byte received before a connection drops."""
    read1 = getattr(resp.raw, "read1", None)  # urllib3 >= 2
    if read1 is None:
        yield from resp.iter_content(1 << 16)
        return
    while chunk := read1(CHUNK):
        yield chunk


def _is_html(resp: requests.Response) -> bool:
    return "text/html" in resp.headers.get("Content-Type", "").lower()


def _strong_validator(resp: requests.Response) -> str | None:
    etag = resp.headers.get("ETag")
    if etag and not etag.startswith("W/"):
        return etag
    return resp.headers.get("Last-Modified")


def _content_range(value: str) -> tuple[int, int | None] | None:
    """`bytes START-END/TOTAL` → (START, TOTAL or None)."""
    try:
        spec = value.split(" ", 1)[1]
        span, total = spec.split("/", 1)
        start = int(span.split("-", 1)[0])
        return start, (None if total.strip() == "*" else int(total))
    except (ValueError, IndexError):
        return None


def _hash_prefix(path: Path) -> tuple[Any, int]:
    """A sha256 object fed with the file so far, and its length."""
    digest = hashlib.sha256()
    n = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(CHUNK):
            digest.update(chunk)
            n += len(chunk)
    return digest, n


def _check_space(folder: Path, needed: int) -> None:
    free = shutil.disk_usage(folder).free
    if needed > free:
        raise ModelUnavailable(
            f"{folder}: {needed} bytes needed, only {free} free; free some space "
            f"or point {ENV_HOME} at a larger disk"
        )


_Report = Callable[[int, int | None], None]  # (bytes done, total or None) for one download


def _http_download(
    session: requests.Session,
    url: str,
    src: Source,
    folder: Path,
    name: str,
    settings: Settings,
    report: _Report,
    first: requests.Response | None = None,
) -> _Result:
    """Stream `url` into a partial file, resuming with Range after errors and across runs."""
    part = _claim_partial(folder, name, src.key)
    if part is not None and part.read_info().get("source") != src.label:
        part.path.write_bytes(b"")
    if part is None:
        part = _new_partial(folder, name, src.key)
    _ACTIVE.add(str(part.path))
    try:
        return _stream(session, url, src, part, folder, name, settings, report, first)
    except (_SourceFailed, requests.RequestException):
        if part.size() == 0:
            part.discard()  # nothing worth resuming
        raise
    finally:
        _ACTIVE.discard(str(part.path))


def _stream(
    session: requests.Session,
    url: str,
    src: Source,
    part: _Partial,
    folder: Path,
    name: str,
    settings: Settings,
    report: _Report,
    first: requests.Response | None,
) -> _Result:
    info = part.read_info()
    digest, offset = _hash_prefix(part.path)
    if offset:
        log.info("resuming %s from %s at byte %d", name, src.label, offset)
        if first is not None:
            first.close()
            first = None
    # A server that ignores Range restarts the file on every attempt: only bytes beyond
    # the best size reached so far count as progress and earn a fresh retry budget.
    best = offset
    attempt = 0
    while True:
        try:
            if first is not None:
                resp, first = first, None
            else:
                headers: dict[str, str] = {}
                if offset:
                    headers["Range"] = f"bytes={offset}-"
                    if info.get("validator"):
                        headers["If-Range"] = info["validator"]
                resp = session.get(url, headers=headers, stream=True, timeout=settings.timeout)
            with resp:
                code = resp.status_code
                if code == 416:
                    part.path.write_bytes(b"")
                    digest, offset = hashlib.sha256(), 0
                    raise _Transient("the server refused the resume range; starting over")
                if code in (408, 429) or code >= 500:
                    raise _Transient(f"HTTP {code}")
                if code not in (200, 206):
                    raise _SourceFailed(f"HTTP {code} {resp.reason or ''}".strip())
                if _is_html(resp):
                    raise _SourceFailed("the server sent an HTML page, not a checkpoint")
                encoding = resp.headers.get("Content-Encoding", "").strip().lower()
                if encoding not in ("", "identity"):
                    # Encoded bytes would never match the pin, and ranges of them cannot be resumed.
                    raise _SourceFailed(f"the server sent {encoding}-encoded data although asked for the plain file")
                length = resp.headers.get("Content-Length")
                if code == 206:
                    span = _content_range(resp.headers.get("Content-Range", ""))
                    known = info.get("total")
                    if span is None or span[0] != offset or (known and span[1] and span[1] != known):
                        part.path.write_bytes(b"")
                        digest, offset = hashlib.sha256(), 0
                        raise _Transient("the server answered the resume with the wrong range")
                    total = span[1]
                else:
                    if offset:  # the server ignored Range or the file changed: start over
                        part.path.write_bytes(b"")
                        digest, offset = hashlib.sha256(), 0
                    total = int(length) if length and length.isdigit() else None
                part.write_info(source=src.label, url=url, total=total, validator=_strong_validator(resp))
                info = part.read_info()
                if total is not None:
                    _check_space(folder, total - offset)
                report(offset, total)
                with open(part.path, "ab") as fh:
                    for chunk in _chunks(resp):
                        fh.write(chunk)
                        digest.update(chunk)
                        offset += len(chunk)
                        report(offset, total)
                    fh.flush()
                    os.fsync(fh.fileno())
                if total is not None and offset < total:
                    raise _Transient(f"short read: {offset} of {total} bytes")
                if total is not None and offset > total:
                    raise _SourceFailed(f"got {offset} bytes, more than the announced {total}")
                return _Result(part, digest.hexdigest(), offset, resp.headers.get("Content-Type", ""))
        except _TRANSIENT_ERRORS as exc:
            why = _unreachable(exc)
            if why:
                raise _SourceFailed(why) from None
            if part.size() != offset:
                digest, offset = _hash_prefix(part.path)
            if offset > best:
                best, attempt = offset, 0
            attempt += 1
            if attempt > settings.retries:
                kept = f"; {offset} bytes kept, the next run resumes" if offset else ""
                raise _SourceFailed(f"{_brief(exc)} after {attempt} attempts{kept}") from None
            try:
                os.utime(part.path)  # keep the partial visibly alive while we sleep
            except OSError:
                raise _SourceFailed("the partial download vanished (another process took it)") from None
            time.sleep(_backoff(settings, attempt))
        except requests.RequestException as exc:
            raise _SourceFailed(_brief(exc)) from None
        except OSError as exc:
            raise ModelUnavailable(f"cannot write {part.path}: {exc}; check {ENV_HOME}") from None


def _backoff(settings: Settings, attempt: int) -> float:
    return min(MAX_BACKOFF, settings.backoff * 2 ** (attempt - 1))


# urllib3 2 tells a failed name lookup apart; urllib3 1 reports it as a NewConnectionError ("… not known").
_NAME_RESOLUTION_ERROR = getattr(urllib3.exceptions, "NameResolutionError", ())


def _unreachable(exc: BaseException) -> str | None:
    """Why a connection could not even be opened (name not resolved, refused, no route), else None.

    Retrying such a source only delays the next one (or the error, without any network):
    it fails over at once. So does a connect timeout: behind a firewall that drops packets,
    each retry would cost the whole timeout again. A drop mid-transfer stays transient.
    """
    if not isinstance(exc, requests.ConnectionError) or not exc.args:
        return None
    reason = getattr(exc.args[0], "reason", exc.args[0])  # urllib3's MaxRetryError wraps the cause
    via = ""
    if isinstance(reason, urllib3.exceptions.ProxyError):
        reason, via = reason.original_error, "proxy: "
    if isinstance(reason, _NAME_RESOLUTION_ERROR):
        return f"{via}cannot resolve the host name"
    if isinstance(reason, urllib3.exceptions.NewConnectionError):
        text = str(reason).rsplit("]", 1)[-1].strip()  # "… [Errno 111] Connection refused"
        return via + (text[:1].lower() + text[1:] if text else "cannot connect")
    if isinstance(reason, urllib3.exceptions.ConnectTimeoutError):
        return f"{via}no answer to the connection attempt (timed out)"
    return None


def _brief(exc: BaseException) -> str:
    text = str(exc) or type(exc).__name__
    if isinstance(exc, requests.Timeout) or "timed out" in text.lower():
        return "timed out"
    if isinstance(exc, requests.ConnectionError):
        return "connection failed"
    if isinstance(exc, (requests.exceptions.ChunkedEncodingError, urllib3.exceptions.ProtocolError)):
        return "connection dropped mid-transfer"
    return text


# ---------------------------------------------------------------- Google Drive


class _DrivePage(HTMLParser):
    """Collects what Drive's 'cannot scan for viruses' page offers to continue."""

    def __init__(self) -> None:
        super().__init__()
        self.forms: list[tuple[str, dict[str, str]]] = []
        self.hrefs: list[str] = []
        self.errors: list[str] = []
        self._in_form = False
        self._error_depth = 0

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        if tag == "form":
            self.forms.append((a.get("action", ""), {}))
            self._in_form = True
        elif tag == "input" and self._in_form and a.get("name"):
            self.forms[-1][1][a["name"]] = a.get("value", "")
        elif tag == "a" and "confirm=" in a.get("href", ""):
            self.hrefs.append(a["href"])
        if "uc-error" in a.get("class", ""):
            self._error_depth += 1
            self.errors.append("")

    def handle_endtag(self, tag: str) -> None:
        if tag == "form":
            self._in_form = False
        elif self._error_depth and tag in ("p", "div", "span"):
            self._error_depth -= 1

    def handle_data(self, data: str) -> None:
        if self._error_depth:
            self.errors[-1] += data


def _drive_next(page: str, url: str, session: requests.Session, file_id: str) -> str | None:
    parser = _DrivePage()
    parser.feed(page)
    for action, fields in parser.forms:
        if "confirm" in fields or "id" in fields:
            return urljoin(url, action) + "?" + urlencode(fields)
    for href in parser.hrefs:
        return urljoin(url, href)
    marker = '"downloadUrl":"'
    if marker in page:
        raw = page.split(marker, 1)[1].split('"', 1)[0]
        return json.loads(f'"{raw}"')
    for cookie, value in session.cookies.items():
        if cookie.startswith("download_warning"):
            return _drive_url() + "?" + urlencode({"id": file_id, "export": "download", "confirm": value})
    return None


def _drive_error(page: str) -> str:
    parser = _DrivePage()
    parser.feed(page)
    text = " ".join(" ".join(e.split()) for e in parser.errors if e.strip())
    if text:
        return f"Google Drive says: {text}"
    return "Google Drive sent a page instead of the file (private, removed, or over its quota)"


def _drive_url() -> str:
    return os.environ.get(ENV_GDRIVE, GDRIVE_URL)


def _drive_open(session: requests.Session, file_id: str, settings: Settings) -> requests.Response:
    """Follow Drive's confirmation page(s) to the response that carries the file."""
    params = urlencode({"id": file_id, "export": "download"})
    resp = session.get(f"{_drive_url()}?{params}", stream=True, timeout=settings.timeout)
    for _ in range(3):
        if resp.status_code >= 500 or resp.status_code in (408, 429):
            resp.close()
            raise _Transient(f"HTTP {resp.status_code}")
        if resp.status_code != 200:
            resp.close()
            raise _SourceFailed(f"HTTP {resp.status_code} for Drive file {file_id}")
        if not _is_html(resp):
            return resp
        page = resp.text
        resp.close()
        nxt = _drive_next(page, resp.url, session, file_id)
        if nxt is None:
            raise _SourceFailed(_drive_error(page))
        resp = session.get(nxt, stream=True, timeout=settings.timeout)
    resp.close()
    raise _SourceFailed("Google Drive kept asking for confirmation")


# ---------------------------------------------------------------- fetch


def _read_local(src: Path) -> Iterator[bytes]:
    """The file's bytes; a file that cannot be read fails this source (a failed write is the cache's)."""
    try:
        with open(src, "rb") as fin:
            while chunk := fin.read(CHUNK):
                yield chunk
    except OSError as exc:
        raise _SourceFailed(f"cannot read it ({exc.strerror or exc})") from None


def _copy_local(src: Path, part: _Partial, report: _Report | None = None) -> _Result:
    digest = hashlib.sha256()
    size = 0
    try:
        total: int | None = src.stat().st_size
    except OSError:
        total = None  # reading says why
    with open(part.path, "wb") as fout:
        for chunk in _read_local(src):
            fout.write(chunk)
            digest.update(chunk)
            size += len(chunk)
            if report is not None:
                report(size, total)
        fout.flush()
        os.fsync(fout.fileno())
    return _Result(part, digest.hexdigest(), size)


def _session() -> requests.Session:
    session = requests.Session()
    session.headers["User-Agent"] = f"derestore/{__version__}"
    # Every request, Drive's pages included: gzip-encoded bytes would never match a pin.
    session.headers["Accept-Encoding"] = "identity"
    return session


def _download_one(record: ModelRecord, src: Source, settings: Settings, report: _Report) -> _Result:
    folder = model_dir(record)
    name = file_name(record)
    if src.kind == "file":
        path = Path(src.target)
        if not path.exists():
            raise _SourceFailed("no such file")
        if not path.is_file():
            raise _SourceFailed("not a regular file")
        part = _new_partial(folder, name, src.key)
        try:
            return _copy_local(path, part, report)
        except BaseException:
            part.discard()
            raise
    log.info("downloading %s from %s", record.name, src.label)
    with _session() as session:
        attempt = 0
        while True:
            try:
                if src.kind == "gdrive":
                    first = _drive_open(session, src.target, settings)
                    url = first.url
                else:
                    first, url = None, src.target
                return _http_download(session, url, src, folder, name, settings, report, first)
            except _TRANSIENT_ERRORS as exc:  # only Drive's page requests get here
                why = _unreachable(exc)
                if why:
                    raise _SourceFailed(why) from None
                attempt += 1
                if attempt > settings.retries:
                    raise _SourceFailed(f"{_brief(exc)} after {attempt} attempts") from None
                time.sleep(_backoff(settings, attempt))
            except requests.RequestException as exc:
                raise _SourceFailed(_brief(exc)) from None


def _commit(record: ModelRecord, result: _Result, source: str) -> Path:
    """Metadata first, then the atomic rename: a reader never sees a file without its digest."""
    target = target_path(record)
    st = result.part.path.stat()
    entry = CacheEntry(
        name=record.name,
        file_name=target.name,
        sha256=result.sha256,
        size=result.size,
        source=source,
        pinned=pinned(record),
        fetched_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        stamp=_stamp(st),
    )
    _write_entry(record, entry)
    os.replace(result.part.path, target)
    result.part.info_path.unlink(missing_ok=True)
    return target


def _what_came(result: _Result) -> str:
    """What a source delivered, for a message: its size and the server's Content-Type."""
    if result.content_type is None:
        return f"{result.size} bytes"
    return f"{result.size} bytes (Content-Type {result.content_type or 'not given'})"


def _check(record: ModelRecord, result: _Result, want: str | None, check: CheckCallback | None) -> None:
    """The delivered file is the record's: size, git blob id, sha256, and for unpinned records `check`."""
    if record.size and result.size != record.size:
        raise _SourceFailed(
            f"size mismatch: got {result.size} bytes, the registry expects {record.size}; file deleted"
        )
    if record.git_blob_sha1 and not record.sha256:
        blob = git_blob_sha1(result.part.path)
        if blob != record.git_blob_sha1:
            raise _SourceFailed(
                f"git blob sha1 mismatch: got {blob}, the registry pins {record.git_blob_sha1}; file deleted"
            )
    if want and result.sha256 != want:
        how = "the registry pins" if record.sha256 else "first download recorded"
        hint = "" if record.sha256 else f" (if the new file is genuine, `derestore weights rm {record.name}` forgets the old digest)"
        raise _SourceFailed(
            f"sha256 mismatch: got {result.sha256}, {how} {want}; file deleted{hint}"
        )
    if not pinned(record) and check is not None:
        try:
            check(result.part.path)
        except ModelUnavailable as exc:
            # The loader names the temporary file, which is about to go: say "the file" instead.
            reason = str(exc).replace(str(result.part.path), "the file")
            raise _SourceFailed(
                f"got {_what_came(result)}, which is not a {record.arch} checkpoint: {reason}; file deleted"
            ) from None


def bundled_path(record: ModelRecord) -> Path:
    """The checkpoint shipped inside the package, checked against its pin (it is small)."""
    from importlib import resources

    path = Path(str(resources.files("derestore").joinpath(record.bundled or "")))
    if not path.is_file():
        raise ModelUnavailable(f"{record.name}: {path} is missing from this installation; reinstall derestore")
    if record.sha256 and sha256_file(path) != record.sha256:
        raise ModelUnavailable(f"{record.name}: {path} does not match its sha256 {record.sha256}; "
                               "the installation is damaged, reinstall derestore")
    return path


def _unverifiable(record: ModelRecord) -> ModelUnavailable:
    return ModelUnavailable(
        f"{record.name}: the registry pins no digest for it, so a download can only be trusted once it "
        f"loads as {record.arch}, and no load check was given; pass one (derestore.load does)"
    )


def fetch(
    record: ModelRecord,
    *,
    offline: bool | None = None,
    progress: ProgressCallback | None = None,
    check: CheckCallback | None = None,
) -> Path:
    """The cached checkpoint, downloading (and verifying) it first if needed.

    `progress(name, done, total)` is called as bytes arrive (total None when
    the server does not say). `check(path)` must raise ModelUnavailable unless
    the file loads as `record.arch`: it is what makes a download of a record
    without a pinned digest trustworthy, so such a record is refused without it.
    Raises ModelUnavailable with a one-line reason: every source's failure, or how
    to fetch a browser-only checkpoint by hand and import it.
    """
    if record.bundled:
        return bundled_path(record)
    hit = cached_path(record)
    if hit is not None:
        return hit
    if offline is None:
        offline = _env_flag(ENV_OFFLINE)
    candidates = sources(record)
    if not candidates:
        raise ModelUnavailable(
            f"{record.name} has no automatic download: {manual_instructions(record)}"
        )
    if offline:
        candidates = [s for s in candidates if s.local]
        if not candidates:
            raise ModelUnavailable(
                f"{record.name} is not in the cache ({model_dir(record)}) and {ENV_OFFLINE}=1 "
                f"forbids downloading; run `derestore weights download {record.name}` where there "
                f"is network and copy the cache, or run {_import_command(record)}"
            )
    if not pinned(record) and check is None:
        raise _unverifiable(record)
    settings = Settings.from_env()
    folder = model_dir(record)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _lock(record):
            hit = cached_path(record)  # another process may have fetched it while we waited
            if hit is not None:
                return hit
            return _fetch_locked(record, candidates, settings, progress, check)
    except OSError as exc:
        raise ModelUnavailable(
            f"cannot write the cache for {record.name} in {folder} ({exc.strerror or exc}); "
            f"free some space or point {ENV_HOME} at a writable folder"
        ) from None


def _fetch_locked(
    record: ModelRecord,
    candidates: list[Source],
    settings: Settings,
    progress: ProgressCallback | None,
    check: CheckCallback | None,
) -> Path:
    def report(done: int, total: int | None) -> None:
        if progress is not None:
            progress(record.name, done, total)

    folder = model_dir(record)
    want = expected_sha256(record)
    failures: list[str] = []
    for i, src in enumerate(candidates):
        try:
            result = _download_one(record, src, settings, report)
            try:
                _check(record, result, want, check)
            except BaseException:
                result.part.discard()
                raise
        except _SourceFailed as exc:
            failures.append(f"{src.label}: {exc}")
        else:
            path = _commit(record, result, src.label)
            _sweep(folder)
            return path
        if i + 1 < len(candidates):
            log.warning("%s: %s; trying the next source", record.name, failures[-1])
    hint = f"; or {manual_instructions(record)}" if record.manual_url else ""
    raise ModelUnavailable(f"could not download {record.name}: " + "; ".join(failures) + hint)


def import_file(
    record: ModelRecord,
    file: Path,
    *,
    check_loads: CheckCallback | None = None,
) -> Path:
    """Copy a checkpoint the user fetched by hand into the cache, verified by content.

    A pinned record must match its sha256 (or git blob id). Otherwise
    `check_loads(file)` must accept it (it raises ModelUnavailable when the file
    does not load as the record's architecture); its digest is then recorded
    like a first download. A bundled record is refused: its file is always the
    one shipped with derestore.
    """
    if record.bundled:
        raise UsageError(
            f"{record.name} ships with derestore and is always read from the installation, never from "
            "the cache; load your file directly, or give it a registry entry under another name"
        )
    src = Path(file).expanduser()
    if not src.is_file():
        raise UsageError(f"{src}: no such file; give the path of the checkpoint you downloaded")
    if record.git_blob_sha1 and not record.sha256:
        blob = git_blob_sha1(src)
        if blob != record.git_blob_sha1:
            raise ModelUnavailable(
                f"{src} is not {record.name}: its git blob sha1 is {blob}, the registry pins "
                f"{record.git_blob_sha1}; nothing was imported"
            )
    elif not pinned(record):
        if check_loads is None:
            raise _unverifiable(record)
        check_loads(src)
    folder = model_dir(record)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with _lock(record):
            part = _new_partial(folder, file_name(record), "import")
            try:
                result = _copy_local(src, part)
                if record.sha256 and result.sha256 != record.sha256:
                    raise ModelUnavailable(
                        f"{src} is not {record.name}: its sha256 is {result.sha256}, the registry pins "
                        f"{record.sha256}; nothing was imported"
                    )
                return _commit(record, result, f"import:{src.resolve()}")
            finally:
                part.discard()
    except _SourceFailed as exc:
        raise UsageError(f"{src}: {exc}; nothing was imported") from None
    except OSError as exc:
        raise ModelUnavailable(
            f"cannot write the cache for {record.name} in {folder} ({exc.strerror or exc}); "
            f"free some space or point {ENV_HOME} at a writable folder"
        ) from None
