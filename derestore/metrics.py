"""PSNR and SSIM exactly as the restoration papers' MATLAB scripts compute them.

Protocols (see PROTOCOLS):
- restormer: Restormer/MPRNet `evaluate_PSNR_SSIM.m` (also DRSformer, DeRestormer):
  Y of rgb2ycbcr in the integer class, rounded; PSNR with peak 255; Wang's
  SSIM ('valid', L = 255).
- rcdnet: DRSformer's DID/DDN `statistic.m` with RCDNet's psnr.m/ssim.m:
  unrounded Y of im2double images; SSIM after Wang's automatic downsampling.
- gopro: MPRNet/Restormer `evaluate_GOPRO_HIDE.m`: MATLAB's built-in psnr and
  ssim on RGB (a 3-D Gaussian over H x W x 3, replicate padding, full map).
- rgb: plain PSNR over all values and Wang's SSIM per channel, averaged
  (BasicSR's `calculate_psnr/ssim` without the Y channel); peak = bit depth.

Inputs are arrays as stored on disk: (H, W) or (H, W, C) with C in {1, 3},
uint8 or uint16, RGB order; values match the Octave runs of the scripts to
~1e-12. Y is computed in exact arithmetic with .5 ties rounded up, as Octave
does (floating-point Y rounds 194 8-bit colours either way).

Where a script is meaningless or stops, derestore does the sensible thing
and says so in `Score.warnings`:
- restormer on 16-bit images: the script keeps peak/L = 255 (negative PSNR);
  derestore uses 65535.
- rcdnet on gray images: the script raises in rgb2ycbcr; derestore uses the
  gray values as Y.
- gray against RGB: restormer/rcdnet compare the gray values with the RGB
  image's Y (as restormer's script does); gopro/rgb refuse the pair.
- images under 11 px (after --crop-border): the scripts error or give -Inf;
  derestore reports PSNR and no SSIM (nan; null in JSON).
- different bit depths are refused except under rcdnet, which scales each to [0, 1].
An identical pair has PSNR +inf (`identical`); aggregation leaves it out of
the PSNR mean (derestore.evaluate.RunningMeans).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import cv2
import numpy as np

from .errors import InputError, UsageError

PROTOCOLS: dict[str, str] = {
    "restormer": "Y of MATLAB rgb2ycbcr rounded to integers, PSNR peak 255, Wang SSIM "
    "(valid); Restormer/MPRNet/DRSformer deraining (Rain100, Rain200, SPA-Data, Test1200/2800)",
    "rcdnet": "unrounded Y of im2double images, Wang SSIM with automatic downsampling; "
    "DID-Data and DDN-Data (RCDNet protocol, DRSformer/DeRestormer)",
    "gopro": "MATLAB built-in psnr/ssim on RGB (3-D Gaussian SSIM, replicate padding); "
    "GoPro and HIDE deblurring (MPRNet, Restormer)",
    "rgb": "plain PSNR on all channels and Wang SSIM (valid) averaged over channels, "
    "peak = the bit depth's maximum",
}

# Wang's SSIM window: fspecial('gaussian', 11, 1.5). The 2-D window is the
# outer product of this normalised 1-D kernel, so it can be applied separably.
_RADIUS = 5
_G1 = np.exp(-(np.arange(-_RADIUS, _RADIUS + 1, dtype=np.float64) ** 2) / (2 * 1.5**2))
_G1 /= _G1.sum()

# MATLAB's default ssim treats H x W x 3 as a volume: replicate padding along
# the 3-plane channel axis folds the 11 channel taps onto R, G and B.
_CHANNEL_MIX = np.array(
    [
        [_G1[: _RADIUS + 1].sum(), _G1[_RADIUS + 1], _G1[_RADIUS + 2 :].sum()],
        [_G1[:_RADIUS].sum(), _G1[_RADIUS], _G1[_RADIUS + 1 :].sum()],
        [_G1[: _RADIUS - 1].sum(), _G1[_RADIUS - 1], _G1[_RADIUS:].sum()],
    ]
)

_MIN_SSIM_SIDE = 2 * _RADIUS + 1
_BAND_ROWS = 64  # SSIM map rows computed at once (the filter redoes 10 rows a band)


def check_protocol(protocol: str, crop_border: int = 0) -> None:
    """Refuse an unknown metrics protocol or a negative crop border."""
    if protocol not in PROTOCOLS:
        raise UsageError(f"protocol='{protocol}' is not one of {', '.join(PROTOCOLS)}")
    if crop_border < 0:
        raise UsageError(f"crop_border={crop_border}: must not be negative")


@dataclass(frozen=True)
class Score:
    """One pair's result. `psnr` is +inf and `identical` True when the compared signals are equal."""

    psnr: float
    ssim: float
    identical: bool
    warnings: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Planes:
    """The two signals a protocol compares, on the scale its formulas use."""

    gt: np.ndarray
    pred: np.ndarray
    peak: float  # PSNR peak and SSIM dynamic range L on this scale
    warnings: list[str]


@dataclass(frozen=True)
class _Protocol:
    planes: Callable[[np.ndarray, np.ndarray], _Planes]
    ssim: Callable[[_Planes], float]  # nan when the images are too small for it


def score(gt: np.ndarray, pred: np.ndarray, *, protocol: str, crop_border: int = 0) -> Score:
    """PSNR and SSIM of `pred` against `gt` under `protocol` (a key of PROTOCOLS)."""
    impl = _protocol(protocol)
    planes = impl.planes(*_prepare(gt, pred, crop_border))
    mse = _mse(planes)
    value = impl.ssim(planes)
    warnings = list(planes.warnings)
    if math.isnan(value):
        warnings.append(_small_warning(planes.gt.shape))
    return Score(psnr=_psnr(mse, planes.peak), ssim=value, identical=mse == 0, warnings=warnings)


def psnr(gt: np.ndarray, pred: np.ndarray, protocol: str = "restormer", crop_border: int = 0) -> float:
    """PSNR in dB under `protocol`; +inf for identical signals."""
    planes = _protocol(protocol).planes(*_prepare(gt, pred, crop_border))
    return _psnr(_mse(planes), planes.peak)


def ssim(gt: np.ndarray, pred: np.ndarray, protocol: str = "restormer", crop_border: int = 0) -> float:
    """SSIM under `protocol`; nan when an image is too small for the 11x11 window."""
    impl = _protocol(protocol)
    return impl.ssim(impl.planes(*_prepare(gt, pred, crop_border)))


# ---------------------------------------------------------------- validation


def _protocol(name: str) -> _Protocol:
    try:
        return _PROTOCOL_IMPLS[name]
    except KeyError:
        raise UsageError(
            f"unknown metrics protocol {name!r}; choose one of: {', '.join(PROTOCOLS)}"
        ) from None


def _prepare(gt: np.ndarray, pred: np.ndarray, crop_border: int) -> tuple[np.ndarray, np.ndarray]:
    gt, pred = _as_image(gt, "ground truth"), _as_image(pred, "prediction")
    if gt.shape[:2] != pred.shape[:2]:
        raise InputError(
            f"size mismatch: ground truth is {_size(gt)}, prediction is {_size(pred)}; "
            "metrics compare same-size images only (nothing is resized)"
        )
    if crop_border < 0:
        raise UsageError(f"crop border must be >= 0, got {crop_border}")
    if crop_border:
        if 2 * crop_border >= min(gt.shape[:2]):
            raise InputError(
                f"crop border {crop_border} leaves nothing of a {_size(gt)} image; use a smaller crop_border="
            )
        window = (slice(crop_border, -crop_border), slice(crop_border, -crop_border))
        gt, pred = gt[window], pred[window]
    return gt, pred


def _as_image(a: np.ndarray, role: str) -> np.ndarray:
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[2] == 1:
        a = a[:, :, 0]
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise InputError(f"the {role} has shape {a.shape}; expected gray (H, W) or RGB (H, W, 3)")
    if a.dtype not in (np.uint8, np.uint16):
        raise InputError(f"the {role} is {a.dtype}; expected 8-bit or 16-bit integers as stored")
    return a


def _size(a: np.ndarray) -> str:
    return f"{a.shape[1]}x{a.shape[0]}"


def _peak(a: np.ndarray) -> int:
    return int(np.iinfo(a.dtype).max)


def _same_depth(gt: np.ndarray, pred: np.ndarray) -> None:
    if gt.dtype != pred.dtype:
        raise InputError(
            f"bit depths differ (ground truth {gt.dtype}, prediction {pred.dtype}); "
            "save both at the same depth or use protocol='rcdnet', which scales each to [0, 1]"
        )


def _same_kind(gt: np.ndarray, pred: np.ndarray) -> None:
    """gopro/rgb compare stored values directly, so depth and channels must agree."""
    _same_depth(gt, pred)
    if gt.ndim != pred.ndim:
        raise InputError(
            "one image is gray and the other RGB; save both with the same channels "
            "or use a Y-channel protocol (restormer, rcdnet)"
        )


def _small_warning(shape: tuple[int, ...]) -> str:
    return (
        f"SSIM needs at least {_MIN_SSIM_SIDE}x{_MIN_SSIM_SIDE} pixels, the compared image is "
        f"{shape[1]}x{shape[0]}: SSIM not computed (null) and left out of the SSIM mean"
    )


# ------------------------------------------------------------------- colour


def _luma_int(a: np.ndarray) -> np.ndarray:
    """MATLAB rgb2ycbcr's Y in the image's integer class, exact with ties rounded up (as Octave).

    Floating-point Y lands on .5 for 194 8-bit colours and then rounds either
    way; this evaluates floor((65481R + 128553G + 24966B + offset + 127500) / 255000)
    instead, whose numerator is an integer below 2^53 and so exact in float64;
    the correctly rounded division then never crosses an integer.
    """
    offset = (16 if a.dtype == np.uint8 else 4112) * 255_000 + 127_500
    numerator = cv2.transform(a.astype(np.float64), np.array([[65_481.0, 128_553.0, 24_966.0, offset]]))
    return np.floor(np.divide(numerator, 255_000.0, out=numerator), out=numerator)


def _luma_unit_255(a: np.ndarray) -> np.ndarray:
    """rgb2ycbcr(im2double(a))'s unrounded Y, times 255."""
    scale = 1000.0 * _peak(a)  # the coefficients are per mille
    y = cv2.transform(a.astype(np.float64), np.array([[65_481.0, 128_553.0, 24_966.0]]) / scale)
    return np.add(y, 16.0, out=y)


# ------------------------------------------------------------------- planes


def _restormer_planes(gt: np.ndarray, pred: np.ndarray) -> _Planes:
    _same_depth(gt, pred)
    warnings = []
    if gt.ndim != pred.ndim:
        warnings.append(
            "one image is gray and the other RGB: compared the gray values with the RGB image's Y "
            "(as the restormer script does)"
        )
    peak = 255
    if gt.dtype == np.uint16:
        # The script's fixed 255 peak and L give negative PSNR on 16-bit data.
        peak = 65_535
        warnings.append(
            "16-bit images: the restormer script's fixed peak 255 is meaningless here; "
            "used the 16-bit peak 65535 for PSNR and SSIM"
        )
    gt_y, pred_y = (a.astype(np.float64) if a.ndim == 2 else _luma_int(a) for a in (gt, pred))
    return _Planes(gt_y, pred_y, peak, warnings)


def _rcdnet_planes(gt: np.ndarray, pred: np.ndarray) -> _Planes:
    warnings = []
    if gt.ndim == 2 or pred.ndim == 2:
        # The script stops with an rgb2ycbcr error on gray input.
        warnings.append("gray image: the rcdnet script rejects gray input; used the gray values as Y")
    gt_y, pred_y = (a * (255.0 / _peak(a)) if a.ndim == 2 else _luma_unit_255(a) for a in (gt, pred))
    return _Planes(gt_y, pred_y, 255.0, warnings)


def _stored_planes(gt: np.ndarray, pred: np.ndarray) -> _Planes:
    _same_kind(gt, pred)
    return _Planes(gt, pred, float(_peak(gt)), [])


# --------------------------------------------------------------------- PSNR


def _mse(planes: _Planes) -> float:
    # Integer-valued inputs give exact sums of squares either way (below 2^53).
    a, b = planes.gt, planes.pred
    if a.dtype == b.dtype:
        return cv2.norm(np.ascontiguousarray(a), np.ascontiguousarray(b), cv2.NORM_L2SQR) / a.size
    d = (b.astype(np.float64) - a).ravel()
    return float(np.dot(d, d)) / d.size


def _psnr(mse: float, peak: float) -> float:
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


# --------------------------------------------------------------------- SSIM
# SSIM needs only mu_x mu_y, mu_x^2 + mu_y^2, cov and var_x + var_y, and these
# follow from the local moments of s = x + y and d = x - y:
#   4 mu_x mu_y = mu_s^2 - mu_d^2,        2 (mu_x^2 + mu_y^2) = mu_s^2 + mu_d^2,
#   4 cov = E[s^2] - E[d^2] - (mu_s^2 - mu_d^2),
#   2 (var_x + var_y) = E[s^2] + E[d^2] - (mu_s^2 + mu_d^2).
# So four Gaussian filters do the work of Wang's five. They run in float64
# (float32 loses the small variances to cancellation) and are most of the time.


def _wang_valid(planes: _Planes, x: np.ndarray | None = None, y: np.ndarray | None = None) -> float:
    """Wang's ssim_index.m: Gaussian window, 'valid' map, mean over every channel."""
    x = planes.gt if x is None else x
    y = planes.pred if y is None else y
    if min(x.shape[:2]) < _MIN_SSIM_SIDE:
        return math.nan
    return _ssim_valid(x, y, planes.peak)


def _rcdnet_ssim(planes: _Planes) -> float:
    """Wang's ssim.m (2009): box-filter downsampling by round(min side / 256), then 'valid' SSIM."""
    if min(planes.gt.shape) < _MIN_SSIM_SIDE:
        return math.nan
    factor = max(1, math.floor(min(planes.gt.shape) / 256 + 0.5))  # MATLAB round: halves up
    return _wang_valid(planes, _box_downsample(planes.gt, factor), _box_downsample(planes.pred, factor))


def _matlab_ssim(planes: _Planes) -> float:
    """MATLAB's built-in ssim: Gaussian with replicate padding, full-size map; 3-D for RGB.

    The 'valid' map of the replicate-padded images is the padded 'same' map.
    """
    x, y = (cv2.copyMakeBorder(a, *(4 * [_RADIUS]), cv2.BORDER_REPLICATE) for a in (planes.gt, planes.pred))
    return _ssim_valid(x, y, planes.peak, channel_mix=x.ndim == 3)


def _ssim_valid(x: np.ndarray, y: np.ndarray, peak: float, *, channel_mix: bool = False) -> float:
    """Mean 'valid' SSIM map over every channel of (H, W) or (H, W, C) images.

    Computed in bands of rows: memory stays bounded for any image size, and no
    full-size temporaries are allocated (zeroing fresh pages costs as much as
    the arithmetic). `channel_mix`: MATLAB's 3-D window across R, G, B.
    """
    h, w = x.shape[:2]
    c = 1 if x.ndim == 2 else x.shape[2]
    x, y = x.reshape(h, w, c), y.reshape(h, w, c)
    rows_out, cols_out = h - 2 * _RADIUS, w - 2 * _RADIUS
    band = min(_BAND_ROWS, rows_out)
    size = 4 * (band + 2 * _RADIUS) * w * c
    buffers = np.empty(size), np.empty(size)
    c1, c2 = 2.0 * (0.01 * peak) ** 2, 2.0 * (0.03 * peak) ** 2
    total = 0.0
    for top in range(0, rows_out, band):
        n = min(band, rows_out - top) + 2 * _RADIUS
        moments, spare = (b[: 4 * n * w * c].reshape(4, n, w, c) for b in buffers)
        _moments(x[top : top + n], y[top : top + n], out=moments)
        if channel_mix:
            # Linear, so it commutes with the 2-D filter; applied to the moments first.
            cv2.transform(_tall(moments), _CHANNEL_MIX, dst=_tall(spare))
            moments, spare = spare, moments
        # The four moment images go through one filter call as a tall image:
        # output rows that mix two of them lie within the radius of an edge,
        # which 'valid' drops.
        cv2.sepFilter2D(_tall(moments), cv2.CV_64F, _G1, _G1, dst=_tall(spare))
        total += _ssim_map_sum(spare[:, _RADIUS : n - _RADIUS, _RADIUS : w - _RADIUS], c1, c2)
    return total / (rows_out * cols_out * c)


def _moments(x: np.ndarray, y: np.ndarray, *, out: np.ndarray) -> None:
    """s, d, s*s, d*d for s = x + y, d = x - y, into `out` (4, H, W, C) float64."""
    np.add(x, y, out=out[0], dtype=np.float64)
    np.subtract(x, y, out=out[1], dtype=np.float64)
    np.multiply(out[0], out[0], out=out[2])
    np.multiply(out[1], out[1], out=out[3])


def _tall(m: np.ndarray) -> np.ndarray:
    """(4, H, W, C) as one (4 H, W[, C]) image for OpenCV (a view)."""
    n, h, w, c = m.shape
    return m.reshape(n * h, w, c) if c > 1 else m.reshape(n * h, w)


def _ssim_map_sum(f: np.ndarray, c1: float, c2: float) -> float:
    """Sum of the SSIM map from the filtered moments (mu_s, mu_d, E[s^2], E[d^2]).

    map = ((2 mu_x mu_y + C1)(2 cov + C2)) / ((mu_x^2 + mu_y^2 + C1)(var_x + var_y + C2));
    here every factor is doubled (which cancels), so c1, c2 are 2 C1, 2 C2.
    """
    mu_s, mu_d, ss, dd = f
    sum_sq = mu_s * mu_s  # becomes the denominator
    diff_sq = mu_d * mu_d
    num = sum_sq - diff_sq  # 4 mu_x mu_y, then the numerator
    sum_sq += diff_sq
    cov = ss - dd  # becomes 4 cov + 2 C2
    cov -= num
    cov += c2
    var = ss + dd  # becomes 2 (var_x + var_y) + 2 C2
    var -= sum_sq
    var += c2
    num += c1
    num *= cov
    sum_sq += c1
    sum_sq *= var
    num /= sum_sq
    return float(num.sum())


def _box_downsample(a: np.ndarray, f: int) -> np.ndarray:
    """imfilter(a, ones(f)/f^2, 'symmetric', 'same') sampled at rows/columns 0, f, 2f, ...

    imfilter centres the box at floor((f+1)/2) (1-based), so after symmetric
    padding every kept sample is the mean of one aligned f x f block.
    """
    if f == 1:
        return a
    before, after = (f + 1) // 2 - 1, f // 2
    rows, cols = -(-a.shape[0] // f), -(-a.shape[1] // f)
    padded = np.pad(a, ((before, after), (before, after)), "symmetric")[: f * rows, : f * cols]
    return padded.reshape(rows, f, cols, f).mean(axis=(1, 3))


_PROTOCOL_IMPLS: dict[str, _Protocol] = {
    "restormer": _Protocol(_restormer_planes, _wang_valid),
    "rcdnet": _Protocol(_rcdnet_planes, _rcdnet_ssim),
    "gopro": _Protocol(_stored_planes, _matlab_ssim),
    "rgb": _Protocol(_stored_planes, _wang_valid),
}
