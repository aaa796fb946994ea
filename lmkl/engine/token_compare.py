"""Token-level comparison (``lmkl compare``): candidates against a reference, token by token.

Per batch of windows the reference's numbers come from one of three reference sources behind one
protocol (:mod:`lmkl.engine.reference`): a live model (its decoder runs **once** per batch and its
hidden states are shared by every candidate), an exact reference cache (the stored hidden states
and output layer: the same numbers), or a compact top-k cache (KL reported as a guaranteed
interval). Logits are made a chunk of tokens at a time, so the KL stage holds at most
``chunk x vocab`` float32 values per model.

With a live reference all candidates are loaded together and part ``b`` is batch ``b``. With a
cache only one model is ever in memory: candidates are loaded one at a time and part
``c x batches + b`` is candidate ``c`` on batch ``b``. Candidates may also be given as models
already in memory (``candidate_models``, see :mod:`lmkl.engine.in_memory`): a training loop
scores the model it trains against a cache this way, and gets the run directory ``compare``
writes for that checkpoint.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from lmkl.analysis.bootstrap import bootstrap_unit
from lmkl.analysis.ranking import (
    DocSums,
    RankingSums,
    UnitSumsStream,
    metric_values,
    rank_one_run_sums,
)
from lmkl.analysis.streaming import TokenSummary
from lmkl.data.corpus import Corpus, load_corpus, skipped_rows_note
from lmkl.data.windows import Window, make_windows
from lmkl.engine.common import (
    candidate_columns,
    default_run_dir,
    load_models,
    unique_labels,
    windowing_note,
)
from lmkl.engine.distributed import Shard, device_for_rank
from lmkl.engine.identity import run_identity
from lmkl.engine.loop import LogCallback, Part, Plan, RunOutcome, Summary
from lmkl.engine.loop import execute as execute_kind
from lmkl.engine.reference import (
    BatchScoring,
    LiveReference,
    ReferenceSource,
    cache_reference,
)
from lmkl.engine.rundir import RunDirectory, tokens_table
from lmkl.engine.view_record import build_view, view_part
from lmkl.errors import TokenizerMismatchError, UsageError
from lmkl.files import write_json
from lmkl.models import (
    LoadedModel,
    check_config_fits,
    check_context_length,
    load_model,
    load_tokenizer,
    resolve_device,
    shared_vocab_size,
    tokenizer_adds_bos,
    weights_identity,
)
from lmkl.refcache.format import ReferenceCache, is_cache_dir, open_cache
from lmkl.scoring.batches import Batch, make_batch, window_groups
from lmkl.scoring.token_scoring import make_kernel
from lmkl.specs import ComputeSpec, DataSpec, ModelSpec, OutputSpec, WindowSpec

#: Tokens of left context kept with each worst position in worst.json.
WORST_CONTEXT_TOKENS = 48


def resolved_config(
    reference: ModelSpec,
    candidates: list[ModelSpec],
    data: DataSpec,
    windows: WindowSpec,
    compute: ComputeSpec,
) -> dict[str, Any]:
    """The options that determine a run's numbers (output location excluded)."""
    return {
        "reference": reference.model_dump(),
        "candidates": [c.model_dump() for c in candidates],
        "data": data.model_dump(),
        "windowing": windows.model_dump() | {"stride": windows.effective_stride},
        "compute": compute.model_dump(),
    }


def batch_table(
    batch: Batch, per_candidate: dict[str, dict[str, np.ndarray]], schema: pa.Schema
) -> pa.Table:
    """One part's rows: every candidate's per-token metrics with the batch's token metadata."""
    tables = []
    n = batch.targets.numel()
    for label, metrics in per_candidate.items():
        columns: dict[str, Any] = {
            "candidate": [label] * n,
            "token_id": batch.targets.numpy(),
            "nonfinite": metrics["nonfinite"],
            **batch.meta,
        }
        columns.update({name: metrics[name] for name in schema.names if name in metrics})
        tables.append(tokens_table(columns, schema))
    return pa.concat_tables(tables)


class TokenComparison:
    """The ``compare`` run kind (see the module docstring)."""

    kind = "compare"
    token_level = True

    def __init__(
        self,
        reference: ModelSpec,
        candidates: list[ModelSpec],
        data: DataSpec | None,
        windows: WindowSpec | None,
        compute: ComputeSpec,
        *,
        models: tuple[LoadedModel, list[LoadedModel]] | None = None,
        corpus: Corpus | None = None,
        candidate_models: list[LoadedModel] | None = None,
    ) -> None:
        if not candidates:
            raise UsageError("no candidate model given", "name at least one candidate")
        self.reference = reference
        self.candidates = unique_labels(candidates)
        self.cache: ReferenceCache | None = None
        if is_cache_dir(reference.model):
            self.cache = open_cache(reference.model)
            settings = self.cache.settings(data, windows, compute)
            data, windows, compute = settings.data, settings.windows, settings.compute
        elif data is None:
            raise UsageError("no data given", "pass --data FILE_OR_DATASET")
        assert data is not None
        self.data = data
        self.windows = windows or WindowSpec()
        self.compute = compute
        self._given_models = models
        self._given_corpus = corpus
        if candidate_models is not None and self.cache is None:
            raise UsageError(
                "in-memory candidates are scored against a reference cache only",
                "build one first (lmkl cache, or lmkl.api.build_reference_cache)",
            )
        #: Candidates already in memory (e.g. a model being trained), by label: scored as they
        #: are, never loaded, moved or freed.
        self._in_memory = {m.label: m for m in candidate_models or []}
        self._loaded: dict[str, LoadedModel] = {}
        #: Descriptions of the candidates this process loaded (results.json's ``model``).
        self._descriptions: dict[str, dict[str, Any]] = {}
        #: Cached runs: each candidate's weights identity, read before any is loaded.
        self._probes: dict[str, dict[str, Any]] = {}
        #: Groups whose descriptions a sidecar of this process already holds.
        self._described: set[int] = set()

    # -- what the run is -------------------------------------------------------------------------
    def options(self) -> dict[str, Any]:
        config = resolved_config(
            self.reference, self.candidates, self.data, self.windows, self.compute
        )
        if self.cache is not None:
            config["reference_cache"] = self.cache.summary()
        return config

    def default_dir(self) -> Path:
        label = self.cache.label if self.cache is not None else self.reference.display_name
        return default_run_dir(label, self.candidates)

    @property
    def topk(self) -> bool:
        return self.cache is not None and self.cache.mode == "topk"

    def _check_view(self) -> None:
        if self.compute.view_tokens and self.topk:
            raise UsageError(
                "--view-tokens needs exact KL, which a compact (top-k) reference cache only bounds",
                "drop --view-tokens, or use an exact cache (lmkl cache without --top-k)",
            )

    # -- prepare ---------------------------------------------------------------------------------
    def prepare(self, shard: Shard, log: LogCallback) -> Plan:
        self._check_view()
        torch.manual_seed(self.compute.seed)
        self.shard = shard
        if self.cache is None:
            models = self._prepare_live(shard, log)
            self.source: ReferenceSource = LiveReference(self.ref_model)
            groups = [[m.label for m in models]]
            identity_models = [(m.label, m.description) for m in (self.ref_model, *models)]
            fingerprint = self.corpus_description.get("fingerprint")
        else:
            self._prepare_cached(log)
            self.source = cache_reference(self.cache)
            groups = [[c.display_name] for c in self.candidates]
            identity_models = [(self.cache.label, self.cache.manifest["reference"])] + [
                (c.display_name, self._probes[c.display_name]) for c in self.candidates
            ]
            fingerprint = self.cache.manifest["data"].get("fingerprint")
        self.groups = groups
        self.window_groups = list(
            window_groups(self.window_list, self.compute.batch_size, self.compute.max_batch_tokens)
        )
        targets = [sum(w.num_targets for w in group) for group in self.window_groups]
        part_rows = [t * len(group) for group in groups for t in targets]
        identity = run_identity(
            identity_models,
            fingerprint,
            part_rows,
            windows=len(self.window_list),
            tokens=sum(targets),
            reference_cache=self.cache.summary()["created"] if self.cache else None,
        )
        self.how = BatchScoring(
            vocab_size=self.vocab_size,
            chunk=self.chunk,
            temperature=self.compute.temperature,
            worst_k=self.compute.worst_k,
            kernel=self.kernel,
            record_top5=self.compute.view_tokens > 0,
        )
        return Plan(
            part_rows=part_rows,
            identity=identity,
            schema=self.source.schema,
            part_work=[t for _ in groups for t in targets],
        )

    def _prepare_live(self, shard: Shard, log: LogCallback) -> list[LoadedModel]:
        # Data first: a wrong path should not wait for a large model to load.
        corpus = self._given_corpus
        if corpus is None:
            log(f"reading data {self.data.source}")
            corpus = load_corpus(self.data)
        self._given_corpus = None  # the windows are all that is needed from here on
        self.corpus_description = corpus.description
        note = skipped_rows_note(corpus)
        if note is not None:
            log(note)
        if self._given_models is None:
            on_rank = [
                s.model_copy(update={"device": device_for_rank(s.device, shard)})
                for s in (self.reference, *self.candidates)
            ]
            self._given_models = load_models(on_rank[0], on_rank[1:], log)
        self.ref_model, cand_models = self._given_models
        check_context_length([self.ref_model, *cand_models], self.windows)
        self.vocab_size, self.padded = shared_vocab_size([self.ref_model, *cand_models])
        self.tokenizer = self.ref_model.tokenizer
        self.window_list = make_windows(
            corpus,
            self.tokenizer,
            self.windows,
            tokenizer_adds_bos(self.tokenizer),
            self.compute.max_tokens,
        )
        total = sum(w.num_targets for w in self.window_list)
        log(windowing_note(self.windows, total, corpus.description["documents"]))
        self.kernel, self.chunk = make_kernel(
            self.compute, self.vocab_size, total * len(cand_models), log, self.ref_model.device
        )
        self._loaded = {m.label: m for m in cand_models}
        self._descriptions = {m.label: m.description for m in cand_models}
        return cand_models

    def _prepare_cached(self, log: LogCallback) -> None:
        cache = self.cache
        assert cache is not None
        self.tokenizer = cache.tokenizer
        self.vocab_size = cache.vocab_size
        for spec in self.candidates:
            if spec.display_name in self._in_memory:
                self._check_in_memory(self._in_memory[spec.display_name])
                continue
            cache.check_tokenizer(load_tokenizer(spec), spec.display_name)
            # Checked and pinned now (config, weight files, their hash); the weights load when
            # the candidate's turn comes, one model at a time.
            check_config_fits(spec, self.windows, self.vocab_size)
            self._probes[spec.display_name] = weights_identity(spec)
        self.window_list = cache.windows()
        self.corpus_description = cache.manifest["data"]
        self.padded = bool(cache.manifest["vocab"]["padded"])
        first = self._in_memory.get(self.candidates[0].display_name)
        device = (
            first.device
            if first is not None
            else resolve_device(device_for_rank(self.candidates[0].device, self.shard))
        )
        self.kernel, self.chunk = make_kernel(
            self.compute, self.vocab_size, cache.num_tokens, log, device
        )
        if self.topk:
            self.chunk = self.compute.chunk_size(self.vocab_size, 8)

    def _check_in_memory(self, model: LoadedModel) -> None:
        """What loading checks for a model from files, for one given in memory."""
        assert self.cache is not None
        self.cache.check_tokenizer(model.tokenizer, model.label)
        check_context_length([model], self.windows)
        if model.logits_width < self.vocab_size:
            raise TokenizerMismatchError(
                f"{model.label} has {model.logits_width} output rows but the cached "
                f"reference compares {self.vocab_size} tokens",
                "use models with one vocabulary",
            )
        self._probes[model.label] = model.description

    # -- score -----------------------------------------------------------------------------------
    def _models_of(self, group: list[str]) -> list[LoadedModel]:
        """The group's candidates, loading a cached run's next candidate (one at a time)."""
        for label in group:
            if label in self._in_memory and label not in self._loaded:
                model = self._in_memory[label]
                self.padded = self.padded or model.logits_width != len(self.tokenizer)
                self._loaded[label] = model
                self._descriptions[label] = model.description
        missing = [label for label in group if label not in self._loaded]
        if missing:
            self._loaded.clear()  # one model in memory: free the previous candidate first
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            for label in missing:
                spec = next(c for c in self.candidates if c.display_name == label)
                spec = spec.model_copy(update={"device": device_for_rank(spec.device, self.shard)})
                model = load_model(spec, resolve_device(spec.device))
                # (Context length and vocabulary were checked from the config in prepare; the
                # loaded head is checked again because scoring slices it.)
                if model.logits_width < self.vocab_size:
                    raise TokenizerMismatchError(
                        f"{model.label} has {model.logits_width} output rows but the cached "
                        f"reference compares {self.vocab_size} tokens",
                        "use models with one vocabulary",
                    )
                self.padded = self.padded or model.logits_width != len(self.tokenizer)
                self._loaded[label] = model
                self._descriptions[label] = model.description
        return [self._loaded[label] for label in group]

    def ready(self, index: int) -> None:
        """Load part ``index``'s candidates (untimed: loading is not scoring)."""
        self._models_of(self.groups[index // len(self.window_groups)])

    def score(self, index: int) -> Part:
        group, b = divmod(index, len(self.window_groups))
        models = self._models_of(self.groups[group])
        pad_id = self.tokenizer.pad_token_id
        batch = make_batch(self.window_groups[b], pad_id if pad_id is not None else 0)
        per_candidate, worst = self.source.score(batch, models, self.how)
        n = batch.targets.numel()
        part = Part(
            table=batch_table(batch, per_candidate, self.source.schema),
            sidecar={
                "worst": _locate_worst(batch, worst),
                # Once per group and process: summarize needs them on rank 0 (and on resume)
                # for candidates it did not load itself.
                **(
                    {}
                    if group in self._described
                    else {"models": {m.label: m.description for m in models}}
                ),
                "padded": self.padded,
            },
            counters={
                "tokens": n,
                "candidate_tokens": n * len(models),
                "real_slots": int(batch.attention_mask.sum()),
                "padded_slots": batch.attention_mask.numel(),
            },
            kernel=self.kernel.backend if self.source.exact_kl else "topk-bounds",
            extra={"view": view_part(batch.meta, per_candidate)}
            if self.compute.view_tokens
            else {},
        )
        self._described.add(group)
        return part

    # -- summarize -------------------------------------------------------------------------------
    def bootstrap_unit(self) -> str:
        """The id column the bootstrap resamples (documents; windows within one document)."""
        return bootstrap_unit(len({w.doc_id for w in self.window_list}))

    def _batches(self, run_dir: RunDirectory) -> Iterator[dict[str, dict[str, np.ndarray]]]:
        """Per batch of windows, each candidate's per-token columns, in one token order (the
        parts of one batch: one part live, one per candidate group from a cache)."""
        batches = len(self.window_groups)
        for b in range(batches):
            tables = [run_dir.read_part(g * batches + b) for g in range(len(self.groups))]
            table = pa.concat_tables(tables)
            out = {}
            for label in (spec.display_name for spec in self.candidates):
                columns = candidate_columns(table, label)
                order = np.lexsort((columns["window_pos"], columns["window_id"]))
                out[label] = {name: values[order] for name, values in columns.items()}
            yield out

    def summarize(self, run_dir: RunDirectory, totals: dict[str, float]) -> Summary:
        sidecars = [run_dir.read_sidecar(i) or {} for i in run_dir.completed_indices()]
        # This process's own descriptions win; others' (ranks, an earlier resumed process) fill
        # in candidates it never loaded.
        descriptions: dict[str, dict[str, Any]] = dict(self._probes)
        padded = self.padded
        for sidecar in sidecars:
            descriptions.update(sidecar.get("models", {}))
            padded = padded or bool(sidecar.get("padded"))
        descriptions.update(self._descriptions)
        # Streamed: one batch's parts at a time, twice (see lmkl.analysis.streaming); with
        # several candidates (exact KL), one leaderboard: each candidate's per-token KL, ranked
        # with document (llama-cpp: chunk) bootstrap CIs from per-unit sums.
        bounded = not self.source.exact_kl  # a top-k cache: KL bounds instead of KL
        leaderboard = len(self.candidates) > 1 and not bounded
        unit = self.bootstrap_unit()
        labels = [spec.display_name for spec in self.candidates]
        extra = ("kl_lower", "kl_upper") if bounded else ()
        summaries = {label: TokenSummary(extra, self.compute.seed) for label in labels}
        own = {label: UnitSumsStream() for label in labels}
        for batch in self._batches(run_dir):
            for label, columns in batch.items():
                summaries[label].add(columns)
                if leaderboard:
                    own[label].add(metric_values(columns, "kl.mean"), columns[unit])

        def second_pass(
            pairs: list[tuple[int, int | None]],
        ) -> dict[tuple[int, int | None], tuple[DocSums, DocSums]]:
            """Quantiles' second pass, and the paired sums of the ranking (once it knows them)."""
            streams = {pair: (UnitSumsStream(), UnitSumsStream()) for pair in pairs}
            for batch in self._batches(run_dir):
                values = {}
                for label, columns in batch.items():
                    summaries[label].add_second(columns)
                    if pairs:
                        values[label] = metric_values(columns, "kl.mean")
                for (i, j), (a, b) in streams.items():
                    assert j is not None  # a comparison has no noise floor
                    x, y = values[labels[i]], values[labels[j]]
                    both = ~np.isnan(x) & ~np.isnan(y)
                    units = batch[labels[i]][unit]
                    a.add(x, units, both)
                    b.add(y, units, both)
            present = own[labels[0]].seen
            return {
                pair: (a.result(present), b.result(present)) for pair, (a, b) in streams.items()
            }

        ranking = None
        if leaderboard:
            present = own[labels[0]].seen
            sums = RankingSums(
                labels=labels,
                own=[own[label].result(present) for label in labels],
                pair_sums=second_pass,
                strata=[int(present.sum())],
                dataset_labels=["data"],
                weights=[1.0],
                info=[],
                tokens=summaries[labels[0]].rows,
            )
            ranking = rank_one_run_sums(sums, descriptions, unit=unit, seed=self.compute.seed)
        else:
            second_pass([])
        entries = []
        for label in labels:
            entry = {
                "label": label,
                "model": descriptions[label],
                "metrics": summaries[label].result(),
            }
            if bounded:
                entry["metrics"]["kl_bounds"] = _bounds(summaries[label])
            entries.append(entry)
        scored = sum(w.num_targets for w in self.window_list)
        body: dict[str, Any] = {
            "reference": self.source.description,
            "candidates": entries,
            "data": self.corpus_description
            | {"windows": len(self.window_list), "scored_tokens": scored},
            "windowing": {
                "mode": self.windows.windowing,
                "context_length": self.windows.context_length,
                "stride": self.windows.effective_stride
                if self.windows.windowing == "documents"
                else None,
                "adds_bos": tokenizer_adds_bos(self.tokenizer),
                "vocab_size": self.vocab_size,
                "padded_vocab": padded,
                "vocab_note": (
                    f"output layers wider than the tokenizer; logits sliced to its "
                    f"{self.vocab_size} tokens before the softmax"
                    if padded
                    else None
                ),
            },
            "compute": self.compute.model_dump()
            | {
                "chunk_tokens": self.chunk,
                "kernel": "topk-bounds" if bounded else self.kernel.backend,
            },
        }
        if ranking is not None:
            body["ranking"] = ranking
        if self.cache is not None:
            body["reference_cache"] = self.cache.summary()
        seconds = totals["seconds"]
        n_cands = len(self.candidates)
        tokens = totals.get("candidate_tokens", 0.0) / n_cands
        throughput = {
            # Timed over scoring only (model loading and file writing excluded).
            "seconds": seconds,
            "tokens_per_s": tokens / seconds if seconds > 0 else None,
            "candidate_tokens_per_s": tokens * n_cands / seconds if seconds > 0 else None,
            "padding_efficiency": totals["real_slots"] / totals["padded_slots"]
            if totals.get("padded_slots")
            else None,
            "processes": self.shard.world_size,
            # CPU time of the scoring (all threads, all ranks): steadier than wall time on a
            # shared machine.
            "cpu_seconds": totals["cpu_seconds"],
        }
        worst = _collect_worst(sidecars, self.window_list, self.tokenizer, self.compute.worst_k)
        files = {"worst.json": lambda path: write_json(path, worst)}
        view_rows = run_dir.read_extra("view") if self.compute.view_tokens else None
        if view_rows is not None:
            # Five columns of every token, read only when a token view was asked for.
            view_columns = ["candidate", "doc_id", "window_id", "position", "kl"]
            view = build_view(
                view_rows,
                pa.concat_tables(run_dir.iter_parts(view_columns)),
                self.window_list,
                self.tokenizer,
                self.compute.view_tokens,
                by_chunk=self.windows.windowing == "llama-cpp",
                sample_seed=self.compute.seed if self.compute.view_docs == "sample" else None,
            )
            files["view.parquet"] = lambda path: pq.write_table(view, path)
        return Summary(body=body, throughput=throughput, files=files)


def _locate_worst(
    batch: Batch, worst: dict[str, list[dict[str, Any]]]
) -> dict[str, list[dict[str, Any]]]:
    """Worst rows with window ids and window positions, so that they survive a resume."""
    meta = batch.meta
    return {
        label: [
            {
                **e,
                "window_id": int(meta["window_id"][e["row"]]),
                "window_pos": int(meta["window_pos"][e["row"]]),
                "doc_id": int(meta["doc_id"][e["row"]]),
                "position": int(meta["position"][e["row"]]),
                "token_id": int(batch.targets[e["row"]]),
            }
            for e in entries
        ]
        for label, entries in worst.items()
    }


def _kl_key(value: Any) -> float:
    return float("inf") if value == "inf" else float(value)


def _collect_worst(
    sidecars: list[dict[str, Any]], windows: list[Window], tokenizer: Any, k: int
) -> list[dict[str, Any]]:
    """The ``k`` worst positions per candidate over all parts, with decoded context."""
    merged: dict[str, list[dict[str, Any]]] = {}
    for sidecar in sidecars:
        for label, entries in sidecar.get("worst", {}).items():
            merged.setdefault(label, []).extend(entries)
    by_id = {w.window_id: w for w in windows}
    out = []
    for label, entries in merged.items():
        entries.sort(key=lambda e: (-_kl_key(e["kl"]), e["window_id"], e["window_pos"]))
        for e in entries[:k]:
            window = by_id[e["window_id"]]
            j = e["window_pos"]
            context_ids = window.input_ids[max(0, j - WORST_CONTEXT_TOKENS) : j]
            entry = {
                "candidate": label,
                "doc_id": e["doc_id"],
                "window_id": e["window_id"],
                "position": e["position"],
                "kl": _kl_key(e["kl"]),
                "token_id": e["token_id"],
                "token": tokenizer.decode([e["token_id"]]),
                "context": tokenizer.decode(context_ids, skip_special_tokens=True),
                "reference_top5": [
                    {"token_id": i, "token": tokenizer.decode([i]), "prob": p}
                    for i, p in e["reference_top5"]
                ],
                "candidate_top5": [
                    {"token_id": i, "token": tokenizer.decode([i]), "prob": p}
                    for i, p in e["candidate_top5"]
                ],
            }
            if "kl_upper" in e:
                entry["kl_upper"] = _kl_key(e["kl_upper"])
            out.append(entry)
    return out


def _bounds(summary: TokenSummary) -> dict[str, Any]:
    """Summaries of the per-token KL bounds (their means and quantiles bound the KL's)."""
    return {
        "lower": summary.distribution("kl_lower"),
        "upper": summary.distribution("kl_upper"),
        "note": "compact (top-k) reference cache: KL(P‖Q) is only known to lie in "
        "[lower, upper] per token; means and quantiles of the bounds bound the KL's",
    }


def run_comparison(
    reference: ModelSpec,
    candidates: list[ModelSpec],
    data: DataSpec | None,
    windows: WindowSpec | None,
    compute: ComputeSpec,
    output: OutputSpec,
    *,
    models: tuple[LoadedModel, list[LoadedModel]] | None = None,
    **run_options: Any,
) -> RunOutcome:
    """Compare ``candidates`` with ``reference`` on ``data`` and write a run directory.

    ``reference.model`` may be a reference cache directory (``lmkl cache``); ``data`` and
    ``windows`` may then be ``None`` (the cache holds the tokens) and must otherwise match it.
    Under ``torchrun``/``accelerate launch`` the parts are shared out over the processes and
    rank 0 writes one run directory identical to a single-process run. ``models``: the
    reference and candidates already loaded from these specs (an experiment loads them once for
    all its datasets). ``run_options`` go to :func:`lmkl.engine.loop.execute` (``resume``,
    ``reuse_finished``, ``progress``, ``log``). Raises :class:`lmkl.errors.LmklError`
    subclasses for anything the user can fix.
    """
    comparison = TokenComparison(reference, candidates, data, windows, compute, models=models)
    return execute_kind(comparison, output, **run_options)
