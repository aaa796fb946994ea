"""What pins a model's weights (run identities) and the description of a loaded model.

:func:`weights_identity` reads it without loading the weights (content hash of local files, the
hub commit the revision resolves to, the adapter's hash, and for a recipe
:func:`recipe_identity`); :func:`describe_model` records a loaded
model's provenance, dtype, sizes on disk and in memory, and quantization.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

from lmkl.errors import ModelLoadError
from lmkl.models.adapters import adapter_fingerprint
from lmkl.models.config import model_config
from lmkl.models.fingerprints import fingerprint_files
from lmkl.models.loaded import LoadedModel
from lmkl.models.pickle_policy import check_adapter_policy, check_pickle_policy
from lmkl.models.sources import check_source, hub_weight_bytes, is_local, model_files
from lmkl.quantization import weight_storage
from lmkl.specs import ModelSpec, read_recipe


def weights_identity(spec: ModelSpec) -> dict[str, Any]:
    """What pins ``spec``'s weights, read without loading them (for run identities).

    Local directories: a content hash of the weight files. Hub models: the commit the
    revision resolves to (from the config, which is small). Plus the adapter's hash.
    """
    check_source(spec)
    info: dict[str, Any] = {"model": spec.model, "revision": spec.revision}
    if is_local(spec):
        directory = Path(spec.model).expanduser()
        check_pickle_policy(spec, directory)
        files = model_files(spec, directory)
        if not files:
            raise ModelLoadError(
                f"model directory '{spec.model}' holds no weight files",
                "pass a directory written by save_pretrained (config.json + weights)",
            )
        info["weights_sha256"] = fingerprint_files(files)
    else:
        info["resolved_revision"] = getattr(model_config(spec), "_commit_hash", None)
    if spec.gguf_file:
        info["gguf_file"] = spec.gguf_file
    if spec.quantize:
        info["quantize"] = spec.quantize.model_dump()
    if spec.adapter:
        check_adapter_policy(spec)
        info["adapter_sha256"] = adapter_fingerprint(spec)
        info["adapter_revision"] = spec.adapter_revision
    if spec.recipe:  # the spec's model is LOW; the recipe's modules and HIGH pin the rest
        info["recipe_identity"] = recipe_identity(spec)
    return info


def recipe_identity(spec: ModelSpec) -> dict[str, Any]:
    """What pins a recipe candidate beyond LOW's weights (``spec.model``): the recipe file's
    content hash, its HIGH modules, and HIGH's weights identity. A run records it in the
    candidate's description, so ``--resume`` after an edit of the recipe is refused."""
    path = Path(spec.recipe or "").expanduser()
    recipe = read_recipe(path)  # a missing or invalid file: one line, before hashing
    return {
        "recipe_sha256": hashlib.sha256(path.read_bytes()).hexdigest(),
        "high_modules": sorted(recipe.high_modules),
        "high": weights_identity(recipe.part_spec(recipe.high, spec)),
    }


def describe_model(
    loaded: LoadedModel, source: str, local: bool, quantization: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Provenance of a loaded model: source, resolved revision or content hash, dtype, size,
    and for a quantized model its method, scheme, bits, group size and real weight bytes."""
    model = loaded.model
    storage = weight_storage(model)
    params = storage["weights"]
    info: dict[str, Any] = {
        "label": loaded.label,
        "model": loaded.spec.model,
        "source": "local" if local else "hub",
        "architecture": type(model).__name__,
        "dtype": str(next(model.parameters()).dtype).replace("torch.", ""),
        "device": str(loaded.device),
        "parameters": int(params),
        "logits_width": loaded.logits_width,
        "tokenizer_size": len(loaded.tokenizer),
        "split_head": loaded.head is not None,
        "adapter": loaded.spec.adapter,
        "adapter_sha256": adapter_fingerprint(loaded.spec),
        "group": loaded.spec.group,
        "step": loaded.spec.step,
        "quantization": None,
        # As stored (what a saved or served model takes: rankings use it) and as loaded here.
        "weight_bytes": storage["weight_bytes"],
        "bits_per_weight": storage["bits_per_weight"],
        "loaded_bytes": storage["loaded_bytes"],
        "loaded_bits_per_weight": storage["loaded_bits_per_weight"],
        "size_source": storage["size_source"],
    }
    if quantization is not None:
        sizes = ("weight_bytes", "weights", "bits_per_weight", "size_source")
        info["quantization"] = {k: v for k, v in quantization.items() if k not in sizes}
        if quantization.get("weight_bytes") is not None:  # GGUF: the file's tensors, as stored
            info |= {k: quantization[k] for k in sizes if k != "weights"}
    if local:
        files = model_files(loaded.spec, Path(source))
        info["path"] = str(Path(source).resolve())
        info["weights_sha256"] = fingerprint_files(files) if files else None
        info["bytes_on_disk"] = int(sum(p.stat().st_size for p in files))
    else:
        info["revision"] = loaded.spec.revision
        info["resolved_revision"] = getattr(model.config, "_commit_hash", None)
        # The files in the hub cache, not the loaded tensors (a float16 checkpoint loaded as
        # float32 is half that size on disk; see bytes_in_memory for the loaded size).
        info["bytes_on_disk"] = hub_weight_bytes(loaded.spec, info["resolved_revision"])
    # The parameters as loaded (their dtype, quantized storage as it is in memory).
    info["bytes_in_memory"] = int(sum(p.numel() * p.element_size() for p in model.parameters()))
    checkpoint = (quantization or {}).get("kind") == "checkpoint"
    on_disk = info["bytes_on_disk"]
    if checkpoint and local and on_disk is not None and 0 < on_disk < info["weight_bytes"]:
        # Some formats (compressed-tensors on CPU) decompress to dense weights on load: the
        # checkpoint's files are then the real size of its quantized weights.
        info["weight_bytes"] = info["bytes_on_disk"]
        info["bits_per_weight"] = 8 * info["bytes_on_disk"] / storage["weights"]
        info["size_source"] = "checkpoint files"
    return info
