"""Synthetic run directories for benchmarks and tests of the report (no model involved).

:func:`synthesize_run` writes a valid run directory (``results.json`` computed by
:func:`lmkl.analysis.stats.summarize` from the very columns written to ``tokens.parquet``, plus a
``worst.json`` with top-5 lists) of any size in seconds. The numbers are random but shaped like
real ones: KL is log-normal, larger where the reference is unsure and early in the window.
"""

from __future__ import annotations

import datetime as _dt
import math
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

import lmkl
from lmkl.analysis.stats import summarize
from lmkl.engine.results import SCHEMA_VERSION
from lmkl.engine.rundir import TOKEN_SCHEMA, tokens_table, write_json

WORDS = (
    "the",
    "model",
    "token",
    "of",
    "a",
    "reference",
    "and",
    "is",
    "to",
    "in",
    "data",
    "student",
    "with",
    "for",
    "on",
    "that",
    "distribution",
    "next",
    "by",
    "it",
)


@dataclass
class SyntheticCandidate:
    """One synthetic candidate: ``scale`` multiplies its KL (smaller is closer)."""

    label: str
    scale: float = 1.0
    params: int | None = None
    bytes_on_disk: int | None = None
    step: int | None = None
    group: str | None = None
    dtype: str = "float32"
    #: tokens given KL = +inf (zero candidate probability), and rows with non-finite logits
    #: (metrics null), as the runner stores them
    infinite: int = 0
    nonfinite: int = 0


def _stream(
    n_tokens: int,
    context_length: int,
    rng: np.random.Generator,
) -> dict[str, np.ndarray]:
    """doc_id, window_id, position and window_pos of ``n_tokens`` scored tokens (documents mode)."""
    lengths = rng.integers(64, 4 * context_length, size=n_tokens // 64 + 2)
    scored = lengths - 1  # the first token of each document is not scored
    ends = np.cumsum(scored)
    n_docs = int(np.searchsorted(ends, n_tokens)) + 1
    scored = scored[:n_docs].copy()
    scored[-1] -= int(ends[n_docs - 1] - n_tokens)
    doc_id = np.repeat(np.arange(n_docs), scored)
    starts = np.concatenate([[0], np.cumsum(scored)[:-1]])
    position = np.arange(n_tokens) - np.repeat(starts, scored) + 1
    stride = context_length // 2
    # Sliding windows: the first window scores 1..C-1, later ones their last `stride` positions.
    late = position >= context_length
    window_pos = np.where(
        late, context_length - stride + (position - context_length) % stride, position
    )
    window_in_doc = np.where(late, 1 + (position - context_length) // stride, 0)
    doc_offset = np.concatenate(
        [
            [0],
            np.cumsum(1 + np.maximum(0, (scored + 1 - context_length + stride - 1) // stride))[:-1],
        ]
    )
    window_id = np.repeat(doc_offset, scored) + window_in_doc
    return {
        "doc_id": doc_id,
        "window_id": window_id,
        "position": position,
        "window_pos": window_pos,
    }


def synthesize_run(
    path: Path,
    tokens: int = 100_000,
    candidates: list[SyntheticCandidate] | None = None,
    *,
    seed: int = 0,
    context_length: int = 512,
    vocab_size: int = 32_000,
    worst_k: int = 50,
    context_text: str | None = None,
    reference_path: str | None = None,
) -> Path:
    """Write a finished run directory with ``tokens`` scored tokens per candidate; return it.

    ``context_text`` replaces the synthetic text of every worst context (to test escaping);
    ``reference_path`` is recorded as the reference's local path (for token decoding).
    """
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    candidates = candidates or [SyntheticCandidate("student")]
    rng = np.random.default_rng(seed)
    layout = _stream(tokens, context_length, rng)
    # Zipf-like token ids (frequent tokens first), the same tokens for every candidate.
    token_id = ((rng.zipf(1.25, tokens) - 1) % vocab_size).astype(np.int64)
    p_top1 = rng.beta(2.2, 1.3, tokens)
    n_bytes = rng.integers(1, 7, tokens)
    nll_p = -np.log(np.clip(p_top1 * rng.uniform(0.2, 1.0, tokens), 1e-9, 1.0))
    entropy_p = -np.log(p_top1) + rng.gamma(1.5, 0.4, tokens)
    started = _dt.datetime.now(_dt.timezone.utc)
    entries: list[dict[str, Any]] = []
    worst: list[dict[str, Any]] = []
    writer = pq.ParquetWriter(path / "tokens.parquet", TOKEN_SCHEMA)
    try:
        for cand in candidates:
            crng = np.random.default_rng([seed, zlib.crc32(cand.label.encode())])
            base = 0.02 * cand.scale * (1.6 - p_top1) ** 2
            early = 1.0 + 2.0 / np.sqrt(layout["window_pos"] + 1.0)
            kl = base * early * crng.lognormal(0.0, 1.2, tokens)
            reverse = kl * crng.lognormal(0.0, 0.25, tokens)
            jsd = np.minimum(0.25 * np.minimum(kl, reverse), math.log(2))
            nll_q = nll_p + kl * crng.normal(1.0, 0.5, tokens)
            agree = crng.random(tokens) < np.exp(-3.0 * kl)
            bad = np.zeros(tokens, dtype=bool)
            if cand.infinite or cand.nonfinite:
                picked = crng.choice(tokens, cand.infinite + cand.nonfinite, replace=False)
                inf_rows = picked[: cand.infinite]
                kl[inf_rows] = reverse[inf_rows] = nll_q[inf_rows] = np.inf
                bad[picked[cand.infinite :]] = True
            columns = {
                "candidate": [cand.label] * tokens,
                "token_id": token_id,
                "bytes": n_bytes,
                "nonfinite": bad,
                **layout,
                "kl": kl,
                "reverse_kl": reverse,
                "jsd": jsd,
                "entropy_reference": entropy_p,
                "entropy_candidate": entropy_p * crng.lognormal(0.0, 0.1, tokens),
                "nll_reference": nll_p,
                "nll_candidate": nll_q,
                "delta_p": np.exp(-nll_q) - np.exp(-nll_p),
                "top1_agree": agree.astype(np.float32),
                "top1_in_top5": (agree | (crng.random(tokens) < 0.8)).astype(np.float32),
                "reference_top1_prob": p_top1,
            }
            for name in (
                "kl",
                "reverse_kl",
                "jsd",
                "entropy_candidate",
                "nll_candidate",
                "delta_p",
                "top1_agree",
                "top1_in_top5",
            ):
                columns[name] = np.where(bad, np.nan, columns[name])
            table = tokens_table(columns)
            writer.write_table(table)
            # Summaries from the stored float32 values, exactly as the runner computes them.
            stored = {
                name: table[name].to_numpy(zero_copy_only=False)
                for name in table.column_names
                if name != "candidate"
            }
            model = {
                "label": cand.label,
                "model": f"synthetic/{cand.label}",
                "source": "local",
                "dtype": cand.dtype,
                "parameters": cand.params,
                "bytes_on_disk": cand.bytes_on_disk,
                "group": cand.group,
                "step": cand.step,
                "path": None,
            }
            entries.append({"label": cand.label, "model": model, "metrics": summarize(stored)})
            worst.extend(_worst(cand.label, stored, worst_k, vocab_size, crng, context_text))
    finally:
        writer.close()
    ended = _dt.datetime.now(_dt.timezone.utc)
    n_docs = int(layout["doc_id"].max()) + 1
    results = {
        "schema_version": SCHEMA_VERSION,
        "reference": {
            "label": "reference",
            "model": "synthetic/reference",
            "source": "local",
            "dtype": "float32",
            "parameters": None,
            "path": reference_path,
        },
        "candidates": entries,
        "data": {
            "source": "synthetic",
            "kind": "synthetic",
            "fingerprint": f"seed-{seed}",
            "documents": n_docs,
            "windows": int(layout["window_id"].max()) + 1,
            "scored_tokens": tokens,
        },
        "windowing": {
            "mode": "documents",
            "context_length": context_length,
            "stride": context_length // 2,
            "adds_bos": True,
            "vocab_size": vocab_size,
            "padded_vocab": False,
            "vocab_note": None,
        },
        "compute": {"batch_size": 8, "worst_k": worst_k},
        "provenance": {
            "versions": {"lmkl": lmkl.__version__},
            "started": started.isoformat(),
            "ended": ended.isoformat(),
            "options": {},
            "host": "synthetic",
        },
        "throughput": {"seconds": None, "tokens_per_s": None},
    }
    write_json(path / "worst.json", worst)
    write_json(path / "results.json", results)
    return path


def _worst(
    label: str,
    columns: dict[str, np.ndarray],
    k: int,
    vocab: int,
    rng: np.random.Generator,
    context_text: str | None,
) -> list[dict[str, Any]]:
    kl = columns["kl"].astype(np.float64)
    top = np.argsort(-kl, kind="stable")[:k]
    out = []
    for row in top:
        token_id = int(columns["token_id"][row])
        ref_ids = [token_id, *rng.choice(vocab, 4, replace=False).tolist()]
        cand_ids = rng.choice(vocab, 5, replace=False).tolist()
        p = np.sort(rng.dirichlet(np.ones(6)))[::-1][:5]
        q = np.sort(rng.dirichlet(np.ones(6)))[::-1][:5]
        words = rng.choice(WORDS, 30)
        context = context_text if context_text is not None else " ".join(words.tolist())
        out.append(
            {
                "candidate": label,
                "doc_id": int(columns["doc_id"][row]),
                "window_id": int(columns["window_id"][row]),
                "position": int(columns["position"][row]),
                "kl": float(kl[row]),
                "token_id": token_id,
                "token": f" w{token_id}",
                "context": context,
                "reference_top5": [
                    {"token_id": int(i), "token": f" w{i}", "prob": float(v)}
                    for i, v in zip(ref_ids, p, strict=True)
                ],
                "candidate_top5": [
                    {"token_id": int(i), "token": f" w{i}", "prob": float(v)}
                    for i, v in zip(cand_ids, q, strict=True)
                ],
            }
        )
    return out
