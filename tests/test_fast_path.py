"""The throughput options: --tile auto, --layout, --compile, and the pure tile fitting behind auto."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image as PILImage

import derestore
from derestore.engine import Engine
from derestore.tiling import SizeRule, fit_tile

from .conftest import nafnet_state, save_checkpoint, smooth_image, to_uint
from .test_cli_restore import invoke, read_any


def test_fit_tile_whole_image_when_it_fits():
    assert fit_tile(100, 200, bytes_per_pixel=10, free_bytes=100 * 200 * 10, batch=4) == 0


def test_fit_tile_is_the_largest_step_multiple_within_budget():
    # 1 MB for 4 tiles at 10 B/px: 25,000 px per tile -> side 158 -> 128 on a 64-px step.
    tile = fit_tile(4000, 3000, bytes_per_pixel=10, free_bytes=1_000_000, batch=4)
    assert tile == 128
    assert 4 * tile**2 * 10 <= 1_000_000
    bigger = fit_tile(4000, 3000, bytes_per_pixel=10, free_bytes=40_000_000, batch=4)
    assert bigger == 960 and 4 * bigger**2 * 10 <= 40_000_000 < 4 * (bigger + 64) ** 2 * 10


def test_fit_tile_respects_the_model_multiple_and_floor():
    assert fit_tile(5000, 5000, 10, 4 * 200**2 * 10, 4, SizeRule(multiple=48)) % 48 == 0
    assert fit_tile(5000, 5000, 1e9, 1e6, 4) == 128  # never below the floor


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    src = tmp_path / "in"
    src.mkdir()
    PILImage.fromarray(to_uint(smooth_image(48, 64, seed=5))).save(src / "a.png")
    return src


@pytest.fixture
def naf(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "naf.pth", nafnet_state(), "params")


def test_tile_auto_on_cpu_runs_whole_image_when_memory_allows(tmp_path, folder, naf):
    whole, auto = tmp_path / "whole", tmp_path / "auto"
    assert invoke("denoise", folder, "-o", whole, "--weights", naf, "--tile", "0").exit_code == 0
    res = invoke("denoise", folder, "-o", auto, "--weights", naf, "--tile", "auto")
    assert res.exit_code == 0, res.output
    assert np.array_equal(read_any(whole / "a.png"), read_any(auto / "a.png"))
    assert json.loads((auto / "derestore-run.json").read_text())["options"]["tile"] == "auto"


def test_auto_tile_shrinks_with_free_memory(naf, monkeypatch):
    model = derestore.load(weights=naf, device="cpu")
    monkeypatch.setattr("derestore.engine.free_memory", lambda device: 10**15)
    assert model.engine.auto_tile(6000, 8000) == 0
    monkeypatch.setattr("derestore.engine.free_memory", lambda device: 20 * 10**9)
    small = model.engine.auto_tile(6000, 8000)
    assert 128 <= small < 6000
    assert model.engine.batch_size * small**2 * model.engine.bytes_per_pixel() <= 0.6 * 20 * 10**9


@pytest.mark.parametrize("value", ["big", "-3", "1.5"])
def test_bad_tile_values_exit_2(tmp_path, folder, naf, value):
    res = invoke("denoise", folder, "-o", tmp_path / "o", "--weights", naf, "--tile", value)
    assert res.exit_code == 2
    assert "--tile" in res.output
    assert not (tmp_path / "o").exists()


def test_layouts_give_the_same_image(tmp_path, folder, naf):
    outs = {}
    for layout in ("contiguous", "channels_last"):
        res = invoke("denoise", folder, "-o", tmp_path / layout, "--weights", naf, "--layout", layout, "--json")
        assert res.exit_code == 0, res.output
        outs[layout] = read_any(tmp_path / layout / "a.png").astype(int)
        manifest = json.loads((tmp_path / layout / "derestore-run.json").read_text())
        assert manifest["options"]["channels_last"] is (layout == "channels_last")
    assert np.abs(outs["contiguous"] - outs["channels_last"]).max() <= 1


def test_unknown_layout_exits_2(tmp_path, folder, naf):
    res = invoke("denoise", folder, "-o", tmp_path / "o", "--weights", naf, "--layout", "nhwc")
    assert res.exit_code == 2 and "--layout" in res.output


def test_compile_reports_its_cost_and_keeps_the_output(tmp_path, folder, naf):
    plain, compiled = tmp_path / "plain", tmp_path / "compiled"
    assert invoke("denoise", folder, "-o", plain, "--weights", naf, "--tile", "0").exit_code == 0
    res = invoke("denoise", folder, "-o", compiled, "--weights", naf, "--tile", "0", "--compile")
    assert res.exit_code == 0, res.output
    assert "torch.compile" in res.output and "first forward pass took" in res.output
    assert np.abs(read_any(plain / "a.png").astype(int) - read_any(compiled / "a.png").astype(int)).max() <= 1


def test_engine_keeps_channels_last_off_for_restormer():
    from spandrel import ModelLoader
    from spandrel_extra_arches.architectures.Restormer import Restormer

    net = Restormer(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 1, 1, 1])
    import spandrel_extra_arches

    spandrel_extra_arches.install(ignore_duplicates=True)
    engine = Engine.create(ModelLoader().load_from_state_dict(net.state_dict()), device="cpu")
    assert engine.descriptor.architecture.id == "Restormer"
    assert not engine.channels_last  # measured 2x slower in channels_last on the CPU


def test_batch_size_defaults_to_one_tile_per_pass_for_pytorch_on_a_cpu(naf, tmp_path):
    assert derestore.load(weights=naf, device="cpu", backend="torch").engine.batch_size == 1
    assert derestore.load(weights=naf, device="cpu", backend="torch", batch_size=4).engine.batch_size == 4
    fast = derestore.load(weights=naf, device="cpu", backend="onnxruntime", stats="global")
    assert fast.engine.batch_size == 4  # ONNX Runtime gains from batches
    with pytest.raises(derestore.errors.UsageError, match="batch_size=0: must be at least 1"):
        derestore.load(weights=naf, device="cpu", batch_size=0)
