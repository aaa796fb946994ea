"""Ranking statistics against straightforward NumPy loops, and a coverage check."""

from __future__ import annotations

import math

import numpy as np
import pytest

from lmkl.analysis.ranking import (
    Bootstrap,
    DocSums,
    RankingInput,
    flip_share,
    interval,
    pareto_front,
    rank,
)


def synthetic(seed: int, docs: list[int], means: list[float], noise: float = 0.3):
    """Per-token values of K candidates over documents of given lengths (doc effect + noise)."""
    rng = np.random.default_rng(seed)
    doc_index = np.repeat(np.arange(len(docs)), docs)
    doc_effect = rng.normal(0, 0.2, len(docs))[doc_index]
    values = np.stack(
        [np.abs(m + doc_effect + rng.normal(0, noise, doc_index.size)) for m in means]
    )
    return values, doc_index


def loop_bootstrap(values, doc_index, strata, weights, resamples, seed, average):
    """The documented protocol, one resample and one document at a time."""
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(strata)])
    by_doc = [np.flatnonzero(doc_index == d) for d in range(offsets[-1])]
    out = np.empty((resamples, len(values)))
    for b in range(resamples):
        u = rng.random(offsets[-1])
        picked = []
        for s, n in enumerate(strata):
            lo = offsets[s]
            picked.append([lo + min(int(x * n), n - 1) for x in u[lo : lo + n]])
        for k, v in enumerate(values):
            if average == "micro":
                tokens = np.concatenate([by_doc[d] for part in picked for d in part])
                out[b, k] = v[tokens].mean()
            else:
                means = [v[np.concatenate([by_doc[d] for d in part])].mean() for part in picked]
                out[b, k] = np.dot(means, weights) / sum(weights)
    return out


@pytest.mark.parametrize("average", ["micro", "macro"])
def test_vectorised_bootstrap_matches_loop(average):
    strata = [7, 5]
    lengths = list(np.random.default_rng(0).integers(1, 30, sum(strata)))
    values, doc_index = synthetic(1, lengths, [0.5, 0.6, 0.9])
    weights = [1.0, 3.0]
    boot = Bootstrap(strata, weights, resamples=200, seed=42, average=average)
    series = [DocSums.from_tokens(v, doc_index, sum(strata)) for v in values]
    fast = boot.run(series)
    slow = loop_bootstrap(values, doc_index, strata, weights, 200, 42, average)
    np.testing.assert_allclose(fast, slow, rtol=1e-12)
    # The full-sample statistic is the plain (micro) or weighted per-dataset (macro) mean.
    observed = boot.statistic(series)[0]
    if average == "micro":
        np.testing.assert_allclose(observed, values.mean(1), rtol=1e-12)
    else:
        first = doc_index < strata[0]
        want = (values[:, first].mean(1) * 1 + values[:, ~first].mean(1) * 3) / 4
        np.testing.assert_allclose(observed, want, rtol=1e-12)


def test_blocks_do_not_change_the_draws(monkeypatch):
    values, doc_index = synthetic(2, [3, 8, 2, 9, 4], [0.4])
    series = [DocSums.from_tokens(values[0], doc_index, 5)]
    whole = Bootstrap([5], resamples=64, seed=7).run(series)
    monkeypatch.setattr("lmkl.analysis.bootstrap._BLOCK_ELEMENTS", 5 * 3)  # blocks of 3 resamples
    np.testing.assert_array_equal(Bootstrap([5], resamples=64, seed=7).run(series), whole)


def test_percentile_interval_covers_the_true_mean_at_about_the_nominal_rate():
    # Known case: 40 documents per replicate, each with a random effect; the true mean is 1.0.
    hits, trials = 0, 200
    rng = np.random.default_rng(123)
    for t in range(trials):
        lengths = rng.integers(5, 40, 40)
        doc_index = np.repeat(np.arange(40), lengths)
        values = 1.0 + rng.normal(0, 0.5, 40)[doc_index] + rng.normal(0, 1.0, doc_index.size)
        boot = Bootstrap([40], resamples=400, seed=t)
        samples = boot.run([DocSums.from_tokens(values, doc_index, 40)])[:, 0]
        lo, hi = interval(samples, 0.95)
        hits += lo <= 1.0 <= hi
    # Binomial(200, 0.95) lies in [180, 200] with probability > 0.999; percentile intervals
    # under-cover slightly with 40 clusters, hence the lower bound of 176.
    assert 176 <= hits <= 200, hits


def test_token_bootstrap_would_be_too_narrow():
    """Documents, not tokens, are the unit: with strong document effects, the document CI is
    wider than a naive token-level standard error suggests."""
    values, doc_index = synthetic(5, [200] * 10, [1.0], noise=0.05)
    samples = Bootstrap([10], resamples=500, seed=0).run(
        [DocSums.from_tokens(values[0], doc_index, 10)]
    )[:, 0]
    naive_se = values[0].std(ddof=1) / math.sqrt(values[0].size)
    assert samples.std(ddof=1) > 3 * naive_se


def test_rank_pairs_flips_and_noise_floor_against_loops():
    strata = [9]
    values, doc_index = synthetic(3, list(range(3, 12)), [0.50, 0.52, 0.9])
    values[1, 5] = np.nan  # a non-finite token of candidate 1 only: pairs drop it for both
    noise = np.abs(np.random.default_rng(9).normal(0, 0.01, doc_index.size))
    data = RankingInput(
        labels=["a", "b", "c"],
        values=values,
        doc_index=doc_index,
        strata=strata,
        dataset_labels=["d"],
        weights=[1.0],
        info=[{"parameters": 30}, {"parameters": 10}, {"parameters": 20}],
        noise_floor=noise,
    )
    out = rank(data, "kl.mean", False, resamples=300, seed=11)
    board = [r for r in out["leaderboard"] if r["kind"] == "candidate"]
    means = [np.nanmean(v) for v in values]
    assert [r["label"] for r in board] == [data.labels[i] for i in np.argsort(means)]
    for row in board:
        assert row["value"] == pytest.approx(means[data.labels.index(row["label"])], rel=1e-12)

    # Paired difference of the best and the second on tokens finite for both.
    first, second = (data.labels.index(board[i]["label"]) for i in (0, 1))
    both = ~np.isnan(values[first]) & ~np.isnan(values[second])
    diff = values[first][both].mean() - values[second][both].mean()
    assert board[0]["vs_next"]["diff"] == pytest.approx(diff, rel=1e-12)
    rng = np.random.default_rng(11)
    diffs = []
    for _ in range(300):
        docs = np.minimum((rng.random(9) * 9).astype(int), 8)
        tokens = np.concatenate([np.flatnonzero((doc_index == d) & both) for d in docs])
        diffs.append(values[first][tokens].mean() - values[second][tokens].mean())
    diffs = np.array(diffs)
    lo, hi = np.quantile(diffs, [0.025, 0.975])
    assert board[0]["vs_next"]["ci"] == pytest.approx([lo, hi], rel=1e-9)
    assert board[0]["vs_next"]["flip_share"] == pytest.approx(
        np.mean(np.sign(diffs) != np.sign(diff))
    )
    # The noise floor is its own row and every candidate is compared with it.
    floor = [r for r in out["leaderboard"] if r["kind"] == "noise_floor"]
    assert len(floor) == 1 and floor[0]["value"] == pytest.approx(noise.mean())
    assert all(r["vs_noise_floor"]["distinguishable"] for r in board)
    # Pareto on (parameters, value), checked by a sweep over sizes.
    by_size = sorted(range(3), key=lambda i: (data.info[i]["parameters"], means[i]))
    best, front = math.inf, set()
    for i in by_size:
        if means[i] < best:
            front.add(data.labels[i])
            best = means[i]
    assert set(out["pareto"]["labels"]) == front


def test_pareto_front_edge_cases():
    # Equal size and score: neither dominates the other. Unknown size: not placed.
    assert pareto_front([1, 1, 2, None], [0.5, 0.5, 0.4, 0.1], False) == [True, True, True, None]
    assert pareto_front([1, 2, 3], [0.5, 0.6, 0.4], False) == [True, False, True]
    assert pareto_front([1, 2, 3], [0.5, 0.6, 0.4], True) == [True, True, False]


def test_infinite_kl_propagates_to_the_resamples_that_draw_it():
    values, doc_index = synthetic(4, [5, 5, 5, 5], [0.3])
    values[0, doc_index == 2] = np.inf
    series = [DocSums.from_tokens(values[0], doc_index, 4)]
    boot = Bootstrap([4], resamples=200, seed=0)
    samples = boot.run(series)[:, 0]
    assert boot.statistic(series)[0, 0] == math.inf
    assert np.isinf(samples).any() and np.isfinite(samples).any()  # some resamples miss doc 2
    assert not np.isnan(samples).any()
    assert flip_share(np.array([1.0, -1.0, 2.0, np.nan]), 1.0) == pytest.approx(1 / 3)
