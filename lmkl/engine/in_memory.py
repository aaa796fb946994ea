"""Models already in memory (a model being trained, a teacher the caller loaded) as engine models.

The engine scores :class:`~lmkl.models.LoadedModel` objects; a run kind normally loads them from
a :class:`~lmkl.specs.ModelSpec`. A training loop holds its model itself: :func:`in_memory_model`
wraps it without copying or moving it, with the same decoder/output-layer split (proved exact on
a probe, as at load time) and a description for results.json. :func:`scoring_mode` is how such a
model is scored without disturbing its training: eval mode, no gradients and every random number
generator exactly as before.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch

from lmkl.errors import UsageError
from lmkl.models import LoadedModel, head_split
from lmkl.quantization import weight_storage
from lmkl.specs import ModelSpec

#: ``ModelSpec.model`` of a model given as an object (it names no directory or hub repo).
IN_MEMORY_PREFIX = "in-memory:"


@contextmanager
def preserved_rng() -> Iterator[None]:
    """Restore the Python, NumPy, torch and CUDA generators on exit: scoring draws nothing a
    training run would see (the engine seeds torch for its own determinism)."""
    python_state = random.getstate()
    numpy_state = np.random.get_state()
    torch_state = torch.random.get_rng_state()
    cuda_states = torch.cuda.get_rng_state_all() if torch.cuda.is_initialized() else None
    try:
        yield
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
        torch.random.set_rng_state(torch_state)
        if cuda_states is not None:
            torch.cuda.set_rng_state_all(cuda_states)


@contextmanager
def scoring_mode(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode, no gradients and preserved generators while scoring ``model``; afterwards every
    submodule's train/eval flag is what it was (a frozen submodule kept in eval mode stays so)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        with preserved_rng(), torch.no_grad():
            model.eval()
            yield
    finally:
        for module, training in modes:
            module.training = training


def in_memory_model(
    model: Any, tokenizer: Any, *, label: str = "model", step: int | None = None
) -> LoadedModel:
    """``model`` (a causal LM object, e.g. the one a Trainer trains) ready for the engine.

    Nothing is copied or moved: scoring runs where its parameters are, in their dtype. The
    forwards run under ``no_grad`` rather than inference mode, so no tensor the model caches
    while scoring is an inference tensor that a later backward would refuse.
    """
    if not isinstance(model, torch.nn.Module) or not hasattr(model, "get_output_embeddings"):
        raise UsageError(
            f"{type(model).__name__} is not a causal language model object",
            "pass a transformers model (e.g. AutoModelForCausalLM), a directory or a hub id",
        )
    if tokenizer is None:
        raise UsageError(
            f"no tokenizer for the in-memory model '{label}'",
            "pass its tokenizer (tokenizer=...), or give the Trainer a processing_class",
        )
    tokenizer = getattr(tokenizer, "tokenizer", tokenizer)  # a processor: its text tokenizer
    parameter = next(model.parameters())
    loaded = LoadedModel(
        spec=ModelSpec(model=f"{IN_MEMORY_PREFIX}{label}", label=label, step=step),
        model=model,
        tokenizer=tokenizer,
        device=parameter.device,
        head=None,
        no_inference_mode=True,
    )
    with scoring_mode(model):
        loaded.head = head_split.make_head(model)
        # no_inference_mode=True above: the probe runs under no_grad, and keeps no logits
        # (no causality probe follows for a model the caller built and trains).
        exact = loaded.head is not None and head_split.split_is_exact(loaded, keep_for_probe=False)
        if not exact:
            loaded.head = None
    loaded.description = describe_in_memory(loaded)
    return loaded


def describe_in_memory(loaded: LoadedModel) -> dict[str, Any]:
    """results.json's description of an in-memory model (no files: no path or hash)."""
    model = loaded.model
    storage = weight_storage(model)
    sizes = {key: storage[key] for key in ("weight_bytes", "bits_per_weight", "size_source")}
    return dict(
        label=loaded.label,
        model=loaded.spec.model,
        source="memory",
        architecture=type(model).__name__,
        dtype=str(next(model.parameters()).dtype).replace("torch.", ""),
        device=str(loaded.device),
        parameters=int(storage["weights"]),
        logits_width=loaded.logits_width,
        tokenizer_size=len(loaded.tokenizer),
        split_head=loaded.head is not None,
        adapter=None,
        adapter_sha256=None,
        group=loaded.spec.group,
        step=loaded.spec.step,
        quantization=None,
        bytes_in_memory=int(sum(p.numel() * p.element_size() for p in model.parameters())),
        **sizes,
    )
