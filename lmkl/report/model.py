"""Assemble a report from one or more finished run directories (no model, no torch needed).

Everything here reads the run directory contract (``results.json``, ``tokens.parquet``,
``worst.json``) and aggregates with pyarrow/NumPy: group-bys are ``bincount``/``lexsort`` over
whole columns, so a run of millions of tokens reports in seconds. Rendering lives elsewhere:
:mod:`lmkl.report.plots` draws, :mod:`lmkl.report.render` writes HTML/Markdown/JSON/terminal output.

Units: KL, JSD and NLL in nats; KL(P‖Q) with P the reference and Q the candidate.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lmkl.analysis import metrics as registry
from lmkl.analysis.ranking import pareto_front as ranking_pareto_front
from lmkl.engine.results import check_schema
from lmkl.engine.rundir import load_tokens
from lmkl.errors import OutputError, UsageError
from lmkl.files import to_json_safe
from lmkl.formatting import Z95, prose, to_float
from lmkl.formatting import percent as _percent

#: Columns of tokens.parquet the report reads (the others are not needed for any view).
REPORT_COLUMNS = (
    "candidate",
    "doc_id",
    "position",
    "window_pos",
    "token_id",
    "kl",
    "nll_reference",
    "nll_candidate",
)

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


def _count(value: Any) -> int:
    """A count from results.json (0 when missing: a per-byte run counts no KL tokens)."""
    x = to_float(value)
    return int(x) if math.isfinite(x) else 0


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


# --------------------------------------------------------------------------------------------
# Reading run directories


@dataclass
class RunInfo:
    """One run directory and its results."""

    path: Path
    name: str
    results: dict[str, Any]
    worst: list[dict[str, Any]]

    @property
    def reference_label(self) -> str:
        return str(self.results.get("reference", {}).get("label", "reference"))


@dataclass
class CandidateTokens:
    """One candidate's per-token columns (NumPy; KL as float64 with NaN for non-finite logits)."""

    kl: np.ndarray
    window_pos: np.ndarray
    token_id: np.ndarray
    doc_id: np.ndarray
    position: np.ndarray
    nll_reference: np.ndarray
    nll_candidate: np.ndarray

    @property
    def finite(self) -> np.ndarray:
        return np.isfinite(self.kl)

    def keys(self) -> np.ndarray:
        """One int64 per token identifying (document, position): equal across runs on one data."""
        return (self.doc_id.astype(np.int64) << 32) | (self.position.astype(np.int64) & 0xFFFFFFFF)


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
        """This candidate's size on ``axis`` (see :attr:`Report.size_axis`)."""
        return {
            "parameters": self.params,
            "bytes_on_disk": self.bytes_on_disk,
            "bits_per_weight": self.bits_per_weight,
        }[axis]

    @property
    def step(self) -> float:
        return to_float(self._meta("step"))

    @property
    def group(self) -> str | None:
        group = self._meta("group")
        return str(group) if group is not None else None

    def value(self, path: str) -> float:
        return registry.lookup(self.metrics, path)


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise OutputError(
            f"{what} '{path}' is not valid JSON ({exc.msg}, line {exc.lineno})",
            "rerun the comparison to rewrite it",
        ) from exc


def load_run(path: Path) -> RunInfo:
    """Read a finished run directory's results.json and worst.json (tokens are read later)."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(
            f"run directory '{path}' does not exist",
            "pass a directory written by `lmkl compare`, `lmkl run` or `lmkl demo`",
        )
    results_path = path / "results.json"
    if not results_path.exists():
        hint = (
            "the run is unfinished; continue it with --resume"
            if (path / "progress.json").exists() or (path / "parts").exists()
            else "pass a directory written by `lmkl compare`, `lmkl run` or `lmkl demo`"
        )
        raise OutputError(f"'{path}' has no results.json (not a finished lmkl run)", hint)
    results = _load_json(results_path, "results file")
    if isinstance(results, dict):
        check_schema(results, results_path, "results file")
    if not isinstance(results, dict) or not isinstance(results.get("candidates"), list):
        raise OutputError(
            f"'{results_path}' has no candidates list", "pass a run directory written by lmkl"
        )
    worst_path = path / "worst.json"
    worst = _load_json(worst_path, "worst-positions file") if worst_path.exists() else []
    return RunInfo(
        path=path,
        name=path.resolve().name,
        results=results,
        worst=worst if isinstance(worst, list) else [],
    )


def read_candidate_tokens(run_dir: Path, labels: Iterable[str]) -> dict[str, CandidateTokens]:
    """Per-candidate NumPy columns of a run's tokens.parquet, split by label without row loops."""
    labels = list(labels)
    path = Path(run_dir) / "tokens.parquet"
    if not path.exists():
        return {}
    try:
        available = set(pq.read_schema(path).names)
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(
            f"cannot read '{path}': the file is damaged ({str(exc).splitlines()[0][:120]})",
            "rerun the comparison to write it again",
        ) from exc
    columns = [c for c in REPORT_COLUMNS if c in available]
    table = load_tokens(Path(run_dir), columns=columns)
    # One array first: chunks encoded separately could carry different dictionaries.
    encoded = pc.dictionary_encode(table["candidate"].combine_chunks())
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    names = encoded.dictionary.to_pylist()
    # One stable sort by candidate code, then contiguous slices: no per-label full-table filter.
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(names) + 1))

    def column(name: str, dtype: Any, fill: float = 0) -> np.ndarray:
        if name not in table.column_names:
            return np.full(len(codes), fill, dtype=dtype)
        chunked = table[name]
        if pa.types.is_floating(chunked.type):
            chunked = pc.fill_null(chunked, math.nan)
        return chunked.to_numpy().astype(dtype, copy=False)[order]

    kl = column("kl", np.float64, math.nan)
    window_pos = column("window_pos", np.int64)
    token_id = column("token_id", np.int64)
    doc_id = column("doc_id", np.int64)
    position = column("position", np.int64)
    nll_p = column("nll_reference", np.float64, math.nan)
    nll_q = column("nll_candidate", np.float64, math.nan)
    out: dict[str, CandidateTokens] = {}
    for code, name in enumerate(names):
        if name not in labels:
            continue
        s = slice(bounds[code], bounds[code + 1])
        out[name] = CandidateTokens(
            kl=kl[s],
            window_pos=window_pos[s],
            token_id=token_id[s],
            doc_id=doc_id[s],
            position=position[s],
            nll_reference=nll_p[s],
            nll_candidate=nll_q[s],
        )
    return out


# --------------------------------------------------------------------------------------------
# Aggregations (all vectorised)


def kl_histogram(kls: dict[str, np.ndarray], bins: int = 60) -> dict[str, Any]:
    """Histogram of KL on shared log-spaced bins, as a share of each candidate's tokens.

    Values below the lowest edge (including exact zeros) are counted in the first bin and
    reported as ``below``; ``+inf`` values are not binned but counted in ``infinite``.
    """
    positives = [v[np.isfinite(v) & (v > 0)] for v in kls.values()]
    positives = [v for v in positives if v.size]
    if not positives:
        return {"edges": [], "series": {}}
    lo = max(min(float(v.min()) for v in positives), 1e-9)
    hi = max(float(v.max()) for v in positives)
    lo_exp, hi_exp = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if hi_exp <= lo_exp:
        hi_exp = lo_exp + 1
    edges = np.logspace(lo_exp, hi_exp, bins + 1)
    series = {}
    for key, values in kls.items():
        finite = values[np.isfinite(values)]
        counts, _ = np.histogram(np.clip(finite, edges[0], edges[-1]), bins=edges)
        total = int(np.count_nonzero(~np.isnan(values)))
        series[key] = {
            "counts": counts.astype(np.int64),
            "share": counts / max(total, 1),
            "below": int(np.count_nonzero(finite < edges[0])),
            "infinite": int(np.count_nonzero(np.isposinf(values))),
            "tokens": total,
        }
    return {"edges": edges, "series": series}


def kl_cdf(kls: dict[str, np.ndarray], points: int = 401) -> dict[str, Any]:
    """Empirical CDF of KL per candidate at ``points`` quantiles (share of all scored tokens).

    ``x`` are the finite KL quantiles; ``y`` the share of tokens (infinite ones included in the
    denominator, so a candidate with ``+inf`` tokens never reaches 1).
    """
    probs = np.linspace(0.0, 1.0, points)
    series = {}
    for key, values in kls.items():
        scored = values[~np.isnan(values)]
        finite = scored[np.isfinite(scored)]
        if finite.size == 0:
            continue
        series[key] = {
            "x": np.quantile(finite, probs),
            "y": probs * finite.size / scored.size,
        }
    return {"series": series}


def grouped_mean_median(
    groups: np.ndarray,
    values: np.ndarray,
    n_groups: int,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count, mean and median of ``values`` per integer group (NaN where a group is empty).

    Medians come from one ``lexsort`` by (group, value): the middle order statistics of each
    group's contiguous run, averaged for even counts (NumPy's ``median``).
    """
    counts = np.bincount(groups, minlength=n_groups).astype(np.int64)
    sums = np.bincount(groups, weights=values, minlength=n_groups)
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    medians = np.full(n_groups, np.nan)
    if values.size:
        order = np.lexsort((values, groups))
        ordered = values[order]
        starts = np.concatenate([[0], np.cumsum(counts)[:-1]])
        has = counts > 0
        lo = starts[has] + (counts[has] - 1) // 2
        hi = starts[has] + counts[has] // 2
        medians[has] = (ordered[lo] + ordered[hi]) / 2
    return counts, means, medians


def kl_by_position(
    tokens: dict[str, CandidateTokens],
    max_bins: int = 64,
) -> dict[str, Any]:
    """Mean and median (finite) KL by position in the context window.

    One bin per position when the window has at most ``2 * max_bins`` positions; otherwise
    ``max_bins`` equal-width bins. Only bins holding tokens are returned.
    """
    if not tokens:
        return {"series": {}, "bin_width": 1}
    n_pos = (
        int(max((int(t.window_pos.max()) if t.window_pos.size else 0) for t in tokens.values())) + 1
    )
    width = 1 if n_pos <= 2 * max_bins else math.ceil(n_pos / max_bins)
    n_bins = math.ceil(n_pos / width)
    series = {}
    for key, t in tokens.items():
        keep = t.finite
        groups = (t.window_pos[keep] // width).astype(np.int64)
        counts, means, medians = grouped_mean_median(groups, t.kl[keep], n_bins)
        present = counts > 0
        starts = np.arange(n_bins)[present] * width
        series[key] = {
            "start": starts,
            "center": starts + (width - 1) / 2,
            "count": counts[present],
            "mean": means[present],
            "median": medians[present],
        }
    return {"series": series, "bin_width": width}


def token_divergence(
    t: CandidateTokens,
    top: int = 15,
    min_count: int | None = None,
) -> dict[str, Any]:
    """The token ids on which a candidate diverges most: by total (sum) and by mean KL.

    Grouped with ``bincount`` over token ids; infinite and non-finite KL are left out of the
    sums and counted separately. The mean ranking only considers tokens seen ``min_count``
    times (default 5, or 2 for runs under 1000 tokens) so one-off tokens do not dominate it.
    """
    keep = t.finite
    ids = t.token_id[keep]
    if ids.size == 0:
        return {"by_total": [], "by_mean": [], "min_count": min_count or 0, "total_kl": 0.0}
    size = int(t.token_id.max()) + 1
    counts = np.bincount(ids, minlength=size)
    totals = np.bincount(ids, weights=t.kl[keep], minlength=size)
    infinite = np.bincount(t.token_id[np.isposinf(t.kl)], minlength=size)
    total_kl = float(totals.sum())
    if min_count is None:
        min_count = 5 if keep.sum() >= 1000 else 2
    with np.errstate(invalid="ignore", divide="ignore"):
        means = np.where(counts > 0, totals / np.maximum(counts, 1), np.nan)

    def rows(order: np.ndarray) -> list[dict[str, Any]]:
        return [
            {
                "token_id": int(i),
                "count": int(counts[i]),
                "total_kl": float(totals[i]),
                "mean_kl": float(means[i]),
                "share_of_kl": float(totals[i] / total_kl) if total_kl > 0 else math.nan,
                "infinite": int(infinite[i]),
            }
            for i in order
        ]

    seen = np.flatnonzero(counts > 0)
    by_total = seen[np.argsort(-totals[seen], kind="stable")[:top]]
    frequent = np.flatnonzero(counts >= min_count)
    by_mean = frequent[np.argsort(-means[frequent], kind="stable")[:top]]
    return {
        "by_total": rows(by_total),
        "by_mean": rows(by_mean),
        "min_count": int(min_count),
        "total_kl": total_kl,
    }


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
                "tokens": _count(bucket.get("tokens")),
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


# --------------------------------------------------------------------------------------------
# Token strings


class TokenNamer:
    """Turns token ids into strings without loading a model.

    Uses the reference's ``tokenizer.json`` (fast ``tokenizers`` library) when the reference was a
    local directory that still exists; otherwise the strings stored in worst.json; otherwise the
    id itself (``#123``).
    """

    def __init__(self, runs: list[RunInfo]) -> None:
        self._known: dict[int, str] = {}
        self._tokenizer: Any = None
        self.source = "ids"
        for run in runs:
            for entry in run.worst:
                self._remember(entry.get("token_id"), entry.get("token"))
                for key in ("reference_top5", "candidate_top5"):
                    for item in entry.get(key) or []:
                        if isinstance(item, dict):
                            self._remember(item.get("token_id"), item.get("token"))
        if self._known:
            self.source = "worst.json"
        for run in runs:
            path = run.results.get("reference", {}).get("path")
            if path and (Path(path) / "tokenizer.json").is_file():
                try:
                    from tokenizers import Tokenizer

                    self._tokenizer = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
                    self.source = "tokenizer"
                    break
                except Exception:  # a tokenizer we cannot read: fall back, never fail a report
                    self._tokenizer = None

    def _remember(self, token_id: Any, token: Any) -> None:
        if isinstance(token_id, int) and isinstance(token, str):
            self._known.setdefault(token_id, token)

    def __call__(self, token_id: int) -> str:
        token_id = int(token_id)
        if self._tokenizer is not None:
            try:
                return self._tokenizer.decode([token_id], skip_special_tokens=False)
            except Exception:
                pass
        if token_id in self._known:
            return self._known[token_id]
        return f"#{token_id}"

    def many(self, ids: Iterable[int]) -> list[str]:
        """Strings of many ids (one batch call when a tokenizer is available)."""
        ids = [int(i) for i in ids]
        if self._tokenizer is not None:
            try:
                return self._tokenizer.decode_batch([[i] for i in ids], skip_special_tokens=False)
            except Exception:
                pass
        return [self(i) for i in ids]


def visible(text: str, limit: int | None = None) -> str:
    """A token string with its whitespace made visible (for tables of single tokens)."""
    out = text.replace("\r", "␍").replace("\n", "↵").replace("\t", "⇥").replace(" ", "·")
    if not out:
        out = "∅"
    if limit is not None and len(out) > limit:
        out = out[: limit - 1] + "…"
    return out


# --------------------------------------------------------------------------------------------
# The report


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
        else ``parameters``, else ``bytes_on_disk``; None when sizes are unknown."""
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

    def ranking_metric(self) -> str | None:
        for run in self.runs:
            ranking = run.results.get("ranking")
            if isinstance(ranking, dict) and isinstance(ranking.get("metric"), str):
                return ranking["metric"]
        return None

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


def _ranking_ci(ranking: Any, label: str) -> tuple[float, float] | None:
    """The bootstrap CI of ``label`` in an experiment's ranking (``leaderboard[i].ci``)."""
    if not isinstance(ranking, dict):
        return None
    for entry in ranking.get("leaderboard") or []:
        if isinstance(entry, dict) and entry.get("label") == label:
            ci = entry.get("ci") or []
            if len(ci) == 2:
                lo, hi = to_float(ci[0]), to_float(ci[1])
                if math.isfinite(lo) and math.isfinite(hi):
                    return lo, hi
    return None


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


def paired_difference(
    a: CandidateTokens | None, b: CandidateTokens | None
) -> dict[str, Any] | None:
    """Per-token KL differences (b − a) on the tokens both runs scored (same document, position,
    and token id); None when they share no token."""
    if a is None or b is None or a.kl.size == 0 or b.kl.size == 0:
        return None
    _, ia, ib = np.intersect1d(a.keys(), b.keys(), assume_unique=True, return_indices=True)
    same = a.token_id[ia] == b.token_id[ib]
    ia, ib = ia[same], ib[same]
    both = np.isfinite(a.kl[ia]) & np.isfinite(b.kl[ib])
    ka, kb = a.kl[ia][both], b.kl[ib][both]
    if ka.size == 0:
        return None
    diff = kb - ka
    se = float(diff.std(ddof=1) / math.sqrt(diff.size)) if diff.size > 1 else math.nan
    corr = (
        float(np.corrcoef(ka, kb)[0, 1])
        if diff.size > 1 and ka.std() > 0 and kb.std() > 0
        else math.nan
    )
    return {
        "tokens": int(diff.size),
        "coverage_a": float(ia.size / a.kl.size),
        "coverage_b": float(ib.size / b.kl.size),
        "mean_delta": float(diff.mean()),
        "se": se,
        "max_abs_delta": float(np.abs(diff).max()),
        "identical_share": float(np.mean(np.abs(diff) <= 1e-6)),
        "b_higher_share": float(np.mean(diff > 1e-6)),
        "correlation": corr,
    }


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
    for run in runs:
        per_label = read_candidate_tokens(run.path, [v.label for v in views if v.run is run])
        if not per_label:
            notes.append(
                f"{run.name}: no tokens.parquet; distribution, position and token views "
                "are missing for its candidates"
            )
        for v in views:
            if v.run is run:
                v.tokens = per_label.get(v.label)
    views = _sort_views(views, sort_by)
    for i, v in enumerate(views):
        v.color = PALETTE[i % len(PALETTE)]
    with_tokens = {v.key: v.tokens for v in views if v.tokens is not None}
    report = Report(runs=runs, candidates=views, sort_by=sort_by, notes=notes)
    kls = {k: t.kl for k, t in with_tokens.items()}
    report.histogram = kl_histogram(kls)
    report.cdf = kl_cdf(kls)
    report.by_position = kl_by_position(with_tokens)
    namer = TokenNamer(runs)
    report.token_source = namer.source
    for v in views:
        if v.tokens is not None:
            table = token_divergence(v.tokens, top=top_tokens)
            rows = table["by_total"] + table["by_mean"]
            for row, text in zip(rows, namer.many(r["token_id"] for r in rows), strict=True):
                row["token"] = text
            report.tokens[v.key] = table
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


# --------------------------------------------------------------------------------------------
# Plain-language reading


def confidence_clause(profile: list[dict[str, Any]]) -> str | None:
    """Where a candidate's KL comes from, by the reference's confidence (share × mean per bucket).

    Buckets below 0.5 top-1 probability are "low-confidence", [0.5, 0.75) "medium", 0.75 and
    above "confident". The group holding the largest share of the total KL is named; "dominated"
    when it holds more than half of the KL and more than its share of the tokens.
    """
    infinite = [b["bucket"] for b in profile if b.get("kl_mean") == math.inf]
    if infinite:
        # Shares of an infinite total are meaningless; say where the infinite KL sits.
        return "its infinite KL sits at positions with reference top-1 probability in " + (
            ", ".join(infinite)
        )
    groups = {
        "low-confidence": [0.0, 0.0],
        "medium-confidence": [0.0, 0.0],
        "confident": [0.0, 0.0],
    }
    for bucket in profile:
        if not math.isfinite(bucket["kl_share"]):
            continue
        name = (
            "low-confidence"
            if bucket["high"] <= 0.5
            else "medium-confidence"
            if bucket["high"] <= 0.75
            else "confident"
        )
        groups[name][0] += bucket["kl_share"]
        groups[name][1] += bucket["share"] if math.isfinite(bucket["share"]) else 0.0
    if not any(share for share, _ in groups.values()):
        return None
    name, (kl_share, token_share) = max(groups.items(), key=lambda kv: kv[1][0])
    where = {
        "low-confidence": "low-confidence positions (reference top-1 probability < 0.5)",
        "medium-confidence": "medium-confidence positions (reference top-1 probability 0.5–0.75)",
        "confident": "positions where the reference is confident (top-1 probability ≥ 0.75)",
    }[name]
    if kl_share > 0.5 and token_share > 0 and kl_share / token_share < 1.1:
        # Most tokens are of this kind and they carry their share of the KL, no more.
        return (
            f"most of its KL ({_percent(kl_share, 0)}) comes from {where}, which are "
            f"{_percent(token_share, 0)} of the tokens"
        )
    verb = "is dominated by" if kl_share > 0.5 else "comes mostly from"
    return (
        f"its KL {verb} {where}: {_percent(kl_share, 0)} of the total KL on "
        f"{_percent(token_share, 0)} of the tokens"
    )


def plain_reading(report: Report) -> list[str]:
    """A few sentences computed from the numbers, for the top of the report."""
    lines = []
    for c in report.candidates:
        m = c.metrics
        agree = c.value("top1_agreement.mean")
        agree_se = to_float(m.get("top1_agreement", {}).get("se"))
        kl, kl_se = c.value("kl.mean"), to_float(m.get("kl", {}).get("se"))
        parts = []
        if math.isfinite(agree):
            err = f" ± {_percent(Z95 * agree_se)}" if math.isfinite(agree_se) else ""
            parts.append(
                f"agrees with the reference's top token on {_percent(agree)}{err} of tokens"
            )
        if math.isfinite(kl):
            err = f" ± {prose(Z95 * kl_se, 2)}" if math.isfinite(kl_se) else ""
            parts.append(
                f"has a mean KL(P‖Q) of {prose(kl)}{err} nats (median "
                f"{prose(c.value('kl.median'))}, p99 {prose(c.value('kl.p99'))})"
            )
        elif kl == math.inf:
            parts.append(
                "has an infinite mean KL (it gives zero probability to tokens the "
                "reference can produce)"
            )
        sentence = f"{c.key} " + " and ".join(parts) if parts else f"{c.key} has no scored tokens"
        clause = confidence_clause(confidence_profile(m))
        if clause:
            sentence += f"; {clause}"
        ratio = c.value("ppl.ratio")
        if math.isfinite(ratio):
            sentence += (
                f". Its perplexity is {ratio:.3g}× the reference's "
                f"({prose(c.value('ppl.candidate'))} vs {prose(c.value('ppl.reference'))})"
            )
        infinite = _count(m.get("counts", {}).get("infinite"))
        if infinite:
            sentence += (
                f". {infinite:,} token(s) got zero probability from it where the "
                "reference gave some (KL = inf)"
            )
        nonfinite = _count(m.get("counts", {}).get("nonfinite"))
        if nonfinite:
            sentence += f". {nonfinite:,} position(s) had non-finite logits and were excluded"
        lines.append(sentence + ".")
    if len(report.candidates) > 1:
        ordered = report.candidates
        metric = report.sort_by
        best = ordered[0]
        direction = "highest" if registry.higher_is_better(metric) else "lowest"
        text = (
            f"By {metric}, {best.key} is closest to the reference ({direction}: "
            f"{prose(best.value(metric))})"
        )
        if len(ordered) > 1:
            second = ordered[1]
            text += f", then {second.key} ({prose(second.value(metric))})"
            if metric.endswith(".mean"):
                family = metric.split(".")[0]
                se1 = to_float(best.metrics.get(family, {}).get("se"))
                se2 = to_float(second.metrics.get(family, {}).get("se"))
                gap = abs(second.value(metric) - best.value(metric))
                se = math.hypot(se1, se2) if math.isfinite(se1) and math.isfinite(se2) else 0
                if se > 0 and gap < Z95 * se:
                    text += "; the gap is within token-level noise (|Δ| < 1.96 combined se)"
        lines.append(text + ".")
        sizes = report.sizes()
        if sizes:
            front = [k for k, f in zip(sizes["keys"], sizes["pareto"], strict=True) if f]
            lines.append(
                f"Pareto-optimal by {sizes['axis'].replace('_', ' ')} and mean KL: "
                f"{', '.join(front)}."
            )
        for group, series in report.steps().items():
            lines.append(
                f"In the checkpoint series '{group}', the lowest mean KL is at step "
                f"{int(series['best_step'])} ({series['best']})."
            )
    for diff in report.differences:
        kl_row = next(r for r in diff["metrics"] if r["metric"] == "kl.mean")
        text = (
            f"{diff['label']} differs between runs: mean KL {prose(kl_row['a'])} in "
            f"{diff['a']} vs {prose(kl_row['b'])} in {diff['b']}"
        )
        if math.isfinite(kl_row["z"]):
            text += f" (Δ {kl_row['delta']:+.3g}, z = {kl_row['z']:.1f})"
        paired = diff.get("paired")
        if paired:
            text += (
                f"; on the {paired['tokens']:,} tokens both scored, "
                f"{_percent(paired['identical_share'])} have the same KL (within 1e-6)"
            )
        changed = [c["setting"] for c in diff["changes"] if not c["setting"].startswith("versions")]
        if changed:
            text += "; changed: " + ", ".join(changed[:6]) + ("…" if len(changed) > 6 else "")
        lines.append(text + ".")
    return lines
