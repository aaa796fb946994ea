"""The decoder/output-layer split and the load-time probes that prove it exact.

A causal LM is split into its decoder (hidden states) and its output layer (hidden → logits), so
that logits are computed only at scored positions and a chunk of tokens at a time. The split is
checked against the model's full forward on a probe input at load time; a model whose logits the
split cannot reproduce falls back to the full forward, so results stay exact. A second probe
proves the model causal (a bidirectional encoder that loads as a causal LM is refused) and
measures how much its logits depend on the other rows of a batch (LLM.int8() does).
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass, field
from typing import Any

import torch

from lmkl.models.loaded import LoadedModel, OutputHead


def make_head(model: Any) -> OutputHead | None:
    """The model's output layer with its logit post-processing, or None when the model has no
    separate decoder and output layer (it then runs its full forward)."""
    linear = model.get_output_embeddings()
    base = getattr(model, "base_model", None)
    if linear is None or base is None or base is model:
        return None
    config = model.config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    divide_by = getattr(config, "logits_scaling", None)
    return OutputHead(
        linear=linear,
        softcap=float(softcap) if softcap else None,
        scale=float(scale) if isinstance(scale, int | float) and scale != 1 else None,
        divide_by=float(divide_by)
        if isinstance(divide_by, int | float) and divide_by != 1
        else None,
    )


#: Full-forward logits of the probe input, from the split check to the causality check of the
#: same model (one forward fewer per model at load time).
_PROBE_LOGITS: weakref.WeakKeyDictionary[Any, torch.Tensor] = weakref.WeakKeyDictionary()


def _probe_inputs(loaded: LoadedModel) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The two probe inputs: 8 random tokens, and the same with the last 4 changed."""
    vocab = min(loaded.logits_width, len(loaded.tokenizer))
    if vocab < 2:
        return None
    gen = torch.Generator().manual_seed(1)
    first = torch.randint(0, vocab, (1, 8), generator=gen)
    second = first.clone()
    second[0, 4:] = (first[0, 4:] + torch.randint(1, vocab, (4,), generator=gen)) % vocab
    return first, second


def split_is_exact(loaded: LoadedModel, *, keep_for_probe: bool = True) -> bool:
    """Compare the decoder+head split with the model's own forward on a short probe.

    ``keep_for_probe``: keep the full forward's logits for :func:`probe_model` of the same
    model (pass False when no probe follows, e.g. for a model being trained, so nothing stays
    cached). A model marked ``no_inference_mode`` (one being trained, or one whose kernels
    refuse inference mode) is run under ``no_grad`` only: a tensor it caches while probed must
    not be an inference tensor that a later backward would refuse.
    """
    grad_off = torch.no_grad() if loaded.no_inference_mode else torch.inference_mode()
    with grad_off:
        return _split_is_exact(loaded, keep_for_probe)


def _split_is_exact(loaded: LoadedModel, keep_for_probe: bool) -> bool:
    probes = _probe_inputs(loaded)
    # A vocabulary of one token (or none) has no second input to tell causality by.
    ids = probes[0] if probes is not None else torch.zeros((1, 8), dtype=torch.long)
    ids = ids.to(loaded.device)
    mask = torch.ones_like(ids)
    try:
        full = loaded.forward_logits(ids, mask)
        if probes is not None and keep_for_probe:
            _PROBE_LOGITS[loaded.model] = full  # the causality check's first forward
        full = full.float()
        split = loaded.logits(loaded.hidden_states(ids, mask)).float()
    except Exception:  # any failure of the split path means: do not use it
        return False
    if split.shape != full.shape:
        return False
    tolerance = loaded.probe_tolerance
    scale = max(1.0, float(full.abs().max()))
    return bool((split - full).abs().max() <= tolerance * scale)


#: How much larger than the change from other rows of the batch the change from later tokens
#: of the same row must be to prove attention to later tokens. A model whose numerics couple
#: all tokens of a forward (LLM.int8() picks its outlier columns over the whole input) moves
#: a position's logits by about as much when later tokens change as when the other rows do;
#: a bidirectional encoder moves them by O(1) and does not care about other rows at all.
_ENCODER_FACTOR = 4.0

#: Batch companions measured per model: two different pairs of random rows next to the probe.
_COMPANION_SETS = 2

#: Relative change of logits that float32 rounding explains (the exact probes' tolerance).
_ROUNDING = 1e-4


@dataclass
class CausalityProbe:
    """What the load-time probe found: causal or not, and how much the logits of one text move
    when the other rows of its batch change (``batch_dependence``; see :func:`probe_model`)."""

    causal: bool
    later_change: float
    batch_dependence: dict[str, Any] = field(default_factory=dict)


def _forward(loaded: LoadedModel, ids: torch.Tensor) -> torch.Tensor:
    ids = ids.to(loaded.device)
    return loaded.forward_logits(ids, torch.ones_like(ids)).float().cpu()


def _finite_max_change(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """``(max |a - b|, max |a|)`` over the entries finite in both (0 when none are)."""
    both = torch.isfinite(a) & torch.isfinite(b)
    if not bool(both.any()):
        return 0.0, 0.0
    return float((a[both] - b[both]).abs().max()), float(a[both].abs().max())


def measure_batch_dependence(
    loaded: LoadedModel, ids: torch.Tensor, alone: torch.Tensor
) -> dict[str, Any]:
    """How much the logits of row ``ids`` (``[1, T]``, logits ``alone`` from a batch of one)
    move when the same row is scored next to other rows: the max and mean KL(alone‖batched)
    over its positions and :data:`_COMPANION_SETS` different pairs of random companions (nats,
    in float64), and the max |Δlogit|. ``significant`` says whether the change exceeds the rounding
    of float32 (True/False)."""
    vocab = min(loaded.logits_width, len(loaded.tokenizer))
    gen = torch.Generator().manual_seed(2)
    max_diff, scale = 0.0, 1.0
    kls = []
    log_p = torch.log_softmax(alone[0].double(), dim=-1)
    for _ in range(_COMPANION_SETS):
        companions = torch.randint(0, vocab, (2, ids.shape[1]), generator=gen)
        batched = _forward(loaded, torch.cat([ids, companions]))[0]
        diff, size = _finite_max_change(alone[0], batched)
        max_diff, scale = max(max_diff, diff), max(scale, size)
        log_q = torch.log_softmax(batched.double(), dim=-1)
        kl = (log_p.exp() * (log_p - log_q)).sum(-1)
        kls.append(kl[torch.isfinite(kl)].clamp_min(0.0))
    every = torch.cat(kls)
    return {
        "max_kl": float(every.max()) if every.numel() else 0.0,
        "mean_kl": float(every.mean()) if every.numel() else 0.0,
        "max_abs_logit_diff": max_diff,
        "companion_sets": _COMPANION_SETS,
        "probe_tokens": int(ids.shape[1]),
        # Beyond float32 rounding, whatever the model's precision: a half-precision or int8
        # model's batch noise is part of what its KL measures, so it is reported.
        "significant": bool(max_diff > _ROUNDING * scale),
    }


@torch.inference_mode()
def probe_model(loaded: LoadedModel) -> CausalityProbe:
    """Probe that the logits at a position do not depend on later tokens, and measure how much
    they depend on the other rows of a batch.

    Some encoders (BERT-style masked LMs) load through AutoModelForCausalLM, so the class alone
    does not prove causality. Two single-row inputs share their first half and differ in the
    second; a causal model gives the same first-half logits. Some causal models are not exact
    per row, though: LLM.int8() decomposes the columns where *any* token of the forward has an
    outlier, so every token's logits move a little with every other token, later ones and other
    rows alike. So the same row is also scored next to different companion rows: a change from
    later tokens no larger than :data:`_ENCODER_FACTOR` times the change from companions is that
    batch coupling, not attention to the future. Positions whose logits are not finite in
    either input are not compared (a model producing NaN is reported per token, not here).
    The first input's forward is the one the split check just ran, when it ran.
    """
    probes = _probe_inputs(loaded)
    if probes is None:
        return CausalityProbe(causal=True, later_change=0.0)
    known = _PROBE_LOGITS.pop(loaded.model, None)
    try:
        first = known.float().cpu() if known is not None else _forward(loaded, probes[0])
        second = _forward(loaded, probes[1])
        batch = measure_batch_dependence(loaded, probes[0], first)
    except Exception:  # the real run will report a failing forward with its own message
        return CausalityProbe(causal=True, later_change=0.0)
    later, size = _finite_max_change(first[0, :4], second[0, :4])
    exact = later <= loaded.probe_tolerance * max(1.0, size)
    coupled = later <= _ENCODER_FACTOR * batch["max_abs_logit_diff"]
    return CausalityProbe(
        causal=exact or (batch["max_abs_logit_diff"] > 0 and coupled),
        later_change=later,
        batch_dependence=batch,
    )


def is_causal(loaded: LoadedModel) -> bool:
    """True when :func:`probe_model` finds the model causal."""
    return probe_model(loaded).causal
