"""Atomic writes and temp-file ownership: a leftover is removed only when its writer provably died here."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from derestore import atomic
from derestore.imageio import is_image_path


def test_temp_names_are_hidden_unique_and_fit_name_max(tmp_path: Path) -> None:
    out = tmp_path / "photo.png"
    temp = atomic.temp_path_for(out)
    assert temp.parent == tmp_path and temp.name.startswith(".photo.png.") and temp != atomic.temp_path_for(out)
    assert atomic.is_temp_file(temp) and not is_image_path(temp)
    assert f"-{atomic.host_tag()}-{os.getpid()}-" in temp.name
    assert not atomic.is_temp_file(out) and not atomic.is_temp_file(tmp_path / ".hidden.png")
    assert not atomic.is_temp_file("x.tmp")
    long_name = tmp_path / ("雨" * 80 + ".png")  # 240 bytes: the temp name must still fit in 255
    assert len(atomic.temp_path_for(long_name).name.encode()) <= 255
    assert atomic.is_temp_file(atomic.temp_path_for(long_name))
    undecodable = tmp_path / os.fsdecode(b"\xff" * 200 + b".png")
    assert len(os.fsencode(atomic.temp_path_for(undecodable).name)) <= 255


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _temp_of(folder: Path, tag: str, pid: int) -> Path:
    path = folder / f".img.png.derestore-{tag}-{pid}-0123abcd.tmp"
    path.write_bytes(b"half a png")
    return path


def test_sweep_removes_only_a_dead_writer_of_this_host(tmp_path: Path) -> None:
    dead = _temp_of(tmp_path, atomic.host_tag(), _dead_pid())
    live = _temp_of(tmp_path, atomic.host_tag(), os.getppid())
    own = atomic.temp_path_for(tmp_path / "mine.png")
    own.write_bytes(b"")
    # The same PID from another host or PID namespace (another tag) is not ours to judge.
    other_host = _temp_of(tmp_path, "00000000" if atomic.host_tag() != "00000000" else "11111111", _dead_pid())
    old = 0
    os.utime(other_host, (old, old))  # however old: age proves nothing on a shared file system
    assert atomic.sweep(tmp_path) == [dead]
    assert live.exists() and own.exists() and other_host.exists() and not dead.exists()


def test_host_tag_differs_in_another_pid_namespace() -> None:
    code = "from derestore import atomic; print(atomic.host_tag())"
    try:
        out = subprocess.run(["unshare", "--pid", "--fork", sys.executable, "-c", code],
                             capture_output=True, text=True, timeout=60)
    except FileNotFoundError:
        pytest.skip("unshare is not installed")
    if out.returncode != 0:
        pytest.skip(f"cannot create a PID namespace here: {out.stderr.strip()[:200]}")
    assert len(out.stdout.strip()) == 8 and out.stdout.strip() != atomic.host_tag()


def test_failed_write_removes_its_temp_and_keeps_the_old_file(tmp_path: Path) -> None:
    target = tmp_path / "record.json"
    target.write_text("old")

    def fill(fh):
        fh.write(b"partial")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match="No space left"):
        atomic.write(target, fill)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["record.json"]


def test_written_file_has_umask_permissions(tmp_path: Path) -> None:
    atomic.write_text(tmp_path / "a.json", "{}")
    mask = os.umask(0)
    os.umask(mask)
    assert (tmp_path / "a.json").stat().st_mode & 0o777 == 0o666 & ~mask
