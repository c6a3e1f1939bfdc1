"""derestore: restore degraded photographs with published state-of-the-art networks.

`derestore.run(...)`, `derestore.load(...)` and `derestore.restore(...)` are the API
the CLI itself uses; they are imported on first use so that `import derestore` stays light.
"""

from __future__ import annotations

from typing import Any

__version__ = "0.1.0"

__all__ = ["load", "restore", "run", "__version__"]


def __getattr__(name: str) -> Any:
    if name in ("load", "restore", "run", "api"):
        import importlib

        # import_module, not `from . import api`: that would ask this very hook for `api` again.
        api = importlib.import_module(".api", __name__)
        return api if name == "api" else getattr(api, name)
    raise AttributeError(f"module 'derestore' has no attribute '{name}'")
