"""One candidate of one run as a report shows it: its view, KL-by-confidence profile, Pareto flag,
worst positions, and what differs between two runs of it."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from lmkl.analysis import metrics as registry
from lmkl.analysis.per_token import CandidateTokens, paired_difference
from lmkl.analysis.ranking import pareto_front as ranking_pareto_front
from lmkl.formatting import to_float
from lmkl.report.runs import RunInfo, stored_count

#: Colours of candidates, in sorted order (matplotlib's tab10, colour-blind friendlier order).
PALETTE = (
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#d62728",
    "#9467bd",
    "#8c564b",
    "#e377c2",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
)


@dataclass
class CandidateView:
    """A candidate of one run, as shown in the report."""

    key: str
    label: str
    run: RunInfo
    entry: dict[str, Any]
    color: str = PALETTE[0]
    tokens: CandidateTokens | None = None

    @property
    def metrics(self) -> dict[str, Any]:
        return self.entry.get("metrics", {})

    @property
    def model(self) -> dict[str, Any]:
        return self.entry.get("model", {}) or {}

    def _meta(self, *names: str) -> Any:
        for name in names:
            for source in (self.entry, self.model):
                if source.get(name) is not None:
                    return source[name]
        return None

    @property
    def params(self) -> float:
        return to_float(self._meta("params", "parameters"))

    @property
    def bytes_on_disk(self) -> float:
        return to_float(self._meta("bytes_on_disk"))

    @property
    def bits_per_weight(self) -> float:
        """8 × real bytes of the weights / weights (quantized storage included)."""
        return to_float(self._meta("bits_per_weight"))

    @property
    def quantized(self) -> bool:
        return self.model.get("quantization") is not None

    def size(self, axis: str) -> float:
        """This candidate's size on ``axis`` (see :attr:`Report.size_axis`): its own, or the
        one its run's ranking recorded (``memory_bytes``, ``disk_bytes``, ``weight_bytes``)."""
        own = {
            "parameters": self.params,
            "bytes_on_disk": self.bytes_on_disk,
            "bits_per_weight": self.bits_per_weight,
        }
        if axis in own:
            return own[axis]
        ranking = self.run.results.get("ranking")
        for row in (ranking or {}).get("leaderboard") or [] if isinstance(ranking, dict) else []:
            if (
                isinstance(row, dict)
                and row.get("label") == self.label
                and row.get("kind") != ("noise_floor")
            ):
                return to_float((row.get("size") or {}).get(axis))
        return math.nan

    @property
    def step(self) -> float:
        return to_float(self._meta("step"))

    @property
    def group(self) -> str | None:
        group = self._meta("group")
        return str(group) if group is not None else None

    def value(self, path: str) -> float:
        return registry.lookup(self.metrics, path)


def confidence_profile(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """``kl_by_confidence`` with each bucket's share of the total KL (token share × mean)."""
    buckets = metrics.get("kl_by_confidence") or []
    # An empty bucket contributes nothing (its mean is NaN, its share 0).
    weights = [
        0.0
        if not to_float(b.get("tokens"))
        else to_float(b.get("share")) * to_float(b.get("kl_mean"))
        for b in buckets
    ]
    finite = [w for w in weights if math.isfinite(w)]
    total = sum(finite)
    out = []
    for bucket, weight in zip(buckets, weights, strict=True):
        out.append(
            {
                "bucket": bucket.get("bucket", ""),
                "low": to_float(bucket.get("low")),
                "high": to_float(bucket.get("high")),
                "tokens": stored_count(bucket.get("tokens")),
                "share": to_float(bucket.get("share")),
                "kl_mean": to_float(bucket.get("kl_mean")),
                "kl_se": to_float(bucket.get("kl_se")),
                "kl_median": to_float(bucket.get("kl_median")),
                "kl_share": weight / total if total > 0 and math.isfinite(weight) else math.nan,
            }
        )
    return out


def pareto_front(sizes: list[float], values: list[float]) -> list[bool]:
    """Points no other point beats (size and value both <=, one strictly <): the Pareto set
    (:func:`lmkl.analysis.ranking.pareto_front` with lower values better; unknown → False)."""
    # A candidate with an infinite value (KL = inf) is never on the front.
    finite = [v if math.isfinite(v) else math.nan for v in values]
    return [bool(flag) for flag in ranking_pareto_front(sizes, finite, higher_is_better=False)]


def worst_entries(
    run: RunInfo,
    label: str,
    n: int,
    tokens: CandidateTokens | None,
) -> list[dict[str, Any]]:
    """The ``n`` worst positions of one candidate with p(x) and q(x) of the actual token."""
    entries = [dict(e) for e in run.worst if e.get("candidate") == label]
    entries.sort(key=lambda e: -to_float(e.get("kl")))
    entries = entries[:n]
    if tokens is not None and entries and tokens.kl.size:
        keys = tokens.keys()
        order = np.argsort(keys, kind="stable")
        wanted = np.asarray(
            [
                (int(e.get("doc_id", 0)) << 32) | (int(e.get("position", 0)) & 0xFFFFFFFF)
                for e in entries
            ],
            dtype=np.int64,
        )
        where = np.clip(np.searchsorted(keys[order], wanted), 0, keys.size - 1)
        rows = order[where]
        hit = keys[rows] == wanted
        for e, row, ok in zip(entries, rows, hit, strict=True):
            if ok:
                e["p_token"] = float(np.exp(-tokens.nll_reference[row]))
                e["q_token"] = float(np.exp(-tokens.nll_candidate[row]))
    for e in entries:
        e["kl"] = to_float(e.get("kl"))
        token_id = e.get("token_id")
        for side in ("reference_top5", "candidate_top5"):
            items = []
            for item in e.get(side) or []:
                if isinstance(item, dict):
                    items.append(
                        {
                            "token_id": item.get("token_id"),
                            "token": item.get("token", ""),
                            "prob": to_float(item.get("prob")),
                            "is_target": item.get("token_id") == token_id,
                        }
                    )
            e[side] = items
    return entries


def _flatten(prefix: str, value: Any, out: dict[str, Any]) -> None:
    if isinstance(value, dict):
        for k, v in value.items():
            _flatten(f"{prefix}.{k}" if prefix else str(k), v, out)
    else:
        out[prefix] = value


#: Settings whose change between two runs explains a difference in numbers.
_MODEL_FIELDS = (
    "model",
    "path",
    "dtype",
    "device",
    "weights_sha256",
    "resolved_revision",
    "revision",
    "adapter",
    "parameters",
    "bytes_on_disk",
    "architecture",
)


_DIFF_METRICS = (
    "kl.mean",
    "kl.median",
    "kl.p99",
    "reverse_kl.mean",
    "jsd.mean",
    "ppl.reference",
    "ppl.candidate",
    "ppl.ratio",
    "top1_agreement.mean",
    "top1_in_top5.mean",
    "delta_p.rms",
)


def compare_views(a: CandidateView, b: CandidateView) -> dict[str, Any]:
    """What differs between two runs of the same candidate: settings, metrics, and per token."""
    changes = []
    for prefix, da, db in (
        ("candidate", a.model, b.model),
        ("reference", a.run.results.get("reference", {}), b.run.results.get("reference", {})),
    ):
        for name in _MODEL_FIELDS:
            va, vb = da.get(name), db.get(name)
            if va != vb:
                changes.append({"setting": f"{prefix}.{name}", "a": va, "b": vb})
    for name in ("source", "fingerprint", "split", "max_samples"):
        va, vb = a.run.results.get("data", {}).get(name), b.run.results.get("data", {}).get(name)
        if va != vb:
            changes.append({"setting": f"data.{name}", "a": va, "b": vb})
    flat_a: dict[str, Any] = {}
    flat_b: dict[str, Any] = {}
    _flatten("", a.run.results.get("windowing", {}), flat_a)
    _flatten("", b.run.results.get("windowing", {}), flat_b)
    _flatten("compute", a.run.results.get("compute", {}), flat_a)
    _flatten("compute", b.run.results.get("compute", {}), flat_b)
    _flatten("versions", a.run.results.get("provenance", {}).get("versions", {}), flat_a)
    _flatten("versions", b.run.results.get("provenance", {}).get("versions", {}), flat_b)
    for name in sorted(set(flat_a) | set(flat_b)):
        if flat_a.get(name) != flat_b.get(name):
            changes.append(
                {
                    "setting": name if "." in name else f"windowing.{name}",
                    "a": flat_a.get(name),
                    "b": flat_b.get(name),
                }
            )
    metrics = []
    for path in _DIFF_METRICS:
        va, vb = a.value(path), b.value(path)
        family = path.split(".")[0]
        se_a = to_float(a.metrics.get(family, {}).get("se")) if path.endswith(".mean") else math.nan
        se_b = to_float(b.metrics.get(family, {}).get("se")) if path.endswith(".mean") else math.nan
        delta = vb - va if math.isfinite(va) and math.isfinite(vb) else math.nan
        se = math.hypot(se_a, se_b) if math.isfinite(se_a) and math.isfinite(se_b) else math.nan
        metrics.append(
            {
                "metric": path,
                "a": va,
                "b": vb,
                "delta": delta,
                "z": delta / se if math.isfinite(delta) and se > 0 else math.nan,
            }
        )
    return {
        "label": a.label,
        "a": a.key,
        "b": b.key,
        "run_a": str(a.run.path),
        "run_b": str(b.run.path),
        "changes": changes,
        "metrics": metrics,
        "paired": paired_difference(a.tokens, b.tokens),
    }
