"""Mixed-precision models: a LOW model with some modules taken from a HIGH one, and recipe files.

A recipe (:class:`~lmkl.specs.Recipe`, a YAML file) names two models of one structure, LOW and
HIGH (say int4 and int8 quantizations of one model, or two GGUF files of it), and the modules to
take from HIGH. :func:`build_mixed_model` swaps those modules in; ``load_model`` of a spec with a
recipe (``lmkl compare REF --recipe recipe.yaml``, ``recipe:`` in YAML, ``ModelSpec(recipe=...)``)
loads both models and mixes them (:mod:`lmkl.models.loading`). :func:`module_bytes` gives each
module's bytes as shipped, the cost side of choosing which modules to keep at HIGH, and
:func:`gguf_tensor_type_args` turns a GGUF recipe into the ``llama-quantize`` arguments that make
that file.
"""

from __future__ import annotations

import math
import re
from typing import Any

import torch

from lmkl.errors import UsageError
from lmkl.models.gguf import gguf_path
from lmkl.models.loaded import LoadedModel
from lmkl.quantization import (
    gguf_module_bytes,
    gguf_storage,
    gguf_tensor_prefix,
    storage_by_module,
    weight_storage,
)
from lmkl.specs import ModelSpec, Recipe, read_recipe, write_recipe

__all__ = [
    "Recipe",
    "build_mixed_model",
    "ggml_type_name",
    "gguf_recipe_storage",
    "gguf_tensor_type_args",
    "gguf_tensor_types",
    "mixed_storage",
    "module_bytes",
    "read_recipe",
    "write_recipe",
]


def module_bytes(model: torch.nn.Module | LoadedModel) -> dict[str, int]:
    """Bytes each weight-holding module stores as shipped, by ``named_modules()`` name.

    The same count as the model's ``bits_per_weight`` (:func:`lmkl.quantization.weight_storage`:
    quantized values at their bit width, scales, zero points; a module's own tensors, not its
    children's; a storage shared by tied modules counted with the first). For a
    :class:`LoadedModel` read from GGUF files (a GGUF candidate, or a recipe of GGUF files), the
    bytes are those of the file's tensors, not of the float32 tensors they load as.
    """
    if isinstance(model, LoadedModel):
        kind = (model.quantization or {}).get("kind")
        if kind == "gguf":
            return gguf_module_bytes(gguf_path(model.spec))
        tables = _gguf_parts(model.spec) if kind == "recipe" else None
        if tables is not None:
            names = read_recipe(model.spec.recipe or "").high_modules
            return _mixed_table(*tables, names)
        model = model.model
    return {name: m.size.stored for name, m in storage_by_module(model).items() if m.weights}


def _gguf_parts(spec: ModelSpec) -> tuple[dict[str, int], dict[str, int]] | None:
    """The module tables of a recipe's GGUF files (None when LOW or HIGH is not GGUF)."""
    recipe = read_recipe(spec.recipe or "")
    parts = [recipe.part_spec(p, spec) for p in (recipe.low, recipe.high)]
    if not all(p.gguf_file for p in parts):
        return None
    low, high = (gguf_module_bytes(gguf_path(p)) for p in parts)
    return low, high


def _mixed_table(low: dict[str, int], high: dict[str, int], names: list[str]) -> dict[str, int]:
    chosen = {n for n in low if any(n == m or n.startswith(f"{m}.") for m in names)}
    return {n: (high.get(n, b) if n in chosen else b) for n, b in low.items()}


def _logical_shapes(module: torch.nn.Module) -> dict[str, tuple[int, ...]]:
    """Each parameter's logical shape (a packed 4-bit weight reports ``out × in``)."""
    shapes: dict[str, tuple[int, ...]] = {}
    for name, sub in module.named_modules():
        rows, cols = getattr(sub, "out_features", None), getattr(sub, "in_features", None)
        for pname, param in sub.named_parameters(recurse=False):
            key = f"{name}.{pname}" if name else pname
            linear = pname == "weight" and isinstance(rows, int) and isinstance(cols, int)
            shapes[key] = (rows, cols) if linear else tuple(param.shape)
    return shapes


def build_mixed_model(
    low_model: torch.nn.Module, high_model: torch.nn.Module, names: list[str]
) -> torch.nn.Module:
    """``low_model`` with each module in ``names`` replaced by ``high_model``'s module of that
    name (the module object itself: its weights, quantized storage and forward). Returns
    ``low_model``, changed in place; the swapped modules are shared with ``high_model``, whose
    other modules are freed once the caller drops it.

    Names are ``named_modules()`` names (``model.layers.3.mlp.down_proj``). A name missing in
    either model, or whose weights differ in shape, is a one-line :class:`UsageError`. Module
    replacement keeps tied weights tied only within a model: taking ``model.embed_tokens`` from
    HIGH leaves LOW's output layer (which shared LOW's embedding) as it was.
    """
    low_modules = dict(low_model.named_modules())
    high_modules = dict(high_model.named_modules())
    for name in names:
        for which, modules in (("LOW", low_modules), ("HIGH", high_modules)):
            if not name or name not in modules:
                raise UsageError(
                    f"module '{name}' is not in the {which} model",
                    "name modules by the models' named_modules() names "
                    "(e.g. model.layers.0.mlp.down_proj)",
                )
        low_shapes = _logical_shapes(low_modules[name])
        high_shapes = _logical_shapes(high_modules[name])
        if low_shapes != high_shapes:
            diff = next(
                (
                    k
                    for k in sorted(low_shapes.keys() | high_shapes.keys())
                    if low_shapes.get(k) != high_shapes.get(k)
                ),
                "",
            )
            raise UsageError(
                f"module '{name}' differs between LOW and HIGH "
                f"({diff or 'parameters'}: {low_shapes.get(diff)} vs {high_shapes.get(diff)})",
                "mix two models of one structure (quantizations of the same model)",
            )
    # Parents before children: a child listed under a swapped parent is HIGH's already.
    for name in sorted(set(names), key=lambda n: n.count(".")):
        parent_name, _, child = name.rpartition(".")
        parent = low_model.get_submodule(parent_name) if parent_name else low_model
        setattr(parent, child, high_modules[name])
    return low_model


def _mixed_size(
    total: dict[str, Any], low: dict[str, int], high: dict[str, int], names: list[str]
) -> dict[str, Any]:
    """LOW's stored size (``total``: ``weight_bytes``, ``weights``) with the modules of
    ``names`` (and their children) at HIGH's bytes."""
    stored = (
        total["weight_bytes"] - sum(low.values()) + sum(_mixed_table(low, high, names).values())
    )
    weights = total["weights"]
    return {
        "weight_bytes": int(stored),
        "weights": int(weights),
        "bits_per_weight": 8 * stored / weights if weights else math.nan,
    }


def mixed_storage(
    low: torch.nn.Module | LoadedModel, high: torch.nn.Module | LoadedModel, names: list[str]
) -> dict[str, Any]:
    """The stored size of ``build_mixed_model(low, high, names)`` without building it:
    ``weight_bytes``, ``weights`` and ``bits_per_weight``, counted as :func:`module_bytes` and
    the models' own ``bits_per_weight`` are (GGUF models: their files' tensors). This is the
    size a recipe candidate then shows. Tied weights are the exception: taking a tied
    embedding from HIGH unties it, and LOW's copy stays with the output layer (not counted
    here)."""
    return _mixed_size(_stored_total(low), module_bytes(low), module_bytes(high), names)


def _stored_total(model: torch.nn.Module | LoadedModel) -> dict[str, Any]:
    if isinstance(model, LoadedModel):
        quantization = model.quantization or {}
        if quantization.get("weight_bytes") is not None:  # GGUF (or a mix of GGUF files)
            return quantization
        model = model.model
    return weight_storage(model)


def gguf_recipe_storage(low: ModelSpec, high: ModelSpec, names: list[str]) -> dict[str, Any]:
    """The stored size of a mix of two GGUF files (``weight_bytes``, ``weights``,
    ``bits_per_weight``, ``size_source``): LOW's tensors, with those of ``names`` as HIGH stores
    them. Empty when LOW or HIGH is not a GGUF file (the mixed tensors then say their size)."""
    if not (low.gguf_file and high.gguf_file):
        return {}
    low_table, high_table = (gguf_module_bytes(gguf_path(p)) for p in (low, high))
    size = _mixed_size(gguf_storage(gguf_path(low)), low_table, high_table, names)
    return {**size, "size_source": "GGUF tensors, mixed"}


#: GGUF tensors llama-quantize sets with their own option rather than ``--tensor-type``.
_OWN_OPTIONS = {"token_embd": "--token-embedding-type", "output": "--output-tensor-type"}


def ggml_type_name(gguf_type: str) -> str:
    """llama.cpp's own name of a GGUF tensor type, the spelling ``llama-quantize``'s type
    arguments take (``ggml_type_name``): ``Q4_K`` → ``q4_K``, ``Q8_0`` → ``q8_0``, ``F16`` →
    ``f16``, ``IQ4_XS`` → ``iq4_xs`` (K-quants keep their capital K)."""
    lower = gguf_type.lower()
    return lower[:-2] + "_K" if lower.endswith("_k") else lower


def gguf_tensor_types(spec: ModelSpec) -> dict[str, str]:
    """Each tensor of a GGUF model's file with its GGML type name (:func:`ggml_type_name`),
    e.g. ``{"blk.0.ffn_down.weight": "q6_K", ...}``: a K-quant mix (``Q4_K_M``) stores its
    tensors in several types, so the file's type is no tensor's."""
    from lmkl.quantization import read_gguf

    return {t.name: ggml_type_name(t.tensor_type.name) for t in read_gguf(gguf_path(spec)).tensors}


def gguf_tensor_type_args(
    names: list[str],
    high_types: str | dict[str, str],
    unmapped: list[str] | None = None,
) -> list[str]:
    """``llama-quantize`` arguments that give the weights of ``names`` (Hugging Face module
    names) HIGH's types, e.g. ``["--tensor-type", "^blk\\.3\\.ffn_gate\\.weight$=q6_K", ...]``.

    ``high_types``: HIGH's tensor table (:func:`gguf_tensor_types`: each tensor keeps the type
    HIGH stores it in), or one GGML type for every tensor (``Q8_0``). Types are written as
    llama.cpp names them (:func:`ggml_type_name`). llama-quantize matches each ``--tensor-type
    TENSOR=TYPE`` as a regular expression searched in the tensor's name, so dots are escaped
    and the name anchored: one argument, one tensor. The token embeddings and the output layer
    take their own options (``--token-embedding-type``, ``--output-tensor-type``). Covers
    Llama-style decoders (Llama, Qwen2/3, Mistral): attention q/k/v/output, MLP gate/up/down,
    embeddings, output layer; norms stay F32 in GGUF files and take no argument. A module with
    no GGUF tensor (in HIGH's table) is added to ``unmapped`` when a list is given, else it is
    a one-line :class:`UsageError`.
    """
    if isinstance(high_types, str) and not re.fullmatch(r"[A-Za-z0-9_]+", high_types):
        raise UsageError(f"'{high_types}' is not a GGML type name", "e.g. Q8_0, Q6_K, F16")
    args: list[str] = []
    for name in names:
        prefix = gguf_tensor_prefix(name)
        if prefix is not None and prefix.endswith("_norm"):
            continue  # 1-D norms: llama-quantize keeps them in F32
        tensor = f"{prefix}.weight"
        if isinstance(high_types, str):
            found = ggml_type_name(high_types) if prefix is not None else None
        else:
            found = high_types.get(tensor)
        if found is None:
            if unmapped is not None:
                unmapped.append(name)
                continue
            raise UsageError(
                f"module '{name}' has no GGUF tensor name lmkl knows",
                "attention q/k/v/o, MLP gate/up/down, embeddings and lm_head of Llama-style "
                "models map to GGUF names",
            )
        if prefix in _OWN_OPTIONS:
            args += [_OWN_OPTIONS[prefix], found]
        else:
            args += ["--tensor-type", f"^{re.escape(tensor)}$={found}"]
    return args
