"""One accuracy contract for every kernel (lmkl/scoring/accuracy.py), against float64 SciPy.

Each kernel that computes per-token metrics runs here on the same rows: the native C kernel, the
torch kernel run eagerly (GPUs and machines without a C compiler) and through ``torch.compile``
(large GPU runs), and the float64 definition that takes rows with non-finite logits. The rows
are the ones where float32 arithmetic fails: near-identical models (KL of 1e-5 down to 1e-10
nats per token), peaked rows with large logits (entropy near 0), padded vocabularies, ``-inf``
logits and temperatures.
"""

from __future__ import annotations

import math
import shutil
from collections.abc import Callable

import mpmath
import numpy as np
import pytest
import torch
from scipy import special

from lmkl.scoring.accuracy import CONTRACT, check, errors
from lmkl.scoring.divergence import OUTPUT_NAMES, TOKEN_METRIC_NAMES, token_metrics
from lmkl.scoring.fused import PHI_EVEN, PHI_ODD, MetricsKernel

VOCAB = 5000  # several of the C kernel's 1024-entry blocks and a partial last one
Kernel = Callable[..., dict[str, torch.Tensor]]


def _metrics_kernel(name: str, request: pytest.FixtureRequest) -> Kernel:
    if name == "native":
        request.getfixturevalue("native_kernel")  # skip, or under LMKL_REQUIRE_NATIVE fail
        kernel = MetricsKernel(device="cpu")
        assert kernel.backend == "native"
    elif name == "eager":
        kernel = MetricsKernel(device="cpu", native=False, compile=False)
    else:
        kernel = MetricsKernel(device="cpu", native=False, compile=True)

    def run(ref, cand, targets, *, temperature=1.0, vocab_size=None):
        out = kernel(ref, cand, targets, temperature=temperature, vocab_size=vocab_size)
        if name == "compiled" and kernel.backend != "compiled":
            if shutil.which("c++") or shutil.which("g++"):
                pytest.fail("torch.compile fell back to eager although a C++ compiler exists")
            pytest.skip("torch.compile needs a C++ compiler on a CPU")
        return out

    return run


def _definition(ref, cand, targets, *, temperature=1.0, vocab_size=None):
    vocab = vocab_size or ref.shape[-1]
    return token_metrics(ref[:, :vocab], cand[:, :vocab], targets, temperature=temperature)


@pytest.fixture(params=["native", "eager", "compiled", "definition"])
def kernel(request) -> Kernel:
    """Every kernel lmkl can run on this machine (the CUDA path is the torch code)."""
    if request.param == "definition":
        return _definition
    return _metrics_kernel(request.param, request)


def float64_reference(
    ref: torch.Tensor, cand: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0
) -> dict[str, torch.Tensor]:
    """The textbook definitions in float64 SciPy (``rel_entr``, ``log_softmax``), row by row."""
    it = float(np.float32(1.0 / temperature))  # the kernels scale by float32(1 / T)
    rows: dict[str, list[float]] = {name: [] for name in OUTPUT_NAMES}
    for x, y, t in zip(ref.double().numpy(), cand.double().numpy(), targets.tolist(), strict=True):
        if temperature != 1.0:
            x, y = x * it, y * it
        lp, lq = special.log_softmax(x), special.log_softmax(y)
        p, q = np.exp(lp), np.exp(lq)
        m = 0.5 * (p + q)
        values = {
            "kl": special.rel_entr(p, q).sum(),
            "reverse_kl": special.rel_entr(q, p).sum(),
            "jsd": 0.5 * (special.rel_entr(p, m).sum() + special.rel_entr(q, m).sum()),
            "entropy_reference": -special.xlogy(p, p).sum(),
            "entropy_candidate": -special.xlogy(q, q).sum(),
            "nll_reference": -lp[t],
            "nll_candidate": -lq[t],
            "delta_p": q[t] - p[t],
            "top1_agree": float(np.argmax(x) == np.argmax(y)),
            "top1_in_top5": float((y > y[np.argmax(x)]).sum() < 5),
            "reference_top1_prob": p.max(),
            "lse_reference": special.logsumexp(x),
            "lse_candidate": special.logsumexp(y),
        }
        for name, value in values.items():
            rows[name].append(float(value))
    return {name: torch.tensor(values, dtype=torch.float64) for name, values in rows.items()}


def near_identical_rows(seed: int, noise: float, rows: int = 6) -> tuple[torch.Tensor, ...]:
    """Reference logits and a candidate off by ``noise`` per logit (KL about noise^2 / 2),
    shifted by a constant that changes only its log-normaliser."""
    gen = torch.Generator().manual_seed(seed)
    ref = torch.randn(rows, VOCAB, generator=gen) * 3
    cand = ref + noise * torch.randn(rows, VOCAB, generator=gen) + 2.5
    return ref, cand, torch.randint(0, VOCAB, (rows,), generator=gen)


def assert_contract(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    problems = check(got, want)
    assert not problems, problems


# KL per token of about 5e-5, 5e-7, 5e-9, 1e-9 and 1.2e-10 nats.
@pytest.mark.parametrize("noise", [1e-2, 1e-3, 1e-4, 4.5e-5, 1.5e-5])
def test_near_identical_models_meet_the_contract(kernel, noise):
    ref, cand, targets = near_identical_rows(int(noise * 1e7), noise)
    want = float64_reference(ref, cand, targets)
    assert 0 < float(want["kl"].min()) < 1e-4
    assert_contract(kernel(ref, cand, targets), want)


@pytest.mark.parametrize("offset", [-61.3, 47.9])
def test_log_normalisers_far_apart(kernel, offset):
    # Logits offset by a constant (another scale of the same head): the log-normalisers differ
    # by tens of nats, so their float32 difference is off by ~1e-6, as large as the log-ratios
    # of a KL of 1e-9. Every divergence must still come from the refined log-ratio.
    ref, cand, targets = near_identical_rows(31, 4.5e-5)
    cand = cand - 2.5 + offset
    want = float64_reference(ref, cand, targets)
    assert 0 < float(want["kl"].min()) < 1e-4
    assert_contract(kernel(ref, cand, targets), want)


def test_mean_and_p99_error_over_many_near_identical_tokens(kernel):
    # The figures: over 200 tokens at KL 1e-7 .. 1e-10, the mean is within 1e-3 of
    # float64 and the 99th percentile of the per-token relative error within 5e-3.
    gen = torch.Generator().manual_seed(7)
    noise = torch.logspace(-3.5, -5, 200)[:, None]
    ref = torch.randn(200, VOCAB, generator=gen) * 3
    cand = ref + noise * torch.randn(200, VOCAB, generator=gen)
    targets = torch.randint(0, VOCAB, (200,), generator=gen)
    want = float64_reference(ref, cand, targets)
    got = kernel(ref, cand, targets)
    for name in ("kl", "reverse_kl", "jsd"):
        value, error = want[name], (got[name].double() - want[name]).abs()
        assert abs(float(got[name].double().mean() / value.mean()) - 1) < 1e-3, name
        assert float(torch.quantile(error / value, 0.99)) < 5e-3, name


def test_float16_and_bfloat16_copies_of_a_model(kernel):
    # What users compare most: a model against its own logits rounded to half precision.
    gen = torch.Generator().manual_seed(11)
    ref = torch.randn(8, VOCAB, generator=gen) * 4
    targets = torch.randint(0, VOCAB, (8,), generator=gen)
    for dtype in (torch.float16, torch.bfloat16):
        cand = ref.to(dtype)
        want = float64_reference(ref, cand.float(), targets)
        assert_contract(kernel(ref, cand, targets), want)
        # Half-precision inputs on both sides are read as they are.
        half_ref, shifted = ref.to(dtype), (ref * 1.001 + 1).to(dtype)
        want = float64_reference(half_ref.float(), shifted.float(), targets)
        assert_contract(kernel(half_ref, shifted, targets), want)


def test_peaked_rows_with_large_logits(kernel):
    # One token far above the rest: entropy from 1e-2 down to about 1e-10 nats, where
    # lse - sum p x cancels in float32 (the C kernel was 17% off at H = 6e-6).
    gen = torch.Generator().manual_seed(3)
    ref = torch.randn(7, VOCAB, generator=gen)
    tops = torch.tensor([12.0, 18.0, 22.0, 26.0, 30.0, 34.0, 36.0])
    ref[torch.arange(7), (torch.arange(7) * 701) % VOCAB] = tops
    cand = ref + 1e-3 * torch.randn(7, VOCAB, generator=gen)
    cand[0, 4000] = 40.0  # a candidate peaked elsewhere
    targets = (torch.arange(7) * 701) % VOCAB
    for temperature in (1.0, 0.7):
        want = float64_reference(ref, cand, targets, temperature)
        assert float(want["entropy_reference"].min()) < 1e-9
        assert_contract(kernel(ref, cand, targets, temperature=temperature), want)


def test_temperature_on_near_identical_rows(kernel):
    ref, cand, targets = near_identical_rows(5, 1e-4)
    for temperature in (0.5, 1.5, 4.0):
        want = float64_reference(ref, cand, targets, temperature)
        assert_contract(kernel(ref, cand, targets, temperature=temperature), want)


def test_padded_vocabulary_is_sliced_inside_the_kernel(kernel):
    ref, cand, targets = near_identical_rows(9, 3e-4)
    # Padded output rows hold junk that would dominate every row if it were read.
    pad = torch.full((ref.shape[0], 120), 60.0)
    wide_ref, wide_cand = torch.cat([ref, pad], -1), torch.cat([cand, -pad], -1)
    want = float64_reference(ref, cand, targets)
    assert_contract(kernel(wide_ref, wide_cand, targets, vocab_size=VOCAB), want)


def test_minus_infinity_logits(kernel):
    ref, cand, targets = near_identical_rows(13, 1e-4, rows=5)
    ref[0, :40] = cand[0, :40] = -math.inf  # both mask the same tokens: still near-identical
    cand[1, 7] = -math.inf  # the candidate rules out a token the reference allows: KL = +inf
    ref[2, 9] = -math.inf  # the reference rules out a token: finite KL, infinite reverse KL
    targets[0] = 100
    want = float64_reference(ref, cand, targets)
    got = kernel(ref, cand, targets)
    assert math.isinf(float(got["kl"][1])) and math.isinf(float(got["reverse_kl"][2]))
    assert 0 < float(got["kl"][0]) < 1e-7
    assert_contract(got, want)


def test_identical_rows_give_exactly_zero(kernel):
    ref, _, targets = near_identical_rows(17, 0.0)
    for temperature in (1.0, 0.7):
        got = kernel(ref, ref.clone(), targets, temperature=temperature)
        for name in ("kl", "reverse_kl", "jsd"):
            assert torch.equal(got[name], torch.zeros_like(got[name])), name


def test_broken_rows_are_flagged_not_guessed(kernel):
    ref, cand, targets = near_identical_rows(19, 1e-3, rows=3)
    ref[0, 3] = math.nan
    cand[1] = -math.inf
    got = kernel(ref, cand, targets)
    assert got["nonfinite"].tolist() == [True, True, False]
    assert all(math.isnan(float(got[name][0])) for name in TOKEN_METRIC_NAMES)


def test_plain_float32_breaks_the_contract_this_test_enforces():
    # The check can fail: the textbook formulas in float32 (what the torch path computed
    # before) are far outside the contract for near-identical rows and peaked entropies.
    ref, cand, targets = near_identical_rows(23, 1e-4)
    lp, lq = torch.log_softmax(ref, -1), torch.log_softmax(cand, -1)
    naive = {"kl": (lp.exp() * (lp - lq)).sum(-1).clamp_min(0)}
    ratio = errors(naive, float64_reference(ref, cand, targets))["kl"]
    assert float(ratio.max()) > 10


def test_a_nan_on_a_good_row_breaks_the_contract():
    ref, cand, targets = near_identical_rows(29, 1e-3, rows=3)
    want = float64_reference(ref, cand, targets)
    got = {name: want[name].float().clone() for name in ("kl", "jsd")}
    assert not check(got, want)
    got["kl"][1] = math.nan
    assert check(got, want) and "kl: row 1" in check(got, want)[0]


def test_phi_coefficients_are_reciprocal_factorials():
    # phi(w) = w + expm1(-w) = sum_{k>=2} (-w)^k / k!, split into even and odd powers.
    assert tuple(1 / math.factorial(k) for k in range(2, 12, 2)) == PHI_EVEN
    assert tuple(1 / math.factorial(k) for k in range(3, 13, 2)) == PHI_ODD
    mpmath.mp.dps = 40
    for w in np.linspace(-0.5, 0.5, 201):
        if w == 0:
            continue
        even = sum(c * w ** (2 * i) for i, c in enumerate(PHI_EVEN))
        odd = sum(c * w ** (2 * i) for i, c in enumerate(PHI_ODD))
        exact = mpmath.mpf(w) + mpmath.expm1(-mpmath.mpf(w))
        assert abs(w**2 * (even - w * odd) - float(exact)) <= 1e-11 * float(exact), w


def test_the_contract_names_every_kernel_output():
    assert set(CONTRACT) == set(OUTPUT_NAMES)
