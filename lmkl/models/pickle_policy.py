"""The pickle policy: weights that only exist as pickle files are refused unless allowed.

Unpickling can execute arbitrary code, so a model or adapter whose weights are only ``.bin``/
``.pt`` files is refused (one line, naming ``--allow-pickle``) before anything is loaded; local
directories are checked by their files, hub adapters by the repo's file listing.
"""

from __future__ import annotations

from pathlib import Path

from lmkl.errors import ModelLoadError
from lmkl.models.sources import adapter_files, hub_repo_files, weight_files
from lmkl.specs import ModelSpec


def check_pickle_policy(spec: ModelSpec, directory: Path) -> None:
    """A local model with only pickle weight files is refused unless pickle files are allowed."""
    if spec.gguf_file:
        return  # a GGUF file holds tensors and metadata, never pickled objects
    files = weight_files(directory)
    if not files:
        return
    if not any(p.suffix == ".safetensors" for p in files) and not spec.allow_pickle:
        raise ModelLoadError(
            f"model '{spec.model}' has only pickle weight files ({files[0].name}); loading them "
            "can execute arbitrary code",
            "convert the checkpoint to safetensors, or pass --allow-pickle if you trust its source",
        )


def check_adapter_policy(spec: ModelSpec) -> None:
    """An adapter with only pickle weights is refused unless pickle files are allowed.

    Local adapters are checked by their files; hub adapters by the repo's file listing (the
    cached snapshot when offline), before anything is downloaded or loaded.
    """
    if not spec.adapter or spec.allow_pickle:
        return
    directory = Path(spec.adapter).expanduser()
    if directory.is_dir():
        names = [p.name for p in adapter_files(directory)]
    elif directory.exists():
        return  # not a directory: PEFT's own error says so
    else:
        listed = hub_repo_files(spec.adapter, spec.adapter_revision) or []
        # PEFT reads adapter_model.* at the repo's top level.
        names = sorted(n for n in listed if "/" not in n and n.startswith("adapter_model"))
    if names and not any(n.endswith(".safetensors") for n in names):
        raise ModelLoadError(
            f"adapter '{spec.adapter}' has only pickle weight files ({names[0]}); loading "
            "them can execute arbitrary code",
            "convert the adapter to safetensors, or pass --allow-pickle if you trust its source",
        )
