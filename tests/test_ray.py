"""Ray: option checks, replica sizing and the map_batches class without Ray; then real Ray clusters.

Every test that starts Ray runs it inside namespaces of its own (`unshare`):
a network namespace with only loopback up, so that Ray binds to 127.0.0.1 and
no traffic leaves the machine, and a PID namespace, so that `ray stop` sees
only this test's processes and the kernel ends every one of them when the
script's shell exits, whatever happens.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

import derestore
from derestore import imageio
from derestore.errors import UsageError
from derestore.pipeline import Job
from derestore.ray import IN_FLIGHT, Cluster, Restorer, check_ray_options, plan_cluster, run_jobs_on_ray

from .conftest import cli_command, dncnn_state, save_checkpoint, smooth_image, to_uint, write_images

UNSHARE = ["unshare", "--net", "--pid", "--fork", "--mount-proc", "--kill-child"]
RAY = Path(sys.executable).with_name("ray")


@pytest.fixture(scope="module")
def private_network() -> None:
    """Skip unless this process may run commands in namespaces of their own (root, or user namespaces)."""
    pytest.importorskip("ray")
    try:
        probe = subprocess.run([*UNSHARE, "ip", "link", "set", "lo", "up"], capture_output=True, timeout=30,
                               check=False)
    except (OSError, subprocess.TimeoutExpired) as exc:
        pytest.skip(f"cannot run `unshare` here ({exc}): Ray tests need a private network namespace")
    if probe.returncode != 0:
        pytest.skip("`unshare --net --pid` is not permitted here (needs root or user namespaces): Ray tests "
                    f"keep their traffic on a private loopback; {probe.stderr.decode().strip()}")


def in_namespace(script: str, cwd: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """Run a bash script with loopback up in a private network and PID namespace; Ray's own files (and its
    auth token) stay in a short temporary folder (Unix socket paths must stay under 108 bytes)."""
    ray_tmp = Path(tempfile.mkdtemp(prefix="drray"))
    prologue = textwrap.dedent(f"""\
        set -u
        ip link set lo up
        export HOME={ray_tmp}/home RAY_TMPDIR={ray_tmp} RAY_AUTH_MODE=disabled RAY_USAGE_STATS_ENABLED=0 \
            DERESTORE_HOME={cwd}/cache
        mkdir -p "$HOME"
        RAY_TMP={ray_tmp}/r
        trap '{RAY} stop --force >/dev/null 2>&1' EXIT
        """)
    path = cwd / "script.sh"
    path.write_text(prologue + textwrap.dedent(script))
    try:
        return subprocess.run([*UNSHARE, "bash", str(path)], cwd=cwd, capture_output=True, text=True,
                              timeout=timeout, check=False)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)


def read_png(path: Path) -> np.ndarray:
    return np.asarray(PILImage.open(path)).astype(np.int32)


# ------------------------------------------------------------------ without Ray


@pytest.mark.parametrize("address", ["", "localhost", "ray://", "ray://host", "http://host:10001", "auto "])
def test_an_address_that_is_not_local_auto_or_ray_client_is_one_line_usage_error(address):
    with pytest.raises(UsageError) as err:
        check_ray_options(address, None)
    message = str(err.value)
    assert "\n" not in message and "local, auto or ray://HOST:PORT" in message and "--" not in message


def test_fewer_than_one_replica_and_one_named_gpu_are_refused():
    with pytest.raises(UsageError, match=r"ray_workers=0: must be at least 1"):
        check_ray_options("local", 0)
    with pytest.raises(UsageError, match=r"device='cuda:1'.*device='auto' or 'cuda'"):
        check_ray_options("auto", None, "cuda:1")
    check_ray_options("ray://10.0.0.1:10001", 3, "cuda")  # valid: nothing is contacted


def test_missing_ray_is_a_usage_error_naming_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "ray" else real(name, *a))
    with pytest.raises(UsageError, match=r"pip install 'derestore\[ray\]'"):
        check_ray_options("local", None)


def test_cli_refuses_bad_ray_options_in_flag_terms_before_loading(tmp_path):
    from typer.testing import CliRunner

    from derestore.cli import app

    write_images(tmp_path / "in", 1)
    for args, needle in ((["--ray", "nowhere"], "--ray 'nowhere' is not a Ray address"),
                         (["--ray", "local", "--ray-workers", "0"], "--ray-workers 0: must be at least 1")):
        res = CliRunner().invoke(app, ["derain", str(tmp_path / "in"), "-o", str(tmp_path / "out"),
                                       "--weights", str(tmp_path / "missing.pth"), *args])
        assert res.exit_code == 2, res.output
        assert res.stderr.strip().count("\n") == 0 and needle in res.stderr
        assert not (tmp_path / "out").exists()


def test_replicas_one_per_gpu_else_cpus_by_threads_or_as_asked():
    gpu_nodes = [{"CPU": 16.0, "GPU": 4.0}, {"CPU": 16.0, "GPU": 4.0}, {"CPU": 8.0}]
    assert plan_cluster("auto", gpu_nodes, None) == Cluster("auto", 8, 1.0, None, 3, "one per GPU (8 GPUs)")
    assert plan_cluster("auto", gpu_nodes, 3).workers == 3
    cpu_only = plan_cluster("auto", gpu_nodes, None, device="cpu")
    assert (cpu_only.workers, cpu_only.gpus_per_worker, cpu_only.threads_per_worker) == (10, 0.0, 4)
    assert plan_cluster("local", [{"CPU": 2.0}], None).why == "2 CPUs / 2 threads per replica"
    two = plan_cluster("auto", [{"CPU": 1.0}, {"CPU": 1.0}], None)
    assert (two.workers, two.threads_per_worker, two.nodes) == (2, 1, 2)
    asked = plan_cluster("auto", [{"CPU": 12.0}], 3)
    assert (asked.workers, asked.threads_per_worker, asked.why) == (3, 4, "workers=3 as asked, 4 threads each")
    with pytest.raises(UsageError, match="no GPUs"):
        plan_cluster("auto", [{"CPU": 4.0}], None, device="cuda")
    assert set(asked.record()) == {"address", "workers", "gpus_per_worker", "threads_per_worker", "nodes", "why"}


def test_all_outputs_existing_are_skipped_without_contacting_ray(tmp_path, monkeypatch):
    import derestore.ray as derestore_ray

    monkeypatch.setattr(derestore_ray, "_Session", lambda *a: pytest.fail("Ray was contacted"))
    jobs = [Job(p, tmp_path / "out" / p.name) for p in write_images(tmp_path / "in", 2)]
    (tmp_path / "out").mkdir()
    for job in jobs:
        job.output.write_bytes(b"done")
    clusters: list[Cluster] = []
    results = list(run_jobs_on_ray(jobs, address="auto", workers=None, load={}, step={}, skip_existing=True,
                                   on_cluster=clusters.append))
    assert [r.status for r in results] == ["skipped", "skipped"]
    assert clusters[0].workers == 0


class FakeRef:
    """An object reference: what a call returned, or the error Ray would raise for it."""

    value: object = None
    error: BaseException | None = None


class FakeRay:
    """Enough of Ray's core API to run `_Pool` in this process: actors are plain objects, a call runs at once.

    A call to `run` on a job named in `dies` raises Ray's error for a dead actor (once)."""

    class RayError(Exception):
        pass

    class RayActorError(RayError):
        pass

    def __init__(self, dies: set[str] = frozenset()) -> None:
        import types

        self.exceptions = types.SimpleNamespace(RayError=self.RayError, RayActorError=self.RayActorError)
        self.dies = set(dies)
        self.killed = 0

    def remote(self, cls):
        fake = self

        class Handle:
            def __init__(self, *args):
                self.actor = cls(*args)

            def __getattr__(self, name):
                def call(*args):
                    ref = FakeRef()
                    if name == "run" and args[0].input.name in fake.dies:
                        fake.dies.discard(args[0].input.name)
                        ref.error = fake.RayActorError("The actor died unexpectedly before finishing this task.")
                    else:
                        ref.value = getattr(self.actor, name)(*args)
                    return ref

                return type("Method", (), {"remote": staticmethod(call)})

        return type("ActorClass", (), {"options": staticmethod(lambda **kw: type("Remote", (), {
            "remote": staticmethod(lambda *args: Handle(*args))}))})

    def wait(self, refs, num_returns, timeout):
        return refs[:1], refs[1:]

    def get(self, ref):
        if ref.error is not None:
            raise ref.error
        return ref.value

    def kill(self, handle, no_restart):
        self.killed += 1


@pytest.fixture
def fake_ray(monkeypatch):
    """`run_jobs_on_ray` against FakeRay on a cluster of one 1-CPU node."""
    import torch

    import derestore.ray as derestore_ray

    threads = torch.get_num_threads()

    def use(fake: FakeRay) -> FakeRay:
        session = type("Session", (), {"ray": fake, "node_resources": lambda self: [{"CPU": 1.0}],
                                       "close": lambda self: None})
        monkeypatch.setattr(derestore_ray, "_Session", lambda ray, address: session())
        monkeypatch.setattr(derestore_ray, "_import_ray", lambda: fake)
        return fake

    yield use
    torch.set_num_threads(threads)  # the in-process replica set them


STEP = {"tile": None, "overlap": None, "tiling": "blend", "max_pixels": None, "gt": None, "protocol": "restormer",
        "crop_border": 0}


def test_a_dead_replica_fails_its_image_and_gets_work_again_after_restart(tmp_path, fake_ray):
    ckpt = save_checkpoint(tmp_path / "net.pth", dncnn_state())
    paths = write_images(tmp_path / "in", 4)
    fake = fake_ray(FakeRay(dies={paths[1].name}))
    jobs = [Job(p, tmp_path / "out" / p.name) for p in paths]
    results = {r.input.name: r for r in run_jobs_on_ray(jobs, address="auto", workers=None,
                                                         load={"weights": ckpt, "device": "cpu"}, step=STEP)}
    assert [results[p.name].status for p in paths] == ["ok", "failed", "ok", "ok"]
    assert "the Ray worker restoring it stopped (The actor died" in results[paths[1].name].error
    assert fake.killed == 1  # the replica, at the end


def test_device_failure_on_a_replica_reports_the_image_then_stops_the_run(tmp_path, fake_ray, monkeypatch):
    from derestore.errors import DeviceFailure

    ckpt = save_checkpoint(tmp_path / "net.pth", dncnn_state())
    paths = write_images(tmp_path / "in", 4)
    fake_ray(FakeRay())

    def broken(self, image, **kwargs):
        raise DeviceFailure("cuda failed: an illegal memory access; the run stops here, finished outputs are kept")

    monkeypatch.setattr(derestore.api.Model, "restore_array", broken)
    results = run_jobs_on_ray([Job(p, tmp_path / "out" / p.name) for p in paths], address="auto", workers=None,
                              load={"weights": ckpt, "device": "cpu"}, step=STEP)
    reported = []
    with pytest.raises(DeviceFailure, match="illegal memory access"):
        reported.extend(results)
    # The image it failed on, and at most the other one then in flight on the replica; no new work after.
    assert 1 <= len(reported) <= IN_FLIGHT and all(r.status == "failed" for r in reported)
    assert reported[0].error.startswith("cuda failed")


def test_fail_fast_ends_after_the_first_failure_and_no_replica_loading_is_one_line(tmp_path, fake_ray):
    from derestore.errors import ModelUnavailable

    ckpt = save_checkpoint(tmp_path / "net.pth", dncnn_state())
    write_images(tmp_path / "in", 3)
    (tmp_path / "in" / "000-bad.png").write_bytes(b"no image")
    jobs = [Job(p, tmp_path / "out" / p.name) for p in sorted((tmp_path / "in").iterdir())]
    fake_ray(FakeRay())
    results = list(run_jobs_on_ray(jobs, address="auto", workers=None, load={"weights": ckpt, "device": "cpu"},
                                   step=STEP, fail_fast=True))
    assert [r.status for r in results] == ["failed"]
    fake_ray(FakeRay())
    with pytest.raises(UsageError, match=r"^no Ray worker could load the model: weights=.*no such file"):
        list(run_jobs_on_ray(jobs, address="auto", workers=None, load={"weights": tmp_path / "gone.pth"},
                             step=STEP))
    assert not issubclass(ModelUnavailable, UsageError)


@pytest.fixture(scope="module")
def restorer_checkpoint(tmp_path_factory) -> Path:
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "dncnn.pth", dncnn_state())


def reference(model: derestore.api.Model, pixels: np.ndarray, **options: object) -> np.ndarray:
    """`pixels` restored the plain way: `restore_array` on the image as derestore reads it."""
    if pixels.ndim == 2 or pixels.shape[2] > 4:
        planes = pixels.reshape(pixels.shape[-2], pixels.shape[-1], 1)  # H×W, or 1×H×W as Ray stores gray
    else:
        planes = pixels
    color = 3 if planes.shape[2] >= 3 else 1
    alpha = planes[..., color] if planes.shape[2] in (2, 4) else None
    image = imageio.Image(np.ascontiguousarray(planes[..., :color]), alpha, "PNG")
    out, _ = model.restore_array(imageio.to_float(image), **options)
    restored = imageio.from_float(out, image).pixels
    return (restored if alpha is None else np.dstack([restored, alpha])).reshape(pixels.shape)


def test_restorer_keeps_dtype_shape_alpha_and_other_columns(restorer_checkpoint):
    restorer = Restorer(weights=restorer_checkpoint, tile=32, overlap=8, device="cpu")
    model = derestore.load(weights=restorer_checkpoint, device="cpu")
    rgb = to_uint(smooth_image(40, 56, seed=1))
    gray = to_uint(smooth_image(33, 47, seed=3, channels=1))
    images = [rgb, to_uint(smooth_image(40, 56, seed=2, channels=4)), gray, gray[..., 0],
              to_uint(smooth_image(30, 20, seed=5), 16), to_uint(smooth_image(30, 20, seed=6, channels=2)),
              gray[None, ..., 0]]  # RGB, RGBA, H×W×1, H×W, 16-bit, gray+alpha, 1×H×W as Ray stores gray
    ragged = np.empty(len(images), dtype=object)
    ragged[:] = images
    out = restorer({"image": ragged, "path": np.array([f"{i}.png" for i in range(len(images))])})
    assert list(out["path"]) == [f"{i}.png" for i in range(len(images))]
    for before, after in zip(images, out["image"]):
        assert after.shape == before.shape and after.dtype == before.dtype
        assert np.array_equal(after, reference(model, before, tile=32, overlap=8))
    stacked = restorer({"image": np.stack([rgb, rgb])})["image"]
    assert stacked.shape == (2, 40, 56, 3) and np.array_equal(stacked[1], reference(model, rgb, tile=32, overlap=8))
    assert isinstance(restorer({"image": [rgb]})["image"], list)
    with pytest.raises(UsageError, match="uint8 or uint16"):
        restorer({"image": np.zeros((1, 8, 8, 3), np.float32)})
    with pytest.raises(UsageError, match="no 'image' column"):
        restorer({"pixels": np.stack([rgb])})


# ------------------------------------------------------------------ real Ray


def test_restorer_in_a_ray_data_pipeline_equals_restore_array(private_network, tmp_path, restorer_checkpoint):
    folder = tmp_path / "photos"
    folder.mkdir()
    PILImage.fromarray(to_uint(smooth_image(40, 56, seed=1))).save(folder / "a.png")
    PILImage.fromarray(to_uint(smooth_image(40, 56, seed=2))).save(folder / "b.png")
    PILImage.fromarray(to_uint(smooth_image(64, 30, seed=3))).save(folder / "c.png")
    PILImage.fromarray(to_uint(smooth_image(33, 47, seed=4, channels=1))[..., 0], "L").save(folder / "gray.png")
    pipeline = tmp_path / "pipeline.py"
    pipeline.write_text(textwrap.dedent(f"""\
        import numpy as np, ray, ray.data
        from derestore.ray import Restorer
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
        ray.data.DataContext.get_current().enable_progress_bars = False
        ds = ray.data.read_images({str(folder)!r}, include_paths=True)
        ds = ds.map_batches(Restorer, fn_constructor_kwargs={{"weights": {str(restorer_checkpoint)!r}, "tile": 32,
                            "overlap": 8}}, concurrency=1, batch_size=2)
        rows = ds.take_all()
        np.savez("restored.npz", **{{row["path"].rsplit("/", 1)[1]: row["image"] for row in rows}})
        """))
    proc = in_namespace(f"{sys.executable} {pipeline}\n", tmp_path, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    restored = dict(np.load(tmp_path / "restored.npz"))
    assert sorted(restored) == ["a.png", "b.png", "c.png", "gray.png"]
    model = derestore.load(weights=restorer_checkpoint, device="cpu")
    for name, array in restored.items():
        source = np.asarray(PILImage.open(folder / name))
        expected = reference(model, source, tile=32, overlap=8)
        assert array.reshape(source.shape).dtype == np.uint8
        # Exact: the same conversions and network; torch's CPU convolutions here give identical sums.
        assert np.array_equal(array.reshape(source.shape), expected), name


def test_ray_cluster_run_matches_local_run_reports_bad_file_resumes_and_stops_on_sigterm(private_network, tmp_path):
    """`derestore … --ray auto` on a two-node cluster (a head and a worker, one CPU each), like the README's
    `ray start` recipe; then `--skip-existing`; then SIGTERM to a `--ray local` run."""
    save_checkpoint(tmp_path / "net.pth", dncnn_state())
    good = write_images(tmp_path / "in", 5, size=72)
    (tmp_path / "in" / "bad.png").write_bytes(b"this is not an image")
    write_images(tmp_path / "many", 40, size=400)
    derestore_cmd = " ".join(cli_command())
    task = f"{derestore_cmd} derain --weights net.pth --tile 48 --overlap 16"
    proc = in_namespace(f"""\
        {RAY} start --head --node-ip-address 127.0.0.1 --port 6379 --num-cpus 1 --temp-dir "$RAY_TMP" \\
            --disable-usage-stats --include-dashboard=false > head.log 2>&1 || exit 10
        {RAY} start --address 127.0.0.1:6379 --node-ip-address 127.0.0.1 --num-cpus 1 --temp-dir "$RAY_TMP" \\
            > worker.log 2>&1 || exit 11
        export RAY_ADDRESS=127.0.0.1:6379
        {task} in -o ray --ray auto --json > ray.jsonl 2> ray.err; echo $? > ray.rc
        cp ray/derestore-run.json ray-run.json
        mv in/bad.png bad.png
        {task} in -o ray --ray auto --json --skip-existing > skip.jsonl 2> skip.err; echo $? > skip.rc
        {RAY} stop --force > /dev/null 2>&1
        unset RAY_ADDRESS
        {task} many -o stopped --ray local --json > stopped.jsonl 2> stopped.err &
        pid=$!
        for _ in $(seq 600); do [ -s stopped.jsonl ] && break; sleep 0.2; done
        kill -TERM $pid; wait $pid; echo $? > stopped.rc
        pgrep -f 'raylet|gcs_server|ray::' > leftover.txt; true
        """, tmp_path, timeout=400)
    assert proc.returncode == 0, (proc.stderr[-2000:], (tmp_path / "head.log").read_text()[-2000:])

    # The cluster run: every good image written, the bad one reported, exit 1, the record says Ray did it.
    assert (tmp_path / "ray.rc").read_text().strip() == "1", (tmp_path / "ray.err").read_text()
    records = [json.loads(line) for line in (tmp_path / "ray.jsonl").read_text().splitlines()]
    by_name = {Path(r["input"]).name: r for r in records if "input" in r}
    assert by_name["bad.png"]["status"] == "failed" and "in/bad.png" in by_name["bad.png"]["error"]
    assert all(by_name[p.name]["status"] == "ok" for p in good)
    assert "failed: in/bad.png" in (tmp_path / "ray.err").read_text()
    run = json.loads((tmp_path / "ray-run.json").read_text())
    assert run["counts"]["ok"] == 5 and run["counts"]["failed"] == 1
    assert run["ray"]["address"] == "auto" and run["ray"]["workers"] == 2 and run["ray"]["nodes"] == 2

    # The same command without Ray: the same images, up to one level where another thread count (two
    # threads here, one per replica there) reorders float sums.
    plain = subprocess.run(cli_command("derain", "in", "-o", "plain", "--weights", "net.pth", "--tile", "48",
                                       "--overlap", "16"), cwd=tmp_path, capture_output=True, text=True,
                           timeout=120, check=False)
    assert plain.returncode == 0, plain.stderr
    differing = total = 0
    for p in good:
        a, b = read_png(tmp_path / "ray" / p.name), read_png(tmp_path / "plain" / p.name)
        assert np.abs(a - b).max() <= 1
        differing, total = differing + int((a != b).sum()), total + a.size
    assert differing <= 0.001 * total

    # The rerun with --skip-existing (the bad file moved away): nothing to do, Ray not even contacted.
    assert (tmp_path / "skip.rc").read_text().strip() == "0", (tmp_path / "skip.err").read_text()
    statuses = [json.loads(line).get("status") for line in (tmp_path / "skip.jsonl").read_text().splitlines()]
    assert statuses == ["skipped"] * 5 + [None]  # then the summary

    # SIGTERM during a `--ray local` run: exit 130, the record says so, whole outputs only, Ray gone.
    assert (tmp_path / "stopped.rc").read_text().strip() == "130", (tmp_path / "stopped.err").read_text()
    stopped = json.loads((tmp_path / "stopped" / "derestore-run.json").read_text())
    assert stopped["counts"]["interrupted"] and stopped["ray"]["address"] == "local"
    assert 1 <= stopped["counts"]["ok"] < 40
    written = sorted(p.name for p in (tmp_path / "stopped").iterdir())
    assert all(not name.startswith(".") for name in written)  # no temp file left behind
    for name in written:
        if name.endswith(".png"):
            assert read_png(tmp_path / "stopped" / name).shape == (400, 400, 3)
    assert (tmp_path / "leftover.txt").read_text() == ""
