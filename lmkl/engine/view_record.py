"""What the report's token view needs, recorded at compare time (``compute.view_tokens``).

The token view shows documents as text with each token shaded by its KL and, on hover, both
models' five most likely next tokens. Those lists need both models, so they are recorded while
the models run instead of rerunning them in ``lmkl report``:

* every part keeps both models' top-5 for each of its tokens in ``parts/view-NNNNNN.parquet``
  (written with the part, so they survive ``--resume`` and are gathered from every rank);
* when the run finishes, the documents with the highest mean KL (or, with
  ``view_docs="sample"``, a seeded random sample of documents) are kept, whole, until
  ``view_tokens`` token positions are reached (one longer document is cut to that many tokens
  around its worst one), and written to ``view.parquet`` with the context tokens that were not
  scored and a readable string per token. The parts are then removed with the others, so the
  finished run holds at most ``view_tokens`` positions per candidate.

In ``llama-cpp`` windowing the unit shown is a chunk (its first half is context only); in
``documents`` windowing it is a document.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from lmkl.data.tokenize import display_tokens
from lmkl.data.windows import Window

TOP5 = 5
_IDS = pa.list_(pa.int32(), TOP5)
_PROBS = pa.list_(pa.float32(), TOP5)

#: One row per scored token and candidate: both models' top-5 next tokens (probabilities at the
#: run's temperature).
VIEW_PART_SCHEMA = pa.schema(
    [
        ("candidate", pa.string()),
        ("doc_id", pa.int64()),
        ("window_id", pa.int64()),
        ("position", pa.int64()),
        ("reference_top5_ids", _IDS),
        ("reference_top5_probs", _PROBS),
        ("candidate_top5_ids", _IDS),
        ("candidate_top5_probs", _PROBS),
    ]
)

#: ``view.parquet``: one row per candidate and token position of the recorded documents, in
#: reading order; ``scored`` is false for context-only tokens (their top-5 columns are null).
#: Per-token metrics are in tokens.parquet (join on candidate, doc_id, position).
VIEW_SCHEMA = pa.schema(
    [
        ("candidate", pa.string()),
        ("unit", pa.int64()),
        ("doc_id", pa.int64()),
        ("window_id", pa.int64()),
        ("position", pa.int64()),
        ("token_id", pa.int32()),
        ("token", pa.string()),
        ("scored", pa.bool_()),
        ("reference_top5_ids", pa.list_(pa.int32())),
        ("reference_top5_probs", pa.list_(pa.float32())),
        ("reference_top5_tokens", pa.list_(pa.string())),
        ("candidate_top5_ids", pa.list_(pa.int32())),
        ("candidate_top5_probs", pa.list_(pa.float32())),
        ("candidate_top5_tokens", pa.list_(pa.string())),
    ]
)


def _fixed(values: np.ndarray, kind: pa.DataType) -> pa.Array:
    flat = np.ascontiguousarray(values).reshape(-1)
    inner = pa.array(
        flat, type=kind.value_type, mask=np.isnan(flat) if flat.dtype.kind == "f" else None
    )
    return pa.FixedSizeListArray.from_arrays(inner, TOP5)


def view_part(
    meta: dict[str, np.ndarray], per_candidate: dict[str, dict[str, np.ndarray]]
) -> pa.Table:
    """One part's view rows from :func:`lmkl.scoring.token_scoring.score_batch`'s arrays."""
    tables = []
    for label, arrays in per_candidate.items():
        n = len(meta["doc_id"])
        columns = [
            pa.array([label] * n, pa.string()),
            pa.array(meta["doc_id"], pa.int64()),
            pa.array(meta["window_id"], pa.int64()),
            pa.array(meta["position"], pa.int64()),
            _fixed(arrays["reference_top5_ids"].astype(np.int32), _IDS),
            _fixed(arrays["reference_top5_probs"].astype(np.float32), _PROBS),
            _fixed(arrays["candidate_top5_ids"].astype(np.int32), _IDS),
            _fixed(arrays["candidate_top5_probs"].astype(np.float32), _PROBS),
        ]
        tables.append(pa.Table.from_arrays(columns, schema=VIEW_PART_SCHEMA))
    return pa.concat_tables(tables)


def _unit_tokens(windows: list[Window], by_chunk: bool) -> dict[int, dict[int, tuple[int, int]]]:
    """Per unit (document or chunk): position -> (token id, window id), every token it holds."""
    units: dict[int, dict[int, tuple[int, int]]] = {}
    for w in windows:
        unit = units.setdefault(w.window_id if by_chunk else w.doc_id, {})
        for j, token in enumerate(w.input_ids):
            unit.setdefault(w.offset + j, (int(token), w.window_id))
    return units


def choose_units(
    tokens: pa.Table,
    sizes: dict[int, int],
    budget: int,
    by_chunk: bool,
    sample_seed: int | None = None,
) -> list[int]:
    """Units by mean KL (averaged over candidates), highest first, whole, within ``budget``
    positions; the first unit is kept even when it alone is larger (it is cut later). With
    ``sample_seed``, units in a random order seeded by it instead (a sample of typical text)."""
    unit_col = "window_id" if by_chunk else "doc_id"
    units = tokens[unit_col].to_numpy()
    kl = pc.fill_null(tokens["kl"], np.nan).to_numpy(zero_copy_only=False).astype(np.float64)
    cands = tokens["candidate"].to_numpy(zero_copy_only=False)
    scores: dict[int, list[float]] = {}
    for label in np.unique(cands):
        rows = cands == label
        u, k = units[rows], kl[rows]
        ok = np.isfinite(k) | np.isposinf(k)
        uniq, inverse = np.unique(u[ok], return_inverse=True)
        sums = np.bincount(inverse, weights=np.nan_to_num(k[ok], posinf=1e30), minlength=len(uniq))
        counts = np.bincount(inverse, minlength=len(uniq))
        for unit, mean in zip(uniq.tolist(), (sums / counts).tolist(), strict=True):
            scores.setdefault(unit, []).append(mean)
    ranked = sorted(sizes, key=lambda u: (-np.mean(scores[u]) if u in scores else np.inf, u))
    if sample_seed is not None:
        ranked = [ranked[i] for i in np.random.default_rng(sample_seed).permutation(len(ranked))]
    chosen: list[int] = []
    left = budget
    for unit in ranked:
        if not chosen or sizes[unit] <= left:
            chosen.append(unit)
            left -= sizes[unit]
        if left <= 0:
            break
    return chosen


def build_view(
    view_rows: pa.Table,
    tokens: pa.Table,
    windows: list[Window],
    tokenizer: Any,
    budget: int,
    by_chunk: bool,
    sample_seed: int | None = None,
) -> pa.Table:
    """``view.parquet``'s table: the chosen units, every candidate, every position in order
    (``sample_seed``: a random sample of units instead of the worst; see :func:`choose_units`)."""
    units = _unit_tokens(windows, by_chunk)
    sizes = {u: len(p) for u, p in units.items()}
    chosen = choose_units(tokens, sizes, budget, by_chunk, sample_seed)
    unit_col = "window_id" if by_chunk else "doc_id"
    wanted = pa.array(chosen, pa.int64())
    rows = view_rows.filter(pc.is_in(view_rows[unit_col], value_set=wanted))
    kl_rows = tokens.filter(pc.is_in(tokens[unit_col], value_set=wanted))
    labels = list(dict.fromkeys(tokens["candidate"].to_pylist()))
    # (candidate, position) -> row of the recorded top-5 (positions are unique per unit).
    r_cand = rows["candidate"].to_pylist()
    r_unit = rows[unit_col].to_pylist()
    r_pos = rows["position"].to_pylist()
    index = {(c, u, p): i for i, (c, u, p) in enumerate(zip(r_cand, r_unit, r_pos, strict=True))}
    ref_ids = rows["reference_top5_ids"].to_pylist()
    ref_probs = rows["reference_top5_probs"].to_pylist()
    cand_ids = rows["candidate_top5_ids"].to_pylist()
    cand_probs = rows["candidate_top5_probs"].to_pylist()
    worst_pos = _worst_positions(kl_rows, unit_col)
    out: dict[str, list[Any]] = {f.name: [] for f in VIEW_SCHEMA}
    shown: list[tuple[int, list[int]]] = []
    for unit in chosen:
        positions = sorted(units[unit])
        if len(positions) > budget:  # one long document: the window around its worst token
            centre = positions.index(worst_pos.get(unit, positions[0]))
            start = int(np.clip(centre - budget // 2, 0, len(positions) - budget))
            positions = positions[start : start + budget]
        shown.append((unit, positions))
    needed = {units[u][p][0] for u, ps in shown for p in ps}
    needed.update(i for lists in (ref_ids, cand_ids) for row in lists for i in row or ())
    needed_list = sorted(needed)
    strings = dict(zip(needed_list, display_tokens(tokenizer, needed_list), strict=True))
    for label in labels:
        for unit, positions in shown:
            for p in positions:
                token, window_id = units[unit][p]
                i = index.get((label, unit, p))
                out["candidate"].append(label)
                out["unit"].append(unit)
                out["doc_id"].append(0 if by_chunk else unit)
                out["window_id"].append(window_id)
                out["position"].append(p)
                out["token_id"].append(token)
                out["token"].append(strings[token])
                out["scored"].append(i is not None)
                for side, ids, probs in (
                    ("reference", ref_ids, ref_probs),
                    ("candidate", cand_ids, cand_probs),
                ):
                    out[f"{side}_top5_ids"].append(None if i is None else ids[i])
                    out[f"{side}_top5_probs"].append(None if i is None else probs[i])
                    out[f"{side}_top5_tokens"].append(
                        None if i is None else [strings[t] for t in ids[i]]
                    )
    return pa.Table.from_pydict(out, schema=VIEW_SCHEMA)


def _worst_positions(tokens: pa.Table, unit_col: str) -> dict[int, int]:
    """Per unit, the position of its highest-KL token (any candidate)."""
    kl = pc.fill_null(tokens["kl"], -1.0).to_numpy(zero_copy_only=False).astype(np.float64)
    kl = np.nan_to_num(kl, nan=-1.0, posinf=1e300)
    units = tokens[unit_col].to_numpy()
    positions = tokens["position"].to_numpy()
    worst: dict[int, tuple[float, int]] = {}
    for u, k, p in zip(units.tolist(), kl.tolist(), positions.tolist(), strict=True):
        if u not in worst or k > worst[u][0]:
            worst[u] = (k, p)
    return {u: p for u, (_, p) in worst.items()}
