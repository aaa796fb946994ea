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

from lmkl.formatting import prose
from lmkl.models import (
    LoadedModel,
    check_quantization_fits,
    check_tokenizers_match,
    load_model,
    load_tokenizer,
    resolve_device,
)
from lmkl.scoring.divergence import TOKEN_METRIC_NAMES
from lmkl.specs import ModelSpec, WindowSpec

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
    for spec in (reference_spec, *candidate_specs):
        check_quantization_fits(spec)  # from the configs: nothing loads before all are checked
    reference = load_logged(reference_spec, "reference", log)
    candidates = []
    for spec in candidate_specs:
        tokenizer = load_tokenizer(spec)
        check_tokenizers_match(reference.tokenizer, tokenizer, (reference.label, spec.display_name))
        candidates.append(load_logged(spec, "candidate", log, tokenizer))
    return reference, candidates


def windowing_note(windows: WindowSpec, tokens: int, documents: int) -> str:
    """The run header's context line: KL depends on how much context each token has, so two
    runs of the same models at different context lengths differ (compare defaults to 512
    tokens, the demo to 256)."""
    if windows.windowing == "llama-cpp":
        how = f"llama.cpp chunks of {windows.context_length} tokens, second half scored"
    else:
        how = (
            f"context length {windows.context_length} tokens, stride {windows.effective_stride}"
            " (documents longer than the context slide)"
        )
    return (
        f"scoring {tokens:,} tokens of {documents:,} documents: {how}; KL depends on the context"
        " length: compare only runs made with the same one"
    )


def loading_message(spec: ModelSpec, role: str) -> str:
    """``loading candidate int4-g32 (path, bitsandbytes nf4)``: the label the tables use, then
    where it comes from and how it is quantized, so four schemes of one model read apart."""
    where = [spec.model] if spec.display_name != spec.model else []
    if spec.quantize is not None:
        scheme = f"{spec.quantize.method} {spec.quantize.scheme}"
        if spec.quantize.group_size:
            scheme += f" group size {spec.quantize.group_size}"
        where.append(f"quantized on load: {scheme}")
    return f"loading {role} {spec.display_name}" + (f" ({', '.join(where)})" if where else "")


def batch_dependence_note(model: LoadedModel) -> str | None:
    """One line saying how much ``model``'s logits for one text move with the other texts of
    its batch, when they move beyond rounding (None otherwise): its KL includes that much."""
    found = model.batch_dependence
    if not found or not found.get("significant"):
        return None
    return (
        f"{model.label}: its logits depend on the other texts of a batch (e.g. LLM.int8()'s "
        f"outlier columns): the same text next to other texts moved by KL up to "
        f"{prose(found['max_kl'])} nats (mean {prose(found['mean_kl'])}), |Δlogit| up to "
        f"{prose(found['max_abs_logit_diff'])}; its KL includes this batch noise "
        "(results.json: batch_dependence)"
    )


def load_logged(
    spec: ModelSpec, role: str, log: LogCallback, tokenizer: object | None = None
) -> LoadedModel:
    """:func:`load_model` with the loading line and, for a batch-dependent model, its note."""
    log(loading_message(spec, role))
    model = load_model(spec, resolve_device(spec.device), tokenizer)
    note = batch_dependence_note(model)
    if note is not None:
        log(note)
    return model


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
