"""Half precision only where measured (per checkpoint and device), devices chosen in order, and a
library that leaves its host's settings alone."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import derestore
from derestore import engine, memory, precision
from derestore.errors import UsageError

from .conftest import dncnn_state, save_checkpoint, write_images


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DERESTORE_HOME", str(tmp_path / "cache"))


@pytest.fixture
def probes(monkeypatch) -> list[str]:
    """Pretend the CPU is a device with fp16 (as a GPU is), and count the probes that run."""
    runs: list[str] = []
    real = precision.measure

    def counted(*args, **kwargs):
        runs.append(kwargs.get("sha256", ""))
        return real(*args, **kwargs)

    monkeypatch.setattr(precision, "half_types", lambda device: [torch.float16])
    monkeypatch.setattr(precision, "measure", counted)
    return runs


def overflowing_checkpoint(path: Path) -> Path:
    """A DnCNN whose first layer's activations exceed fp16's range (65504): exact in fp32, NaN in fp16."""
    state = dncnn_state(nb=4)
    convs = [k for k, v in state.items() if k.endswith("weight") and v.ndim == 4]
    state[convs[0]] = state[convs[0]] * 1e6
    state[convs[-1]] = state[convs[-1]] / 1e6
    return save_checkpoint(path, state)


def fake_restore(error: float):
    """A restoration whose half-precision output is off by `error` everywhere."""
    def restore(tile: np.ndarray, dtype: torch.dtype) -> np.ndarray:
        return tile if dtype == torch.float32 else np.clip(tile + error, 0, 1)
    return restore


def test_a_half_type_within_45_db_of_fp32_is_chosen_and_one_below_is_not():
    tiles = precision.probe_tiles()
    assert len(tiles) == 3 and all(t.shape == (3, 128, 128) for t in tiles)
    good = precision.measure(fake_restore(0.004), tiles, [torch.float16])  # 48 dB
    bad = precision.measure(fake_restore(0.007), tiles, [torch.float16])  # 43 dB
    assert good.precision == "fp16" and 47.9 < good.measured["fp16"]["psnr"] < 48.1
    assert bad.precision == "fp32" and bad.measured["fp16"]["ok"] is False


def test_nan_or_black_half_output_is_refused():
    tiles = precision.probe_tiles()
    nan = precision.measure(lambda t, d: t if d == torch.float32 else t * np.nan, tiles, [torch.bfloat16])
    black = precision.measure(lambda t, d: t if d == torch.float32 else t * 0, tiles, [torch.bfloat16])
    assert nan.precision == black.precision == "fp32"
    assert nan.measured["bf16"]["finite"] is False and black.measured["bf16"]["black"] is True


def test_auto_probes_each_checkpoint_once_and_keeps_the_verdict(tmp_path, probes):
    ckpt = save_checkpoint(tmp_path / "good.pth", dncnn_state(nb=4))
    first = derestore.load(weights=ckpt, device="cpu", precision="auto")
    again = derestore.load(weights=ckpt, device="cpu", precision="auto")
    assert first.engine.precision == again.engine.precision == "fp16" and len(probes) == 1
    [verdict] = precision.cached_verdicts(first.sha256)
    assert verdict.precision == "fp16" and torch.__version__.startswith(verdict.torch) and verdict.device.startswith("CPU")
    assert verdict.measured["fp16"]["psnr"] > 60


def test_a_checkpoint_inaccurate_in_half_runs_in_fp32_and_an_explicit_half_warns(tmp_path, probes, caplog):
    ckpt = overflowing_checkpoint(tmp_path / "overflow.pth")
    model = derestore.load(weights=ckpt, device="cpu", precision="auto")
    assert model.engine.precision == "fp32"
    assert model.engine.verdict.measured["fp16"]["finite"] is False
    caplog.set_level("WARNING", logger="derestore")
    forced = derestore.load(weights=ckpt, device="cpu", precision="fp16")
    assert forced.engine.precision == "fp16" and len(probes) == 1  # the user wins; no second probe
    assert any("fp16 was measured inaccurate for this checkpoint" in r.getMessage() for r in caplog.records)


def test_published_tiling_and_ground_truth_scoring_run_in_fp32(tmp_path, probes):
    ckpt = save_checkpoint(tmp_path / "good.pth", dncnn_state(nb=4))
    write_images(tmp_path / "in", 1)
    write_images(tmp_path / "gt", 1)
    scored = derestore.run([str(tmp_path / "in")], tmp_path / "a", weights=ckpt, gt=tmp_path / "gt")
    published = derestore.run([str(tmp_path / "in")], tmp_path / "b", weights=ckpt, tiling="published")
    plain = derestore.run([str(tmp_path / "in")], tmp_path / "c", weights=ckpt)
    records = [json.loads(r.record.read_text()) for r in (scored, published, plain)]
    assert [r["precision"] for r in records] == ["fp32", "fp32", "fp16"]
    assert records[2]["precision_probe"]["precision"] == "fp16" and len(probes) == 1


def test_models_json_shows_cached_verdicts(tmp_path, probes, monkeypatch):
    derestore.load(model="lite-derain", device="cpu", precision="auto")
    [lite] = [m for m in derestore.api.list_models("derain") if m["name"] == "lite-derain"]
    assert lite["precision"] == {precision.device_name(torch.device("cpu")): "fp16"}


# ---------------------------------------------------------------- devices


@pytest.mark.parametrize(("cuda", "mps", "expected"), [(True, True, "cuda"), (False, True, "mps"),
                                                        (False, False, "cpu")])
def test_auto_device_order_is_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(engine, "mps_available", lambda: mps)
    assert engine.choose_device("auto").type == expected


def test_named_devices_must_exist_and_be_spelled_right(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(engine, "mps_available", lambda: False)
    for spec, words in [("mps", "has no MPS"), ("cuda:1", "no CUDA GPU"), ("tpu", "is not a device"),
                        ("xpu", "is not supported")]:
        with pytest.raises(UsageError, match=words):
            engine.choose_device(spec)
    assert engine.parse_device("mps").type == "mps"  # a cluster's workers may have one


def test_half_types_per_device(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert precision.half_types(torch.device("cuda")) == [torch.bfloat16, torch.float16]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert precision.half_types(torch.device("cuda")) == [torch.float16]
    assert precision.half_types(torch.device("mps")) == [torch.float16]
    assert precision.half_types(torch.device("cpu")) == []


# ---------------------------------------------------------------- a good guest


def test_loading_and_restoring_leave_threads_pillow_and_cudnn_alone(tmp_path):
    write_images(tmp_path / "in", 1)
    code = (
        "import torch, PIL.Image, derestore\n"
        "torch.set_num_threads(1)\n"
        "limit = PIL.Image.MAX_IMAGE_PIXELS\n"
        f"model = derestore.load(model='lite-derain', device='cpu')\n"
        f"list(derestore.restore([{str(tmp_path / 'in')!r}], {str(tmp_path / 'out')!r}, model=model))\n"
        "print(torch.get_num_threads(), PIL.Image.MAX_IMAGE_PIXELS == limit, torch.backends.cudnn.benchmark)\n"
    )
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "SLURM_CPUS_PER_TASK")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert done.stdout.split() == ["1", "True", "False"], done.stderr
    under_omp = subprocess.run([sys.executable, "-c", code.replace("torch.set_num_threads(1)\n", "")],
                               capture_output=True, text=True, env={**env, "OMP_NUM_THREADS": "1"}, timeout=120)
    assert under_omp.stdout.split() == ["1", "True", "False"], under_omp.stderr


def test_an_image_above_pillows_own_limit_opens_within_ours(tmp_path):
    import struct
    import zlib

    from PIL import Image

    width, height = 14000, 13000  # 182 MP: Pillow alone refuses above 2 × 89.5 MP
    rows = zlib.compress((b"\x00" + bytes(width)) * height, 1)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    path = tmp_path / "huge.png"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", rows) + chunk(b"IEND", b""))
    limit = Image.MAX_IMAGE_PIXELS
    with pytest.raises(Image.DecompressionBombError):
        Image.open(path)
    image = derestore.imageio.read_image(path, max_pixels=None)
    assert (image.width, image.height) == (width, height) and Image.MAX_IMAGE_PIXELS == limit


# ---------------------------------------------------------------- memory limits


def _fake_cgroups(root: Path, proc: Path, v1: tuple[str, str] | None, v2: tuple[str, str] | None) -> None:
    proc.joinpath("self").mkdir(parents=True)
    proc.joinpath("meminfo").write_text("MemTotal: 33554432 kB\nMemAvailable: 16777216 kB\n")
    lines = []
    if v1:
        group = root / "memory" / "slurm" / "job_7"
        group.mkdir(parents=True)
        (group / "memory.limit_in_bytes").write_text(v1[0])
        (group / "memory.usage_in_bytes").write_text(v1[1])
        (root / "memory" / "memory.limit_in_bytes").write_text("9223372036854771712")
        (root / "memory" / "memory.usage_in_bytes").write_text("1000")
        lines.append("4:memory:/slurm/job_7")
    if v2:
        group = root / "kubepods" / "pod1"
        group.mkdir(parents=True)
        (group / "memory.max").write_text(v2[0])
        (group / "memory.current").write_text(v2[1])
        (root / "kubepods" / "memory.max").write_text("max")
        (root / "kubepods" / "memory.current").write_text("5")
        lines.append("0::/kubepods/pod1")
    proc.joinpath("self", "cgroup").write_text("\n".join(lines) + "\n")


@pytest.mark.parametrize(("v1", "v2", "expected"), [
    (None, None, 16 << 30),  # no limit: the host's MemAvailable
    (("4294967296", "1073741824"), None, 3 << 30),  # SLURM --mem=4G, 1 GiB used
    (None, ("2147483648", "536870912"), (2 << 30) - (512 << 20)),  # a 2 GiB container
    (None, ("max", "536870912"), 16 << 30),
])
def test_available_memory_honours_cgroup_limits(tmp_path, v1, v2, expected):
    _fake_cgroups(tmp_path / "cg", tmp_path / "proc", v1, v2)
    assert memory.available_bytes(tmp_path / "proc", tmp_path / "cg") == expected


def test_auto_tile_under_a_real_cgroup_memory_limit(tmp_path):
    from derestore.engine import free_memory
    from derestore.tiled_engine import AUTO_TILE_BUDGET
    from derestore.tiling import fit_tile

    from .conftest import nafnet_state

    group = Path("/sys/fs/cgroup/memory") / f"derestore-test-{os.getpid()}"
    try:
        group.mkdir()
        (group / "memory.limit_in_bytes").write_text(str(768 << 20))
    except OSError as exc:
        pytest.skip(f"cannot create a memory cgroup here ({exc.strerror})")
    ckpt = save_checkpoint(tmp_path / "naf.pth", nafnet_state())
    code = (
        "import os, derestore\n"
        f"open({str(group / 'cgroup.procs')!r}, 'w').write(str(os.getpid()))\n"
        f"model = derestore.load(weights={str(ckpt)!r}, device='cpu', stats='global')\n"
        "from derestore.memory import available_bytes\n"
        "print(available_bytes(), model.engine.auto_tile(8000, 6000))\n"
    )
    try:
        done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    finally:
        group.rmdir()
    assert done.returncode == 0, done.stderr
    free, tile = map(int, done.stdout.split())
    model = derestore.load(weights=ckpt, device="cpu", stats="global")
    bpp = model.engine.bytes_per_pixel()
    assert 0 < free < 768 << 20  # the cgroup's headroom, not the host's gigabytes
    assert tile == fit_tile(8000, 6000, bpp, AUTO_TILE_BUDGET * free, model.engine.batch_size)
    assert tile < model.engine.auto_tile(8000, 6000)
    assert free_memory(torch.device("cpu")) > 2 * (768 << 20)


# ---------------------------------------------------------------- several replicas (one per GPU)


def test_device_lists_name_one_replica_each(monkeypatch):
    assert engine.parse_devices("cuda:0,1,3") == ["cuda:0", "cuda:1", "cuda:3"]
    assert engine.parse_devices("cuda:0,cuda:2") == ["cuda:0", "cuda:2"]
    assert engine.parse_devices("cpu") == ["cpu"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 3)
    assert engine.parse_devices("cuda:all") == ["cuda:0", "cuda:1", "cuda:2"]
    with pytest.raises(UsageError, match="names a GPU twice"):
        engine.parse_devices("cuda:1,1")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(UsageError, match="no CUDA GPU"):
        engine.parse_devices("cuda:all")


def test_two_replicas_on_one_queue_write_what_one_writes(tmp_path):
    import cv2

    ckpt = save_checkpoint(tmp_path / "d.pth", dncnn_state(nb=4))
    write_images(tmp_path / "in", 7, size=40)
    events = []
    one = derestore.run([str(tmp_path / "in")], tmp_path / "one", weights=ckpt, device="cpu")
    two = derestore.run([str(tmp_path / "in")], tmp_path / "two", weights=ckpt, device="cpu,cpu",
                        on_event=events.append)
    assert one.ok == two.ok == 7 and two.exit_code == 0
    assert events[1].where == "cpu,cpu in fp32" and len(events[1].model.replicas) == 2
    for path in sorted((tmp_path / "one").glob("*.png")):
        assert (cv2.imread(str(path)) == cv2.imread(str(tmp_path / "two" / path.name))).all()
    finished = [e.result.input.name for e in events if type(e).__name__ == "Finished"]
    assert finished == sorted(finished)  # reported in input order whichever replica finished first
    assert json.loads(two.record.read_text())["device"] == "cpu,cpu"
