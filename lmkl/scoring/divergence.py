"""Divergences between next-token distributions: pure tensor math, no Hugging Face import.

Conventions used everywhere in lmkl:

* ``P`` is the **reference** distribution and ``Q`` the **candidate**. ``KL(P‖Q)`` ("forward KL",
  ``kl``) is ``Σ_x p(x)·(log p(x) − log q(x))`` and ``KL(Q‖P)`` ("reverse KL") swaps the roles.
  KL is **not** symmetric and is not a distance; the Jensen-Shannon divergence is symmetric and
  bounded by ``ln 2``.
* Units are **nats** (natural logarithm). Divide by ``ln 2`` for bits.
* Inputs are logits or log-probabilities of shape ``[..., V]``; all arithmetic happens in log
  space in at least float32 (float64 inputs stay float64), with the convention ``0·log 0 = 0``.
* Where ``q(x) = 0`` but ``p(x) > 0`` (a candidate that masks a token with ``-inf``), ``KL(P‖Q)`` is
  ``+inf``. That is the true value and is returned as such, never clipped and never NaN.
* A row whose logits hold NaN or ``+inf``, or are all ``-inf``, is not a distribution. Such rows are
  flagged by :func:`nonfinite_rows`; :func:`token_metrics` returns NaN for them in every metric so
  that callers can count and exclude them.

Example (the seed-notes example, showing the asymmetry)::

    >>> import torch
    >>> p = torch.tensor([0.1, 0.2, 0.3, 0.4]).log()
    >>> q = torch.tensor([0.2, 0.2, 0.3, 0.3]).log()
    >>> round(float(kl_divergence(p, q)), 6), round(float(kl_divergence(q, p)), 6)
    (0.045758, 0.052325)
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lmkl.metric_names import TOKEN_METRIC_NAMES

__all__ = [
    "LN2",
    "OUTPUT_NAMES",
    "TOKEN_METRIC_NAMES",
    "cross_entropy",
    "entropy",
    "entropy_from_log_probs",
    "gaussian_kl",
    "generalized_jsd",
    "in_top_k",
    "js_divergence",
    "kl_divergence",
    "log_probs",
    "nonfinite_rows",
    "outside_vocabulary",
    "reverse_kl_divergence",
    "token_metrics",
    "total_variation",
]

LN2 = math.log(2.0)

#: What every fast kernel (torch and C) returns per token, in this order: the metrics, then each
#: row's log-normaliser of the (temperature-scaled) reference and candidate logits. The C
#: kernel reports its own order, and lmkl refuses a build whose order differs.
OUTPUT_NAMES: tuple[str, ...] = (*TOKEN_METRIC_NAMES, "lse_reference", "lse_candidate")

ArrayLike = torch.Tensor | np.ndarray


def _as_tensor(x: ArrayLike) -> tuple[torch.Tensor, bool]:
    """Return ``x`` as a floating tensor of at least float32, and whether it came from NumPy."""
    if isinstance(x, np.ndarray):
        t = torch.from_numpy(np.ascontiguousarray(x))
        from_numpy = True
    else:
        t = x
        from_numpy = False
    if not t.is_floating_point() or t.dtype in (torch.float16, torch.bfloat16):
        t = t.float()
    return t, from_numpy


def _out(t: torch.Tensor, from_numpy: bool) -> torch.Tensor | np.ndarray:
    return t.numpy() if from_numpy else t


def log_probs(logits: ArrayLike, temperature: float = 1.0) -> torch.Tensor:
    """Log-softmax over the last axis, in at least float32, after dividing by ``temperature``.

    Rows that are all ``-inf`` come out as NaN (they are not distributions).
    """
    t, _ = _as_tensor(logits)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if temperature != 1.0:
        t = t / temperature
    return torch.log_softmax(t, dim=-1)


def _log_prob_pair(
    p_logits: ArrayLike, q_logits: ArrayLike, temperature: float
) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """Both rows' log-probabilities, and whether the reference came from NumPy."""
    p_t, from_numpy = _as_tensor(p_logits)
    q_t, _ = _as_tensor(q_logits)
    return log_probs(p_t, temperature), log_probs(q_t, temperature), from_numpy


def _xlogy_terms(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    """Elementwise ``p·(log p − log q)`` with ``0·log 0 = 0`` and ``p>0, q=0 → +inf``.

    Support is decided on log-probabilities, not on ``p = exp(log p)``: a probability of
    ``e^-120`` underflows to 0 in float32 but is still positive, so where ``log q = -inf`` the
    term is ``+inf`` exactly as the mathematics says.
    """
    p = lp.exp()
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    terms = torch.where(torch.isneginf(lq), torch.full_like(zero, math.inf), p * (lp - lq))
    return torch.where(torch.isneginf(lp), zero, terms)


def _kl_from_log_probs(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    kl = _xlogy_terms(lp, lq).sum(-1)
    # Rounding can push an exact 0 to about -1e-8; KL is never negative, so clamp only below.
    return kl.clamp_min(0.0)


def kl_divergence(
    p_logits: ArrayLike, q_logits: ArrayLike, temperature: float = 1.0
) -> torch.Tensor | np.ndarray:
    """``KL(P‖Q) = Σ p·(log p − log q)`` in nats over the last axis ("forward KL").

    ``p_logits`` are the reference's logits (or log-probabilities: log-softmax is idempotent) and
    ``q_logits`` the candidate's. ``+inf`` where Q gives zero probability to a token P does not.
    NumPy in, NumPy out.
    """
    lp, lq, from_numpy = _log_prob_pair(p_logits, q_logits, temperature)
    return _out(_kl_from_log_probs(lp, lq), from_numpy)


def reverse_kl_divergence(
    p_logits: ArrayLike, q_logits: ArrayLike, temperature: float = 1.0
) -> torch.Tensor | np.ndarray:
    """``KL(Q‖P)`` in nats: the reverse direction, mode-seeking for the candidate Q."""
    return kl_divergence(q_logits, p_logits, temperature)


def generalized_jsd(
    p_logits: ArrayLike, q_logits: ArrayLike, beta: float = 0.5, temperature: float = 1.0
) -> torch.Tensor | np.ndarray:
    """Generalized Jensen-Shannon divergence in nats with mixture ``M = β·P + (1−β)·Q``.

    For ``0 < β < 1`` returns ``JSD_β = β·KL(P‖M) + (1−β)·KL(Q‖M)``, bounded by the binary
    entropy of β (``ln 2`` at β = ½, the ordinary JSD). ``JSD_β / (β(1−β))`` tends to ``KL(P‖Q)``
    as β → 0 and to ``KL(Q‖P)`` as β → 1, so the end points return those KLs (the convention of
    generalized-JSD distillation losses): ``beta=0`` → forward ``KL(P‖Q)``, ``beta=1`` → reverse
    ``KL(Q‖P)``. P is the reference, Q the candidate.
    """
    if not 0.0 <= beta <= 1.0:
        raise ValueError(f"beta must be in [0, 1], got {beta}")
    lp, lq, from_numpy = _log_prob_pair(p_logits, q_logits, temperature)
    if beta == 0.0:
        return _out(_kl_from_log_probs(lp, lq), from_numpy)
    if beta == 1.0:
        return _out(_kl_from_log_probs(lq, lp), from_numpy)
    lm = torch.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))
    value = beta * _kl_from_log_probs(lp, lm) + (1 - beta) * _kl_from_log_probs(lq, lm)
    return _out(value, from_numpy)


def js_divergence(
    p_logits: ArrayLike, q_logits: ArrayLike, temperature: float = 1.0
) -> torch.Tensor | np.ndarray:
    """Jensen-Shannon divergence (β = ½) in nats: symmetric, in ``[0, ln 2]``; √JSD is a metric."""
    lp, lq, from_numpy = _log_prob_pair(p_logits, q_logits, temperature)
    return _out(_jsd_from_log_probs(lp, lq), from_numpy)


def _jsd_from_log_probs(lp: torch.Tensor, lq: torch.Tensor) -> torch.Tensor:
    # log m = log((p + q) / 2) from the larger side, hi + log1p(expm1(lo - hi) / 2): exactly
    # log p where q = p (so JSD(P, P) = 0), where logaddexp(lp, lq) - ln 2 rounds.
    hi, lo = torch.maximum(lp, lq), torch.minimum(lp, lq)
    lm = hi + torch.log1p(torch.expm1(lo - hi) * 0.5)
    jsd = 0.5 * (_xlogy_terms(lp, lm).sum(-1) + _xlogy_terms(lq, lm).sum(-1))
    return jsd.clamp(0.0, LN2)


def total_variation(
    p_logits: ArrayLike, q_logits: ArrayLike, temperature: float = 1.0
) -> torch.Tensor | np.ndarray:
    """Total variation distance ``½ Σ |p − q|`` in ``[0, 1]`` (a metric; no units)."""
    lp, lq, from_numpy = _log_prob_pair(p_logits, q_logits, temperature)
    return _out((0.5 * (lp.exp() - lq.exp()).abs().sum(-1)).clamp(0.0, 1.0), from_numpy)


def entropy(logits: ArrayLike, temperature: float = 1.0) -> torch.Tensor | np.ndarray:
    """Shannon entropy ``H(P) = −Σ p log p`` in nats over the last axis."""
    t, from_numpy = _as_tensor(logits)
    lp = log_probs(t, temperature)
    return _out(entropy_from_log_probs(lp), from_numpy)


def entropy_from_log_probs(lp: torch.Tensor) -> torch.Tensor:
    """``−Σ p log p`` from log-probabilities (``0 · log 0`` counts as 0)."""
    zero = torch.zeros((), dtype=lp.dtype, device=lp.device)
    return -torch.where(torch.isneginf(lp), zero, lp.exp() * lp).sum(-1)


def cross_entropy(
    p_logits: ArrayLike, q_logits: ArrayLike, temperature: float = 1.0
) -> torch.Tensor | np.ndarray:
    """Cross-entropy ``H(P, Q) = −Σ p log q = H(P) + KL(P‖Q)`` in nats.

    Note: this is what many "forward KL" distillation losses really compute; it differs from the
    KL by the reference's entropy, which is not zero.
    """
    lp, lq, from_numpy = _log_prob_pair(p_logits, q_logits, temperature)
    return _out(entropy_from_log_probs(lp) + _kl_from_log_probs(lp, lq), from_numpy)


def gaussian_kl(
    mu1: ArrayLike | float,
    sigma1: ArrayLike | float,
    mu2: ArrayLike | float,
    sigma2: ArrayLike | float,
) -> float:
    """Closed-form ``KL(N(μ1, σ1²) ‖ N(μ2, σ2²))`` in nats (the first Gaussian is P).

    ``ln(σ2/σ1) + (σ1² + (μ1 − μ2)²) / (2σ2²) − ½``. Arrays (NumPy or CPU torch) are treated as
    the independent coordinates of a diagonal multivariate Gaussian and their KLs are summed (KL
    is additive over independent products); scalars broadcast. ``σ`` are standard deviations, not
    variances, and must be > 0. Computed in float64; returns a Python float.
    """
    m1, s1, m2, s2 = (np.asarray(v, dtype=np.float64) for v in (mu1, sigma1, mu2, sigma2))
    if np.any(s1 <= 0) or np.any(s2 <= 0):
        raise ValueError("standard deviations must be > 0")
    per_dim = np.log(s2 / s1) + (s1**2 + (m1 - m2) ** 2) / (2 * s2**2) - 0.5
    return float(per_dim.sum())


def in_top_k(log_probs_q: torch.Tensor, token: torch.Tensor, k: int) -> torch.Tensor:
    """Whether ``token`` (per row) is among Q's ``k`` most likely tokens (ties favour it)."""
    rank = (log_probs_q > log_probs_q.gather(-1, token[:, None])).sum(-1)
    return rank < min(k, log_probs_q.shape[-1])


def nonfinite_rows(logits: torch.Tensor) -> torch.Tensor:
    """Boolean ``[...]`` mask of rows that are not a distribution: any NaN/+inf, or all ``-inf``."""
    bad = torch.isnan(logits).any(-1) | torch.isposinf(logits).any(-1)
    return bad | torch.isneginf(logits).all(-1)


def outside_vocabulary(targets: torch.Tensor, vocab_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Targets safe to gather (ids ``>= vocab_size`` replaced by 0) and the mask of those ids.

    A tokenizer can list more tokens than an output layer has rows; such a target has
    probability 0 under the model (see :func:`zero_probability_targets`), never an out-of-range
    gather (a device assert on CUDA).
    """
    outside = targets >= vocab_size
    return torch.where(outside, torch.zeros_like(targets), targets), outside


def zero_probability_targets(metrics: dict[str, torch.Tensor], outside: torch.Tensor) -> None:
    """In place: targets outside both models' vocabulary have p(x) = q(x) = 0.

    So ``nll_reference = nll_candidate = +inf`` and ``delta_p = 0``; the distributions (KL, JSD,
    entropies, agreement) do not depend on the target and keep their values.
    """
    if not bool(outside.any()):
        return
    rows = outside.to(metrics["nll_reference"].device)
    for name in ("nll_reference", "nll_candidate"):
        metrics[name][rows] = math.inf
    metrics["delta_p"][rows] = 0.0


def token_metrics(
    reference_logits: torch.Tensor,
    candidate_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 5,
) -> dict[str, torch.Tensor]:
    """Every per-token quantity lmkl reports, for rows of logits ``[N, V]`` and targets ``[N]``.

    Returns a mapping from each name in :data:`TOKEN_METRIC_NAMES` to a float32 ``[N]`` tensor
    (``top1_agree`` and ``top1_in_top5`` are 0/1) plus ``"nonfinite"`` (bool ``[N]``). In nats:

    * ``kl`` = KL(P‖Q), ``reverse_kl`` = KL(Q‖P), ``jsd`` = JSD(P, Q);
    * ``entropy_reference`` = H(P), ``entropy_candidate`` = H(Q);
    * ``nll_reference`` = −log p(x), ``nll_candidate`` = −log q(x) for the target token x;
    * ``delta_p`` = q(x) − p(x); ``reference_top1_prob`` = max p;
    * ``top1_agree``: argmax P == argmax Q; ``top1_in_top5``: argmax P is in Q's top ``top_k``.

    Rows flagged ``nonfinite`` (see :func:`nonfinite_rows`) hold NaN in every metric. The caller
    bounds memory by passing row chunks: this function allocates a few ``[N, V]`` temporaries.
    """
    if reference_logits.shape != candidate_logits.shape:
        raise ValueError(
            f"logit shapes differ: {tuple(reference_logits.shape)} vs "
            f"{tuple(candidate_logits.shape)}"
        )
    # The definition computes in float64 whatever the input: float32 arithmetic is off by up
    # to 100% for near-identical models (see lmkl.scoring.accuracy), and the fast kernels send
    # only their rare non-finite rows here. (MPS has no float64: such rows go to the CPU.)
    compute_dtype = torch.float64
    device = reference_logits.device
    compute_device = torch.device("cpu") if device.type == "mps" else device
    ref = reference_logits.to(compute_device, compute_dtype)
    cand = candidate_logits.to(compute_device, compute_dtype)
    bad = nonfinite_rows(ref) | nonfinite_rows(cand)
    if bad.any():
        # Replace broken rows by a uniform distribution so that the math below stays finite;
        # their results are overwritten with NaN at the end.
        ref = torch.where(bad[:, None], torch.zeros_like(ref), ref)
        cand = torch.where(bad[:, None], torch.zeros_like(cand), cand)

    lp = log_probs(ref, temperature)
    lq = log_probs(cand, temperature)
    targets = targets.to(lp.device).long()
    lp_x = lp.gather(-1, targets[:, None]).squeeze(-1)
    lq_x = lq.gather(-1, targets[:, None]).squeeze(-1)
    ref_top1_lp, ref_top1 = lp.max(-1)
    cand_top1 = lq.argmax(-1)
    k = min(top_k, lq.shape[-1])
    in_topk = (lq.topk(k, dim=-1).indices == ref_top1[:, None]).any(-1)

    out: dict[str, torch.Tensor] = {
        "kl": _kl_from_log_probs(lp, lq),
        "reverse_kl": _kl_from_log_probs(lq, lp),
        "jsd": _jsd_from_log_probs(lp, lq),
        "entropy_reference": entropy_from_log_probs(lp),
        "entropy_candidate": entropy_from_log_probs(lq),
        "nll_reference": -lp_x,
        "nll_candidate": -lq_x,
        "delta_p": lq_x.exp() - lp_x.exp(),
        "top1_agree": (ref_top1 == cand_top1).to(compute_dtype),
        "top1_in_top5": in_topk.to(compute_dtype),
        "reference_top1_prob": ref_top1_lp.exp(),
    }
    result = {name: out[name].float() for name in TOKEN_METRIC_NAMES}
    if bad.any():
        for value in result.values():
            value[bad] = float("nan")
    result["nonfinite"] = bad
    return {name: value.to(device) for name, value in result.items()}
