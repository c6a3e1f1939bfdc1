"""PSNR/SSIM against the papers' MATLAB scripts (Octave reference values in fixtures/metrics)."""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import cv2
import numpy as np
import pytest

from derestore import metrics
from derestore.errors import InputError, UsageError
from derestore.evaluate import RunningMeans

FIXTURES = Path(__file__).parent / "fixtures" / "metrics"
REFERENCE = json.loads((FIXTURES / "reference.json").read_text())
PSNR_TOL = 1e-4  # dB, the bound
SSIM_TOL = 1e-5


def _read(path: Path) -> np.ndarray:
    # Octave's imread and OpenCV's IMREAD_UNCHANGED give the same pixels (PROTOCOLS.md).
    a = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
    return a if a.ndim == 2 else np.ascontiguousarray(a[:, :, ::-1])


def _pair(name: str) -> tuple[np.ndarray, np.ndarray]:
    return _read(FIXTURES / "pairs" / "gt" / f"{name}.png"), _read(FIXTURES / "pairs" / "pred" / f"{name}.png")


def _ref(value: float | str) -> float:
    return math.inf if value == "inf" else float(value)


def _cases() -> list[tuple[str, str]]:
    """Every per-image entry of the reference, for every protocol."""
    return [(protocol, name) for protocol, data in REFERENCE["protocols"].items() for name in data["per_image"]]


def _restormer_script_value(gt: np.ndarray, pred: np.ndarray) -> tuple[float, float]:
    """The restormer script literally: its fixed peak and L of 255 even where derestore deviates (16-bit)."""
    planes = metrics._Planes(*(metrics._luma_int(a) if a.ndim == 3 else a.astype(np.float64) for a in (gt, pred)),
                             peak=255.0, warnings=[])
    return metrics._psnr(metrics._mse(planes), 255.0), metrics._wang_valid(planes)


@pytest.mark.parametrize(("protocol", "name"), _cases())
def test_matches_octave_reference(protocol: str, name: str) -> None:
    expected = REFERENCE["protocols"][protocol]["per_image"][name]
    gt, pred = _pair(name)
    result = metrics.score(gt, pred, protocol=protocol)
    kind = REFERENCE["pairs"][name]["kind"]
    if "error" in expected:
        # The rcdnet script stops on a gray image; derestore uses the gray values as Y (tested below).
        assert (protocol, kind) == ("rcdnet", "gray8") and any("gray" in w for w in result.warnings)
        return
    if (protocol, kind) == ("restormer", "rgb16"):
        # derestore deviates on purpose (16-bit peak, tested below); the script's own
        # value is still reproduced exactly, which checks the 16-bit Y formula.
        psnr, ssim = _restormer_script_value(gt, pred)
        assert abs(psnr - expected["psnr"]) <= PSNR_TOL and abs(ssim - expected["ssim"]) <= SSIM_TOL
        assert any("16-bit" in w for w in result.warnings)
        return
    if expected["psnr"] == "inf":
        assert result.psnr == math.inf and result.identical
    else:
        assert abs(result.psnr - expected["psnr"]) <= PSNR_TOL
        assert not result.identical
    assert abs(result.ssim - expected["ssim"]) <= SSIM_TOL
    assert result.warnings == []


def test_restormer_script_means_over_all_pairs() -> None:
    """`mean_all_pairs` and the printed line: the script's mean, its identical pair's inf included."""
    psnrs, ssims = zip(*(_restormer_script_value(*_pair(name)) for name in REFERENCE["pairs"]))
    data = REFERENCE["protocols"]["restormer"]
    assert np.mean(psnrs) == math.inf and data["mean_all_pairs"]["psnr"] == "inf"
    assert abs(np.mean(ssims) - data["mean_all_pairs"]["ssim"]) <= SSIM_TOL
    assert data["script_printed_all_pairs"][0] == f"For visible dataset PSNR: Inf SSIM: {np.mean(ssims):f}"


def test_rcdnet_script_stops_where_derestore_goes_on() -> None:
    assert "error" in REFERENCE["protocols"]["rcdnet"]["mean_all_pairs"]
    means = RunningMeans()
    for name in REFERENCE["pairs"]:
        means.add(metrics.score(*_pair(name), protocol="rcdnet"))
    assert means.count == 8 and means.identical == 1 and means.psnr > 0


@pytest.mark.parametrize("protocol", ["restormer", "rcdnet", "gopro"])
def test_mean_of_rgb8_pairs_matches_reference(protocol: str) -> None:
    means = RunningMeans()
    for name, info in REFERENCE["pairs"].items():
        if info["kind"] == "rgb8":
            means.add(metrics.score(*_pair(name), protocol=protocol))
    expected = REFERENCE["protocols"][protocol]["mean_rgb8_nonidentical"]
    assert means.count == expected["n"]
    assert abs(means.psnr - expected["psnr"]) <= PSNR_TOL
    assert abs(means.ssim - expected["ssim"]) <= SSIM_TOL


def test_gopro_mean_over_all_pairs_keeps_identical_ssim_like_the_script() -> None:
    means = RunningMeans()
    for name in REFERENCE["pairs"]:
        means.add(metrics.score(*_pair(name), protocol="gopro"))
    assert means.count == 8 and means.identical == 1
    # The script prints "SSIM: 0.860363": the identical pair's SSIM of 1 counts.
    assert abs(means.ssim - REFERENCE["protocols"]["gopro"]["mean_all_pairs"]["ssim"]) <= SSIM_TOL
    assert f"{means.ssim:f}" == "0.860363"
    # Its infinite PSNR does not: the mean is over the 7 others.
    others = [_ref(v["psnr"]) for v in REFERENCE["protocols"]["gopro"]["per_image"].values()]
    assert abs(means.psnr - sum(p for p in others if math.isfinite(p)) / 7) <= PSNR_TOL
    assert any("identical" in w for w in means.warnings())


def test_rcdnet_uses_gray_as_y_where_the_script_stops() -> None:
    result = metrics.score(*_pair("v05_gray_89x113_noise10"), protocol="rcdnet")
    # Gray values as Y on the 0-255 scale, no downsampling at this size: the restormer gray values.
    gray = REFERENCE["protocols"]["restormer"]["per_image"]["v05_gray_89x113_noise10"]
    assert abs(result.psnr - gray["psnr"]) <= PSNR_TOL
    assert abs(result.ssim - gray["ssim"]) <= SSIM_TOL
    assert any("gray" in w for w in result.warnings)


def test_restormer_16bit_uses_the_16bit_peak() -> None:
    name = "v07_rgb16_97x131_noise5"
    result = metrics.score(*_pair(name), protocol="restormer")
    script = REFERENCE["protocols"]["restormer"]["per_image"][name]
    assert script["psnr"] < 0 < result.psnr  # the script's fixed 255 peak is meaningless here
    # Rounded 16-bit Y differs from rcdnet's unrounded Y by < 1/65535: nearly the same values.
    unrounded = REFERENCE["protocols"]["rcdnet"]["per_image"][name]
    assert abs(result.psnr - unrounded["psnr"]) < 0.005
    assert abs(result.ssim - unrounded["ssim"]) < 1e-3
    assert any("16-bit" in w for w in result.warnings)


def test_rgb_protocol_is_plain_psnr_and_channel_mean_ssim() -> None:
    gt, pred = _pair("v02_rgb_128x160_noise15")
    result = metrics.score(gt, pred, protocol="rgb")
    mse = np.mean((pred.astype(np.float64) - gt) ** 2)
    assert result.psnr == pytest.approx(10 * math.log10(255**2 / mse), abs=1e-9)
    per_channel = [metrics.ssim(gt[:, :, c], pred[:, :, c], protocol="rgb") for c in range(3)]
    assert result.ssim == pytest.approx(np.mean(per_channel), abs=1e-12)
    # Gray: the restormer value for a gray pair (same Wang SSIM, same peak).
    gray = REFERENCE["protocols"]["restormer"]["per_image"]["v05_gray_89x113_noise10"]
    assert metrics.psnr(*_pair("v05_gray_89x113_noise10"), protocol="rgb") == pytest.approx(gray["psnr"], abs=1e-9)


def test_psnr_and_ssim_functions_agree_with_score() -> None:
    gt, pred = _pair("v08_rgb_389x517_blurnoise")
    for protocol in metrics.PROTOCOLS:
        result = metrics.score(gt, pred, protocol=protocol, crop_border=3)
        assert metrics.psnr(gt, pred, protocol=protocol, crop_border=3) == result.psnr
        assert metrics.ssim(gt, pred, protocol=protocol, crop_border=3) == result.ssim


def test_luma_is_exact_with_ties_rounded_up() -> None:
    rng = np.random.default_rng(5)
    colours = rng.integers(0, 256, size=(3000, 3))
    # Colours whose exact Y ends in .5 (PROTOCOLS.md: 194 exist), plus the 4 Octave rounds down.
    ties = [(r, g, b) for r, g, b in colours if (65481 * r + 128553 * g + 24966 * b) % 255000 == 127500]
    extra = [(190, 226, 202), (201, 227, 168), (217, 89, 91), (218, 58, 248)]
    colours = np.vstack([colours, np.array(ties + extra).reshape(-1, 3)]).astype(np.uint8)
    y = metrics._luma_int(colours.reshape(1, -1, 3))[0]
    for (r, g, b), got in zip(colours.tolist(), y.tolist()):
        exact = 16 + Fraction(65481 * r + 128553 * g + 24966 * b, 255000)
        assert got == math.floor(exact + Fraction(1, 2))
    assert Fraction(65481 * 190 + 128553 * 226 + 24966 * 202, 255000) % 1 == Fraction(1, 2)


def test_luma_16bit_is_exact_on_the_257_times_scale() -> None:
    rng = np.random.default_rng(16)
    colours = rng.integers(0, 65536, size=(1, 5000, 3)).astype(np.uint16)
    colours[0, :3] = [[0, 0, 0], [65535, 65535, 65535], [257 * 190, 257 * 226, 257 * 202]]
    y = metrics._luma_int(colours)[0]
    for (r, g, b), got in zip(colours[0].tolist(), y.tolist()):
        assert got == math.floor(4112 + Fraction(65481 * r + 128553 * g + 24966 * b, 255000) + Fraction(1, 2))
    assert y[:2].tolist() == [4112, 60395]  # 16 * 257 and 235 * 257: the 8-bit range, scaled


def _wang_valid_naive(x: np.ndarray, y: np.ndarray, peak: float) -> float:
    """filter2(window, ., 'valid') spelled out with explicit 11x11 windows."""
    g = np.exp(-np.arange(-5, 6) ** 2 / (2 * 1.5**2))
    w = np.outer(g, g) / np.outer(g, g).sum()

    def f(a: np.ndarray) -> np.ndarray:
        return np.einsum("ijkl,kl->ij", np.lib.stride_tricks.sliding_window_view(a, (11, 11)), w)

    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    return float(np.mean((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))))


def _matlab_box_downsample(a: np.ndarray, f: int) -> np.ndarray:
    """imfilter(a, ones(f)/f^2, 'symmetric', 'same') with the centre at floor((f+1)/2), then a(1:f:end, 1:f:end)."""
    centre = (f + 1) // 2 - 1  # 0-based
    padded = np.pad(a, f, mode="symmetric")
    out = np.zeros_like(a)
    for i in range(f):
        for j in range(f):
            di, dj = i - centre, j - centre
            out += padded[f + di : f + di + a.shape[0], f + dj : f + dj + a.shape[1]]
    return (out / (f * f))[::f, ::f]


def _matlab_ssim_naive(x: np.ndarray, y: np.ndarray, peak: float) -> float:
    """MATLAB's ssim by its documentation: 11x11(x11) Gaussian, replicate padding on every axis, full map."""
    g = np.exp(-np.arange(-5, 6) ** 2 / (2 * 1.5**2))
    g /= g.sum()

    def f(a: np.ndarray) -> np.ndarray:
        out = np.pad(a, 5, mode="edge")  # the channel axis too: 3 planes padded to 13
        for axis, n in enumerate(a.shape):
            out = sum(g[k] * np.take(out, range(k, k + n), axis=axis) for k in range(11))
        return out

    x, y = x.astype(np.float64), y.astype(np.float64)
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    mx, my = f(x), f(y)
    vx, vy, cxy = f(x * x) - mx**2, f(y * y) - my**2, f(x * y) - mx * my
    return float(np.mean((2 * mx * my + c1) * (2 * cxy + c2) / ((mx**2 + my**2 + c1) * (vx + vy + c2))))


@pytest.mark.parametrize(("height", "width"), [(11, 11), (12, 30), (75, 20), (150, 37), (139, 64)])
def test_ssim_agrees_with_the_windowed_definition_at_any_size(height: int, width: int) -> None:
    """Sizes around the 11-pixel window and the row bands the implementation works in."""
    rng = np.random.default_rng(height * width)
    gt = cv2.GaussianBlur(rng.integers(0, 256, (height, width, 3), dtype=np.uint8), (0, 0), 1.0)
    pred = np.clip(gt + rng.normal(0, 9, gt.shape), 0, 255).astype(np.uint8)
    per_channel = [_wang_valid_naive(gt[:, :, c].astype(float), pred[:, :, c].astype(float), 255.0) for c in range(3)]
    assert metrics.ssim(gt, pred, protocol="rgb") == pytest.approx(np.mean(per_channel), abs=1e-12)
    y = [metrics._luma_int(a) for a in (gt, pred)]
    assert metrics.ssim(gt, pred, protocol="restormer") == pytest.approx(_wang_valid_naive(*y, 255.0), abs=1e-12)
    assert metrics.ssim(gt, pred, protocol="gopro") == pytest.approx(_matlab_ssim_naive(gt, pred, 255.0), abs=1e-12)
    gray = gt[:, :, 1], pred[:, :, 1]
    assert metrics.ssim(*gray, protocol="gopro") == pytest.approx(_matlab_ssim_naive(*gray, 255.0), abs=1e-12)
    deep = gt.astype(np.uint16) * 256 + 7, pred.astype(np.uint16) * 250
    assert metrics.ssim(*deep, protocol="gopro") == pytest.approx(_matlab_ssim_naive(*deep, 65535.0), abs=1e-12)


def test_gopro_ssim_of_images_under_11_px_follows_the_definition() -> None:
    rng = np.random.default_rng(7)
    gt = rng.integers(0, 256, (3, 7, 3), dtype=np.uint8)
    pred = gt ^ 5
    assert metrics.ssim(gt, pred, protocol="gopro") == pytest.approx(_matlab_ssim_naive(gt, pred, 255.0), abs=1e-12)


@pytest.mark.parametrize(("height", "width", "factor"), [(700, 650, 3), (390, 400, 2), (1200, 1150, 4)])
def test_rcdnet_downsampling_follows_imfilter(height: int, width: int, factor: int) -> None:
    rng = np.random.default_rng(height)
    gt = rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)
    gt = cv2.GaussianBlur(gt, (0, 0), 3)  # structure, so SSIM is not ~0
    pred = np.clip(gt + rng.normal(0, 6, gt.shape), 0, 255).astype(np.uint8)
    y = [16 + (65.481 * a[:, :, 0] + 128.553 * a[:, :, 1] + 24.966 * a[:, :, 2]) / 255 for a in (gt, pred)]
    assert max(1, math.floor(min(height, width) / 256 + 0.5)) == factor
    expected = _wang_valid_naive(*(_matlab_box_downsample(a, factor) for a in y), 255.0)
    assert metrics.ssim(gt, pred, protocol="rcdnet") == pytest.approx(expected, abs=1e-12)


def test_identical_images_give_infinite_psnr() -> None:
    gt, _ = _pair("v08_rgb_389x517_blurnoise")
    for protocol in metrics.PROTOCOLS:
        result = metrics.score(gt, gt.copy(), protocol=protocol)
        assert result.psnr == math.inf and result.identical and result.ssim == 1.0


def test_crop_border_cuts_every_side() -> None:
    gt, pred = _pair("v01_rgb_97x131_noise5")
    for protocol in metrics.PROTOCOLS:
        cropped = metrics.score(gt[4:-4, 4:-4], pred[4:-4, 4:-4], protocol=protocol)
        assert metrics.score(gt, pred, protocol=protocol, crop_border=4) == cropped
    with pytest.raises(InputError, match="crop border 60"):
        metrics.score(gt, pred, protocol="rgb", crop_border=60)
    with pytest.raises(UsageError):
        metrics.score(gt, pred, protocol="rgb", crop_border=-1)


def test_size_mismatch_is_an_input_error() -> None:
    gt, pred = _pair("v01_rgb_97x131_noise5")
    with pytest.raises(InputError, match="size mismatch: ground truth is 131x97, prediction is 130x97"):
        metrics.score(gt, pred[:, :-1], protocol="restormer")


def test_unknown_protocol_is_a_usage_error() -> None:
    gt, pred = _pair("v01_rgb_97x131_noise5")
    with pytest.raises(UsageError, match="restormer, rcdnet, gopro, rgb"):
        metrics.score(gt, pred, protocol="matlab")


def test_images_under_11_px_get_no_ssim_but_a_psnr() -> None:
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 256, size=(8, 40, 3), dtype=np.uint8)
    pred = gt ^ 1
    for protocol in ("restormer", "rcdnet", "rgb"):
        result = metrics.score(gt, pred, protocol=protocol)
        assert math.isnan(result.ssim) and math.isfinite(result.psnr)
        assert any("11x11" in w for w in result.warnings)
    # MATLAB's built-in ssim pads, so gopro has a value at any size.
    assert 0 < metrics.score(gt, pred, protocol="gopro").ssim < 1


def test_gray_against_rgb() -> None:
    gt, pred = _pair("v01_rgb_97x131_noise5")
    gray = cv2.cvtColor(gt, cv2.COLOR_RGB2GRAY)
    result = metrics.score(gray, pred, protocol="restormer")
    assert math.isfinite(result.psnr) and any("gray" in w for w in result.warnings)
    with pytest.raises(InputError, match="gray and the other RGB"):
        metrics.score(gray, pred, protocol="gopro")


def test_bit_depths_may_differ_only_under_rcdnet() -> None:
    gt, pred = _pair("v01_rgb_97x131_noise5")
    deep = pred.astype(np.uint16) * 257  # the same image on the 16-bit scale
    assert metrics.score(pred, deep, protocol="rcdnet").psnr > 250
    assert metrics.score(gt, deep, protocol="rcdnet").psnr == pytest.approx(
        REFERENCE["protocols"]["rcdnet"]["per_image"]["v01_rgb_97x131_noise5"]["psnr"], abs=1e-9
    )
    with pytest.raises(InputError, match="bit depths differ"):
        metrics.score(gt, deep, protocol="gopro")


def test_single_channel_axis_is_gray() -> None:
    gt, pred = _pair("v05_gray_89x113_noise10")
    assert metrics.score(gt[:, :, None], pred[:, :, None], protocol="gopro") == metrics.score(gt, pred, protocol="gopro")
