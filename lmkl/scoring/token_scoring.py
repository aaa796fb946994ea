"""Score one batch: every candidate against the reference, a chunk of logits at a time.

The reference's rows (final hidden states, from a live model or an exact cache) are turned into
logits once per chunk and compared with each candidate's by the fused metrics kernel, so the KL
stage holds at most ``chunk x vocab`` float32 values per model. The highest-KL positions of each
candidate are kept with both models' top-5 next tokens for reports.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import torch

from lmkl.scoring.batches import Batch, DecoderModel, model_rows
from lmkl.scoring.divergence import outside_vocabulary, zero_probability_targets
from lmkl.scoring.fused import MetricsKernel, temporaries_per_token
from lmkl.specs import ComputeSpec

LogCallback = Callable[[str], None]


class RowModel(Protocol):
    """What scoring needs of a reference: rows to logits (a loaded model or an exact cache)."""

    def logits(self, rows: torch.Tensor) -> torch.Tensor: ...


class ScoredModel(DecoderModel, RowModel, Protocol):
    """A candidate: a decoder (hidden states at the scored positions) and its output layer."""

    label: str


@dataclass
class _Top:
    values: torch.Tensor
    indices: torch.Tensor


def _top5(logits: torch.Tensor, temperature: float, lse: torch.Tensor | None = None) -> _Top:
    """The five most likely tokens and their log-probabilities (no full log-softmax).

    ``lse``: the rows' log-normalisers when already known (the fused kernel returns them).
    """
    top = logits.float().topk(min(5, logits.shape[-1]), -1)
    values = top.values / temperature
    if lse is None:
        lse = (logits.float() / temperature).logsumexp(-1)
    return _Top(values=values - lse[:, None], indices=top.indices)


def _pairs(ids: torch.Tensor, logprobs: torch.Tensor) -> list[tuple[int, float]]:
    return list(zip(ids.tolist(), logprobs.exp().tolist(), strict=True))


class WorstTracker:
    """Keeps the ``k`` highest-KL positions of one batch with both models' top-5 next tokens."""

    def __init__(self, k: int) -> None:
        self.k = k
        self.entries: list[tuple[float, int, dict[str, Any]]] = []
        self._counter = 0

    def _contenders(self, values: torch.Tensor) -> tuple[list[float], torch.Tensor] | None:
        """The rows of ``values`` that can enter the kept set (NaN never does)."""
        if self.k == 0:
            return None
        # NaN rows never enter; +inf (a token Q rules out) stays +inf, the worst of all.
        finite = torch.nan_to_num(values, nan=-1.0, posinf=math.inf)
        top, idx = finite.topk(min(self.k, values.numel()))
        keep = top >= 0
        if len(self.entries) >= self.k:
            # Only rows that beat the current k-th worst can enter: skip the rest's top-5.
            keep &= top > self.entries[0][0]
        top, idx = top[keep], idx[keep]
        return (top.tolist(), idx) if idx.numel() else None

    def _push(self, value: float, entry: dict[str, Any]) -> None:
        self._counter += 1
        item = (value, -self._counter, entry)
        if len(self.entries) < self.k:
            heapq.heappush(self.entries, item)
        elif item > self.entries[0]:
            heapq.heapreplace(self.entries, item)

    def offer(
        self,
        kl: torch.Tensor,
        ref_logits: torch.Tensor,
        cand_logits: torch.Tensor,
        index_offset: int,
        temperature: float,
        lse: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> None:
        """Offer a chunk's rows ranked by their exact KL (``lse``: known log-normalisers)."""
        found = self._contenders(kl)
        if found is None:
            return
        values, idx = found
        p_top = _top5(ref_logits[idx], temperature, None if lse is None else lse[0][idx])
        q_top = _top5(cand_logits[idx], temperature, None if lse is None else lse[1][idx])
        for n, (value, i) in enumerate(zip(values, idx.tolist(), strict=True)):
            self._push(
                value,
                {
                    "row": index_offset + i,
                    "kl": value,
                    "reference_top5": _pairs(p_top.indices[n], p_top.values[n]),
                    "candidate_top5": _pairs(q_top.indices[n], q_top.values[n]),
                },
            )

    def offer_topk(
        self,
        kl_lower: torch.Tensor,
        kl_upper: torch.Tensor,
        ref_ids: torch.Tensor,
        ref_logprobs: torch.Tensor,
        cand_logprobs: torch.Tensor,
        index_offset: int,
    ) -> None:
        """Offer rows of a compact-reference comparison, ranked by their KL lower bound."""
        found = self._contenders(kl_lower)
        if found is None:
            return
        values, idx = found
        q_top = cand_logprobs[idx.to(cand_logprobs.device)].topk(
            min(5, cand_logprobs.shape[-1]), -1
        )
        for n, (value, i) in enumerate(zip(values, idx.tolist(), strict=True)):
            self._push(
                value,
                {
                    "row": index_offset + i,
                    "kl": value,
                    "kl_upper": float(kl_upper[i]),
                    "reference_top5": _pairs(ref_ids[i, :5], ref_logprobs[i, :5]),
                    "candidate_top5": _pairs(q_top.indices[n], q_top.values[n]),
                },
            )

    def result(self) -> list[dict[str, Any]]:
        return [e for _, _, e in sorted(self.entries, key=lambda t: (-t[0], -t[1]))]


@torch.inference_mode()
def score_batch(
    batch: Batch,
    reference: RowModel,
    candidates: list[ScoredModel],
    vocab_size: int,
    chunk_size: int,
    temperature: float,
    worst_k: int,
    *,
    kernel: MetricsKernel | None = None,
    reference_rows: torch.Tensor | None = None,
    record_top5: bool = False,
) -> tuple[dict[str, dict[str, np.ndarray]], dict[str, list[dict[str, Any]]]]:
    """Per-token metrics for every candidate on one batch, and each candidate's worst positions.

    Every decoder runs once; then, per chunk of tokens, the reference's logits are computed once
    and compared with each candidate's by ``kernel`` (the fused metrics; eager if not given).
    ``reference_rows`` supplies the reference's rows directly (a reference cache); then
    ``reference`` only needs ``logits(rows)``. Targets outside the compared vocabulary get
    probability 0 under both models (see :func:`~lmkl.scoring.divergence.outside_vocabulary`).
    ``record_top5`` adds both models' five most likely next tokens for every token to each
    candidate's arrays (``reference_top5_ids``/``_probs``, ``candidate_top5_ids``/``_probs``,
    ``[tokens, 5]``), for the report's token view.
    """
    kernel = kernel or MetricsKernel(compile=False)
    if reference_rows is None:
        reference_rows = model_rows(reference, batch)  # type: ignore[arg-type]
    ref_rows = reference_rows
    cand_rows = [model_rows(candidate, batch) for candidate in candidates]
    targets, outside = outside_vocabulary(batch.targets, vocab_size)
    trackers = [WorstTracker(worst_k) for _ in candidates]
    chunks: list[list[dict[str, torch.Tensor]]] = [[] for _ in candidates]
    for start in range(0, targets.numel(), chunk_size):
        stop = start + chunk_size
        # Full-width rows: the kernel slices padded heads to vocab_size without a copy.
        ref_logits = overflow_as_nan(reference.logits(ref_rows[start:stop]))
        chunk_targets = targets[start:stop].to(ref_logits.device)
        # The reference's top-5 is the same for every candidate: computed once per chunk.
        ref_top = _top5(ref_logits[..., :vocab_size], temperature) if record_top5 else None
        for i, candidate in enumerate(candidates):
            cand_logits = overflow_as_nan(candidate.logits(cand_rows[i][start:stop]))
            cand_logits = cand_logits.to(ref_logits.device)
            metrics = kernel(
                ref_logits,
                cand_logits,
                chunk_targets,
                temperature=temperature,
                vocab_size=vocab_size,
            )
            lse = (
                (metrics["lse_reference"], metrics["lse_candidate"])
                if ("lse_reference" in metrics)
                else None
            )
            trackers[i].offer(
                metrics["kl"],
                ref_logits[..., :vocab_size],
                cand_logits[..., :vocab_size],
                start,
                temperature,
                lse=lse,
            )
            chunk_metrics = {k: v.cpu() for k, v in metrics.items() if not k.startswith("lse_")}
            zero_probability_targets(chunk_metrics, outside[start:stop])
            if ref_top is not None:
                cand_top = _top5(
                    cand_logits[..., :vocab_size], temperature, None if lse is None else lse[1]
                )
                chunk_metrics |= {
                    "reference_top5_ids": ref_top.indices.cpu().int(),
                    "reference_top5_probs": ref_top.values.exp().cpu(),
                    "candidate_top5_ids": cand_top.indices.cpu().int(),
                    "candidate_top5_probs": cand_top.values.exp().cpu(),
                }
            chunks[i].append(chunk_metrics)
            del cand_logits
        del ref_logits
    per_candidate: dict[str, dict[str, np.ndarray]] = {}
    worst: dict[str, list[dict[str, Any]]] = {}
    for i, candidate in enumerate(candidates):
        per_candidate[candidate.label] = {
            name: torch.cat([c[name] for c in chunks[i]]).numpy() for name in chunks[i][0]
        }
        worst[candidate.label] = trackers[i].result()
    return per_candidate, worst


def overflow_as_nan(logits: torch.Tensor) -> torch.Tensor:
    """In float16, an infinite logit means overflow (its range ends at 65504), not a mask.

    Such rows are made NaN so that token_metrics counts them as non-finite and every statistic
    excludes them; in wider dtypes a ``-inf`` logit is a deliberate mask and is kept.
    """
    if logits.dtype != torch.float16:
        return logits
    overflow = ~torch.isfinite(logits).all(-1)
    if not bool(overflow.any()):
        return logits
    return torch.where(overflow[:, None], torch.full_like(logits, float("nan")), logits)


def make_kernel(
    compute: ComputeSpec,
    vocab_size: int,
    tokens: int,
    log: LogCallback,
    device: torch.device | str | None = None,
) -> tuple[MetricsKernel, int]:
    """The metrics kernel for a run and its chunk size (tokens per KL chunk).

    Chunks are sized for the path that will run (the native and compiled kernels need fewer
    temporaries; ``device``: where the logits will be, if known);
    an eager fallback splits them further so the memory budget holds either way.
    """
    kernel = MetricsKernel(
        compile=compute.compile,
        expected_elements=tokens * vocab_size,
        vocab_size=vocab_size,
        log=log,
        device=device,
    )
    chunk = compute.chunk_size(vocab_size, temporaries_per_token(kernel.backend))
    if kernel.backend != "eager" and not compute.chunk_tokens:
        kernel.eager_rows = compute.chunk_size(vocab_size, temporaries_per_token("eager"))
    return kernel, chunk
