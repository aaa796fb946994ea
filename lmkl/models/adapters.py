"""PEFT adapters on a candidate: applied and merged, checked against their base, hashed.

An adapter made for another base model is refused when its shapes do not fit and warned about
when they do; its content hash (config and weights) is part of the candidate's identity.
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

from lmkl.errors import LmklWarning, ModelLoadError
from lmkl.models.fingerprints import fingerprint_files
from lmkl.models.pickle_policy import check_adapter_policy
from lmkl.models.sources import adapter_files
from lmkl.specs import ModelSpec


def apply_adapter(model: Any, spec: ModelSpec) -> Any:
    """``model`` with ``spec.adapter`` applied and merged (one-line errors; a warning when the
    adapter was made for a base of another name but fits)."""
    try:
        from peft import PeftModel
    except ImportError as exc:
        raise ModelLoadError(
            "--adapter needs the optional 'peft' package", "pip install 'lmkl[peft]'"
        ) from exc
    adapter_dir = Path(spec.adapter or "").expanduser()
    config_path = adapter_dir / "adapter_config.json"
    made_for, base_name = "", None
    if adapter_dir.exists() and config_path.exists():
        try:
            base_name = json.loads(config_path.read_text()).get("base_model_name_or_path")
        except (OSError, ValueError, AttributeError):
            base_name = None
        if base_name and not _same_model_name(base_name, spec.model):
            made_for = f" (it was made for '{base_name}')"
    check_adapter_policy(spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = PeftModel.from_pretrained(
                model,
                str(adapter_dir) if adapter_dir.exists() else spec.adapter,
                revision=None if adapter_dir.exists() else spec.adapter_revision,
            )
    except Exception as exc:
        text = str(exc).splitlines()[0][:200] if str(exc) else type(exc).__name__
        if "size mismatch" in str(exc) or "not found in the base model" in str(exc):
            reason = "tensor shapes differ" if "size mismatch" in str(exc) else text
            raise ModelLoadError(
                f"adapter '{spec.adapter}' does not fit model '{spec.model}'{made_for}: {reason}",
                "apply the adapter to the base model it was trained on",
            ) from exc
        raise ModelLoadError(
            f"cannot load adapter '{spec.adapter}'{made_for}: {text}", "check the adapter path"
        ) from exc
    if made_for:
        # Shapes fit, so it may be a renamed copy of the right base; say so, do not refuse.
        warnings.warn(
            LmklWarning(
                f"adapter '{spec.adapter}' was made for '{base_name}' and is "
                f"applied to '{spec.model}'"
            ),
            stacklevel=2,
        )
    # Merging gives a plain model whose forward (and decoder/head split) is the adapted one.
    return model.merge_and_unload()


def _same_model_name(a: str, b: str) -> bool:
    return a.rstrip("/").split("/")[-1] == b.rstrip("/").split("/")[-1]


def adapter_fingerprint(spec: ModelSpec) -> str | None:
    """Content hash of a local adapter (config and weights); None for none or a hub adapter."""
    if not spec.adapter:
        return None
    directory = Path(spec.adapter).expanduser()
    if not directory.is_dir():
        return None
    files = adapter_files(directory) + sorted(directory.glob("adapter_config.json"))
    return fingerprint_files(files) if files else None
