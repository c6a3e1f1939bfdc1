"""Shared fixtures: tiny random-weight checkpoints in the official container formats, and test images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch


def dncnn_state(seed: int = 0, nc: int = 8, nb: int = 5) -> dict[str, torch.Tensor]:
    """A small all-convolutional DnCNN (receptive radius = nb) with random weights."""
    from spandrel.architectures.DnCNN import DnCNN

    torch.manual_seed(seed)
    net = DnCNN(in_nc=3, out_nc=3, nc=nc, nb=nb, act_mode="BR")
    for p in net.parameters():
        p.data.mul_(0.5)
    return net.state_dict()


def nafnet_state(seed: int = 0) -> dict[str, torch.Tensor]:
    """A tiny NAFNet: needs sides that are multiples of 4 (two down-sampling levels)."""
    from spandrel.architectures.NAFNet import NAFNet

    torch.manual_seed(seed)
    net = NAFNet(img_channel=3, width=8, middle_blk_num=1, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1])
    return net.state_dict()


def save_checkpoint(path: Path, state: dict[str, torch.Tensor], container: str = "params") -> Path:
    """Save `state` the way training scripts do: {'params'}, {'params','params_ema'}, {'state_dict'} with
    'module.' prefixes, a bare dict, or safetensors."""
    if container == "safetensors":
        from safetensors.torch import save_file

        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
        return path
    if container == "params":
        obj: object = {"params": state}
    elif container == "params+ema":
        obj = {"params": state, "params_ema": {k: torch.zeros_like(v) for k, v in state.items()}}
    elif container == "state_dict_module":
        obj = {"epoch": 3, "state_dict": {"module." + k: v for k, v in state.items()}, "optimizer": {}}
    elif container == "bare":
        obj = dict(state)
    else:
        raise ValueError(container)
    torch.save(obj, path)
    return path


@pytest.fixture
def dncnn_ckpt(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "dncnn.pth", dncnn_state())


@pytest.fixture
def nafnet_ckpt(tmp_path: Path) -> Path:
    return save_checkpoint(tmp_path / "nafnet.pth", nafnet_state())


@pytest.fixture
def onnx_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """derestore's cache in this test's own folder, so that no verdict another test measured applies;
    returns its ONNX folder."""
    monkeypatch.setenv("DERESTORE_HOME", str(tmp_path / "cache"))
    return tmp_path / "cache" / "onnx"


@pytest.fixture
def published_statistics(monkeypatch: pytest.MonkeyPatch) -> None:
    """NAFNet with global statistics, the published network (local ones stay on PyTorch)."""
    from derestore import stats_choice

    monkeypatch.setitem(stats_choice.DEFAULT_STATS, "NAFNet", "global")


def timings(**seconds: float):  # noqa: ANN201 - a stand-in for onnx_backend.time_candidates
    """A stand-in for the timing step: fixed seconds per candidate, so that the choice is deterministic."""
    def fake(candidates, **_):
        return {name: seconds[name] for name in candidates}

    return fake


@pytest.fixture
def onnx_faster(monkeypatch: pytest.MonkeyPatch) -> None:
    """ONNX Runtime timed twice as fast as PyTorch in either layout."""
    from derestore import onnx_backend

    monkeypatch.setattr(onnx_backend, "time_candidates", timings(contiguous=1.0, channels_last=1.0, onnxruntime=0.5))


def smooth_image(h: int, w: int, seed: int = 0, channels: int = 3) -> np.ndarray:
    """A natural-ish test image (smooth gradients plus texture) as (H, W, C) float in [0, 1]."""
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:h, 0:w].astype(np.float64)
    base = [0.5 + 0.4 * np.sin(x / (7 + 3 * c) + y / (11 + c) + c) for c in range(channels)]
    img = np.stack(base, axis=-1) + 0.05 * rng.standard_normal((h, w, channels))
    return np.clip(img, 0, 1)


def to_uint(img: np.ndarray, depth: int = 8) -> np.ndarray:
    peak = 255 if depth == 8 else 65535
    return np.round(img * peak).astype(np.uint8 if depth == 8 else np.uint16)


def write_images(folder: Path, count: int, size: int = 24) -> list[Path]:
    """`count` small distinct PNGs img000.png, img001.png, … in `folder` (created)."""
    from PIL import Image as PILImage

    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i in range(count):
        p = folder / f"img{i:03d}.png"
        PILImage.fromarray(to_uint(smooth_image(size, size, seed=i))).save(p)
        paths.append(p)
    return paths


def decodes(path: Path) -> bool:
    import cv2

    return cv2.imdecode(np.fromfile(str(path), np.uint8), cv2.IMREAD_UNCHANGED) is not None


def cli_command(*args: str) -> list[str]:
    """`derestore ARGS…` as a subprocess command line, through the real entry point (`main`)."""
    import sys

    return [sys.executable, "-m", "derestore", *args]
