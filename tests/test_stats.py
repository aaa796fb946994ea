"""Summary statistics against NumPy/SciPy computed independently."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats as sps

from lmkl import files
from lmkl.analysis import stats


def test_quantiles_match_numpy_linear():
    rng = np.random.default_rng(0)
    values = rng.exponential(size=1001)
    probs = [0.0, 0.5, 0.9, 0.95, 0.99, 0.999, 1.0]
    np.testing.assert_allclose(
        stats.quantiles(values, probs), np.quantile(values, probs), rtol=1e-12
    )


def test_quantiles_propagate_infinity_without_nan():
    values = np.array([0.1, 0.2, 0.3, np.inf])
    got = stats.quantiles(values, [0.5, 0.9, 1.0])
    assert got[0] == pytest.approx(0.25)
    assert got[1] == math.inf and got[2] == math.inf
    assert not any(math.isnan(v) for v in got)


def test_distribution_with_infinite_values():
    summary = stats.distribution(np.array([0.5, 1.5, np.inf]))
    assert summary["mean"] == math.inf
    assert summary["infinite"] == 1
    assert summary["mean_finite"] == pytest.approx(1.0)
    assert summary["min"] == 0.5


def test_mean_se():
    values = np.random.default_rng(1).normal(size=50)
    mean, se = stats.mean_se(values)
    assert mean == pytest.approx(values.mean())
    assert se == pytest.approx(sps.sem(values))


def test_confidence_buckets_partition_tokens():
    rng = np.random.default_rng(2)
    top1 = np.concatenate([rng.uniform(size=200), [0.0, 0.25, 0.95, 1.0]])
    kl = rng.exponential(size=top1.size)
    buckets = stats.confidence_buckets(kl, top1)
    assert sum(b["tokens"] for b in buckets) == kl.size
    for b in buckets:
        lo, hi = b["low"], b["high"]
        inside = (top1 >= lo) & ((top1 < hi) if hi < 1 else (top1 <= hi))
        assert b["tokens"] == inside.sum()
        if inside.any():
            assert b["kl_mean"] == pytest.approx(kl[inside].mean())
            assert b["kl_median"] == pytest.approx(np.median(kl[inside]))


def test_summarize_excludes_nonfinite_rows():
    n = 6
    cols = {
        name: np.arange(1, n + 1, dtype=float) / 10
        for name in (
            "kl",
            "reverse_kl",
            "jsd",
            "entropy_reference",
            "entropy_candidate",
            "nll_reference",
            "nll_candidate",
            "delta_p",
            "top1_agree",
            "top1_in_top5",
            "reference_top1_prob",
        )
    }
    cols["kl"][2] = np.nan
    cols["nonfinite"] = np.array([False, False, True, False, False, False])
    cols["bytes"] = np.full(n, 3)
    cols["doc_id"] = np.array([0, 0, 0, 1, 1, 1])
    cols["window_id"] = np.array([0, 0, 0, 1, 1, 2])
    metrics = stats.summarize(cols)
    keep = ~cols["nonfinite"]
    assert metrics["kl"]["mean"] == pytest.approx(cols["kl"][keep].mean())
    assert metrics["counts"] == {
        "documents": 2,
        "windows": 3,
        "tokens": 5,
        "nonfinite": 1,
        "nonfinite_share": pytest.approx(1 / 6),
        "infinite": 0,
    }
    assert metrics["bits_per_byte"]["reference"] == pytest.approx(
        cols["nll_reference"][keep].sum() / 15 / math.log(2)
    )


def test_json_safe():
    assert files.to_json_safe({"a": [math.inf, math.nan, 1.0]}) == {"a": ["inf", None, 1.0]}
