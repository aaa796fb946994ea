"""Run the reference with some modules taken from the candidate, from a layer boundary on.

Two context managers, both always restoring the reference as it was:

* :func:`borrowed` swaps module objects of the candidate into the reference (a quantized
  Linear, a whole decoder layer...), so the reference's forward calls the candidate's code and
  weights for exactly those modules;
* :func:`replaying` replaces decoder layers ``0..b-1`` by stand-ins that return a stored hidden
  state ``h_b``, so a forward of the reference computes only layers ``b..L-1``.

Why stand-ins instead of calling layers ``b..L-1`` directly with captured arguments: the model's
own forward then still computes everything around the layers (position embeddings, attention
masks of every layer type, the final norm, soft-capping) exactly as it does normally, for any
architecture, and the stand-ins cost nothing; only embeddings and mask building run again.
:func:`layer_outputs` records every decoder layer's output with forward hooks: the boundaries.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch


def _cast(value: Any, dtype: torch.dtype) -> Any:
    """Floating tensors (also inside tuples, lists and dicts) converted to ``dtype``."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype) if value.is_floating_point() and value.dtype != dtype else value
    if isinstance(value, tuple | list):
        return type(value)(_cast(v, dtype) for v in value)
    if isinstance(value, dict):
        return {k: _cast(v, dtype) for k, v in value.items()}
    return value


class DtypeBridge(torch.nn.Module):
    """A borrowed module of another dtype: inputs cast to the candidate's dtype, outputs back
    to the reference's (a bfloat16 candidate layer inside a float32 reference)."""

    def __init__(self, module: torch.nn.Module, inner: torch.dtype, outer: torch.dtype) -> None:
        super().__init__()
        self.inner_module = module
        self.inner, self.outer = inner, outer

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        out = self.inner_module(*_cast(args, self.inner), **_cast(kwargs, self.inner))
        return _cast(out, self.outer)


def _parent(model: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def bridged(module: torch.nn.Module, inner: torch.dtype, outer: torch.dtype) -> torch.nn.Module:
    """``module`` itself, or wrapped in a :class:`DtypeBridge` when the dtypes differ."""
    return module if inner == outer else DtypeBridge(module, inner, outer)


@contextmanager
def borrowed(
    reference: torch.nn.Module,
    candidate: torch.nn.Module,
    names: Sequence[str],
    *,
    candidate_dtype: torch.dtype | None = None,
    reference_dtype: torch.dtype | None = None,
) -> Iterator[None]:
    """Within the block, the reference's modules ``names`` are the candidate's module objects.

    The originals are put back however the block ends (an exception, Ctrl-C). Dtypes given and
    different: each borrowed module is wrapped in a :class:`DtypeBridge`.
    """
    originals: list[tuple[torch.nn.Module, str, torch.nn.Module]] = []
    try:
        for name in names:
            parent, child = _parent(reference, name)
            original = getattr(parent, child)
            module = candidate.get_submodule(name)
            if candidate_dtype is not None and reference_dtype is not None:
                module = bridged(module, candidate_dtype, reference_dtype)
            originals.append((parent, child, original))
            setattr(parent, child, module)
        yield
    finally:
        for parent, child, original in reversed(originals):
            setattr(parent, child, original)


class Replay(torch.nn.Module):
    """Stands in for a decoder layer and returns a stored hidden state without computing."""

    def __init__(self, original: torch.nn.Module, hidden: torch.Tensor, as_tuple: bool) -> None:
        super().__init__()
        # Kept outside _modules: the stand-in must not look like it holds the layer's weights.
        object.__setattr__(self, "_original", original)
        self.hidden = hidden
        self.as_tuple = as_tuple

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return (self.hidden,) if self.as_tuple else self.hidden

    def __getattr__(self, name: str) -> Any:
        # Models read per-layer attributes in their loop (e.g. ``attention_type``).
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(object.__getattribute__(self, "_original"), name)


@contextmanager
def replaying(
    layers: torch.nn.ModuleList,
    start: int,
    hidden: torch.Tensor | None,
    *,
    as_tuple: bool = False,
) -> Iterator[None]:
    """Within the block, layers ``0..start-1`` return ``hidden`` (the state entering layer
    ``start``) without computing; ``start == 0`` changes nothing. Always restored."""
    if start == 0:
        yield
        return
    assert hidden is not None
    originals = [layers[i] for i in range(start)]
    try:
        for i, original in enumerate(originals):
            layers[i] = Replay(original, hidden, as_tuple)
        yield
    finally:
        for i, original in enumerate(originals):
            layers[i] = original


class LayerOutputs(list):  # type: ignore[type-arg]
    """Recorded layer outputs, and whether the layers returned tuples."""

    tuple_outputs: bool = False


@contextmanager
def layer_outputs(
    layers: torch.nn.ModuleList, keep_on: torch.device | None = None
) -> Iterator[list[torch.Tensor]]:
    """Record each decoder layer's output hidden state during the block's forward.

    The list holds one ``[B, T, H]`` tensor per layer, in layer order (moved to ``keep_on``
    when given); its ``tuple_outputs`` says whether the layers return tuples (older models),
    which :class:`Replay` stand-ins must then do too.
    """
    outputs = LayerOutputs()

    def hook(_module: torch.nn.Module, _args: Any, output: Any) -> None:
        is_tuple = isinstance(output, tuple)
        outputs.tuple_outputs = is_tuple
        hidden = output[0] if is_tuple else output
        outputs.append(hidden.detach() if keep_on is None else hidden.detach().to(keep_on))

    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        yield outputs
    finally:
        for handle in handles:
            handle.remove()
