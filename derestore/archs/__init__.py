"""derestore's own architectures, registered into spandrel's main registry.

spandrel detects a checkpoint's architecture from its state-dict keys; these
add the seed networks it does not know, the way spandrel_extra_arches does.
"""

from __future__ import annotations

from spandrel import MAIN_REGISTRY, ArchRegistry, ArchSupport

from .derestormer import DeRestormerArch
from .drsformer import DRSformerArch
from .dtpnet import DTPNetArch

REGISTRY = ArchRegistry()
REGISTRY.add(
    ArchSupport.from_architecture(DeRestormerArch()),
    ArchSupport.from_architecture(DRSformerArch()),
    ArchSupport.from_architecture(DTPNetArch()),
)


def install() -> list[ArchSupport]:
    """Add derestore's architectures to spandrel's main registry; calling it again is harmless."""
    return MAIN_REGISTRY.add(*REGISTRY, ignore_duplicates=True)


__all__ = ["REGISTRY", "install", "DeRestormerArch", "DRSformerArch", "DTPNetArch"]
