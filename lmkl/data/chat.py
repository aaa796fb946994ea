"""Chat data: render ``messages`` with a tokenizer's chat template and find the assistant tokens.

A chat document is a list of ``{"role": ..., "content": ...}`` messages. It is rendered to one
string with the **reference** tokenizer's chat template (``apply_chat_template``), tokenized
without adding special tokens (the template writes its own, as ``apply_chat_template`` does), and
each token is marked as *assistant* or not.

Where the assistant turns are (character spans of the rendered text):

* Templates with ``{% generation %}`` blocks say so themselves; their
  ``return_assistant_tokens_mask`` is used.
* Any other template is rendered incrementally: for the assistant message ``i``, the render of
  ``messages[:i]`` with the generation prompt is where the turn starts, and the render of
  ``messages[:i+1]`` is where it ends (so the template's end-of-turn marker is part of the turn,
  since the model has to produce it). Both must be prefixes of the full render; templates that
  rewrite earlier turns (e.g. ones that strip the reasoning of past turns) are refused with a
  clear error instead of being scored wrongly.

A token is an assistant token when its characters overlap an assistant span (the rule
``transformers`` uses for ``{% generation %}`` masks).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from lmkl.errors import DataError

Message = dict[str, Any]

_GENERATION_TAG = re.compile(r"{%-?\s*generation\s*-?%}")


def check_messages(value: Any, row: int) -> list[Message]:
    """Validate one row of a ``messages`` column: a non-empty list of {role, content} dicts."""
    ok = (
        isinstance(value, list)
        and value
        and all(
            isinstance(m, dict)
            and isinstance(m.get("role"), str)
            and isinstance(m.get("content"), str)
            for m in value
        )
    )
    if not ok:
        raise DataError(
            f"row {row} of the messages column is not a list of {{role, content}} messages",
            'each row must look like [{"role": "user", "content": "..."}, ...]',
        )
    return value


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def require_chat_template(tokenizer: Any, name: str = "the reference") -> None:
    """Raise a one-line :class:`DataError` when ``tokenizer`` cannot render conversations."""
    if not has_chat_template(tokenizer):
        raise DataError(
            f"the data holds chat messages but {name}'s tokenizer has no chat template",
            "use a chat/instruct model's tokenizer, add a chat_template to its "
            "tokenizer_config.json, or pass plain text with --text-field",
        )


def render(tokenizer: Any, messages: Sequence[Message], add_generation_prompt: bool) -> str:
    """The chat template's text for ``messages`` (no tokenization)."""
    try:
        return tokenizer.apply_chat_template(
            list(messages), tokenize=False, add_generation_prompt=add_generation_prompt
        )
    except Exception as exc:  # jinja raises TemplateError and friends for bad conversations
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
        raise DataError(
            f"the chat template cannot render a conversation: {first}",
            "check the roles and order of the messages",
        ) from exc


def encode_prompt(tokenizer: Any, messages: Sequence[Message]) -> list[int]:
    """Token ids of a conversation plus the generation prompt, ready for the assistant to reply."""
    require_chat_template(tokenizer)
    if messages[-1]["role"] == "assistant":
        raise DataError(
            "a chat prompt ends with an assistant message",
            "end each prompt conversation with a user (or system) turn",
        )
    text = render(tokenizer, messages, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def assistant_spans(
    tokenizer: Any, messages: Sequence[Message], full: str
) -> list[tuple[int, int]]:
    """Character spans ``[start, end)`` of the assistant turns in ``full`` (incremental renders)."""
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        start = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        end = render(tokenizer, messages[: i + 1], add_generation_prompt=False)
        if not (full.startswith(start) and full.startswith(end) and len(start) <= len(end)):
            raise DataError(
                f"the chat template rewrites earlier turns (assistant message {i} renders "
                "differently inside the whole conversation), so its tokens cannot be located",
                "use --score-on all, split the conversation at each assistant turn, or use a "
                "template with {% generation %} markers",
            )
        spans.append((len(start), len(end)))
    return spans


def encode_chat(
    tokenizer: Any, messages: Sequence[Message], score_on: str
) -> tuple[list[int], list[int], list[bool] | None]:
    """Token ids, UTF-8 bytes per token, and the assistant mask (``None`` for ``score_on='all'``).

    ``mask[j]`` says whether token ``j`` belongs to an assistant turn; the caller scores the
    target at ``j`` only when it does.
    """
    from lmkl.data.tokenize import encode_text

    require_chat_template(tokenizer)
    full = render(tokenizer, messages, add_generation_prompt=False)
    ids, sizes = encode_text(tokenizer, full, add_special_tokens=False)
    if score_on == "all":
        return ids, sizes, None
    if not any(m["role"] == "assistant" for m in messages):
        return ids, sizes, [False] * len(ids)
    if _GENERATION_TAG.search(tokenizer.chat_template or ""):
        out = tokenizer.apply_chat_template(
            list(messages), tokenize=True, return_dict=True, return_assistant_tokens_mask=True
        )
        if list(out["input_ids"]) == ids:
            return ids, sizes, [bool(v) for v in out["assistant_masks"]]
    spans = [
        (len(full[:s].encode()), len(full[:e].encode()))
        for s, e in assistant_spans(tokenizer, messages, full)
    ]
    mask = []
    end = 0
    for size in sizes:
        start, end = end, end + size
        mask.append(any(start < e and end > s for s, e in spans))
    return ids, sizes, mask
