"""The decoder/output-layer split and the load-time probes that prove it exact.

A causal LM is split into its decoder (hidden states) and its output layer (hidden → logits), so
that logits are computed only at scored positions and a chunk of tokens at a time. The split is
checked against the model's full forward on a probe input at load time; a model whose logits the
split cannot reproduce falls back to the full forward, so results stay exact. A second probe
proves the model causal (a bidirectional encoder that loads as a causal LM is refused).
"""

from __future__ import annotations

import weakref
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


@torch.inference_mode()
def split_is_exact(loaded: LoadedModel) -> bool:
    """Compare the decoder+head split with the model's own forward on a short probe."""
    probes = _probe_inputs(loaded)
    # A vocabulary of one token (or none) has no second input to tell causality by.
    ids = probes[0] if probes is not None else torch.zeros((1, 8), dtype=torch.long)
    ids = ids.to(loaded.device)
    mask = torch.ones_like(ids)
    try:
        full = loaded.forward_logits(ids, mask)
        if probes is not None:
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


@torch.inference_mode()
def is_causal(loaded: LoadedModel) -> bool:
    """Probe that the logits at a position do not depend on later tokens.

    Some encoders (BERT-style masked LMs) load through AutoModelForCausalLM, so the class alone
    does not prove causality. Two inputs share their first half and differ in the second; a
    causal model gives the same first-half logits. Positions whose logits are not finite in
    either input are not compared (a model producing NaN is reported per token, not here).
    The first input's forward is the one the split check just ran, when it ran.
    """
    probes = _probe_inputs(loaded)
    if probes is None:
        return True
    outputs = []
    known = _PROBE_LOGITS.pop(loaded.model, None)
    # Two separate forwards of one shape: rows of one batch could interact (e.g. MoE capacity).
    for i, ids in enumerate(probes):
        try:
            if i == 0 and known is not None:
                logits = known
            else:
                ids = ids.to(loaded.device)
                logits = loaded.forward_logits(ids, torch.ones_like(ids))
        except Exception:  # the real run will report a failing forward with its own message
            return True
        outputs.append(logits[0, :4].float())
    a, b = outputs
    both = torch.isfinite(a) & torch.isfinite(b)
    if not bool(both.any()):
        return True
    tolerance = loaded.probe_tolerance
    scale = max(1.0, float(a[both].abs().max()))
    return bool((a[both] - b[both]).abs().max() <= tolerance * scale)
