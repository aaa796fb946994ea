"""Execute an :class:`~.schema.ExperimentConfig`: every dataset, every candidate, ranked.

The models are loaded **once** and reused for every dataset. Each dataset is a sub-run: a
:class:`~lmkl.engine.token_compare.TokenComparison` executed by the engine, which runs the
reference once per batch and shares its hidden states with every candidate, so all candidates
are scored on identical tokens. The run directory (a contract, see README "YAML experiments →
run directory")::

    RUN_DIR/
      config.yaml               the resolved experiment config (command line > YAML > defaults)
      results.json             combined results: candidates' metrics over all tokens (micro),
                               macro averages, per-dataset summaries, ranking, gates, noise floor
      datasets/<dataset>/      one core run directory per dataset (results.json, tokens.parquet,
                               config.yaml, worst.json), exactly as ``lmkl compare`` writes them;
                               the noise floor, when enabled, is one more candidate there

Usage::

    from lmkl.experiment.schema import load_config
    from lmkl.experiment.run import run_experiment
    outcome = run_experiment(load_config("configs/precision.yaml"))
    print(outcome.results["ranking"]["leaderboard"][0]["label"])
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import platform
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from lmkl.analysis.metrics import macro_paths, rank_metrics
from lmkl.errors import ConfigError, Interrupted, ResumeError, UsageError
from lmkl.experiment.schema import (
    NOISE_FLOOR_LABEL,
    ExperimentConfig,
    NoiseFloorSpec,
    dataset_dir_name,
)
from lmkl.specs import ComputeSpec, ModelSpec, OutputSpec

if TYPE_CHECKING:
    from lmkl.engine.distributed import Shard

LogCallback = Callable[[str], None]
#: ``(dataset label, tokens done, tokens total)``
ProgressCallback = Callable[[str, int, int], None]


@dataclass
class ExperimentOutcome:
    """What a finished experiment produced."""

    path: Path
    results: dict[str, Any]
    config: ExperimentConfig
    #: False on the other ranks of a multi-process run (only rank 0 reports).
    is_main: bool = True


# --------------------------------------------------------------------------------------------
# demo: names, noise floor
# --------------------------------------------------------------------------------------------


def resolve_demo_values(
    config: ExperimentConfig, log: LogCallback | None = None
) -> ExperimentConfig:
    """Replace ``demo:reference``-style values by paths in the demo cache (built on first use).

    Models and datasets named ``demo:NAME`` without a label get NAME as their label, so names
    and directories do not depend on where the cache lives.
    """
    from lmkl.demo.names import is_demo_value, resolve_demo_value

    values = [
        config.reference.model,
        *(c.model for c in config.candidates),
        *(d.source for d in config.datasets),
    ]
    if not any(is_demo_value(v) for v in values):
        return config
    problems = []

    def resolve(value: str, where: str) -> str:
        try:
            return resolve_demo_value(value, progress=log)
        except ValueError as exc:
            problems.append(f"{where}: {exc}")
            return value

    update: dict[str, Any] = {
        "reference": config.reference.model_copy(
            update={
                "model": resolve(config.reference.model, "reference.model"),
                "label": config.reference.label or demo_label(config.reference.model),
            }
        ),
        "candidates": [
            c.model_copy(update={"model": resolve(c.model, f"candidates.{i}.model")})
            for i, c in enumerate(config.candidates)
        ],
        "datasets": [
            d.model_copy(
                update={
                    "source": resolve(d.source, f"datasets.{i}.source"),
                    "label": d.label or demo_label(d.source),
                }
            )
            for i, d in enumerate(config.datasets)
        ],
    }
    if problems:
        raise ConfigError(
            "unknown demo names",
            "use demo:reference, demo:candidate or demo:heldout",
            problems=problems,
        )
    return config.model_copy(update=update)


def demo_label(value: str) -> str | None:
    """``demo:heldout`` → ``heldout``; None for other values (their default label stays)."""
    from lmkl.demo.names import DEMO_SCHEME

    return value.removeprefix(DEMO_SCHEME) if value.startswith(DEMO_SCHEME) else None


def perturb_weights(model: Any, relative_std: float, seed: int) -> None:
    """Multiply every floating parameter by ``1 + relative_std · z``, ``z ~ N(0, 1)`` (seeded).

    ``z`` is drawn in float32 on the CPU from ``torch.Generator().manual_seed(seed)``,
    parameter by parameter in ``named_parameters()`` order (tied weights once); the product is
    computed in float32 and rounded to the parameter's dtype.
    """
    import torch

    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _name, param in model.named_parameters():
            if not param.dtype.is_floating_point:
                continue
            z = torch.randn(param.shape, generator=gen, dtype=torch.float32)
            noisy = param.detach().float() * (1.0 + relative_std * z.to(param.device))
            param.copy_(noisy.to(param.dtype))


def load_noise_floor(reference: ModelSpec, spec: NoiseFloorSpec, seed: int) -> Any:
    """A second copy of the reference with seeded weight noise, labelled ``noise-floor``."""
    from lmkl.models import load_model, resolve_device

    nf_spec = noise_floor_spec(reference)
    loaded = load_model(nf_spec, resolve_device(nf_spec.device))
    perturb_weights(loaded.model, spec.relative_std, seed)
    loaded.description = loaded.description | {"noise_floor": noise_floor_method(spec, seed)}
    return loaded


def noise_floor_spec(reference: ModelSpec) -> ModelSpec:
    return reference.model_copy(
        update={"label": NOISE_FLOOR_LABEL, "group": None, "step": None, "params": None}
    )


def noise_floor_method(spec: NoiseFloorSpec, seed: int) -> dict[str, Any]:
    return {
        "method": "reference weights w → w·(1 + relative_std·z), z ~ N(0,1) in float32 from "
        "torch.Generator().manual_seed(seed), per parameter in named_parameters order",
        "relative_std": spec.relative_std,
        "seed": seed,
    }


# --------------------------------------------------------------------------------------------
# Dry run / model checks
# --------------------------------------------------------------------------------------------


def weights_form(spec: ModelSpec) -> str:
    """How a model's weights are made, for the plan: ``method:scheme[:gN]`` when quantized on
    load, ``recipe:FILE``, ``gguf:FILE``, ``adapter:PATH``; ``–`` for the weights as stored.
    Candidates of one model differ only here, so the plan must show it."""
    parts = []
    if spec.recipe:
        parts.append(f"recipe:{spec.recipe}")
    elif spec.quantize:
        q = spec.quantize
        parts.append(f"{q.method}:{q.scheme}" + (f":g{q.group_size}" if q.group_size else ""))
    if spec.gguf_file and not spec.recipe:
        parts.append(f"gguf:{spec.gguf_file}")
    if spec.adapter and not spec.recipe:
        parts.append(f"adapter:{spec.adapter}")
    return " + ".join(parts) or "–"


def check_models(config: ExperimentConfig, log: LogCallback | None = None) -> list[dict[str, Any]]:
    """Load every tokenizer and model config (no weights); check tokenizers and context length.

    Returns one row per model for the plan. Raises the core's one-line errors on a mismatch.
    """
    from lmkl.models import check_tokenizers_match, load_tokenizer, max_positions
    from lmkl.models import model_config as load_model_config

    log = log or (lambda _m: None)
    rows = []
    ref_tok = None
    specs: list[ModelSpec] = [config.reference, *config.candidates]
    for i, spec in enumerate(specs):
        log(f"loading tokenizer and config of {spec.model}")
        tokenizer = load_tokenizer(spec)
        if ref_tok is None:
            ref_tok = tokenizer
        else:
            check_tokenizers_match(
                ref_tok, tokenizer, (config.reference.display_name, spec.display_name)
            )
        model_config = load_model_config(spec)
        limit = max_positions(model_config) if model_config is not None else None
        if limit is not None and config.windowing.context_length > limit:
            raise UsageError(
                f"context length {config.windowing.context_length} exceeds {spec.display_name}'s"
                f" maximum of {limit} positions",
                f"set windowing.context_length={limit} or less",
            )
        rows.append(
            {
                "role": "reference" if i == 0 else "candidate",
                "label": spec.display_name,
                "model": spec.model,
                "revision": spec.revision,
                "dtype": spec.dtype,
                "device": spec.device,
                "group": spec.group,
                "step": spec.step,
                "params": spec.params,
                "weights": weights_form(spec),
                "architecture": (model_config.architectures or [type(model_config).__name__])[0]
                if model_config is not None
                else None,
                "max_positions": limit,
                "tokenizer_size": len(tokenizer),
            }
        )
    return rows


def plan_experiment(config: ExperimentConfig, log: LogCallback | None = None) -> dict[str, Any]:
    """What ``lmkl run --dry-run`` prints: models (tokenizers checked), datasets and the tokens
    each will score with the reference tokenizer. Loads no weights."""
    from lmkl.data.corpus import load_corpus
    from lmkl.data.windows import make_windows
    from lmkl.models import load_tokenizer, tokenizer_adds_bos

    log = log or (lambda _m: None)
    models = check_models(config, log)
    tokenizer = load_tokenizer(config.reference)
    adds_bos = tokenizer_adds_bos(tokenizer)
    datasets = []
    windows_spec = config.windows()
    for spec in config.datasets:
        log(f"reading data {spec.source}")
        corpus = load_corpus(spec)
        windows = make_windows(corpus, tokenizer, windows_spec, adds_bos, config.compute.max_tokens)
        datasets.append(
            {
                "label": spec.display_name,
                "dir": f"datasets/{dataset_dir_name(spec)}",
                "source": spec.source,
                "weight": spec.weight,
                "documents": len({w.doc_id for w in windows}),
                "windows": len(windows),
                "tokens": sum(w.num_targets for w in windows),
                "batches": math.ceil(len(windows) / config.compute.batch_size),
            }
        )
    n_cands = len(config.candidates) + (1 if config.noise_floor.enabled else 0)
    return {
        "name": config.name,
        "models": models,
        "noise_floor": config.noise_floor.enabled,
        "datasets": datasets,
        "total_tokens": sum(d["tokens"] for d in datasets),
        "reference_batches": sum(d["batches"] for d in datasets),
        "candidate_token_evaluations": sum(d["tokens"] for d in datasets) * n_cands,
        "output": config.output.dir,
    }


# --------------------------------------------------------------------------------------------
# Run
# --------------------------------------------------------------------------------------------


def default_run_dir(config: ExperimentConfig) -> Path:
    import re

    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", config.name).strip("-.") or "experiment"
    return Path("runs") / f"{name}-{stamp}"


def _comparable(config_dump: dict[str, Any]) -> dict[str, Any]:
    """A config without its output location (what must match for --resume)."""
    out = dict(config_dump)
    out["output"] = {
        k: v for k, v in (out.get("output") or {}).items() if k not in ("dir", "overwrite")
    }
    return out


def _check_root(path: Path, config: ExperimentConfig, resume: bool) -> None:
    """Check the experiment's directory (new, or the one to resume); change nothing."""
    from lmkl.engine.loop import read_run_config
    from lmkl.engine.rundir import RunDirectory

    if not resume:
        RunDirectory.check_new(path, overwrite=config.output.overwrite)
        return
    if (path / "results.json").exists() and (path / "config.yaml").exists():
        raise ResumeError(f"experiment '{path}' is already complete", "nothing to resume")
    config_path = path / "config.yaml"
    if not config_path.exists():
        raise ResumeError(
            f"'{path}' holds no started experiment to resume", "drop --resume to start a new run"
        )
    previous = read_run_config(path, "experiment")
    dump = json.loads(config.model_dump_json())
    if _comparable(previous) != _comparable(dump):
        changed = sorted(k for k in dump if previous.get(k) != dump[k] and k != "output")
        raise ResumeError(
            f"cannot resume '{path}': the config differs from the original run "
            f"({', '.join(changed) or 'output'})",
            "resume with the original config, or start a new run with another --out",
        )


def _lock_if_exists(lock: Any) -> None:
    """Take the experiment directory's lock (rank 0) if the directory exists already."""
    if lock is not None and lock.directory.is_dir():
        lock.acquire()


def _create_root(path: Path, config: ExperimentConfig, lock: Any = None) -> None:
    from lmkl.engine.rundir import RunDirectory, make_output_dir

    if lock is not None and not lock.held:
        # A new directory: created (checked again, the models are loaded now) and locked
        # before anything is written in it.
        RunDirectory.check_new(path, overwrite=config.output.overwrite)
        make_output_dir(path)
        lock.acquire()
    run_dir = RunDirectory.create(path, overwrite=config.output.overwrite, kind="experiment")
    run_dir.write_config(json.loads(config.model_dump_json()))


def run_experiment(
    config: ExperimentConfig,
    *,
    resume: bool = False,
    progress: ProgressCallback | None = None,
    log: LogCallback | None = None,
) -> ExperimentOutcome:
    """Run every dataset (models loaded once), then combine, rank and gate; write RUN_DIR.

    Gates are evaluated and recorded in results.json but not raised here: the caller decides
    (the CLI raises :class:`lmkl.errors.GateFailure` after printing).

    Under ``torchrun``/``accelerate launch`` every rank loads the models (on its own device) and
    each dataset's batches are shared out over the ranks as in ``lmkl compare``; rank 0 alone
    creates the directory, writes the shared files and combines the datasets, and every rank
    returns its results (``is_main`` is False on the others).
    """
    from lmkl.engine.distributed import init_shard

    log = log or (lambda _m: None)
    config = resolve_demo_values(config, log)
    # One process group for the whole experiment: each dataset's run joins it (a group torn down
    # and set up again between datasets would need a new rendezvous).
    shard = init_shard()
    lock = None
    done = False
    try:
        # Rank 0's directory name (a default one carries the time, which may differ by rank).
        root = shard.broadcast(
            Path(config.output.dir) if config.output.dir else default_run_dir(config)
        )
        if shard.is_main:
            # The experiment's directory is locked like a run's (each dataset's sub-run has its
            # own): a second `lmkl run` on it is refused up front, before any model loads.
            from lmkl.files import DirectoryLock

            lock = DirectoryLock(root, "experiment directory")
        outcome = _run_experiment(config, shard, root, lock, resume, progress, log)
        done = True
        return outcome
    finally:
        if lock is not None:
            lock.release(restore=not done)  # a refused run leaves a stale lock as it was
        shard.close()


def _run_experiment(
    config: ExperimentConfig,
    shard: Shard,
    root: Path,
    lock: Any,
    resume: bool,
    progress: ProgressCallback | None,
    log: LogCallback,
) -> ExperimentOutcome:
    from lmkl.data.corpus import load_corpus
    from lmkl.engine.common import load_models
    from lmkl.engine.distributed import device_for_rank
    from lmkl.engine.loop import execute
    from lmkl.engine.token_compare import TokenComparison
    from lmkl.models import check_context_length

    shard.on_main(_check_root, root, config, resume)
    shard.on_main(_lock_if_exists, lock)
    started = _dt.datetime.now(_dt.timezone.utc)

    def on_rank(spec: ModelSpec) -> ModelSpec:
        """The spec this rank loads: one GPU per local rank (the options keep the original)."""
        return spec.model_copy(update={"device": device_for_rank(spec.device, shard)})

    specs = [*config.candidates]
    nf_spec = noise_floor_spec(config.reference) if config.noise_floor.enabled else None
    run_specs = [*specs, nf_spec] if nf_spec else specs
    windows = config.windows()
    compute: ComputeSpec = config.compute
    models = None
    from lmkl.refcache.format import is_cache_dir

    # A reference cache holds its own tokens and hidden states: the runner loads only the
    # candidates then, one dataset at a time (the cache refuses data that differs from its own).
    cached_reference = is_cache_dir(config.reference.model)
    if cached_reference and config.noise_floor.enabled:
        raise ConfigError(
            "noise_floor needs the live reference model, not a reference cache",
            "set noise_floor: false, or give reference.model instead of reference.cache",
        )
    # Everything is checked before the directory is created (or an old one replaced): every
    # dataset reads (the cache checks its own against each), and the models load (once, for all
    # datasets). The comparisons built here are the ones that run.
    if cached_reference:
        comparisons = [
            TokenComparison(config.reference, list(run_specs), data, windows, compute)
            for data in config.datasets
        ]
    else:
        corpora = []
        for data in config.datasets:
            log(f"reading data {data.source}")
            corpora.append(load_corpus(data))
        models = load_models(on_rank(config.reference), [on_rank(s) for s in specs], log)
        if config.noise_floor.enabled:
            log("loading the noise-floor copy of the reference")
            models[1].append(
                load_noise_floor(on_rank(config.reference), config.noise_floor, config.seed)
            )
        check_context_length([models[0], *models[1]], windows)
        comparisons = [
            TokenComparison(
                config.reference, list(run_specs), data, windows, compute, models=models, corpus=c
            )
            for data, c in zip(config.datasets, corpora, strict=True)
        ]
        del corpora  # each comparison holds its corpus until it has made its windows
    if not resume:
        shard.on_main(_create_root, root, config, lock)
    sub_results: list[dict[str, Any]] = []
    for data, comparison in zip(config.datasets, comparisons, strict=True):
        name = dataset_dir_name(data)
        sub = root / "datasets" / name
        # Decided by rank 0, which holds the directory (other ranks may not see it).
        started_before = shard.on_main(lambda sub=sub: (sub / "config.yaml").exists())
        try:
            outcome = execute(
                comparison,
                OutputSpec(dir=str(sub), overwrite=False),
                resume=resume and started_before,
                # A finished dataset is reused only after its identity is checked.
                reuse_finished=True,
                progress=(lambda done, total, _n=data.display_name: progress(_n, done, total))
                if progress
                else None,
                log=log,
            )
        except Interrupted as exc:  # the hint must name the experiment, not the sub-run
            raise Interrupted(
                f"{name}: {exc.message}",
                f"continue with the same command plus --resume --out {root}",
            ) from exc
        sub_results.append(outcome.results)
    ended = _dt.datetime.now(_dt.timezone.utc)

    if shard.is_main:
        log("ranking candidates")
    results = shard.on_main(
        lambda: _write_results(root, config, combine(root, config, sub_results, started, ended))
    )
    shard.barrier()  # no rank tears the process group down while another still reads
    return ExperimentOutcome(path=root, results=results, config=config, is_main=shard.is_main)


def _write_results(root: Path, config: ExperimentConfig, results: dict[str, Any]) -> dict[str, Any]:
    """Write the combined ``results`` as the experiment's results.json (rank 0 only)."""
    from lmkl.files import write_json

    write_json(root / "results.json", results)
    if not config.output.save_tokens:
        for data in config.datasets:
            (root / "datasets" / dataset_dir_name(data) / "tokens.parquet").unlink(missing_ok=True)
    return results


# --------------------------------------------------------------------------------------------
# Combine datasets, rank, gate
# --------------------------------------------------------------------------------------------

_KEY_COLUMNS = ("window_id", "window_pos")


def _candidate_tokens(sub: Path, label: str) -> dict[str, np.ndarray]:
    """One candidate's per-token columns of a sub-run, sorted by (window, position)."""
    import pyarrow.parquet as pq

    from lmkl.engine.common import candidate_columns

    table = pq.read_table(sub / "tokens.parquet", filters=[("candidate", "==", label)])
    columns = candidate_columns(table, label)
    order = np.lexsort((columns["window_pos"], columns["window_id"]))
    return {k: v[order] for k, v in columns.items()}


def _size(entry: dict[str, Any], spec: ModelSpec | None) -> dict[str, Any]:
    from lmkl.analysis.ranking import candidate_sizes

    return candidate_sizes(entry.get("model") or {}, spec.params if spec is not None else None)


def combine(
    root: Path,
    config: ExperimentConfig,
    sub_results: list[dict[str, Any]],
    started: _dt.datetime,
    ended: _dt.datetime,
) -> dict[str, Any]:
    """The top-level results.json from the datasets' sub-runs (see the module docstring)."""
    from lmkl.analysis.gates import gates_report, metric_value
    from lmkl.analysis.ranking import RankingInput, metric_values, rank
    from lmkl.analysis.stats import summarize
    from lmkl.engine.results import SCHEMA_VERSION
    from lmkl.environment import versions as _versions

    names = [dataset_dir_name(d) for d in config.datasets]
    subs = [root / "datasets" / n for n in names]
    labels = [c.label for c in config.candidates]
    all_labels = labels + ([NOISE_FLOOR_LABEL] if config.noise_floor.enabled else [])
    metric = config.ranking.metric

    # Align every row's tokens per dataset and give documents global indices. The bootstrap
    # resamples documents; with llama-cpp windowing the text is one stream, so its chunks.
    unit_column, unit = (
        ("window_id", "chunk")
        if config.windowing.windowing == "llama-cpp"
        else ("doc_id", "document")
    )
    doc_parts, strata = [], []
    per_label: dict[str, list[dict[str, np.ndarray]]] = {label: [] for label in all_labels}
    offset = window_offset = doc_offset = 0
    for sub in subs:
        first = None
        for label in all_labels:
            cols = _candidate_tokens(sub, label)
            if first is None:
                first = cols
            elif not all(np.array_equal(first[k], cols[k]) for k in (*_KEY_COLUMNS, "token_id")):
                raise RuntimeError(f"{sub}: candidates were not scored on identical tokens")
            per_label[label].append(cols)
        assert first is not None
        _, local = np.unique(first[unit_column], return_inverse=True)
        n_units = int(local.max()) + 1 if local.size else 0
        doc_parts.append(local + offset)
        strata.append(n_units)
        _, local_docs = np.unique(first["doc_id"], return_inverse=True)
        for label in all_labels:  # unique document / window ids across datasets for counts
            cols = per_label[label][-1]
            cols["doc_id"] = local_docs + doc_offset
            cols["window_id"] = cols["window_id"] + window_offset
        offset += n_units
        doc_offset += int(local_docs.max()) + 1 if local_docs.size else 0
        window_offset += int(first["window_id"].max()) + 1 if first["window_id"].size else 0
    doc_index = np.concatenate(doc_parts)

    def pooled(label: str) -> dict[str, np.ndarray]:
        parts = per_label[label]
        return {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

    weights = [d.weight for d in config.datasets]
    candidates, values, info = [], [], []
    for i, cand in enumerate(config.candidates):
        cols = pooled(cand.label)
        values.append(metric_values(cols, metric))
        first_entry = _entry(sub_results[0], cand.label)
        entry: dict[str, Any] = {
            "label": cand.label,
            "model": first_entry["model"],
            "group": cand.group,
            "step": cand.step,
            "params": cand.params,
            "metrics": summarize(cols),
        }
        per_ds = [_entry(r, cand.label)["metrics"] for r in sub_results]
        entry["macro"] = {
            m: _weighted([metric_value(x, m) for x in per_ds], weights) for m in macro_paths()
        }
        entry["size"] = _size(first_entry, cand)
        entry["datasets"] = {name: f"datasets/{name}" for name in names}
        candidates.append(entry)
        info.append(
            {
                **entry["size"],
                "group": cand.group,
                "step": cand.step,
                "metrics": entry["metrics"],
                "index": i,
            }
        )
        del cols

    noise = None
    noise_entry = None
    if config.noise_floor.enabled:
        cols = pooled(NOISE_FLOOR_LABEL)
        noise = metric_values(cols, metric)
        noise_entry = {
            "label": NOISE_FLOOR_LABEL,
            **noise_floor_method(config.noise_floor, config.seed),
            "model": _entry(sub_results[0], NOISE_FLOOR_LABEL)["model"],
            "metrics": summarize(cols),
        }

    ranking = rank(
        RankingInput(
            labels=labels,
            values=np.stack(values),
            doc_index=doc_index,
            strata=strata,
            dataset_labels=[d.display_name for d in config.datasets],
            weights=weights,
            info=info,
            noise_floor=noise,
        ),
        metric,
        rank_metrics()[metric].higher_is_better,
        resamples=config.ranking.resamples,
        confidence=config.ranking.confidence,
        seed=config.seed,
        average=config.ranking.average,
        size_key=config.ranking.size,
        noise_label=NOISE_FLOOR_LABEL,
        unit=unit,
    )
    if metric == "kl.mean" and config.ranking.average == "micro":
        # One CI per candidate, the same in every table: the leaderboard's (resampled within
        # each dataset, the configured resamples and seed), not a second, unstratified draw.
        rows = {row["label"]: row for row in ranking["leaderboard"]}
        for entry in [*candidates, *([noise_entry] if noise_entry else [])]:
            low, high = rows[entry["label"]]["ci"]
            entry["metrics"]["kl"] |= {
                "ci_low": low,
                "ci_high": high,
                "ci_method": f"{unit} bootstrap within datasets",
            }

    gates = gates_report(candidates, config.gates.gates())
    seconds = sum(r.get("throughput", {}).get("seconds") or 0.0 for r in sub_results)
    total_tokens = int(doc_index.size)
    datasets = []
    for spec, name, res in zip(config.datasets, names, sub_results, strict=True):
        datasets.append(
            {
                "label": spec.display_name,
                "dir": f"datasets/{name}",
                "weight": spec.weight,
                "data": res.get("data"),
                "kl_mean": {c["label"]: c["metrics"]["kl"]["mean"] for c in res["candidates"]},
            }
        )
    first = sub_results[0]
    return {
        "schema_version": SCHEMA_VERSION,
        "kind": "experiment",
        "name": config.name,
        "description": config.description,
        "reference": first["reference"],
        "candidates": candidates,
        "noise_floor": noise_entry,
        "datasets": datasets,
        "data": {
            "datasets": [d["data"] for d in datasets],
            "scored_tokens": total_tokens,
            "documents": doc_offset,
        },
        "windowing": first.get("windowing"),
        "compute": first.get("compute"),
        "ranking": ranking,
        "gates": gates,
        "provenance": {
            "versions": _versions(),
            "started": started.isoformat(),
            "ended": ended.isoformat(),
            "config": json.loads(config.model_dump_json()),
            "host": platform.node(),
        },
        "throughput": {
            "seconds": seconds,
            "tokens_per_s": total_tokens / seconds if seconds > 0 else None,
        },
    }


def _entry(results: dict[str, Any], label: str) -> dict[str, Any]:
    for cand in results["candidates"]:
        if cand["label"] == label:
            return cand
    raise RuntimeError(f"candidate '{label}' missing from a sub-run's results")


def _weighted(values: list[float], weights: list[float]) -> float:
    with np.errstate(invalid="ignore"):
        return float(np.dot(values, weights) / sum(weights))
