"""Read text into documents: local files, ``save_to_disk`` folders and hub datasets.

Each document keeps its text (or chat ``messages``); the corpus carries a content fingerprint
that run identities and reference caches use to notice changed data.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmkl.errors import DataError
from lmkl.specs import DataSpec

LOCAL_FORMATS = {
    ".txt": "text",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".parquet": "parquet",
}
#: Column read as chat conversations when there is no ``text`` column.
CHAT_FIELD = "messages"
#: Columns with which datasets (5.x) reads JSON rows as agent traces rather than as they are;
#: such files are left to datasets.
_AGENT_TRACE_KEYS = (
    {"type", "message"},
    {"type", "payload"},
    {"type", "id", "version", "cwd"},
    {"id", "source", "model", "system_prompt", "messages"},
)


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


def _read_local(path: Path, spec: DataSpec) -> tuple[list[Document], str, str]:
    """Documents, stream text and a content fingerprint for a local file or saved dataset."""
    if path.is_dir():
        try:
            dataset = _datasets().load_from_disk(str(path))
        except Exception as exc:
            raise DataError(
                f"cannot read dataset directory '{path}': {_first_line(exc)}",
                "pass a directory written by Dataset.save_to_disk, or a data file",
            ) from exc
        return _from_dataset(dataset, spec)

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

    texts = _plain_texts(raw, path, spec)
    if texts is not None:
        if spec.max_samples:
            texts = texts[: spec.max_samples]
        return *_documents(texts), fingerprint

    load_dataset = _datasets().load_dataset
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


def _datasets() -> Any:
    """``datasets``, imported on first need (about a second) and kept quiet."""
    import datasets

    from lmkl.models import quiet_hf_logging

    quiet_hf_logging()
    return datasets


def _plain_texts(raw: bytes, path: Path, spec: DataSpec) -> list[str] | None:
    """The text column of a plain JSON(L) or Parquet file, read without ``datasets``.

    Only the unambiguous case: every row holds the text field as a string (JSON: one object per
    line, or one list of objects or of strings; Parquet: a string column without nulls). There
    ``datasets`` yields exactly these strings, so the documents are the same; anything else
    (chat columns, nulls, mixed types, other JSON layouts, unreadable files) returns None and is
    read by ``datasets``, with its type rules and its error messages.
    """
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        return _parquet_texts(path, spec.text_field)
    if suffix not in (".jsonl", ".json"):
        return None
    try:
        # datasets drops a leading UTF-8 BOM too.
        text = raw.decode("utf-8-sig")
        if text.lstrip().startswith("["):
            rows = json.loads(text)
            if not isinstance(rows, list):
                return None
            if rows and all(isinstance(r, str) for r in rows):
                # datasets reads a JSON list of strings as a "text" column.
                return rows if spec.text_field == "text" else None
        else:
            # Lines end at \n only: a JSON string may hold U+2028 and the like, which
            # str.splitlines() would split at.
            rows = _json_lines(text, path)
    except ValueError:  # not JSON (or not UTF-8): let datasets parse it and word the error
        return None
    if not rows or not all(isinstance(r, dict) for r in rows):
        return None
    keys = set().union(*rows)
    if any(markers <= keys for markers in _AGENT_TRACE_KEYS):
        return None  # datasets may read such rows as agent traces, with other columns
    texts = [r.get(spec.text_field) for r in rows]
    return texts if all(isinstance(t, str) for t in texts) else None


def _json_lines(text: str, path: Path) -> list[Any]:
    """One JSON value per non-blank line; a line that is not JSON is named by its number (a
    parser's character offset into the whole file helps nobody find it). A ``.json`` file that
    is one JSON document over several lines raises ValueError, for ``datasets`` to read."""
    rows = []
    for number, line in enumerate(text.split("\n"), start=1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            if path.suffix.lower() == ".json" and _is_json(text):
                raise  # one document over several lines, not JSON lines
            shown = line.strip()
            shown = shown[:60] + ("…" if len(shown) > 60 else "")
            raise DataError(
                f"'{path}' line {number} is not valid JSON ({exc.msg} at column {exc.colno}): "
                f"{shown}",
                f'fix line {number} (one JSON object per line, e.g. {{"text": "..."}})',
            ) from exc
    return rows


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _parquet_texts(path: Path, field: str) -> list[str] | None:
    """A Parquet file's plain string column ``field`` (None when anything is less plain)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        # Files written by datasets may declare other features for the column; leave those
        # to datasets.
        schema = pq.read_schema(path)
        if field not in schema.names:
            return None
        if b"huggingface" in (schema.metadata or {}):
            info = json.loads(schema.metadata[b"huggingface"]).get("info") or {}
            declared = (info.get("features") or {}).get(field) or {}
            if declared and (
                declared.get("_type") != "Value"
                or declared.get("dtype") not in ("string", "large_string")
            ):
                return None
        column = pq.read_table(path, columns=[field]).column(field)
    except (OSError, pa.ArrowException, ValueError):
        return None
    if not (pa.types.is_string(column.type) or pa.types.is_large_string(column.type)):
        return None
    if column.null_count:
        return None
    return column.to_pylist()


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
    if not isinstance(dataset, _datasets().DatasetDict):
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
    # Rows without text (null or empty) keep their row index as doc_id but hold no token to
    # score: counted apart, never as documents.
    skipped = [d.doc_id for d in docs if d.messages is None and not d.text]
    description = {
        "source": source,
        "kind": kind,
        "split": spec.split,
        "dataset_config": spec.dataset_config,
        "text_field": spec.text_field,
        "max_samples": spec.max_samples,
        "fingerprint": fingerprint,
        "documents": len(docs) - len(skipped),
        "format": "chat" if chat else "text",
        "score_on": score_on,
    }
    if skipped:
        description["skipped_rows"] = {
            "count": len(skipped),
            "reason": "no text (null or empty)",
            "rows": skipped[:20],
        }
    return Corpus(documents=docs, description=description, stream_text=stream, score_on=score_on)


def skipped_rows_note(corpus: Corpus) -> str | None:
    """One line naming the rows skipped for having no text (None when every row has text)."""
    skipped = corpus.description.get("skipped_rows")
    if not skipped:
        return None
    rows = ", ".join(map(str, skipped["rows"][:5])) + (", …" if skipped["count"] > 5 else "")
    return (
        f"data: {corpus.description['documents']} documents; {skipped['count']} "
        f"row{'s' if skipped['count'] != 1 else ''} skipped for having no text (null or empty:"
        f" row {rows}; results.json: data.skipped_rows)"
    )


def _read_hub(spec: DataSpec) -> tuple[list[Document], str, str]:
    load_dataset = _datasets().load_dataset
    try:
        dataset = load_dataset(spec.source, spec.dataset_config, split=spec.split)
    except Exception as exc:
        raise DataError(
            f"dataset '{spec.source}' is not a local path and could not be loaded from the hub "
            f"({_first_line(exc)})",
            "check the path or dataset name; hub datasets need network access or a local cache",
        ) from exc
    return _from_dataset(dataset, spec)


def _from_dataset(dataset: Any, spec: DataSpec) -> tuple[list[Document], str, str]:
    """Documents, stream text and content fingerprint of a loaded ``datasets`` object."""
    dataset = _pick_split(dataset, spec)
    texts = _column(dataset, spec)
    fingerprint = getattr(dataset, "_fingerprint", None) or _hash_texts(texts)
    return *_documents(texts), str(fingerprint)
