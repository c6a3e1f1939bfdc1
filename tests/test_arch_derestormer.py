"""DeRestormer: published key layout, golden outputs of the reference code, DO-Conv folding,
the published windowed test procedure, and loading and tiling through derestore."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import spandrel
import torch
from spandrel import ImageModelDescriptor, ModelTiling

import derestore
from derestore.archs.derestormer import (
    DEFAULT_TILE,
    DeRestormer,
    DeRestormerArch,
    DOConv2d,
    attention_sampling_grid,
    fold_do_convs,
    window_partition_inference,
)
from derestore.archs.fill import DERESTORMER_SCALE
from derestore.errors import InputError, ModelUnavailable
from derestore.loading import install_architectures

from .arch_support import (
    assert_golden_case,
    assert_matches_reference,
    filled_state_dict,
    key_list,
    read_golden,
    read_keys,
)

GOLDEN_CASES = (0, 1, 2)


def tiny_state_dict(seed: int = 0, **config) -> dict[str, torch.Tensor]:
    """A small DeRestormer in training form, with non-zero `D` so that folding matters."""
    torch.manual_seed(seed)
    model = DeRestormer(**config)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(".D") or "offset_conv" in name or "modulator_conv" in name:
                p.normal_(0.0, 0.05)
    return model.state_dict()


def training_form_output(state_dict: dict[str, torch.Tensor], x: torch.Tensor, **config) -> torch.Tensor:
    model = DeRestormer(**config).eval()
    model.load_state_dict(state_dict)
    with torch.no_grad():
        return model(x)


TINY = {"dim": 16, "num_res": 1, "heads": (1, 2, 4)}


@pytest.fixture(scope="module", autouse=True)
def registry() -> spandrel.ArchRegistry:
    install_architectures()
    return spandrel.MAIN_REGISTRY


@pytest.fixture(scope="module")
def golden() -> dict[str, np.ndarray]:
    return read_golden("derestormer")


@pytest.fixture(scope="module")
def filled() -> dict[str, torch.Tensor]:
    return filled_state_dict("derestormer", DERESTORMER_SCALE)


@pytest.fixture(scope="module")
def descriptor(registry, filled) -> ImageModelDescriptor:
    loaded = spandrel.ModelLoader().load_from_state_dict(filled)
    assert isinstance(loaded, ImageModelDescriptor)
    return loaded.eval()


@pytest.fixture(scope="module")
def tiny_descriptor(registry) -> ImageModelDescriptor:
    loaded = spandrel.ModelLoader().load_from_state_dict(tiny_state_dict(**TINY))
    assert isinstance(loaded, ImageModelDescriptor)
    return loaded.eval()


# --------------------------------------------------------------------------- published network


def test_default_network_has_the_published_state_dict():
    model = DeRestormer()
    assert key_list(model.state_dict()) == read_keys("derestormer")
    assert len(model.state_dict()) == 1386
    assert sum(p.numel() for p in model.parameters()) == 34_914_340
    assert sum(p.numel() for p in model.parameters() if p.requires_grad) == 32_741_515


@pytest.mark.parametrize("case", GOLDEN_CASES)
def test_golden_output_through_spandrel(descriptor, case):
    assert_golden_case(descriptor.model, "derestormer", case)


def test_training_form_matches_the_reference_and_the_folded_model(descriptor, filled, golden):
    x = torch.from_numpy(golden["input_0"])
    unfolded = training_form_output(filled, x)
    assert_matches_reference(unfolded, golden["output_0"])
    with torch.no_grad():
        folded = descriptor.model(x)
    assert float((folded - unfolded).abs().max()) <= 1e-5


def test_the_loaded_model_runs_plain_convolutions(descriptor):
    modules = list(descriptor.model.modules())
    assert not any(isinstance(m, DOConv2d) for m in modules)
    state = descriptor.model.state_dict()
    assert not [k for k in state if k.endswith((".W", ".D", ".D_diag"))]
    assert state["Encoder.0.layers.0.main.0.main.0.weight"].shape == (32, 32, 3, 3)
    assert state["Encoder.0.layers.1.ffn.dwconv.main.0.weight"].shape == (170, 1, 3, 3)
    assert state["Convs.0.main.0.weight"].shape == (64, 128, 1, 1)


def test_descriptor_describes_the_network(descriptor):
    assert descriptor.architecture.id == "DeRestormer"
    assert descriptor.purpose == "Restoration"
    assert (descriptor.scale, descriptor.input_channels, descriptor.output_channels) == (1, 3, 3)
    req = descriptor.size_requirements
    assert (req.minimum, req.multiple_of, req.square) == (8, 4, True)
    assert descriptor.tiling == ModelTiling.SUPPORTED
    assert (descriptor.supports_half, descriptor.supports_bfloat16) == (True, False)
    assert descriptor.model.hyperparameters["num_res"] == 8
    assert list(descriptor.model.hyperparameters["heads"]) == [1, 2, 4]
    assert DEFAULT_TILE == 256


def test_windowed_inference_matches_the_published_procedure(descriptor, golden):
    x = torch.from_numpy(golden["win_input"])
    with torch.no_grad():
        out = window_partition_inference(descriptor.model, x, int(golden["win_size"]))
    max_delta = assert_matches_reference(out, golden["win_output"])
    print(f"windowed: max|Δ| = {max_delta:.3g}")


# --------------------------------------------------------------------------- building blocks


@pytest.mark.parametrize(
    "in_ch, out_ch, k, stride, groups",
    [(5, 7, 3, 1, 1), (4, 6, 3, 2, 1), (6, 6, 3, 1, 6), (8, 8, 1, 1, 1)],
    ids=["conv", "strided", "depthwise", "1x1"],
)
def test_do_conv_kernel_and_folding(in_ch, out_ch, k, stride, groups):
    torch.manual_seed(1)
    conv = DOConv2d(in_ch, out_ch, k, stride, groups)
    if k > 1:
        with torch.no_grad():
            conv.D.normal_()
        # K = (D + I)·W per input channel: W[o, i, :] mapped through (D[i] + I), tap m = row·k + col.
        w = conv.W.detach().double()
        d = conv.D.detach().double() + torch.eye(k * k, dtype=torch.float64)
        if groups == 1:
            expected = torch.stack([torch.stack([d[i] @ w[o, i] for i in range(in_ch)]) for o in range(out_ch)])
        else:
            expected = torch.stack([(d[c] @ w[c, 0])[None] for c in range(out_ch)])
        assert torch.allclose(conv.kernel().double(), expected.reshape(out_ch, in_ch // groups, k, k), atol=1e-6)
    x = torch.rand(2, in_ch, 9, 12)
    with torch.no_grad():
        assert torch.allclose(conv.folded()(x), conv(x), atol=1e-6)


def test_folding_replaces_every_do_conv():
    model = DeRestormer(**TINY)
    count = sum(isinstance(m, DOConv2d) for m in model.modules())
    assert fold_do_convs(model) == count > 0
    assert not any(isinstance(m, DOConv2d) for m in model.modules())


def test_attention_grid_reads_the_transposed_position():
    # Published quirk: output (row i, col j) samples x = i + ox/W, y = j + oy/H (align_corners pixels).
    h, w = 3, 5
    offsets = torch.zeros(1, 2, h, w)
    offsets[0, 0], offsets[0, 1] = 0.5, -1.5  # ox, oy for one head
    grid = attention_sampling_grid(offsets, heads=1)
    rows = torch.arange(h, dtype=torch.float32)[:, None].expand(h, w)
    cols = torch.arange(w, dtype=torch.float32)[None, :].expand(h, w)
    x_pixels = (grid[0, ..., 0] + 1) * (w - 1) / 2
    y_pixels = (grid[0, ..., 1] + 1) * (h - 1) / 2
    assert torch.allclose(x_pixels, rows + 0.5 / w, atol=1e-5)
    assert torch.allclose(y_pixels, cols - 1.5 / h, atol=1e-5)


# --------------------------------------------------------------------------- windowed inference


@pytest.mark.parametrize("shape", [(2, 3, 40, 56), (1, 3, 48, 32), (1, 3, 35, 32), (1, 1, 16, 16)])
def test_window_partition_stitches_each_group_where_published(shape):
    win = 16
    x = torch.rand(shape)
    n_rows, n_cols = shape[2] // win, shape[3] // win

    def tag(windows: torch.Tensor) -> torch.Tensor:  # the identity plus 1000·(window index + 1)
        return windows + 1000.0 * torch.arange(1, windows.shape[0] + 1).view(-1, 1, 1, 1)

    out = window_partition_inference(tag, x, win)
    index = torch.round((out - x) / 1000.0).long() - 1
    assert torch.allclose(out - 1000.0 * (index + 1), x, atol=1e-3)  # every pixel from its own position

    h, w = n_rows * win, n_cols * win
    b = shape[0]
    main = b * n_rows * n_cols
    right = b * n_rows if w != shape[3] else 0
    bottom = b * n_cols if h != shape[2] else 0
    for img in range(b):
        idx = index[img, 0]
        for r in range(n_rows):
            for c in range(n_cols):
                tile = idx[r * win:(r + 1) * win, c * win:(c + 1) * win]
                assert (tile == img * n_rows * n_cols + r * n_cols + c).all()
            if right:
                assert (idx[r * win:(r + 1) * win, w:] == main + img * n_rows + r).all()
        if bottom:
            for c in range(n_cols):
                assert (idx[h:, c * win:(c + 1) * win] == main + right + img * n_cols + c).all()
        if right and bottom:
            assert (idx[h:, w:] == main + right + bottom + img).all()


def test_window_partition_batches_and_refuses_small_images():
    x = torch.rand(1, 3, 40, 56)
    calls: list[int] = []

    def double(windows: torch.Tensor) -> torch.Tensor:
        calls.append(windows.shape[0])
        return 2 * windows

    assert torch.equal(window_partition_inference(double, x, 16, max_batch=5), 2 * x)
    assert calls == [5, 5, 2]  # 6 main + 2 right + 3 bottom + 1 corner windows
    with pytest.raises(InputError, match="smaller than the 16×16 window"):
        window_partition_inference(double, torch.rand(1, 3, 15, 40), 16)


# --------------------------------------------------------------------------- loading


def test_size_rule(tiny_descriptor):
    model = tiny_descriptor.model
    with torch.no_grad():
        assert model(torch.rand(1, 3, 8, 8)).shape == (1, 3, 8, 8)
        assert model(torch.rand(2, 3, 12, 20)).shape == (2, 3, 12, 20)
        with pytest.raises(RuntimeError):
            model(torch.rand(1, 3, 34, 50))  # even, but not a multiple of 4


def test_descriptor_call_pads_odd_sizes_and_crops_back(tiny_descriptor):
    image = torch.rand(1, 3, 13, 21)
    with torch.no_grad():
        out = tiny_descriptor(image)
    assert out.shape == image.shape
    assert 0.0 <= float(out.min()) and float(out.max()) <= 1.0


@pytest.mark.parametrize(
    "config",
    [TINY, {"dim": 8, "num_res": 2, "heads": (2, 2, 4), "ffn_expansion": 2.0}],
    ids=["tiny", "two-blocks"],
)
def test_hyper_parameters_are_read_and_loading_is_exact(registry, config):
    state_dict = tiny_state_dict(**config)
    loaded = spandrel.ModelLoader().load_from_state_dict(state_dict)
    assert loaded.architecture.id == "DeRestormer"
    params = loaded.model.hyperparameters
    assert (params["dim"], params["num_res"], tuple(params["heads"])) == (
        config["dim"], config["num_res"], tuple(config["heads"])
    )
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        folded = loaded.model(x)
    assert torch.allclose(folded, training_form_output(state_dict, x, **config), atol=1e-5)


@pytest.fixture
def checkpoint(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny DeRestormer saved as the published training scripts do, DataParallel prefix included."""
    state_dict = tiny_state_dict(**TINY)
    path = tmp_path / "model_best.pth"
    torch.save({"epoch": 7, "state_dict": {"module." + k: v for k, v in state_dict.items()}, "optimizer": {}}, path)
    return path, state_dict


@pytest.mark.parametrize("prefix", ["", "module."], ids=["plain", "data-parallel"])
def test_official_containers_load_through_derestore(tmp_path, prefix):
    state_dict = tiny_state_dict(**TINY)
    path = tmp_path / "model_best.pth"
    torch.save({"epoch": 7, "state_dict": {prefix + k: v for k, v in state_dict.items()}, "optimizer": {}}, path)
    model = derestore.load(weights=path, device="cpu")
    assert model.arch == "DeRestormer"
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        out = model.engine.descriptor.model(x.contiguous(memory_format=torch.channels_last))
    assert torch.allclose(out, training_form_output(state_dict, x, **TINY), atol=1e-5)


def test_square_tiles_of_the_published_window_by_default(checkpoint):
    model = derestore.load(weights=checkpoint[0], device="cpu")
    assert model.tile == DEFAULT_TILE == 256
    windows = model.engine.plan(300, 520, model.tile, model.overlap).windows
    assert {(w.y1 - w.y0, w.x1 - w.x0) for w in windows} == {(256, 256)}


def test_published_tiling_replays_the_window_protocol(checkpoint):
    model = derestore.load(weights=checkpoint[0], device="cpu")
    image = np.random.default_rng(0).random((3, 40, 56), dtype=np.float32)
    out, _ = model.restore_array(image, tile=16, tiling="published")
    with torch.no_grad():
        windows = window_partition_inference(model.engine.descriptor.model, torch.from_numpy(image)[None], 16)
    np.testing.assert_allclose(out, windows[0].clamp(0, 1).numpy(), atol=1e-5)
    with pytest.raises(InputError, match="smaller than the 256×256 window"):
        model.restore_array(image, tiling="published")


def test_lowercase_or_missing_identity_is_accepted(registry):
    state_dict = tiny_state_dict(**TINY)
    lower = {(k[:-6] + "d_diag" if k.endswith("D_diag") else k): v for k, v in state_dict.items()}
    missing = {k: v for k, v in state_dict.items() if not k.endswith("D_diag")}
    x = torch.rand(1, 3, 16, 16)
    expected = training_form_output(state_dict, x, **TINY)
    for variant in (lower, missing):
        loaded = spandrel.ModelLoader().load_from_state_dict(variant)
        with torch.no_grad():
            assert torch.allclose(loaded.model(x), expected, atol=1e-5)


def test_fused_inference_form_is_accepted(registry):
    # The published `inference=True` network stores each DO-Conv as one 4-D `W` kernel.
    state_dict = tiny_state_dict(**TINY)
    model = DeRestormer(**TINY)
    model.load_state_dict(state_dict)
    fold_do_convs(model)
    folded = model.state_dict()
    fused = {k: (folded[k[:-2] + ".weight"] if k.endswith(".W") else v)
             for k, v in state_dict.items() if not k.endswith((".D", ".D_diag"))}
    assert fused["SCM1.main.0.main.0.W"].shape == (16, 3, 3, 3)
    loaded = spandrel.ModelLoader().load_from_state_dict(fused)
    assert loaded.architecture.id == "DeRestormer"
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        assert torch.allclose(loaded.model(x), training_form_output(state_dict, x, **TINY), atol=1e-5)


def test_inconsistent_feed_forward_widths_are_refused():
    state_dict = dict(tiny_state_dict(**TINY))
    state_dict["Encoder.1.layers.1.ffn.project_out.weight"] = torch.zeros(32, 70, 1, 1)
    with pytest.raises(ModelUnavailable, match="expansion factor"):
        DeRestormerArch().load(state_dict)


def test_low_precision_runs_on_cpu(tiny_descriptor):
    x = torch.rand(1, 3, 16, 16)
    with torch.no_grad():
        ref = tiny_descriptor.model(x)
        for dtype in (torch.bfloat16, torch.float16):
            model = DeRestormer(**TINY).eval()
            fold_do_convs(model)
            model.load_state_dict(tiny_descriptor.model.state_dict())
            out = model.to(dtype)(x.to(dtype))
            assert out.dtype == dtype
            assert float((out.float() - ref).abs().max()) < 0.1
            with torch.autocast("cpu", dtype=dtype):
                out = tiny_descriptor.model(x)
            assert float((out.float() - ref).abs().max()) < 0.1
