"""Quality gates: fail a run when a candidate's metric is above (or below) a limit.

A gate names a metric of results.json by its dotted path inside a candidate's ``metrics`` object,
e.g. ``kl.mean``, ``kl.p99``, ``ppl.ratio`` or ``top1_agreement``; a path that ends at an object
with a ``mean`` (``kl``, ``top1_agreement``) means that mean. ``fail_above`` limits are maxima
(``kl.mean=0.05``: fail when the mean KL exceeds 0.05); ``fail_below`` limits are minima
(``top1_agreement=0.9``: fail when agreement is under 90 %). An undefined value (NaN) fails.

Used by ``lmkl run`` (``gates:`` in the YAML plus ``--fail-above/--fail-below``) and by
``lmkl compare`` (the flags). A failure raises :class:`lmkl.errors.GateFailure` (exit code 3)
*after* the results are written.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from lmkl.analysis.metrics import lookup, resolve
from lmkl.errors import GateFailure, UsageError
from lmkl.formatting import format_column

GateKind = Literal["fail_above", "fail_below"]


def metric_value(metrics: Mapping[str, Any], path: str) -> float:
    """The number at ``path`` (resolved by the registry) in a metrics object."""
    return lookup(metrics, resolve(path))


@dataclass(frozen=True)
class Gate:
    """One limit on one metric."""

    metric: str
    kind: GateKind
    limit: float

    def fails(self, value: float) -> bool:
        if math.isnan(value):
            return True
        return value > self.limit if self.kind == "fail_above" else value < self.limit

    def describe(self) -> str:
        sign = "<=" if self.kind == "fail_above" else ">="
        return f"{self.metric} {sign} {self.limit:g}"


def gates_from_mapping(
    fail_above: Mapping[str, float] | None, fail_below: Mapping[str, float] | None
) -> list[Gate]:
    """Gates from ``{metric: limit}`` maps (paths normalised; unknown ones raise ``ValueError``)."""
    gates = [Gate(resolve(m), "fail_above", float(v)) for m, v in (fail_above or {}).items()]
    gates += [Gate(resolve(m), "fail_below", float(v)) for m, v in (fail_below or {}).items()]
    return gates


def parse_gate_options(values: Iterable[str], option: str) -> dict[str, float]:
    """``["kl.mean=0.05", ...]`` from ``--fail-above``/``--fail-below`` → ``{path: limit}``.

    Raises :class:`UsageError` (exit 2) naming every bad entry at once.
    """
    out: dict[str, float] = {}
    problems: list[str] = []
    for raw in values:
        metric, sep, limit = raw.partition("=")
        if not sep or not metric.strip() or not limit.strip():
            problems.append(f"{option} {raw!r}: expected METRIC=VALUE, e.g. kl.mean=0.05")
            continue
        try:
            path = resolve(metric)
        except ValueError as exc:
            problems.append(f"{option} {raw!r}: {exc}")
            continue
        try:
            out[path] = float(limit)
        except ValueError:
            problems.append(f"{option} {raw!r}: '{limit}' is not a number")
    if problems:
        raise UsageError(
            "; ".join(problems),
            "metric paths follow results.json, e.g. kl.mean, kl.p99, top1_agreement, ppl.ratio",
        )
    return out


@dataclass(frozen=True)
class GateResult:
    """One failed gate for one candidate."""

    candidate: str
    gate: Gate
    value: float

    def line(self) -> str:
        op = ">" if self.gate.kind == "fail_above" else "<"
        # Digits enough to tell the value from the limit (0.05001 > 0.05 must not read 0.05).
        value, limit = format_column([self.value, self.gate.limit])
        value = "undefined" if math.isnan(self.value) else value
        return (
            f"{self.candidate}: {self.gate.metric} = {value} {op} {limit} "
            f"({self.gate.kind.replace('_', '-')})"
        )


def evaluate_gates(candidates: Iterable[Mapping[str, Any]], gates: list[Gate]) -> list[GateResult]:
    """Every (candidate, gate) that fails; ``candidates`` are results.json candidate entries."""
    failures = []
    for cand in candidates:
        for gate in gates:
            value = metric_value(cand["metrics"], gate.metric)
            if gate.fails(value):
                failures.append(GateResult(cand["label"], gate, value))
    return failures


def gates_report(candidates: list[Mapping[str, Any]], gates: list[Gate]) -> dict[str, Any]:
    """The ``gates`` section of results.json: the limits, every failure, and whether all passed."""
    failures = evaluate_gates(candidates, gates)
    return {
        "fail_above": {g.metric: g.limit for g in gates if g.kind == "fail_above"},
        "fail_below": {g.metric: g.limit for g in gates if g.kind == "fail_below"},
        "passed": not failures,
        "failures": [
            {
                "candidate": f.candidate,
                "metric": f.gate.metric,
                "kind": f.gate.kind,
                "limit": f.gate.limit,
                "value": f.value,
                "reason": f.line(),
            }
            for f in failures
        ],
    }


def raise_for_failures(report: Mapping[str, Any], total_candidates: int) -> None:
    """Raise :class:`GateFailure` (exit 3) with one line per failing candidate, if any failed."""
    if report["passed"]:
        return
    by_candidate: dict[str, list[str]] = {}
    for failure in report["failures"]:
        by_candidate.setdefault(failure["candidate"], []).append(
            failure["reason"].split(": ", 1)[1]
        )
    lines = [f"{label}: {'; '.join(reasons)}" for label, reasons in by_candidate.items()]
    raise GateFailure(
        f"{len(by_candidate)} of {total_candidates} candidates failed a quality gate",
        "results are written; inspect them, or relax the gate",
        problems=lines,
    )
