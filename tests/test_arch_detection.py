"""Detection across architectures: each of derestore's networks is claimed by itself alone, and
spandrel's own architectures (Restormer and its relatives included) are still claimed by spandrel."""

from __future__ import annotations

import importlib

import pytest
import spandrel
import torch

from derestore.loading import install_architectures

from .arch_support import NETWORKS, meta_state_dict

# Some of spandrel's own networks call torch.meshgrid without `indexing` when built.
pytestmark = pytest.mark.filterwarnings("ignore:torch.meshgrid:UserWarning")

OURS = {"derestormer": "DeRestormer", "drsformer/full": "DRSformer", "drsformer/200l_spa": "DRSformer",
        "dtpnet": "DTPNet"}
# spandrel architectures whose default network can be built on the meta device: the
# Restormer family and other restoration networks, plus a few super-resolution ones.
SPANDREL = {
    "spandrel_extra_arches.architectures": ("Restormer", "MPRNet", "M3SNet", "MIRNet2"),
    "spandrel.architectures": ("FFTformer", "RetinexFormer", "MixDehazeNet", "DnCNN", "DRUNet", "FBCNN",
                               "ESRGAN", "Compact", "OmniSR", "CRAFT", "ATD", "PLKSR"),
}


@pytest.fixture(scope="module")
def registry() -> spandrel.ArchRegistry:
    install_architectures()
    return spandrel.MAIN_REGISTRY


def claims(registry: spandrel.ArchRegistry, state_dict: dict[str, torch.Tensor]) -> list[str]:
    return [a.architecture.id for a in registry.architectures("detection") if a.detect(state_dict)]


def spandrel_state_dict(package: str, name: str) -> dict[str, torch.Tensor]:
    network = getattr(importlib.import_module(f"{package}.{name}"), name)
    with torch.device("meta"):
        return network().state_dict()


@pytest.mark.parametrize("network", NETWORKS)
def test_each_network_is_claimed_by_itself_alone(registry, network):
    assert claims(registry, meta_state_dict(network)) == [OURS[network]]


@pytest.mark.parametrize("package, name", [(p, n) for p, names in SPANDREL.items() for n in names])
def test_spandrel_detections_are_undisturbed(registry, package, name):
    found = claims(registry, spandrel_state_dict(package, name))
    assert found[:1] == [name]
    assert not set(found) & set(OURS.values())


def test_a_small_nafnet_is_not_claimed_either(registry):
    from spandrel.architectures.NAFNet import NAFNet

    with torch.device("meta"):
        state_dict = NAFNet(width=8, middle_blk_num=1, enc_blk_nums=[1, 1], dec_blk_nums=[1, 1]).state_dict()
    assert claims(registry, state_dict)[:1] == ["NAFNet"]
    assert not set(claims(registry, state_dict)) & set(OURS.values())


def test_spandrel_alone_knows_none_of_them():
    # The reason derestore detects them itself; a future spandrel that learns one of these
    # networks makes this fail, and then its detection must be weighed against derestore's.
    from spandrel_extra_arches import EXTRA_REGISTRY

    for network in NETWORKS:
        state_dict = meta_state_dict(network)
        assert not [a for a in (*spandrel.MAIN_REGISTRY, *EXTRA_REGISTRY)
                    if a.architecture.id not in OURS.values() and a.detect(state_dict)]
