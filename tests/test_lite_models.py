"""The bundled lite models: offline, small, and they restore (a margin over the degraded input)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

import derestore
from derestore import metrics
from derestore.errors import ModelUnavailable
from derestore.loading import load_model
from derestore.registry import load_registry
from training.degrade import degrade

from .test_cli_restore import invoke

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"
TASKS = {"derain": "rain", "desnow": "snow", "dehaze": "haze", "deblur": "blur", "denoise": "noise"}
# Minimum PSNR gain on a freshly degraded held-out crop (measured: +9.3, +5.6, +11.7, +0.52, +10.3 dB).
MARGIN_DB = {"derain": 4.0, "desnow": 3.0, "dehaze": 3.0, "deblur": 0.3, "denoise": 5.0}
# On the shipped examples (measured: +8.9, +7.5, +10.6, +0.28, +10.2 dB); lite-deblur misses its
# target (MODELS.md), so its bar is only "not worse".
EXAMPLE_GAIN_DB = {"derain": 4.0, "desnow": 3.0, "dehaze": 3.0, "deblur": 0.1, "denoise": 5.0}


@pytest.fixture(autouse=True)
def offline(tmp_path, monkeypatch):
    monkeypatch.setenv("DERESTORE_OFFLINE", "1")
    monkeypatch.setenv("DERESTORE_HOME", str(tmp_path / "empty-cache"))


def read_rgb(path: Path) -> np.ndarray:
    return cv2.cvtColor(cv2.imread(str(path), cv2.IMREAD_COLOR), cv2.COLOR_BGR2RGB)


def psnr(gt: np.ndarray, pred: np.ndarray) -> float:
    return metrics.score(gt, pred, protocol="rgb").psnr


@pytest.mark.parametrize("task", TASKS)
def test_lite_model_is_bundled_small_and_loads_offline(task):
    record = load_registry().model(f"lite-{task}")
    model = derestore.load(model=f"lite-{task}", device="cpu")
    assert model.arch == "NAFNet"
    assert model.checkpoint.suffix == ".safetensors"
    assert model.checkpoint.stat().st_size <= 5_000_000  # the 5 MB budget, in decimal megabytes
    assert model.checkpoint.is_relative_to(ROOT / "derestore" / record.bundled.rsplit("/", 1)[0])


@pytest.mark.parametrize("task", TASKS)
def test_lite_model_improves_a_fresh_synthetic_pair(task):
    clean = read_rgb(EXAMPLES / "clean" / f"{TASKS[task]}.png")[:192, :256]
    bad = degrade(task, clean.astype(np.float32) / 255, np.random.default_rng(2024))
    bad = np.round(bad * 255).astype(np.uint8)
    model = derestore.load(model=f"lite-{task}", device="cpu")
    out, _ = model.restore_array(bad.transpose(2, 0, 1).astype(np.float32) / 255, tile=0)
    restored = np.round(out.transpose(1, 2, 0) * 255).astype(np.uint8)
    assert psnr(clean, restored) >= psnr(clean, bad) + MARGIN_DB[task]


def test_lite_models_start_without_importing_the_extra_architectures():
    code = ("import sys, derestore; derestore.load(model='lite-derain', device='cpu'); "
            "print('spandrel_extra_arches' in sys.modules)")
    env = {**os.environ, "DERESTORE_OFFLINE": "1"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert done.stdout.strip() == "False", done.stderr


def test_loading_as_the_expected_core_architecture_matches_full_detection():
    path = ROOT / "derestore" / "lite" / "lite-deblur.safetensors"
    fast = load_model(path, expected_arch="NAFNet").descriptor.model
    full = load_model(path).descriptor.model
    x = torch.rand(1, 3, 48, 64)
    with torch.inference_mode():
        assert torch.equal(fast(x), full(x))
    with pytest.raises(ModelUnavailable, match="is a NAFNet checkpoint, not DeRestormer"):
        load_model(path, expected_arch="DeRestormer")


def test_desnow_defaults_to_the_lite_model_and_models_says_why():
    assert load_registry().default_for("desnow").name == "lite-desnow"
    res = invoke("models", "-t", "desnow")
    assert res.exit_code == 0, res.output
    assert "bundled" in res.output and "desnow defaults to the bundled lite-desnow" in res.output


@pytest.mark.parametrize("task", TASKS)
def test_quick_start_restores_the_examples(tmp_path, task):
    name = TASKS[task]
    res = invoke(task, EXAMPLES / f"{name}.png", "-m", f"lite-{task}", "-o", tmp_path / "restored")
    assert res.exit_code == 0, res.output
    clean = read_rgb(EXAMPLES / "clean" / f"{name}.png")
    before = psnr(clean, read_rgb(EXAMPLES / f"{name}.png"))
    after = psnr(clean, read_rgb(tmp_path / "restored" / f"{name}.png"))
    assert after > before + EXAMPLE_GAIN_DB[task], (before, after)


def test_weights_commands_treat_bundled_files_as_cached():
    res = invoke("weights", "path", "lite-derain")
    assert res.exit_code == 0, res.output
    assert Path(res.output.strip()) == ROOT / "derestore" / "lite" / "lite-derain.safetensors"
    res = invoke("weights", "verify", "lite-derain", "--json")
    assert res.exit_code == 0, res.output
    assert '"status": "ok"' in res.output
    assert (ROOT / "derestore" / "lite" / "lite-derain.safetensors").is_file()
