"""The software a run's numbers were computed with (recorded in results and cache manifests)."""

from __future__ import annotations

import platform

from lmkl.version import __version__


def versions() -> dict[str, str]:
    """Versions of lmkl and of the libraries its numbers depend on."""
    import datasets
    import numpy as np
    import torch
    import transformers

    return {
        "lmkl": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
