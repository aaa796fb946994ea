"""What several run kinds share: display labels, default run directories, loading a
reference with its candidates, and one candidate's per-token columns.

A neutral home, so that run kinds (``token_compare``, ``bytes_compare``, ``sample_kl``, the
``pair`` base) never import one another's helpers.
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa

from lmkl.models import (
    LoadedModel,
    check_tokenizers_match,
    load_model,
    load_tokenizer,
    resolve_device,
)
from lmkl.scoring.divergence import TOKEN_METRIC_NAMES
from lmkl.specs import ModelSpec

LogCallback = Callable[[str], None]


def unique_labels(specs: list[ModelSpec]) -> list[ModelSpec]:
    """The specs with repeated display names made unique: ``name``, ``name-2``, ``name-3``...

    The first spec with a name keeps it; each later one takes the lowest free ``name-N``. A
    suffixed name is never one that another spec already shows (``a/ckpt b/ckpt c/ckpt-2`` gives
    ``ckpt, ckpt-3, ckpt-2``), because runs select a candidate's rows by its label: two specs
    sharing one would merge silently.
    """
    names = [spec.display_name for spec in specs]
    taken = set(names)
    kept: set[str] = set()
    out = []
    for spec, name in zip(specs, names, strict=True):
        if name in kept:
            n = 2
            while f"{name}-{n}" in taken:
                n += 1
            spec = spec.model_copy(update={"label": f"{name}-{n}"})
            taken.add(f"{name}-{n}")
        else:
            kept.add(name)
        out.append(spec)
    return out


def default_run_dir(reference_label: str, candidates: list[ModelSpec]) -> Path:
    """``runs/<reference>-vs-<candidate>[-and-N]-<time>``."""
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{reference_label}-vs-{candidates[0].display_name}"
    if len(candidates) > 1:
        name += f"-and-{len(candidates) - 1}"
    return Path("runs") / f"{name}-{stamp}"


def load_models(
    reference_spec: ModelSpec, candidate_specs: list[ModelSpec], log: LogCallback
) -> tuple[LoadedModel, list[LoadedModel]]:
    """Load the reference and candidates, checking each candidate's tokenizer before its weights."""
    log(f"loading reference {reference_spec.model}")
    reference = load_model(reference_spec, resolve_device(reference_spec.device))
    candidates = []
    for spec in candidate_specs:
        tokenizer = load_tokenizer(spec)
        check_tokenizers_match(reference.tokenizer, tokenizer, (reference.label, spec.display_name))
        log(f"loading candidate {spec.model}")
        candidates.append(load_model(spec, resolve_device(spec.device), tokenizer))
    return reference, candidates


def candidate_columns(table: pa.Table, label: str) -> dict[str, np.ndarray]:
    """The per-token columns of one candidate as NumPy arrays (nulls → NaN)."""
    import pyarrow.compute as pc

    rows = table.filter(pc.equal(table["candidate"], label))
    out: dict[str, np.ndarray] = {}
    for name in rows.column_names:
        if name == "candidate":
            continue
        column = rows[name]
        if name in TOKEN_METRIC_NAMES:
            out[name] = column.to_numpy(zero_copy_only=False).astype(np.float64)
        else:
            out[name] = column.to_numpy(zero_copy_only=False)
    return out
