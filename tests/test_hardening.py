"""A careful, hostile user's reproductions: nothing of theirs overwritten, no tracebacks, one line per event.

Each test is a command a user ran, its files and its exit code (issue 13).
"""

from __future__ import annotations

import errno
import json
import os
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

from .conftest import cli_command, dncnn_state, save_checkpoint, smooth_image, to_uint, write_images

runner = CliRunner()


def invoke(*args: object, env: dict[str, str] | None = None):
    return runner.invoke(app, [str(a) for a in args], env=env)


def run_cli(*args: object, env: dict[str, str] | None = None, timeout: float = 120,
            **kwargs: object) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run(cli_command(*map(str, args)), capture_output=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, **kwargs)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


@pytest.fixture
def ckpt(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "dncnn.pth", dncnn_state(nb=4), "params")


@pytest.fixture
def slow_ckpt(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "slow.pth", dncnn_state(nc=16, nb=8), "params")


def one_line_error(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


# ---------------------------------------------------------------- data loss


def test_output_into_the_ground_truth_folder_is_refused_and_gt_untouched(tmp_path, ckpt):
    write_images(tmp_path / "in", 2)
    gt = tmp_path / "gt"
    write_images(gt, 2, size=30)
    before = snapshot(gt)
    res = invoke("derain", tmp_path / "in", "-o", gt, "--gt", gt, "--weights", ckpt)
    assert res.exit_code == 2
    line = one_line_error(res.stderr)
    assert str(gt / "img000.png") in line and "ground-truth folder" in line
    assert snapshot(gt) == before


@pytest.mark.parametrize("option", ["--report", "--csv"])
@pytest.mark.parametrize("side", ["gt", "pred"])
def test_eval_report_over_a_scored_image_is_refused(tmp_path, option, side):
    write_images(tmp_path / "gt", 2)
    write_images(tmp_path / "pred", 2, size=24)
    before = {s: snapshot(tmp_path / s) for s in ("gt", "pred")}
    victim = tmp_path / side / "img001.png"
    res = invoke("eval", "--gt", tmp_path / "gt", "--pred", tmp_path / "pred", option, victim)
    assert res.exit_code == 2
    line = one_line_error(res.stderr)
    assert line.count(str(victim)) == 2  # names the option's file and the image it would replace
    assert {s: snapshot(tmp_path / s) for s in ("gt", "pred")} == before


def test_existing_file_as_output_folder_is_refused_before_the_model_loads(tmp_path):
    write_images(tmp_path / "in", 2)
    out = tmp_path / "out.png"
    out.write_bytes(b"precious")
    # An unavailable model (exit 3) shows the check happens before any loading.
    res = invoke("derain", tmp_path / "in", "-o", out, "-m", "restormer-derain",
                 env={"DERESTORE_OFFLINE": "1", "DERESTORE_HOME": str(tmp_path / "cache")})
    assert res.exit_code == 2
    assert "is a file, not a folder" in one_line_error(res.stderr)
    assert out.read_bytes() == b"precious"


def test_unwritable_output_folder_is_refused_before_the_model_loads(tmp_path, monkeypatch):
    from derestore import atomic

    write_images(tmp_path / "in", 2)
    readonly = tmp_path / "ro"
    readonly.mkdir()
    real_touch = Path.touch

    def read_only_fs(self: Path, *args: object, **kwargs: object) -> None:
        if self.parent == readonly and atomic.is_temp_file(self):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(self))
        real_touch(self, *args, **kwargs)

    monkeypatch.setattr(Path, "touch", read_only_fs)
    res = invoke("derain", tmp_path / "in", "-o", readonly / "new", "-m", "restormer-derain",
                 env={"DERESTORE_OFFLINE": "1", "DERESTORE_HOME": str(tmp_path / "cache")})
    assert res.exit_code == 2
    line = one_line_error(res.stderr)
    assert f"output folder {readonly} is not writable (Read-only file system)" in line
    assert list(readonly.iterdir()) == []


def test_full_disk_at_the_run_record_is_one_line_and_leaves_no_temp_file(tmp_path, ckpt, monkeypatch):
    write_images(tmp_path / "in", 2)
    out = tmp_path / "out"
    real_fsync = os.fsync

    def full_for_the_record(fd: int) -> None:
        if "derestore-run.json" in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", full_for_the_record)
    res = invoke("derain", tmp_path / "in", "-o", out, "--weights", ckpt)
    assert res.exit_code == 1 and "Traceback" not in res.stderr
    errors = [line for line in res.stderr.splitlines() if line.startswith("error:")]
    assert errors == [f"error: cannot write the run record {out / 'derestore-run.json'}: No space left on device"]
    assert sorted(p.name for p in out.iterdir()) == ["img000.png", "img001.png"]


# ---------------------------------------------------------------- per-file failures


def test_a_model_error_on_one_image_fails_that_image_only(tmp_path, ckpt, monkeypatch):
    from derestore.engine import Engine

    for i, size in enumerate((24, 30, 24)):
        PILImage.fromarray(to_uint(smooth_image(size, size, seed=i))).save(tmp_path / f"img{i}.png")
    real = Engine.restore

    def shape_error(self, image, **kwargs):
        if image.shape[-1] == 30:
            raise RuntimeError("The size of tensor a (30) must match\nthe size of tensor b (32)")
        return real(self, image, **kwargs)

    monkeypatch.setattr(Engine, "restore", shape_error)
    out = tmp_path / "out"
    res = invoke("derain", *(tmp_path / f"img{i}.png" for i in range(3)), "-o", out, "--weights", ckpt, "--json")
    assert res.exit_code == 1 and "Traceback" not in res.stderr
    records = [json.loads(line) for line in res.stdout.splitlines()]
    assert [r["status"] for r in records[:-1]] == ["ok", "failed", "ok"]
    assert records[1]["error"] == (f"{tmp_path / 'img1.png'}: RuntimeError: The size of tensor a (30) must match "
                                   "the size of tensor b (32)")
    counts = json.loads((out / "derestore-run.json").read_text())["counts"]
    assert (counts["ok"], counts["failed"], counts["total"]) == (2, 1, 3)


def test_a_device_failure_stops_the_run_and_keeps_the_record(tmp_path, ckpt, monkeypatch):
    from derestore.engine import Engine

    write_images(tmp_path / "in", 4)
    real = Engine.restore
    calls = []

    def poisoned(self, image, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise torch.AcceleratorError("CUDA error: an illegal memory access was encountered")
        return real(self, image, **kwargs)

    monkeypatch.setattr(Engine, "restore", poisoned)
    out = tmp_path / "out"
    res = invoke("derain", tmp_path / "in", "-o", out, "--weights", ckpt, "--json")
    assert res.exit_code == 1 and "Traceback" not in res.stderr and len(calls) == 2
    assert "illegal memory access" in res.stderr and "rerun with --skip-existing" in res.stderr
    statuses = [json.loads(line).get("status") for line in res.stdout.splitlines()[:-1]]
    assert statuses == ["ok", "failed"]
    record = json.loads((out / "derestore-run.json").read_text())["counts"]
    assert record["ok"] == 1 and record["failed"] == 1 and "illegal memory access" in record["stopped"]
    assert sorted(p.name for p in out.glob("*.png")) == ["img000.png"]


@pytest.mark.parametrize("error", [
    torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:127] err == 0. DefaultCPUAllocator: can't allocate memory: you "
                 "tried to allocate 40000000000000 bytes. Error code 12 (Cannot allocate memory)"),
    MemoryError(),
], ids=["cuda", "cpu-allocator", "python"])
def test_cpu_and_gpu_out_of_memory_retry_with_smaller_tiles(ckpt, monkeypatch, error):
    import derestore

    model = derestore.load(weights=ckpt, device="cpu")
    real = model.engine._forward
    sizes = []

    def flaky(batch, dtype=None):
        sizes.append(batch.shape[-1])
        if batch.shape[-1] > 100:
            raise error
        return real(batch, dtype)

    monkeypatch.setattr(model.engine, "_forward", flaky)
    img = smooth_image(150, 150).transpose(2, 0, 1).astype(np.float32)
    out, notes = model.restore_array(img, tile=0, overlap=8)
    whole, _ = derestore.load(weights=ckpt, device="cpu").restore_array(img, tile=0)
    assert sizes[0] == 150 and max(sizes[1:]) <= 75 and notes and "out of memory" in notes[0]
    _, again = model.restore_array(img, tile=0, overlap=8)
    assert again == []  # said once per model
    assert np.abs(out - whole).max() < 1e-5  # DnCNN's receptive radius (5) is within the overlap


# ---------------------------------------------------------------- closed stdout, markup, UTF-8


@pytest.mark.parametrize("command", ["--help", "models --json", "models"])
def test_closed_stdout_is_a_quiet_exit(tmp_path, command):
    err = tmp_path / "err"
    script = f"{' '.join(cli_command())} {command} 2>{err} | head -c 1 >/dev/null; echo ${{PIPESTATUS[0]}}"
    done = subprocess.run(["bash", "-c", script], capture_output=True, text=True, timeout=120)
    # 141 when a write met the closed pipe; 0 when everything fitted in the pipe's buffer first.
    assert done.stdout.strip() in ("0", "141") and "Traceback" not in err.read_text() and "rror" not in err.read_text()


def test_json_run_into_a_closed_pipe_stops_quietly_with_a_record(tmp_path, ckpt):
    write_images(tmp_path / "in", 6)
    out = tmp_path / "out"
    err = tmp_path / "err"
    cmd = " ".join(cli_command("derain", str(tmp_path / "in"), "-o", str(out), "--weights", str(ckpt), "--json"))
    done = subprocess.run(["bash", "-c", f"{cmd} 2>{err} | head -1 >/dev/null; echo ${{PIPESTATUS[0]}}"],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip() == "141" and "Traceback" not in err.read_text()
    assert "counts" in json.loads((out / "derestore-run.json").read_text())


def test_file_names_are_printed_as_they_are_not_as_markup(tmp_path, ckpt):
    names = ["IMG_0001 [edited].png", "a[/x].png", "b[bold]c.png"]  # a[/x].png: file x].png in folder a[
    (tmp_path / "a[").mkdir()
    for i, name in enumerate(names):
        PILImage.fromarray(to_uint(smooth_image(20, 20, seed=i))).save(tmp_path / name)
    done = run_cli("derain", *(tmp_path / n for n in names), "-o", tmp_path / "out", "--weights", ckpt, text=True)
    assert done.returncode == 0, done.stderr
    for name in names:
        assert f"{tmp_path / name} → {tmp_path / 'out' / Path(name).name}" in done.stderr
    assert sorted(p.name for p in (tmp_path / "out").glob("*.png")) == sorted(Path(n).name for n in names)


def test_json_lines_are_valid_utf8_with_undecodable_names_escaped(tmp_path, ckpt):
    folder = os.fsencode(tmp_path / "in")
    os.makedirs(folder)
    raw = b"caf\xe9 \xff.png"
    PILImage.fromarray(to_uint(smooth_image(20, 20))).save(os.path.join(folder, raw).decode("utf-8", "surrogateescape"))
    done = run_cli("derain", tmp_path / "in", "-o", tmp_path / "out", "--weights", ckpt, "--json")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.decode("utf-8").splitlines()  # strict: raises on invalid UTF-8
    record = json.loads(lines[0])
    assert os.fsencode(record["input"]).endswith(raw) and "\\udce9" in lines[0]
    assert os.path.exists(os.fsencode(record["output"]))
    json.loads((tmp_path / "out" / "derestore-run.json").read_text(encoding="utf-8"))


def test_log_lines_never_wrap(tmp_path, ckpt):
    deep = tmp_path / ("a-rather-long-folder-name-" * 6)
    deep.mkdir()
    bad = deep / ("broken-" * 12 + ".png")
    bad.write_bytes(b"not a png at all")
    done = run_cli("derain", bad, "-o", tmp_path / "out", "--weights", ckpt, text=True)
    assert done.returncode == 1
    failed = [line for line in done.stderr.splitlines() if line.startswith("failed:")]
    assert len(failed) == 1 and str(bad) in failed[0] and len(failed[0]) > 300


# ---------------------------------------------------------------- inputs


def test_named_pipe_in_a_list_fails_that_entry_without_hanging(tmp_path, ckpt):
    [img] = write_images(tmp_path / "in", 1)
    fifo = tmp_path / "stuck.png"
    os.mkfifo(fifo)
    listing = tmp_path / "list.txt"
    listing.write_text(f"{fifo}\n{img}\n")
    started = time.monotonic()
    done = run_cli("derain", "--from-list", listing, "-o", tmp_path / "out", "--weights", ckpt, "--json",
                   text=True, timeout=60)
    assert done.returncode == 1 and time.monotonic() - started < 30
    records = [json.loads(line) for line in done.stdout.splitlines()[:-1]]
    assert [r["status"] for r in records] == ["ok", "failed"]  # sorted: in/img000.png, stuck.png
    assert records[1]["error"] == f"{fifo}: is a named pipe (FIFO), not an image file"


def test_a_stalled_read_fails_that_input_after_the_time_bound(tmp_path, monkeypatch):
    from derestore import imageio, pipeline

    imgs = write_images(tmp_path / "in", 3)
    real = imageio.read_image

    def stalls(path, **kwargs):
        if path == imgs[1]:
            time.sleep(30)  # a dead network mount; the daemon reader is abandoned
        return real(path, **kwargs)

    monkeypatch.setattr(imageio, "read_image", stalls)
    jobs = [pipeline.Job(p, tmp_path / "out" / p.name) for p in imgs]
    started = time.monotonic()
    results = list(pipeline.run_jobs(jobs, pipeline.Step(lambda image, on_tiles: (image, [])), read_timeout=0.5))
    assert time.monotonic() - started < 10
    assert [r.status for r in results] == ["ok", "failed", "ok"]
    assert results[1].error == f"{imgs[1]}: reading took longer than 0.5 s (a stalled network file system or " \
                               "device?); skipped"


def test_sigterm_ends_a_run_stuck_on_a_read_within_seconds(tmp_path, ckpt):
    [img] = write_images(tmp_path / "in", 1)
    stuck = tmp_path / "stuck.py"
    # A read that never returns, as on a dead network mount: the reader thread blocks forever.
    stuck.write_text(
        "import sys, time, derestore.imageio as io\n"
        "real, marker = io.read_image, sys.argv[1]\n"
        "def read(path, **kw):\n"
        "    if 'never' in str(path):\n"
        "        open(marker, 'w').close(); time.sleep(3600)\n"
        "    return real(path, **kw)\n"
        "io.read_image = read\n"
        "sys.argv = ['derestore'] + sys.argv[2:]\n"
        "from derestore.cli import main\n"
        "main()\n"
    )
    never = tmp_path / "in" / "never.png"
    never.write_bytes(img.read_bytes())
    marker = tmp_path / "reading"
    proc = subprocess.Popen([sys.executable, str(stuck), str(marker), "derain", str(tmp_path / "in"), "-o",
                             str(tmp_path / "out"), "--weights", str(ckpt)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    time.sleep(0.3)
    proc.send_signal(signal.SIGTERM)
    started = time.monotonic()
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and time.monotonic() - started < 15, err
    record = json.loads((tmp_path / "out" / "derestore-run.json").read_text())
    assert record["counts"]["interrupted"] is True


def test_sigterm_during_model_loading_leaves_a_record(tmp_path, ckpt):
    write_images(tmp_path / "in", 2)
    slow = tmp_path / "slow_load.py"
    slow.write_text(
        "import sys, time, derestore.loading as loading\n"
        "marker = sys.argv[1]\n"
        "def load_model(*args, **kwargs):\n"
        "    open(marker, 'w').close(); time.sleep(60)\n"
        "loading.load_model = load_model\n"
        "sys.argv = ['derestore'] + sys.argv[2:]\n"
        "from derestore.cli import main\n"
        "main()\n"
    )
    marker = tmp_path / "loading"
    out = tmp_path / "out"
    proc = subprocess.Popen([sys.executable, str(slow), str(marker), "derain", str(tmp_path / "in"), "-o", str(out),
                             "--weights", str(ckpt)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130 and "interrupted" in err and "Traceback" not in err
    record = json.loads((out / "derestore-run.json").read_text())
    assert record["counts"]["interrupted"] is True and record["model"] is None and record["counts"]["ok"] == 0


def test_folder_entries_that_are_not_files_fail_with_their_reason(tmp_path, ckpt):
    write_images(tmp_path / "in", 1)
    (tmp_path / "in" / "dir.png").mkdir()
    (tmp_path / "in" / "gone.png").symlink_to(tmp_path / "deleted.png")
    os.mkfifo(tmp_path / "in" / "pipe.png")
    res = invoke("derain", tmp_path / "in", "-o", tmp_path / "out", "--weights", ckpt, "--json")
    assert res.exit_code == 1
    errors = {Path(r["input"]).name: r["error"] for r in map(json.loads, res.stdout.splitlines()[:-1])}
    assert errors == {
        "dir.png": f"{tmp_path / 'in' / 'dir.png'}: is a folder, not an image file",
        "gone.png": f"{tmp_path / 'in' / 'gone.png'}: is a broken symbolic link (to {tmp_path / 'deleted.png'})",
        "img000.png": None,
        "pipe.png": f"{tmp_path / 'in' / 'pipe.png'}: is a named pipe (FIFO), not an image file",
    }


@pytest.mark.parametrize("kind", ["broken link", "fifo"])
def test_named_input_that_is_not_a_file_says_what_it_is(tmp_path, ckpt, kind):
    path = tmp_path / "x.png"
    if kind == "fifo":
        os.mkfifo(path)
        reason = "is a named pipe (FIFO)"
    else:
        path.symlink_to(tmp_path / "nowhere.png")
        reason = f"is a broken symbolic link (to {tmp_path / 'nowhere.png'})"
    res = invoke("derain", path, "-o", tmp_path / "out", "--weights", ckpt)
    assert res.exit_code == 2
    assert one_line_error(res.stderr) == f"error: input '{path}' {reason}; name an image file or a folder"


def test_a_symlink_loop_restores_each_file_once(tmp_path, ckpt):
    write_images(tmp_path / "loop" / "sub", 1)
    (tmp_path / "loop" / "sub" / "back").symlink_to("..")
    res = invoke("derain", f"{tmp_path}/loop/**/*.png", "-r", "-o", tmp_path / "out", "--weights", ckpt, "--json")
    assert res.exit_code == 0, res.stderr
    assert [json.loads(line)["status"] for line in res.stdout.splitlines()[:-1]] == ["ok"]


def test_multi_page_tiff_restores_the_first_page_and_says_so(tmp_path, ckpt):
    pages = [PILImage.fromarray(to_uint(smooth_image(20, 20, seed=i))) for i in range(3)]
    pages[0].save(tmp_path / "scan.tif", save_all=True, append_images=pages[1:])
    res = invoke("derain", tmp_path / "scan.tif", "-o", tmp_path / "out", "--weights", ckpt, "--json")
    assert res.exit_code == 0
    record = json.loads(res.stdout.splitlines()[0])
    assert record["notes"] == [f"{tmp_path / 'scan.tif'} has 3 frames or pages; only the first was restored"]
    assert f"note: {tmp_path / 'scan.tif'} has 3 frames" in res.stderr
    assert PILImage.open(tmp_path / "out" / "scan.tif").n_frames == 1


def test_super_resolution_checkpoint_is_refused(tmp_path):
    from spandrel.architectures.Compact.__arch.SRVGG import SRVGGNetCompact

    torch.manual_seed(0)
    sr = save_checkpoint(tmp_path / "x2.pth", SRVGGNetCompact(num_feat=8, num_conv=2, upscale=2).state_dict())
    write_images(tmp_path / "in", 1)
    for tile in ("0", "16"):
        res = invoke("derain", tmp_path / "in", "-o", tmp_path / "out", "--weights", sr, "--tile", tile)
        assert res.exit_code == 3
        assert "with scale 2 is a super-resolution model" in one_line_error(res.stderr)
    assert not list(tmp_path.glob("out/*.png"))


def test_grayscale_model_restores_each_colour_plane(tmp_path):
    import derestore
    from spandrel.architectures.DnCNN import DnCNN

    torch.manual_seed(0)
    net = DnCNN(in_nc=1, out_nc=1, nc=8, nb=4, act_mode="BR").eval()
    gray = save_checkpoint(tmp_path / "gray.pth", net.state_dict())
    img = smooth_image(24, 24).transpose(2, 0, 1).astype(np.float32)
    out, _ = derestore.load(weights=gray, device="cpu").restore_array(img, tile=0)
    with torch.no_grad():
        expected = net(torch.from_numpy(img)[:, None]).clamp(0, 1)[:, 0].numpy()
    assert np.abs(out - expected).max() < 1e-6


# ---------------------------------------------------------------- threads and the cluster script


@pytest.mark.parametrize(("env", "expected"), [
    ({"OMP_NUM_THREADS": "1", "SLURM_CPUS_PER_TASK": "2"}, 1),
    ({"SLURM_CPUS_PER_TASK": "1"}, 1),
    ({}, len(os.sched_getaffinity(0))),
])
def test_threads_follow_omp_then_slurm_then_affinity(tmp_path, ckpt, env, expected):
    write_images(tmp_path / "in", 1)
    clean = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK")}
    done = subprocess.run(cli_command("derain", str(tmp_path / "in"), "-o", str(tmp_path / "out"), "--weights",
                                      str(ckpt)), capture_output=True, text=True, env={**clean, **env}, timeout=120)
    assert done.returncode == 0, done.stderr
    assert json.loads((tmp_path / "out" / "derestore-run.json").read_text())["threads"] == expected


def _readme_slurm_script() -> str:
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    block = readme.split("```bash\n#!/bin/bash\n#SBATCH", 1)[1].split("```", 1)[0]
    return "#!/bin/bash\n#SBATCH" + block


def test_readme_slurm_script_survives_scancel_and_keeps_earlier_logs(tmp_path, slow_ckpt):
    script = _readme_slurm_script()
    assert "exec derestore" in script and ">>" in script
    write_images(tmp_path / "data" / "rainy", 8 * 12, size=128)  # 12 per shard: a run lasts long enough to stop
    script = script.replace("/data/", f"{tmp_path}/data/")
    (tmp_path / "job.sh").write_text(script)
    registry = tmp_path / "mine.toml"
    registry.write_text(f'[models.slow]\ntask = "derain"\narch = "DnCNN"\nsources = ["{slow_ckpt.as_uri()}"]\n'
                        '[tasks.derain]\ndefault = "slow"\n')
    env = {**os.environ, "SLURM_ARRAY_TASK_ID": "0", "SLURM_ARRAY_JOB_ID": "77", "DERESTORE_REGISTRY": str(registry),
           "DERESTORE_HOME": str(tmp_path / "cache"), "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    out = tmp_path / "data" / "derained"
    job = subprocess.Popen(["bash", str(tmp_path / "job.sh")], cwd=tmp_path, env=env, stderr=subprocess.PIPE,
                           text=True)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline and len(list(out.rglob("*.png"))) < 1 and job.poll() is None:
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)  # what scancel sends the batch script: derestore itself, thanks to exec
    _, err = job.communicate(timeout=60)
    assert job.returncode == 130, err
    record = json.loads((out / "derestore-run.shard-0-of-8.json").read_text())
    assert record["counts"]["interrupted"] is True
    logs = list(tmp_path.glob("log.*.jsonl"))
    assert len(logs) == 1
    first = logs[0].read_text().splitlines()
    done = subprocess.run(["bash", str(tmp_path / "job.sh")], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr
    assert logs[0].read_text().splitlines()[: len(first)] == first  # the resubmission appended
    summaries = [json.loads(line)["summary"] for line in logs[0].read_text().splitlines() if '"summary"' in line]
    assert summaries[-1]["ok"] + summaries[-1]["skipped"] == 12 and summaries[-1]["failed"] == 0
    assert summaries[-1]["skipped"] >= 1  # the first attempt's outputs were kept and not redone
