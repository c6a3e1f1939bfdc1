"""DRSformer: checkpoint keys, exactness against the published network, spandrel detection and loading."""

from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from spandrel import ImageModelDescriptor, ModelLoader, ModelTiling
from spandrel_extra_arches.architectures.M3SNet import M3SNet
from spandrel_extra_arches.architectures.MPRNet import MPRNet
from spandrel_extra_arches.architectures.Restormer import Restormer, RestormerArch

from derestore.archs.drsformer import DRSformer, DRSformerArch, keep_counts

FIXTURES = Path(__file__).parent / "fixtures" / "drsformer"
REFERENCE_ARCHS = Path("/work/shared/reference/archs")
VARIANTS = {"full": True, "200l_spa": False}  # fixture folder → has MEFC


def fill_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The reference README's deterministic fill: a fresh generator per key, seeded by crc32(key)."""
    filled = {}
    for key, value in state_dict.items():
        shape = tuple(value.shape)
        z = np.random.default_rng(zlib.crc32(key.encode("utf-8"))).standard_normal(shape)
        if len(shape) >= 2:
            a = z / math.sqrt(math.prod(shape[1:]))
        elif key.endswith("weight"):
            a = 1.0 + 0.1 * z
        else:
            a = 0.1 * z
        filled[key] = torch.from_numpy(a.astype(np.float32))
    return filled


def read_keys(path: Path) -> list[list]:
    return [json.loads(line.rstrip().rstrip(",")) for line in path.read_text().splitlines() if line.startswith('["')]


def key_list(state_dict: dict[str, torch.Tensor]) -> list[list]:
    return [[k, list(v.shape), str(v.dtype).removeprefix("torch.")] for k, v in state_dict.items()]


def keys_only(path: Path) -> dict[str, torch.Tensor]:
    """A state dict with the right keys and shapes but no storage (for detection only)."""
    return {k: torch.empty(shape, device="meta") for k, shape, _ in read_keys(path)}


@pytest.fixture(scope="module", autouse=True)
def registered() -> None:
    import spandrel_extra_arches

    import derestore.archs

    spandrel_extra_arches.install(ignore_duplicates=True)
    derestore.archs.install()


@pytest.fixture(scope="module", params=list(VARIANTS))
def filled(request) -> tuple[str, DRSformer]:
    model = DRSformer(mefc=VARIANTS[request.param]).eval()
    model.load_state_dict(fill_state_dict(model.state_dict()))
    return request.param, model


@pytest.fixture(scope="module")
def restormer_sd() -> dict[str, torch.Tensor]:
    return Restormer().state_dict()


# --- structure and exactness ------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_dict_matches_published_keys(variant):
    model = DRSformer(mefc=VARIANTS[variant])
    assert key_list(model.state_dict()) == read_keys(FIXTURES / variant / "keys.json")


def test_keep_counts_follow_published_float_arithmetic():
    assert keep_counts(48) == (24, 32, 36, 38)
    assert keep_counts(96) == (48, 64, 72, 76)
    assert keep_counts(3) == (1, 2, 2, 2)


def test_golden_outputs(filled):
    variant, model = filled
    golden = np.load(FIXTURES / variant / "golden.npz")
    for i in range(3):
        ref = golden[f"output_{i}"]
        with torch.no_grad():
            out = model(torch.from_numpy(golden[f"input_{i}"]))
        assert isinstance(out, torch.Tensor) and out.shape == ref.shape
        diff = np.abs(out.numpy() - ref)
        scale = max(1.0, float(np.abs(ref).max()))
        assert diff.max() <= 1e-3 * scale, (variant, i, diff.max())
        assert diff.mean() <= 1e-5 * scale, (variant, i, diff.mean())


def test_batch_items_are_independent():
    # MEFC gates per sample (global pooling), so mixing up the batch would show here.
    model = DRSformer(dim=8, num_blocks=(1, 1, 1, 1), heads=(1, 1, 2, 2)).eval()
    model.load_state_dict(fill_state_dict(model.state_dict()))
    x = torch.rand(3, 3, 16, 24, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        together = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(3)])
    torch.testing.assert_close(together, alone, rtol=0, atol=1e-5)


def test_forward_creates_nothing_off_the_input_device():
    # On the meta device any tensor made on the CPU inside forward would raise.
    model = DRSformer(dim=8, num_blocks=(1, 1, 1, 1), heads=(1, 1, 2, 2)).to("meta")
    out = model(torch.empty(2, 3, 16, 24, device="meta"))
    assert out.shape == (2, 3, 16, 24) and out.device.type == "meta"


def test_bfloat16_forward_keeps_dtype():
    model = DRSformer(dim=8, num_blocks=(1, 1, 1, 1), heads=(1, 1, 2, 2)).eval().to(torch.bfloat16)
    with torch.no_grad():
        out = model(torch.rand(1, 3, 16, 16).to(torch.bfloat16))
    assert out.dtype == torch.bfloat16 and bool(torch.isfinite(out).all())


# --- spandrel architecture --------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_detects_both_published_variants(variant):
    sd = keys_only(FIXTURES / variant / "keys.json")
    assert DRSformerArch().detect(sd)
    assert not RestormerArch().detect(sd)


@pytest.mark.parametrize("other", ["derestormer", "dtpnet"])
def test_rejects_other_reference_architectures(other):
    path = REFERENCE_ARCHS / other / "keys.json"
    if not path.exists():
        pytest.fail(f"{path} is missing: the reference folder must be mounted for this test")
    assert not DRSformerArch().detect(keys_only(path))


def test_rejects_half_a_mefc():
    sd = keys_only(FIXTURES / "full" / "keys.json")
    without_refinement = {k: v for k, v in sd.items() if not k.startswith("refinement.")}
    assert not DRSformerArch().detect(without_refinement)


@pytest.mark.parametrize("arch_id", ["Restormer", "MPRNet", "M3SNet"])
def test_spandrel_detections_undisturbed(arch_id, restormer_sd):
    sd = {"Restormer": lambda: restormer_sd, "MPRNet": lambda: MPRNet().state_dict(),
          "M3SNet": lambda: M3SNet().state_dict()}[arch_id]()
    assert not DRSformerArch().detect(sd)
    assert ModelLoader().load_from_state_dict(sd).architecture.id == arch_id


def test_load_filled_checkpoint_through_spandrel(filled):
    variant, model = filled
    descriptor = ModelLoader().load_from_state_dict(model.state_dict())
    assert isinstance(descriptor, ImageModelDescriptor)
    assert descriptor.architecture.id == "DRSformer"
    assert descriptor.model.hyperparameters["mefc"] is VARIANTS[variant]
    assert descriptor.purpose == "Restoration" and descriptor.scale == 1
    assert (descriptor.input_channels, descriptor.output_channels) == (3, 3)
    assert descriptor.size_requirements.multiple_of == 8
    assert descriptor.tiling is ModelTiling.DISCOURAGED
    x = torch.rand(1, 3, 8, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        torch.testing.assert_close(descriptor.model.eval()(x), model(x), rtol=0, atol=0)


CONFIGS = {
    "small_mefc": dict(inp_channels=3, out_channels=3, dim=16, num_blocks=(1, 2, 1, 2), heads=(1, 2, 2, 4),
                       ffn_expansion_factor=2.0, bias=True, layernorm_type="BiasFree", mefc=True, mefc_layers=2,
                       mefc_steps=2),
    "small_plain": dict(inp_channels=1, out_channels=1, dim=8, num_blocks=(2, 1, 1, 1), heads=(2, 1, 2, 2),
                        ffn_expansion_factor=2.66, bias=False, layernorm_type="WithBias", mefc=False,
                        mefc_layers=1, mefc_steps=4),
}


@pytest.mark.parametrize("name", list(CONFIGS))
def test_params_container_file_reads_hyperparameters(name, tmp_path):
    model = DRSformer(**CONFIGS[name]).eval()
    model.load_state_dict(fill_state_dict(model.state_dict()))
    path = tmp_path / f"{name}.pth"
    torch.save({"params": model.state_dict()}, path)

    descriptor = ModelLoader().load_from_file(path)
    assert descriptor.architecture.id == "DRSformer"
    loaded = descriptor.model.hyperparameters
    assert {k: tuple(v) if isinstance(v, (list, tuple)) else v for k, v in loaded.items()} == CONFIGS[name]
    channels = CONFIGS[name]["inp_channels"]
    assert (descriptor.input_channels, descriptor.output_channels) == (channels, channels)
    x = torch.rand(2, channels, 16, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        torch.testing.assert_close(descriptor.model.eval()(x), model(x), rtol=0, atol=0)


def test_descriptor_call_pads_odd_sizes():
    model = DRSformer(dim=8, num_blocks=(1, 1, 1, 1), heads=(1, 1, 2, 2), mefc=False).eval()
    descriptor = ModelLoader().load_from_state_dict(model.state_dict())
    x = torch.rand(1, 3, 13, 21, generator=torch.Generator().manual_seed(3))
    out = descriptor(x)
    assert out.shape == (1, 3, 13, 21)
    padded = torch.nn.functional.pad(x, (0, 3, 0, 3), mode="reflect")
    with torch.no_grad():
        expected = model(padded)[..., :13, :21].clamp(0, 1)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_restormer_is_not_claimed_and_drsformer_not_taken_by_restormer(restormer_sd, filled):
    _, model = filled
    assert not DRSformerArch().detect(restormer_sd)
    assert not RestormerArch().detect(model.state_dict())
