"""Model configs (no weights) and the one ``from_pretrained`` call every loader goes through.

Configs are read once per process per source, revision, GGUF file, code policy and (local) file
stat; failures become one-line :class:`~lmkl.errors.ModelLoadError` messages.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

from lmkl.models.fingerprints import file_key
from lmkl.models.gguf import gguf_kwargs
from lmkl.models.load_errors import translate_load_error
from lmkl.models.sources import check_source, is_local
from lmkl.specs import ModelSpec


def pretrained(factory: Any, spec: ModelSpec, source: str, what: str) -> Any:
    """``factory.from_pretrained(source)`` with the spec's revision and code policy, quietly;
    any failure becomes one :class:`ModelLoadError` line."""
    gguf = gguf_kwargs(spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return factory.from_pretrained(
                source, revision=spec.revision, trust_remote_code=spec.trust_remote_code, **gguf
            )
    except Exception as exc:  # transformers raises many types; translate them to one line
        raise translate_load_error(spec, exc, what) from exc


#: Configs read in this process, by source, revision, GGUF file, code policy and (for local
#: directories) the config file's stat: a run reads one model's config to check the windows,
#: to check its quantization backend and to describe it; a GGUF config is parsed from the
#: file's metadata, vocabulary included, which is worth doing once.
_CONFIGS: dict[tuple[Any, ...], Any] = {}


def model_config(spec: ModelSpec) -> Any:
    """The model's transformers config (no weights); one-line errors. Treat it as read-only:
    it is shared by every caller in the process."""
    from transformers import AutoConfig

    check_source(spec)
    local = is_local(spec)
    source = str(Path(spec.model).expanduser()) if local else spec.model
    stamp = None
    if local:
        config_file = Path(source) / (spec.gguf_file or "config.json")
        stamp = file_key(config_file) if config_file.exists() else None
    key = (source, spec.revision, spec.gguf_file, spec.trust_remote_code, stamp)
    if key not in _CONFIGS:
        _CONFIGS[key] = pretrained(AutoConfig, spec, source, "model config")
    return _CONFIGS[key]
