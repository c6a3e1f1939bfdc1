"""The deterministic weight fill of the reference fixtures (shared/reference/archs/README.md).

Golden outputs of the published networks were computed with these weights, so
tests fill derestore's networks the same way to compare; the benchmarks use
them as realistic-scale random weights. Every value depends only on its key and
shape: a fresh generator per key, seeded by crc32(key).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Mapping, Sequence

import numpy as np
import torch

from .derestormer import identity_d_diag

DERESTORMER_SCALE = 0.6
"""Extra factor on DeRestormer's ndim ≥ 2 entries: without it its un-normalised CNN path blows up."""


def fill_state_dict(shapes: Mapping[str, torch.Tensor | Sequence[int]], scale: float = 1.0) -> dict[str, torch.Tensor]:
    """Fixture weights for every key of `shapes` (key → tensor or shape), as float32 tensors.

    ndim ≥ 2: normals divided by √fan-in (fan-in = prod(shape[1:])), times `scale`;
    1-D `…weight`: 1 + 0.1·z; other 1-D: 0.1·z. DO-Conv `D_diag` keeps its
    constant, the k²×k² identity per input channel.
    """
    filled = {}
    for key, value in shapes.items():
        shape = tuple(value.shape) if isinstance(value, torch.Tensor) else tuple(value)
        if key.endswith(".D_diag"):
            filled[key] = identity_d_diag(shape[0], math.isqrt(shape[1]))
            continue
        z = np.random.default_rng(zlib.crc32(key.encode("utf-8"))).standard_normal(shape)
        if len(shape) >= 2:
            a = z / math.sqrt(math.prod(shape[1:])) * scale
        elif key.endswith("weight"):
            a = 1.0 + 0.1 * z
        else:
            a = 0.1 * z
        filled[key] = torch.from_numpy(a.astype(np.float32))
    return filled


__all__ = ["DERESTORMER_SCALE", "fill_state_dict"]
