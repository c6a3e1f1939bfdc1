"""DTPNet: published key layout, golden outputs of the reference code, spandrel detection/loading."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import spandrel
import spandrel_extra_arches
import torch
from spandrel import ImageModelDescriptor, ModelTiling
from spandrel_extra_arches.architectures.M3SNet import M3SNet
from spandrel_extra_arches.architectures.MPRNet import MPRNet
from spandrel_extra_arches.architectures.Restormer import Restormer

from derestore.archs.dtpnet import (
    DTPNet,
    DTPNetArch,
    DTPNetConfig,
    config_from_state_dict,
    drop_profiler_keys,
)
from derestore.errors import ModelUnavailable

FIXTURES = Path(__file__).parent / "fixtures" / "dtpnet"
GOLDEN_CASES = (0, 1, 2)


def read_keys(path: Path) -> list[tuple[str, list[int], str]]:
    return [(k, list(shape), dtype) for k, shape, dtype in json.loads(path.read_text())]


def fill_state_dict(keys: list[tuple[str, list[int], str]], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The reference fixtures' deterministic weight fill (reference/archs/README.md).

    One generator per key seeded by crc32(key); fan-in scaled normals for ndim ≥ 2
    (times `scale`, 0.6 for DeRestormer), 1 + 0.1·z for 1-D weights, 0.1·z otherwise.
    """
    filled = {}
    for key, shape, _ in keys:
        z = np.random.default_rng(zlib.crc32(key.encode("utf-8"))).standard_normal(shape)
        if len(shape) >= 2:
            a = z / math.sqrt(math.prod(shape[1:])) * scale
        elif key.endswith("weight"):
            a = 1.0 + 0.1 * z
        else:
            a = 0.1 * z
        filled[key] = torch.from_numpy(a.astype(np.float32))
    return filled


def assert_matches_reference(ours: torch.Tensor, ref: np.ndarray) -> float:
    bound = max(1.0, float(np.abs(ref).max()))
    delta = np.abs(ours.detach().cpu().float().numpy() - ref)
    assert ours.shape == ref.shape
    assert delta.max() <= 1e-3 * bound, f"max|Δ| {delta.max():.3g}"
    assert delta.mean() <= 1e-5 * bound, f"mean|Δ| {delta.mean():.3g}"
    return float(delta.max())


def state_dict_on_meta(model_class: type[torch.nn.Module]) -> dict[str, torch.Tensor]:
    """A default-configuration state dict with real shapes and no memory behind it."""
    with torch.device("meta"):
        return model_class().state_dict()


@pytest.fixture(scope="module", autouse=True)
def registry() -> spandrel.ArchRegistry:
    try:
        from derestore.archs import install
    except ImportError:  # the package's own install() is not written yet
        install = None
    if install is not None:
        install()
    spandrel_extra_arches.install(ignore_duplicates=True)
    if "DTPNet" not in spandrel.MAIN_REGISTRY:
        spandrel.MAIN_REGISTRY.add(spandrel.ArchSupport.from_architecture(DTPNetArch()))
    return spandrel.MAIN_REGISTRY


@pytest.fixture(scope="module")
def keys() -> list[tuple[str, list[int], str]]:
    return read_keys(FIXTURES / "keys.json")


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    with np.load(FIXTURES / "golden.npz") as data:
        return dict(data)


@pytest.fixture(scope="module")
def filled(keys) -> dict[str, torch.Tensor]:
    return fill_state_dict(keys)


@pytest.fixture(scope="module")
def descriptor(registry, filled) -> ImageModelDescriptor:
    loaded = spandrel.ModelLoader().load_from_state_dict(filled)
    assert isinstance(loaded, ImageModelDescriptor)
    return loaded.eval()


def test_default_network_has_the_published_state_dict(keys):
    model = DTPNet()
    ours = [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in model.state_dict().items()]
    assert ours == keys
    assert len(ours) == 550
    assert sum(p.numel() for p in model.parameters()) == 45_246_322


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_output_through_spandrel(descriptor, golden, case):
    with torch.no_grad():
        out = descriptor.model(torch.from_numpy(golden[f"input_{case}"]))
    assert isinstance(out, torch.Tensor)  # the restored image alone, not (image, pred1)
    max_delta = assert_matches_reference(out, golden[f"output_{case}"])
    print(f"case {case}: max|Δ| = {max_delta:.3g}")


def test_descriptor_describes_the_network(descriptor):
    assert descriptor.architecture.id == "DTPNet"
    assert descriptor.purpose == "Restoration"
    assert (descriptor.scale, descriptor.input_channels, descriptor.output_channels) == (1, 3, 3)
    assert descriptor.size_requirements.multiple_of == 8
    assert descriptor.size_requirements.minimum == 8
    assert not descriptor.size_requirements.square
    assert descriptor.tiling == ModelTiling.DISCOURAGED
    assert (descriptor.supports_half, descriptor.supports_bfloat16) == (False, True)
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


FOREIGN = {
    "DeRestormer": lambda: dict.fromkeys(k for k, _, _ in read_keys(FIXTURES / "foreign" / "derestormer.keys.json")),
    "DRSformer": lambda: dict.fromkeys(k for k, _, _ in read_keys(FIXTURES / "foreign" / "drsformer.keys.json")),
    "DRSformer-200L-SPA": lambda: dict.fromkeys(
        k for k, _, _ in read_keys(FIXTURES / "foreign" / "drsformer_200l_spa.keys.json")
    ),
    "Restormer": lambda: state_dict_on_meta(Restormer),
    "MPRNet": lambda: state_dict_on_meta(MPRNet),
    "M3SNet": lambda: state_dict_on_meta(M3SNet),
}


@pytest.mark.parametrize("name", FOREIGN)
def test_other_architectures_are_not_taken_for_dtpnet(name):
    assert not DTPNetArch().detect(FOREIGN[name]())


@pytest.mark.parametrize("name", ["Restormer", "MPRNet", "M3SNet"])
def test_spandrel_still_claims_its_own_architectures(registry, name):
    state_dict = FOREIGN[name]()
    first = next(a for a in registry.architectures("detection") if a.detect(state_dict))
    assert first.architecture.id == name


def test_only_dtpnet_claims_a_dtpnet_state_dict(registry, filled):
    claims = [a.architecture.id for a in registry.architectures("detection") if a.detect(filled)]
    assert claims == ["DTPNet"]
