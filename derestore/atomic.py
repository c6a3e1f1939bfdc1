"""Atomic file writes and the identity of their writers; the one place derestore names temp files.

Every file derestore writes (images, run records, reports, cache metadata) is
written to a hidden temporary name in the destination folder, fsync'd and
renamed over the final name, so a reader sees the whole file or none.

The temporary name carries its writer's identity: a tag for (host name, boot,
PID namespace) and the PID. Folders are shared between hosts (SLURM arrays on
NFS), containers and PID namespaces, where a PID alone means nothing; a
leftover is removed only when its tag is this process's own and its PID is no
longer running, i.e. provably a dead writer of this machine.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import os
import re
import secrets
import socket
from collections.abc import Callable
from pathlib import Path
from typing import IO, TypeVar

T = TypeVar("T")

_TEMP_NAME = re.compile(r"\..*\.derestore-(?P<tag>[0-9a-f]{8})-(?P<pid>\d+)-[0-9a-f]{8}\.tmp", re.DOTALL)
# Bytes of the final name kept in the temporary name: the whole stays within NAME_MAX (255).
_NAME_BYTES = 120


def _read_first_line(path: str) -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as fh:
            return fh.readline().strip()
    except OSError:
        return ""


@functools.lru_cache(maxsize=1)
def host_tag() -> str:
    """8 hex digits naming this host, boot and PID namespace: where a PID is meaningful."""
    try:
        namespace = os.readlink("/proc/self/ns/pid")
    except OSError:
        namespace = ""
    identity = "\0".join((socket.gethostname(), _read_first_line("/proc/sys/kernel/random/boot_id"), namespace))
    return hashlib.sha256(identity.encode("utf-8", "surrogateescape")).hexdigest()[:8]


def pid_alive(pid: int) -> bool:
    """Whether a process with this PID runs in this PID namespace (unknown counts as alive)."""
    if pid <= 0:
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:
        return True  # EPERM: someone else's live process
    return True


def writer_alive(tag: object, pid: object) -> bool:
    """False only for a writer that provably died: same host, boot and PID namespace, PID gone.

    Used for temp names and for the hub's partial downloads, whose sidecars record the same pair.
    """
    if tag != host_tag() or not isinstance(pid, int):
        return True
    if pid == os.getpid():
        return True
    return pid_alive(pid)


def _cut(name: str) -> str:
    """The longest prefix of `name` within _NAME_BYTES bytes, cut between characters."""
    out = []
    size = 0
    for ch in name:
        size += len(os.fsencode(ch))
        if size > _NAME_BYTES:
            break
        out.append(ch)
    return "".join(out)


def temp_path_for(path: str | os.PathLike[str]) -> Path:
    """A fresh hidden temporary name next to `path` that carries this writer's identity."""
    path = Path(path)
    return path.with_name(f".{_cut(path.name)}.derestore-{host_tag()}-{os.getpid()}-{secrets.token_hex(4)}.tmp")


def is_temp_file(path: str | os.PathLike[str]) -> bool:
    """Whether `path` is a temporary name of `temp_path_for` (a write in progress, or a killed one's leftover)."""
    return _TEMP_NAME.fullmatch(Path(path).name) is not None


def is_abandoned(path: str | os.PathLike[str]) -> bool:
    """A temporary file whose writer provably died (see `writer_alive`)."""
    match = _TEMP_NAME.fullmatch(Path(path).name)
    return match is not None and not writer_alive(match["tag"], int(match["pid"]))


def sweep(folder: str | os.PathLike[str]) -> list[Path]:
    """Delete the abandoned temporary files in `folder`; returns what was removed."""
    removed = []
    try:
        entries = list(Path(folder).iterdir())
    except OSError:
        return removed
    for path in entries:
        if is_abandoned(path):
            with contextlib.suppress(OSError):  # another sweeper got there first, or not ours to remove
                path.unlink()
                removed.append(path)
    return removed


def write(path: str | os.PathLike[str], fill: Callable[[IO[bytes]], T]) -> T:
    """Create `path` atomically: `fill(fh)` writes a temporary file, which is fsync'd and renamed over `path`.

    Any failure (a full disk, an encoder error, Ctrl-C) removes the temporary
    file and re-raises; whatever `path` held before is untouched. The file gets
    the usual permissions (umask), not mkstemp's 0600.
    """
    path = Path(path)
    temp = temp_path_for(path)
    try:
        with open(temp, "xb") as fh:
            value = fill(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            temp.unlink()
        raise
    return value


def write_bytes(path: str | os.PathLike[str], data: bytes) -> None:
    write(path, lambda fh: fh.write(data))


def write_text(path: str | os.PathLike[str], text: str) -> None:
    """UTF-8; undecodable bytes of file names in `text` (surrogateescape) are written back as they were."""
    write_bytes(path, text.encode("utf-8", "surrogateescape"))
