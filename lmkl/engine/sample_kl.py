"""Sampled sequence-level KL (``lmkl sample-kl``) as a run kind of the engine.

Part ``p x batches + s`` is prompt ``p``'s ``s``-th batch of continuations: sampled from one
model (seeded per continuation, so a resumed run draws the same ones), scored teacher-forced
under both. Each part holds the sampled tokens' rows (the usual per-token columns) and, as its
sidecar, one record per continuation (estimator inputs and the generated text).
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from lmkl.analysis.streaming import summarize_chunks
from lmkl.data.corpus import load_corpus
from lmkl.data.tokenize import token_bytes
from lmkl.engine.common import candidate_columns, load_models
from lmkl.engine.distributed import Shard, device_for_rank
from lmkl.engine.identity import run_identity
from lmkl.engine.loop import LogCallback, Part, Plan, Summary
from lmkl.engine.pair import PairKind
from lmkl.engine.rundir import TOKEN_SCHEMA, RunDirectory, tokens_table
from lmkl.engine.sampling import (
    SAMPLES_FILE,
    TEXT_FILE,
    SampleSpec,
    encode_prompts,
    sample_continuations,
    score_continuations,
    sequence_estimators,
    stop_ids,
    summarize_samples,
)
from lmkl.errors import UsageError
from lmkl.models import shared_vocab_size
from lmkl.scoring.divergence import TOKEN_METRIC_NAMES
from lmkl.specs import ComputeSpec, DataSpec, ModelSpec

#: Per-continuation columns of samples.parquet, in order.
SAMPLE_COLUMNS = (
    "prompt_id",
    "sample_id",
    "seed",
    "tokens",
    "stopped",
    "log_p",
    "log_q",
    "log_sampling",
    "kl_sum",
    "reverse_kl_sum",
)


def _floats(values: list[Any], dtype: Any = np.float64) -> np.ndarray:
    """Numbers read back from strict JSON (``"inf"``/``"-inf"`` strings, null for NaN)."""
    return np.asarray(
        [float(v) if isinstance(v, str) else (np.nan if v is None else v) for v in values],
        dtype=dtype,
    )


class SampledKL(PairKind):
    """The ``sample-kl`` run kind (see the module docstring)."""

    kind = "sample-kl"
    command = "sample-kl"
    token_level = True

    def __init__(
        self,
        reference: ModelSpec,
        candidate: ModelSpec,
        data: DataSpec,
        spec: SampleSpec,
        compute: ComputeSpec,
    ) -> None:
        super().__init__(reference, candidate, data, compute)
        self.spec = spec

    def own_options(self) -> dict[str, Any]:
        return {"sampling": self.spec.model_dump()}

    def prepare(self, shard: Shard, log: LogCallback) -> Plan:
        self.shard = shard
        log(f"reading prompts {self.data.source}")
        corpus = load_corpus(self.data)
        specs = [
            s.model_copy(update={"device": device_for_rank(s.device, shard)})
            for s in (self.reference, self.candidate)
        ]
        self.ref_model, (self.cand_model,) = load_models(specs[0], specs[1:], log)
        self.vocab_size, self.padded = shared_vocab_size([self.ref_model, self.cand_model])
        self.chunk = self.compute.chunk_size(self.vocab_size)
        forward = self.spec.direction == "forward"
        self.sampler = self.ref_model if forward else self.cand_model
        self.stops = stop_ids(self.sampler, self.spec.stop_token_ids)
        self.tokenizer = self.ref_model.tokenizer
        pad_id = self.tokenizer.pad_token_id
        self.pad_id = pad_id if pad_id is not None else 0
        self.documents = corpus.documents
        self.corpus_description = corpus.description
        self.prompts = encode_prompts(corpus, self.tokenizer)
        longest = max(len(p) for p in self.prompts) + self.spec.max_new_tokens
        for model in (self.ref_model, self.cand_model):
            limit = model.max_positions
            if limit is not None and longest > limit:
                raise UsageError(
                    f"the longest prompt plus --max-new-tokens is {longest} tokens, more than "
                    f"{model.label}'s maximum of {limit} positions",
                    "use shorter prompts or a smaller --max-new-tokens",
                )
        n, size = self.spec.num_samples, self.spec.batch_size
        self.units = [
            (p, list(range(start, min(start + size, n))))
            for p in range(len(self.prompts))
            for start in range(0, n, size)
        ]
        work = [len(samples) for _, samples in self.units]
        identity = run_identity(
            [(m.label, m.description) for m in (self.ref_model, self.cand_model)],
            corpus.description.get("fingerprint"),
            work,
            prompts=len(self.prompts),
        )
        # Token rows per part are known only once sampled: parts are checked by identity.
        return Plan(
            part_rows=[None] * len(self.units),  # type: ignore[list-item]
            part_work=work,
            identity=identity,
            schema=TOKEN_SCHEMA,
            sidecar="samples",
            unit="continuations",
        )

    def score(self, index: int) -> Part:
        p, sample_ids = self.units[index]
        doc, prompt = self.documents[p], self.prompts[p]
        t0, c0 = time.perf_counter(), time.process_time()
        conts = sample_continuations(
            self.sampler, prompt, doc.doc_id, sample_ids, self.spec, self.vocab_size, self.stops
        )
        scored = score_continuations(
            self.ref_model, self.cand_model, prompt, conts, self.vocab_size, self.chunk, self.pad_id
        )
        # Timed: sampling and scoring (not the decoding of text below).
        seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
        forward = self.spec.direction == "forward"
        tables, records = [], []
        for cont, metrics in zip(conts, scored, strict=True):
            n = len(cont.token_ids)
            nll_p = metrics["nll_reference"].astype(np.float64)
            nll_q = metrics["nll_candidate"].astype(np.float64)
            columns = {
                "candidate": [self.cand_model.label] * n,
                "doc_id": np.full(n, cont.prompt_id, dtype=np.int64),
                # One id per continuation, the same whichever parts ran in this process.
                "window_id": np.full(n, p * self.spec.num_samples + cont.sample_id),
                "position": np.arange(n, dtype=np.int64),
                "window_pos": np.arange(len(prompt), len(prompt) + n, dtype=np.int64),
                "token_id": np.asarray(cont.token_ids, dtype=np.int64),
                "bytes": np.asarray(token_bytes(self.tokenizer, cont.token_ids), dtype=np.int64),
                "nonfinite": metrics["nonfinite"],
                **{name: metrics[name] for name in TOKEN_METRIC_NAMES},
            }
            tables.append(tokens_table(columns))
            records.append(
                {
                    "prompt_id": cont.prompt_id,
                    "sample_id": cont.sample_id,
                    "seed": cont.seed,
                    "tokens": n,
                    "stopped": cont.stopped,
                    "log_p": -float(nll_p.sum()),
                    "log_q": -float(nll_q.sum()),
                    "log_sampling": cont.sampling_logprob,
                    "kl_sum": float(metrics["kl"].astype(np.float64).sum()),
                    "reverse_kl_sum": float(metrics["reverse_kl"].astype(np.float64).sum()),
                    # ℓ_t = log s − log o per token (s: the sampler), and KL(S_t ‖ O_t)
                    "log_ratio": (nll_q - nll_p if forward else nll_p - nll_q).tolist(),
                    "exact_kl": metrics["kl" if forward else "reverse_kl"].tolist(),
                    "text": {
                        "prompt_id": cont.prompt_id,
                        "sample_id": cont.sample_id,
                        "prompt": doc.text,
                        "continuation": self.tokenizer.decode(cont.token_ids),
                        "token_ids": cont.token_ids,
                        "stopped": cont.stopped,
                    },
                }
            )
        return Part(
            table=pa.concat_tables(tables),
            sidecar=records,
            counters={
                "samples": len(conts),
                "tokens": sum(r["tokens"] for r in records),
                "seconds": seconds,
                "cpu_seconds": cpu_seconds,
            },
        )

    def summarize(self, run_dir: RunDirectory, totals: dict[str, float]) -> Summary:
        records = [r for i in run_dir.completed_indices() for r in run_dir.read_sidecar(i)]
        cols: dict[str, np.ndarray] = {
            name: np.asarray([r[name] for r in records]) for name in SAMPLE_COLUMNS
        }
        for name in ("log_p", "log_q", "log_sampling", "kl_sum", "reverse_kl_sum"):
            cols[name] = _floats([r[name] for r in records])
        cols.update(
            sequence_estimators(
                [_floats(r["log_ratio"]) for r in records],
                [_floats(r["exact_kl"], np.float32) for r in records],
            )
        )
        sampled = summarize_samples(cols, self.spec)
        label = self.cand_model.label
        metrics = summarize_chunks(
            lambda: (candidate_columns(part, label) for part in run_dir.iter_parts())
        ).result()
        head = sampled["estimators"]["exact_per_step"]
        metrics["sequence_kl"] = {
            "target": sampled["target"],
            "estimator": "exact_per_step",
            "mean": head["mean"],
            "se": head["se"],
            "ci95": head["ci95"],
            "se_prompts": head["se_prompts"],
            "per_token": head["per_token"],
            "biased": sampled["biased"],
        }
        metrics["sampled_kl"] = sampled
        body = {
            "reference": self.ref_model.description,
            "candidates": [
                {"label": label, "model": self.cand_model.description, "metrics": metrics}
            ],
            "sampling": self.spec.model_dump()
            | {
                "sampler": self.sampler.label,
                "exact": self.spec.exact,
                "stop_token_ids": sorted(self.stops),
                "vocab_size": self.vocab_size,
                "padded_vocab": self.padded,
            },
            "data": self.corpus_description | {"prompts": len(self.prompts)},
            "compute": self.compute.model_dump() | {"chunk_tokens": self.chunk},
        }
        seconds = totals["seconds"]
        throughput = {
            "seconds": seconds,
            "samples_per_s": totals.get("samples", 0.0) / seconds if seconds > 0 else None,
            "tokens_per_s": totals.get("tokens", 0.0) / seconds if seconds > 0 else None,
            "processes": self.shard.world_size,
        }
        samples = pa.table({"candidate": [label] * len(records), **cols})
        texts = "".join(json.dumps(r["text"], ensure_ascii=False) + "\n" for r in records)
        return Summary(
            body=body,
            throughput=throughput,
            files={
                SAMPLES_FILE: lambda path: pq.write_table(samples, path),
                TEXT_FILE: lambda path: path.write_text(texts, encoding="utf-8"),
            },
        )
