"""Local statistics (derestore/local_stats.py): the window operations against direct computations and
TLC's published pooling, every architecture's conversion, and tiles that equal the whole image."""

from __future__ import annotations

import itertools
import math
import re
import warnings

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from derestore import local_stats
from derestore.archs.fill import DERESTORMER_SCALE, fill_state_dict
from derestore.engine import Engine
from derestore.errors import UsageError
from derestore.registry import load_registry
from derestore.tiling import axis_starts

from .conftest import smooth_image

ARCHS = ("NAFNet", "Restormer", "MPRNet", "M3SNet", "DRSformer", "DTPNet", "DeRestormer")


@pytest.fixture(scope="module", autouse=True)
def registry():
    from derestore.loading import install_architectures

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        install_architectures()


def small(arch: str):
    """A small `arch` with the fixtures' deterministic weights: block scales such as NAFNet's beta and
    gamma are filled too (not left at their zero init), so every attention path acts. Scaled by 0.6–0.7:
    at the full scale these networks amplify float rounding 10–300-fold; scaled, they still change their
    input by std 0.2–0.3."""
    from spandrel import MAIN_REGISTRY

    if arch == "NAFNet":
        from spandrel.architectures.NAFNet import NAFNet

        model = NAFNet(width=8, enc_blk_nums=[1, 1, 1], dec_blk_nums=[1, 1, 1])
    elif arch == "Restormer":
        from spandrel_extra_arches.architectures.Restormer.__arch.restormer_arch import (
            Restormer,
        )

        model = Restormer(dim=8, num_blocks=[1, 1, 1, 1], num_refinement_blocks=1, heads=[1, 2, 2, 4])
    elif arch == "MPRNet":
        from spandrel_extra_arches.architectures.MPRNet.__arch.MPRNet import MPRNet

        model = MPRNet(n_feat=8, scale_unetfeats=4, scale_orsnetfeats=4, num_cab=2, reduction=2)
    elif arch == "M3SNet":
        from spandrel_extra_arches.architectures.M3SNet.__arch.M3SNet import M3SNet

        model = M3SNet(width=8, enc_blk_nums=[1, 1, 1, 1], dec_blk_nums=[1, 1, 1, 1])
    elif arch == "DRSformer":
        from derestore.archs.drsformer import DRSformer

        model = DRSformer(dim=8, num_blocks=(1, 1, 1, 1), heads=(1, 1, 2, 2))
    elif arch == "DTPNet":
        from derestore.archs.dtpnet import DTPNet, DTPNetConfig

        model = DTPNet(DTPNetConfig(dim=8, blocks=(1,) * 8, heads=(1, 1, 2, 2, 2, 1, 1, 1), lstm_channels=8))
    else:
        from derestore.archs.derestormer import DeRestormer

        model = DeRestormer(dim=8, num_res=1, heads=(1, 1, 2))
    scale = DERESTORMER_SCALE if arch in ("DeRestormer", "DRSformer") else 0.7
    descriptor = MAIN_REGISTRY.load(fill_state_dict(model.state_dict(), scale))
    assert descriptor.architecture.id == arch
    descriptor.model.eval()
    return descriptor


def image(height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.from_numpy(smooth_image(height, width, seed).transpose(2, 0, 1).astype(np.float32))[None]


def run(descriptor, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return descriptor(x)


def tiled(descriptor, x: torch.Tensor, tile: int, context: int) -> torch.Tensor:
    """Windows of tile + 2·context pixels (the model's multiple), cut at the middle of the shared strips."""
    _, _, height, width = x.shape
    multiple = math.lcm(descriptor.size_requirements.multiple_of, 16)  # covers every conversion's align here
    side = -(-(tile + 2 * context) // multiple) * multiple
    th, tw = min(side, height), min(side, width)
    ys, xs = axis_starts(height, th, context, multiple), axis_starts(width, tw, context, multiple)

    def cuts(starts: list[int], window: int, length: int) -> list[int]:
        return [0] + [(a + window + b) // 2 for a, b in itertools.pairwise(starts)] + [length]

    cy, cx = cuts(ys, th, height), cuts(xs, tw, width)
    out = torch.zeros_like(x)
    for i, y0 in enumerate(ys):
        for j, x0 in enumerate(xs):
            with local_stats.placed(descriptor.model, (height, width), [(y0, x0)]):
                o = run(descriptor, x[:, :, y0:y0 + th, x0:x0 + tw])
            out[:, :, cy[i]:cy[i + 1], cx[j]:cx[j + 1]] = o[:, :, cy[i] - y0:cy[i + 1] - y0, cx[j] - x0:cx[j + 1] - x0]
    return out


# --------------------------------------------------------------------------- the window operations


def window_start(i: int, n: int, length: int) -> int:
    return min(max(i - (n - 1) // 2, 0), max(length - n, 0))


@pytest.mark.parametrize("length,n", [(10, 3), (10, 4), (7, 7), (5, 9), (1, 3), (33, 16)])
def test_box_sum_sums_each_window_shifted_inside_the_axis(length, n):
    x = torch.randn(2, length, 3, dtype=torch.float64)
    expected = torch.stack([x[:, window_start(i, n, length):window_start(i, n, length) + n].sum(1)
                            for i in range(length)], 1)
    torch.testing.assert_close(local_stats.box_sum(x, 1, n), expected)


@pytest.mark.parametrize("h,w,kernel", [(40, 56, 24), (17, 33, 8), (12, 12, 48), (30, 9, 12)])
def test_local_mean_equals_tlc_published_avg_pool(h, w, kernel):
    # spandrel_extra_arches vendors TLC's AvgPool2d (M3SNet's local_arch.py, from megvii-research/TLC).
    from spandrel_extra_arches.architectures.M3SNet.__arch.local_arch import AvgPool2d

    x = torch.rand(2, 5, h, w)
    # TLC returns the (B, C, 1, 1) global mean when the window covers the map; the network broadcasts it.
    expected = AvgPool2d(kernel_size=[kernel, kernel])(x).expand_as(x)
    torch.testing.assert_close(local_stats.local_mean(x, kernel), expected, atol=2e-6, rtol=1e-5)


def test_local_attention_per_pixel_equals_the_direct_window_computation():
    torch.manual_seed(0)
    b, heads, ch, h, w, n = 1, 2, 3, 9, 11, 4
    q, k, v = (torch.randn(b, heads, ch, h, w, dtype=torch.float64) for _ in range(3))
    temperature = torch.tensor([1.5, 0.7], dtype=torch.float64).view(heads, 1, 1)
    out = local_stats.local_channel_attention(q, k, v, temperature, lambda t: t.softmax(-1), n, 1)
    for y in range(h):
        for x in range(w):
            ys, xs = window_start(y, n, h), window_start(x, n, w)
            qw = F.normalize(q[..., ys:ys + n, xs:xs + n].flatten(-2), dim=-1)
            kw = F.normalize(k[..., ys:ys + n, xs:xs + n].flatten(-2), dim=-1)
            attn = (qw @ kw.transpose(-2, -1) * temperature).softmax(-1)
            torch.testing.assert_close(out[..., y, x], (attn @ v[..., y, x, None])[..., 0])


# Window 27 spans every cell of a 20×28 map in cells of 2, 4 or 8 (⌈27 / cell⌉ cells) without
# covering the map in pixels, so the cell sums and their interpolation are what is compared.
@pytest.mark.parametrize("cell,window", [(1, 1000), (2, 27), (4, 27), (8, 27)])
def test_local_attention_with_a_window_over_everything_is_the_global_attention(cell, window):
    torch.manual_seed(1)
    q, k, v = (torch.randn(2, 2, 4, 20, 28) for _ in range(3))
    temperature = torch.tensor([1.2, 0.8]).view(2, 1, 1)
    out = local_stats.local_channel_attention(q, k, v, temperature, lambda t: t.softmax(-1), window, cell)
    qn, kn = F.normalize(q.flatten(-2), dim=-1), F.normalize(k.flatten(-2), dim=-1)
    expected = ((qn @ kn.transpose(-2, -1) * temperature).softmax(-1) @ v.flatten(-2)).reshape(v.shape)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def test_local_attention_moves_with_its_input_by_whole_cells():
    # Cells are anchored at the map's origin: a map cropped at a cell boundary sees the same cells.
    torch.manual_seed(2)
    q, k, v = (torch.randn(1, 1, 4, 48, 48) for _ in range(3))
    temperature = torch.ones(1, 1, 1)

    def attend(t: slice) -> torch.Tensor:
        return local_stats.local_channel_attention(q[..., t, :], k[..., t, :], v[..., t, :], temperature,
                                                   lambda x: x.softmax(-1), 8, 4)

    full, shifted = attend(slice(0, 48)), attend(slice(8, 48))
    torch.testing.assert_close(shifted[..., 16:24, :], full[..., 24:32, :], atol=1e-5, rtol=1e-5)


# --------------------------------------------------------------------------- every architecture


@pytest.mark.parametrize("arch", ARCHS)
def test_window_over_the_whole_input_reproduces_the_published_network(arch):
    descriptor = small(arch)
    x = image(64, 64)
    published = run(descriptor, x)
    conversion = local_stats.apply(descriptor, window=10_000)
    assert conversion.stats == "local" and sum(conversion.replaced.values()) > 0
    torch.testing.assert_close(run(descriptor, x), published, atol=2e-5, rtol=1e-5)
    local_stats.apply(descriptor, window=24)
    assert (run(descriptor, x) - published).abs().max() > 1e-4  # a window smaller than the map changes the output
    assert local_stats.apply(descriptor, stats="global").replaced == {}
    assert torch.equal(run(descriptor, x), published)


EXPECTED_REPLACEMENTS = {
    "NAFNet": {"pool": 7},
    "Restormer": {"attention": 8},
    "MPRNet": {"pool": 37},
    "M3SNet": {"pool": 13, "attention": 1},
    "DRSformer": {"expert-gate": 2, "topk-attention": 7},
    "DTPNet": {"attention": 8},
    "DeRestormer": {"deformable-attention": 6},
}


@pytest.mark.parametrize("arch", ARCHS)
def test_conversion_replaces_every_global_statistic_in_place(arch):
    descriptor = small(arch)
    before = {name: p for name, p in descriptor.model.named_parameters()}
    keys = list(descriptor.model.state_dict())
    conversion = local_stats.apply(descriptor, window=48)
    assert conversion.replaced == EXPECTED_REPLACEMENTS[arch]
    assert conversion.window == 48 and conversion.reach >= 24
    assert list(descriptor.model.state_dict()) == keys
    assert all(p is before[name] for name, p in descriptor.model.named_parameters())


# Max |tiled − whole| with local statistics (window 48, tiles of 64, local_stats.context), measured:
# NAFNet 2e-6, Restormer 1e-6, M3SNet 0, DTPNet 2e-7, MPRNet 2e-6 and DRSformer 4e-4: its top-k masks
# turn float rounding into other selections. Global statistics: 6e-4 (DTPNet) to 1.0 (MPRNet).
TILED_TOLERANCE = {"NAFNet": 1e-5, "Restormer": 1e-5, "MPRNet": 1e-5, "M3SNet": 1e-5, "DTPNet": 1e-5,
                   "DRSformer": 2e-3}
# The convolutional share of the context: MPRNet's full-resolution stage reaches further than the others.
MARGIN = {"MPRNet": 48}


@pytest.mark.parametrize("arch", sorted(TILED_TOLERANCE))
def test_tiles_with_the_context_reproduce_the_whole_image(arch):
    descriptor = small(arch)
    x = image(192, 224, seed=3)
    global_gap = (tiled(descriptor, x, 64, 16) - run(descriptor, x)).abs().max()
    conversion = local_stats.apply(descriptor, window=48)
    context = local_stats.context(conversion, margin=MARGIN.get(arch, 16))
    gap = (tiled(descriptor, x, 64, context) - run(descriptor, x)).abs().max()
    assert gap <= TILED_TOLERANCE[arch]
    assert gap < global_gap / 10


def test_mprnet_tiles_split_along_the_whole_images_lines():
    descriptor = small("MPRNet")
    conversion = local_stats.apply(descriptor, window=48)
    context = local_stats.context(conversion, margin=MARGIN["MPRNet"])
    x = image(192, 224, seed=4)
    whole = run(descriptor, x)
    assert (tiled(descriptor, x, 64, context) - whole).abs().max() < 1e-5
    # Unplaced, each tile is split through its own middle, as the published forward does.
    with torch.no_grad():
        unplaced = descriptor(x[:, :, :128, :128])
    assert (unplaced - whole[:, :, :128, :128])[:, :, :64, :64].abs().max() > 0.05
    # A batch of windows from different places is split per window.
    origins = [(0, 0), (64, 96)]
    batch = torch.cat([x[:, :, y:y + 128, x0:x0 + 128] for y, x0 in origins])
    with local_stats.placed(descriptor.model, (192, 224), origins):
        together = run(descriptor, batch)
    for i, origin in enumerate(origins):
        with local_stats.placed(descriptor.model, (192, 224), [origin]):
            torch.testing.assert_close(together[i:i + 1], run(descriptor, batch[i:i + 1]))


def test_engine_tiles_with_local_context_match_its_whole_image():
    descriptor = small("NAFNet")
    conversion = local_stats.apply(descriptor, window=48)
    context = local_stats.context(conversion, margin=16)
    engine = Engine.create(descriptor, device="cpu", precision="fp32", batch_size=3)
    # The engine keeps overlap // 2 pixels of every window's edge (overlap = 2 · context) and its
    # neighbours share 2 · overlap (strides of 96 here). NAFNet states no size multiple, so the
    # image is chosen for the second windows to start on the `align` grid (0, 8 and 0, 80).
    assert (conversion.align, descriptor.size_requirements.multiple_of) == (8, 1)
    tile = 4 * context + 96
    x = smooth_image(tile + 8, tile + 80, seed=5).transpose(2, 0, 1).astype(np.float32)
    plan = engine.plan(*x.shape[1:], tile, 2 * context)
    assert [(w.y0, w.x0) for w in plan.windows] == [(0, 0), (0, 80), (8, 0), (8, 80)]
    tiled_out = engine.restore(x, tile=tile, overlap=2 * context)
    np.testing.assert_allclose(tiled_out, engine.restore(x, tile=0), atol=1e-5)


@pytest.mark.parametrize("arch", ["NAFNet", "Restormer"])
def test_local_statistics_run_under_bfloat16_autocast(arch):
    descriptor = small(arch)
    local_stats.apply(descriptor, window=48)
    x = image(96, 96)
    reference = run(descriptor, x)
    with torch.autocast("cpu", dtype=torch.bfloat16), torch.no_grad():
        out = descriptor(x).float()
    assert (out - reference).abs().mean() < 0.02


# --------------------------------------------------------------------------- choices and records


def test_window_is_the_records_else_one_and_a_half_training_crops():
    assert local_stats.window_for("NAFNet") == 384
    assert local_stats.window_for("Restormer") == 576
    assert local_stats.window_for("NAFNet", 144) == 144
    assert local_stats.window_for("NAFNet", 0) == 384  # local statistics asked for a "global" record


def test_registry_gives_each_checkpoints_statistics_window():
    models = load_registry([]).models
    assert models["restormer-derain"].stats_window == 576 and models["mprnet-denoise"].stats_window == 192
    assert models["lite-derain"].stats_window == 576 and models["lite-desnow"].stats_window == 0
    assert models["derestormer-gopro"].stats_window is None  # no training crop stated: the architecture's


@pytest.mark.parametrize("value,shown", [("-1", "an integer (-1)"), ('"96"', "a string ('96')"), ("true", "a boolean")])
def test_registry_refuses_a_statistics_window_that_is_not_a_count(tmp_path, value, shown):
    path = tmp_path / "extra.toml"
    path.write_text(f'[models.mine]\ntask = "derain"\narch = "NAFNet"\nstats_window = {value}\n')
    with pytest.raises(UsageError, match=re.escape(f"[models.mine] stats_window must be an integer ≥ 0, got {shown}")):
        load_registry([str(path)])


def test_defaults_keep_global_statistics_where_local_ones_are_unmeasured_or_useless():
    registry = load_registry([])
    defaults = {name: local_stats.default_stats(m.arch, m.stats_window) for name, m in registry.models.items()}
    assert defaults["lite-derain"] == defaults["nafnet-gopro-w64"] == defaults["restormer-derain"] == "local"
    assert defaults["lite-desnow"] == "global"  # its record: local windows lowered its held-out PSNR
    assert defaults["drsformer-rain200h"] == defaults["derestormer-gopro"] == "global"
    assert local_stats.default_stats("MixDehazeNet") == "global" and not local_stats.supports("MixDehazeNet")


def test_local_statistics_are_refused_for_an_unknown_architecture(dncnn_ckpt):
    from derestore.loading import load_model

    descriptor = load_model(dncnn_ckpt).descriptor
    with pytest.raises(UsageError, match="not available for DnCNN"):
        local_stats.apply(descriptor)
    assert local_stats.apply(descriptor, stats="global").record()["stats"] == "global"
    with pytest.raises(UsageError, match="stats='median'"):
        local_stats.apply(descriptor, stats="median")


def test_conversion_record_names_window_reach_and_replacements():
    conversion = local_stats.apply(small("NAFNet"), window=144)
    assert conversion.record() == {"stats": "local", "window": 144, "cell": 1, "reach": 72, "align": 8,
                                   "replaced": {"pool": 7}}
    assert local_stats.context(conversion, margin=16) == 72 + 36


# --------------------------------------------------------------------------- through load, run and the CLI


def checkpoint(tmp_path, arch: str):
    from .conftest import save_checkpoint

    return save_checkpoint(tmp_path / f"{arch.lower()}.pth", small(arch).model.state_dict(), "params")


def restore(model, x: torch.Tensor, tile: int, overlap: int | None = None) -> np.ndarray:
    out, _ = model.restore_array(x[0].numpy(), tile=tile, overlap=overlap)
    return out


@pytest.mark.parametrize("arch", ["NAFNet", "Restormer", "MPRNet"])
def test_loaded_with_local_statistics_every_tile_size_gives_the_whole_image(tmp_path, arch):
    import derestore

    path = checkpoint(tmp_path, arch)
    x = image(192, 224, seed=6)
    model = derestore.load(weights=path, device="cpu", backend="torch", stats="local", stats_window=48)
    assert model.stats == "local" and model.engine.conversion.window == 48
    whole = restore(model, x, 0)
    for tile in (32, 64):
        assert model.engine.plan(192, 224, tile, model.overlap).tiled
        assert np.abs(restore(model, x, tile) - whole).max() <= 1e-4  # measured up to 5.5e-5 (Restormer)
    published = derestore.load(weights=path, device="cpu", backend="torch", stats="global")
    assert published.stats == "global"
    assert np.abs(restore(published, x, 96) - restore(published, x, 0)).max() > 1e-3


def test_local_tiles_carry_the_context_on_top_of_the_tile_and_cut_in_the_middle(tmp_path):
    import derestore

    model = derestore.load(weights=checkpoint(tmp_path, "NAFNet"), device="cpu", backend="torch",
                           stats="local", stats_window=48)
    context = local_stats.context(model.engine.conversion, 32 // 2)
    plan = model.engine.plan(400, 400, 64, 32)
    sides = {(w.y1 - w.y0, w.x1 - w.x0) for w in plan.windows}
    side = -(-(64 + 2 * context) // 8) * 8 if (64 + 2 * context) % 8 else 64 + 2 * context
    assert sides <= {(s, t) for s in (side, side - 8, side + 8) for t in (side, side - 8, side + 8)}
    assert all(w.y0 % 8 == 0 and w.x0 % 8 == 0 for w in plan.windows)  # the conversion's align
    weights = plan.row_weights[0]
    assert set(np.unique(weights)) <= {0.0, 1.0}  # a cut, no feather
    kept = np.flatnonzero(plan.row_weights[1])
    assert kept.min() >= context and len(weights) - 1 - kept.max() >= context


def test_auto_picks_the_records_statistics_and_published_tiling_gets_the_papers(tmp_path):
    import derestore

    assert derestore.load(model="lite-derain", device="cpu", backend="torch").stats == "local"
    assert derestore.load(model="lite-desnow", device="cpu", backend="torch").stats == "global"
    infos = {i["name"]: i for i in derestore.api.list_models("derain")}
    assert (infos["lite-derain"]["stats"], infos["lite-derain"]["stats_window"]) == ("local", 576)
    assert (infos["drsformer-rain200h"]["stats"], infos["drsformer-rain200h"]["stats_window"]) == ("global", None)
    from .conftest import write_images

    write_images(tmp_path / "in", 1, size=40)
    for tiling, stats in (("blend", "local"), ("published", "global")):
        report = derestore.run([str(tmp_path / "in")], tmp_path / tiling, model="lite-derain", device="cpu",
                               tiling=tiling, backend="torch")
        assert report.exit_code == 0
        record = __import__("json").loads(report.record.read_text())
        assert record["statistics"]["stats"] == stats


@pytest.mark.parametrize("kwargs,words", [
    ({"stats": "median"}, "stats='median' is not one of auto, local, global"),
    ({"stats": "local", "tiling": "published"}, "tiling='published' replays the paper's network"),
    ({"stats_window": 0}, "stats_window=0: give the window's side in pixels"),
])
def test_bad_statistics_options_are_refused_before_any_image(tmp_path, kwargs, words):
    import derestore

    from .conftest import write_images

    write_images(tmp_path / "in", 1)
    with pytest.raises(UsageError, match=re.escape(words)):
        derestore.run([str(tmp_path / "in")], tmp_path / "out", model="lite-derain", device="cpu", **kwargs)
    assert not (tmp_path / "out").exists()


def test_local_statistics_are_refused_where_unknown_and_on_onnxruntime(dncnn_ckpt, tmp_path):
    import derestore

    with pytest.raises(UsageError, match="stats='local': local statistics are not available for DnCNN"):
        derestore.load(weights=dncnn_ckpt, device="cpu", stats="local")
    assert derestore.load(weights=dncnn_ckpt, device="cpu", backend="torch").stats == "global"
    with pytest.raises(UsageError, match="backend='onnxruntime': local statistics .* use stats='global'"):
        derestore.load(weights=checkpoint(tmp_path, "NAFNet"), device="cpu", stats="local",
                       backend="onnxruntime")


def test_cli_stats_flags_and_their_errors(tmp_path):
    from typer.testing import CliRunner

    from derestore.cli import app

    from .conftest import write_images

    write_images(tmp_path / "in", 1, size=40)
    runner = CliRunner()
    res = runner.invoke(app, ["derain", str(tmp_path / "in"), "-o", str(tmp_path / "a"), "--stats", "local",
                              "--tiling", "published", "-m", "lite-derain"])
    assert res.exit_code == 2 and "--tiling 'published' replays the paper's network" in res.output
    assert "--stats 'global'" in res.output and not (tmp_path / "a").exists()
    res = runner.invoke(app, ["derain", str(tmp_path / "in"), "-o", str(tmp_path / "b"), "--stats", "global",
                              "--backend", "torch", "-m", "lite-derain"])
    assert res.exit_code == 0, res.output
    record = __import__("json").loads((tmp_path / "b" / "derestore-run.json").read_text())
    assert record["statistics"]["stats"] == "global"


def test_auto_tile_leaves_room_for_the_context_within_the_same_memory(tmp_path, monkeypatch):
    import derestore
    from derestore import engine as engine_module
    from derestore.tiling import fit_tile

    model = derestore.load(weights=checkpoint(tmp_path, "NAFNet"), device="cpu", backend="torch", stats="local")
    monkeypatch.setattr(engine_module, "free_memory", lambda device: 16 << 30)
    context = model.engine.context(32)
    window = fit_tile(8000, 6000, model.engine.bytes_per_pixel(), 0.6 * (16 << 30),
                                    model.engine.batch_size, model.engine._rule())
    assert window > 2 * context + 64
    assert model.engine.auto_tile(8000, 6000, 32) == window - 2 * context
    plan = model.engine.plan(8000, 6000, window - 2 * context, 32)
    assert max(w.y1 - w.y0 for w in plan.windows) <= window  # the forwarded windows fit the same budget
