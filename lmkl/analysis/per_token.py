"""Aggregations over one candidate's per-token columns: KL histogram and CDF, KL by position in
the window, the tokens it diverges on most, and per-token differences between two runs.

All vectorised (``bincount``/``lexsort`` over whole columns), so millions of tokens aggregate in
seconds. Units: KL in nats, KL(P‖Q) with P the reference and Q the candidate.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np


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
