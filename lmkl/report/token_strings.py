"""Token ids as strings for reports, without loading a model."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from lmkl.report.runs import RunInfo


class TokenNamer:
    """Turns token ids into strings without loading a model.

    Uses the reference's ``tokenizer.json`` (fast ``tokenizers`` library) when the reference was a
    local directory that still exists; otherwise the strings stored in worst.json; otherwise the
    id itself (``#123``).
    """

    def __init__(self, runs: list[RunInfo]) -> None:
        self._known: dict[int, str] = {}
        self._tokenizer: Any = None
        self.source = "ids"
        for run in runs:
            for entry in run.worst:
                self._remember(entry.get("token_id"), entry.get("token"))
                for key in ("reference_top5", "candidate_top5"):
                    for item in entry.get(key) or []:
                        if isinstance(item, dict):
                            self._remember(item.get("token_id"), item.get("token"))
        if self._known:
            self.source = "worst.json"
        for run in runs:
            path = run.results.get("reference", {}).get("path")
            if path and (Path(path) / "tokenizer.json").is_file():
                try:
                    from tokenizers import Tokenizer

                    self._tokenizer = Tokenizer.from_file(str(Path(path) / "tokenizer.json"))
                    self.source = "tokenizer"
                    break
                except Exception:  # a tokenizer we cannot read: fall back, never fail a report
                    self._tokenizer = None

    def _remember(self, token_id: Any, token: Any) -> None:
        if isinstance(token_id, int) and isinstance(token, str):
            self._known.setdefault(token_id, token)

    def __call__(self, token_id: int) -> str:
        token_id = int(token_id)
        if self._tokenizer is not None:
            try:
                return self._tokenizer.decode([token_id], skip_special_tokens=False)
            except Exception:
                pass
        if token_id in self._known:
            return self._known[token_id]
        return f"#{token_id}"

    def many(self, ids: Iterable[int]) -> list[str]:
        """Strings of many ids (one batch call when a tokenizer is available)."""
        ids = [int(i) for i in ids]
        if self._tokenizer is not None:
            try:
                return self._tokenizer.decode_batch([[i] for i in ids], skip_special_tokens=False)
            except Exception:
                pass
        return [self(i) for i in ids]


def visible(text: str, limit: int | None = None) -> str:
    """A token string with its whitespace made visible (for tables of single tokens)."""
    out = text.replace("\r", "␍").replace("\n", "↵").replace("\t", "⇥").replace(" ", "·")
    if not out:
        out = "∅"
    if limit is not None and len(out) > limit:
        out = out[: limit - 1] + "…"
    return out
