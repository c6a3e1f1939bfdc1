"""derestore's own architectures, registered into spandrel's main registry.

spandrel detects a checkpoint's architecture from its state-dict keys; these
add the seed networks it does not know, the way spandrel_extra_arches does.
"""

from __future__ import annotations

from spandrel import MAIN_REGISTRY, ArchRegistry, ArchSupport

from .derestormer import DeRestormerArch, window_partition_inference
from .drsformer import DRSformerArch
from .dtpnet import DTPNetArch

REGISTRY = ArchRegistry()
REGISTRY.add(
    ArchSupport.from_architecture(DeRestormerArch()),
    ArchSupport.from_architecture(DRSformerArch()),
    ArchSupport.from_architecture(DTPNetArch()),
)

# Architectures whose paper's test script runs fixed windows rather than the whole image
# (`--tiling published`); the others are tested on the whole, padded image.
PUBLISHED_WINDOWS = {"DeRestormer": window_partition_inference}


def install() -> list[ArchSupport]:
    """Add derestore's architectures to spandrel's main registry; calling it again is harmless."""
    return MAIN_REGISTRY.add(*REGISTRY, ignore_duplicates=True)


__all__ = ["PUBLISHED_WINDOWS", "REGISTRY", "install", "DeRestormerArch", "DRSformerArch", "DTPNetArch"]
