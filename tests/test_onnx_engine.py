"""A checkpoint whose first use chose ONNX Runtime runs its cached export later without torch or spandrel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

pytest.importorskip("onnxruntime")

import derestore  # noqa: E402
from derestore import onnx_backend, onnx_engine  # noqa: E402
from derestore.engine import Engine  # noqa: E402
from derestore.onnx_cache import versions  # noqa: E402
from derestore.onnx_engine import CachedEngine  # noqa: E402
from derestore.tiled_engine import cpu_threads  # noqa: E402

from .conftest import cli_command, save_checkpoint, smooth_image, timings, to_uint  # noqa: E402
from .test_cli_restore import invoke, read_any  # noqa: E402
from .test_onnx_backend import MATCH, image, restormer_state  # noqa: E402

# Every test here: its own cache, and NAFNet's published (global) statistics, whose network exports.
pytestmark = pytest.mark.usefixtures("onnx_cache", "published_statistics")


def test_a_measured_checkpoint_runs_from_its_cached_export_with_the_same_output(nafnet_ckpt, onnx_faster):
    first = derestore.load(weights=nafnet_ckpt, device="cpu")
    assert isinstance(first.engine, Engine) and first.engine.backend == "onnxruntime"
    again = derestore.load(weights=nafnet_ckpt, device="cpu")
    assert isinstance(again.engine, CachedEngine)
    assert again.arch == "NAFNet" and again.stats == "global" and again.engine.precision == "fp32"
    assert again.sha256 == first.sha256 and again.tile == first.tile and again.overlap == first.overlap
    img = image(45, 71, seed=1)
    for tile, overlap in ((0, 32), (24, 6)):
        fast, _ = again.restore_array(img, tile=tile, overlap=overlap)
        slow, _ = first.restore_array(img, tile=tile, overlap=overlap)
        assert fast.shape == img.shape and fast.dtype == np.float32
        np.testing.assert_allclose(fast, slow, atol=MATCH)
    frames = [image(32, 48, seed=s) for s in range(3)]
    batched = again.engine.restore_batch(frames)
    for frame, out in zip(frames, batched):
        np.testing.assert_allclose(out, first.engine.restore(frame, tile=0), atol=MATCH)


def test_odd_sized_tiles_of_a_padded_network_match_pytorch(tmp_path, onnx_faster):
    ckpt = save_checkpoint(tmp_path / "restormer.pth", restormer_state())
    derestore.load(weights=ckpt, device="cpu", batch_size=3, stats="global")
    fast = derestore.load(weights=ckpt, device="cpu", batch_size=3, stats="global")
    slow = derestore.load(weights=ckpt, device="cpu", batch_size=3, backend="torch", stats="global")
    assert isinstance(fast.engine, CachedEngine) and fast.engine.facts.multiple_of == 8
    img = image(37, 53, seed=3)
    for tile in (0, 24):
        out, _ = fast.restore_array(img, tile=tile, overlap=4)
        expected, _ = slow.restore_array(img, tile=tile, overlap=4)
        assert out.shape == img.shape
        np.testing.assert_allclose(out, expected, atol=MATCH)


@pytest.mark.parametrize("first, later, runs_cached", [
    ({}, {"backend": "torch"}, False),
    ({}, {"stats": "local"}, False),
    ({}, {"precision": "fp16"}, False),
    ({}, {"backend": "onnxruntime"}, True),
    ({}, {"layout": "contiguous"}, True),
])
def test_only_what_the_first_use_measured_runs_from_the_cache(nafnet_ckpt, onnx_faster, first, later, runs_cached):
    derestore.load(weights=nafnet_ckpt, device="cpu", **first)
    model = derestore.load(weights=nafnet_ckpt, device="cpu", **later)
    assert isinstance(model.engine, CachedEngine) is runs_cached


def test_a_checkpoint_measured_slower_on_onnxruntime_stays_on_pytorch(nafnet_ckpt, monkeypatch):
    monkeypatch.setattr(onnx_backend, "time_candidates", timings(contiguous=1.0, channels_last=0.9, onnxruntime=2.0))
    derestore.load(weights=nafnet_ckpt, device="cpu")
    again = derestore.load(weights=nafnet_ckpt, device="cpu")
    assert isinstance(again.engine, Engine) and again.engine.backend == "torch"


def test_another_thread_count_or_a_lost_export_measures_or_exports_again(nafnet_ckpt, onnx_cache, onnx_faster):
    derestore.load(weights=nafnet_ckpt, device="cpu")
    assert isinstance(derestore.load(weights=nafnet_ckpt, device="cpu", threads=torch.get_num_threads()).engine,
                      CachedEngine)
    (onnx_file,) = onnx_cache.glob("*.onnx")
    onnx_file.write_bytes(b"truncated")
    again = derestore.load(weights=nafnet_ckpt, device="cpu")
    assert isinstance(again.engine, Engine) and again.engine.backend == "onnxruntime"  # traced again
    assert isinstance(derestore.load(weights=nafnet_ckpt, device="cpu").engine, CachedEngine)


def test_an_allocation_failure_retries_with_smaller_tiles(nafnet_ckpt, onnx_faster, monkeypatch):
    derestore.load(weights=nafnet_ckpt, device="cpu")
    model = derestore.load(weights=nafnet_ckpt, device="cpu")
    assert isinstance(model.engine, CachedEngine)
    real, sizes = model.engine.session.run, []

    class Session:
        def run(self, names, feeds):
            sizes.append(feeds["image"].shape[-1])
            if feeds["image"].shape[-1] > 100:
                raise RuntimeError("Failed to allocate memory for requested buffer of size 123456")
            return real(names, feeds)

    monkeypatch.setattr(model.engine, "session", Session())
    img = image(120, 150, seed=4)
    out, notes = model.restore_array(img, tile=0)
    (said,) = [n for n in notes if "out of memory" in n]
    retry = int(said.rsplit("first retry: ", 1)[1].rstrip(")"))
    assert sizes[0] == 150 and max(sizes[1:]) <= retry <= 100
    torch_model = derestore.load(weights=nafnet_ckpt, device="cpu", backend="torch")
    expected, _ = torch_model.restore_array(img, tile=retry, overlap=32)
    np.testing.assert_allclose(out, expected, atol=MATCH)


def test_the_verdict_records_the_facts_the_cached_run_needs(nafnet_ckpt, onnx_cache, onnx_faster):
    derestore.load(weights=nafnet_ckpt, device="cpu")
    (verdict_file,) = onnx_cache.glob("*.ort-*.json")
    recorded = json.loads(verdict_file.read_text())["network"]
    assert recorded == {"architecture": "NAFNet", "input_channels": 3, "output_channels": 3, "scale": 1,
                        "multiple_of": 1, "minimum": 0, "square": False}
    assert versions()["torch"] == torch.__version__.split("+")[0]


def _child_env(tmp_path: Path) -> dict[str, str]:
    # The child's thread count must be the one the parent measured with (the verdict is keyed by it).
    return {**os.environ, "DERESTORE_HOME": str(tmp_path / "cache"), "OMP_NUM_THREADS": str(torch.get_num_threads())}


def test_a_later_process_imports_neither_torch_nor_spandrel(tmp_path, nafnet_ckpt, onnx_faster):
    derestore.load(weights=nafnet_ckpt, device="cpu")
    img = image(40, 56, seed=5)
    np.save(tmp_path / "in.npy", img)
    script = (
        "import sys, numpy as np, derestore\n"
        f"model = derestore.load(weights={str(nafnet_ckpt)!r}, stats='global')\n"
        f"out, _ = model.restore_array(np.load({str(tmp_path / 'in.npy')!r}), tile=24, overlap=8)\n"
        f"np.save({str(tmp_path / 'out.npy')!r}, out)\n"
        "print(type(model.engine).__name__, 'torch' in sys.modules, 'spandrel' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script], env=_child_env(tmp_path), capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["CachedEngine", "False", "False"]
    expected, _ = derestore.load(weights=nafnet_ckpt, device="cpu", backend="torch").restore_array(img, tile=24, overlap=8)
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), expected, atol=MATCH)


def test_the_command_line_writes_the_same_images_and_record_from_the_cache(tmp_path, nafnet_ckpt, onnx_faster,
                                                                          monkeypatch):
    import cv2

    src = tmp_path / "in"
    src.mkdir()
    for i in range(2):
        cv2.imwrite(str(src / f"im{i}.png"), to_uint(smooth_image(40 + 8 * i, 56, seed=i)))
    args = ("denoise", str(src), "--weights", str(nafnet_ckpt), "--stats", "global", "--tile", "0", "--json")
    # First use, in this process: measured (ONNX Runtime faster) and run by the PyTorch engine's session.
    before = torch.get_num_threads()
    with monkeypatch.context() as patch:
        patch.setattr(onnx_engine, "cached_verdict", lambda *a: None)
        try:
            result = invoke(*args, "-o", tmp_path / "first")
        finally:
            torch.set_num_threads(before)
    assert result.exit_code == 0, result.output
    env = {**_child_env(tmp_path), "OMP_NUM_THREADS": str(cpu_threads())}  # the threads that first run used
    done = subprocess.run(cli_command(*args, "-o", str(tmp_path / "cached")), env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert "cached export, run without PyTorch" in done.stderr
    for i in range(2):
        assert np.array_equal(read_any(tmp_path / "first" / f"im{i}.png"), read_any(tmp_path / "cached" / f"im{i}.png"))
    first, cached = (json.loads((tmp_path / n / "derestore-run.json").read_text()) for n in ("first", "cached"))
    for key in ("arch", "sha256", "device", "precision", "statistics", "threads", "options"):
        assert first[key] == cached[key], key
    assert cached["statistics"]["stats"] == "global" and cached["counts"]["ok"] == 2


def test_a_checkpoint_is_hashed_once_when_the_cache_does_not_apply(nafnet_ckpt, onnx_faster, monkeypatch):
    from derestore import hub

    derestore.load(weights=nafnet_ckpt, device="cpu")
    real, hashed = hub.sha256_file, []
    monkeypatch.setattr(hub, "sha256_file", lambda path: hashed.append(path) or real(path))
    model = derestore.load(weights=nafnet_ckpt, device="cpu", stats="local")  # looked up, then loaded and converted
    assert isinstance(model.engine, Engine) and hashed == [nafnet_ckpt]
