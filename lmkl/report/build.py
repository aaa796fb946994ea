"""Assemble a :class:`~lmkl.report.data.Report` from one or more finished run directories (no
model, no torch needed).

Everything here reads the run directory contract (``results.json``, ``tokens.parquet``,
``worst.json``) and aggregates with pyarrow/NumPy (:mod:`lmkl.analysis.per_token`), so a run of
millions of tokens reports in seconds. Rendering lives elsewhere: :mod:`lmkl.report.plots` draws,
:mod:`lmkl.report.render` writes HTML/Markdown/JSON/terminal output.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

import numpy as np

from lmkl.analysis import metrics as registry
from lmkl.analysis.per_token import (
    CandidateTokens,
    kl_by_position,
    kl_cdf,
    kl_histogram,
    token_divergence,
)
from lmkl.errors import OutputError, UsageError
from lmkl.report.candidates import PALETTE, CandidateView, compare_views, worst_entries
from lmkl.report.data import Report
from lmkl.report.reading import plain_reading
from lmkl.report.runs import RunInfo, experiment_datasets, load_run, read_candidate_tokens
from lmkl.report.token_strings import TokenNamer


def normalize_sort_metric(path: str) -> str:
    """A ``--sort-by`` metric resolved by the registry (``kl`` → ``kl.mean``); usage error if
    it cannot order candidates."""
    sortable = registry.sortable_paths()
    try:
        return registry.resolve(path, sortable)
    except ValueError:
        raise UsageError(
            f"unknown metric '{path}' for --sort-by", "use one of: " + ", ".join(sortable)
        ) from None


def _assign_keys(views: list[CandidateView]) -> None:
    labels = [v.label for v in views]
    for v in views:
        v.key = v.label if labels.count(v.label) == 1 else f"{v.label} · {v.run.name}"
    keys = [v.key for v in views]
    seen: dict[str, int] = {}
    for v in views:
        if keys.count(v.key) > 1:
            seen[v.key] = seen.get(v.key, 0) + 1
            v.key = f"{v.key} #{seen[v.key]}"


def _sort_views(views: list[CandidateView], sort_by: str) -> list[CandidateView]:
    sign = -1.0 if registry.higher_is_better(sort_by) else 1.0

    def key(item: tuple[int, CandidateView]) -> tuple[int, float, int]:
        index, view = item
        value = view.value(sort_by)
        return (
            1 if math.isnan(value) else 0,
            sign * value if not math.isnan(value) else 0.0,
            index,
        )

    return [v for _, v in sorted(enumerate(views), key=key)]


def _pooled_tokens(
    per_dataset: list[dict[str, CandidateTokens]],
) -> dict[str, CandidateTokens]:
    """Each label's tokens over all datasets of an experiment, documents numbered apart (the
    datasets' document ids restart at 0) so that (document, position) stays a unique key."""
    parts: dict[str, list[CandidateTokens]] = {}
    offset = 0
    for tokens in per_dataset:
        top = 0
        for label, t in tokens.items():
            parts.setdefault(label, []).append(dataclasses.replace(t, doc_id=t.doc_id + offset))
            if t.doc_id.size:
                top = max(top, int(t.doc_id.max()) + 1)
        offset += top
    return {
        label: CandidateTokens(
            **{
                f.name: np.concatenate([getattr(p, f.name) for p in pieces])
                for f in dataclasses.fields(CandidateTokens)
            }
        )
        for label, pieces in parts.items()
    }


def _experiment_worst(
    datasets: list[RunInfo],
    per_dataset: list[dict[str, CandidateTokens]],
    label: str,
    n: int,
) -> list[dict[str, Any]]:
    """The ``n`` worst positions of ``label`` over every dataset of an experiment, each tagged
    with its dataset (document ids are the dataset's own, as ``lmkl inspect`` shows them)."""
    entries = []
    for sub, tokens in zip(datasets, per_dataset, strict=True):
        for entry in worst_entries(sub, label, n, tokens.get(label)):
            entry["dataset"] = sub.name
            entries.append(entry)
    entries.sort(key=lambda e: -e["kl"] if not math.isnan(e["kl"]) else math.inf)
    return entries[:n]


def build_report(
    run_dirs: list[Path],
    *,
    sort_by: str = "kl.mean",
    worst_n: int = 10,
    top_tokens: int = 15,
) -> Report:
    """Read run directories and compute every view of the report."""
    if not run_dirs:
        raise UsageError("no run directory given", "pass one or more run directories")
    sort_by = normalize_sort_metric(sort_by)
    runs = [load_run(Path(p)) for p in run_dirs]
    names = [r.name for r in runs]
    for run in runs:
        if names.count(run.name) > 1:
            run.name = f"{run.path.resolve().parent.name}/{run.name}"
    views = [
        CandidateView(key="", label=str(entry.get("label", f"candidate-{i}")), run=run, entry=entry)
        for run in runs
        for i, entry in enumerate(run.results["candidates"])
    ]
    if not views:
        raise OutputError("the given runs hold no candidates", "check the run directories")
    _assign_keys(views)
    notes = []
    datasets: dict[int, list[RunInfo]] = {}
    dataset_tokens: dict[int, list[dict[str, CandidateTokens]]] = {}
    for run in runs:
        labels = [v.label for v in views if v.run is run]
        if run.is_experiment:
            # An experiment keeps its per-token data per dataset, in datasets/<name>/.
            datasets[id(run)] = subs = experiment_datasets(run)
            dataset_tokens[id(run)] = [read_candidate_tokens(s.path, labels) for s in subs]
            per_label = _pooled_tokens(dataset_tokens[id(run)])
            where = "its datasets/<name>/ directories have no tokens.parquet (save_tokens off?)"
        else:
            per_label = read_candidate_tokens(run.path, labels)
            where = "no tokens.parquet"
        if not per_label:
            notes.append(
                f"{run.name}: {where}; distribution, position and token views "
                "are missing for its candidates"
            )
        for v in views:
            if v.run is run:
                v.tokens = per_label.get(v.label)
    views = _sort_views(views, sort_by)
    for i, v in enumerate(views):
        v.color = PALETTE[i % len(PALETTE)]
    with_tokens = {v.key: v.tokens for v in views if v.tokens is not None}
    report = Report(
        runs=runs,
        candidates=views,
        sort_by=sort_by,
        notes=notes,
        datasets=[sub for run in runs for sub in datasets.get(id(run), [])],
    )
    kls = {k: t.kl for k, t in with_tokens.items()}
    report.histogram = kl_histogram(kls)
    report.cdf = kl_cdf(kls)
    report.by_position = kl_by_position(with_tokens)
    namer = TokenNamer([*runs, *report.datasets])
    report.token_source = namer.source
    for v in views:
        if v.tokens is not None:
            table = token_divergence(v.tokens, top=top_tokens)
            rows = table["by_total"] + table["by_mean"]
            for row, text in zip(rows, namer.many(r["token_id"] for r in rows), strict=True):
                row["token"] = text
            report.tokens[v.key] = table
        if v.run.is_experiment:
            report.worst[v.key] = _experiment_worst(
                datasets[id(v.run)], dataset_tokens[id(v.run)], v.label, worst_n
            )
        else:
            report.worst[v.key] = worst_entries(v.run, v.label, worst_n, v.tokens)
    by_label: dict[str, list[CandidateView]] = {}
    for v in views:
        by_label.setdefault(v.label, []).append(v)
    for group in by_label.values():
        runs_of = {id(v.run) for v in group}
        if len(runs_of) < 2:
            continue
        ordered = sorted(group, key=lambda v: runs.index(v.run))
        report.differences.extend(compare_views(ordered[0], other) for other in ordered[1:])
    report.reading = plain_reading(report)
    return report
