"""GGUF files: their path (local or hub cache), loading options, and their own tokenizer.

:class:`GgufTokenizer` reports the vocabulary and special ids stored in the file's metadata, so
the vocabulary check against the reference sees the file's tokens (transformers' rebuilt
tokenizer adds or drops some).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmkl.models.environment import quiet_hf_logging
from lmkl.models.load_errors import translate_load_error
from lmkl.models.sources import is_local
from lmkl.quantization import GGUF_BACKEND, read_gguf, require
from lmkl.specs import ModelSpec


def has_tokenizer_files(spec: ModelSpec) -> bool:
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
        fields = read_gguf(gguf_path(spec)).fields

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
        """The file's tokens and their ids."""
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


def gguf_path(spec: ModelSpec) -> Path:
    """The GGUF file on disk: in the model directory, or in the hub cache (fetched if needed)."""
    if is_local(spec):
        return Path(spec.model).expanduser() / str(spec.gguf_file)
    from transformers.utils import cached_file

    try:
        return Path(cached_file(spec.model, str(spec.gguf_file), revision=spec.revision))
    except Exception as exc:  # hub errors: one line, like every other load failure
        raise translate_load_error(spec, exc, "GGUF file") from exc


def gguf_kwargs(spec: ModelSpec) -> dict[str, Any]:
    """The ``from_pretrained`` keywords of a GGUF model (none for other models)."""
    if not spec.gguf_file:
        return {}
    require(GGUF_BACKEND, f"GGUF file '{spec.gguf_file}'")
    quiet_hf_logging()  # transformers shows a progress bar while it dequantizes
    return {"gguf_file": spec.gguf_file}
