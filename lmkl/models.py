"""Load causal LMs and tokenizers from a :class:`~lmkl.specs.ModelSpec`; check they are comparable.

Besides loading, this module splits a causal LM into its decoder (hidden states) and its output
layer (hidden → logits, with the model's own post-processing such as final-logit soft-capping), so
that the runner can compute logits only at scored positions and only a chunk of tokens at a time.
The split is verified against the model's full forward on a probe input at load time; a model
whose logits the split cannot reproduce falls back to the full forward, so results stay exact.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import warnings
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from lmkl.errors import LmklWarning, ModelLoadError, TokenizerMismatchError, UsageError
from lmkl.quantization import (
    GGUF_BACKEND,
    QUANT_EXTRA,
    check_checkpoint_backend,
    check_groups_fit,
    checkpoint_quantization,
    gguf_storage,
    on_the_fly_config,
    on_the_fly_quantization,
    quiet_backend_logs,
    read_gguf,
    require,
    weight_storage,
)
from lmkl.specs import ModelSpec, WindowSpec

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def set_offline(offline: bool = True) -> None:
    """Tell huggingface_hub, transformers and datasets not to touch the network.

    They read the variables at import time, so modules already imported (in a notebook, a test
    session, or a program that imported transformers first) get their flags updated too;
    otherwise an unreachable hub costs about a minute of retries before failing.
    """
    if offline:
        for name in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE"):
            os.environ[name] = "1"
        hub_constants = sys.modules.get("huggingface_hub.constants")
        if hub_constants is not None:
            hub_constants.HF_HUB_OFFLINE = True  # read by is_offline_mode(), used by transformers
        datasets_config = sys.modules.get("datasets.config")
        if datasets_config is not None:
            datasets_config.HF_HUB_OFFLINE = True
            datasets_config.HF_DATASETS_OFFLINE = True


def quiet_hf_logging() -> None:
    """Silence transformers' and datasets' own progress bars and info logs (lmkl has its own).

    ``datasets`` is quieted only once something imported it (importing it costs about a second
    and a run on a local file does not need it); whatever imports it later calls this again.
    """
    # transformers imports every installed quantization backend with its models.
    quiet_backend_logs()
    import huggingface_hub
    import transformers

    # huggingface_hub logs every network retry; lmkl reports the final failure in one line.
    huggingface_hub.utils.logging.set_verbosity_error()
    huggingface_hub.utils.disable_progress_bars()
    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    datasets = sys.modules.get("datasets")
    if datasets is not None:
        datasets.utils.logging.set_verbosity_error()
        datasets.disable_progress_bars()


def resolve_device(device: str) -> torch.device:
    """``auto`` → CUDA if present, else MPS, else CPU; otherwise the named device, checked."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        dev = torch.device(device)
    except RuntimeError as exc:
        raise UsageError(
            f"unknown device '{device}'", "use auto, cpu, cuda, cuda:N or mps"
        ) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(
            f"device '{device}' requested but CUDA is not available", "use --device cpu"
        )
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise UsageError(
            f"device '{device}' does not exist ({torch.cuda.device_count()} CUDA devices)",
            "pick an index below the device count",
        )
    return dev


def _is_local(spec: ModelSpec) -> bool:
    return Path(spec.model).expanduser().exists()


def _model_files(spec: ModelSpec, directory: Path) -> list[Path]:
    """The files that hold ``spec``'s weights: its GGUF file, else the directory's weights."""
    if spec.gguf_file:
        return [directory / spec.gguf_file]
    return _weight_files(directory)


def _weight_files(directory: Path) -> list[Path]:
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and (p.suffix == ".safetensors" or p.suffix in PICKLE_SUFFIXES)
    )


def hub_offline() -> bool:
    """Whether huggingface_hub is told not to touch the network (``HF_HUB_OFFLINE``/--offline)."""
    hub_constants = sys.modules.get("huggingface_hub.constants")
    return os.environ.get("HF_HUB_OFFLINE") == "1" or bool(
        getattr(hub_constants, "HF_HUB_OFFLINE", False)
    )


def hub_snapshot(repo_id: str, revision: str | None) -> Path | None:
    """The local hub-cache folder of ``repo_id`` at ``revision`` (a commit, branch or tag), or
    None when it is not cached. Never touches the network."""
    from huggingface_hub import snapshot_download

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            folder = snapshot_download(repo_id, revision=revision, local_files_only=True)
    except Exception:  # not cached (or not a valid repo id): unknown, not an error here
        return None
    return Path(folder) if Path(folder).is_dir() else None


def hub_repo_files(repo_id: str, revision: str | None) -> list[str] | None:
    """Names of the files of hub repo ``repo_id`` at ``revision``, without downloading any.

    Online: the hub's file listing. Offline (or when the hub cannot be reached): the files of the
    cached snapshot, which is all that an offline load could read. None when neither is known.
    """
    if not hub_offline():
        from huggingface_hub import HfApi

        try:
            return sorted(HfApi().list_repo_files(repo_id, revision=revision))
        except Exception:  # unreachable hub, unknown repo: fall back to the cache
            pass
    folder = hub_snapshot(repo_id, revision)
    if folder is None:
        return None
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


def hub_weight_bytes(spec: ModelSpec, commit: str | None) -> int | None:
    """Bytes of the weight files a hub model was loaded from, as they lie in the hub cache
    (None when the snapshot is not in the cache, e.g. a model loaded from another cache_dir).

    Safetensors files are counted when the snapshot has any (transformers loads those first),
    else its pickle files; a GGUF model counts its one file.
    """
    folder = hub_snapshot(spec.model, commit or spec.revision)
    if folder is None:
        return None
    if spec.gguf_file:
        files = [folder / spec.gguf_file] if (folder / spec.gguf_file).is_file() else []
    else:
        found = _weight_files(folder)
        safe = [p for p in found if p.suffix == ".safetensors"]
        files = safe or found
    return int(sum(p.stat().st_size for p in files)) if files else None


#: Content hashes already computed in this process, keyed by each file's path, inode, size,
#: modification and change time (a run hashes a checkpoint for its identity before loading it
#: and again to describe it; any write to a file changes its ctime, which no copy can set back).
_FINGERPRINTS: dict[tuple[tuple[str, int, int, int, int], ...], str] = {}
#: The same hashes across processes: a small memo under the user cache directory (hashing a
#: checkpoint reads all of it: about a second per GB, every run).
_FINGERPRINT_MEMO = "weights-sha256"


def _file_key(path: Path) -> tuple[str, int, int, int, int]:
    stat = path.stat()
    return str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def fingerprint_files(paths: list[Path]) -> str:
    """SHA-256 over the names and contents of ``paths`` (a content hash of local weights).

    Computed once per set of files: a later call, in this process or another, with every file's
    path, inode, size, mtime and ctime unchanged reuses it (a changed file is hashed again).
    """
    from lmkl.files import read_memo, remember

    key = tuple(_file_key(p) for p in paths)
    if key in _FINGERPRINTS:
        return _FINGERPRINTS[key]
    memo_key = json.dumps(key)
    known = read_memo(_FINGERPRINT_MEMO).get(memo_key)
    if isinstance(known, str) and len(known) == 64:
        _FINGERPRINTS[key] = known
        return known
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(8 * 2**20), b""):
                digest.update(block)
    # Files changed while they were read are not remembered across processes.
    if tuple(_file_key(p) for p in paths) == key:
        remember(_FINGERPRINT_MEMO, {memo_key: digest.hexdigest()})
    _FINGERPRINTS[key] = digest.hexdigest()
    return _FINGERPRINTS[key]


def _check_pickle_policy(spec: ModelSpec, directory: Path) -> None:
    if spec.gguf_file:
        return  # a GGUF file holds tensors and metadata, never pickled objects
    files = _weight_files(directory)
    if not files:
        return
    if not any(p.suffix == ".safetensors" for p in files) and not spec.allow_pickle:
        raise ModelLoadError(
            f"model '{spec.model}' has only pickle weight files ({files[0].name}); loading them "
            "can execute arbitrary code",
            "convert the checkpoint to safetensors, or pass --allow-pickle if you trust its source",
        )


def _looks_like_path(name: str) -> bool:
    """A hub id is ``name`` or ``org/name``; anything else with a separator is meant as a path."""
    return (
        name.startswith(("/", "./", "../", "~", "\\"))
        or name.count("/") > 1
        or name.endswith("/")
        or (len(name) > 1 and name[1] == ":")
    )


def _check_source(spec: ModelSpec) -> None:
    """One-line errors for local paths that cannot be models, before transformers sees them."""
    directory = Path(spec.model).expanduser()
    if not directory.exists():
        if _looks_like_path(spec.model):
            raise ModelLoadError(
                f"model directory '{spec.model}' does not exist",
                "check the path (a hub id looks like org/name)",
            )
        return
    if not directory.is_dir():
        raise ModelLoadError(
            f"model path '{spec.model}' is a file, not a model directory",
            "pass the directory that holds config.json and the weights",
        )
    if spec.gguf_file:
        if not (directory / spec.gguf_file).is_file():
            raise ModelLoadError(
                f"GGUF file '{spec.gguf_file}' does not exist in '{spec.model}'",
                "check the file name (ls the directory)",
            )
        return  # a GGUF carries its own config and tokenizer
    if not (directory / "config.json").exists():
        raise ModelLoadError(
            f"'{spec.model}' has no config.json, so it is not a Hugging Face model directory",
            "pass a directory written by save_pretrained (config.json + weights)",
        )


def translate_load_error(spec: ModelSpec, exc: Exception, what: str) -> ModelLoadError:
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
    if _is_local(spec):
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


def load_tokenizer(spec: ModelSpec) -> Any:
    """Load the tokenizer for ``spec`` (from the model directory or hub repo)."""
    from transformers import AutoTokenizer

    _check_source(spec)
    tokenizer = _pretrained(AutoTokenizer, spec, _tokenizer_source(spec), "tokenizer")
    if spec.gguf_file and not _has_tokenizer_files(spec):
        return GgufTokenizer(tokenizer, spec)
    return tokenizer


def _has_tokenizer_files(spec: ModelSpec) -> bool:
    """Whether the GGUF's directory has a Hugging Face tokenizer (transformers then loads it)."""
    directory = Path(spec.model).expanduser()
    return directory.is_dir() and (directory / "tokenizer.json").exists()


class GgufTokenizer:
    """A tokenizer built from a GGUF file's metadata, with the file's own vocabulary.

    transformers rebuilds the tokenizer (vocabulary, merges) from the file, but for byte-level
    BPE files it also adds GPT-2's default ``<|endoftext|>`` when the file's special tokens are
    others (Llama 3's, for one) and (5.x) leaves ``bos_token_id`` and friends unset. The
    vocabulary check against the reference must see the file's tokens and special ids, so
    ``get_vocab``, ``len`` and the special ids come from the metadata; everything else
    (encoding, decoding) is the transformers tokenizer's.
    """

    def __init__(self, inner: Any, spec: ModelSpec) -> None:
        self._inner = inner
        fields = read_gguf(_gguf_path(spec)).fields

        def value(key: str) -> Any:
            field = fields.get(key)
            if field is None:
                return None
            parts = [field.parts[i] for i in field.data]
            if field.types and field.types[-1].name == "STRING":
                return [bytes(p).decode("utf-8") for p in parts]
            return [p[0].item() for p in parts]

        tokens = value("tokenizer.ggml.tokens") or []
        if (value("tokenizer.ggml.model") or [""])[0] == "gpt2":
            tokens = _byte_level_spelling(tokens)
        self._vocab = {token: i for i, token in enumerate(tokens)}
        self._size = len(tokens)
        for attr, key in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
            found = value(f"tokenizer.ggml.{key}_token_id")
            setattr(self, f"{attr}_token_id", int(found[0]) if found else None)

    def get_vocab(self) -> dict[str, int]:
        return dict(self._vocab)

    def __len__(self) -> int:
        return self._size

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._inner(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def _byte_level_spelling(tokens: list[str]) -> list[str]:
    """Tokens as a byte-level BPE vocabulary spells them (as transformers reads GGUF files)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    return [
        t if set(t) <= alphabet else "".join(spelling[b] for b in t.encode("utf-8")) for t in tokens
    ]


def _pretrained(factory: Any, spec: ModelSpec, source: str, what: str) -> Any:
    """``factory.from_pretrained(source)`` with the spec's revision and code policy, quietly;
    any failure becomes one :class:`ModelLoadError` line."""
    gguf = _gguf_kwargs(spec)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return factory.from_pretrained(
                source, revision=spec.revision, trust_remote_code=spec.trust_remote_code, **gguf
            )
    except Exception as exc:  # transformers raises many types; translate them to one line
        raise translate_load_error(spec, exc, what) from exc


def _gguf_path(spec: ModelSpec) -> Path:
    """The GGUF file on disk: in the model directory, or in the hub cache (fetched if needed)."""
    if _is_local(spec):
        return Path(spec.model).expanduser() / str(spec.gguf_file)
    from transformers.utils import cached_file

    try:
        return Path(cached_file(spec.model, str(spec.gguf_file), revision=spec.revision))
    except Exception as exc:  # hub errors: one line, like every other load failure
        raise translate_load_error(spec, exc, "GGUF file") from exc


def _gguf_kwargs(spec: ModelSpec) -> dict[str, Any]:
    if not spec.gguf_file:
        return {}
    require(GGUF_BACKEND, f"GGUF file '{spec.gguf_file}'")
    quiet_hf_logging()  # transformers shows a progress bar while it dequantizes
    return {"gguf_file": spec.gguf_file}


def _tokenizer_source(spec: ModelSpec) -> str:
    """A PEFT adapter directory may ship its own tokenizer; otherwise use the base model's."""
    return str(Path(spec.model).expanduser()) if _is_local(spec) else spec.model


@dataclass
class OutputHead:
    """Hidden states → logits for a chunk of positions, exactly as the model's forward does."""

    linear: torch.nn.Module
    softcap: float | None = None
    scale: float | None = None
    divide_by: float | None = None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.linear(hidden)
        if self.scale is not None:
            logits = logits * self.scale
        if self.divide_by is not None:
            logits = logits / self.divide_by
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


@dataclass
class LoadedModel:
    """A model ready for scoring, with its tokenizer and a JSON-able description."""

    spec: ModelSpec
    model: Any
    tokenizer: Any
    device: torch.device
    head: OutputHead | None
    description: dict[str, Any] = field(default_factory=dict)
    #: Run forwards outside inference mode (under no_grad): optimum-quanto's packed weights
    #: make views that inference mode refuses ("Cannot set version_counter").
    no_inference_mode: bool = False
    #: How the weights are quantized (None: full precision); see :mod:`lmkl.quantization`.
    quantization: dict[str, Any] | None = None

    @property
    def probe_tolerance(self) -> float:
        """Relative tolerance of the load-time probes: float32 is exact to rounding; half
        precision and quantized kernels (LLM.int8() picks outlier columns over the whole
        input, so a position's logits move by ~1e-3 with later tokens) get 1e-2, still far
        below the O(1) changes of a bidirectional model."""
        exact = self.model.dtype == torch.float32 and self.quantization is None
        return 1e-4 if exact else 1e-2

    @property
    def label(self) -> str:
        return self.spec.display_name

    @property
    def logits_width(self) -> int:
        emb = self.model.get_output_embeddings()
        if emb is not None and hasattr(emb, "weight"):
            return int(emb.weight.shape[0])
        return int(self.model.config.get_text_config().vocab_size)

    @property
    def max_positions(self) -> int | None:
        return max_positions(self.model.config)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, T, H]`` final hidden states, or ``[B, T, V]`` logits when the split is off."""
        if self.no_inference_mode and torch.is_inference_mode_enabled():
            with torch.inference_mode(False), torch.no_grad():
                return self.hidden_states(input_ids, attention_mask)
        if self.head is None:
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).logits
        out = self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        )
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for ``[N, H]`` rows of :meth:`hidden_states` (identity when the split is off)."""
        if self.head is None:
            return hidden
        if self.no_inference_mode and torch.is_inference_mode_enabled():
            with torch.inference_mode(False), torch.no_grad():
                return self.head(hidden)
        return self.head(hidden)

    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The model's own full forward (``[B, T, V]`` logits), for probes and references."""
        if self.no_inference_mode and torch.is_inference_mode_enabled():
            with torch.inference_mode(False), torch.no_grad():
                return self.forward_logits(input_ids, attention_mask)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits


def max_positions(config: Any) -> int | None:
    """The longest input a model config allows (None when it states no limit)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_config_fits(spec: ModelSpec, windows: WindowSpec, vocab_size: int) -> None:
    """Before loading weights: refuse (one line) a model whose config cannot take ``windows``'
    context or has fewer output rows than ``vocab_size``."""
    config = model_config(spec)
    limit = max_positions(config)
    if limit is not None and windows.context_length > limit:
        raise UsageError(
            f"context length {windows.context_length} exceeds {spec.display_name}'s maximum of "
            f"{limit} positions",
            f"pass --context-length {limit} or less",
        )
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    width = getattr(text, "vocab_size", None)
    if isinstance(width, int) and width < vocab_size:
        raise TokenizerMismatchError(
            f"{spec.display_name} has {width} output rows but the comparison covers "
            f"{vocab_size} tokens",
            "use models with one vocabulary",
        )


def _make_head(model: Any) -> OutputHead | None:
    linear = model.get_output_embeddings()
    base = getattr(model, "base_model", None)
    if linear is None or base is None or base is model:
        return None
    config = model.config.get_text_config()
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    divide_by = getattr(config, "logits_scaling", None)
    return OutputHead(
        linear=linear,
        softcap=float(softcap) if softcap else None,
        scale=float(scale) if isinstance(scale, int | float) and scale != 1 else None,
        divide_by=float(divide_by)
        if isinstance(divide_by, int | float) and divide_by != 1
        else None,
    )


#: Full-forward logits of the probe input, from the split check to the causality check of the
#: same model (one forward fewer per model at load time).
_PROBE_LOGITS: weakref.WeakKeyDictionary[Any, torch.Tensor] = weakref.WeakKeyDictionary()


def _probe_inputs(loaded: LoadedModel) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The two probe inputs: 8 random tokens, and the same with the last 4 changed."""
    vocab = min(loaded.logits_width, len(loaded.tokenizer))
    if vocab < 2:
        return None
    gen = torch.Generator().manual_seed(1)
    first = torch.randint(0, vocab, (1, 8), generator=gen)
    second = first.clone()
    second[0, 4:] = (first[0, 4:] + torch.randint(1, vocab, (4,), generator=gen)) % vocab
    return first, second


@torch.inference_mode()
def _split_is_exact(loaded: LoadedModel) -> bool:
    """Compare the decoder+head split with the model's own forward on a short probe."""
    probes = _probe_inputs(loaded)
    # A vocabulary of one token (or none) has no second input to tell causality by.
    ids = probes[0] if probes is not None else torch.zeros((1, 8), dtype=torch.long)
    ids = ids.to(loaded.device)
    mask = torch.ones_like(ids)
    try:
        full = loaded.forward_logits(ids, mask)
        if probes is not None:
            _PROBE_LOGITS[loaded.model] = full  # the causality check's first forward
        full = full.float()
        split = loaded.logits(loaded.hidden_states(ids, mask)).float()
    except Exception:  # any failure of the split path means: do not use it
        return False
    if split.shape != full.shape:
        return False
    tolerance = loaded.probe_tolerance
    scale = max(1.0, float(full.abs().max()))
    return bool((split - full).abs().max() <= tolerance * scale)


@torch.inference_mode()
def _is_causal(loaded: LoadedModel) -> bool:
    """Probe that the logits at a position do not depend on later tokens.

    Some encoders (BERT-style masked LMs) load through AutoModelForCausalLM, so the class alone
    does not prove causality. Two inputs share their first half and differ in the second; a
    causal model gives the same first-half logits. Positions whose logits are not finite in
    either input are not compared (a model producing NaN is reported per token, not here).
    The first input's forward is the one the split check just ran, when it ran.
    """
    probes = _probe_inputs(loaded)
    if probes is None:
        return True
    outputs = []
    known = _PROBE_LOGITS.pop(loaded.model, None)
    # Two separate forwards of one shape: rows of one batch could interact (e.g. MoE capacity).
    for i, ids in enumerate(probes):
        try:
            if i == 0 and known is not None:
                logits = known
            else:
                ids = ids.to(loaded.device)
                logits = loaded.forward_logits(ids, torch.ones_like(ids))
        except Exception:  # the real run will report a failing forward with its own message
            return True
        outputs.append(logits[0, :4].float())
    a, b = outputs
    both = torch.isfinite(a) & torch.isfinite(b)
    if not bool(both.any()):
        return True
    tolerance = loaded.probe_tolerance
    scale = max(1.0, float(a[both].abs().max()))
    return bool((a[both] - b[both]).abs().max() <= tolerance * scale)


def _resolve_dtype(spec: ModelSpec, device: torch.device) -> torch.dtype | str:
    if spec.dtype == "auto":
        return "auto"
    return _DTYPES[spec.dtype]


def load_model(
    spec: ModelSpec, device: torch.device | None = None, tokenizer: Any | None = None
) -> LoadedModel:
    """Load the model and tokenizer described by ``spec`` onto ``device``, in eval mode
    (``tokenizer``: one already loaded for ``spec``, e.g. to check it before the weights).

    Raises :class:`ModelLoadError` with a one-line reason for anything that cannot be loaded.
    """
    from transformers import AutoModelForCausalLM

    quiet_hf_logging()
    device = device or resolve_device(spec.device)
    local = _is_local(spec)
    _check_source(spec)
    if local:
        _check_pickle_policy(spec, Path(spec.model).expanduser())
    check_adapter_policy(spec)  # before any weights (or a hub adapter's files) are read

    tokenizer = tokenizer if tokenizer is not None else load_tokenizer(spec)
    kwargs: dict[str, Any] = {
        "revision": spec.revision,
        "trust_remote_code": spec.trust_remote_code,
        "dtype": _resolve_dtype(spec, device),
        **_gguf_kwargs(spec),
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
        model = _apply_adapter(model, spec)
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
    loaded.head = _make_head(model)
    if loaded.head is not None and not _split_is_exact(loaded):
        loaded.head = None
    if not _is_causal(loaded):
        raise ModelLoadError(
            f"'{spec.model}' is not a causal language model: its prediction at a position "
            "changes when later tokens change (a bidirectional encoder such as BERT?)",
            "pass a decoder-only language model",
        )
    loaded.description = describe_model(loaded, source, local, quantization)
    return loaded


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
        return gguf_storage(_gguf_path(spec))
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


def _apply_adapter(model: Any, spec: ModelSpec) -> Any:
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


def _adapter_files(directory: Path) -> list[Path]:
    return sorted(
        p for p in directory.iterdir() if p.is_file() and p.name.startswith("adapter_model")
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
        names = [p.name for p in _adapter_files(directory)]
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


def adapter_fingerprint(spec: ModelSpec) -> str | None:
    """Content hash of a local adapter (config and weights); None for none or a hub adapter."""
    if not spec.adapter:
        return None
    directory = Path(spec.adapter).expanduser()
    if not directory.is_dir():
        return None
    files = _adapter_files(directory) + sorted(directory.glob("adapter_config.json"))
    return fingerprint_files(files) if files else None


def weights_identity(spec: ModelSpec) -> dict[str, Any]:
    """What pins ``spec``'s weights, read without loading them (for run identities).

    Local directories: a content hash of the weight files. Hub models: the commit the
    revision resolves to (from the config, which is small). Plus the adapter's hash.
    """
    _check_source(spec)
    info: dict[str, Any] = {"model": spec.model, "revision": spec.revision}
    if _is_local(spec):
        directory = Path(spec.model).expanduser()
        _check_pickle_policy(spec, directory)
        files = _model_files(spec, directory)
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
    return info


#: Configs read in this process, by source, revision, GGUF file, code policy and (for local
#: directories) the config file's stat: a run reads one model's config to check the windows,
#: to check its quantization backend and to describe it; a GGUF config is parsed from the
#: file's metadata, vocabulary included, which is worth doing once.
_CONFIGS: dict[tuple[Any, ...], Any] = {}


def model_config(spec: ModelSpec) -> Any:
    """The model's transformers config (no weights); one-line errors. Treat it as read-only:
    it is shared by every caller in the process."""
    from transformers import AutoConfig

    _check_source(spec)
    local = _is_local(spec)
    source = str(Path(spec.model).expanduser()) if local else spec.model
    stamp = None
    if local:
        config_file = Path(source) / (spec.gguf_file or "config.json")
        stamp = _file_key(config_file) if config_file.exists() else None
    key = (source, spec.revision, spec.gguf_file, spec.trust_remote_code, stamp)
    if key not in _CONFIGS:
        _CONFIGS[key] = _pretrained(AutoConfig, spec, source, "model config")
    return _CONFIGS[key]


def _same_model_name(a: str, b: str) -> bool:
    return a.rstrip("/").split("/")[-1] == b.rstrip("/").split("/")[-1]


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
        "weight_bytes": storage["weight_bytes"],
        "bits_per_weight": storage["bits_per_weight"],
        "size_source": storage["size_source"],
    }
    if quantization is not None:
        sizes = ("weight_bytes", "weights", "bits_per_weight", "size_source")
        info["quantization"] = {k: v for k, v in quantization.items() if k not in sizes}
        if quantization.get("weight_bytes") is not None:  # GGUF: the file's tensors, as stored
            info |= {k: quantization[k] for k in sizes if k != "weights"}
    if local:
        files = _model_files(loaded.spec, Path(source))
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


def check_tokenizers_match(reference: Any, candidate: Any, names: tuple[str, str]) -> None:
    """Raise :class:`TokenizerMismatchError` unless both map the same tokens to the same ids."""
    ref_vocab, cand_vocab = reference.get_vocab(), candidate.get_vocab()
    if ref_vocab != cand_vocab:
        by_id_ref = {i: t for t, i in ref_vocab.items()}
        by_id_cand = {i: t for t, i in cand_vocab.items()}
        first = None
        for token_id in sorted(set(by_id_ref) | set(by_id_cand)):
            if by_id_ref.get(token_id) != by_id_cand.get(token_id):
                first = token_id
                break
        detail = (
            f"id {first}: {by_id_ref.get(first)!r} vs {by_id_cand.get(first)!r}"
            if first is not None
            else f"sizes {len(ref_vocab)} vs {len(cand_vocab)}"
        )
        raise TokenizerMismatchError(
            f"tokenizers of {names[0]} and {names[1]} differ ({detail}); token-level KL needs "
            "one vocabulary",
            "compare models that share a tokenizer (or use --different-tokenizers for "
            "per-byte metrics)",
        )
    for attr in ("bos_token_id", "eos_token_id", "unk_token_id"):
        a, b = getattr(reference, attr, None), getattr(candidate, attr, None)
        if a != b:
            raise TokenizerMismatchError(
                f"tokenizers of {names[0]} and {names[1]} have different {attr} ({a} vs {b})",
                "use models with the same special tokens",
            )


def shared_vocab_size(models: list[LoadedModel]) -> tuple[int, bool]:
    """The real vocabulary all logit rows are sliced to, and whether any head was padded.

    Heads are often padded past the tokenizer (e.g. 152064 vs 151936 rows for one tokenizer);
    the extra rows are not tokens, so both distributions are renormalised over the tokenizer's
    ``len(tokenizer)`` entries.
    """
    tokenizer_size = len(models[0].tokenizer)
    widths = [m.logits_width for m in models]
    narrow = [m for m in models if m.logits_width < tokenizer_size]
    if narrow:
        if len({m.logits_width for m in models}) == 1:
            # Some tokenizers list more tokens than the head has rows; compare what exists.
            return narrow[0].logits_width, False
        raise TokenizerMismatchError(
            f"{narrow[0].label} has {narrow[0].logits_width} output rows but the tokenizer has "
            f"{tokenizer_size} tokens and other models have {max(widths)}",
            "compare models with the same output vocabulary",
        )
    return tokenizer_size, any(w != tokenizer_size for w in widths)


def check_context_length(models: list[LoadedModel], windows: WindowSpec) -> None:
    """Refuse (one line) a context length longer than any model's position limit."""
    for model in models:
        limit = model.max_positions
        if limit is not None and windows.context_length > limit:
            raise UsageError(
                f"context length {windows.context_length} exceeds {model.label}'s maximum of "
                f"{limit} positions",
                f"pass --context-length {limit} or less",
            )


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether encoding with the tokenizer's normal special tokens starts with BOS."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos
