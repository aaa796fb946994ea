"""lmkl: compare causal LMs by the exact KL divergence of their next-token distributions.

The library is usable without the CLI (see :mod:`lmkl.api`)::

    import lmkl

    run = lmkl.compare("path/or/hub-id-of-reference", "path/or/hub-id-of-candidate",
                       data="held_out.jsonl", out="runs/my-compare")
    print(run.metrics()["kl"]["mean"])
    run = lmkl.open_run("runs/my-compare")

KL(P‖Q) always means reference P, candidate Q, in nats. ``import lmkl`` stays light: the API
(and torch) is imported on first use.
"""

from __future__ import annotations

from typing import Any

from lmkl.version import __version__

__all__ = [
    "Run",
    "__version__",
    "attribute",
    "build_reference_cache",
    "compare",
    "open_run",
    "score_against",
]


def __getattr__(name: str) -> Any:
    if name in __all__ and name != "__version__":
        from lmkl import api

        return getattr(api, name)
    raise AttributeError(f"module 'lmkl' has no attribute {name!r}")
