"""Cut token streams into model inputs (windows) and mark the positions that are scored.

Two windowing protocols (see README, "Windowing"):

``documents`` (default)
    Each document is tokenized with the tokenizer's normal special tokens. A document of at most
    ``context_length`` tokens is one window. A longer one is covered by sliding windows that advance
    by ``stride`` tokens, so that every token after the first is scored exactly once and has at
    least ``context_length - stride`` tokens of left context (except near the document start).

``llama-cpp``
    llama.cpp's ``llama-perplexity`` protocol, so numbers can sit beside its KLD tables: the whole
    text is tokenized once (a ``.txt`` file is read whole, byte for byte); it is cut into
    non-overlapping chunks of ``N`` tokens (the short tail dropped); each chunk's first token is
    overwritten with BOS when the tokenizer adds one; logits at chunk positions ``N/2 .. N-2`` are
    scored, i.e. the tokens at positions ``N/2+1 .. N-1`` are predicted.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

from lmkl.data.corpus import Corpus
from lmkl.data.tokenize import encode_text
from lmkl.errors import DataError
from lmkl.specs import WindowSpec


@dataclass
class Window:
    """One model input and the positions in it whose next token is scored.

    ``input_ids[j]`` for ``j >= first_target`` are the scored targets; the logits that predict
    them are at window indices ``j - 1``. ``offset`` is the position of ``input_ids[0]`` in the
    document (or in the concatenated stream for llama-cpp windowing). ``score_mask``, when set
    (chat data scored on assistant tokens), has one flag per target ``j >= first_target`` and
    only flagged targets are scored; ``target_bytes`` always has one entry per target.
    """

    window_id: int
    doc_id: int
    input_ids: list[int]
    first_target: int
    offset: int
    target_bytes: list[int] = field(default_factory=list)
    score_mask: list[bool] | None = None

    @property
    def num_targets(self) -> int:
        if self.score_mask is not None:
            return sum(self.score_mask)
        return len(self.input_ids) - self.first_target


def scored_positions(window: Window) -> list[int]:
    """Window indices ``j`` whose token is a scored target (its logits are at ``j - 1``)."""
    js = range(window.first_target, len(window.input_ids))
    if window.score_mask is None:
        return list(js)
    return [j for j, keep in zip(js, window.score_mask, strict=True) if keep]


def _window(
    window_id: int,
    doc_id: int,
    ids: list[int],
    sizes: list[int],
    span: tuple[int, int, int],
    mask: list[bool] | None = None,
) -> Window:
    """The window ``ids[begin:end]`` whose targets from ``begin + first`` on are scored."""
    begin, first, end = span
    return Window(
        window_id=window_id,
        doc_id=doc_id,
        input_ids=ids[begin:end],
        first_target=first,
        offset=begin,
        target_bytes=sizes[begin + first : end],
        score_mask=mask,
    )


def document_windows(
    corpus: Corpus,
    tokenizer: Any,
    spec: WindowSpec,
    max_tokens: int | None = None,
    *,
    prefix: int | None = None,
) -> list[Window]:
    """Windows for ``documents`` mode; see the module docstring.

    ``prefix``: a token put before each document (covering no bytes), so that its first text
    token is predicted too (per-byte comparisons with a tokenizer that adds no BOS).
    """
    n, stride = spec.context_length, spec.effective_stride
    windows: list[Window] = []
    budget = max_tokens if max_tokens is not None else float("inf")
    for doc in corpus.documents:
        if budget <= 0:
            break
        if doc.messages is None:
            ids, sizes = encode_text(tokenizer, doc.text)
            if prefix is not None:
                ids, sizes = [prefix, *ids], [0, *sizes]
            mask = None
        else:
            from lmkl.data.chat import encode_chat

            ids, sizes, mask = encode_chat(tokenizer, doc.messages, corpus.score_on)
        for begin, first, end in sliding_spans(len(ids), n, stride):
            window_mask = None if mask is None else mask[begin + first : end]
            if window_mask is not None:
                if not any(window_mask):
                    continue
                end = _end_after_scored(window_mask, begin + first, budget)
                window_mask = window_mask[: end - begin - first]
                take = sum(window_mask)
            else:
                take = int(min(end - (begin + first), budget))
                if take <= 0:
                    break
                end = begin + first + take
            span = (begin, first, end)
            windows.append(_window(len(windows), doc.doc_id, ids, sizes, span, window_mask))
            budget -= take
            if budget <= 0:
                break
    return windows


def _end_after_scored(mask: list[bool], first: int, budget: float) -> int:
    """End index (exclusive) that keeps at most ``budget`` scored targets and no unscored tail."""
    kept = 0
    last = -1
    for j, scored in enumerate(mask):
        if scored:
            if kept >= budget:
                break
            kept += 1
            last = j
    return first + last + 1


def sliding_spans(length: int, n: int, stride: int) -> Iterator[tuple[int, int, int]]:
    """``(begin, first_target_in_window, end)`` triples covering targets ``1 .. length-1`` once."""
    if length < 2:
        return
    end = min(n, length)
    yield 0, 1, end
    scored_until = end
    while scored_until < length:
        end = min(scored_until + stride, length)
        begin = max(0, end - n)
        yield begin, scored_until - begin, end
        scored_until = end


def llama_cpp_windows(
    ids: list[int], sizes: list[int], n: int, bos: int | None, max_tokens: float
) -> list[Window]:
    """Windows for ``llama-cpp`` mode over a token stream; see the module docstring.

    ``bos``: the id written over each chunk's first token (None: the tokenizer adds no BOS).
    """
    first = n // 2 + 1  # first predicted position in each chunk
    windows: list[Window] = []
    budget = max_tokens
    for chunk in range(len(ids) // n):
        if budget <= 0:
            break
        start = chunk * n
        chunk_ids = ids[start : start + n]
        if bos is not None:
            chunk_ids[0] = bos
        take = int(min(n - first, budget))
        window = _window(chunk, 0, chunk_ids, sizes[start : start + n], (0, first, first + take))
        window.offset = start
        windows.append(window)
        budget -= take
    return windows


def make_windows(
    corpus: Corpus,
    tokenizer: Any,
    spec: WindowSpec,
    adds_bos: bool,
    max_tokens: int | None = None,
) -> list[Window]:
    """Windows for the protocol in ``spec``; raises :class:`DataError` if nothing can be scored."""
    if spec.windowing == "llama-cpp":
        if any(d.messages is not None for d in corpus.documents):
            raise DataError(
                "llama-cpp windowing needs plain text, but the data holds chat messages",
                "use --windowing documents for chat data",
            )
        ids, sizes = encode_text(tokenizer, corpus.stream_text)
        bos = tokenizer.bos_token_id if adds_bos else None
        budget = max_tokens if max_tokens is not None else float("inf")
        windows = llama_cpp_windows(ids, sizes, spec.context_length, bos, budget)
        if not windows:
            raise DataError(
                f"the text has fewer than {spec.context_length} tokens, so llama-cpp windowing "
                "has no complete chunk to score",
                "use more text or a smaller --context-length",
            )
        return windows
    windows = document_windows(corpus, tokenizer, spec, max_tokens)
    if not windows and corpus.score_on == "assistant":
        raise DataError(
            f"no assistant message to score in {len(corpus.documents)} conversations",
            "check the roles in the messages, or pass --score-on all",
        )
    if not windows:
        raise DataError(
            f"no document has two or more tokens ({len(corpus.documents)} documents read)",
            "check --text-field and that the data is not empty",
        )
    return windows
