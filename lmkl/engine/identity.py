"""What a run's numbers are computed from, beyond its options: checked before any resume or reuse.

The identity names every model by its weights (content hash of local files, resolved hub
commit, adapter hash), the data by its content fingerprint, the tokens by their count and how
they are split into parts, and lmkl's code: its version and a hash of the source that computes
results (:func:`lmkl.version.code_hash`), since the version string does not change with every
commit. ``--resume`` refuses parts computed from another identity, and refuses parts with no
identity recorded.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from typing import Any

from lmkl.errors import ResumeError
from lmkl.version import __version__, code_hash

#: What each identity field is, for the message that refuses a resume.
_WHAT = {
    "lmkl": "lmkl's version",
    "code": "lmkl's code",
    "models": "the models",
    "data_fingerprint": "the data",
    "parts": "the number of parts",
    "part_sizes": "the part sizes",
}


def model_identity(description: dict[str, Any]) -> dict[str, Any]:
    """The fields of a model description that pin its weights (never all ``None``)."""
    keys = (
        "weights_sha256",
        "resolved_revision",
        "weights_files",
        "adapter_sha256",
        "recipe_identity",  # a recipe candidate: the recipe file and HIGH (models.identity)
    )
    pinned = {k: description.get(k) for k in keys if description.get(k) is not None}
    if not pinned.get("weights_sha256") and not pinned.get("resolved_revision"):
        # A hub model without a commit hash and without known files: its name and revision are
        # all there is; say so explicitly instead of recording None.
        pinned["unpinned"] = [description.get("model"), description.get("revision")]
    pinned["dtype"] = description.get("dtype")
    return pinned


def run_identity(
    models: Iterable[tuple[str, dict[str, Any]]],
    data_fingerprint: str | None,
    part_sizes: list[int],
    **extra: Any,
) -> dict[str, Any]:
    """The identity of a run: ``models`` as (label, description) pairs, data, parts, extras."""
    identity = {
        "lmkl": __version__,
        "code": code_hash(),
        "models": [[label, model_identity(desc)] for label, desc in models],
        "data_fingerprint": data_fingerprint,
        "parts": len(part_sizes),
        "part_sizes": list(part_sizes),
        **extra,
    }
    return json.loads(json.dumps(identity))


def check_identity(recorded: dict[str, Any] | None, current: dict[str, Any], where: str) -> None:
    """Refuse (one line) when ``recorded`` is missing or differs from ``current``."""
    if recorded is None:
        raise ResumeError(
            f"cannot resume '{where}': it records no run identity, so its parts cannot be "
            "checked against the current models and data",
            "start a new run with another --out (or --overwrite)",
        )
    if recorded != current:
        changed = sorted(
            k for k in set(recorded) | set(current) if recorded.get(k) != current.get(k)
        )
        if set(changed) <= {"lmkl", "code"}:
            # Only lmkl changed: say so plainly, with both code hashes to compare installs.
            was, now = recorded.get("code", "not recorded"), current.get("code")
            raise ResumeError(
                f"cannot resume '{where}': lmkl's code changed since it started (code {was}, "
                f"now {now}; version {recorded.get('lmkl')}, now {current.get('lmkl')}), so "
                "its parts could differ from the ones computed now",
                "resume with the lmkl that started it, or start a new run with another --out",
            )
        named = ", ".join(f"{k} ({_WHAT[k]})" if k in _WHAT else k for k in changed)
        raise ResumeError(
            f"cannot resume '{where}': its inputs changed since it started: {named}",
            "restore the original model and data files (and lmkl), or start a new run "
            "with another --out",
        )


def changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the options that differ (``compute.batch_size``, ``candidates``...)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [prefix.rstrip(".")] if old != new else []
