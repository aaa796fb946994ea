"""The divergence library (lmkl.scoring.divergence) beyond token_metrics: SciPy, exact values."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from scipy import special, stats
from scipy.spatial import distance

from lmkl.scoring import divergence as D


def rows(seed: int, n: int = 6, v: int = 30, scale: float = 2.0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, v)) * scale, rng.normal(size=(n, v)) * scale


@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
def test_every_function_against_scipy_with_temperature(temperature):
    a, b = rows(0)
    p, q = special.softmax(a / temperature, -1), special.softmax(b / temperature, -1)
    kw = {"temperature": temperature}
    np.testing.assert_allclose(
        D.kl_divergence(a, b, **kw), stats.entropy(p, q, axis=-1), atol=1e-12
    )
    np.testing.assert_allclose(
        D.reverse_kl_divergence(a, b, **kw), stats.entropy(q, p, axis=-1), atol=1e-12
    )
    # SciPy's jensenshannon is the square root of the JSD (a metric), in nats by default.
    np.testing.assert_allclose(
        D.js_divergence(a, b, **kw), distance.jensenshannon(p, q, axis=-1) ** 2, atol=1e-12
    )
    np.testing.assert_allclose(D.entropy(a, **kw), stats.entropy(p, axis=-1), atol=1e-12)
    np.testing.assert_allclose(
        D.cross_entropy(a, b, **kw),
        stats.entropy(p, axis=-1) + stats.entropy(p, q, axis=-1),
        atol=1e-12,
    )
    np.testing.assert_allclose(
        D.total_variation(a, b, **kw), 0.5 * np.abs(p - q).sum(-1), atol=1e-12
    )
    for beta in (0.1, 0.5, 0.9):
        m = beta * p + (1 - beta) * q
        want = beta * special.rel_entr(p, m).sum(-1) + (1 - beta) * special.rel_entr(q, m).sum(-1)
        np.testing.assert_allclose(D.generalized_jsd(a, b, beta=beta, **kw), want, atol=1e-12)


def test_units_are_nats_and_bits_are_a_division_by_ln2():
    a, b = rows(1)
    p, q = special.softmax(a, -1), special.softmax(b, -1)
    np.testing.assert_allclose(
        D.kl_divergence(a, b) / D.LN2, stats.entropy(p, q, base=2, axis=-1), atol=1e-12
    )


def test_torch_in_torch_out_numpy_in_numpy_out_and_log_probs_accepted():
    a, b = rows(2)
    ta, tb = torch.from_numpy(a).float(), torch.from_numpy(b).float()
    for fn in (
        D.kl_divergence,
        D.reverse_kl_divergence,
        D.js_divergence,
        D.cross_entropy,
        D.total_variation,
    ):
        from_numpy, from_torch = fn(a, b), fn(ta, tb)
        assert isinstance(from_numpy, np.ndarray) and from_numpy.dtype == np.float64
        assert isinstance(from_torch, torch.Tensor) and from_torch.dtype == torch.float32
        np.testing.assert_allclose(from_torch.numpy(), from_numpy, atol=1e-5)
        # Log-probabilities (and logits shifted by a constant) give the same values.
        lp, lq = special.log_softmax(a, -1), special.log_softmax(b, -1)
        np.testing.assert_allclose(fn(lp, lq), from_numpy, atol=1e-12)
        np.testing.assert_allclose(fn(a + 7.0, b - 3.0), from_numpy, atol=1e-10)
    half = D.entropy(torch.from_numpy(a).half())
    assert half.dtype == torch.float32  # computed in at least float32


def test_masked_tokens_follow_the_conventions():
    p = np.array([[0.0, 1.0, 2.0, -np.inf]])
    q = np.array([[-np.inf, 1.0, 2.0, 0.5]])
    pp, qq = special.softmax(p, -1), special.softmax(q, -1)
    assert D.kl_divergence(p, q)[0] == math.inf  # P puts mass where Q has none
    assert D.reverse_kl_divergence(p, q)[0] == math.inf
    assert D.cross_entropy(p, q)[0] == math.inf
    assert D.generalized_jsd(p, q, beta=0.0)[0] == math.inf
    np.testing.assert_allclose(D.entropy(p), stats.entropy(pp, axis=-1), atol=1e-12)
    np.testing.assert_allclose(
        D.js_divergence(p, q), distance.jensenshannon(pp, qq, axis=-1) ** 2, atol=1e-12
    )
    same_support = np.array([[0.0, 1.0, -np.inf]])
    other = np.array([[2.0, -1.0, -np.inf]])
    want = stats.entropy(special.softmax(same_support, -1), special.softmax(other, -1), axis=-1)
    np.testing.assert_allclose(D.kl_divergence(same_support, other), want, atol=1e-12)


@pytest.mark.parametrize("beta", [0.2, 0.5, 0.7])
def test_generalized_jsd_of_disjoint_supports_is_the_binary_entropy(beta):
    p = np.array([0.0, 0.3, -np.inf, -np.inf])
    q = np.array([-np.inf, -np.inf, 1.0, -2.0])
    want = -beta * math.log(beta) - (1 - beta) * math.log(1 - beta)
    assert float(D.generalized_jsd(p, q, beta=beta)) == pytest.approx(want, abs=1e-12)


def test_seed_notes_example_both_directions_and_jsd():
    p, q = np.log([0.1, 0.2, 0.3, 0.4]), np.log([0.2, 0.2, 0.3, 0.3])
    assert float(D.kl_divergence(p, q)) == pytest.approx(0.045758, abs=5e-7)
    assert float(D.reverse_kl_divergence(p, q)) == pytest.approx(0.052325, abs=5e-7)
    assert float(D.js_divergence(p, q)) == pytest.approx(float(D.js_divergence(q, p)), abs=1e-15)
    assert 0 < float(D.js_divergence(p, q)) < min(0.045758, 0.052325)


def test_gaussian_kl_diagonal_against_the_general_multivariate_formula():
    rng = np.random.default_rng(4)
    mu1, mu2 = rng.normal(size=5), rng.normal(size=5)
    s1, s2 = rng.uniform(0.3, 2, size=5), rng.uniform(0.3, 2, size=5)
    c1, c2 = np.diag(s1**2), np.diag(s2**2)
    inv2 = np.linalg.inv(c2)
    diff = mu2 - mu1
    want = 0.5 * (
        np.trace(inv2 @ c1) + diff @ inv2 @ diff - 5 + np.log(np.linalg.det(c2) / np.linalg.det(c1))
    )
    assert D.gaussian_kl(mu1, s1, mu2, s2) == pytest.approx(want, abs=1e-12)
    assert D.gaussian_kl(
        torch.tensor(mu1), torch.tensor(s1), torch.tensor(mu2), torch.tensor(s2)
    ) == pytest.approx(want, abs=1e-12)
    assert D.gaussian_kl(mu1, s1, mu1, s1) == 0
    # Asymmetric, as every KL.
    assert D.gaussian_kl(0, 1, 1, 2) != pytest.approx(D.gaussian_kl(1, 2, 0, 1))
    with pytest.raises(ValueError, match="> 0"):
        D.gaussian_kl(0, 0, 0, 1)


dists = arrays(np.float64, 6, elements=st.floats(-6, 6))


@settings(max_examples=60, deadline=None)
@given(dists, dists, dists, dists, st.floats(0.05, 0.95))
def test_properties_the_seed_gets_wrong(a1, b1, a2, b2, lam):
    """KL ≥ 0, Pinsker, joint convexity (not "sub-additivity"), additivity over products."""
    p1, q1, p2, q2 = (special.softmax(x) for x in (a1, b1, a2, b2))
    kl1, kl2 = float(D.kl_divergence(a1, b1)), float(D.kl_divergence(a2, b2))
    assert kl1 >= 0
    # Pinsker; the slack is on the KL scale, where float64 rounding lives (about 1e-16).
    assert float(D.total_variation(a1, b1)) <= math.sqrt((kl1 + 1e-14) / 2)
    mix_p, mix_q = lam * p1 + (1 - lam) * p2, lam * q1 + (1 - lam) * q2
    joint = float(D.kl_divergence(np.log(mix_p), np.log(mix_q)))
    assert joint <= lam * kl1 + (1 - lam) * kl2 + 1e-12
    lp = (special.log_softmax(a1)[:, None] + special.log_softmax(a2)[None, :]).ravel()
    lq = (special.log_softmax(b1)[:, None] + special.log_softmax(b2)[None, :]).ravel()
    assert float(D.kl_divergence(lp, lq)) == pytest.approx(kl1 + kl2, abs=1e-10)
