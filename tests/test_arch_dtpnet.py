"""DTPNet: published key layout, golden outputs of the reference code, loading through spandrel and derestore."""

from __future__ import annotations

import numpy as np
import pytest
import spandrel
import torch
from spandrel import ImageModelDescriptor, ModelTiling

import derestore
from derestore.archs.dtpnet import (
    DTPNet,
    DTPNetConfig,
    config_from_state_dict,
    drop_profiler_keys,
)
from derestore.errors import ModelUnavailable
from derestore.loading import install_architectures

from .arch_support import (
    assert_golden_case,
    filled_state_dict,
    key_list,
    published_tiling_and_reference,
    read_keys,
)

GOLDEN_CASES = (0, 1, 2)


@pytest.fixture(scope="module", autouse=True)
def registry() -> spandrel.ArchRegistry:
    install_architectures()
    return spandrel.MAIN_REGISTRY


@pytest.fixture(scope="module")
def descriptor(registry) -> ImageModelDescriptor:
    loaded = spandrel.ModelLoader().load_from_state_dict(filled_state_dict("dtpnet"))
    assert isinstance(loaded, ImageModelDescriptor)
    return loaded.eval()


def test_default_network_has_the_published_state_dict():
    model = DTPNet()
    assert key_list(model.state_dict()) == read_keys("dtpnet")
    assert len(model.state_dict()) == 550
    assert sum(p.numel() for p in model.parameters()) == 45_246_322


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_output_through_spandrel(descriptor, case):
    assert_golden_case(descriptor.model, "dtpnet", case)


def test_descriptor_describes_the_network(descriptor):
    assert descriptor.architecture.id == "DTPNet"
    assert descriptor.purpose == "Restoration"
    assert (descriptor.scale, descriptor.input_channels, descriptor.output_channels) == (1, 3, 3)
    assert descriptor.size_requirements.multiple_of == 8
    assert descriptor.size_requirements.minimum == 8
    assert not descriptor.size_requirements.square
    assert descriptor.tiling == ModelTiling.DISCOURAGED
    assert (descriptor.supports_half, descriptor.supports_bfloat16) == (True, False)
    assert descriptor.model.config == DTPNetConfig()


def test_multiple_of_8_is_needed_and_enough(descriptor):
    model = descriptor.model
    with torch.no_grad():
        assert model(torch.rand(1, 3, 8, 8)).shape == (1, 3, 8, 8)
        assert model(torch.rand(2, 3, 8, 24)).shape == (2, 3, 8, 24)
        with pytest.raises(RuntimeError):
            model(torch.rand(1, 3, 36, 52))  # a multiple of 4, not of 8


def test_descriptor_call_pads_odd_sizes_and_crops_back(descriptor):
    image = torch.rand(1, 3, 13, 19)
    with torch.no_grad():
        out = descriptor(image)
    assert out.shape == image.shape
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


def test_fp16_autocast_as_the_engine_runs_it():
    # CPU fp16 kernels are slow: the smallest network.
    model = DTPNet(DTPNetConfig(dim=8, blocks=(1,) * 8, heads=(1,) * 8, lstm_channels=8)).eval()
    x = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cpu", dtype=torch.float16):
            out = model(x)
    assert bool(torch.isfinite(out).all())
    assert float((out.float() - ref).abs().max()) < 0.02


def test_recurrent_state_follows_input_device_and_dtype():
    # The published forward calls .cuda() on its ConvLSTM state; on the meta
    # device and in bfloat16 that would fail or promote the dtype.
    with torch.device("meta"):
        model = DTPNet().to(torch.bfloat16)
        out = model(torch.empty(2, 3, 16, 24, dtype=torch.bfloat16))
    assert (out.device.type, out.dtype, out.shape) == ("meta", torch.bfloat16, (2, 3, 16, 24))


SMALL_CONFIGS = (
    DTPNetConfig(dim=16, blocks=(1, 2, 1, 2, 1, 1, 1, 1), heads=(1, 2, 2, 4, 2, 2, 1, 1)),
    DTPNetConfig(dim=8, blocks=(2, 1, 1, 1, 1, 2, 1, 3), heads=(2, 2, 4, 8, 4, 1, 1, 2),
                 ffn_expansion=2.0, bias=True, norm="BiasFree", lstm_channels=16),
)


@pytest.mark.parametrize("config", SMALL_CONFIGS, ids=["restormer-like", "biased-biasfree"])
def test_hyper_parameters_are_read_from_the_state_dict(registry, config):
    state_dict = DTPNet(config).state_dict()
    assert config_from_state_dict(state_dict) == config
    loaded = spandrel.ModelLoader().load_from_state_dict(state_dict)
    assert loaded.architecture.id == "DTPNet"
    assert loaded.model.config == config
    with torch.no_grad():
        assert loaded.model(torch.rand(1, 3, 16, 8)).shape == (1, 3, 16, 8)


def test_thop_leftovers_are_dropped_before_the_strict_load(registry):
    state_dict = DTPNet(SMALL_CONFIGS[0]).state_dict()
    profiled = dict(state_dict)
    for prefix in ("", "patch_embed.", "conv1_2.0.attn.qkv.", "conv_i.0."):
        profiled[prefix + "total_ops"] = torch.zeros(1, dtype=torch.float64)
        profiled[prefix + "total_params"] = torch.zeros(1, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="total_ops"):
        DTPNet(SMALL_CONFIGS[0]).load_state_dict(profiled)  # what a plain strict load does

    assert list(drop_profiler_keys(profiled)) == list(state_dict)
    assert len(profiled) == len(state_dict) + 8  # the caller's dict is left alone

    loaded = spandrel.ModelLoader().load_from_state_dict(profiled)
    assert loaded.architecture.id == "DTPNet"
    assert loaded.model.state_dict().keys() == state_dict.keys()
    assert all(torch.equal(v, state_dict[k]) for k, v in loaded.model.state_dict().items())


def test_inconsistent_feed_forward_widths_are_refused():
    state_dict = dict(DTPNet(SMALL_CONFIGS[0]).state_dict())
    state_dict["conv2_3.0.ffn.project_out.weight"] = torch.zeros(32, 70, 1, 1)
    with pytest.raises(ModelUnavailable, match="expansion factor"):
        config_from_state_dict(state_dict)


def test_bare_checkpoint_loads_through_derestore(tmp_path):
    model = DTPNet(SMALL_CONFIGS[0]).eval()
    torch.save(model.state_dict(), tmp_path / "net_latest.pth")
    # PyTorch's network is compared: a verdict for ONNX Runtime cached by another test must not apply.
    loaded = derestore.load(weights=tmp_path / "net_latest.pth", device="cpu", backend="torch")
    assert loaded.arch == "DTPNet"
    x = torch.rand(1, 3, 16, 24)
    with torch.no_grad():
        torch.testing.assert_close(loaded.engine.descriptor.model(x), model(x), rtol=0, atol=1e-5)


def test_published_tiling_is_the_whole_image(tmp_path):
    # The whole image, reflect-padded to the multiple of 8. (The published test.py instead crops
    # every image to a multiple of 32 and scores the crop; no DTPNet weights are published.)
    model = DTPNet(SMALL_CONFIGS[0])
    torch.save(model.state_dict(), tmp_path / "net_latest.pth")
    out, expected = published_tiling_and_reference(model, tmp_path / "net_latest.pth")
    np.testing.assert_allclose(out, expected, atol=1e-5)
