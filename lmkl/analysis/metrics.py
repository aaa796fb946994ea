"""The metric registry: every summary metric declared once, and read the same way everywhere.

A :class:`Metric` names a dotted path into a candidate's ``metrics`` object of results.json
(``kl.mean``, ``ppl.ratio``...), how to label it, its unit, whether higher is better, how to
format it, and whether it can rank candidates (the per-token column the bootstrap resamples) or
is averaged over datasets. Sorting reports, quality gates, experiment ranking, leaderboards and
terminal tables all resolve metric names through :func:`resolve` and read values through
:func:`lookup`; gates accept any numeric path of the summary (:func:`numeric_paths`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

from lmkl import formatting

Style = Literal["number", "percent", "count"]


@dataclass(frozen=True)
class Metric:
    """One summary metric of a candidate (see the module docstring)."""

    path: str
    label: str
    unit: str = "nats"
    higher_is_better: bool = False
    style: Style = "number"
    #: Per-token column whose document sums rank candidates (None: not rankable).
    column: str | None = None
    #: Averaged over datasets (with their weights) in an experiment's macro view.
    macro: bool = False
    #: Offered to ``lmkl report --sort-by``.
    sortable: bool = True

    def format(self, value: Any, digits: int = 4) -> str:
        """The value as shown in tables."""
        if self.style == "percent":
            return formatting.percent(value, 2)
        return formatting.number(value, digits)

    def show(self, metrics: Mapping[str, Any]) -> tuple[str, str]:
        """``(label, text)`` of this metric in a candidate's metrics: ``mean [low, high]`` where
        the summary has a CI (the KL mean's document bootstrap), ``mean ± se`` where it has a
        standard error, else the value alone."""
        family, _, leaf = self.path.rpartition(".")
        block = metrics.get(family) if leaf == "mean" else None
        if isinstance(block, Mapping) and block.get("ci_low") is not None:
            return f"{self.label} [95% CI]", formatting.metric_with_ci(block)
        if isinstance(block, Mapping) and block.get("se") is not None:
            text = (
                formatting.percent_se(block)
                if self.style == "percent"
                else formatting.mean_se(block)
            )
            return f"{self.label} ± se", text
        return self.label, self.format(lookup(metrics, self.path))


METRICS: tuple[Metric, ...] = (
    Metric("kl.mean", "KL(P‖Q) mean", column="kl", macro=True),
    Metric("kl.median", "KL(P‖Q) median"),
    Metric("kl.p90", "KL(P‖Q) p90"),
    Metric("kl.p95", "KL(P‖Q) p95"),
    Metric("kl.p99", "KL(P‖Q) p99"),
    Metric("kl.p999", "KL(P‖Q) p99.9"),
    Metric("kl.max", "KL(P‖Q) max"),
    Metric("reverse_kl.mean", "KL(Q‖P) mean", column="reverse_kl", macro=True),
    Metric("reverse_kl.median", "KL(Q‖P) median"),
    Metric("reverse_kl.p99", "KL(Q‖P) p99"),
    Metric("jsd.mean", "JSD mean", column="jsd", macro=True),
    Metric("jsd.median", "JSD median"),
    Metric("jsd.p99", "JSD p99"),
    Metric("ppl.candidate", "PPL(Q)", unit=""),
    Metric("ppl.ratio", "PPL ratio Q/P", unit=""),
    Metric("ln_ppl_ratio.mean", "mean ln(PPL(Q)/PPL(P))", column="ln_ppl_ratio", macro=True),
    Metric("nll.reference", "NLL(P)", macro=True, sortable=False),
    Metric("nll.candidate", "NLL(Q)", column="nll_candidate", macro=True, sortable=False),
    Metric("nll_correlation", "NLL correlation P/Q", unit="", higher_is_better=True),
    Metric("bits_per_byte.candidate", "bits/byte Q", unit="bits/byte"),
    # Higher Δp = q(x) − p(x) means the candidate puts more mass on the observed token: a ranking
    # criterion for experiments, but not "closer to the reference", so reports do not sort by it.
    Metric(
        "delta_p.mean",
        "Δp mean",
        unit="",
        higher_is_better=True,
        column="delta_p",
        macro=True,
        sortable=False,
    ),
    Metric("delta_p.rms", "Δp RMS", unit=""),
    Metric(
        "top1_agreement.mean",
        "top-1 agreement",
        unit="",
        higher_is_better=True,
        style="percent",
        column="top1_agree",
        macro=True,
    ),
    Metric(
        "top1_in_top5.mean",
        "P's top-1 in Q's top-5",
        unit="",
        higher_is_better=True,
        style="percent",
        column="top1_in_top5",
        macro=True,
    ),
)
REGISTRY: dict[str, Metric] = {m.path: m for m in METRICS}

#: Families where higher means closer to the reference, for paths the registry does not list.
_HIGHER_FAMILIES = frozenset(
    m.path.split(".")[0] for m in METRICS if m.higher_is_better and m.path != "delta_p.mean"
)


@functools.cache
def numeric_paths() -> tuple[str, ...]:
    """Every dotted path to a number in a candidate's ``metrics`` object (lists excluded).

    Derived from :func:`~lmkl.analysis.stats.summarize` on a few synthetic tokens, so it always
    matches what the summary really holds.
    """
    from lmkl.analysis.stats import summarize
    from lmkl.scoring.divergence import TOKEN_METRIC_NAMES

    n = 4
    columns: dict[str, np.ndarray] = {name: np.linspace(0.1, 0.4, n) for name in TOKEN_METRIC_NAMES}
    columns |= {
        "nonfinite": np.zeros(n, bool),
        "bytes": np.ones(n),
        "doc_id": np.arange(n),
        "window_id": np.arange(n),
    }
    columns["kl"] = np.array([0.1, 0.2, 0.3, np.inf])  # so that ``mean_finite`` exists too
    paths: list[str] = []

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, Mapping):
            for key, sub in value.items():
                walk(f"{prefix}.{key}" if prefix else str(key), sub)
        elif isinstance(value, int | float) and not isinstance(value, bool):
            paths.append(prefix)

    walk("", summarize(columns))
    return tuple(paths)


def resolve(path: str, known: tuple[str, ...] | None = None) -> str:
    """The canonical path for ``path`` (a bare family means its ``.mean``: ``kl`` → ``kl.mean``).

    ``known``: the accepted paths (default: every numeric path of the summary). Raises
    ``ValueError`` naming the closest known paths.
    """
    path = path.strip()
    known = numeric_paths() if known is None else known
    if path in known:
        return path
    if f"{path}.mean" in known:
        return f"{path}.mean"
    head = path.split(".")[0]
    similar = [p for p in known if p.split(".")[0] == head][:6]
    tops = sorted({p.split(".")[0] for p in known})
    hint = (
        f"known under '{head}': {', '.join(similar)}"
        if similar
        else (f"known metrics: {', '.join(tops)}")
    )
    raise ValueError(f"unknown metric '{path}' ({hint})")


def lookup(metrics: Mapping[str, Any], path: str) -> float:
    """The number at dotted ``path`` of a metrics object (``"inf"`` → inf, missing → NaN).

    A path that ends at an object reads its ``mean`` (``kl`` is ``kl.mean``).
    """
    node: Any = metrics
    for part in path.split("."):
        if not isinstance(node, Mapping) or part not in node:
            return math.nan
        node = node[part]
    if isinstance(node, Mapping):
        node = node.get("mean")
    return formatting.to_float(node)


def higher_is_better(path: str) -> bool:
    """Whether a higher value of ``path`` means a candidate closer to the reference."""
    if path in REGISTRY:
        return REGISTRY[path].higher_is_better
    if f"{path}.mean" in REGISTRY:
        return REGISTRY[f"{path}.mean"].higher_is_better
    return path.split(".")[0] in _HIGHER_FAMILIES


def sortable_paths() -> tuple[str, ...]:
    """The metrics a report can be sorted by."""
    return tuple(m.path for m in METRICS if m.sortable)


def rank_metrics() -> dict[str, Metric]:
    """The metrics an experiment can rank candidates by (those with a per-token column)."""
    return {m.path: m for m in METRICS if m.column is not None}


def macro_paths() -> tuple[str, ...]:
    """The metrics averaged over an experiment's datasets."""
    return tuple(m.path for m in METRICS if m.macro)


def label(path: str) -> str:
    """The human label of a metric path (the path itself when the registry does not list it)."""
    metric = REGISTRY.get(path) or REGISTRY.get(f"{path}.mean")
    return metric.label if metric else path
