"""Token ids and the UTF-8 bytes each token covers (for bits per byte and per-byte comparisons)."""

from __future__ import annotations

import re
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


_BYTE_PIECE = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-character map, inverted: the character a byte-level BPE writes per byte."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = list(printable)
    extra = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + extra)
            extra += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


_BYTE_LEVEL = _byte_level_alphabet()


def show_bytes(data: bytes) -> str:
    """``data`` as text, with every byte that is not part of valid UTF-8 written ``<0xNN>``."""
    text = data.decode("utf-8", errors="surrogateescape")
    return "".join(
        f"<0x{ord(ch) - 0xDC00:02X}>" if 0xDC80 <= ord(ch) <= 0xDCFF else ch for ch in text
    )


def display_tokens(tokenizer: Any, ids: list[int]) -> list[str]:
    """How each token reads on its own: its text, or ``<0xE2>`` for bytes that are not UTF-8.

    Decoding a lone byte of a multi-byte character gives U+FFFD; this shows the byte instead:
    from the piece itself for byte-fallback vocabularies (SentencePiece's ``<0xE2>``), from the
    byte-level alphabet for GPT-2-style BPE. Special tokens read as their names (``<s>``).
    """
    unique = sorted(set(ids))
    texts = {i: tokenizer.decode([i]) for i in unique}
    broken = [i for i in unique if "\ufffd" in texts[i]]
    if broken:
        pieces = tokenizer.convert_ids_to_tokens(broken)
        for i, piece in zip(broken, pieces, strict=True):
            if not isinstance(piece, str):
                continue
            match = _BYTE_PIECE.match(piece)
            if match:
                texts[i] = f"<0x{match.group(1).upper()}>"
            elif piece and all(ch in _BYTE_LEVEL for ch in piece):
                texts[i] = show_bytes(bytes(_BYTE_LEVEL[ch] for ch in piece))
    return [texts[i] for i in ids]
