"""``demo:NAME`` values in configs: the cached demo build addressed by name.

``model: demo:reference`` or ``source: demo:heldout`` in a YAML experiment resolve to paths in
the per-user demo cache, building it on first use (the same build ``lmkl demo`` uses).
"""

from __future__ import annotations

import os
from pathlib import Path

from lmkl.demo.assets import CANDIDATE, HELDOUT, REFERENCE, ProgressFn, build_demo_assets

#: Config values that name the cached demo build: a model (``model: demo:reference``) or data
#: (``source: demo:heldout``). Resolved by :func:`resolve_demo_value`, building it on first use.
DEMO_SCHEME = "demo:"
DEMO_NAMES = {"reference": REFERENCE, "candidate": CANDIDATE, "heldout": HELDOUT}


def demo_cache_dir() -> Path:
    """``$LMKL_CACHE_DIR/demo`` if set, else the user cache directory (platformdirs)."""
    root = os.environ.get("LMKL_CACHE_DIR")
    if root:
        return Path(root).expanduser() / "demo"
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("lmkl")) / "demo"


def is_demo_value(value: str | None) -> bool:
    """Whether a config value is a ``demo:NAME`` reference."""
    return bool(value) and str(value).startswith(DEMO_SCHEME)


def resolve_demo_value(value: str, progress: ProgressFn | None = None) -> str:
    """``demo:reference`` / ``demo:candidate`` / ``demo:heldout`` → the path in the demo cache
    (the same build ``lmkl demo`` uses, built on first use); other values are returned as is.

    Raises ``ValueError`` for an unknown demo name.
    """
    if not is_demo_value(value):
        return value
    name = value[len(DEMO_SCHEME) :]
    if name not in DEMO_NAMES:
        raise ValueError(f"unknown demo name '{value}' (use demo:{', demo:'.join(DEMO_NAMES)})")
    assets = build_demo_assets(demo_cache_dir(), progress=progress)
    return str(assets.root / DEMO_NAMES[name])
