"""Drive a reference and one or more candidates over the same windows and stream results out.

Per batch of windows the reference runs **once** and its hidden states at the scored positions are
shared by every candidate. Logits are produced a chunk of tokens at a time from those hidden
states (see :class:`lmkl.models.LoadedModel`), so the KL stage holds at most ``chunk × vocab``
float32 values per model instead of ``batch × seq × vocab``. Each batch's per-token results are
written as a durable part; the summary is computed from the parts at the end.
"""

from __future__ import annotations

import datetime as _dt
import heapq
import json
import platform
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

import lmkl
from lmkl.analysis.stats import summarize
from lmkl.data.corpus import Corpus, Window, load_corpus, make_windows
from lmkl.engine.distributed import Shard, device_for_rank, init_shard
from lmkl.engine.interrupt import GracefulStop
from lmkl.engine.rundir import RunDirectory, tokens_table
from lmkl.errors import Interrupted, ResumeError, UsageError
from lmkl.models import (
    LoadedModel,
    check_tokenizers_match,
    load_model,
    load_tokenizer,
    resolve_device,
    shared_vocab_size,
    tokenizer_adds_bos,
)
from lmkl.scoring.divergence import TOKEN_METRIC_NAMES
from lmkl.scoring.fused import MetricsKernel, temporaries_per_token
from lmkl.specs import ComputeSpec, DataSpec, ModelSpec, OutputSpec, WindowSpec

ProgressCallback = Callable[[int, int], None]
LogCallback = Callable[[str], None]


@dataclass
class RunOutcome:
    """What a finished run produced."""

    path: Path
    results: dict[str, Any]
    #: False on the other ranks of a multi-process run (only rank 0 reports).
    is_main: bool = True


@dataclass
class Batch:
    """Right-padded model inputs for a group of windows, and where their targets are."""

    windows: list[Window]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    #: flat (row, column) of the logits that predict each target, in window order
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    #: per target: window id, doc id, position in document/stream, position in window, bytes
    meta: dict[str, np.ndarray] = field(default_factory=dict)


def window_groups(
    windows: list[Window], batch_size: int, max_batch_tokens: int | None = None
) -> Iterator[list[Window]]:
    """The windows of each batch, in batch order.

    Without ``max_batch_tokens``: ``batch_size`` consecutive windows per batch. With it: windows
    sorted by length (longest first, ties by window order) and each batch filled while
    ``windows x longest length <= max_batch_tokens`` (at least one window), which keeps padding
    small when lengths vary. Deterministic, so every process of a multi-process run and every
    resumed run sees the same batches.
    """
    if max_batch_tokens is None:
        for start in range(0, len(windows), batch_size):
            yield windows[start : start + batch_size]
        return
    ordered = sorted(windows, key=lambda w: -len(w.input_ids))
    group: list[Window] = []
    for window in ordered:
        width = len(group[0].input_ids) if group else len(window.input_ids)
        if group and (len(group) + 1) * width > max_batch_tokens:
            yield group
            group = []
        group.append(window)
    if group:
        yield group


def make_batches(
    windows: list[Window], batch_size: int, pad_id: int, *, max_batch_tokens: int | None = None
) -> Iterator[Batch]:
    """Group windows (see :func:`window_groups`), right-pad them and index their scored positions.

    Right padding keeps every real token's position id and causal context unchanged.
    """
    for group in window_groups(windows, batch_size, max_batch_tokens):
        width = max(len(w.input_ids) for w in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        rows, cols, targets = [], [], []
        meta: dict[str, list[Any]] = {
            k: [] for k in ("window_id", "doc_id", "position", "window_pos", "bytes")
        }
        for r, window in enumerate(group):
            n = len(window.input_ids)
            ids[r, :n] = torch.tensor(window.input_ids, dtype=torch.long)
            mask[r, :n] = 1
            js: range | list[int] = range(window.first_target, n)
            target_bytes = window.target_bytes
            if window.score_mask is not None:  # chat data: only the assistant targets
                js = [j for j, keep in zip(js, window.score_mask, strict=True) if keep]
                target_bytes = [
                    b for b, keep in zip(target_bytes, window.score_mask, strict=True) if keep
                ]
            rows.extend([r] * len(js))
            cols.extend(j - 1 for j in js)
            targets.extend(window.input_ids[j] for j in js)
            meta["window_id"].extend([window.window_id] * len(js))
            meta["doc_id"].extend([window.doc_id] * len(js))
            meta["position"].extend(window.offset + j for j in js)
            meta["window_pos"].extend(js)
            meta["bytes"].extend(target_bytes)
        yield Batch(
            windows=group,
            input_ids=ids,
            attention_mask=mask,
            rows=torch.tensor(rows, dtype=torch.long),
            cols=torch.tensor(cols, dtype=torch.long),
            targets=torch.tensor(targets, dtype=torch.long),
            meta={k: np.asarray(v, dtype=np.int64) for k, v in meta.items()},
        )


@dataclass
class _Top:
    values: torch.Tensor
    indices: torch.Tensor


def _top5(logits: torch.Tensor, temperature: float, lse: torch.Tensor | None = None) -> _Top:
    """The five most likely tokens and their log-probabilities (no full log-softmax).

    ``lse``: the rows' log-normalisers when already known (the fused kernel returns them).
    """
    top = logits.float().topk(min(5, logits.shape[-1]), -1)
    values = top.values / temperature
    if lse is None:
        lse = (logits.float() / temperature).logsumexp(-1)
    return _Top(values=values - lse[:, None], indices=top.indices)


class WorstTracker:
    """Keeps the ``k`` highest-KL positions of one batch with both models' top-5 next tokens."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.entries: list[tuple[float, int, dict[str, Any]]] = []
        self._counter = 0

    def offer(
        self,
        kl: torch.Tensor,
        ref_logits: torch.Tensor,
        cand_logits: torch.Tensor,
        index_offset: int,
        temperature: float,
        lse: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        if self.k == 0:
            return
        finite_kl = torch.nan_to_num(kl, nan=-1.0)
        take = min(self.k, kl.numel())
        values, idx = finite_kl.topk(take)
        keep = values >= 0
        if len(self.entries) >= self.k:
            # Only rows that beat the current k-th worst can enter: skip the rest's top-5.
            keep &= values > self.entries[0][0]
        values, idx = values[keep], idx[keep]
        if idx.numel() == 0:
            return
        p_top = _top5(ref_logits[idx], temperature, None if lse is None else lse[0][idx])
        q_top = _top5(cand_logits[idx], temperature, None if lse is None else lse[1][idx])
        for n, (value, i) in enumerate(zip(values.tolist(), idx.tolist(), strict=True)):
            entry = {
                "row": index_offset + i,
                "kl": value,
                "reference_top5": list(
                    zip(p_top.indices[n].tolist(), p_top.values[n].exp().tolist(), strict=True)
                ),
                "candidate_top5": list(
                    zip(q_top.indices[n].tolist(), q_top.values[n].exp().tolist(), strict=True)
                ),
            }
            self._counter += 1
            item = (value, -self._counter, entry)
            if len(self.entries) < self.k:
                heapq.heappush(self.entries, item)
            elif item > self.entries[0]:
                heapq.heapreplace(self.entries, item)

    def result(self) -> list[dict[str, Any]]:
        return [e for _, _, e in sorted(self.entries, key=lambda t: (-t[0], -t[1]))]


def model_rows(model: LoadedModel, batch: Batch) -> torch.Tensor:
    """``[targets, H]`` final hidden states (or logits rows) of ``model`` at the scored positions.

    The decoder runs once on the padded batch; padding and unscored positions are dropped before
    the output layer, which is applied later a chunk at a time.
    """
    device = model.device
    hidden = model.hidden_states(batch.input_ids.to(device), batch.attention_mask.to(device))
    return hidden[batch.rows.to(hidden.device), batch.cols.to(hidden.device)]


@torch.inference_mode()
def score_batch(
    batch: Batch,
    reference: LoadedModel,
    candidates: list[LoadedModel],
    vocab_size: int,
    chunk_size: int,
    temperature: float,
    worst_k: int,
    *,
    kernel: MetricsKernel | None = None,
    reference_rows: torch.Tensor | None = None,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, list[dict[str, Any]]]]:
    """Per-token metrics for every candidate on one batch, and each candidate's worst positions.

    Every decoder runs once; then, per chunk of tokens, the reference's logits are computed once
    and compared with each candidate's by ``kernel`` (the fused metrics; eager if not given).
    ``reference_rows`` supplies the reference's rows directly (a reference cache); then
    ``reference`` only needs ``logits(rows)``.
    """
    kernel = kernel or MetricsKernel(compile=False)
    ref_rows = model_rows(reference, batch) if reference_rows is None else reference_rows
    cand_rows = [model_rows(candidate, batch) for candidate in candidates]
    targets = batch.targets
    trackers = [WorstTracker(worst_k) for _ in candidates]
    chunks: list[list[dict[str, torch.Tensor]]] = [[] for _ in candidates]
    for start in range(0, targets.numel(), chunk_size):
        stop = start + chunk_size
        # Full-width rows: the kernel slices padded heads to vocab_size without a copy.
        ref_logits = _overflow_as_nan(reference.logits(ref_rows[start:stop]))
        chunk_targets = targets[start:stop].to(ref_logits.device)
        for i, candidate in enumerate(candidates):
            cand_logits = _overflow_as_nan(candidate.logits(cand_rows[i][start:stop]))
            cand_logits = cand_logits.to(ref_logits.device)
            metrics = kernel(
                ref_logits,
                cand_logits,
                chunk_targets,
                temperature=temperature,
                vocab_size=vocab_size,
            )
            lse = (
                (metrics["lse_reference"], metrics["lse_candidate"])
                if ("lse_reference" in metrics)
                else None
            )
            trackers[i].offer(
                metrics["kl"],
                ref_logits[..., :vocab_size],
                cand_logits[..., :vocab_size],
                start,
                temperature,
                lse=lse,
            )
            chunks[i].append({k: v.cpu() for k, v in metrics.items() if not k.startswith("lse_")})
            del cand_logits
        del ref_logits
    per_candidate: dict[str, dict[str, np.ndarray]] = {}
    worst: dict[str, list[dict[str, Any]]] = {}
    for i, candidate in enumerate(candidates):
        per_candidate[candidate.label] = {
            name: torch.cat([c[name] for c in chunks[i]]).numpy() for name in chunks[i][0]
        }
        worst[candidate.label] = trackers[i].result()
    return per_candidate, worst


def _overflow_as_nan(logits: torch.Tensor) -> torch.Tensor:
    """In float16, an infinite logit means overflow (its range ends at 65504), not a mask.

    Such rows are made NaN so that token_metrics counts them as non-finite and every statistic
    excludes them; in wider dtypes a ``-inf`` logit is a deliberate mask and is kept.
    """
    if logits.dtype != torch.float16:
        return logits
    overflow = ~torch.isfinite(logits).all(-1)
    if not bool(overflow.any()):
        return logits
    return torch.where(overflow[:, None], torch.full_like(logits, float("nan")), logits)


def _batch_table(
    batch: Batch, per_candidate: dict[str, dict[str, np.ndarray]], schema: Any = None
) -> Any:
    import pyarrow as pa

    from lmkl.engine.rundir import TOKEN_SCHEMA

    schema = schema or TOKEN_SCHEMA

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


def _unique_labels(specs: list[ModelSpec]) -> list[ModelSpec]:
    seen: dict[str, int] = {}
    out = []
    for spec in specs:
        label = spec.display_name
        if label in seen:
            seen[label] += 1
            spec = spec.model_copy(update={"label": f"{label}-{seen[label]}"})
        else:
            seen[label] = 1
        out.append(spec)
    return out


def default_run_dir(reference: ModelSpec, candidates: list[ModelSpec]) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = f"{reference.display_name}-vs-{candidates[0].display_name}"
    if len(candidates) > 1:
        name += f"-and-{len(candidates) - 1}"
    return Path("runs") / f"{name}-{stamp}"


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


def load_models(
    reference_spec: ModelSpec,
    candidate_specs: list[ModelSpec],
    log: LogCallback,
) -> tuple[LoadedModel, list[LoadedModel]]:
    """Load the reference and candidates, checking each candidate's tokenizer before its weights."""
    log(f"loading reference {reference_spec.model}")
    reference = load_model(reference_spec, resolve_device(reference_spec.device))
    candidates = []
    for spec in candidate_specs:
        tokenizer = load_tokenizer(spec)
        check_tokenizers_match(reference.tokenizer, tokenizer, (reference.label, spec.display_name))
        log(f"loading candidate {spec.model}")
        candidates.append(load_model(spec, resolve_device(spec.device)))
    return reference, candidates


def check_context_length(models: list[LoadedModel], windows: WindowSpec) -> None:
    for model in models:
        limit = model.max_positions
        if limit is not None and windows.context_length > limit:
            raise UsageError(
                f"context length {windows.context_length} exceeds {model.label}'s maximum of "
                f"{limit} positions",
                f"pass --context-length {limit} or less",
            )


def make_kernel(
    compute: ComputeSpec, vocab_size: int, tokens: int, log: LogCallback
) -> tuple[MetricsKernel, int]:
    """The metrics kernel for a run and its chunk size (tokens per KL chunk).

    Chunks are sized for the path that will run (the compiled kernel needs fewer temporaries);
    an eager fallback splits them further so the memory budget holds either way.
    """
    kernel = MetricsKernel(compile=compute.compile, expected_elements=tokens * vocab_size, log=log)
    chunk = compute.chunk_size(vocab_size, temporaries_per_token(kernel.use_compile))
    if kernel.use_compile and not compute.chunk_tokens:
        kernel.eager_rows = compute.chunk_size(vocab_size, temporaries_per_token(False))
    return kernel, chunk


def completed_indices(run_dir: RunDirectory) -> set[int]:
    """Indices of the parts already written (any subset, e.g. from other ranks)."""
    run_dir.rescan()
    return {int(p.stem.split("-")[-1]) for p in run_dir.completed_parts()}


def open_shared_run_dir(
    shard: Shard,
    path: Path,
    config: dict[str, Any],
    *,
    resume: bool,
    overwrite: bool,
    log: LogCallback | None = None,
) -> RunDirectory:
    """Rank 0 creates (or checks, on resume) the run directory; the other ranks then join it."""
    if resume:
        shard.on_main(_open_for_resume, path, config, log or (lambda _msg: None))
    else:
        shard.on_main(_create_run_dir, path, config, None, overwrite)
    run_dir = RunDirectory(path)
    run_dir.parts_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def _create_run_dir(
    path: Path, config: dict[str, Any], identity: dict[str, Any] | None, overwrite: bool
) -> None:
    run_dir = RunDirectory.create(path, overwrite=overwrite)
    run_dir.write_config(config)
    if identity is not None:
        run_dir.write_progress(identity)


def gather_parts(
    shard: Shard, run_dir: RunDirectory, n_parts: int, counters: dict[str, float]
) -> dict[str, float] | None:
    """Bring every rank's parts into rank 0's run directory; sum the ranks' counters there.

    On a shared filesystem nothing moves; otherwise the parts rank 0 cannot see are sent to it.
    Returns the summed counters on rank 0 (``seconds`` is the slowest rank's), ``None`` elsewhere.
    """
    if not shard.distributed:
        return counters
    shard.barrier()
    present = completed_indices(run_dir) if shard.is_main else set()
    missing = shard.broadcast(sorted(set(range(n_parts)) - present))
    payload = {}
    for index in missing:
        part = run_dir.part_path(index)
        if shard.owns(index) and part.exists():
            worst = run_dir.parts_dir / f"worst-{index:06d}.json"
            payload[index] = (part.read_bytes(), worst.read_bytes() if worst.exists() else None)
    gathered = shard.gather((payload, counters))
    if gathered is None:
        return None
    from lmkl.engine.rundir import atomic_path

    totals: dict[str, float] = {}
    for rank_payload, rank_counters in gathered:
        for index, (part_bytes, worst_bytes) in sorted(rank_payload.items()):
            if worst_bytes is not None:
                with atomic_path(run_dir.parts_dir / f"worst-{index:06d}.json") as tmp:
                    tmp.write_bytes(worst_bytes)
            with atomic_path(run_dir.part_path(index)) as tmp:
                tmp.write_bytes(part_bytes)
        for key, value in rank_counters.items():
            totals[key] = (
                max(totals.get(key, 0.0), value)
                if key == "seconds"
                else (totals.get(key, 0.0) + value)
            )
    run_dir.rescan()  # parts received from other ranks were written behind its back
    totals["world_size"] = shard.world_size
    return totals


def run_comparison(
    reference: ModelSpec,
    candidates: list[ModelSpec],
    data: DataSpec | None,
    windows: WindowSpec | None,
    compute: ComputeSpec,
    output: OutputSpec,
    *,
    resume: bool = False,
    progress: ProgressCallback | None = None,
    log: LogCallback | None = None,
    models: tuple[LoadedModel, list[LoadedModel]] | None = None,
) -> RunOutcome:
    """Compare ``candidates`` with ``reference`` on ``data`` and write a run directory.

    ``reference.model`` may be a reference cache directory (``lmkl cache``); ``data`` and
    ``windows`` may then be ``None`` (the cache holds the tokens) and must otherwise match it.
    Under ``torchrun``/``accelerate launch`` the batches are shared out over the processes and
    rank 0 writes one run directory identical to a single-process run.

    Returns the run directory and its results (also in ``results.json``). Raises
    :class:`lmkl.errors.LmklError` subclasses for anything the user can fix. ``models``: the
    reference and candidates already loaded from these specs (an experiment loads them once
    for all its datasets); None loads them here.
    """
    log = log or (lambda _msg: None)
    if not candidates:
        raise UsageError("no candidate model given", "name at least one candidate")
    if resume and output.overwrite:
        raise UsageError(
            "--resume and --overwrite contradict each other",
            "pass --resume to continue the run, or --overwrite to replace it",
        )
    if resume and not output.dir:
        raise UsageError(
            "--resume needs the run directory to continue",
            "pass --resume --out DIR with the directory of the interrupted run",
        )
    candidates = _unique_labels(candidates)
    from lmkl.refcache.cache import is_cache_dir

    if is_cache_dir(reference.model):
        from lmkl.refcache.cache import run_cached_comparison

        return run_cached_comparison(
            reference,
            candidates,
            data,
            windows,
            compute,
            output,
            resume=resume,
            progress=progress,
            log=log,
        )
    if data is None:
        raise UsageError("no data given", "pass --data FILE_OR_DATASET")
    windows = windows or WindowSpec()
    config = resolved_config(reference, candidates, data, windows, compute)
    out_path = Path(output.dir) if output.dir else default_run_dir(reference, candidates)
    shard = init_shard()
    try:
        out_path = shard.broadcast(out_path)  # a default name holds a time stamp: use rank 0's
        return _run_live(
            shard,
            reference,
            candidates,
            data,
            windows,
            compute,
            output,
            config,
            out_path,
            resume,
            progress,
            log,
            models,
        )
    finally:
        shard.close()


def _run_live(
    shard: Shard,
    reference: ModelSpec,
    candidates: list[ModelSpec],
    data: DataSpec,
    windows: WindowSpec,
    compute: ComputeSpec,
    output: OutputSpec,
    config: dict[str, Any],
    out_path: Path,
    resume: bool,
    progress: ProgressCallback | None,
    log: LogCallback,
    models: tuple[LoadedModel, list[LoadedModel]] | None = None,
) -> RunOutcome:
    # Check the output before loading models (which can take minutes), but create the directory
    # only once models and data are known to be usable, so a typo leaves nothing behind.
    run_dir: RunDirectory | None = None
    if resume:
        shard.on_main(_open_for_resume, out_path, config, log)
        run_dir = RunDirectory(out_path)
    else:
        # Rank 0 checks; the collective also keeps a fast rank 0 from creating the directory
        # before a slow rank has looked at it.
        shard.on_main(RunDirectory.check_new, out_path, overwrite=output.overwrite)
    started = _dt.datetime.now(_dt.timezone.utc)
    torch.manual_seed(compute.seed)
    try:
        # Data first: a wrong path should not wait for a large model to load.
        log(f"reading data {data.source}")
        corpus = load_corpus(data)
        if models is None:
            on_rank = [
                s.model_copy(update={"device": device_for_rank(s.device, shard)})
                for s in (reference, *candidates)
            ]
            models = load_models(on_rank[0], on_rank[1:], log)
        ref_model, cand_models = models
        check_context_length([ref_model, *cand_models], windows)
        vocab_size, padded = shared_vocab_size([ref_model, *cand_models])

        window_list = make_windows(
            corpus,
            ref_model.tokenizer,
            windows,
            tokenizer_adds_bos(ref_model.tokenizer),
            compute.max_tokens,
        )
        total_targets = sum(w.num_targets for w in window_list)
        kernel, chunk = make_kernel(compute, vocab_size, total_targets * len(cand_models), log)
        part_targets = [
            sum(w.num_targets for w in group)
            for group in window_groups(window_list, compute.batch_size, compute.max_batch_tokens)
        ]
        identity = run_identity([ref_model, *cand_models], corpus, window_list, part_targets)
        pad_id = ref_model.tokenizer.pad_token_id
        pad_id = pad_id if pad_id is not None else 0

        if run_dir is None:
            shard.on_main(_create_run_dir, out_path, config, identity, output.overwrite)
            run_dir = RunDirectory(out_path)
            done_parts: set[int] = set()
        else:
            done_parts = shard.on_main(
                _resumable_parts, run_dir, identity, part_targets, len(cand_models), log
            )
    except KeyboardInterrupt as exc:
        raise Interrupted(
            "interrupted before any token was scored",
            "rerun the command" + (" with --resume" if resume else ""),
        ) from exc

    done_tokens = scored_now = 0
    seconds = cpu_seconds = 0.0
    padded_slots = real_slots = 0
    try:
        with GracefulStop(
            lambda name: log(
                f"{name}: finishing the current part, then stopping "
                "(press Ctrl-C again to stop at once)"
            )
        ) as stop:
            for index, batch in enumerate(
                make_batches(
                    window_list,
                    compute.batch_size,
                    pad_id,
                    max_batch_tokens=compute.max_batch_tokens,
                )
            ):
                if not shard.owns(index):
                    continue
                if index in done_parts:
                    done_tokens += batch.targets.numel()
                    continue
                t0, c0 = time.perf_counter(), time.process_time()
                per_candidate, worst = score_batch(
                    batch,
                    ref_model,
                    cand_models,
                    vocab_size,
                    chunk,
                    compute.temperature,
                    compute.worst_k,
                    kernel=kernel,
                )
                seconds += time.perf_counter() - t0
                cpu_seconds += time.process_time() - c0
                real_slots += int(batch.attention_mask.sum())
                padded_slots += batch.attention_mask.numel()
                _save_batch(run_dir, index, batch, per_candidate, worst)
                done_tokens += batch.targets.numel()
                scored_now += batch.targets.numel()
                if progress and shard.is_main:
                    progress(min(done_tokens * shard.world_size, total_targets), total_targets)
                if stop.requested and index < len(part_targets) - 1:
                    raise Interrupted(
                        f"stopped ({stop.signal_name}) after {done_tokens} of {total_targets} "
                        f"tokens; {len(run_dir.completed_indices())} completed parts are kept in "
                        f"{run_dir.path}",
                        f"continue with the same command plus --resume --out {run_dir.path}",
                    )
    except KeyboardInterrupt as exc:
        raise Interrupted(
            f"interrupted after {done_tokens} of {total_targets} tokens; "
            f"{len(run_dir.completed_indices())} completed parts are kept in {run_dir.path}",
            f"continue with the same command plus --resume --out {run_dir.path}",
        ) from exc

    totals = gather_parts(
        shard,
        run_dir,
        len(part_targets),
        {
            "seconds": seconds,
            "cpu_seconds": cpu_seconds,
            "scored_now": scored_now,
            "real_slots": real_slots,
            "padded_slots": padded_slots,
        },
    )

    def finish() -> dict[str, Any]:
        assert totals is not None
        ended = _dt.datetime.now(_dt.timezone.utc)
        results = _build_results(
            run_dir,
            config,
            ref_model,
            cand_models,
            corpus,
            window_list,
            windows,
            vocab_size,
            padded,
            chunk,
            totals["seconds"],
            int(totals["scored_now"]),
            started,
            ended,
            int(totals["real_slots"]),
            int(totals["padded_slots"]),
        )
        results["compute"]["kernel"] = kernel.backend
        results["throughput"]["processes"] = shard.world_size
        # CPU time of the scoring (all threads, all ranks): steadier than wall time on a
        # shared machine.
        results["throughput"]["cpu_seconds"] = totals["cpu_seconds"]
        results["provenance"]["resumed_parts"] = len(done_parts)
        worst_entries = _collect_worst(run_dir, window_list, ref_model.tokenizer, compute.worst_k)
        run_dir.finalize(results, worst_entries)
        return results

    results = shard.on_main(finish)
    return RunOutcome(path=run_dir.path, results=results, is_main=shard.is_main)


def run_identity(
    models: list[LoadedModel], corpus: Corpus, windows: list[Window], part_targets: list[int]
) -> dict[str, Any]:
    """What a run's numbers are computed from, beyond its options: kept to validate a resume.

    Model weights are identified by their content hash (local) or resolved revision (hub), the
    data by its fingerprint; lmkl's version is included because windowing may change with it.
    """
    identity = {
        "lmkl": lmkl.__version__,
        "models": [
            [m.label, m.description.get("weights_sha256") or m.description.get("resolved_revision")]
            for m in models
        ],
        "data_fingerprint": corpus.description.get("fingerprint"),
        "windows": len(windows),
        "tokens": sum(part_targets),
        "parts": len(part_targets),
    }
    return json.loads(json.dumps(identity))


def _open_for_resume(path: Path, config: dict[str, Any], log: LogCallback) -> RunDirectory:
    """Check that ``path`` holds an unfinished run with the same options; tidy killed writes."""
    run_dir = RunDirectory(path)
    if (path / "results.json").exists():
        raise ResumeError(f"run '{path}' is already complete", "nothing to resume")
    config_path = path / "config.yaml"
    if not config_path.exists():
        raise ResumeError(
            f"'{path}' holds no started run to resume", "drop --resume to start a new run"
        )
    import yaml

    try:
        previous = yaml.safe_load(config_path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ResumeError(
            f"cannot read '{config_path}' of the run to resume",
            "start a new run with another --out",
        ) from exc
    current = json.loads(json.dumps(config))
    if not isinstance(previous, dict) or previous != current:
        previous = previous if isinstance(previous, dict) else {}
        changed = sorted(_changed_keys(previous, current))
        raise ResumeError(
            f"cannot resume '{path}': options differ from the original run ({', '.join(changed)})",
            "resume with the original options (see its config.yaml), or start a new run with "
            "another --out",
        )
    removed = run_dir.clean_incomplete()
    if removed:
        log(f"removed {len(removed)} leftover files of an interrupted write")
    return run_dir


def _changed_keys(old: Any, new: Any, prefix: str = "") -> list[str]:
    """Dotted paths of the options that differ (``compute.batch_size``, ``candidates``...)."""
    if isinstance(old, dict) and isinstance(new, dict):
        out = []
        for key in sorted(set(old) | set(new), key=str):
            out += _changed_keys(old.get(key), new.get(key), f"{prefix}{key}.")
        return out
    return [prefix.rstrip(".")] if old != new else []


def _resumable_parts(
    run_dir: RunDirectory,
    identity: dict[str, Any],
    part_targets: list[int],
    n_candidates: int,
    log: LogCallback,
) -> set[int]:
    """The completed parts that can be kept; refuse parts computed from other inputs."""
    previous = run_dir.read_progress().get("identity")
    if previous is not None and previous != identity:
        changed = sorted(k for k in identity if previous.get(k) != identity[k])
        raise ResumeError(
            f"cannot resume '{run_dir.path}': its inputs changed since it started "
            f"({', '.join(changed)})",
            "restore the original model and data files (and lmkl version), or start a new run "
            "with another --out",
        )
    if previous is None:
        run_dir.write_progress(identity)
    done: set[int] = set()
    for index in run_dir.completed_indices():
        rows = run_dir.part_rows(index)
        if rows is None:
            log(f"part {index} is unreadable; computing it again")
            run_dir.remove_part(index)
            continue
        expected = part_targets[index] * n_candidates if index < len(part_targets) else None
        if rows != expected:
            raise ResumeError(
                f"cannot resume '{run_dir.path}': part {index} holds {rows} rows, expected "
                f"{expected}; it was computed from other inputs",
                "start a new run with another --out",
            )
        done.add(index)
    log(f"resuming: {len(done)} of {len(part_targets)} parts already complete")
    return done


def _save_batch(
    run_dir: RunDirectory,
    index: int,
    batch: Batch,
    per_candidate: dict[str, dict[str, np.ndarray]],
    worst: dict[str, list[dict[str, Any]]],
) -> None:
    # Worst rows are stored with window ids and window positions so they survive a resume.
    row_meta = batch.meta
    enriched = {
        label: [
            {
                **e,
                "window_id": int(row_meta["window_id"][e["row"]]),
                "window_pos": int(row_meta["window_pos"][e["row"]]),
                "doc_id": int(row_meta["doc_id"][e["row"]]),
                "position": int(row_meta["position"][e["row"]]),
                "token_id": int(batch.targets[e["row"]]),
            }
            for e in entries
        ]
        for label, entries in worst.items()
    }
    # The worst file goes first: a part counts as complete only once its parquet file exists.
    run_dir.write_part(index, _batch_table(batch, per_candidate, run_dir.schema), worst=enriched)


def _collect_worst(
    run_dir: RunDirectory, windows: list[Window], tokenizer: Any, k: int
) -> list[dict[str, Any]]:
    merged: dict[str, list[dict[str, Any]]] = {}
    for index in run_dir.completed_indices():
        worst_path = run_dir.worst_path(index)
        if worst_path.exists():
            for label, entries in json.loads(worst_path.read_text()).items():
                merged.setdefault(label, []).extend(entries)
    by_id = {w.window_id: w for w in windows}
    out = []
    for label, entries in merged.items():
        entries.sort(
            key=lambda e: (
                -(float("inf") if e["kl"] == "inf" else e["kl"]),
                e["window_id"],
                e["window_pos"],
            )
        )
        for e in entries[:k]:
            window = by_id[e["window_id"]]
            j = e["window_pos"]
            context_ids = window.input_ids[max(0, j - 48) : j]
            out.append(
                {
                    "candidate": label,
                    "doc_id": e["doc_id"],
                    "window_id": e["window_id"],
                    "position": e["position"],
                    "kl": e["kl"],
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
            )
    return out


def candidate_columns(table: Any, label: str) -> dict[str, np.ndarray]:
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


def _versions() -> dict[str, str]:
    import datasets
    import transformers

    return {
        "lmkl": lmkl.__version__,
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "datasets": datasets.__version__,
        "numpy": np.__version__,
        "python": platform.python_version(),
    }


def run_provenance(
    config: dict[str, Any], started: _dt.datetime, ended: _dt.datetime
) -> dict[str, Any]:
    """The ``provenance`` block of results.json: versions, times, full options, host."""
    return {
        "versions": _versions(),
        "started": started.isoformat(),
        "ended": ended.isoformat(),
        "options": config,
        "host": platform.node(),
    }


def _build_results(
    run_dir: RunDirectory,
    config: dict[str, Any],
    reference: LoadedModel,
    candidates: list[LoadedModel],
    corpus: Corpus,
    windows: list[Window],
    window_spec: WindowSpec,
    vocab_size: int,
    padded: bool,
    chunk: int,
    seconds: float,
    scored_now: int,
    started: _dt.datetime,
    ended: _dt.datetime,
    real_slots: int,
    padded_slots: int,
) -> dict[str, Any]:
    table = run_dir.read_parts()
    entries = []
    for cand in candidates:
        columns = candidate_columns(table, cand.label)
        entries.append(
            {"label": cand.label, "model": cand.description, "metrics": summarize(columns)}
        )
    scored = sum(w.num_targets for w in windows)
    return {
        "schema_version": 1,
        "reference": reference.description,
        "candidates": entries,
        "data": corpus.description | {"windows": len(windows), "scored_tokens": scored},
        "windowing": {
            "mode": window_spec.windowing,
            "context_length": window_spec.context_length,
            "stride": window_spec.effective_stride
            if window_spec.windowing == "documents"
            else None,
            "adds_bos": tokenizer_adds_bos(reference.tokenizer),
            "vocab_size": vocab_size,
            "padded_vocab": padded,
            "vocab_note": (
                f"output layers wider than the tokenizer; logits sliced to its {vocab_size} "
                "tokens before the softmax"
                if padded
                else None
            ),
        },
        "compute": config["compute"] | {"chunk_tokens": chunk},
        "provenance": run_provenance(config, started, ended),
        "throughput": {
            # Timed over scoring only (model loading and file writing excluded).
            "seconds": seconds,
            "tokens_per_s": scored_now / seconds if seconds > 0 else None,
            "candidate_tokens_per_s": scored_now * len(candidates) / seconds
            if seconds > 0
            else None,
            "padding_efficiency": real_slots / padded_slots if padded_slots else None,
        },
    }
