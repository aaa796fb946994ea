"""lmkl.scoring.divergence against float64 SciPy references and known values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import special, stats
from scipy.integrate import quad

from lmkl.scoring import divergence as D

SEED_P = np.array([0.1, 0.2, 0.3, 0.4])
SEED_Q = np.array([0.2, 0.2, 0.3, 0.3])


def ref_metrics(ref_logits: np.ndarray, cand_logits: np.ndarray, targets: np.ndarray) -> dict:
    """Independent float64 reference for token_metrics (SciPy, no torch)."""
    lp = special.log_softmax(ref_logits.astype(np.float64), axis=-1)
    lq = special.log_softmax(cand_logits.astype(np.float64), axis=-1)
    p, q = np.exp(lp), np.exp(lq)
    m = 0.5 * (p + q)
    rows = np.arange(len(targets))
    ref_top1 = p.argmax(-1)
    top5 = np.argsort(-q, axis=-1)[:, :5]
    return {
        "kl": special.rel_entr(p, q).sum(-1),
        "reverse_kl": special.rel_entr(q, p).sum(-1),
        "jsd": 0.5 * special.rel_entr(p, m).sum(-1) + 0.5 * special.rel_entr(q, m).sum(-1),
        "entropy_reference": stats.entropy(p, axis=-1),
        "entropy_candidate": stats.entropy(q, axis=-1),
        "nll_reference": -lp[rows, targets],
        "nll_candidate": -lq[rows, targets],
        "delta_p": q[rows, targets] - p[rows, targets],
        "top1_agree": (ref_top1 == q.argmax(-1)).astype(float),
        "top1_in_top5": (top5 == ref_top1[:, None]).any(-1).astype(float),
        "reference_top1_prob": p.max(-1),
    }


def test_seed_notes_example_is_asymmetric():
    p, q = np.log(SEED_P), np.log(SEED_Q)
    assert D.kl_divergence(p, q) == pytest.approx(0.045758, abs=1e-6)
    assert D.kl_divergence(q, p) == pytest.approx(0.052325, abs=1e-6)
    assert D.reverse_kl_divergence(p, q) == pytest.approx(0.052325, abs=1e-6)
    # The seed's wrong code, sum(log(P/Q)), gives a negative "divergence"; we do not.
    assert np.sum(np.log(SEED_P / SEED_Q)) == pytest.approx(-0.405, abs=1e-3)
    assert D.kl_divergence(p, q) > 0


def test_token_metrics_match_scipy_float64():
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(64, 300, generator=gen) * 3
    cand = ref + torch.randn(64, 300, generator=gen)
    targets = torch.randint(0, 300, (64,), generator=gen)
    got = D.token_metrics(ref, cand, targets)
    want = ref_metrics(ref.numpy(), cand.numpy(), targets.numpy())
    for name in D.TOKEN_METRIC_NAMES:
        np.testing.assert_allclose(
            got[name].numpy(), want[name], atol=1e-5, rtol=1e-5, err_msg=name
        )
    assert not got["nonfinite"].any()


def test_kl_of_identical_distributions_is_zero():
    logits = torch.randn(32, 1000, generator=torch.Generator().manual_seed(1)) * 5
    got = D.token_metrics(logits, logits.clone(), torch.zeros(32, dtype=torch.long))
    assert got["kl"].abs().max() <= 1e-6
    assert got["reverse_kl"].abs().max() <= 1e-6
    assert got["jsd"].abs().max() <= 1e-6
    assert got["top1_agree"].min() == 1


def test_jsd_bounded_and_symmetric():
    p = torch.tensor([[0.0, -1e4], [3.0, 1.0]])  # near-disjoint supports reach ln 2
    q = torch.tensor([[-1e4, 0.0], [1.0, 3.0]])
    a, b = D.js_divergence(p, q), D.js_divergence(q, p)
    torch.testing.assert_close(a, b)
    assert float(a[0]) == pytest.approx(math.log(2), abs=1e-6)
    assert (a <= D.LN2).all()


def test_masked_candidate_token_gives_infinite_kl_not_nan():
    ref = torch.tensor([[1.0, 2.0, 3.0]])
    cand = torch.tensor([[1.0, float("-inf"), 3.0]])
    got = D.token_metrics(ref, cand, torch.tensor([1]))
    assert math.isinf(float(got["kl"][0])) and float(got["kl"][0]) > 0
    assert math.isfinite(float(got["reverse_kl"][0]))  # Q's support is inside P's
    assert math.isinf(float(got["nll_candidate"][0]))
    assert not got["nonfinite"].any()
    jsd = float(got["jsd"][0])
    assert math.isfinite(jsd) and 0 < jsd < math.log(2)


def test_nonfinite_rows_are_flagged_and_nan():
    ref = torch.tensor([[1.0, 2.0], [float("nan"), 1.0], [1.0, 2.0], [float("-inf")] * 2])
    cand = torch.tensor([[1.0, 1.0], [1.0, 1.0], [float("inf"), 1.0], [1.0, 2.0]])
    got = D.token_metrics(ref, cand, torch.tensor([0, 0, 0, 0]))
    assert got["nonfinite"].tolist() == [False, True, True, True]
    assert math.isfinite(float(got["kl"][0]))
    assert torch.isnan(got["kl"][1:]).all()


def test_temperature_softens_both():
    gen = torch.Generator().manual_seed(2)
    ref, cand = torch.randn(8, 50, generator=gen), torch.randn(8, 50, generator=gen)
    got = D.token_metrics(ref, cand, torch.zeros(8, dtype=torch.long), temperature=2.0)
    want = ref_metrics(ref.numpy() / 2, cand.numpy() / 2, np.zeros(8, dtype=int))
    np.testing.assert_allclose(got["kl"].numpy(), want["kl"], atol=1e-6)


def test_library_functions_against_scipy_with_numpy_inputs():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=(5, 40)), rng.normal(size=(5, 40))
    p, q = special.softmax(a, -1), special.softmax(b, -1)
    np.testing.assert_allclose(D.kl_divergence(a, b), special.rel_entr(p, q).sum(-1), atol=1e-10)
    np.testing.assert_allclose(D.entropy(a), stats.entropy(p, axis=-1), atol=1e-10)
    np.testing.assert_allclose(D.cross_entropy(a, b), -(p * np.log(q)).sum(-1), atol=1e-10)
    np.testing.assert_allclose(D.total_variation(a, b), 0.5 * np.abs(p - q).sum(-1), atol=1e-10)
    beta = 0.3
    m = beta * p + (1 - beta) * q
    want = beta * special.rel_entr(p, m).sum(-1) + (1 - beta) * special.rel_entr(q, m).sum(-1)
    np.testing.assert_allclose(D.generalized_jsd(a, b, beta=beta), want, atol=1e-10)
    np.testing.assert_allclose(D.generalized_jsd(a, b, beta=0.0), D.kl_divergence(a, b))
    np.testing.assert_allclose(D.generalized_jsd(a, b, beta=1.0), D.kl_divergence(b, a))
    # The scaled generalized JSD tends to the KLs at the end points.
    small = 1e-4
    np.testing.assert_allclose(
        D.generalized_jsd(a, b, beta=small) / (small * (1 - small)),
        D.kl_divergence(a, b),
        rtol=1e-2,
    )


@pytest.mark.parametrize(
    ("m1", "s1", "m2", "s2"), [(0, 1, 0, 1), (0.5, 1.3, -1, 0.7), (2, 0.2, 0, 3)]
)
def test_gaussian_kl_matches_numerical_integral(m1, s1, m2, s2):
    def integrand(x):
        return stats.norm.pdf(x, m1, s1) * (
            stats.norm.logpdf(x, m1, s1) - stats.norm.logpdf(x, m2, s2)
        )

    want, _ = quad(integrand, m1 - 12 * s1, m1 + 12 * s1, limit=200)
    assert D.gaussian_kl(m1, s1, m2, s2) == pytest.approx(want, abs=1e-8)
    # Diagonal multivariate: sum over coordinates.
    assert D.gaussian_kl([m1, m1], [s1, s1], [m2, m2], [s2, s2]) == pytest.approx(
        2 * want, abs=1e-7
    )


def _log_space_kl(lp: np.ndarray, lq: np.ndarray) -> float:
    """Σ p (log p − log q) over the support of p (decided in log space), +inf off Q's support."""
    support = lp > -np.inf
    if np.any(support & (lq == -np.inf)):
        return math.inf
    return float(np.sum(np.exp(lp[support]) * (lp[support] - lq[support])))


logit_rows = arrays(
    np.float32,
    st.tuples(st.integers(1, 4), st.integers(1, 12)),
    elements=st.one_of(st.floats(-1e4, 1e4, width=32), st.just(float("-inf"))),
)


@settings(max_examples=150, deadline=None)
@given(logit_rows, st.data())
def test_properties_on_extreme_logits(ref, data):
    cand = data.draw(
        arrays(
            np.float32,
            ref.shape,
            elements=st.one_of(st.floats(-1e4, 1e4, width=32), st.just(float("-inf"))),
        )
    )
    targets = torch.zeros(ref.shape[0], dtype=torch.long)
    got = D.token_metrics(torch.from_numpy(ref), torch.from_numpy(cand), targets)
    bad = np.isneginf(ref).all(-1) | np.isneginf(cand).all(-1)
    assert got["nonfinite"].numpy().tolist() == bad.tolist()
    for i in np.flatnonzero(~bad):
        lp = special.log_softmax(ref[i].astype(np.float64))
        lq = special.log_softmax(cand[i].astype(np.float64))
        # Log-space float64 reference: rel_entr(p, q) loses precision when q is subnormal.
        for name, want in (("kl", _log_space_kl(lp, lq)), ("reverse_kl", _log_space_kl(lq, lp))):
            value = float(got[name][i])
            assert not math.isnan(value)
            if math.isinf(want):
                assert value == math.inf
            else:
                assert value >= 0 and value == pytest.approx(want, abs=1e-4, rel=1e-4)
        jsd = float(got["jsd"][i])
        assert 0 <= jsd <= math.log(2) + 1e-7
        assert 0 <= float(got["entropy_reference"][i]) <= math.log(ref.shape[1]) + 1e-5


def test_single_token_vocabulary():
    got = D.token_metrics(torch.tensor([[5.0]]), torch.tensor([[-3.0]]), torch.tensor([0]))
    assert float(got["kl"][0]) == 0 and float(got["nll_reference"][0]) == 0
