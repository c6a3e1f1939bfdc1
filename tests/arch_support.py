"""What the architecture tests share: the reference fixtures (tests/fixtures/<network>/) and their tolerance."""

from __future__ import annotations

import functools
import json
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

import derestore

from derestore.archs.fill import fill_state_dict

FIXTURES = Path(__file__).parent / "fixtures"
# Fixture folders of the published networks (keys.json, golden.npz).
NETWORKS = ("derestormer", "drsformer/full", "drsformer/200l_spa", "dtpnet")


def read_keys(network: str) -> list[tuple[str, list[int], str]]:
    """The published state dict as (key, shape, dtype) rows, in order."""
    rows = json.loads((FIXTURES / network / "keys.json").read_text())
    return [(key, list(shape), dtype) for key, shape, dtype in rows]


def key_list(state_dict: dict[str, torch.Tensor]) -> list[tuple[str, list[int], str]]:
    """A state dict in the rows of `read_keys`."""
    return [(k, list(v.shape), str(v.dtype).removeprefix("torch.")) for k, v in state_dict.items()]


def meta_state_dict(network: str) -> dict[str, torch.Tensor]:
    """The published keys and shapes without storage: enough for detection."""
    return {key: torch.empty(shape, device="meta") for key, shape, _ in read_keys(network)}


def filled_state_dict(network: str, scale: float = 1.0) -> dict[str, torch.Tensor]:
    """The published state dict with the fixtures' weights."""
    return fill_state_dict({key: shape for key, shape, _ in read_keys(network)}, scale)


@functools.cache
def read_golden(network: str) -> dict[str, np.ndarray]:
    with np.load(FIXTURES / network / "golden.npz") as data:
        return dict(data)


def assert_matches_reference(ours: torch.Tensor, ref: np.ndarray) -> float:
    """The reference README's acceptance test; returns max|Δ|."""
    bound = max(1.0, float(np.abs(ref).max()))
    delta = np.abs(ours.detach().cpu().float().numpy() - ref)
    assert ours.shape == ref.shape
    assert delta.max() <= 1e-3 * bound, f"max|Δ| {delta.max():.3g}"
    assert delta.mean() <= 1e-5 * bound, f"mean|Δ| {delta.mean():.3g}"
    return float(delta.max())


def assert_golden_case(model: torch.nn.Module, network: str, case: int) -> None:
    """`model` (filled with the fixture weights) reproduces the published network's golden case."""
    golden = read_golden(network)
    with torch.no_grad():
        out = model(torch.from_numpy(golden[f"input_{case}"]))
    assert isinstance(out, torch.Tensor)  # the restored image alone, not the published list/tuple
    max_delta = assert_matches_reference(out, golden[f"output_{case}"])
    print(f"{network} case {case}: max|Δ| = {max_delta:.3g}")


def published_tiling_and_reference(model: torch.nn.Module, checkpoint: Path) -> tuple[np.ndarray, np.ndarray]:
    """`--tiling published` through derestore from `checkpoint` (holding `model`'s weights), and the
    whole-image protocol applied to `model` by hand: reflect-pad bottom/right to a multiple of 8,
    one pass, crop back, clamp. The image is 37×50, so both sides need padding."""
    image = np.random.default_rng(5).random((3, 37, 50), dtype=np.float32)
    out, _ = derestore.load(weights=checkpoint, device="cpu").restore_array(image, tile=16, tiling="published")
    padded = F.pad(torch.from_numpy(image)[None], (0, 6, 0, 3), mode="reflect")
    with torch.no_grad():
        return out, model.eval()(padded)[0, :, :37, :50].clamp(0, 1).numpy()
