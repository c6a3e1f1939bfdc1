"""Checkpoint files → descriptors: containers, safety, detection errors."""

from __future__ import annotations

import pathlib

import pytest
import torch

from derestore.errors import ModelUnavailable
from derestore.loading import extract_state_dict, load_model

from .conftest import dncnn_state, nafnet_state, save_checkpoint


@pytest.mark.parametrize("container", ["params", "params+ema", "state_dict_module", "bare", "safetensors"])
def test_official_containers_load(tmp_path, container):
    state = nafnet_state(seed=1)
    suffix = ".safetensors" if container == "safetensors" else ".pth"
    path = save_checkpoint(tmp_path / f"net{suffix}", state, container)
    loaded = load_model(path)
    assert loaded.arch == "NAFNet"
    got = loaded.descriptor.model.state_dict()
    for key, value in state.items():
        assert torch.equal(got[key], value), key


def test_params_preferred_over_params_ema():
    state = {"w": torch.ones(2)}
    picked = extract_state_dict({"params_ema": {"w": torch.zeros(2)}, "params": state})
    assert torch.equal(picked["w"], torch.ones(2))


def test_profiler_leftovers_and_prefix_are_dropped():
    raw = {"module.a.weight": torch.ones(1), "module.a.total_ops": torch.zeros(1), "module.total_params": torch.zeros(1)}
    assert list(extract_state_dict(raw)) == ["a.weight"]


class _Payload:
    def __init__(self, marker: pathlib.Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (pathlib.Path.touch, (self.marker,))


def test_pickle_that_would_run_code_is_refused(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"params": dncnn_state(), "x": _Payload(marker)}, path)
    with pytest.raises(ModelUnavailable, match="refused"):
        load_model(path)
    assert not marker.exists()


def test_unknown_architecture(tmp_path):
    path = tmp_path / "odd.pth"
    torch.save({"foo.weight": torch.zeros(3, 3)}, path)
    with pytest.raises(ModelUnavailable, match="no known architecture"):
        load_model(path)


def test_truncated_file(tmp_path):
    good = save_checkpoint(tmp_path / "good.pth", dncnn_state())
    bad = tmp_path / "bad.pth"
    bad.write_bytes(good.read_bytes()[:1000])
    with pytest.raises(ModelUnavailable, match="bad.pth"):
        load_model(bad)


def test_missing_file(tmp_path):
    with pytest.raises(ModelUnavailable, match="does not exist"):
        load_model(tmp_path / "nope.pth")


def test_expected_arch_mismatch(tmp_path):
    path = save_checkpoint(tmp_path / "d.pth", dncnn_state())
    with pytest.raises(ModelUnavailable, match="not Restormer"):
        load_model(path, expected_arch="Restormer")
