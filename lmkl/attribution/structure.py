"""The module structure attribution works on: decoder layers, weight-holding modules, units.

A *unit* is what is taken from the candidate into the reference at once: one module
(``scope="module"``), every module of one decoder layer (``"layer"``), or everything up to and
including decoder layer ``l`` (``"prefix"``: embeddings and layers ``0..l``). Each unit also says
from which *boundary* the forward has to be recomputed: boundary ``b`` is the hidden state that
enters decoder layer ``b`` (``b = L``: the last layer's output), so a unit inside layer ``l``
starts at ``b = l`` and a final norm or output layer at ``b = L``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lmkl.errors import UsageError

#: Fix printed when the candidate's modules are not the reference's.
MATCHING_FIX = (
    "give a candidate with the reference's modules (a quantized copy, fine-tune or later "
    "checkpoint of it); compare models of different structure with `lmkl compare`"
)


@dataclass(frozen=True)
class Unit:
    """What one attribution measurement takes from the candidate."""

    scope: str
    #: The reference's own ``named_modules()`` name (a decoder layer's for layer/prefix units).
    name: str
    #: Decoder layer index (None: a module outside the decoder layers).
    layer: int | None
    #: The boundary the forward restarts from (0: a full forward).
    start: int
    #: Names of the weight-holding modules the unit takes from the candidate.
    modules: tuple[str, ...]
    #: True when every module taken is identical in both models (KL 0, never run).
    identical: bool

    @property
    def key(self) -> str:
        """A unique id: ``scope:name``."""
        return f"{self.scope}:{self.name}"

    @property
    def swapped(self) -> tuple[str, ...]:
        """The module objects swapped in from the candidate: the module, or the whole decoder
        layer; none for a prefix, which restarts from the candidate's own hidden state after
        layer ``l`` (the same as swapping every module up to it, at no cost)."""
        if self.scope == "prefix":
            return ()
        return (self.name,) if self.scope == "layer" else self.modules


@dataclass
class Structure:
    """A model's decoder layers and weight-holding modules, in forward order."""

    #: Name of the decoder layers' ModuleList (``model.layers``, ``transformer.h``).
    layers_name: str
    num_layers: int
    #: Weight-holding module name -> decoder layer (None outside the layers).
    modules: dict[str, int | None]
    #: Weight-holding modules registered before the decoder layers (embeddings).
    before: list[str] = field(default_factory=list)
    #: Weight-holding modules after them (final norm, output layer).
    after: list[str] = field(default_factory=list)
    #: The output layer's name (None: not found among the modules).
    head: str | None = None

    def layer_name(self, index: int) -> str:
        return f"{self.layers_name}.{index}"


def _num_layers(model: Any) -> int | None:
    config = model.config.get_text_config() if hasattr(model.config, "get_text_config") else None
    config = config or model.config
    for name in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def decoder_layers(model: Any) -> tuple[str, torch.nn.ModuleList]:
    """The decoder layers' ModuleList and its name (Llama/Qwen2 ``model.layers``, GPT-2
    ``transformer.h``...): the ModuleList holding as many layers as the config says."""
    expected = _num_layers(model)
    found = [
        (name, module)
        for name, module in model.named_modules()
        if isinstance(module, torch.nn.ModuleList) and len(module) > 0
    ]
    matching = [(n, m) for n, m in found if expected is None or len(m) == expected]
    if not matching:
        raise UsageError(
            "attribution cannot find the model's decoder layers (no list of "
            f"{expected} layers among its modules)",
            "attribution supports decoder-only models whose layers are one ModuleList "
            "(Llama, Qwen2, GPT-2 style)",
        )
    # Several lists of that length (rare): the shallowest is the decoder's.
    return min(matching, key=lambda item: item[0].count("."))


def owns_weights(module: torch.nn.Module) -> bool:
    """Whether ``module`` holds parameters of its own (Linear, Conv1D, Embedding, norms)."""
    return any(True for _ in module.parameters(recurse=False))


def model_structure(model: Any) -> Structure:
    """The decoder layers and weight-holding modules of ``model`` in registration order."""
    layers_name, layers = decoder_layers(model)
    prefix = layers_name + "."
    modules: dict[str, int | None] = {}
    before: list[str] = []
    after: list[str] = []
    seen_layers = False
    for name, module in model.named_modules():
        if name.startswith(prefix):
            seen_layers = True
            if owns_weights(module):
                modules[name] = int(name[len(prefix) :].split(".")[0])
            continue
        if name == layers_name:
            seen_layers = True
            continue
        if name and owns_weights(module):
            modules[name] = None
            (after if seen_layers else before).append(name)
    head_module = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    head = next((n for n, m in model.named_modules() if m is head_module and n), None)
    if head is not None and head in before:
        # An output layer registered before the decoder (unusual order) still acts last.
        before.remove(head)
        after.append(head)
    return Structure(layers_name, len(layers), modules, before, after, head)


def _logical_shape(module: torch.nn.Module) -> tuple[int, ...] | None:
    """The shape a module computes with, also for quantized modules whose stored weight is
    packed (bitsandbytes keeps 4-bit weights as a flat byte tensor)."""
    for a, b in (("out_features", "in_features"), ("num_embeddings", "embedding_dim")):
        if hasattr(module, a) and hasattr(module, b):
            return (int(getattr(module, a)), int(getattr(module, b)))
    weight = getattr(module, "weight", None)
    return tuple(weight.shape) if isinstance(weight, torch.Tensor) else None


def check_matching(reference: Any, candidate: Any, candidate_label: str) -> Structure:
    """The reference's structure, once the candidate is checked to have the same modules.

    Same number of decoder layers, every weight-holding module of the reference present in the
    candidate with the same logical shape; otherwise a one-line usage error (exit 2).
    """
    ref = model_structure(reference)
    try:
        cand = model_structure(candidate)
    except UsageError:
        cand = None
    if cand is None or cand.num_layers != ref.num_layers:
        depth = "no decoder layers found" if cand is None else f"{cand.num_layers} layers"
        raise UsageError(
            f"attribution needs matching modules: '{candidate_label}' has {depth}, the "
            f"reference {ref.num_layers}",
            MATCHING_FIX,
        )
    cand_modules = dict(candidate.named_modules())
    ref_modules = dict(reference.named_modules())
    missing = [name for name in ref.modules if name not in cand_modules]
    if missing:
        raise UsageError(
            f"attribution needs matching modules: '{candidate_label}' has no module "
            f"'{missing[0]}'" + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""),
            MATCHING_FIX,
        )
    for name in ref.modules:
        want, got = _logical_shape(ref_modules[name]), _logical_shape(cand_modules[name])
        if want is not None and got is not None and want != got:
            raise UsageError(
                f"attribution needs matching modules: '{name}' is {list(got)} in "
                f"'{candidate_label}' but {list(want)} in the reference",
                MATCHING_FIX,
            )
    return ref


def same_module(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    """Whether two modules compute the same thing: same type, same parameters and buffers
    (bit for bit, same dtype). Quantized tensors that cannot be compared count as different."""
    if type(a) is not type(b):
        return False
    pa_, pb = dict(a.named_parameters(recurse=False)), dict(b.named_parameters(recurse=False))
    ba, bb = dict(a.named_buffers(recurse=False)), dict(b.named_buffers(recurse=False))
    if pa_.keys() != pb.keys() or ba.keys() != bb.keys():
        return False
    try:
        for name in pa_:
            x, y = pa_[name], pb[name]
            if type(x.data) is not torch.Tensor or type(y.data) is not torch.Tensor:
                return False  # a quantized tensor subclass: not the reference's weights
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.cpu(), y.cpu()):
                return False
        for name in ba:
            x, y = ba[name], bb[name]
            if x.dtype != y.dtype or x.shape != y.shape or not torch.equal(x.cpu(), y.cpu()):
                return False
    except (RuntimeError, TypeError, NotImplementedError):
        return False
    return True


def attribution_units(structure: Structure, identical: set[str]) -> list[Unit]:
    """Every unit, in depth order: per layer its modules, the layer itself and the prefix up
    to it; the modules before the layers first and those after them last."""
    units: list[Unit] = []
    L = structure.num_layers
    for name in structure.before:
        units.append(Unit("module", name, None, 0, (name,), name in identical))
    prefix_modules = list(structure.before)
    for layer in range(L):
        in_layer = [n for n, i in structure.modules.items() if i == layer]
        for name in in_layer:
            units.append(Unit("module", name, layer, layer, (name,), name in identical))
        layer_name = structure.layer_name(layer)
        units.append(
            Unit(
                "layer",
                layer_name,
                layer,
                layer,
                tuple(in_layer),
                all(n in identical for n in in_layer),
            )
        )
        prefix_modules += in_layer
        units.append(
            Unit(
                "prefix",
                layer_name,
                layer,
                layer + 1,
                tuple(prefix_modules),
                all(n in identical for n in prefix_modules),
            )
        )
    for name in structure.after:
        units.append(Unit("module", name, None, L, (name,), name in identical))
    return units
