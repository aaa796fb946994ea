"""Checks that models are comparable token by token: vocabularies, special ids, context.

Token-level KL needs one vocabulary: the tokenizers must map the same tokens to the same ids,
output layers padded past the tokenizer are sliced to it, and the context must fit every model.
"""

from __future__ import annotations

from typing import Any

from lmkl.errors import TokenizerMismatchError, UsageError
from lmkl.models.config import model_config
from lmkl.models.environment import resolve_device
from lmkl.models.loaded import LoadedModel, max_positions
from lmkl.quantization import check_groups_fit
from lmkl.specs import ModelSpec, WindowSpec


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


def check_config_fits(spec: ModelSpec, windows: WindowSpec, vocab_size: int) -> None:
    """Before loading weights: refuse (one line) a model whose config cannot take ``windows``'
    context, has fewer output rows than ``vocab_size``, or whose quantization groups do not fit
    its layer widths."""
    config = model_config(spec)
    if spec.quantize is not None and not spec.gguf_file:
        check_groups_fit(spec.quantize, config, spec.display_name, resolve_device(spec.device))
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


def tokenizer_adds_bos(tokenizer: Any) -> bool:
    """Whether encoding with the tokenizer's normal special tokens starts with BOS."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return bool(ids) and ids[0] == bos
