"""Top-k reference data: what a compact cache stores per token, and the KL interval it allows.

A compact reference keeps, per token, its K largest log-probabilities with their ids, the log of
the remaining (tail) mass, and its exact entropy and target log-probability. KL(P‖Q) is then not
known exactly; :func:`topk_kl_bounds` gives a guaranteed interval against the live candidate.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import torch

from lmkl.scoring.batches import Batch, model_rows
from lmkl.scoring.divergence import (
    entropy_from_log_probs,
    in_top_k,
    log_probs,
    nonfinite_rows,
    outside_vocabulary,
    zero_probability_targets,
)
from lmkl.scoring.token_scoring import ScoredModel, WorstTracker

#: Tail values per side used to tighten the top-k KL interval (see :func:`topk_kl_bounds`).
TAIL_VALUES = 64


def _fill(values: torch.Tensor, mass: torch.Tensor, cap: torch.Tensor) -> torch.Tensor:
    """Σ m_i·v_i when ``mass`` is poured onto ``values`` in order, at most ``cap`` per value.

    Mass left after the last value is put on the last value: the caller passes the extreme
    ``values`` of a set, so every remaining token's value lies beyond the last one and the
    result stays a valid bound. ``0 · -inf`` counts as 0.
    """
    n = values.shape[-1]
    before = cap[:, None] * torch.arange(n, dtype=values.dtype, device=values.device)
    share = (mass[:, None] - before).clamp(min=0.0)
    share = torch.minimum(share, cap[:, None].expand_as(share)).clone()
    share[:, -1] += (mass - cap * n).clamp(min=0.0)
    return torch.where(share > 0, share * values, torch.zeros_like(values)).sum(-1)


def topk_kl_bounds(
    top_logprobs: torch.Tensor,
    top_ids: torch.Tensor,
    log_tail: torch.Tensor,
    entropy: torch.Tensor,
    candidate_logprobs: torch.Tensor,
    tail_values: int = TAIL_VALUES,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Guaranteed bounds on KL(P‖Q) from P's top-k, its tail mass and entropy, and all of Q.

    Inputs per row: ``top_logprobs`` [N, K] (log p of P's K most likely tokens, largest first),
    ``top_ids`` [N, K], ``log_tail`` [N] (log of P's remaining mass p_T), ``entropy`` [N] (H(P),
    exact) and ``candidate_logprobs`` [N, V] (log q, all of it: the candidate runs live).
    Returns ``(lower, upper, top_part)`` where ``top_part = Σ_top p·(log p − log q)`` is the exact
    contribution of the top-k tokens.

    The math. Split KL = A + T − S with A = ``top_part``, T = Σ_tail p log p and
    S = Σ_tail p log q. T is known exactly from the entropy: T = −H(P) − Σ_top p log p. S is
    not, but the tail probabilities satisfy 0 ≤ p_x ≤ p_K (no tail token is more likely than the
    K-th) and Σ_tail p_x = p_T, while log q is known for every tail token. So S lies between the
    values of pouring the mass p_T, at most p_K per token, onto the tail tokens with the smallest
    log q (S_min) or the largest log q (S_max): a fractional knapsack, solved greedily from the
    ``tail_values`` extreme values on each side (mass beyond them is put on the last one, which
    only widens the bound). Hence A + T − S_max ≤ KL ≤ A + T − S_min. A second lower bound comes
    from the data-processing inequality on the partition {each top-k token, the tail}:
    KL ≥ A + p_T log(p_T / q_T). ``lower`` is the larger of the two (and ≥ 0).

    Without the entropy (top-k and tail mass only) a finite upper bound still exists whenever Q
    gives every tail token positive probability: Σ_tail p log p ≤ p_T log min(p_T, p_K), so
    KL ≤ A + p_T log min(p_T, p_K) − S_min; lmkl stores the entropy because it is tighter. If Q
    gives some tail token zero probability, the upper bound is +inf (the KL may be infinite).
    Bounds hold for the float32 inputs up to rounding; a slack of 1e-6 relative is added.
    """
    f64 = torch.float64
    lp_top = top_logprobs.to(f64)
    lq = candidate_logprobs
    lq_top = lq.gather(-1, top_ids.long()).to(f64)
    p_top = lp_top.exp()
    finite_p = torch.isfinite(lp_top)
    zero = torch.zeros((), dtype=f64, device=lp_top.device)
    top_terms = torch.where(finite_p & (p_top > 0), p_top * (lp_top - lq_top), zero)
    top_part = top_terms.sum(-1)

    log_tail = log_tail.to(f64)
    p_tail = log_tail.exp()
    tail_plogp = -entropy.to(f64) - torch.where(finite_p, p_top * lp_top, zero).sum(-1)
    cap = p_top[:, -1]

    masked_low = lq.scatter(-1, top_ids.long(), float("-inf"))
    n_tail = lq.shape[-1] - top_ids.shape[-1]
    m = max(1, min(tail_values, n_tail))
    if n_tail > 0:
        highest = masked_low.topk(m, dim=-1).values.to(f64)
        masked_high = lq.scatter(-1, top_ids.long(), float("inf"))
        lowest = masked_high.topk(m, dim=-1, largest=False).values.to(f64)
        log_q_tail = torch.logsumexp(masked_low, -1).to(f64)
        s_max = _fill(highest, p_tail, cap)
        s_min = _fill(lowest, p_tail, cap)
    else:
        log_q_tail = torch.full_like(p_tail, -math.inf)
        s_max = s_min = torch.zeros_like(p_tail)
    no_tail = p_tail <= 0
    s_max = torch.where(no_tail, zero, s_max)
    s_min = torch.where(no_tail, zero, s_min)
    tail_plogp = torch.where(no_tail, zero, tail_plogp)

    lower_entropy = top_part + tail_plogp - s_max
    dpi = torch.where(no_tail, zero, p_tail * (log_tail - log_q_tail))
    lower_dpi = top_part + dpi
    upper = top_part + tail_plogp - s_min
    slack = 1e-6 * (
        1.0 + top_part.abs().nan_to_num(0.0, 0.0, 0.0) + tail_plogp.abs().nan_to_num(0.0, 0.0, 0.0)
    )
    lower = (torch.maximum(lower_entropy, lower_dpi) - slack).clamp(min=0.0)
    upper = torch.maximum(upper + slack, lower)
    return lower, upper, top_part


def topk_stats(
    logits: torch.Tensor, targets: torch.Tensor, k: int, temperature: float
) -> dict[str, torch.Tensor]:
    """What a compact cache stores per row: top-k log-probs and ids, log tail mass, entropy,
    target NLL and top-1 probability (the same definitions as :func:`token_metrics`)."""
    bad = nonfinite_rows(logits)
    if bad.any():
        logits = torch.where(bad[:, None], torch.zeros_like(logits), logits)
    lp = log_probs(logits, temperature)
    top = lp.topk(k, dim=-1)
    entropy = entropy_from_log_probs(lp.double())
    log_tail = lp.scatter(-1, top.indices, float("-inf")).logsumexp(-1)
    safe, outside = outside_vocabulary(targets.to(lp.device).long(), lp.shape[-1])
    nll = -lp.gather(-1, safe[:, None]).squeeze(-1)
    nll[outside] = math.inf
    out = {
        "ids": top.indices.int().cpu(),
        "logprobs": top.values.float().cpu(),
        "log_tail": log_tail.float().cpu(),
        "entropy_reference": entropy.float().cpu(),
        "nll_reference": nll.float().cpu(),
        "reference_top1_prob": top.values[:, 0].exp().float().cpu(),
        "nonfinite": bad.cpu(),
    }
    for name in ("log_tail", "entropy_reference", "nll_reference", "reference_top1_prob"):
        out[name][out["nonfinite"]] = float("nan")
    return out


@torch.inference_mode()
def score_batch_topk(
    batch: Batch,
    reference: dict[str, torch.Tensor],
    candidate: ScoredModel,
    vocab_size: int,
    chunk_size: int,
    temperature: float,
    worst_k: int,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, list[dict[str, Any]]]]:
    """Per-token metrics of one candidate against a compact reference: exact ones, KL bounds.

    ``reference`` holds this batch's rows of the cache (see
    :meth:`lmkl.refcache.format.ReferenceCache.topk`). KL, reverse KL and JSD are not known
    exactly and are NaN; ``kl_lower``/``kl_upper`` bound the KL; the worst positions are those
    with the largest lower bound.
    """
    rows = model_rows(candidate, batch)
    targets, outside = outside_vocabulary(batch.targets, vocab_size)
    parts: list[dict[str, torch.Tensor]] = []
    tracker = WorstTracker(worst_k)
    for start in range(0, targets.numel(), chunk_size):
        stop = start + chunk_size
        logits = candidate.logits(rows[start:stop])[..., :vocab_size].float()
        ref = {name: value[start:stop].to(logits.device) for name, value in reference.items()}
        bad = nonfinite_rows(logits) | ref["nonfinite_reference"]
        if bad.any():
            logits = torch.where(bad[:, None], torch.zeros_like(logits), logits)
        lq = log_probs(logits, temperature)
        lower, upper, _ = topk_kl_bounds(
            ref["logprobs"], ref["ids"], ref["log_tail"], ref["entropy_reference"], lq
        )
        lq_x = lq.gather(-1, targets[start:stop].to(lq.device)[:, None]).squeeze(-1)
        ref_top1 = ref["ids"][:, 0]
        nan = torch.full_like(lower, math.nan)
        out = {
            "kl": nan,
            "reverse_kl": nan,
            "jsd": nan,
            "entropy_reference": ref["entropy_reference"],
            "entropy_candidate": entropy_from_log_probs(lq),
            "nll_reference": ref["nll_reference"],
            "nll_candidate": -lq_x,
            "delta_p": lq_x.exp() - (-ref["nll_reference"]).exp(),
            "top1_agree": (lq.argmax(-1) == ref_top1).float(),
            "top1_in_top5": in_top_k(lq, ref_top1, 5).float(),
            "reference_top1_prob": ref["logprobs"][:, 0].exp(),
            "kl_lower": lower,
            "kl_upper": upper,
        }
        out = {name: value.float().cpu() for name, value in out.items()}
        badc = bad.cpu()
        for value in out.values():
            value[badc] = math.nan
        out["nonfinite"] = badc
        zero_probability_targets(out, outside[start:stop])
        parts.append(out)
        tracker.offer_topk(out["kl_lower"], out["kl_upper"], ref["ids"], ref["logprobs"], lq, start)
        del logits, lq
    metrics = {name: torch.cat([p[name] for p in parts]).numpy() for name in parts[0]}
    return {candidate.label: metrics}, {candidate.label: tracker.result()}
