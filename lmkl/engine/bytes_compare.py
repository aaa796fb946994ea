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

import math
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lmkl.analysis.stats import mean_se, ratio_mean_se
from lmkl.data.corpus import Corpus, load_corpus
from lmkl.data.windows import Window
from lmkl.data.windows import document_windows as windows_of_documents
from lmkl.engine.common import load_logged
from lmkl.engine.distributed import Shard, device_for_rank
from lmkl.engine.identity import run_identity
from lmkl.engine.loop import LogCallback, Part, Plan, Summary
from lmkl.engine.pair import PairKind
from lmkl.engine.rundir import RunDirectory
from lmkl.errors import DataError, ModelLoadError, UsageError
from lmkl.models import (
    LoadedModel,
    check_context_length,
    shared_vocab_size,
    tokenizer_adds_bos,
)
from lmkl.scoring.batches import make_batch, window_groups
from lmkl.scoring.divergence import log_probs, outside_vocabulary
from lmkl.specs import ComputeSpec, DataSpec, ModelSpec, WindowSpec

#: Columns of a per-byte comparison's parts: one row per scored token of either model.
PART_SCHEMA = pa.schema(
    [
        ("model", pa.string()),
        ("doc_id", pa.int64()),
        ("nll", pa.float64()),
        ("bytes", pa.int64()),
    ]
)


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
    return windows_of_documents(corpus, tokenizer, spec, prefix=prefix)


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


@torch.inference_mode()
def token_nll(model: LoadedModel, batch: Any, vocab_size: int, chunk: int) -> np.ndarray:
    """``−log p(target)`` of every scored token of ``batch`` in float64 (+inf outside the head)."""
    dev = model.device
    hidden = model.hidden_states(batch.input_ids.to(dev), batch.attention_mask.to(dev))
    rows = hidden[batch.rows.to(dev), batch.cols.to(dev)]
    del hidden
    targets, outside = outside_vocabulary(batch.targets, vocab_size)
    values = []
    for start in range(0, rows.shape[0], chunk):
        lp = log_probs(model.logits(rows[start : start + chunk])[..., :vocab_size].float())
        target = targets[start : start + chunk].to(lp.device)
        values.append(-lp.gather(-1, target[:, None]).squeeze(-1).double().cpu())
    nll = torch.cat(values).numpy() if values else np.zeros(0)
    nll[outside.numpy()] = math.inf
    return nll


class BytesComparison(PairKind):
    """The ``bytes-compare`` run kind: per-byte likelihoods of two models with own tokenizers.

    Part ``m x batches_m + b`` is model ``m`` (reference, candidate) on its batch ``b``; each
    part holds one row per scored token (document, NLL in nats, bytes covered).
    """

    kind = "bytes-compare"
    command = "compare --different-tokenizers"
    token_level = False

    def __init__(
        self,
        reference: ModelSpec,
        candidate: ModelSpec,
        data: DataSpec,
        windows: WindowSpec,
        compute: ComputeSpec,
    ) -> None:
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
        if compute.temperature != 1.0 or compute.max_batch_tokens is not None:
            raise UsageError(
                "--temperature and --max-batch-tokens do not apply to a per-byte comparison "
                "(it scores each model's own likelihood of the text)",
                "drop them, or compare models that share a tokenizer",
            )
        if compute.view_tokens:
            raise UsageError(
                "--view-tokens needs token-level KL, which a per-byte comparison does not compute",
                "drop --view-tokens, or compare models that share a tokenizer",
            )
        super().__init__(reference, candidate, data, compute)
        self.windows = windows

    def own_options(self) -> dict[str, Any]:
        return {"windowing": self.windows.model_dump() | {"stride": self.windows.effective_stride}}

    def prepare(self, shard: Shard, log: LogCallback) -> Plan:
        self.shard = shard
        log(f"reading data {self.data.source}")
        corpus = load_corpus(self.data)
        if any(d.messages is not None for d in corpus.documents):
            raise DataError(
                "chat data cannot be compared across tokenizers: each model's chat "
                "template would render different text",
                "pass plain text, or models that share a tokenizer",
            )
        self.corpus_description = corpus.description
        self.num_docs = max((d.doc_id for d in corpus.documents), default=-1) + 1
        self.doc_bytes = np.zeros(self.num_docs, dtype=np.int64)
        for doc in corpus.documents:
            self.doc_bytes[doc.doc_id] = len(doc.text.encode())
        if not self.doc_bytes.any():
            raise DataError("the data holds no text", "check --text-field and the data file")
        self.models = []
        for role, spec in (("reference", self.reference), ("candidate", self.candidate)):
            spec = spec.model_copy(update={"device": device_for_rank(spec.device, shard)})
            self.models.append(load_logged(spec, role, log))
        check_context_length(self.models, self.windows)
        self.units: list[tuple[int, list[Window]]] = []
        for m, model in enumerate(self.models):
            windows = document_windows(corpus, model, self.windows)
            for group in window_groups(windows, self.compute.batch_size):
                self.units.append((m, group))
        rows = [sum(w.num_targets for w in group) for _, group in self.units]
        identity = run_identity(
            [(m.label, m.description) for m in self.models],
            corpus.description.get("fingerprint"),
            rows,
        )
        return Plan(part_rows=rows, identity=identity, schema=PART_SCHEMA, sidecar="nll")

    def score(self, index: int) -> Part:
        m, group = self.units[index]
        model = self.models[m]
        vocab, _ = shared_vocab_size([model])
        pad_id = model.tokenizer.pad_token_id
        batch = make_batch(group, pad_id if pad_id is not None else 0)
        nll = token_nll(model, batch, vocab, self.compute.chunk_size(vocab))
        table = pa.table(
            {
                "model": [model.label] * len(nll),
                "doc_id": batch.meta["doc_id"],
                "nll": nll,
                "bytes": batch.meta["bytes"],
            },
            schema=PART_SCHEMA,
        )
        return Part(table=table, counters={"tokens": len(nll)})

    def summarize(self, run_dir: RunDirectory, totals: dict[str, float]) -> Summary:
        import pyarrow.compute as pc

        # Per-document totals, one part at a time (only the totals stay in memory).
        per_model = [
            (
                np.zeros(self.num_docs),
                np.zeros(self.num_docs, dtype=np.int64),
                np.zeros(self.num_docs, dtype=np.int64),
            )
            for _ in self.models
        ]
        for table in run_dir.iter_parts():
            for model, (nll, tokens, covered) in zip(self.models, per_model, strict=True):
                rows = table.filter(pc.equal(table["model"], model.label))
                doc_ids = rows["doc_id"].to_numpy()
                np.add.at(nll, doc_ids, rows["nll"].to_numpy())
                np.add.at(tokens, doc_ids, 1)
                np.add.at(covered, doc_ids, rows["bytes"].to_numpy())
        (nll_p, tok_p, cov_p), (nll_q, tok_q, cov_q) = per_model
        metrics = summarize_bytes(nll_p, nll_q, self.doc_bytes, tok_p, tok_q)
        metrics["uncovered_bytes"] = {
            m.label: int(self.doc_bytes.sum() - cov.sum())
            for m, cov in zip(self.models, (cov_p, cov_q), strict=True)
        }
        documents = pa.table(
            {
                "doc_id": np.arange(self.num_docs),
                "bytes": self.doc_bytes,
                "nll_reference": nll_p,
                "nll_candidate": nll_q,
                "tokens_reference": tok_p,
                "tokens_candidate": tok_q,
                "bytes_covered_reference": cov_p,
                "bytes_covered_candidate": cov_q,
            }
        )
        ref_model, cand_model = self.models
        body = {
            "note": NO_KL_NOTE,
            "reference": ref_model.description,
            "candidates": [
                {"label": cand_model.label, "model": cand_model.description, "metrics": metrics}
            ],
            "data": self.corpus_description,
            "windowing": {
                "mode": "documents",
                "context_length": self.windows.context_length,
                "stride": self.windows.effective_stride,
                "prefix_tokens": {m.label: prefix_token(m.tokenizer) for m in self.models},
            },
            "compute": self.compute.model_dump(),
        }
        seconds = totals["seconds"]
        tokens = totals.get("tokens", 0.0)
        throughput = {
            "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else None,
            "processes": self.shard.world_size,
        }
        return Summary(
            body=body,
            throughput=throughput,
            files={DOCUMENTS_FILE: lambda path: pq.write_table(documents, path)},
            merge_parts_as=None,
        )
