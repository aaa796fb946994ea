"""Windows grouped into padded batches, and each batch's scored positions.

Batching is deterministic (fixed order, or length-sorted with ``max_batch_tokens``), so every
process of a multi-process run, every resumed run and every reference cache sees the same
batches and can address a part by its batch index.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from lmkl.data.windows import Window, scored_positions


class DecoderModel(Protocol):
    """What batching needs of a model: its device and its final hidden states."""

    device: torch.device

    def hidden_states(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor: ...


@dataclass
class Batch:
    """Right-padded model inputs for a group of windows, and where their targets are."""

    windows: list[Window]
    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    #: flat (row, column) of the logits that predict each target, in window order
    rows: torch.Tensor
    cols: torch.Tensor
    targets: torch.Tensor
    #: per target: window id, doc id, position in document/stream, position in window, bytes
    meta: dict[str, np.ndarray] = field(default_factory=dict)


def window_groups(
    windows: list[Window], batch_size: int, max_batch_tokens: int | None = None
) -> Iterator[list[Window]]:
    """The windows of each batch, in batch order.

    Without ``max_batch_tokens``: ``batch_size`` consecutive windows per batch. With it: windows
    sorted by length (longest first, ties by window order) and each batch filled while
    ``windows x longest length <= max_batch_tokens`` (at least one window), which keeps padding
    small when lengths vary. Deterministic, so every process of a multi-process run and every
    resumed run sees the same batches.
    """
    if max_batch_tokens is None:
        for start in range(0, len(windows), batch_size):
            yield windows[start : start + batch_size]
        return
    ordered = sorted(windows, key=lambda w: -len(w.input_ids))
    group: list[Window] = []
    for window in ordered:
        width = len(group[0].input_ids) if group else len(window.input_ids)
        if group and (len(group) + 1) * width > max_batch_tokens:
            yield group
            group = []
        group.append(window)
    if group:
        yield group


def make_batch(group: list[Window], pad_id: int) -> Batch:
    """Right-pad a group of windows into one batch and index its scored positions.

    Right padding keeps every real token's position id and causal context unchanged. A window's
    last token is never fed: its logits would predict past the window, and only the logits at
    ``j - 1`` for scored targets ``j`` are used (so a target id the model cannot embed, e.g. a
    tokenizer larger than the model, is never an input unless it is context).
    """
    width = max(len(w.input_ids) - 1 for w in group)
    ids = torch.full((len(group), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(group), width), dtype=torch.long)
    rows, cols, targets = [], [], []
    meta: dict[str, list[Any]] = {
        k: [] for k in ("window_id", "doc_id", "position", "window_pos", "bytes")
    }
    for r, window in enumerate(group):
        n = len(window.input_ids) - 1
        ids[r, :n] = torch.tensor(window.input_ids[:n], dtype=torch.long)
        mask[r, :n] = 1
        js = scored_positions(window)
        target_bytes = [window.target_bytes[j - window.first_target] for j in js]
        rows.extend([r] * len(js))
        cols.extend(j - 1 for j in js)
        targets.extend(window.input_ids[j] for j in js)
        meta["window_id"].extend([window.window_id] * len(js))
        meta["doc_id"].extend([window.doc_id] * len(js))
        meta["position"].extend(window.offset + j for j in js)
        meta["window_pos"].extend(js)
        meta["bytes"].extend(target_bytes)
    return Batch(
        windows=group,
        input_ids=ids,
        attention_mask=mask,
        rows=torch.tensor(rows, dtype=torch.long),
        cols=torch.tensor(cols, dtype=torch.long),
        targets=torch.tensor(targets, dtype=torch.long),
        meta={k: np.asarray(v, dtype=np.int64) for k, v in meta.items()},
    )


def make_batches(
    windows: list[Window], batch_size: int, pad_id: int, *, max_batch_tokens: int | None = None
) -> Iterator[Batch]:
    """The batches of :func:`window_groups`, each made by :func:`make_batch`."""
    for group in window_groups(windows, batch_size, max_batch_tokens):
        yield make_batch(group, pad_id)


def model_rows(model: DecoderModel, batch: Batch) -> torch.Tensor:
    """``[targets, H]`` final hidden states (or logits rows) of ``model`` at the scored positions.

    The decoder runs once on the padded batch; padding and unscored positions are dropped before
    the output layer, which is applied later a chunk at a time.
    """
    device = model.device
    hidden = model.hidden_states(batch.input_ids.to(device), batch.attention_mask.to(device))
    return hidden[batch.rows.to(hidden.device), batch.cols.to(hidden.device)]
