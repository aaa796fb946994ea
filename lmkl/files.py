"""Durable file writes: every file lmkl writes appears complete under its final name or not at all.

A write goes to a temporary file beside the target, is fsync-ed, renamed into place and the
directory entry fsync-ed, so a killed process or a power cut never leaves a half-written file.
"""

from __future__ import annotations

import json
import math
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import yaml


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success fsync it and rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on every platform; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    """Atomically write strict JSON (non-finite floats become ``"inf"``/``null``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(to_json_safe(obj), indent=2, allow_nan=False) + "\n")


def write_yaml(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(obj, sort_keys=False, allow_unicode=True))


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` and every directory (before renaming ``root`` into place)."""
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(root)


def to_json_safe(value: Any) -> Any:
    """Replace non-finite floats for strict JSON: ``+inf`` → ``"inf"``, NaN → ``None``."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {k: to_json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return to_json_safe(value.item())
    return value


def user_cache_dir() -> Path:
    """``$LMKL_CACHE_DIR`` if set, else the per-user cache directory (platformdirs)."""
    root = os.environ.get("LMKL_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    from platformdirs import user_cache_dir as platform_cache_dir

    return Path(platform_cache_dir("lmkl"))


def read_memo(name: str) -> dict[str, Any]:
    """The values remembered in ``<user cache>/<name>.json`` across processes ({} if none).

    A memo only saves work (a hash, a compilation guess): an unreadable or damaged file reads
    as empty and the work is redone.
    """
    try:
        value = json.loads((user_cache_dir() / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def remember(name: str, updates: dict[str, Any], keep: int = 1000) -> None:
    """Add ``updates`` to the memo ``name`` (the newest ``keep`` entries are kept).

    Written atomically; when two processes write at once the last one wins, which only costs
    the other's entries being recomputed later. Failures (read-only home) are ignored.
    """
    memo = read_memo(name)
    for key in updates:
        memo.pop(key, None)  # re-inserted last: newest at the end
    memo.update(updates)
    entries = list(memo.items())[-keep:]
    try:
        with atomic_path(user_cache_dir() / f"{name}.json") as tmp:
            tmp.write_text(json.dumps(dict(entries), indent=1) + "\n")
    except OSError:
        pass
