"""Tile plans (pure geometry) and tiled-vs-whole equality on an all-convolutional model."""

from __future__ import annotations

import numpy as np
import pytest

from derestore.engine import Engine
from derestore.errors import UsageError
from derestore.loading import load_model
from derestore.tiling import SizeRule, axis_starts, padded_size, plan_tiles, reflect_indices, reflect_pad

from .conftest import smooth_image


@pytest.mark.parametrize("h,w,tile,overlap,mult", [(100, 77, 32, 8, 1), (256, 300, 64, 16, 8), (65, 129, 40, 4, 4),
                                                  (31, 500, 64, 0, 1), (512, 512, 512, 32, 8),
                                                  (64, 64, 32, 12, 1), (200, 200, 40, 14, 2)])
def test_weights_partition_unity_and_cover(h, w, tile, overlap, mult):
    plan = plan_tiles(h, w, tile, overlap, SizeRule(multiple=mult))
    total = np.zeros((plan.padded_height, plan.padded_width))
    for i, win in enumerate(plan.windows):
        assert (win.y1 - win.y0) % mult == 0 and (win.x1 - win.x0) % mult == 0
        assert win.y0 % mult == 0 and win.x0 % mult == 0
        total[win.y0:win.y1, win.x0:win.x1] += plan.weight(i)
    np.testing.assert_allclose(total, 1.0, atol=1e-6)
    assert plan.padded_height % mult == 0 and plan.padded_width % mult == 0
    assert plan.padded_height >= h and plan.padded_width >= w


def test_neighbours_share_two_overlaps():
    starts = axis_starts(1000, 128, 24, 8)
    assert starts[0] == 0 and starts[-1] == 1000 - 128
    assert all(b - a <= 128 - 48 for a, b in zip(starts, starts[1:]))
    assert all(s % 8 == 0 for s in starts)


def test_weighted_pixels_keep_half_overlap_from_window_edges():
    plan = plan_tiles(300, 300, 96, 20)
    for i, win in enumerate(plan.windows):
        wy = plan.row_weights[plan.row_index[i]]
        nz = np.nonzero(wy)[0]
        if win.y0 > 0:
            assert nz[0] >= 10
        if win.y1 < plan.padded_height:
            assert (win.y1 - win.y0 - 1) - nz[-1] >= 10


def test_square_rule_pads_to_square_tiles():
    plan = plan_tiles(100, 40, 64, 8, SizeRule(multiple=8, square=True))
    assert all(win.y1 - win.y0 == win.x1 - win.x0 == 64 for win in plan.windows)
    assert plan.padded_width >= 64
    assert padded_size(100, 40, SizeRule(multiple=8, square=True)) == (104, 104)


def test_tile_too_small_for_overlap_is_an_error():
    with pytest.raises(ValueError):
        axis_starts(500, 40, 20)


def test_reflect_indices_mirror_repeatedly():
    assert reflect_indices(3, 9).tolist() == [0, 1, 2, 1, 0, 1, 2, 1, 0]
    assert reflect_indices(1, 3).tolist() == [0, 0, 0]
    x = np.arange(12.0).reshape(1, 1, 3, 4)
    padded = reflect_pad(x, 5, 9)
    assert padded.shape == (1, 1, 5, 9)
    assert np.array_equal(padded[..., :3, :4], x)
    assert padded[0, 0, 4].tolist() == x[0, 0, 0, [0, 1, 2, 3, 2, 1, 0, 1, 2]].tolist()


@pytest.fixture(scope="module")
def dncnn_engine(tmp_path_factory):
    from .conftest import dncnn_state, save_checkpoint

    path = save_checkpoint(tmp_path_factory.mktemp("ck") / "dncnn.pth", dncnn_state(nb=5))
    loaded = load_model(path)
    return Engine.create(loaded.descriptor, device="cpu", precision="fp32", batch_size=3)


@pytest.mark.parametrize("h,w,tile,overlap", [(97, 131, 48, 10), (64, 64, 32, 12), (150, 41, 40, 10), (33, 200, 64, 16)])
def test_tiled_equals_whole_for_convolutional_model(dncnn_engine, h, w, tile, overlap):
    # DnCNN with 5 conv layers has receptive radius 5 ≤ overlap / 2.
    img = smooth_image(h, w, seed=h).transpose(2, 0, 1).astype(np.float32)
    whole = dncnn_engine.restore(img, tile=0)
    tiled = dncnn_engine.restore(img, tile=tile, overlap=overlap)
    assert tiled.shape == whole.shape == img.shape
    assert dncnn_engine.plan(h, w, tile, overlap).tiled
    np.testing.assert_allclose(tiled, whole, atol=1e-5)
    assert np.abs(whole - img).mean() > 1e-3  # the model does change the image


def test_too_little_overlap_is_not_exact(dncnn_engine):
    img = smooth_image(96, 96, seed=5).transpose(2, 0, 1).astype(np.float32)
    whole = dncnn_engine.restore(img, tile=0)
    tiled = dncnn_engine.restore(img, tile=32, overlap=0)
    assert np.abs(tiled - whole).max() > 1e-4


def test_batch_size_does_not_change_result(dncnn_engine):
    img = smooth_image(90, 70, seed=9).transpose(2, 0, 1).astype(np.float32)
    a = dncnn_engine.restore(img, tile=32, overlap=8)
    dncnn_engine.batch_size = 1
    try:
        b = dncnn_engine.restore(img, tile=32, overlap=8)
    finally:
        dncnn_engine.batch_size = 3
    np.testing.assert_allclose(a, b, atol=1e-6)


def test_model_multiple_is_honoured_for_odd_sizes(nafnet_ckpt):
    engine = Engine.create(load_model(nafnet_ckpt).descriptor, device="cpu", precision="fp32")
    img = smooth_image(37, 53).transpose(2, 0, 1).astype(np.float32)
    for tile in (0, 16, 24):
        out = engine.restore(img, tile=tile, overlap=4)
        assert out.shape == img.shape and np.isfinite(out).all()


def test_engine_rejects_tile_smaller_than_overlaps(dncnn_engine):
    img = np.zeros((3, 200, 200), np.float32)
    with pytest.raises(UsageError):
        dncnn_engine.restore(img, tile=40, overlap=20)
