"""PSNR and SSIM exactly as the restoration papers' MATLAB scripts compute them.

Each protocol reproduces one published evaluation script (see docs in
`PROTOCOLS` and the reference notes they were checked against); `rgb` is the
plain all-channel definition. Inputs are arrays as stored on disk: (H, W) or
(H, W, C) with C in {1, 3}, uint8 or uint16, RGB order. Pure numpy/OpenCV.

Where a script's own behaviour is meaningless or an error (16-bit data under a
fixed 255 peak, gray input to an RGB-only conversion, SSIM on images under
11 px) derestore computes the sensible value instead and says so in
`Score.warnings`.
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
                f"crop border {crop_border} leaves nothing of a {_size(gt)} image; use a smaller --crop-border"
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


def _same_kind(gt: np.ndarray, pred: np.ndarray) -> None:
    """gopro/rgb compare stored values directly, so depth and channels must agree."""
    if gt.dtype != pred.dtype:
        raise InputError(
            f"bit depths differ (ground truth {gt.dtype}, prediction {pred.dtype}); "
            "save both at the same depth or use --protocol rcdnet, which scales each to [0, 1]"
        )
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
    way; exact integer arithmetic makes the result independent of evaluation order.
    """
    r, g, b = (a[:, :, i].astype(np.int64) for i in range(3))
    offset = 16 * 255_000 if a.dtype == np.uint8 else 4112 * 255_000
    return (65_481 * r + 128_553 * g + 24_966 * b + offset + 127_500) // 255_000


def _luma_unit_255(a: np.ndarray) -> np.ndarray:
    """rgb2ycbcr(im2double(a))'s unrounded Y, times 255."""
    scale = 1000.0 * _peak(a)  # the coefficients are per mille
    r, g, b = (a[:, :, i].astype(np.float64) for i in range(3))
    return 16.0 + (65_481.0 * r + 128_553.0 * g + 24_966.0 * b) / scale


# ------------------------------------------------------------------- planes


def _restormer_planes(gt: np.ndarray, pred: np.ndarray) -> _Planes:
    if gt.dtype != pred.dtype:
        raise InputError(
            f"bit depths differ (ground truth {gt.dtype}, prediction {pred.dtype}); "
            "save both at the same depth or use --protocol rcdnet"
        )
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
    planes = [a if a.ndim == 2 else _luma_int(a) for a in (gt, pred)]
    return _Planes(planes[0].astype(np.int64), planes[1].astype(np.int64), peak, warnings)


def _rcdnet_planes(gt: np.ndarray, pred: np.ndarray) -> _Planes:
    warnings = []
    if gt.ndim == 2 or pred.ndim == 2:
        # The script stops with an rgb2ycbcr error on gray input.
        warnings.append("gray image: the rcdnet script rejects gray input; used the gray values as Y")
    planes = [a * (255.0 / _peak(a)) if a.ndim == 2 else _luma_unit_255(a) for a in (gt, pred)]
    return _Planes(planes[0], planes[1], 255.0, warnings)


def _stored_planes(gt: np.ndarray, pred: np.ndarray) -> _Planes:
    _same_kind(gt, pred)
    return _Planes(gt, pred, float(_peak(gt)), [])


# --------------------------------------------------------------------- PSNR


def _mse(planes: _Planes) -> float:
    a, b = planes.gt, planes.pred
    if a.dtype.kind == "f" or b.dtype.kind == "f":
        d = b.astype(np.float64) - a
        return float(np.mean(d * d))
    # Integer differences: the sum of squares is exact in int64.
    d = b.astype(np.int64) - a.astype(np.int64)
    return float(np.sum(d * d)) / d.size


def _psnr(mse: float, peak: float) -> float:
    return math.inf if mse == 0 else 10.0 * math.log10(peak * peak / mse)


# --------------------------------------------------------------------- SSIM


def _ssim_map_mean(x: np.ndarray, y: np.ndarray, peak: float, blur: Callable[[np.ndarray], np.ndarray]) -> float:
    """Mean SSIM map with population (co)variances from the local weighting `blur`."""
    c1, c2 = (0.01 * peak) ** 2, (0.03 * peak) ** 2
    mu_x, mu_y = blur(x), blur(y)
    mu_xx, mu_yy, mu_xy = mu_x * mu_x, mu_y * mu_y, mu_x * mu_y
    var_x = blur(x * x) - mu_xx
    var_y = blur(y * y) - mu_yy
    cov = blur(x * y) - mu_xy
    num = (2.0 * mu_xy + c1) * (2.0 * cov + c2)
    den = (mu_xx + mu_yy + c1) * (var_x + var_y + c2)
    return float(np.mean(num / den))


def _gauss_valid(a: np.ndarray) -> np.ndarray:
    """filter2(window, a, 'valid'), per channel."""
    out = cv2.sepFilter2D(a, cv2.CV_64F, _G1, _G1, borderType=cv2.BORDER_REFLECT)
    return out[_RADIUS:-_RADIUS, _RADIUS:-_RADIUS]


def _gauss_replicate(a: np.ndarray) -> np.ndarray:
    """imgaussfilt(a, 1.5) with replicate padding, same size (3-D for 3 planes)."""
    if a.ndim == 3:
        a = np.ascontiguousarray(a @ _CHANNEL_MIX.T)
    return cv2.sepFilter2D(a, cv2.CV_64F, _G1, _G1, borderType=cv2.BORDER_REPLICATE)


def _wang_valid(planes: _Planes, x: np.ndarray | None = None, y: np.ndarray | None = None) -> float:
    x = planes.gt if x is None else x
    y = planes.pred if y is None else y
    if min(x.shape[:2]) < _MIN_SSIM_SIDE:
        return math.nan
    x, y = (np.ascontiguousarray(a, dtype=np.float64) for a in (x, y))
    return _ssim_map_mean(x, y, planes.peak, _gauss_valid)


def _rcdnet_ssim(planes: _Planes) -> float:
    """Wang's ssim.m (2009): box-filter downsampling by round(min side / 256), then 'valid' SSIM."""
    if min(planes.gt.shape) < _MIN_SSIM_SIDE:
        return math.nan
    factor = max(1, math.floor(min(planes.gt.shape) / 256 + 0.5))  # MATLAB round: halves up
    return _wang_valid(planes, _box_downsample(planes.gt, factor), _box_downsample(planes.pred, factor))


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


def _matlab_ssim(planes: _Planes) -> float:
    x, y = (np.asarray(a, dtype=np.float64) for a in (planes.gt, planes.pred))
    return _ssim_map_mean(x, y, planes.peak, _gauss_replicate)


_PROTOCOL_IMPLS: dict[str, _Protocol] = {
    "restormer": _Protocol(_restormer_planes, _wang_valid),
    "rcdnet": _Protocol(_rcdnet_planes, _rcdnet_ssim),
    "gopro": _Protocol(_stored_planes, _matlab_ssim),
    "rgb": _Protocol(_stored_planes, _wang_valid),
}
