"""Models: loading, identity, the pickle policy, the head split and probes, vocabulary checks.

Loading causal LMs and tokenizers from a :class:`~lmkl.specs.ModelSpec` (local directories, hub
ids, GGUF files, quantized checkpoints, PEFT adapters) and checking that the models can be
compared token by token. One module per concern:

- :mod:`~lmkl.models.environment`: offline mode, quiet Hugging Face logging, devices
- :mod:`~lmkl.models.sources`: local directories and hub repos, their weight files
- :mod:`~lmkl.models.fingerprints`: content hashes of weight files, computed once
- :mod:`~lmkl.models.pickle_policy`: pickle-only weights refused unless allowed
- :mod:`~lmkl.models.load_errors`: load failures as one-line errors
- :mod:`~lmkl.models.gguf`: GGUF files and their own tokenizer
- :mod:`~lmkl.models.config`: model configs and the one ``from_pretrained`` call
- :mod:`~lmkl.models.loaded`: a model ready for scoring and its output layer
- :mod:`~lmkl.models.head_split`: the decoder/output-layer split and the load-time probes
- :mod:`~lmkl.models.adapters`: PEFT adapters
- :mod:`~lmkl.models.identity`: what pins the weights, and a loaded model's description
- :mod:`~lmkl.models.vocabulary`: vocabularies, special ids and context lengths
- :mod:`~lmkl.models.loading`: :func:`load_model` and :func:`load_tokenizer`

The names below are the API other subpackages and users call.
"""

from lmkl.models.adapters import adapter_fingerprint
from lmkl.models.config import model_config
from lmkl.models.environment import hub_offline, quiet_hf_logging, resolve_device, set_offline
from lmkl.models.fingerprints import fingerprint_files
from lmkl.models.gguf import GgufTokenizer
from lmkl.models.identity import describe_model, weights_identity
from lmkl.models.load_errors import translate_load_error
from lmkl.models.loaded import LoadedModel, OutputHead, max_positions
from lmkl.models.loading import check_quantization_fits, load_model, load_tokenizer
from lmkl.models.pickle_policy import check_adapter_policy, check_pickle_policy
from lmkl.models.sources import PICKLE_SUFFIXES, hub_repo_files, hub_snapshot, hub_weight_bytes
from lmkl.models.vocabulary import (
    check_config_fits,
    check_context_length,
    check_tokenizers_match,
    shared_vocab_size,
    tokenizer_adds_bos,
)

__all__ = [
    "PICKLE_SUFFIXES",
    "GgufTokenizer",
    "LoadedModel",
    "OutputHead",
    "adapter_fingerprint",
    "check_adapter_policy",
    "check_config_fits",
    "check_context_length",
    "check_pickle_policy",
    "check_quantization_fits",
    "check_tokenizers_match",
    "describe_model",
    "fingerprint_files",
    "hub_offline",
    "hub_repo_files",
    "hub_snapshot",
    "hub_weight_bytes",
    "load_model",
    "load_tokenizer",
    "max_positions",
    "model_config",
    "quiet_hf_logging",
    "resolve_device",
    "set_offline",
    "shared_vocab_size",
    "tokenizer_adds_bos",
    "translate_load_error",
    "weights_identity",
]
