"""Load causal LMs and tokenizers from a :class:`~lmkl.specs.ModelSpec`.

:func:`load_model` checks the source and the pickle policy first, then loads the tokenizer and
the weights (full precision, quantized on the fly, a quantized checkpoint or a GGUF file),
applies an adapter, places the model, and runs the head-split and causality probes.
"""

from __future__ import annotations

import gc
import warnings
from pathlib import Path
from typing import Any

import torch

from lmkl.errors import ModelLoadError, UsageError
from lmkl.models import head_split
from lmkl.models.adapters import apply_adapter
from lmkl.models.config import model_config, pretrained
from lmkl.models.environment import quiet_hf_logging, resolve_device
from lmkl.models.gguf import GgufTokenizer, gguf_kwargs, gguf_path, has_tokenizer_files
from lmkl.models.identity import describe_model, recipe_identity
from lmkl.models.load_errors import translate_load_error
from lmkl.models.loaded import LoadedModel
from lmkl.models.mixed import build_mixed_model, gguf_recipe_storage
from lmkl.models.pickle_policy import check_adapter_policy, check_pickle_policy
from lmkl.models.sources import check_source, is_local
from lmkl.quantization import (
    check_checkpoint_backend,
    check_groups_fit,
    checkpoint_quantization,
    gguf_storage,
    on_the_fly_config,
    on_the_fly_quantization,
)
from lmkl.specs import ModelSpec, read_recipe

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def load_tokenizer(spec: ModelSpec) -> Any:
    """Load the tokenizer for ``spec`` (from the model directory or hub repo)."""
    from transformers import AutoTokenizer

    check_source(spec)
    tokenizer = pretrained(AutoTokenizer, spec, _tokenizer_source(spec), "tokenizer")
    if spec.gguf_file and not has_tokenizer_files(spec):
        return GgufTokenizer(tokenizer, spec)
    return tokenizer


def _tokenizer_source(spec: ModelSpec) -> str:
    """A PEFT adapter directory may ship its own tokenizer; otherwise use the base model's."""
    return str(Path(spec.model).expanduser()) if is_local(spec) else spec.model


def _resolve_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype | str:
    if spec.dtype == "auto":
        return "auto"
    return _DTYPES[spec.dtype]


def check_quantization_fits(spec: ModelSpec) -> None:
    """Before any model loads: refuse (one line) an on-the-fly quantization whose groups do not
    fit the model's layer widths, read from its config, so a run with several candidates stops
    before loading the first rather than after loading the others."""
    if spec.quantize is None or spec.gguf_file:
        return
    check_source(spec)
    config = model_config(spec)
    check_groups_fit(spec.quantize, config, spec.display_name, resolve_device(spec.device))


def load_model(
    spec: ModelSpec, device: torch.device | None = None, tokenizer: Any | None = None
) -> LoadedModel:
    """Load the model and tokenizer described by ``spec`` onto ``device``, in eval mode
    (``tokenizer``: one already loaded for ``spec``, e.g. to check it before the weights).

    Raises :class:`ModelLoadError` with a one-line reason for anything that cannot be loaded.
    A spec with a ``recipe`` loads its LOW and HIGH models and mixes them
    (both are in memory while it does; see :func:`_load_recipe`).
    """
    if spec.recipe is not None:
        return _load_recipe(spec, device, tokenizer)
    from transformers import AutoModelForCausalLM

    quiet_hf_logging()
    device = device or resolve_device(spec.device)
    local = is_local(spec)
    check_source(spec)
    if local:
        check_pickle_policy(spec, Path(spec.model).expanduser())
    check_adapter_policy(spec)  # before any weights (or a hub adapter's files) are read

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    kwargs: dict[str, Any] = {
        "revision": spec.revision,
        "trust_remote_code": spec.trust_remote_code,
        "dtype": _resolve_dtype(spec, device),
        **gguf_kwargs(spec),
    }
    if not spec.allow_pickle and not spec.gguf_file:
        kwargs["use_safetensors"] = True
    if spec.attn_implementation:
        kwargs["attn_implementation"] = spec.attn_implementation
    if spec.device_map:
        # accelerate places the layers; inputs go to the device of the input embeddings.
        kwargs["device_map"] = spec.device_map
    quantization = _quantization_kwargs(spec, device, kwargs)
    source = str(Path(spec.model).expanduser()) if local else spec.model
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = AutoModelForCausalLM.from_pretrained(source, **kwargs)
    except Exception as exc:
        raise translate_load_error(spec, exc, "model") from exc

    if spec.adapter:
        model = apply_adapter(model, spec)
    if spec.device_map or quantization is not None:
        # Quantized weights are placed by their backend (bitsandbytes refuses .to()).
        device = model.get_input_embeddings().weight.device
    else:
        model.to(device)
    model.eval()

    loaded = LoadedModel(
        spec=spec,
        model=model,
        tokenizer=tokenizer,
        device=device,
        head=None,
        no_inference_mode=quantization is not None and quantization.get("method") == "quanto",
        quantization=quantization,
    )
    _attach_head(loaded)
    _probe(loaded, spec.model)
    loaded.description = _describe(loaded, source, local, quantization)
    return loaded


def _probe(loaded: LoadedModel, name: str) -> None:
    """Refuse a model that is not causal; keep how much its logits depend on the batch."""
    probe = head_split.probe_model(loaded)
    if not probe.causal:
        raise ModelLoadError(
            f"'{name}' is not a causal language model: its prediction at a position "
            "changes when later tokens change (a bidirectional encoder such as BERT?)",
            "pass a decoder-only language model",
        )
    loaded.batch_dependence = probe.batch_dependence or None


def _describe(
    loaded: LoadedModel, source: str, local: bool, quantization: dict[str, Any] | None
) -> dict[str, Any]:
    """:func:`describe_model` plus the probe's measured batch dependence."""
    description = describe_model(loaded, source, local, quantization)
    if loaded.batch_dependence is not None:
        # Measured, not pinned: never part of the run identity (see engine.identity).
        description["batch_dependence"] = loaded.batch_dependence
    return description


def _load_recipe(
    spec: ModelSpec, device: torch.device | None, tokenizer: Any | None
) -> LoadedModel:
    """Load ``spec.recipe`` as one model: LOW with the recipe's modules taken from HIGH.

    LOW is ``spec`` itself (its model fields are the recipe's LOW model, see
    :class:`~lmkl.specs.ModelSpec`); HIGH is the recipe's HIGH model with ``spec``'s dtype,
    device and trust settings. **Memory:** both models are loaded in full, transiently (peak:
    LOW + HIGH); once mixed, HIGH's other modules are freed and the model holds LOW's size plus
    what the swapped modules add. The description's size is the mixed model's stored bytes.
    """
    recipe = read_recipe(spec.recipe or "")
    # Pinned before loading: the file as read now, HIGH's weights (see engine.identity).
    identity = recipe_identity(spec)
    low_spec = spec.model_copy(update={"recipe": None, "label": f"{spec.display_name}:low"})
    high_spec = recipe.part_spec(recipe.high, spec)
    low = load_model(low_spec, device, tokenizer)
    high = load_model(high_spec, low.device, low.tokenizer)
    build_mixed_model(low.model, high.model, recipe.high_modules)
    quantization: dict[str, Any] = {
        "kind": "recipe",
        "recipe": str(spec.recipe),
        "low": low.quantization,
        "high": high.quantization,
        "high_modules": len(recipe.high_modules),
        **gguf_recipe_storage(low_spec, high_spec, recipe.high_modules),
    }
    low.no_inference_mode = low.no_inference_mode or high.no_inference_mode
    del high  # HIGH's modules not swapped in go with it
    gc.collect()
    low.spec, low.quantization = spec, quantization
    _attach_head(low)  # LOW's output layer may be HIGH's module now
    # The mixed model's batch dependence is its own (LOW's was measured without HIGH's
    # modules); the probe also takes the logits the split check just kept.
    _probe(low, str(spec.recipe))
    local = is_local(low_spec)
    source = str(Path(low_spec.model).expanduser()) if local else low_spec.model
    low.description = _describe(low, source, local, quantization)
    low.description["recipe"] = str(spec.recipe)
    low.description["recipe_identity"] = identity
    return low


def _attach_head(loaded: LoadedModel) -> None:
    """Split off the output layer where the split reproduces the model's own logits."""
    loaded.head = head_split.make_head(loaded.model)  # via the module: tests swap it
    if loaded.head is not None and not head_split.split_is_exact(loaded):
        loaded.head = None


def _quantization_kwargs(
    spec: ModelSpec, device: torch.device, kwargs: dict[str, Any]
) -> dict[str, Any] | None:
    """Add what quantized loading needs to ``kwargs``; return the quantization's provenance
    (None for a full-precision model). Backends and devices are checked here, in one line,
    before transformers raises its own multi-line errors."""
    if spec.gguf_file:
        if spec.quantize:
            raise UsageError(
                f"{spec.display_name}: a GGUF file is quantized already; quantize: does not apply",
                "drop quantize: (or --quantize) for GGUF candidates",
            )
        if kwargs["dtype"] == "auto":
            kwargs["dtype"] = torch.float32  # transformers dequantizes GGUF tensors to this
        return gguf_storage(gguf_path(spec))
    config = model_config(spec)
    settings = check_checkpoint_backend(config, device, spec.display_name)
    if spec.quantize is not None:
        if settings is not None:
            raise UsageError(
                f"{spec.display_name} is a quantized checkpoint already "
                f"({settings.get('quant_method')}); quantize: needs full-precision weights",
                "quantize the full-precision model instead",
            )
        check_groups_fit(spec.quantize, config, spec.display_name, device)
        kwargs["quantization_config"] = on_the_fly_config(spec.quantize)
        if kwargs["dtype"] == "auto":
            kwargs["dtype"] = torch.float32
        kwargs.setdefault("device_map", str(device))
        return on_the_fly_quantization(spec.quantize)
    if settings is not None:
        kwargs.setdefault("device_map", str(device))
        return checkpoint_quantization(settings)
    return None
