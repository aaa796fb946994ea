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
from lmkl.config import ComputeSpec, DataSpec, ModelSpec, OutputSpec, WindowSpec
from lmkl.data import Corpus, Window, load_corpus, make_windows
from lmkl.divergence import TOKEN_METRIC_NAMES, token_metrics
from lmkl.errors import Interrupted, ResumeError, UsageError
from lmkl.interrupt import GracefulStop
from lmkl.models import (
    LoadedModel,
    check_tokenizers_match,
    load_model,
    load_tokenizer,
    resolve_device,
    shared_vocab_size,
    tokenizer_adds_bos,
)
from lmkl.stats import summarize
from lmkl.store import RunDirectory, tokens_table

ProgressCallback = Callable[[int, int], None]
LogCallback = Callable[[str], None]


@dataclass
class RunOutcome:
    """What a finished run produced."""

    path: Path
    results: dict[str, Any]


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


def make_batches(windows: list[Window], batch_size: int, pad_id: int) -> Iterator[Batch]:
    """Group consecutive windows, right-pad them and index their scored positions.

    Right padding keeps every real token's position id and causal context unchanged.
    """
    for start in range(0, len(windows), batch_size):
        group = windows[start:start + batch_size]
        width = max(len(w.input_ids) for w in group)
        ids = torch.full((len(group), width), pad_id, dtype=torch.long)
        mask = torch.zeros((len(group), width), dtype=torch.long)
        rows, cols, targets = [], [], []
        meta: dict[str, list[Any]] = {k: [] for k in
                                      ("window_id", "doc_id", "position", "window_pos", "bytes")}
        for r, window in enumerate(group):
            n = len(window.input_ids)
            ids[r, :n] = torch.tensor(window.input_ids, dtype=torch.long)
            mask[r, :n] = 1
            js: range | list[int] = range(window.first_target, n)
            target_bytes = window.target_bytes
            if window.score_mask is not None:  # chat data: only the assistant targets
                js = [j for j, keep in zip(js, window.score_mask, strict=True) if keep]
                target_bytes = [b for b, keep in zip(target_bytes, window.score_mask,
                                                     strict=True) if keep]
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


class WorstTracker:
    """Keeps the ``k`` highest-KL positions of one batch with both models' top-5 next tokens."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.entries: list[tuple[float, int, dict[str, Any]]] = []
        self._counter = 0

    def offer(
        self, kl: torch.Tensor, ref_logits: torch.Tensor, cand_logits: torch.Tensor,
        index_offset: int, temperature: float,
    ) -> None:
        if self.k == 0:
            return
        finite_kl = torch.nan_to_num(kl, nan=-1.0)
        take = min(self.k, kl.numel())
        values, idx = finite_kl.topk(take)
        keep = values >= 0
        values, idx = values[keep], idx[keep]
        if idx.numel() == 0:
            return
        lp = torch.log_softmax(ref_logits[idx].float() / temperature, -1)
        lq = torch.log_softmax(cand_logits[idx].float() / temperature, -1)
        k5 = min(5, lp.shape[-1])
        p_top, q_top = lp.topk(k5, -1), lq.topk(k5, -1)
        for n, (value, i) in enumerate(zip(values.tolist(), idx.tolist(), strict=True)):
            entry = {
                "row": index_offset + i,
                "kl": value,
                "reference_top5": list(zip(p_top.indices[n].tolist(),
                                           p_top.values[n].exp().tolist(), strict=True)),
                "candidate_top5": list(zip(q_top.indices[n].tolist(),
                                           q_top.values[n].exp().tolist(), strict=True)),
            }
            self._counter += 1
            item = (value, -self._counter, entry)
            if len(self.entries) < self.k:
                heapq.heappush(self.entries, item)
            elif item > self.entries[0]:
                heapq.heapreplace(self.entries, item)

    def result(self) -> list[dict[str, Any]]:
        return [e for _, _, e in sorted(self.entries, key=lambda t: (-t[0], -t[1]))]


@torch.inference_mode()
def score_batch(
    batch: Batch,
    reference: LoadedModel,
    candidates: list[LoadedModel],
    vocab_size: int,
    chunk_size: int,
    temperature: float,
    worst_k: int,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, list[dict[str, Any]]]]:
    """Per-token metrics for every candidate on one batch, and each candidate's worst positions."""
    device = reference.device
    ref_hidden = reference.hidden_states(batch.input_ids.to(device),
                                         batch.attention_mask.to(device))
    ref_rows = ref_hidden[batch.rows.to(device), batch.cols.to(device)]
    del ref_hidden
    targets = batch.targets
    per_candidate: dict[str, dict[str, np.ndarray]] = {}
    worst: dict[str, list[dict[str, Any]]] = {}
    for candidate in candidates:
        cdev = candidate.device
        cand_hidden = candidate.hidden_states(batch.input_ids.to(cdev),
                                              batch.attention_mask.to(cdev))
        cand_rows = cand_hidden[batch.rows.to(cdev), batch.cols.to(cdev)]
        del cand_hidden
        tracker = WorstTracker(worst_k)
        chunks: list[dict[str, torch.Tensor]] = []
        for start in range(0, targets.numel(), chunk_size):
            stop = start + chunk_size
            ref_logits = reference.logits(ref_rows[start:stop])[..., :vocab_size]
            cand_logits = candidate.logits(cand_rows[start:stop])[..., :vocab_size]
            cand_logits = cand_logits.to(ref_logits.device)
            ref_logits, cand_logits = _overflow_as_nan(ref_logits), _overflow_as_nan(cand_logits)
            metrics = token_metrics(ref_logits, cand_logits, targets[start:stop],
                                    temperature=temperature)
            tracker.offer(metrics["kl"], ref_logits, cand_logits, start, temperature)
            chunks.append({k: v.cpu() for k, v in metrics.items()})
        per_candidate[candidate.label] = {
            name: torch.cat([c[name] for c in chunks]).numpy() for name in chunks[0]
        }
        worst[candidate.label] = tracker.result()
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


def _batch_table(batch: Batch, per_candidate: dict[str, dict[str, np.ndarray]]) -> Any:
    import pyarrow as pa

    tables = []
    n = batch.targets.numel()
    for label, metrics in per_candidate.items():
        columns: dict[str, Any] = {
            "candidate": [label] * n,
            "token_id": batch.targets.numpy(),
            "nonfinite": metrics["nonfinite"],
            **batch.meta,
        }
        columns.update({name: metrics[name] for name in TOKEN_METRIC_NAMES})
        tables.append(tokens_table(columns))
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
    reference: ModelSpec, candidates: list[ModelSpec], data: DataSpec, windows: WindowSpec,
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
    reference_spec: ModelSpec, candidate_specs: list[ModelSpec], log: LogCallback,
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


def run_comparison(
    reference: ModelSpec,
    candidates: list[ModelSpec],
    data: DataSpec,
    windows: WindowSpec,
    compute: ComputeSpec,
    output: OutputSpec,
    *,
    resume: bool = False,
    progress: ProgressCallback | None = None,
    log: LogCallback | None = None,
    models: tuple[LoadedModel, list[LoadedModel]] | None = None,
) -> RunOutcome:
    """Compare ``candidates`` with ``reference`` on ``data`` and write a run directory.

    Returns the run directory and its results (also in ``results.json``). Raises
    :class:`lmkl.errors.LmklError` subclasses for anything the user can fix. ``models``: the
    reference and candidates already loaded from these specs (an experiment loads them once
    for all its datasets); None loads them here.
    """
    log = log or (lambda _msg: None)
    if not candidates:
        raise UsageError("no candidate model given", "name at least one candidate")
    if resume and output.overwrite:
        raise UsageError("--resume and --overwrite contradict each other",
                         "pass --resume to continue the run, or --overwrite to replace it")
    if resume and not output.dir:
        raise UsageError("--resume needs the run directory to continue",
                         "pass --resume --out DIR with the directory of the interrupted run")
    candidates = _unique_labels(candidates)
    config = resolved_config(reference, candidates, data, windows, compute)
    out_path = Path(output.dir) if output.dir else default_run_dir(reference, candidates)
    # Check the output before loading models (which can take minutes), but create the directory
    # only once models and data are known to be usable, so a typo leaves nothing behind.
    run_dir: RunDirectory | None = None
    if resume:
        run_dir = _open_for_resume(out_path, config, log)
    else:
        RunDirectory.check_new(out_path, overwrite=output.overwrite)

    started = _dt.datetime.now(_dt.timezone.utc)
    torch.manual_seed(compute.seed)
    try:
        # Data first: a wrong path should not wait for a large model to load.
        log(f"reading data {data.source}")
        corpus = load_corpus(data)
        ref_model, cand_models = models or load_models(reference, candidates, log)
        check_context_length([ref_model, *cand_models], windows)
        vocab_size, padded = shared_vocab_size([ref_model, *cand_models])
        chunk = compute.chunk_size(vocab_size)

        window_list = make_windows(corpus, ref_model.tokenizer, windows,
                                   tokenizer_adds_bos(ref_model.tokenizer), compute.max_tokens)
        total_targets = sum(w.num_targets for w in window_list)
        part_targets = [sum(w.num_targets for w in window_list[i:i + compute.batch_size])
                        for i in range(0, len(window_list), compute.batch_size)]
        identity = run_identity([ref_model, *cand_models], corpus, window_list, part_targets)
        pad_id = ref_model.tokenizer.pad_token_id
        pad_id = pad_id if pad_id is not None else 0

        if run_dir is None:
            run_dir = RunDirectory.create(out_path, overwrite=output.overwrite)
            run_dir.write_config(config)
            run_dir.write_progress(identity)
            done_parts: set[int] = set()
        else:
            done_parts = _resumable_parts(run_dir, identity, part_targets, len(cand_models), log)
    except KeyboardInterrupt as exc:
        raise Interrupted("interrupted before any token was scored",
                          "rerun the command" + (" with --resume" if resume else "")) from exc

    done_tokens = scored_now = 0
    seconds = 0.0
    padded_slots = real_slots = 0
    try:
        with GracefulStop(lambda name: log(f"{name}: finishing the current part, then stopping "
                                           "(press Ctrl-C again to stop at once)")) as stop:
            for index, batch in enumerate(make_batches(window_list, compute.batch_size, pad_id)):
                if index in done_parts:
                    done_tokens += batch.targets.numel()
                    continue
                t0 = time.perf_counter()
                per_candidate, worst = score_batch(batch, ref_model, cand_models, vocab_size,
                                                   chunk, compute.temperature, compute.worst_k)
                seconds += time.perf_counter() - t0
                real_slots += int(batch.attention_mask.sum())
                padded_slots += batch.attention_mask.numel()
                _save_batch(run_dir, index, batch, per_candidate, worst)
                done_tokens += batch.targets.numel()
                scored_now += batch.targets.numel()
                if progress:
                    progress(done_tokens, total_targets)
                if stop.requested and done_tokens < total_targets:
                    raise Interrupted(
                        f"stopped ({stop.signal_name}) after {done_tokens} of {total_targets} "
                        f"tokens; {len(run_dir.completed_indices())} completed parts are kept in "
                        f"{run_dir.path}",
                        f"continue with the same command plus --resume --out {run_dir.path}",
                    )

            ended = _dt.datetime.now(_dt.timezone.utc)
            results = _build_results(
                run_dir, config, ref_model, cand_models, corpus, window_list, windows, vocab_size,
                padded, chunk, seconds, scored_now, started, ended, real_slots, padded_slots,
            )
            results["provenance"]["resumed_parts"] = len(done_parts)
            worst_entries = _collect_worst(run_dir, window_list, ref_model.tokenizer,
                                           compute.worst_k)
            run_dir.finalize(results, worst_entries)
    except KeyboardInterrupt as exc:
        raise Interrupted(
            f"interrupted after {done_tokens} of {total_targets} tokens; "
            f"{len(run_dir.completed_indices())} completed parts are kept in {run_dir.path}",
            f"continue with the same command plus --resume --out {run_dir.path}",
        ) from exc
    return RunOutcome(path=run_dir.path, results=results)


def run_identity(models: list[LoadedModel], corpus: Corpus, windows: list[Window],
                 part_targets: list[int]) -> dict[str, Any]:
    """What a run's numbers are computed from, beyond its options: kept to validate a resume.

    Model weights are identified by their content hash (local) or resolved revision (hub), the
    data by its fingerprint; lmkl's version is included because windowing may change with it.
    """
    identity = {
        "lmkl": lmkl.__version__,
        "models": [[m.label, m.description.get("weights_sha256")
                    or m.description.get("resolved_revision")] for m in models],
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
        raise ResumeError(f"'{path}' holds no started run to resume",
                          "drop --resume to start a new run")
    import yaml

    try:
        previous = yaml.safe_load(config_path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ResumeError(f"cannot read '{config_path}' of the run to resume",
                          "start a new run with another --out") from exc
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


def _resumable_parts(run_dir: RunDirectory, identity: dict[str, Any], part_targets: list[int],
                     n_candidates: int, log: LogCallback) -> set[int]:
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


def _save_batch(run_dir: RunDirectory, index: int, batch: Batch,
                per_candidate: dict[str, dict[str, np.ndarray]],
                worst: dict[str, list[dict[str, Any]]]) -> None:
    # Worst rows are stored with window ids and window positions so they survive a resume.
    row_meta = batch.meta
    enriched = {
        label: [
            {**e, "window_id": int(row_meta["window_id"][e["row"]]),
             "window_pos": int(row_meta["window_pos"][e["row"]]),
             "doc_id": int(row_meta["doc_id"][e["row"]]),
             "position": int(row_meta["position"][e["row"]]),
             "token_id": int(batch.targets[e["row"]])}
            for e in entries
        ]
        for label, entries in worst.items()
    }
    # The worst file goes first: a part counts as complete only once its parquet file exists.
    run_dir.write_part(index, _batch_table(batch, per_candidate), worst=enriched)


def _collect_worst(run_dir: RunDirectory, windows: list[Window], tokenizer: Any,
                   k: int) -> list[dict[str, Any]]:
    merged: dict[str, list[dict[str, Any]]] = {}
    for index in run_dir.completed_indices():
        worst_path = run_dir.worst_path(index)
        if worst_path.exists():
            for label, entries in json.loads(worst_path.read_text()).items():
                merged.setdefault(label, []).extend(entries)
    by_id = {w.window_id: w for w in windows}
    out = []
    for label, entries in merged.items():
        entries.sort(key=lambda e: (-(float("inf") if e["kl"] == "inf" else e["kl"]),
                                    e["window_id"], e["window_pos"]))
        for e in entries[:k]:
            window = by_id[e["window_id"]]
            j = e["window_pos"]
            context_ids = window.input_ids[max(0, j - 48):j]
            out.append({
                "candidate": label,
                "doc_id": e["doc_id"],
                "window_id": e["window_id"],
                "position": e["position"],
                "kl": e["kl"],
                "token_id": e["token_id"],
                "token": tokenizer.decode([e["token_id"]]),
                "context": tokenizer.decode(context_ids, skip_special_tokens=True),
                "reference_top5": [{"token_id": i, "token": tokenizer.decode([i]), "prob": p}
                                   for i, p in e["reference_top5"]],
                "candidate_top5": [{"token_id": i, "token": tokenizer.decode([i]), "prob": p}
                                   for i, p in e["candidate_top5"]],
            })
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


def _build_results(
    run_dir: RunDirectory, config: dict[str, Any], reference: LoadedModel,
    candidates: list[LoadedModel], corpus: Corpus, windows: list[Window], window_spec: WindowSpec,
    vocab_size: int, padded: bool, chunk: int, seconds: float, scored_now: int,
    started: _dt.datetime,
    ended: _dt.datetime, real_slots: int, padded_slots: int,
) -> dict[str, Any]:
    table = run_dir.read_parts()
    entries = []
    for cand in candidates:
        columns = candidate_columns(table, cand.label)
        entries.append({"label": cand.label, "model": cand.description,
                        "metrics": summarize(columns)})
    scored = sum(w.num_targets for w in windows)
    return {
        "schema_version": 1,
        "reference": reference.description,
        "candidates": entries,
        "data": corpus.description | {"windows": len(windows), "scored_tokens": scored},
        "windowing": {
            "mode": window_spec.windowing,
            "context_length": window_spec.context_length,
            "stride": window_spec.effective_stride if window_spec.windowing == "documents"
            else None,
            "adds_bos": tokenizer_adds_bos(reference.tokenizer),
            "vocab_size": vocab_size,
            "padded_vocab": padded,
            "vocab_note": (
                f"output layers wider than the tokenizer; logits sliced to its {vocab_size} "
                "tokens before the softmax" if padded else None
            ),
        },
        "compute": config["compute"] | {"chunk_tokens": chunk},
        "provenance": {
            "versions": _versions(),
            "started": started.isoformat(),
            "ended": ended.isoformat(),
            "options": config,
            "host": platform.node(),
        },
        "throughput": {
            # Timed over scoring only (model loading and file writing excluded).
            "seconds": seconds,
            "tokens_per_s": scored_now / seconds if seconds > 0 else None,
            "candidate_tokens_per_s": scored_now * len(candidates) / seconds if seconds > 0
            else None,
            "padding_efficiency": real_slots / padded_slots if padded_slots else None,
        },
    }
