"""Batch jobs that never lose work: lists, collisions, shards, resume, interruption, bad files, fallbacks."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image as PILImage
from typer.testing import CliRunner

from derestore.cli import app

from .conftest import cli_command as _cli
from .conftest import decodes, dncnn_state, save_checkpoint, smooth_image, write_images

runner = CliRunner()


def invoke(*args, input: str | None = None):
    return runner.invoke(app, [str(a) for a in args], input=input)


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "dncnn.pth", dncnn_state(nb=4), "params")


def test_from_list_including_stdin_and_missing_entry(tmp_path, ckpt):
    imgs = write_images(tmp_path / "in", 3)
    listing = tmp_path / "list.txt"
    listing.write_text(f"# batch\n{imgs[0]}\n\n{imgs[2]}\n{tmp_path / 'gone.png'}\n")
    res = invoke("derain", "--from-list", listing, "-o", tmp_path / "out", "--weights", ckpt, "--json")
    assert res.exit_code == 1  # the missing entry fails, the others are written
    records = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["status"] for r in records[:-1]] == ["failed", "ok", "ok"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["img000.png", "img002.png"]
    res = invoke("derain", "--from-list", "-", "-o", tmp_path / "out2", "--weights", ckpt, input=f"{imgs[1]}\n")
    assert res.exit_code == 0 and (tmp_path / "out2" / "img001.png").is_file()


def test_collision_error_and_keep_tree(tmp_path, ckpt):
    for sub in ("a", "b/c"):
        write_images(tmp_path / "in" / sub, 1)
    res = invoke("derain", tmp_path / "in", "-r", "-o", tmp_path / "out", "--weights", ckpt)
    assert res.exit_code == 2 and "--keep-tree" in res.stderr
    assert not (tmp_path / "out").exists()
    res = invoke("derain", tmp_path / "in", "-r", "--keep-tree", "-o", tmp_path / "out", "--weights", ckpt)
    assert res.exit_code == 0
    assert (tmp_path / "out" / "a" / "img000.png").is_file()
    assert (tmp_path / "out" / "b" / "c" / "img000.png").is_file()


def test_shards_are_disjoint_and_cover_everything(tmp_path, ckpt):
    write_images(tmp_path / "in", 11)
    out = tmp_path / "out"
    seen: list[str] = []
    for k in range(3):
        res = invoke("derain", tmp_path / "in", "-o", out, "--weights", ckpt, "--shard", f"{k}/3", "--json")
        assert res.exit_code == 0, res.output
        seen += [json.loads(line)["input"] for line in res.stdout.splitlines()[:-1]]
        assert (out / f"derestore-run.shard-{k}-of-3.json").is_file()
    assert len(seen) == len(set(seen)) == 11
    assert len(list(out.glob("img*.png"))) == 11
    for bad in ("3/3", "x/2", "1", "-1/2"):
        assert invoke("derain", tmp_path / "in", "-o", out, "--weights", ckpt, "--shard", bad).exit_code == 2


def test_skip_existing_and_manifest(tmp_path, ckpt):
    write_images(tmp_path / "in", 4)
    out = tmp_path / "out"
    assert invoke("derain", tmp_path / "in", "-o", out, "--weights", ckpt).exit_code == 0
    (out / "img001.png").unlink()
    res = invoke("derain", tmp_path / "in", "-o", out, "--weights", ckpt, "--skip-existing", "--json")
    assert res.exit_code == 0
    statuses = [json.loads(line)["status"] for line in res.stdout.splitlines()[:-1]]
    assert statuses.count("skipped") == 3 and statuses.count("ok") == 1
    manifest = json.loads((out / "derestore-run.json").read_text())
    assert manifest["counts"]["skipped"] == 3 and manifest["counts"]["ok"] == 1
    assert len(manifest["sha256"]) == 64 and manifest["version"] and manifest["options"]["skip_existing"] is True


def test_corrupt_batch_reports_each_bad_file(tmp_path, ckpt):
    src = tmp_path / "in"
    write_images(src, 2)
    (src / "zero.png").write_bytes(b"")
    (src / "text.jpg").write_text("hello")
    good = (src / "img000.png").read_bytes()
    (src / "trunc.png").write_bytes(good[: len(good) // 2])
    PILImage.fromarray(np.zeros((300, 300, 3), np.uint8)).save(src / "huge.png")
    res = invoke("derain", src, "-o", tmp_path / "out", "--weights", ckpt, "--json", "--max-pixels", "10000")
    assert res.exit_code == 1
    records = {Path(r["input"]).name: r for r in map(json.loads, res.stdout.splitlines()[:-1])}
    for name in ("zero.png", "text.jpg", "trunc.png", "huge.png"):
        assert records[name]["status"] == "failed" and name in records[name]["error"]
    assert "10,000" in records["huge.png"]["error"]
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == ["img000.png", "img001.png"]


def test_fail_fast_stops_at_first_failure(tmp_path, ckpt):
    src = tmp_path / "in"
    write_images(src, 3)
    (src / "img000.png").write_bytes(b"junk")
    res = invoke("derain", src, "-o", tmp_path / "out", "--weights", ckpt, "--fail-fast", "--json")
    assert res.exit_code == 1
    assert len(res.stdout.splitlines()) == 2  # the failure, then the summary
    assert not list((tmp_path / "out").glob("img*.png"))


def test_unwritable_output_is_a_per_file_failure(tmp_path, ckpt):
    # A directory where the output file should go: no write can replace it, as root or not.
    write_images(tmp_path / "in", 2)
    (tmp_path / "out" / "img000.png").mkdir(parents=True)
    res = invoke("derain", tmp_path / "in", "-o", tmp_path / "out", "--weights", ckpt)
    assert res.exit_code == 1 and "img000.png" in res.stderr
    assert (tmp_path / "out" / "img001.png").is_file()


def test_only_a_dead_writer_of_this_host_loses_its_temp_file(tmp_path, ckpt):
    from derestore import atomic

    write_images(tmp_path / "in", 1)
    out = tmp_path / "out"
    out.mkdir()
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    stale = out / f".img000.png.derestore-{atomic.host_tag()}-{dead.pid}-0123abcd.tmp"
    # Another host or PID namespace (another tag) writing into the same shared folder, with our dead PID.
    other_tag = "0" * 8 if atomic.host_tag() != "0" * 8 else "1" * 8
    foreign = out / f".img000.png.derestore-{other_tag}-{dead.pid}-0123abcd.tmp"
    for path in (stale, foreign):
        path.write_bytes(b"half a png")
        os.utime(path, (0, 0))
    assert invoke("derain", tmp_path / "in", "-o", out, "--weights", ckpt).exit_code == 0
    assert not stale.exists() and foreign.read_bytes() == b"half a png"


class _Payload:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_malicious_checkpoint_refused_with_exit_3(tmp_path):
    write_images(tmp_path / "in", 1)
    marker = tmp_path / "marker"
    evil = tmp_path / "evil.pth"
    torch.save({"params": _Payload(marker)}, evil)
    res = invoke("derain", tmp_path / "in", "-o", tmp_path / "out", "--weights", evil)
    assert res.exit_code == 3 and "refused" in res.stderr
    assert not marker.exists()


def test_broken_half_precision_is_redone_in_fp32(tmp_path, ckpt, monkeypatch):
    import derestore

    model = derestore.load(weights=ckpt, device="cpu", backend="torch")  # half precision is PyTorch's
    model.engine.dtype = torch.bfloat16
    real = model.engine._forward

    def nan_in_half(batch, dtype=None):
        out = real(batch, torch.float32)
        return out if dtype == torch.float32 else out * float("nan")

    monkeypatch.setattr(model.engine, "_forward", nan_in_half)
    img = smooth_image(40, 40).transpose(2, 0, 1).astype(np.float32)
    out, notes = model.restore_array(img, tile=0)
    assert np.isfinite(out).all() and any("redone in fp32" in n for n in notes)


def _wait_for_outputs(folder: Path, count: int, proc: subprocess.Popen, timeout: float = 60) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if folder.is_dir() and len(list(folder.glob("*.png"))) >= count:
            return
        time.sleep(0.02)
    raise AssertionError("the run did not get going")


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 130)])
def test_interrupt_finishes_cleanly_with_130(tmp_path, sig, code):
    ckpt = save_checkpoint(tmp_path / "slow.pth", dncnn_state(nc=16, nb=8), "params")
    write_images(tmp_path / "in", 40, size=96)
    out = tmp_path / "out"
    proc = subprocess.Popen(_cli("derain", str(tmp_path / "in"), "-o", str(out), "--weights", str(ckpt), "--tile", "0"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for_outputs(out, 2, proc)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "interrupted" in err
    written = list(out.glob("*.png"))
    assert 2 <= len(written) < 40 and all(decodes(p) for p in written)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temp file left behind
    assert json.loads((out / "derestore-run.json").read_text())["counts"]["interrupted"] is True


def test_sigkill_then_skip_existing_completes_the_set(tmp_path):
    ckpt = save_checkpoint(tmp_path / "slow.pth", dncnn_state(nc=16, nb=8), "params")
    write_images(tmp_path / "in", 30, size=96)
    out = tmp_path / "out"
    proc = subprocess.Popen(_cli("derain", str(tmp_path / "in"), "-o", str(out), "--weights", str(ckpt), "--tile", "0"),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    _wait_for_outputs(out, 3, proc)
    proc.kill()
    proc.wait()
    before = {p.name for p in out.glob("*.png")}
    assert 3 <= len(before) < 30 and all(decodes(out / n) for n in before)
    done = subprocess.run(_cli("derain", str(tmp_path / "in"), "-o", str(out), "--weights", str(ckpt), "--tile", "0",
                               "--skip-existing", "--json"), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    statuses = [json.loads(line)["status"] for line in done.stdout.splitlines()[:-1]]
    assert statuses.count("skipped") == len(before) and statuses.count("ok") == 30 - len(before)
    outputs = sorted(out.glob("*.png"))
    assert len(outputs) == 30 and all(decodes(p) for p in outputs)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]
