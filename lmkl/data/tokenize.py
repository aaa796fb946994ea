"""Token ids and the UTF-8 bytes each token covers (for bits per byte and per-byte comparisons)."""

from __future__ import annotations

from typing import Any


def encode_text(
    tokenizer: Any, text: str, add_special_tokens: bool = True
) -> tuple[list[int], list[int]]:
    """Token ids with the tokenizer's normal special tokens, and the UTF-8 bytes each covers.

    A token's bytes are those of the text from the end of the previous token to its own end, so
    the bytes of all tokens add up to the text's size (special tokens cover none).
    ``add_special_tokens=False`` is for text that already holds them (rendered chat templates).
    """
    try:
        enc = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
        offsets = enc["offset_mapping"]
    except (NotImplementedError, ValueError, TypeError):
        enc = tokenizer(text, add_special_tokens=add_special_tokens)
        offsets = None
    ids = list(enc["input_ids"])
    if offsets is None:
        return ids, token_bytes(tokenizer, ids)
    sizes = []
    prev_end = 0
    for start, end in offsets:
        if end <= start and start == 0 and end == 0:
            sizes.append(0)
            continue
        end = max(end, prev_end)
        sizes.append(len(text[prev_end:end].encode()))
        prev_end = end
    return ids, sizes


def token_bytes(tokenizer: Any, ids: list[int]) -> list[int]:
    """UTF-8 bytes of each token decoded on its own (special tokens cover none)."""
    special = set(getattr(tokenizer, "all_special_ids", []))
    return [0 if i in special else len(tokenizer.decode([i]).encode()) for i in ids]
