"""The lite models' training helpers: growing a trained network, fp16 export."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from training.export import export
from training.train import Shape, build, grow

SMALL = Shape()
GROWN = Shape(16, (1, 1, 2, 2), 3, (2, 1, 1, 1))


def trained_weights(shape: Shape) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = build(shape)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("beta", "gamma")):  # zero at initialisation: make every block do something
                p.normal_(0, 0.1)
    return model.state_dict()


def test_a_grown_network_computes_what_the_small_one_did():
    small = build(SMALL).eval()
    small.load_state_dict(trained_weights(SMALL))
    grown = build(GROWN).eval()
    grow(grown, trained_weights(SMALL), Path("small.pt"))
    assert sum(p.numel() for p in grown.parameters()) > 2 * sum(p.numel() for p in small.parameters())
    x = torch.rand(1, 3, 48, 64)
    with torch.no_grad():
        assert torch.equal(small(x), grown(x))


def test_growing_refuses_weights_of_another_width():
    wide = trained_weights(Shape(width=24))
    with pytest.raises(SystemExit, match="does not fit inside this shape"):
        grow(build(SMALL), wide, Path("wide.pt"))


def test_export_writes_fp16_safetensors_within_the_package_budget(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    weights = trained_weights(GROWN)
    torch.save({"model": weights, "step": 7, "config": {"shape": "grown"}}, run / "last.pt")
    dest = export("deblur", run, tmp_path / "lite")
    stored = load_file(str(dest))
    assert dest.stat().st_size <= 5_000_000
    assert stored.keys() == weights.keys()
    assert all(v.dtype == torch.float16 for v in stored.values())
    assert all(torch.equal(stored[k], weights[k].half()) for k in weights)
