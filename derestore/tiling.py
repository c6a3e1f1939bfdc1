"""Tile plans and blend weights: pure functions, no I/O, no torch.

Geometry. The image is first padded (by the engine) to the model's size
requirements; windows of `tile` pixels are then laid over the padded image so
that neighbours share at least `2 * overlap` pixels, i.e. every seam has
`overlap` pixels of context on either side. Window starts are multiples of the
model's `multiple_of`, so a strided network sees each window on the same grid
as the whole image.

Blending. Along each axis the weights of the windows form a partition of unity:
each pixel is owned by one window, except in a feather zone `overlap` pixels
wide centred in each shared strip, where the two neighbours cross-fade with a
raised-cosine ramp. Every pixel that gets a non-zero weight lies at least
`overlap // 2` pixels inside its window, so for a convolutional model whose
receptive radius is at most `overlap / 2` the stitched output equals the
whole-image output (up to float rounding). A narrower `feather` keeps pixels
further inside: with `feather=0` each seam is a cut through the middle of the
shared strip and every kept pixel lies at least `overlap` pixels inside its
window (for models whose tiles equal the whole image given that context).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class SizeRule:
    """What a model accepts: sides a multiple of `multiple`, at least `minimum`, optionally square."""

    multiple: int = 1
    minimum: int = 0
    square: bool = False


@dataclass(frozen=True)
class Window:
    """One tile: rows y0:y1 and columns x0:x1 of the padded image."""

    y0: int
    y1: int
    x0: int
    x1: int


@dataclass(frozen=True)
class TilePlan:
    height: int  # the original image
    width: int
    padded_height: int  # after padding to the size rule (and to the tile for square models)
    padded_width: int
    windows: tuple[Window, ...]
    row_weights: tuple[np.ndarray, ...]  # one 1-D weight vector per distinct row band
    col_weights: tuple[np.ndarray, ...]
    row_index: tuple[int, ...]  # window i uses row_weights[row_index[i]]
    col_index: tuple[int, ...]

    @property
    def tiled(self) -> bool:
        return len(self.windows) > 1

    def weight(self, i: int) -> np.ndarray:
        """2-D blend weight of window i (outer product of its axis weights)."""
        return np.outer(self.row_weights[self.row_index[i]], self.col_weights[self.col_index[i]])


def _ceil_to(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _floor_to(value: int, multiple: int) -> int:
    return max(multiple, value // multiple * multiple)


def padded_size(height: int, width: int, rule: SizeRule) -> tuple[int, int]:
    """The smallest (H, W) ≥ the image that satisfies `rule` (whole-image inference)."""
    h = _ceil_to(max(height, rule.minimum, 1), rule.multiple)
    w = _ceil_to(max(width, rule.minimum, 1), rule.multiple)
    if rule.square:
        h = w = max(h, w)
    return h, w


def axis_starts(length: int, tile: int, overlap: int, multiple: int = 1) -> list[int]:
    """Window starts along one axis: first 0, last `length - tile`, neighbours sharing ≥ 2·overlap pixels.

    `length` and `tile` must be multiples of `multiple`; starts are too.
    """
    if tile >= length:
        return [0]
    max_stride = tile - 2 * overlap
    if max_stride < multiple:
        raise ValueError(
            f"tile {tile} leaves no room between two overlaps of {overlap}; "
            f"use a tile larger than {2 * overlap + multiple} or a smaller overlap"
        )
    span = length - tile
    count = math.ceil(span / max_stride) + 1
    while True:
        starts = [round(i * span / (count - 1) / multiple) * multiple for i in range(count)]
        if all(b - a <= max_stride for a, b in zip(starts, starts[1:])):
            return starts
        count += 1


def axis_weights(length: int, tile: int, starts: list[int], feather: int) -> list[np.ndarray]:
    """Per-window weights along one axis, cross-fading over `feather` pixels in the middle of each
    shared strip; they sum to 1 at every position of [0, length)."""
    weights = [np.zeros(tile, dtype=np.float32) for _ in starts]
    # cuts[i] = (fade_start, fade_end) of the seam between window i and i+1, in image coordinates
    cuts = []
    # Fade zones of consecutive seams must not meet, or three windows would share a pixel.
    fade = min([feather] + [b - a for a, b in zip(starts, starts[1:])])
    for a, b in zip(starts, starts[1:]):
        shared = a + tile - b
        lo = b + (shared - fade) // 2
        cuts.append((lo, lo + fade))
    for i, start in enumerate(starts):
        pos = np.arange(start, start + tile, dtype=np.float64) + 0.5
        w = np.ones(tile, dtype=np.float64)
        if i > 0:
            lo, hi = cuts[i - 1]
            w *= _ramp(pos, lo, hi)
        if i < len(starts) - 1:
            lo, hi = cuts[i]
            w *= 1.0 - _ramp(pos, lo, hi)
        weights[i] = w.astype(np.float32)
    return weights


def _ramp(pos: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """0 before lo, 1 from hi on, a raised-cosine rise in between (sin² keeps the pair summing to 1)."""
    if hi <= lo:
        return (pos >= lo).astype(np.float64)
    t = np.clip((pos - lo) / (hi - lo), 0.0, 1.0)
    return np.sin(0.5 * np.pi * t) ** 2


def plan_tiles(height: int, width: int, tile: int, overlap: int, rule: SizeRule = SizeRule(),
               feather: int | None = None) -> TilePlan:
    """Lay tiles of `tile` pixels (0 = whole image) over an image of `height`×`width`, neighbours
    sharing at least 2·`overlap` pixels, cross-faded over `feather` pixels (default `overlap`).

    Tiles are clipped to the padded image, rounded down to the model's multiple
    and made square when the model requires it (the image is then padded up to
    the tile, so every forward gets the shape the model accepts).
    """
    if tile < 0 or overlap < 0:
        raise ValueError("tile and overlap must not be negative")
    feather = overlap if feather is None else feather
    ph, pw = padded_size(height, width, rule)
    if tile == 0:
        th, tw = ph, pw
    else:
        t = _floor_to(max(tile, rule.minimum), rule.multiple)
        if rule.square:
            t = min(t, max(ph, pw))
            ph, pw = max(ph, t), max(pw, t)
            th = tw = t
        else:
            th, tw = min(t, ph), min(t, pw)
    ys = axis_starts(ph, th, overlap, rule.multiple)
    xs = axis_starts(pw, tw, overlap, rule.multiple)
    windows, row_index, col_index = [], [], []
    for r, y in enumerate(ys):
        for c, x in enumerate(xs):
            windows.append(Window(y, y + th, x, x + tw))
            row_index.append(r)
            col_index.append(c)
    return TilePlan(
        height=height,
        width=width,
        padded_height=ph,
        padded_width=pw,
        windows=tuple(windows),
        row_weights=tuple(axis_weights(ph, th, ys, feather)),
        col_weights=tuple(axis_weights(pw, tw, xs, feather)),
        row_index=tuple(row_index),
        col_index=tuple(col_index),
    )


def reflect_indices(size: int, padded: int) -> np.ndarray:
    """Source index of each position of a reflect-padded axis (mirrors repeatedly when padded > 2·size)."""
    if size == 1:
        return np.zeros(padded, dtype=np.int64)
    period = 2 * (size - 1)
    i = np.arange(padded) % period
    return np.where(i < size, i, period - i)


def reflect_pad(x: Any, height: int, width: int, take: Callable[[Any, np.ndarray, int], Any] = np.take) -> Any:
    """Pad (..., h, w) at the bottom/right to (height, width) by mirroring, repeatedly if needed; `take(x,
    indices, axis)` gathers along an axis (numpy's by default; an engine passes its arrays' own)."""
    h, w = x.shape[-2:]
    if (h, w) == (height, width):
        return x
    return take(take(x, reflect_indices(h, height), -2), reflect_indices(w, width), -1)


def fit_tile(height: int, width: int, bytes_per_pixel: float, free_bytes: float, batch: int,
             rule: SizeRule = SizeRule(), step: int = 64, floor: int = 128) -> int:
    """The largest tile whose forward passes fit in `free_bytes` (0 = the whole image fits).

    A whole-image pass holds one padded image; a tiled pass holds `batch` windows of tile² pixels.
    """
    ph, pw = padded_size(height, width, rule)
    if ph * pw * bytes_per_pixel <= free_bytes:
        return 0
    side = math.isqrt(int(free_bytes / (bytes_per_pixel * max(1, batch))))
    side = side // step * step
    return max(floor, _floor_to(side, rule.multiple)) if side >= rule.multiple else floor
