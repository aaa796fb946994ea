"""The report's data: everything a report shows, computed once (:class:`Report`); renderers
(:mod:`lmkl.report.render`, :mod:`lmkl.report.plots`) only format it.

:func:`lmkl.report.build.build_report` fills it from run directories. Units: KL, JSD and NLL in
nats; KL(P‖Q) with P the reference and Q the candidate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmkl.analysis import metrics as registry
from lmkl.files import to_json_safe
from lmkl.formatting import Z95, to_float
from lmkl.report.candidates import CandidateView, confidence_profile, pareto_front
from lmkl.report.runs import RunInfo


@dataclass
class Report:
    """Everything a report shows, computed once; renderers only format it."""

    runs: list[RunInfo]
    candidates: list[CandidateView]
    sort_by: str
    histogram: dict[str, Any] = field(default_factory=dict)
    cdf: dict[str, Any] = field(default_factory=dict)
    by_position: dict[str, Any] = field(default_factory=dict)
    tokens: dict[str, dict[str, Any]] = field(default_factory=dict)
    worst: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    differences: list[dict[str, Any]] = field(default_factory=list)
    reading: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    token_source: str = "ids"
    #: The per-dataset sub-runs of experiment roots among ``runs`` (their token data and
    #: worst positions feed the views above).
    datasets: list[RunInfo] = field(default_factory=list)

    @property
    def title(self) -> str:
        refs = sorted({r.reference_label for r in self.runs})
        cands = [c.key for c in self.candidates]
        shown = ", ".join(cands[:4]) + (f" and {len(cands) - 4} more" if len(cands) > 4 else "")
        return f"{shown} vs {' / '.join(refs)}"

    @property
    def size_axis(self) -> str | None:
        """The size axis of the Pareto plot, when at least two candidates know it:
        ``bits_per_weight`` when any candidate is quantized (their parameter counts are one),
        else ``parameters``, else ``bytes_on_disk``; None when sizes are unknown. The axis the
        runs' ranking used (results.json ``ranking.pareto.size``) comes first: the report then
        names the Pareto set as ``lmkl run`` did."""
        ranked = {
            r.results["ranking"].get("pareto", {}).get("size")
            for r in self.runs
            if isinstance(r.results.get("ranking"), dict)
        }
        axis = next(iter(ranked)) if len(ranked) == 1 else None
        if isinstance(axis, str) and sum(math.isfinite(c.size(axis)) for c in self.candidates) > 1:
            return axis
        axes = ["parameters", "bytes_on_disk"]
        if any(c.quantized for c in self.candidates):
            axes.insert(0, "bits_per_weight")
        for name in axes:
            if sum(math.isfinite(c.size(name)) for c in self.candidates) >= 2:
                return name
        return None

    def sizes(self) -> dict[str, Any]:
        """Size vs mean KL per candidate, with the Pareto-optimal flags (empty if sizes unknown)."""
        axis = self.size_axis
        if axis is None:
            return {}
        rows = [c for c in self.candidates if math.isfinite(c.size(axis))]
        sizes = [c.size(axis) for c in rows]
        kls = [c.value("kl.mean") for c in rows]
        flags = pareto_front(sizes, kls)
        return {
            "axis": axis,
            "keys": [c.key for c in rows],
            "size": sizes,
            "kl_mean": kls,
            "kl_se": [c.value("kl.se") for c in rows],
            "pareto": flags,
        }

    def steps(self) -> dict[str, Any]:
        """KL and PPL ratio by training step per group (checkpoint series with two+ steps)."""
        groups: dict[str, list[CandidateView]] = {}
        for c in self.candidates:
            if math.isfinite(c.step):
                groups.setdefault(c.group or "checkpoints", []).append(c)
        out = {}
        for group, members in groups.items():
            if len({c.step for c in members}) < 2:
                continue
            members.sort(key=lambda c: c.step)
            kls = [c.value("kl.mean") for c in members]
            best = int(np.nanargmin(kls)) if any(math.isfinite(v) for v in kls) else 0
            out[group] = {
                "keys": [c.key for c in members],
                "step": [c.step for c in members],
                "kl_mean": kls,
                "kl_se": [c.value("kl.se") for c in members],
                "ppl_ratio": [c.value("ppl.ratio") for c in members],
                "best": members[best].key,
                "best_step": members[best].step,
            }
        return out

    def confidence(self) -> dict[str, list[dict[str, Any]]]:
        return {c.key: confidence_profile(c.metrics) for c in self.candidates}

    def ppl(self) -> dict[str, Any]:
        """PPL(Q)/PPL(P) per candidate with a 95% interval from ``ln_ppl_ratio``'s error."""
        out = {"keys": [], "ratio": [], "low": [], "high": [], "reference": [], "candidate": []}
        for c in self.candidates:
            mean, se = (
                c.value("ln_ppl_ratio.mean"),
                to_float(c.metrics.get("ln_ppl_ratio", {}).get("se")),
            )
            ratio = c.value("ppl.ratio")
            if not math.isfinite(ratio) and math.isfinite(mean):
                ratio = math.exp(mean)
            out["keys"].append(c.key)
            out["ratio"].append(ratio)
            ok = math.isfinite(mean) and math.isfinite(se)
            out["low"].append(math.exp(mean - Z95 * se) if ok else math.nan)
            out["high"].append(math.exp(mean + Z95 * se) if ok else math.nan)
            out["reference"].append(c.value("ppl.reference"))
            out["candidate"].append(c.value("ppl.candidate"))
        return out

    def ranking_ci(self, c: CandidateView) -> tuple[float, float] | None:
        """A bootstrap CI for ``c`` from its run's ``ranking`` section, if the run has one."""
        return _ranking_ci(c.run.results.get("ranking"), c.label)

    def document_ci(self, c: CandidateView) -> tuple[float, float] | None:
        """The 95% CI of ``c``'s mean KL from resampling whole documents: the one stored with
        the metric (``kl.ci_low``/``kl.ci_high``), else its run's ranking CI when the ranking
        metric is the mean KL; None when the run has neither."""
        kl = c.metrics.get("kl") or {}
        low, high = to_float(kl.get("ci_low")), to_float(kl.get("ci_high"))
        if math.isfinite(low) and math.isfinite(high):
            return low, high
        ranking = c.run.results.get("ranking")
        if isinstance(ranking, dict) and ranking.get("metric") == "kl.mean":
            return self.ranking_ci(c)
        return None

    def ranking_metric(self) -> str | None:
        for run in self.runs:
            ranking = run.results.get("ranking")
            if isinstance(ranking, dict) and isinstance(ranking.get("metric"), str):
                return ranking["metric"]
        return None

    def ranking_row(self, c: CandidateView) -> dict[str, Any] | None:
        """``c``'s row of its run's ranking (an experiment: Δ next, flips, vs the noise floor)."""
        return _ranking_row(c.run.results.get("ranking"), c.label)

    def noise_floor(self, run: RunInfo) -> dict[str, Any] | None:
        """The run's noise floor (the reference against a copy of itself with tiny weight noise):
        its mean KL and top-1 agreement, with how it was made; None when the run has none."""
        entry = run.results.get("noise_floor")
        if not isinstance(entry, dict):
            return None
        metrics = entry.get("metrics") or {}
        kl = lookup_number(metrics, "kl.mean")
        if not math.isfinite(kl):
            return None
        return {
            "kl_mean": kl,
            "top1_agreement": lookup_number(metrics, "top1_agreement.mean"),
            "relative_std": to_float(entry.get("relative_std")),
        }

    def noise_floor_kl(self) -> float:
        """The noise floor's mean KL when the runs have one (and only one value); else NaN."""
        values = {f["kl_mean"] for run in self.runs if (f := self.noise_floor(run))}
        return values.pop() if len(values) == 1 else math.nan

    def scale(self, c: CandidateView) -> dict[str, Any]:
        """How large ``c``'s divergence is, on scales from its own run: the share of tokens
        whose top-1 prediction changes, the perplexity ratio, and the mean KL as a multiple of
        the run's noise floor (NaN where the run has none)."""
        kl = c.value("kl.mean")
        agree = c.value("top1_agreement.mean")
        floor = self.noise_floor(c.run)
        row = self.ranking_row(c) or {}
        vs_noise = row.get("vs_noise_floor") if isinstance(row, dict) else None
        return {
            "kl_mean": kl,
            "top1_changed": 1.0 - agree if math.isfinite(agree) else math.nan,
            "ppl_ratio": c.value("ppl.ratio"),
            "noise_floor": floor["kl_mean"] if floor else math.nan,
            "times_noise_floor": kl / floor["kl_mean"]
            if floor and floor["kl_mean"] > 0 and math.isfinite(kl)
            else math.nan,
            "above_noise_floor": vs_noise.get("distinguishable")
            if isinstance(vs_noise, dict)
            else None,
        }

    def gates(self) -> list[dict[str, Any]]:
        """Per run with quality gates (an experiment's ``gates:``): the limits, whether every
        candidate passed, and each failure's one-line reason."""
        out = []
        for run in self.runs:
            gates = run.results.get("gates")
            if not isinstance(gates, dict):
                continue
            limits = {**(gates.get("fail_above") or {}), **(gates.get("fail_below") or {})}
            if not limits:
                continue
            failures = [f for f in gates.get("failures") or [] if isinstance(f, dict)]
            out.append(
                {
                    "run": run.name,
                    "limits": len(limits),
                    "passed": bool(gates.get("passed")) and not failures,
                    "failures": failures,
                }
            )
        return out

    def to_dict(self) -> dict[str, Any]:
        """The report as strict-JSON-able data (the ``--format json`` output)."""
        cands = []
        for c in self.candidates:
            ci = self.ranking_ci(c)
            cands.append(
                {
                    "key": c.key,
                    "label": c.label,
                    "run": str(c.run.path),
                    "reference": c.run.reference_label,
                    "group": c.group,
                    "step": _maybe(c.step),
                    "params": _maybe(c.params),
                    "bytes_on_disk": _maybe(c.bytes_on_disk),
                    "sort_value": c.value(self.sort_by),
                    "ranking_ci": list(ci) if ci else None,
                    "document_ci": list(doc_ci) if (doc_ci := self.document_ci(c)) else None,
                    "scale": self.scale(c),
                    "metrics": c.metrics,
                    "kl_by_confidence": confidence_profile(c.metrics),
                }
            )
        data = {
            "title": self.title,
            "runs": [str(r.path) for r in self.runs],
            "sort_by": self.sort_by,
            "reading": self.reading,
            "notes": self.notes,
            "candidates": cands,
            "kl_histogram": self.histogram,
            "kl_cdf": self.cdf,
            "kl_by_position": self.by_position,
            "ppl": self.ppl(),
            "sizes": self.sizes(),
            "steps": self.steps(),
            "worst": self.worst,
            "tokens": self.tokens,
            "token_strings": self.token_source,
            "differences": self.differences,
            "gates": self.gates(),
            "noise_floor": {r.name: self.noise_floor(r) for r in self.runs if self.noise_floor(r)},
            "datasets": [str(d.path) for d in self.datasets],
        }
        return to_json_safe(_plain(data))


def _maybe(value: float) -> float | None:
    return value if math.isfinite(value) else None


def _plain(value: Any) -> Any:
    """NumPy arrays and scalars → lists and Python numbers (for JSON)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value.tolist()]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


def lookup_number(metrics: dict[str, Any], path: str) -> float:
    """A number of a metrics object by registry path (NaN when missing)."""
    try:
        return registry.lookup(metrics, path)
    except (KeyError, TypeError, ValueError):
        return math.nan


def _ranking_row(ranking: Any, label: str) -> dict[str, Any] | None:
    """``label``'s candidate row of an experiment's ranking leaderboard."""
    if not isinstance(ranking, dict):
        return None
    for entry in ranking.get("leaderboard") or []:
        if (
            isinstance(entry, dict)
            and entry.get("label") == label
            and entry.get("kind") != ("noise_floor")
        ):
            return entry
    return None


def _ranking_ci(ranking: Any, label: str) -> tuple[float, float] | None:
    """The bootstrap CI of ``label`` in an experiment's ranking (``leaderboard[i].ci``)."""
    entry = _ranking_row(ranking, label)
    ci = (entry or {}).get("ci") or []
    if len(ci) == 2:
        lo, hi = to_float(ci[0]), to_float(ci[1])
        if math.isfinite(lo) and math.isfinite(hi):
            return lo, hi
    return None
