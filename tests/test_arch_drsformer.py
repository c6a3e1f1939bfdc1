"""DRSformer: checkpoint keys, exactness against the published network, spandrel detection and loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from spandrel import ImageModelDescriptor, ModelLoader, ModelTiling

import derestore
from derestore.archs.drsformer import DRSformer, DRSformerArch, keep_counts
from derestore.archs.fill import fill_state_dict
from derestore.errors import ModelUnavailable
from derestore.loading import install_architectures

from .arch_support import (
    assert_golden_case,
    key_list,
    meta_state_dict,
    published_tiling_and_reference,
    read_keys,
)

VARIANTS = {"full": True, "200l_spa": False}  # fixture folder drsformer/<variant> → has MEFC


def filled_model(**config) -> DRSformer:
    model = DRSformer(**config).eval()
    model.load_state_dict(fill_state_dict(model.state_dict()))
    return model


@pytest.fixture(scope="module", autouse=True)
def registered() -> None:
    install_architectures()


@pytest.fixture(scope="module", params=list(VARIANTS))
def filled(request) -> tuple[str, DRSformer]:
    return request.param, filled_model(mefc=VARIANTS[request.param])


# --- structure and exactness ------------------------------------------------------


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_state_dict_matches_published_keys(variant):
    model = DRSformer(mefc=VARIANTS[variant])
    assert key_list(model.state_dict()) == read_keys(f"drsformer/{variant}")


def test_keep_counts_follow_published_float_arithmetic():
    assert keep_counts(48) == (24, 32, 36, 38)
    assert keep_counts(96) == (48, 64, 72, 76)
    assert keep_counts(3) == (1, 2, 2, 2)


@pytest.mark.parametrize("case", (0, 1, 2))
def test_golden_outputs(filled, case):
    variant, model = filled
    assert_golden_case(model, f"drsformer/{variant}", case)


def test_batch_items_are_independent():
    # MEFC gates per sample (global pooling), so mixing up the batch would show here.
    model = filled_model(dim=8, num_blocks=(1, 1, 1, 1), heads=(1, 1, 2, 2))
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


def test_rejects_half_a_mefc():
    sd = meta_state_dict("drsformer/full")
    without_refinement = {k: v for k, v in sd.items() if not k.startswith("refinement.")}
    assert not DRSformerArch().detect(without_refinement)


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
    assert (descriptor.supports_half, descriptor.supports_bfloat16) == (False, False)
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
    model = filled_model(**CONFIGS[name])
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


SMALL = dict(dim=8, num_blocks=(1, 1, 1, 1), heads=(1, 1, 2, 2))


@pytest.mark.parametrize("container", ["params", "params+params_ema"])
def test_basicsr_containers_load_params_through_derestore(tmp_path, container):
    # The published test loads `params`; spandrel alone would take `params_ema`.
    model = filled_model(**SMALL)
    checkpoint = {"params": model.state_dict()}
    if container == "params+params_ema":
        checkpoint["params_ema"] = {k: torch.zeros_like(v) for k, v in model.state_dict().items()}
    torch.save(checkpoint, tmp_path / "deraining.pth")
    loaded = derestore.load(weights=tmp_path / "deraining.pth", device="cpu", backend="torch")
    assert loaded.arch == "DRSformer"
    x = torch.rand(1, 3, 16, 24, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        torch.testing.assert_close(loaded.engine.descriptor.model(x), model(x), rtol=0, atol=1e-5)


def test_published_tiling_is_the_whole_image_reflect_padded_to_8(tmp_path):
    # As test.py does it; the tile size is ignored.
    model = filled_model(**SMALL)
    torch.save({"params": model.state_dict()}, tmp_path / "deraining.pth")
    out, expected = published_tiling_and_reference(model, tmp_path / "deraining.pth")
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_inconsistent_feed_forward_widths_are_refused():
    state_dict = dict(DRSformer(**SMALL).state_dict())
    state_dict["encoder_level2.0.ffn.project_out.weight"] = torch.zeros(16, 70, 1, 1)
    with pytest.raises(ModelUnavailable, match="expansion factor"):
        DRSformerArch().load(state_dict)
