"""The software a run's numbers were computed with (recorded in results and cache manifests)."""

from __future__ import annotations

import platform

from lmkl.version import __version__


def versions() -> dict[str, str]:
    """Versions of lmkl and of the libraries its numbers depend on."""
    from importlib.metadata import version

    import numpy as np
    import torch
    import transformers

    return {
        "lmkl": __version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        # From the package metadata: importing datasets costs about a second, and a run that
        # reads a local file never needs it.
        "datasets": version("datasets"),
        "numpy": np.__version__,
        "python": platform.python_version(),
    }
