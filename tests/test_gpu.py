"""The GPU code paths, for a machine with a CUDA device (`pytest -m gpu`; skipped elsewhere, with the reason).

Golden outputs of the seed architectures on CUDA in fp32, the autocast half
paths, `--tile auto`'s memory probe, the out-of-memory retry under a memory
cap, the pinned-memory pipeline, the precision probe with real (lite) weights,
and one replica per GPU where there are several.
"""

from __future__ import annotations

import json
import time

import numpy as np
import pytest
import torch

import derestore
from derestore import precision

from .arch_support import NETWORKS, assert_matches_reference, filled_state_dict, read_golden
from .conftest import nafnet_state, save_checkpoint, smooth_image, write_images

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU (none here)"),
]


@pytest.fixture(autouse=True)
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("DERESTORE_HOME", str(tmp_path / "cache"))


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = float(np.mean((a.astype(np.float64) - b) ** 2))
    return float("inf") if mse == 0 else 10 * np.log10(1 / mse)


@pytest.mark.parametrize("network", NETWORKS)
def test_seed_architectures_match_their_golden_outputs_on_cuda_in_fp32(network):
    from spandrel import MAIN_REGISTRY

    from derestore.loading import install_architectures

    install_architectures()
    model = MAIN_REGISTRY.load(filled_state_dict(network)).model.cuda().eval()
    golden = read_golden(network)
    for case in sorted(k.removeprefix("input_") for k in golden if k.startswith("input_")):
        with torch.no_grad():
            out = model(torch.from_numpy(golden[f"input_{case}"]).cuda())
        assert_matches_reference(out, golden[f"output_{case}"])  # the CPU tests' tolerance


@pytest.mark.parametrize("half", ["fp16", "bf16"])
def test_autocast_half_precision_stays_close_to_fp32(tmp_path, half):
    if half == "bf16" and not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bf16")
    ckpt = save_checkpoint(tmp_path / "naf.pth", nafnet_state())
    image = smooth_image(96, 128).transpose(2, 0, 1).astype(np.float32)
    reference, _ = derestore.load(weights=ckpt, device="cuda", precision="fp32").restore_array(image, tile=0)
    out, notes = derestore.load(weights=ckpt, device="cuda", precision=half).restore_array(image, tile=0)
    assert np.isfinite(out).all() and notes == []
    assert _psnr(out, reference) > 40


def test_tile_auto_probes_the_models_memory_and_restores(tmp_path):
    ckpt = save_checkpoint(tmp_path / "naf.pth", nafnet_state())
    model = derestore.load(weights=ckpt, device="cuda", precision="fp32")
    assert model.engine.bytes_per_pixel() > 0
    image = smooth_image(300, 400).transpose(2, 0, 1).astype(np.float32)
    tiled, _ = model.restore_array(image, tile="auto")
    whole, _ = model.restore_array(image, tile=0)
    assert tiled.shape == image.shape and _psnr(tiled, whole) > 30


def test_out_of_memory_halves_the_tile_under_a_memory_cap(tmp_path):
    ckpt = save_checkpoint(tmp_path / "naf.pth", nafnet_state())
    model = derestore.load(weights=ckpt, device="cuda", precision="fp32")
    image = smooth_image(2048, 2048).transpose(2, 0, 1).astype(np.float32)
    free, total = torch.cuda.mem_get_info()
    in_use = torch.cuda.memory_allocated()
    # Room for the weights, the image and a few tiles, not for a whole-image pass.
    cap = (in_use + 600 * 2**20) / total
    torch.cuda.set_per_process_memory_fraction(cap)
    try:
        out, notes = model.restore_array(image, tile=0, overlap=32)
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0)
        torch.cuda.empty_cache()
    assert any("out of memory" in n for n in notes), notes
    assert out.shape == image.shape and np.isfinite(out).all()


def test_pinned_memory_pipeline_writes_every_image(tmp_path):
    ckpt = save_checkpoint(tmp_path / "naf.pth", nafnet_state())
    write_images(tmp_path / "in", 6, size=200)
    cpu = derestore.run([str(tmp_path / "in")], tmp_path / "cpu", weights=ckpt, device="cpu")
    gpu = derestore.run([str(tmp_path / "in")], tmp_path / "gpu", weights=ckpt, device="cuda", precision="fp32")
    assert cpu.ok == gpu.ok == 6 and gpu.exit_code == 0
    from derestore.imageio import read_image

    for path in sorted((tmp_path / "cpu").glob("*.png")):
        a = read_image(path).pixels.astype(int)
        b = read_image(tmp_path / "gpu" / path.name).pixels.astype(int)
        assert np.abs(a - b).max() <= 1  # another device reorders float sums: one 8-bit level at most


def test_precision_probe_on_a_lite_model_is_paid_once(tmp_path):
    started = time.perf_counter()
    first = derestore.load(model="lite-derain", device="cuda", precision="auto")
    probe_cost = time.perf_counter() - started
    verdict = first.engine.verdict
    assert verdict is not None and verdict.precision in ("fp32", "fp16", "bf16")
    assert set(verdict.measured) == {precision.dtype_name(d) for d in precision.half_types(first.engine.device)}
    started = time.perf_counter()
    again = derestore.load(model="lite-derain", device="cuda", precision="auto")
    assert again.engine.verdict == verdict and again.engine.precision == first.engine.precision
    print(json.dumps({"probe": verdict.__dict__, "first_load_s": round(probe_cost, 3),
                      "cached_load_s": round(time.perf_counter() - started, 3)}))


def test_one_replica_per_gpu_gives_the_outputs_of_one(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs two GPUs for replicas (this machine has {torch.cuda.device_count()})")
    ckpt = save_checkpoint(tmp_path / "naf.pth", nafnet_state())
    write_images(tmp_path / "in", 8, size=200)
    one = derestore.run([str(tmp_path / "in")], tmp_path / "one", weights=ckpt, device="cuda:0", precision="fp32")
    all_ = derestore.run([str(tmp_path / "in")], tmp_path / "all", weights=ckpt, device="cuda:all",
                         precision="fp32")
    assert one.ok == all_.ok == 8
    for path in sorted((tmp_path / "one").glob("*.png")):
        assert path.read_bytes() == (tmp_path / "all" / path.name).read_bytes()
