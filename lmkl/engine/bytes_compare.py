"""Models with different tokenizers: what is still comparable on the same text, per byte.

Token-level KL needs one vocabulary: with two tokenizers the next-token distributions live on
different sets, so **no token-level KL (or any per-token quantity) is computed here**. What stays
comparable is how well each model predicts the same *bytes*:

* each document is tokenized by each model's own tokenizer (with its normal special tokens; a
  tokenizer that adds no BOS gets its BOS, else its EOS, prepended as the first context token, as
  lm-evaluation-harness does, so that every byte of the text is predicted);
* long documents are covered by the same sliding windows as ``compare`` (``context_length`` /
  ``stride`` in each model's own tokens), so every token after the first is scored once;
* per document: the total negative log-likelihood ``NLL_m(d)`` in nats, and its UTF-8 size
  ``b(d)``.

Reported, in results.json (``token_level: false``):

``bits_per_byte``
    ``Σ_d NLL_m(d) / (Σ_d b(d) · ln 2)`` for each model, and the difference candidate − reference
    with a delta-method standard error and 95% CI over documents (documents are the independent
    units; bytes within a document are not).
``ll_per_byte``
    the per-document log-likelihood per byte ``−NLL_m(d) / b(d)`` (nats/byte), averaged with equal
    weight per document, and the paired difference candidate − reference with its se and CI.
"""

from __future__ import annotations

import datetime as _dt
import math
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lmkl.analysis.stats import mean_se, ratio_mean_se
from lmkl.data.corpus import Corpus, Window, _encode, _sliding_spans
from lmkl.errors import DataError, ModelLoadError, UsageError
from lmkl.models import LoadedModel, shared_vocab_size, tokenizer_adds_bos
from lmkl.specs import ComputeSpec, DataSpec, ModelSpec, OutputSpec, WindowSpec

ProgressCallback = Callable[[int, int], None]
LogCallback = Callable[[str], None]

DOCUMENTS_FILE = "documents.parquet"

NO_KL_NOTE = (
    "The models use different tokenizers, so no token-level KL was computed (next-token "
    "distributions over different vocabularies cannot be compared token by token). These numbers "
    "compare how well each model predicts the same bytes of text."
)


def prefix_token(tokenizer: Any) -> int | None:
    """Token to prepend when the tokenizer adds no BOS (so the first text token is predicted)."""
    if tokenizer_adds_bos(tokenizer):
        return None
    for attr in ("bos_token_id", "eos_token_id"):
        value = getattr(tokenizer, attr, None)
        if value is not None:
            return int(value)
    return None


def document_windows(corpus: Corpus, model: LoadedModel, spec: WindowSpec) -> list[Window]:
    """Sliding windows over every document in ``model``'s own tokens (see module docstring)."""
    tokenizer = model.tokenizer
    prefix = prefix_token(tokenizer)
    if prefix is None and not tokenizer_adds_bos(tokenizer):
        raise ModelLoadError(
            f"{model.label}'s tokenizer has neither a BOS nor an EOS token, so the first token "
            "of each document cannot be predicted and the models would cover different bytes",
            "compare models whose tokenizers define BOS or EOS",
        )
    windows: list[Window] = []
    for doc in corpus.documents:
        ids, sizes = _encode(tokenizer, doc.text)
        if prefix is not None:
            ids, sizes = [prefix, *ids], [0, *sizes]
        for begin, first, end in _sliding_spans(
            len(ids), spec.context_length, spec.effective_stride
        ):
            windows.append(
                Window(
                    window_id=len(windows),
                    doc_id=doc.doc_id,
                    input_ids=ids[begin:end],
                    first_target=first,
                    offset=begin,
                    target_bytes=sizes[begin + first : end],
                )
            )
    return windows


@torch.inference_mode()
def document_nll(
    model: LoadedModel,
    windows: list[Window],
    num_docs: int,
    compute: ComputeSpec,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per document: total NLL (nats, float64), scored tokens, and bytes those tokens cover."""
    from lmkl.engine.runner import make_batches

    vocab, _ = shared_vocab_size([model])
    chunk = compute.chunk_size(vocab)
    pad_id = model.tokenizer.pad_token_id
    pad_id = pad_id if pad_id is not None else 0
    nll = np.zeros(num_docs)
    tokens = np.zeros(num_docs, dtype=np.int64)
    covered = np.zeros(num_docs, dtype=np.int64)
    for batch in make_batches(windows, compute.batch_size, pad_id):
        dev = model.device
        hidden = model.hidden_states(batch.input_ids.to(dev), batch.attention_mask.to(dev))
        rows = hidden[batch.rows.to(dev), batch.cols.to(dev)]
        del hidden
        values = []
        for start in range(0, rows.shape[0], chunk):
            logits = model.logits(rows[start : start + chunk])[..., :vocab].float()
            lp = torch.log_softmax(logits, dim=-1)
            target = batch.targets[start : start + chunk].to(lp.device)
            values.append(-lp.gather(-1, target[:, None]).squeeze(-1).double().cpu())
        doc_ids = batch.meta["doc_id"]
        np.add.at(nll, doc_ids, torch.cat(values).numpy())
        np.add.at(tokens, doc_ids, 1)
        np.add.at(covered, doc_ids, batch.meta["bytes"])
        if progress:
            progress(int(batch.targets.numel()))
    return nll, tokens, covered


def summarize_bytes(
    nll_p: np.ndarray,
    nll_q: np.ndarray,
    doc_bytes: np.ndarray,
    tokens_p: np.ndarray,
    tokens_q: np.ndarray,
) -> dict[str, Any]:
    """The ``metrics`` block of a per-byte comparison from per-document totals (see module)."""
    keep = doc_bytes > 0
    nll_p, nll_q, b = nll_p[keep], nll_q[keep], doc_bytes[keep].astype(np.float64)
    ln2 = math.log(2)
    bpb_p = float(nll_p.sum() / b.sum() / ln2) if b.sum() else math.nan
    bpb_q = float(nll_q.sum() / b.sum() / ln2) if b.sum() else math.nan
    diff, diff_se = ratio_mean_se((nll_q - nll_p) / ln2, b)
    ll_p, ll_q = -nll_p / b, -nll_q / b
    ll_diff, ll_diff_se = mean_se(ll_q - ll_p)
    return {
        "token_level": False,
        "bits_per_byte": {
            "reference": bpb_p,
            "candidate": bpb_q,
            "bytes": int(b.sum()),
            "difference": _with_ci(diff, diff_se),
        },
        "ll_per_byte": {
            "reference": float(ll_p.mean()) if ll_p.size else math.nan,
            "candidate": float(ll_q.mean()) if ll_q.size else math.nan,
            "difference": _with_ci(ll_diff, ll_diff_se),
            "units": "nats per byte, mean over documents",
        },
        "tokens_per_byte": {
            "reference": float(tokens_p[keep].sum() / b.sum()) if b.sum() else math.nan,
            "candidate": float(tokens_q[keep].sum() / b.sum()) if b.sum() else math.nan,
        },
        "counts": {
            "documents": int(keep.sum()),
            "bytes": int(b.sum()),
            "tokens_reference": int(tokens_p[keep].sum()),
            "tokens_candidate": int(tokens_q[keep].sum()),
        },
    }


def _with_ci(mean: float, se: float) -> dict[str, Any]:
    ok = math.isfinite(se)
    return {
        "mean": mean,
        "se": se,
        "ci95": [mean - 1.96 * se, mean + 1.96 * se] if ok else [math.nan, math.nan],
    }


def run_bytes_comparison(
    reference: ModelSpec,
    candidate: ModelSpec,
    data: DataSpec,
    windows: WindowSpec,
    compute: ComputeSpec,
    output: OutputSpec,
    *,
    progress: ProgressCallback | None = None,
    log: LogCallback | None = None,
) -> Any:
    """Compare two models with different tokenizers per byte; write a run directory.

    Writes ``results.json`` (``token_level: false``), ``documents.parquet`` (one row per document:
    bytes, each model's NLL, tokens and covered bytes) and ``config.yaml``. Returns a
    :class:`lmkl.engine.runner.RunOutcome`.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmkl.data.corpus import load_corpus
    from lmkl.engine.rundir import RunDirectory, atomic_path, write_json
    from lmkl.engine.runner import RunOutcome, _unique_labels, default_run_dir, run_provenance
    from lmkl.models import load_model, resolve_device

    log = log or (lambda _msg: None)
    if windows.windowing != "documents":
        raise UsageError(
            "--different-tokenizers works on documents, not llama-cpp chunks "
            "(chunks of N tokens hold different text for different tokenizers)",
            "use --windowing documents",
        )
    if compute.max_tokens is not None:
        raise UsageError(
            "--max-tokens counts tokens, which differ between the two tokenizers",
            "limit the data with --max-samples instead",
        )
    reference, candidate = _unique_labels([reference, candidate])
    config = {
        "command": "compare --different-tokenizers",
        "reference": reference.model_dump(),
        "candidates": [candidate.model_dump()],
        "data": data.model_dump(),
        "windowing": windows.model_dump() | {"stride": windows.effective_stride},
        "compute": compute.model_dump(),
    }
    out_path = Path(output.dir) if output.dir else default_run_dir(reference, [candidate])
    run_dir = RunDirectory.create(out_path, overwrite=output.overwrite)
    run_dir.write_config(config)
    started = _dt.datetime.now(_dt.timezone.utc)

    models = []
    for spec in (reference, candidate):
        log(f"loading {spec.model}")
        models.append(load_model(spec, resolve_device(spec.device)))
    for model in models:
        limit = model.max_positions
        if limit is not None and windows.context_length > limit:
            raise UsageError(
                f"context length {windows.context_length} exceeds {model.label}'s "
                f"maximum of {limit} positions",
                f"pass --context-length {limit}",
            )
    log(f"reading data {data.source}")
    corpus = load_corpus(data)
    if any(d.messages is not None for d in corpus.documents):
        raise DataError(
            "chat data cannot be compared across tokenizers: each model's chat "
            "template would render different text",
            "pass plain text, or models that share a tokenizer",
        )
    num_docs = max((d.doc_id for d in corpus.documents), default=-1) + 1
    doc_bytes = np.zeros(num_docs, dtype=np.int64)
    for doc in corpus.documents:
        doc_bytes[doc.doc_id] = len(doc.text.encode())
    if not doc_bytes.any():
        raise DataError("the data holds no text", "check --text-field and the data file")

    all_windows = [document_windows(corpus, m, windows) for m in models]
    total = sum(w.num_targets for ws in all_windows for w in ws)
    done = 0

    def advance(n: int) -> None:
        nonlocal done
        done += n
        if progress:
            progress(done, total)

    t0 = time.perf_counter()
    per_model = [
        document_nll(m, ws, num_docs, compute, advance)
        for m, ws in zip(models, all_windows, strict=True)
    ]
    seconds = time.perf_counter() - t0
    (nll_p, tok_p, cov_p), (nll_q, tok_q, cov_q) = per_model
    metrics = summarize_bytes(nll_p, nll_q, doc_bytes, tok_p, tok_q)
    uncovered = {
        m.label: int(doc_bytes.sum() - cov.sum())
        for m, cov in zip(models, (cov_p, cov_q), strict=True)
    }
    metrics["uncovered_bytes"] = uncovered

    table = pa.table(
        {
            "doc_id": np.arange(num_docs),
            "bytes": doc_bytes,
            "nll_reference": nll_p,
            "nll_candidate": nll_q,
            "tokens_reference": tok_p,
            "tokens_candidate": tok_q,
            "bytes_covered_reference": cov_p,
            "bytes_covered_candidate": cov_q,
        }
    )
    with atomic_path(run_dir.path / DOCUMENTS_FILE) as tmp:
        pq.write_table(table, tmp)
    ended = _dt.datetime.now(_dt.timezone.utc)
    ref_model, cand_model = models
    results = {
        "schema_version": 1,
        "kind": "bytes-compare",
        "token_level": False,
        "note": NO_KL_NOTE,
        "reference": ref_model.description,
        "candidates": [
            {"label": cand_model.label, "model": cand_model.description, "metrics": metrics}
        ],
        "data": corpus.description,
        "windowing": {
            "mode": "documents",
            "context_length": windows.context_length,
            "stride": windows.effective_stride,
            "prefix_tokens": {m.label: prefix_token(m.tokenizer) for m in models},
        },
        "compute": config["compute"],
        "provenance": run_provenance(config, started, ended),
        "throughput": {
            "seconds": seconds,
            "tokens_per_s": total / seconds if seconds > 0 else None,
        },
    }
    write_json(run_dir.path / "results.json", results)
    return RunOutcome(path=run_dir.path, results=results)


def print_bytes_summary(results: dict[str, Any], console: Any) -> None:
    """A rich table of the per-byte comparison, with the no-token-level-KL statement."""
    from rich.table import Table

    from lmkl.report.terminal import fmt

    cand = results["candidates"][0]
    m = cand["metrics"]
    ref_label = results["reference"]["label"]
    table = Table(
        title=f"per-byte comparison: {ref_label} (P) vs {cand['label']} (Q), different tokenizers",
        title_justify="left",
    )
    table.add_column("metric", style="bold")
    for name in ("P", "Q", "Q − P ± se", "95% CI"):
        table.add_column(name, justify="right")
    for title, block in (
        ("bits per byte", m["bits_per_byte"]),
        ("log-likelihood per byte (nats, per-doc mean)", m["ll_per_byte"]),
    ):
        d = block["difference"]
        table.add_row(
            title,
            fmt(block["reference"]),
            fmt(block["candidate"]),
            f"{fmt(d['mean'])} ± {fmt(d['se'])}",
            f"[{fmt(d['ci95'][0])}, {fmt(d['ci95'][1])}]",
        )
    table.add_row(
        "tokens per byte",
        fmt(m["tokens_per_byte"]["reference"]),
        fmt(m["tokens_per_byte"]["candidate"]),
        "",
        "",
    )
    console.print(table)
    counts = m["counts"]
    console.print(f"[dim]{counts['documents']} documents, {counts['bytes']:,} bytes[/dim]")
    console.print(f"[bold yellow]note:[/bold yellow] {results['note']}", highlight=False)
