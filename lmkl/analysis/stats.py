"""Summary statistics from per-token columns (NumPy, float64, no Python loops over tokens).

Conventions: standard errors are ``std(ddof=1)/sqrt(n)`` over tokens (as llama.cpp reports them;
tokens of one document are correlated, so the bootstrap in the ranking treats documents as the
unit). Quantiles are exact with linear interpolation between order statistics (NumPy's default
"linear" method), extended so that ``+inf`` values (a candidate giving zero probability where the
reference does not) propagate instead of turning into NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np

from lmkl.analysis.bootstrap import DocSums, bootstrap_unit, mean_ci

#: ``ci_method`` of a metric whose CI resamples documents (windows: the text is one stream).
CI_BY_DOCUMENT = "document bootstrap"
CI_BY_WINDOW = "window bootstrap"

QUANTILES: dict[str, float] = {
    "median": 0.5,
    "p90": 0.90,
    "p95": 0.95,
    "p99": 0.99,
    "p999": 0.999,
}

#: Reference top-1 probability buckets: [lo, hi), the last one closed at 1.
CONFIDENCE_BUCKETS: tuple[tuple[float, float], ...] = (
    (0.0, 0.25),
    (0.25, 0.5),
    (0.5, 0.75),
    (0.75, 0.95),
    (0.95, 1.0),
)


def quantiles(values: np.ndarray, probs: list[float]) -> list[float]:
    """Linear-interpolation quantiles of ``values`` that may contain ``+inf`` (no NaN allowed)."""
    if values.size == 0:
        return [math.nan] * len(probs)
    ordered = np.sort(values.astype(np.float64))
    out = []
    for prob in probs:
        h = (ordered.size - 1) * prob
        lo, hi = math.floor(h), math.ceil(h)
        out.append(interpolate_quantile(float(ordered[lo]), float(ordered[hi]), h - lo))
    return out


def interpolate_quantile(a: float, b: float, weight: float) -> float:
    """The quantile between order statistics ``a <= b`` at ``weight`` in [0, 1) from ``a``
    (``+inf`` at ``b`` propagates instead of giving ``inf - inf = NaN``)."""
    if weight == 0 or a == b:
        return float(a)
    if math.isinf(b):
        return math.inf
    return float(a + (b - a) * weight)


def mean_se(values: np.ndarray) -> tuple[float, float]:
    """Mean and its standard error (``nan`` se for fewer than two values)."""
    n = values.size
    if n == 0:
        return math.nan, math.nan
    values = values.astype(np.float64)
    if np.isinf(values).any():
        return float(values.mean()), math.inf
    mean = float(values.mean())
    se = float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan
    return mean, se


def distribution(values: np.ndarray) -> dict[str, Any]:
    """``mean``, ``se``, quantiles, ``max``, ``min`` and the count of infinite values."""
    values = values.astype(np.float64)
    mean, se = mean_se(values)
    summary: dict[str, Any] = {"mean": mean, "se": se}
    summary.update(zip(QUANTILES, quantiles(values, list(QUANTILES.values())), strict=True))
    summary["max"] = float(values.max()) if values.size else math.nan
    summary["min"] = float(values.min()) if values.size else math.nan
    infinite = np.isinf(values)
    summary["infinite"] = int(infinite.sum())
    if infinite.any():
        finite = values[~infinite]
        summary["mean_finite"] = float(finite.mean()) if finite.size else math.nan
    return summary


def correlation(a: np.ndarray, b: np.ndarray) -> float:
    """Pearson correlation over entries finite in both (nan if undefined)."""
    keep = np.isfinite(a) & np.isfinite(b)
    if keep.sum() < 2:
        return math.nan
    x, y = a[keep].astype(np.float64), b[keep].astype(np.float64)
    if x.std() == 0 or y.std() == 0:
        return math.nan
    return float(np.corrcoef(x, y)[0, 1])


def confidence_buckets(kl: np.ndarray, top1_prob: np.ndarray) -> list[dict[str, Any]]:
    """Mean and median KL by the reference's top-1 probability (where the reference is sure)."""
    rows = []
    index = confidence_bucket_index(top1_prob)
    for i, (lo, hi) in enumerate(CONFIDENCE_BUCKETS):
        values = kl[index == i]
        mean, se = mean_se(values)
        rows.append(
            {
                "bucket": f"[{lo:.2f}, {hi:.2f}{']' if hi == 1.0 else ')'}",
                "low": lo,
                "high": hi,
                "tokens": int(values.size),
                "share": float(values.size / max(kl.size, 1)),
                "kl_mean": mean,
                "kl_se": se,
                "kl_median": quantiles(values, [0.5])[0],
            }
        )
    return rows


def confidence_bucket_index(top1_prob: np.ndarray) -> np.ndarray:
    """Each token's :data:`CONFIDENCE_BUCKETS` index from the reference's top-1 probability."""
    edges = np.asarray([lo for lo, _ in CONFIDENCE_BUCKETS] + [np.inf])
    return np.clip(
        np.searchsorted(edges, top1_prob, side="right") - 1, 0, len(CONFIDENCE_BUCKETS) - 1
    )


def kl_ci(
    kl: np.ndarray, doc_ids: np.ndarray, window_ids: np.ndarray, seed: int = 0
) -> tuple[float, float, str]:
    """The 95 % percentile-bootstrap CI of the mean KL, resampling documents (windows when the
    tokens come from fewer than two documents), as ``(low, high, ci_method)``.

    ``kl`` holds every scored position, NaN where the logits were not finite (left out, as in
    the ranking, whose CI this equals for the same ``seed``).
    """
    doc_ids = np.asarray(doc_ids)
    by_window = bootstrap_unit(np.unique(doc_ids).size) == "window_id"
    units = np.asarray(window_ids) if by_window else doc_ids
    _, index = np.unique(units, return_inverse=True)
    n_units = int(index.max()) + 1 if index.size else 0
    low, high = mean_ci(DocSums.from_tokens(kl, index, n_units), seed=seed)
    return low, high, CI_BY_WINDOW if by_window else CI_BY_DOCUMENT


def summarize(columns: Mapping[str, np.ndarray], seed: int = 0) -> dict[str, Any]:
    """The ``metrics`` object of results.json for one candidate, from its per-token columns.

    ``columns`` holds the per-token arrays of :data:`~lmkl.scoring.divergence.TOKEN_METRIC_NAMES`
    plus
    ``nonfinite`` (bool), ``bytes`` (UTF-8 bytes per token), ``doc_id`` and ``window_id``.
    ``seed`` draws the bootstrap of the KL mean's CI (:func:`kl_ci`).
    """
    nonfinite = np.asarray(columns["nonfinite"], dtype=bool)
    keep = ~nonfinite

    def col(name: str) -> np.ndarray:
        return np.asarray(columns[name], dtype=np.float64)[keep]

    kl, nll_p, nll_q = col("kl"), col("nll_reference"), col("nll_candidate")
    # A target both models give probability 0 (e.g. outside both output layers) says nothing
    # about their ratio: inf - inf is excluded and counted, never a NaN mean.
    both_zero = np.isposinf(nll_p) & np.isposinf(nll_q)
    ln_ratio_mean, ln_ratio_se = mean_se(nll_q[~both_zero] - nll_p[~both_zero])
    dp = col("delta_p")
    dp_mean, dp_se = mean_se(dp)
    doc_ids = np.asarray(columns["doc_id"])
    window_ids = np.asarray(columns["window_id"])
    all_kl = np.where(nonfinite, np.nan, np.asarray(columns["kl"], dtype=np.float64))
    return metrics_block(
        distributions={name: distribution(col(name)) for name in ("kl", "reverse_kl", "jsd")},
        entropy=(_mean(col("entropy_reference")), _mean(col("entropy_candidate"))),
        nll=(_mean(nll_p), _mean(nll_q)),
        nll_sums=(float(nll_p.sum()), float(nll_q.sum())) if nll_p.size else None,
        ln_ratio=(ln_ratio_mean, ln_ratio_se, int(both_zero.sum())),
        nll_correlation=correlation(nll_p, nll_q),
        total_bytes=float(np.asarray(columns["bytes"], dtype=np.float64)[keep].sum()),
        delta_p=(dp_mean, dp_se, float(np.sqrt(np.mean(dp**2))) if dp.size else math.nan),
        top1_agreement=mean_se(col("top1_agree")),
        top1_in_top5=mean_se(col("top1_in_top5")),
        buckets=confidence_buckets(kl, col("reference_top1_prob")),
        counts={
            "documents": int(np.unique(doc_ids).size),
            "windows": int(np.unique(window_ids).size),
            "tokens": int(keep.sum()),
            "nonfinite": int(nonfinite.sum()),
            "nonfinite_share": float(nonfinite.mean()) if nonfinite.size else 0.0,
            "infinite": int(np.isinf(kl).sum()),
        },
        kl_ci=kl_ci(all_kl, doc_ids, window_ids, seed),
    )


def metrics_block(
    *,
    distributions: dict[str, dict[str, Any]],
    entropy: tuple[float, float],
    nll: tuple[float, float],
    nll_sums: tuple[float, float] | None,
    ln_ratio: tuple[float, float, int],
    nll_correlation: float,
    total_bytes: float,
    delta_p: tuple[float, float, float],
    top1_agreement: tuple[float, float],
    top1_in_top5: tuple[float, float],
    buckets: list[dict[str, Any]],
    counts: dict[str, Any],
    kl_ci: tuple[float, float, str] | None = None,
) -> dict[str, Any]:
    """The ``metrics`` object from its ingredients (in memory: :func:`summarize`; streamed:
    :class:`lmkl.analysis.streaming.TokenSummary`), so both write one layout."""
    mean_nll_p, mean_nll_q = nll
    ppl_p, ppl_q = _exp(mean_nll_p), _exp(mean_nll_q)
    bpb = [_bits_per_byte(total, total_bytes) for total in nll_sums] if nll_sums else [math.nan] * 2
    if kl_ci is not None:
        # The CI of the headline number, beside it: a 95 % bootstrap over documents, far wider
        # than mean ± 1.96·se over tokens (tokens of one document are correlated).
        low, high, method = kl_ci
        distributions = distributions | {
            "kl": distributions["kl"] | {"ci_low": low, "ci_high": high, "ci_method": method}
        }
    return {
        **distributions,
        "entropy": {"reference": entropy[0], "candidate": entropy[1]},
        "nll": {"reference": mean_nll_p, "candidate": mean_nll_q},
        "ppl": {
            "reference": ppl_p,
            "candidate": ppl_q,
            "ratio": ppl_q / ppl_p if ppl_p and math.isfinite(ppl_p) else math.nan,
        },
        "ln_ppl_ratio": {
            "mean": ln_ratio[0],
            "se": ln_ratio[1],
            # tokens left out: probability 0 under both models (+inf - +inf has no value)
            "excluded_zero_probability": ln_ratio[2],
        },
        "nll_correlation": nll_correlation,
        "bits_per_byte": {"reference": bpb[0], "candidate": bpb[1], "bytes": int(total_bytes)},
        "delta_p": {"mean": delta_p[0], "se": delta_p[1], "rms": delta_p[2]},
        "top1_agreement": {"mean": top1_agreement[0], "se": top1_agreement[1]},
        "top1_in_top5": {"mean": top1_in_top5[0], "se": top1_in_top5[1]},
        "kl_by_confidence": buckets,
        "counts": counts,
    }


def _mean(values: np.ndarray) -> float:
    return float(values.mean()) if values.size else math.nan


def _exp(x: float) -> float:
    if not math.isfinite(x):
        return x
    return math.exp(x) if x < 700 else math.inf


def _bits_per_byte(nll_sum: float, total_bytes: float) -> float:
    """Bits per byte: −Σ log-likelihood / (Σ bytes · ln 2)."""
    if total_bytes <= 0:
        return math.nan
    return float(nll_sum / total_bytes / math.log(2))


def ratio_mean_se(numerators: np.ndarray, denominators: np.ndarray) -> tuple[float, float]:
    """``Σ x / Σ w`` over units (e.g. documents) and its delta-method standard error.

    ``se = sqrt(Σ (x_i − R w_i)² / (n(n−1))) / mean(w)``: the usual ratio-estimator error when
    the units, not the tokens or bytes inside them, are the independent draws.
    """
    x = np.asarray(numerators, dtype=np.float64)
    w = np.asarray(denominators, dtype=np.float64)
    total = float(w.sum())
    if x.size == 0 or total <= 0:
        return math.nan, math.nan
    ratio = float(x.sum() / total)
    n = x.size
    if n < 2 or not np.isfinite(x).all():
        return ratio, math.nan
    resid = x - ratio * w
    return ratio, float(math.sqrt(np.sum(resid**2) / (n * (n - 1))) / w.mean())
