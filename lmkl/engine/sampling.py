"""Sampled sequence-level KL, the seed's "expectation form": ``KL(P‖Q) = E_{y~P}[log P/Q (y)]``.

For every prompt ``x``, ``num_samples`` continuations ``y = y_1 .. y_T`` are drawn from the
reference P (``direction="forward"``; from the candidate Q for ``"reverse"``, which estimates
``KL(Q‖P)``), each ending at a stop token (EOS) or after ``max_new_tokens`` tokens. Each
continuation is then scored teacher-forced under both models (one forward each), giving per
token ``log p(y_t | x, y<t)``, ``log q(y_t | x, y<t)`` and the exact per-step divergence
``KL_t = KL(P(·|x, y<t) ‖ Q(·|x, y<t))`` over the whole vocabulary.

The estimand is the KL between the two models' distributions over continuations
(``KL(P(Y|x) ‖ Q(Y|x))`` for ``Y`` stopped at EOS or at ``max_new_tokens``), in **nats per
continuation**, averaged over prompts. By the chain rule it equals ``E_{y~P}[Σ_t KL_t]``.
With ``ℓ_t = log p(y_t|·) − log q(y_t|·)`` and ``r_t = exp(−ℓ_t)`` (= q/p of the sampled token),
the estimators, per sampled continuation, are:

``k1 = Σ_t ℓ_t = log P(y) − log Q(y)``
    **unbiased** for the sequence KL; its variance grows with the length.
``k2 = ½ (log P(y) − log Q(y))²``
    **biased** (it estimates ½E[(log P/Q)²], which is close to KL only when P ≈ Q); low variance
    and never negative. Reported for comparison with RL practice, not as a KL estimate.
``k3_sequence = (R − 1) − log R`` with ``R = Q(y)/P(y) = exp(−k1)``
    **unbiased** (``E_P[R] = 1``) and never negative, but ``R`` is a product over tokens, so its
    variance can explode for long continuations.
``k3 = Σ_t [(r_t − 1) − log r_t]`` (per token, summed)
    per token, ``E[(r_t − 1) − log r_t | y<t] = KL_t``: an **unbiased** estimate of the per-step KL
    at the visited prefix (``E[r_t | y<t] = 1``). Summed over the continuation (whether a step
    happens depends only on ``y<t``), it is **unbiased** for the sequence KL, each term ``≥ 0``.
``exact_per_step = Σ_t KL_t`` (Rao-Blackwellised)
    replaces each sampled ``ℓ_t`` by its conditional expectation ``KL_t``: **unbiased**, and its
    variance is never larger than k1's; usually by far the lowest. This is the headline number.

Sampling with ``temperature ≠ 1``, ``top_k`` or ``top_p`` draws from a distribution S ≠ P. The
continuations are still scored under the **untruncated** P and Q, so every estimator then
estimates an expectation under S (e.g. ``E_{y~S}[log P(y) − log Q(y)]``), which is **not**
``KL(P‖Q)`` and can even be negative. Results are then flagged ``biased: true`` with a warning;
top-k/top-p remove tokens from S's support, so no reweighting could recover ``KL(P‖Q)`` from them.

Sampling is seeded per continuation (one ``torch.Generator`` per (seed, prompt, sample), inverse-
CDF draws in float64), so the draws of one continuation do not depend on the others.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from pydantic import Field

from lmkl.analysis.stats import ratio_mean_se
from lmkl.errors import DataError
from lmkl.models import LoadedModel
from lmkl.scoring.divergence import token_metrics
from lmkl.specs import StrictModel

ProgressCallback = Callable[[int, int], None]
LogCallback = Callable[[str], None]

#: Estimators reported, in display order.
ESTIMATORS: tuple[str, ...] = ("exact_per_step", "k1", "k3", "k3_sequence", "k2")

#: Whether each estimator is unbiased for the sequence KL when sampling from P itself.
UNBIASED: dict[str, bool] = {
    "exact_per_step": True,
    "k1": True,
    "k3": True,
    "k3_sequence": True,
    "k2": False,
}

ESTIMATOR_DESCRIPTIONS: dict[str, str] = {
    "exact_per_step": "Σ_t KL(P(·|y<t)‖Q(·|y<t)) along the sampled path (Rao-Blackwellised)",
    "k1": "log P(y) − log Q(y)",
    "k3": "Σ_t (r_t − 1) − log r_t, r_t = q(y_t|y<t)/p(y_t|y<t)",
    "k3_sequence": "(R − 1) − log R, R = Q(y)/P(y)",
    "k2": "½ (log P(y) − log Q(y))² (biased)",
}

SAMPLES_FILE = "samples.parquet"
TEXT_FILE = "samples.jsonl"


class SampleSpec(StrictModel):
    """How continuations are sampled (all of it recorded in the results)."""

    num_samples: int = Field(16, ge=2, description="Continuations per prompt (>= 2 for an se).")
    max_new_tokens: int = Field(64, ge=1, description="Stop a continuation after this many tokens.")
    temperature: float = Field(1.0, gt=0, description="Sampling temperature (1 = sample from P).")
    top_k: int = Field(0, ge=0, description="Sample from the k likeliest tokens only (0 = off).")
    top_p: float = Field(1.0, gt=0, le=1, description="Nucleus sampling mass (1 = off).")
    direction: Literal["forward", "reverse"] = Field(
        "forward",
        description="forward: sample from the reference, estimate KL(P‖Q); reverse: "
        "sample from the candidate, estimate KL(Q‖P).",
    )
    seed: int = Field(0, ge=0, description="Seed of the per-continuation generators.")
    batch_size: int = Field(16, ge=1, description="Continuations sampled and scored together.")
    stop_token_ids: list[int] = Field(
        default_factory=list,
        description="Extra stop tokens besides the tokenizer's and generation config's EOS.",
    )

    @property
    def exact(self) -> bool:
        """Whether the sampling distribution is the model's own (no temperature or truncation)."""
        return self.temperature == 1.0 and self.top_k == 0 and self.top_p == 1.0


# --------------------------------------------------------------------------------------------
# Sampling
# --------------------------------------------------------------------------------------------


def sampling_log_probs(
    logits: torch.Tensor, temperature: float = 1.0, top_k: int = 0, top_p: float = 1.0
) -> torch.Tensor:
    """Log-probabilities ``[B, V]`` of the distribution actually sampled from.

    Order: divide by ``temperature``, keep the ``top_k`` largest logits (ties at the k-th value
    are kept), then keep the smallest set of most likely tokens whose mass reaches ``top_p``;
    removed tokens get ``-inf``. With the defaults this is ``log_softmax(logits)``.
    """
    x = logits.float() if logits.dtype in (torch.float16, torch.bfloat16) else logits
    if temperature != 1.0:
        x = x / temperature
    if 0 < top_k < x.shape[-1]:
        kth = x.topk(top_k, dim=-1).values[..., -1:]
        x = x.masked_fill(x < kth, -math.inf)
    lp = torch.log_softmax(x, dim=-1)
    if top_p < 1.0:
        sorted_lp, order = lp.sort(dim=-1, descending=True)
        probs = sorted_lp.exp()
        mass_before = probs.cumsum(-1) - probs
        drop_sorted = mass_before >= top_p  # the first token always stays (mass_before = 0)
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        lp = torch.log_softmax(lp.masked_fill(drop, -math.inf), dim=-1)
    return lp


def draw_tokens(log_probs: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF draws: one token per row of ``log_probs`` for each uniform in ``[0, 1)``.

    The CDF is accumulated in float64 (except on MPS), so tokens of tiny probability are drawn
    at their own rate; a token of probability zero is never drawn.
    """
    dtype = torch.float32 if log_probs.device.type == "mps" else torch.float64
    cdf = log_probs.to(dtype).exp().cumsum(-1)
    u = uniforms.to(device=log_probs.device, dtype=dtype)[:, None] * cdf[:, -1:]
    index = torch.searchsorted(cdf, u, right=True).squeeze(-1)
    return index.clamp_max(log_probs.shape[-1] - 1)


def sample_seed(seed: int, prompt_id: int, sample_id: int) -> int:
    """The seed of one continuation's generator, derived from the run seed (reproducible)."""
    state = np.random.SeedSequence([seed, prompt_id, sample_id])
    return int(state.generate_state(1, np.uint64)[0])


def stop_ids(model: LoadedModel, extra: Sequence[int] = ()) -> set[int]:
    """Stop tokens: the tokenizer's EOS, the generation config's EOS ids and ``extra``."""
    ids = set(extra)
    eos = getattr(model.tokenizer, "eos_token_id", None)
    if eos is not None:
        ids.add(int(eos))
    config = getattr(model.model, "generation_config", None)
    value = getattr(config, "eos_token_id", None) if config is not None else None
    if isinstance(value, int):
        ids.add(value)
    elif isinstance(value, list | tuple):
        ids.update(int(v) for v in value)
    return ids


@dataclass
class Continuation:
    """One sampled continuation of a prompt."""

    prompt_id: int
    sample_id: int
    seed: int
    token_ids: list[int]
    #: True when it ended with a stop token (which is part of ``token_ids`` and scored).
    stopped: bool
    #: log S(y) under the distribution actually sampled from (= log P(y) when sampling is exact,
    #: up to the cached-vs-full forward rounding).
    sampling_logprob: float


def _cache_argument(module: Any) -> str:
    """transformers >= 5 calls the KV cache ``cache``; earlier versions ``past_key_values``."""
    params = inspect.signature(module.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def _next_logits(loaded: LoadedModel, ids: torch.Tensor, cache: Any) -> tuple[torch.Tensor, Any]:
    """Logits ``[B, V]`` at the last position of ``ids`` given ``cache``, and the new cache."""
    if loaded.head is not None:
        base = loaded.model.base_model
        kwargs = {_cache_argument(base): cache} if cache is not None else {}
        out = base(input_ids=ids, use_cache=True, **kwargs)
        logits = loaded.head(out.last_hidden_state[:, -1])
    else:
        model = loaded.model
        params = inspect.signature(model.forward).parameters
        kwargs = {_cache_argument(model): cache} if cache is not None else {}
        if "logits_to_keep" in params:
            kwargs["logits_to_keep"] = 1
        out = model(input_ids=ids, use_cache=True, **kwargs)
        logits = out.logits[:, -1]
    new_cache = getattr(out, "cache", None)
    if new_cache is None:
        new_cache = getattr(out, "past_key_values", None)
    return logits, new_cache


@torch.inference_mode()
def sample_continuations(
    sampler: LoadedModel,
    prompt_ids: Sequence[int],
    prompt_id: int,
    sample_ids: Sequence[int],
    spec: SampleSpec,
    vocab_size: int,
    stops: set[int],
) -> list[Continuation]:
    """Sample one continuation of ``prompt_ids`` per entry of ``sample_ids`` from ``sampler``.

    Uses the KV cache; a continuation ends after its first stop token or ``max_new_tokens``.
    Only the first ``vocab_size`` logits (the real vocabulary) are sampled from.
    """
    n = len(sample_ids)
    seeds = [sample_seed(spec.seed, prompt_id, s) for s in sample_ids]
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    device = sampler.device
    ids = torch.tensor([list(prompt_ids)] * n, dtype=torch.long, device=device)
    logits, cache = _next_logits(sampler, ids, None)
    tokens: list[list[int]] = [[] for _ in range(n)]
    logprob = [0.0] * n
    done = [False] * n
    for step in range(spec.max_new_tokens):
        lp = sampling_log_probs(logits[:, :vocab_size], spec.temperature, spec.top_k, spec.top_p)
        uniforms = torch.stack(
            [torch.rand((), generator=g, dtype=torch.float64) for g in generators]
        )
        drawn = draw_tokens(lp, uniforms)
        chosen_lp = lp.gather(-1, drawn[:, None]).squeeze(-1).double().cpu().tolist()
        for b, token in enumerate(drawn.cpu().tolist()):
            if done[b]:
                continue
            tokens[b].append(token)
            logprob[b] += chosen_lp[b]
            done[b] = token in stops
        if all(done) or step == spec.max_new_tokens - 1:
            break
        # Finished rows keep decoding (their tokens are ignored) so the batch stays rectangular.
        logits, cache = _next_logits(sampler, drawn[:, None].to(device), cache)
    return [
        Continuation(prompt_id, s, seed, toks, bool(toks) and toks[-1] in stops, lp_sum)
        for s, seed, toks, lp_sum in zip(sample_ids, seeds, tokens, logprob, strict=True)
    ]


# --------------------------------------------------------------------------------------------
# Scoring
# --------------------------------------------------------------------------------------------


@torch.inference_mode()
def score_continuations(
    reference: LoadedModel,
    candidate: LoadedModel,
    prompt_ids: Sequence[int],
    continuations: Sequence[Continuation],
    vocab_size: int,
    chunk_size: int,
    pad_id: int,
) -> list[dict[str, np.ndarray]]:
    """Teacher-forced per-token metrics of each continuation (see :func:`token_metrics`).

    One forward per model over ``prompt + continuation`` (right-padded); logits are built only at
    the continuation's positions, ``chunk_size`` rows at a time, with temperature 1 (the models'
    own distributions, whatever the sampling used).
    """
    p = len(prompt_ids)
    width = p + max(len(c.token_ids) for c in continuations)
    ids = torch.full((len(continuations), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    rows, cols, targets = [], [], []
    for r, cont in enumerate(continuations):
        seq = list(prompt_ids) + cont.token_ids
        ids[r, : len(seq)] = torch.tensor(seq)
        mask[r, : len(seq)] = 1
        rows.extend([r] * len(cont.token_ids))
        cols.extend(range(p - 1, p - 1 + len(cont.token_ids)))
        targets.extend(cont.token_ids)
    rows_t, cols_t = torch.tensor(rows), torch.tensor(cols)
    hidden = []
    for model in (reference, candidate):
        h = model.hidden_states(ids.to(model.device), mask.to(model.device))
        hidden.append(h[rows_t.to(model.device), cols_t.to(model.device)])
        del h
    targets_t = torch.tensor(targets)
    parts: list[dict[str, torch.Tensor]] = []
    for start in range(0, len(targets), chunk_size):
        stop = start + chunk_size
        ref_logits = reference.logits(hidden[0][start:stop])[..., :vocab_size]
        cand_logits = candidate.logits(hidden[1][start:stop])[..., :vocab_size]
        metrics = token_metrics(
            ref_logits, cand_logits.to(ref_logits.device), targets_t[start:stop]
        )
        parts.append({k: v.cpu() for k, v in metrics.items()})
    merged = {k: torch.cat([part[k] for part in parts]).numpy() for k in parts[0]}
    out = []
    offset = 0
    for cont in continuations:
        n = len(cont.token_ids)
        out.append({k: v[offset : offset + n] for k, v in merged.items()})
        offset += n
    return out


# --------------------------------------------------------------------------------------------
# Estimators and their summaries (NumPy, float64)
# --------------------------------------------------------------------------------------------


def sequence_estimators(
    log_ratios: Sequence[np.ndarray], exact_kls: Sequence[np.ndarray]
) -> dict[str, np.ndarray]:
    """Per-continuation estimators from per-token ``ℓ_t`` and exact per-step KLs.

    ``log_ratios[i][t] = log s(y_t|·) − log o(y_t|·)`` where s is the model sampled from and o
    the other one; ``exact_kls[i][t] = KL(S(·|y<t) ‖ O(·|y<t))``. See the module docstring for
    what each estimator estimates and which are unbiased. ``+inf`` (a sampled token the other
    model gives probability zero) propagates; it is never turned into NaN.
    """
    k1 = np.array([np.sum(lr, dtype=np.float64) for lr in log_ratios])
    with np.errstate(over="ignore", invalid="ignore"):
        k3 = np.array([np.sum(_k3_terms(np.asarray(lr, dtype=np.float64))) for lr in log_ratios])
        k3_sequence = _k3_terms(k1)
    return {
        "exact_per_step": np.array([np.sum(kl, dtype=np.float64) for kl in exact_kls]),
        "k1": k1,
        "k3": k3,
        "k3_sequence": k3_sequence,
        "k2": 0.5 * k1**2,
    }


def _k3_terms(log_ratio: np.ndarray) -> np.ndarray:
    """``(r − 1) − log r`` with ``r = exp(−ℓ)``; ``expm1`` keeps it accurate for small ``ℓ``.

    ``ℓ = +inf`` (r = 0) gives ``+inf``; a huge negative ``ℓ`` overflows r to ``+inf``, which is
    the estimator's true (enormous) value.
    """
    return np.expm1(-log_ratio) + log_ratio


def _mean_se(values: np.ndarray) -> tuple[float, float]:
    n = values.size
    if n == 0:
        return math.nan, math.nan
    mean = float(values.mean())
    if not np.isfinite(values).all():
        return mean, math.nan if np.isnan(values).any() else math.inf
    return mean, float(values.std(ddof=1) / math.sqrt(n)) if n > 1 else math.nan


def estimator_summary(
    prompt_ids: np.ndarray, values: np.ndarray, tokens: np.ndarray
) -> dict[str, Any]:
    """Overall mean over prompts (each prompt weighted equally) with two standard errors.

    * ``se``: Monte-Carlo error over samples for *these* prompts, ``sqrt(Σ_j se_j²) / J`` from
      the per-prompt standard errors (stratified by prompt); ``ci95 = mean ± 1.96 se``.
    * ``se_prompts``: ``std(prompt means) / sqrt(J)``, the error when the prompts are themselves
      a sample of a larger prompt population (includes between-prompt variation).
    * ``per_token``: ``Σ value / Σ tokens`` over all continuations (nats per generated token),
      with a delta-method se over continuations.
    """
    unique = np.unique(prompt_ids)
    means, ses = [], []
    for pid in unique:
        m, s = _mean_se(values[prompt_ids == pid])
        means.append(m)
        ses.append(s)
    means_a, ses_a = np.asarray(means), np.asarray(ses)
    mean = float(means_a.mean()) if means_a.size else math.nan
    se = float(math.sqrt(np.sum(ses_a**2)) / len(unique)) if len(unique) else math.nan
    se_prompts = _mean_se(means_a)[1] if means_a.size > 1 else math.nan
    ratio, ratio_se = ratio_mean_se(values, tokens)
    ci = [mean - 1.96 * se, mean + 1.96 * se] if math.isfinite(se) else [math.nan, math.nan]
    return {
        "mean": mean,
        "se": se,
        "ci95": ci,
        "se_prompts": se_prompts,
        "per_token": {"mean": ratio, "se": ratio_se},
    }


def summarize_samples(table: dict[str, np.ndarray], spec: SampleSpec) -> dict[str, Any]:
    """The ``sampled_kl`` block of results.json from per-continuation columns."""
    prompt_ids = np.asarray(table["prompt_id"])
    tokens = np.asarray(table["tokens"], dtype=np.float64)
    estimators = {}
    for name in ESTIMATORS:
        block = estimator_summary(prompt_ids, np.asarray(table[name], dtype=np.float64), tokens)
        block["unbiased"] = UNBIASED[name] and spec.exact
        block["description"] = ESTIMATOR_DESCRIPTIONS[name]
        estimators[name] = block
    per_prompt = []
    for pid in np.unique(prompt_ids):
        sel = prompt_ids == pid
        entry: dict[str, Any] = {
            "prompt_id": int(pid),
            "samples": int(sel.sum()),
            "mean_tokens": float(tokens[sel].mean()),
            "stopped_share": float(np.asarray(table["stopped"])[sel].mean()),
        }
        for name in ESTIMATORS:
            m, s = _mean_se(np.asarray(table[name], dtype=np.float64)[sel])
            entry[name] = {"mean": m, "se": s}
        per_prompt.append(entry)
    forward = spec.direction == "forward"
    kl_name = "KL(P‖Q)" if forward else "KL(Q‖P)"
    sampler = "the reference P" if forward else "the candidate Q"
    warning = None
    target = kl_name
    if not spec.exact:
        warning = (
            f"sampling used temperature={spec.temperature}, top_k={spec.top_k}, "
            f"top_p={spec.top_p}, so continuations come from a distribution S other than "
            f"{sampler}: every estimate here is an expectation under S, NOT {kl_name}"
        )
        # What is estimated, named with its sampler (titles show it): never plain KL(P‖Q).
        changes = [f"T={spec.temperature:g}"] if spec.temperature != 1.0 else []
        changes += [f"top-k {spec.top_k}"] if spec.top_k else []
        changes += [f"top-p {spec.top_p:g}"] if spec.top_p != 1.0 else []
        first, second = ("P", "Q") if forward else ("Q", "P")
        target = (
            f"E_S(log {first} − log {second}) with S = {first} at {', '.join(changes)} "
            f"(not {kl_name})"
        )
    return {
        "target": target,
        "direction": spec.direction,
        "sampler": "reference" if forward else "candidate",
        "units": "nats per continuation (per_token: nats per generated token)",
        "estimand": (
            f"{target} between the two models' distributions over continuations (stopped at a "
            f"stop token or after {spec.max_new_tokens} tokens), averaged over prompts"
            if spec.exact
            else f"E_(y~S)[…] under the tempered/truncated sampler S; not {kl_name}"
        ),
        "exact_sampling": spec.exact,
        "biased": not spec.exact,
        "warning": warning,
        "headline": "exact_per_step",
        "estimators": estimators,
        "counts": {
            "prompts": len(per_prompt),
            "samples": int(prompt_ids.size),
            "tokens": int(tokens.sum()),
            "stopped": int(np.asarray(table["stopped"]).sum()),
        },
        "per_prompt": per_prompt,
    }


# --------------------------------------------------------------------------------------------
# Prompts
# --------------------------------------------------------------------------------------------


def encode_prompts(corpus: Any, tokenizer: Any) -> list[list[int]]:
    """Token ids of each prompt: text with the tokenizer's special tokens, or a chat prompt."""
    from lmkl.data.chat import encode_prompt

    prompts = []
    for doc in corpus.documents:
        if doc.messages is not None:
            ids = encode_prompt(tokenizer, doc.messages)
        else:
            ids = list(tokenizer(doc.text, add_special_tokens=True)["input_ids"])
        if not ids:
            raise DataError(
                f"prompt {doc.doc_id} is empty and the tokenizer adds no BOS token, so there is "
                "nothing to condition on",
                "drop empty prompts from the data",
            )
        prompts.append(ids)
    return prompts
