"""Read text, tokenize it and cut it into scored windows.

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

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmkl.errors import DataError
from lmkl.specs import DataSpec, WindowSpec

LOCAL_FORMATS = {
    ".txt": "text",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
#: Column read as chat conversations when there is no ``text`` column.
CHAT_FIELD = "messages"


@dataclass(frozen=True)
class Document:
    """One text, with its row index in the source dataset."""

    doc_id: int
    text: str
    #: A chat conversation (list of {role, content}) rendered with the chat template instead.
    messages: list[dict[str, Any]] | None = None


@dataclass
class Corpus:
    """The documents of one data source, plus a description for provenance."""

    documents: list[Document]
    description: dict[str, Any]
    #: The raw text for llama-cpp windowing (a .txt file read whole; else documents joined by \n).
    stream_text: str
    #: Which targets of chat documents are scored: "assistant" tokens or "all".
    score_on: str = "all"


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


def _read_local(path: Path, spec: DataSpec) -> tuple[list[Document], str, str]:
    """Documents, stream text and a content fingerprint for a local file or saved dataset."""
    if path.is_dir():
        try:
            from datasets import load_from_disk

            dataset = load_from_disk(str(path))
        except Exception as exc:
            raise DataError(
                f"cannot read dataset directory '{path}': {_first_line(exc)}",
                "pass a directory written by Dataset.save_to_disk, or a data file",
            ) from exc
        dataset = _pick_split(dataset, spec)
        texts = _column(dataset, spec)
        fingerprint = getattr(dataset, "_fingerprint", None) or _hash_texts(texts)
        return *_documents(texts), str(fingerprint)

    suffix = path.suffix.lower()
    if suffix not in LOCAL_FORMATS:
        raise DataError(
            f"unsupported data file type '{suffix}' for '{path}'",
            "use .txt, .jsonl, .json, .csv or .parquet, or a save_to_disk directory",
        )
    try:
        raw = path.read_bytes()
    except OSError as exc:
        raise DataError(
            f"cannot read data file '{path}': {exc.strerror}", "check the path and its permissions"
        ) from exc
    fingerprint = hashlib.sha256(raw).hexdigest()
    if not raw.strip():
        raise DataError(f"data file '{path}' is empty", "pass a file that holds text")
    if suffix == ".txt":
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise DataError(
                f"'{path}' is not UTF-8 text ({exc.reason} at byte {exc.start})",
                "re-encode the file as UTF-8",
            ) from exc
        # Documents are paragraphs separated by blank lines; the stream keeps every byte.
        paragraphs = [p.strip("\n") for p in re.split(r"\n\s*\n", text)]
        docs = [Document(i, p) for i, p in enumerate(paragraphs)]
        return docs, text, fingerprint

    from datasets import load_dataset

    try:
        with _quiet_datasets():
            dataset = load_dataset(LOCAL_FORMATS[suffix], data_files=str(path), split="train")
    except Exception as exc:
        raise DataError(
            f"cannot parse '{path}' as {suffix[1:]}: {_root_cause(exc)}",
            f"check that the file is valid {suffix[1:]}",
        ) from exc
    texts = _column(dataset, spec)
    return *_documents(texts), fingerprint


@contextmanager
def _quiet_datasets() -> Iterator[None]:
    """datasets logs parse failures at ERROR level before raising; lmkl reports them itself."""
    import logging

    logger = logging.getLogger("datasets")
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        yield
    finally:
        logger.setLevel(level)


def _root_cause(exc: BaseException) -> str:
    """The innermost cause's first line (datasets wraps parser errors in a generic one)."""
    seen = {id(exc)}
    while (exc.__cause__ or exc.__context__) is not None:
        inner = exc.__cause__ or exc.__context__
        if id(inner) in seen or isinstance(inner, StopIteration):
            break
        seen.add(id(inner))
        exc = inner
    return _first_line(exc)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:200]


def _hash_texts(texts: list[Any]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        if not isinstance(text, str):  # chat messages
            text = json.dumps(text, sort_keys=True, ensure_ascii=False)
        digest.update(text.encode())
        digest.update(b"\0")
    return digest.hexdigest()


def _pick_split(dataset: Any, spec: DataSpec) -> Any:
    """Select ``spec.split`` from a DatasetDict; a plain Dataset is returned as is."""
    from datasets import DatasetDict

    if not isinstance(dataset, DatasetDict):
        return dataset
    splits = list(dataset.keys())
    if spec.split:
        if spec.split not in dataset:
            raise DataError(
                f"split '{spec.split}' not found; available: {', '.join(splits)}",
                f"pass --split {splits[0]}",
            )
        return dataset[spec.split]
    if len(splits) == 1:
        return dataset[splits[0]]
    if "test" in dataset:
        return dataset["test"]
    raise DataError(
        f"dataset has several splits ({', '.join(splits)}) and none is 'test'",
        "choose one with --split",
    )


def _documents(values: list[Any]) -> tuple[list[Document], str]:
    """Documents and the joined stream text from a column of strings or of chat messages."""
    if values and isinstance(values[0], list):
        from lmkl.data.chat import check_messages

        docs = []
        for i, value in enumerate(values):
            messages = check_messages(value, i)
            plain = "\n".join(f"{m['role']}: {m['content']}" for m in messages)
            docs.append(Document(i, plain, messages=messages))
        return docs, ""
    return [Document(i, t) for i, t in enumerate(values)], "\n".join(values)


def _column(dataset: Any, spec: DataSpec) -> list[Any]:
    """The text column's values: strings, or chat conversations (lists of {role, content}).

    A ``messages`` column is used when the text field is the default ``text`` and absent.
    """
    names = list(dataset.column_names)
    if spec.text_field == "text" and "text" not in names and CHAT_FIELD in names:
        spec = spec.model_copy(update={"text_field": CHAT_FIELD})
    if spec.text_field not in names:
        raise DataError(
            f"text field '{spec.text_field}' not found; the data has: {', '.join(names) or 'none'}",
            f"pass --text-field {names[0]}" if names else "check the data file",
        )
    if spec.max_samples:
        dataset = dataset.select(range(min(spec.max_samples, len(dataset))))
    values = dataset[spec.text_field]
    if values and isinstance(values[0], list):
        return values
    if values and not isinstance(values[0], str | type(None)):
        raise DataError(
            f"field '{spec.text_field}' holds {type(values[0]).__name__}, not text",
            "pick a column of strings with --text-field",
        )
    return [v or "" for v in values]


def load_corpus(spec: DataSpec) -> Corpus:
    """Read the documents of ``spec`` (local file, save_to_disk directory, or hub dataset)."""
    from lmkl.models import quiet_hf_logging

    quiet_hf_logging()
    path = Path(spec.source).expanduser()
    if path.exists():
        docs, stream, fingerprint = _read_local(path, spec)
        kind = "saved" if path.is_dir() else "file"
        source = str(path.resolve())
    elif spec.source.endswith(tuple(LOCAL_FORMATS)) or spec.source.startswith((".", "/", "~")):
        raise DataError(f"data file '{spec.source}' does not exist", "check the path")
    else:
        docs, stream, fingerprint = _read_hub(spec)
        kind, source = "hub", spec.source
    if spec.max_samples and len(docs) > spec.max_samples:
        # Only a .txt file still has all its paragraphs here; its stream shrinks to match.
        docs = docs[: spec.max_samples]
        stream = "\n\n".join(d.text for d in docs)
    chat = any(d.messages is not None for d in docs)
    if spec.score_on == "assistant" and not chat:
        raise DataError(
            "--score-on assistant needs chat data, but the data is plain text",
            "pass data with a messages column (role/content), or drop --score-on",
        )
    score_on = (spec.score_on or "assistant") if chat else "all"
    description = {
        "source": source,
        "kind": kind,
        "split": spec.split,
        "dataset_config": spec.dataset_config,
        "text_field": spec.text_field,
        "max_samples": spec.max_samples,
        "fingerprint": fingerprint,
        "documents": len(docs),
        "format": "chat" if chat else "text",
        "score_on": score_on,
    }
    return Corpus(documents=docs, description=description, stream_text=stream, score_on=score_on)


def _read_hub(spec: DataSpec) -> tuple[list[Document], str, str]:
    from datasets import load_dataset

    try:
        dataset = load_dataset(spec.source, spec.dataset_config, split=spec.split)
    except Exception as exc:
        raise DataError(
            f"dataset '{spec.source}' is not a local path and could not be loaded from the hub "
            f"({_first_line(exc)})",
            "check the path or dataset name; hub datasets need network access or a local cache",
        ) from exc
    dataset = _pick_split(dataset, spec)
    texts = _column(dataset, spec)
    fingerprint = getattr(dataset, "_fingerprint", None) or _hash_texts(texts)
    return *_documents(texts), str(fingerprint)


def _encode(
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
        special = set(getattr(tokenizer, "all_special_ids", []))
        sizes = [0 if i in special else len(tokenizer.decode([i]).encode()) for i in ids]
        return ids, sizes
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


def document_windows(
    corpus: Corpus, tokenizer: Any, spec: WindowSpec, max_tokens: int | None = None
) -> list[Window]:
    """Windows for ``documents`` mode; see the module docstring."""
    n, stride = spec.context_length, spec.effective_stride
    windows: list[Window] = []
    budget = max_tokens if max_tokens is not None else float("inf")
    for doc in corpus.documents:
        if budget <= 0:
            break
        if doc.messages is None:
            ids, sizes = _encode(tokenizer, doc.text)
            mask = None
        else:
            from lmkl.data.chat import encode_chat

            ids, sizes, mask = encode_chat(tokenizer, doc.messages, corpus.score_on)
        for begin, first, end in _sliding_spans(len(ids), n, stride):
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
            windows.append(
                Window(
                    window_id=len(windows),
                    doc_id=doc.doc_id,
                    input_ids=ids[begin:end],
                    first_target=first,
                    offset=begin,
                    target_bytes=sizes[begin + first : end],
                    score_mask=window_mask,
                )
            )
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


def _sliding_spans(length: int, n: int, stride: int) -> Iterator[tuple[int, int, int]]:
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
    corpus: Corpus,
    tokenizer: Any,
    spec: WindowSpec,
    adds_bos: bool,
    max_tokens: int | None = None,
) -> list[Window]:
    """Windows for ``llama-cpp`` mode; see the module docstring."""
    n = spec.context_length
    if any(d.messages is not None for d in corpus.documents):
        raise DataError(
            "llama-cpp windowing needs plain text, but the data holds chat messages",
            "use --windowing documents for chat data",
        )
    ids, sizes = _encode(tokenizer, corpus.stream_text)
    first = n // 2 + 1  # first predicted position in each chunk
    windows: list[Window] = []
    budget = max_tokens if max_tokens is not None else float("inf")
    for chunk in range(len(ids) // n):
        if budget <= 0:
            break
        start = chunk * n
        chunk_ids = ids[start : start + n]
        if adds_bos:
            chunk_ids[0] = tokenizer.bos_token_id
        take = int(min(n - first, budget))
        windows.append(
            Window(
                window_id=chunk,
                doc_id=0,
                input_ids=chunk_ids[: first + take],
                first_target=first,
                offset=start,
                target_bytes=sizes[start + first : start + first + take],
            )
        )
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
        windows = llama_cpp_windows(corpus, tokenizer, spec, adds_bos, max_tokens)
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
