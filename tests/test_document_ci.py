"""Every candidate's mean KL carries its document-bootstrap CI (issue 21, item 3).

Before, only runs with two or more candidates got a bootstrap (in the leaderboard); a single
candidate showed mean ± 1.96·se over tokens, far too narrow when tokens of one document are
correlated. The CI is checked against a float64 NumPy bootstrap written from the documented
draw, and against the leaderboard's CI of the same candidate.
"""

from __future__ import annotations

import numpy as np
import pytest

from lmkl.analysis import stats
from lmkl.analysis.ranking import rank_one_run
from lmkl.analysis.streaming import summarize_chunks
from lmkl.scoring.divergence import TOKEN_METRIC_NAMES


def correlated_columns(seed: int, docs: int = 40, per_doc: int = 50) -> dict[str, np.ndarray]:
    """Tokens whose KL level is set per document (strong within-document correlation)."""
    rng = np.random.default_rng(seed)
    doc_id = np.repeat(np.arange(docs), per_doc)
    level = rng.lognormal(-1, 1, docs)
    n = doc_id.size
    columns = {name: rng.random(n) for name in TOKEN_METRIC_NAMES}
    columns["kl"] = level[doc_id] * rng.exponential(1.0, n)
    nonfinite = np.zeros(n, bool)
    nonfinite[[3, 77]] = True  # left out of every mean, and of the bootstrap
    columns |= {
        "nonfinite": nonfinite,
        "bytes": np.ones(n),
        "doc_id": doc_id * 10 + 5,  # ids need not be 0..n-1
        "window_id": np.arange(n) // 25,
    }
    return columns


def numpy_bootstrap(kl, doc_id, keep, resamples=1000, seed=0):
    """The documented draw: per resample u = rng.random(n_docs), documents floor(u·n)."""
    docs, index = np.unique(doc_id, return_inverse=True)
    sums = np.bincount(index[keep], weights=kl[keep], minlength=docs.size)
    counts = np.bincount(index[keep], minlength=docs.size).astype(np.float64)
    rng = np.random.default_rng(seed)
    stats_ = []
    for _ in range(resamples):
        pick = np.floor(rng.random(docs.size) * docs.size).astype(int)
        stats_.append(sums[pick].sum() / counts[pick].sum())
    return np.quantile(np.array(stats_), [0.025, 0.975])


def test_single_candidate_gets_the_document_bootstrap_ci():
    columns = correlated_columns(seed=1)
    kl = stats.summarize(columns)["kl"]
    want = numpy_bootstrap(columns["kl"], columns["doc_id"], ~columns["nonfinite"])
    assert kl["ci_method"] == "document bootstrap"
    assert [kl["ci_low"], kl["ci_high"]] == pytest.approx(want, rel=1e-12)
    # Far wider than the token interval the tables used to show for one candidate.
    assert kl["ci_high"] - kl["ci_low"] > 3 * (2 * 1.96 * kl["se"])
    # Streamed (a chunk at a time) gives the same CI.
    parts = [{k: v[i::3] for k, v in columns.items()} for i in range(3)]
    streamed = summarize_chunks(lambda: iter(parts)).result()["kl"]
    assert [streamed["ci_low"], streamed["ci_high"]] == pytest.approx(want, rel=1e-12)


def test_the_ci_equals_the_leaderboard_ci_of_the_same_candidate():
    a, b = correlated_columns(seed=2), correlated_columns(seed=3)
    values = {label: np.where(c["nonfinite"], np.nan, c["kl"]) for label, c in (("a", a), ("b", b))}
    board = rank_one_run(values, a["doc_id"], {"a": {}, "b": {}}, seed=0)["leaderboard"]
    for label, columns in (("a", a), ("b", b)):
        row = next(r for r in board if r["label"] == label)
        kl = stats.summarize(columns)["kl"]
        assert [kl["ci_low"], kl["ci_high"]] == pytest.approx(row["ci"], rel=1e-12)


def test_one_document_resamples_its_windows():
    columns = correlated_columns(seed=4)
    columns["doc_id"] = np.zeros_like(columns["doc_id"])  # llama-cpp style: one stream
    kl = stats.summarize(columns)["kl"]
    want = numpy_bootstrap(columns["kl"], columns["window_id"], ~columns["nonfinite"])
    assert kl["ci_method"] == "window bootstrap"
    assert [kl["ci_low"], kl["ci_high"]] == pytest.approx(want, rel=1e-12)
