"""Translation of transformers' and the hub's many load failures into one-line errors.

Each :class:`~lmkl.errors.ModelLoadError` names what went wrong (missing package, not a causal
LM, remote code needed, pickle-only weights, not found locally or on the hub) and how to fix it.
"""

from __future__ import annotations

from lmkl.errors import ModelLoadError
from lmkl.models.environment import hub_offline
from lmkl.models.sources import is_local
from lmkl.quantization import QUANT_EXTRA
from lmkl.specs import ModelSpec


def translate_load_error(spec: ModelSpec, exc: Exception, what: str) -> ModelLoadError:
    """One :class:`~lmkl.errors.ModelLoadError` line (problem and fix) for a failure to load
    ``what`` (model, tokenizer, config...) of ``spec``."""
    text = str(exc)
    lowered = text.lower()
    first = text.splitlines()[0][:200] if text else type(exc).__name__
    if isinstance(exc, ImportError) or "pip install" in lowered:
        return ModelLoadError(
            f"cannot load {what} '{spec.model}': a package it needs is missing ({first})",
            f"install it, e.g. {QUANT_EXTRA}",
        )
    if "unrecognized configuration class" in lowered or "automodelforcausallm" in lowered:
        return ModelLoadError(
            f"'{spec.model}' is not a causal language model ({text.splitlines()[0][:160]})",
            "pass a decoder-only model with a language-modelling head",
        )
    if "trust_remote_code" in lowered:
        return ModelLoadError(
            f"'{spec.model}' needs custom code from its repository to load",
            "review that code, then pass --trust-remote-code",
        )
    if "safetensors" in lowered and not spec.allow_pickle:
        return ModelLoadError(
            f"'{spec.model}' has no safetensors weights; pickle weights can execute code on load",
            "use a safetensors checkpoint, or pass --allow-pickle if you trust its source",
        )
    if is_local(spec):
        return ModelLoadError(
            f"cannot load {what} from '{spec.model}': {first}",
            "check that the directory holds a complete saved model",
        )
    offline = hub_offline()
    if isinstance(exc, OSError | ValueError) and (
        "not a local folder" in lowered
        or "does not appear to have" in lowered
        or "repository not found" in lowered
        or "couldn't connect" in lowered
        or "offline" in lowered
        or "is not a valid model identifier" in lowered
        or "can't load" in lowered
        or "not found" in lowered
    ):
        where = (
            "is not a local directory and is not in the offline hub cache"
            if offline
            else ("is not a local directory and could not be fetched from the hub")
        )
        return ModelLoadError(
            f"{what} '{spec.model}' {where}",
            "check the path or hub id (and --revision); download it once with network access",
        )
    return ModelLoadError(f"cannot load {what} '{spec.model}': {first}", "check the model files")
