"""Where a token comparison's reference numbers come from: one small protocol, three sources.

A live model (its decoder runs once per batch, shared by every candidate), an exact reference
cache (its stored rows and output layer give the live numbers) and a compact top-k cache (KL is
only bounded) all answer the same two questions: which columns their per-token rows have, and
the rows of one batch for a list of candidates. :class:`~lmkl.engine.token_compare.TokenComparison`
asks its source and never branches on which one it holds; a new source (e.g. a remote
reference) is one more class here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import pyarrow as pa

from lmkl.engine.rundir import BOUNDS_SCHEMA, TOKEN_SCHEMA
from lmkl.models import LoadedModel
from lmkl.refcache.format import ReferenceCache
from lmkl.scoring.batches import Batch
from lmkl.scoring.fused import MetricsKernel
from lmkl.scoring.token_scoring import score_batch
from lmkl.scoring.topk import score_batch_topk

#: Per candidate label: its per-token arrays, and its worst positions.
Scored = tuple[dict[str, dict[str, np.ndarray]], dict[str, list[dict[str, Any]]]]


@dataclass
class BatchScoring:
    """How every batch of a comparison is scored (the same for every source)."""

    vocab_size: int
    chunk: int
    temperature: float
    worst_k: int
    kernel: MetricsKernel
    record_top5: bool = False


class ReferenceSource(Protocol):
    """A comparison's reference: what its rows hold, and one batch scored against it."""

    #: Columns of the per-token rows (top-k sources add KL bounds and leave KL null).
    schema: pa.Schema
    #: Whether KL is known exactly (False: only bounded, by ``kl_lower``/``kl_upper``).
    exact_kl: bool

    @property
    def description(self) -> dict[str, Any]:
        """The reference in results.json."""
        ...

    def score(self, batch: Batch, candidates: list[LoadedModel], how: BatchScoring) -> Scored:
        """Every candidate's per-token metrics on ``batch``, and its worst positions."""
        ...


class LiveReference:
    """A loaded reference model: its decoder runs once per batch for all candidates."""

    schema = TOKEN_SCHEMA
    exact_kl = True

    def __init__(self, model: LoadedModel | ReferenceCache) -> None:
        #: What :func:`score_batch` runs as the reference: a loaded model, or an exact cache
        #: (which holds the output layer its stored rows go through).
        self.model = model

    @property
    def description(self) -> dict[str, Any]:
        return self.model.description

    def _rows(self, batch: Batch, candidates: list[LoadedModel]) -> Any:
        """The reference's final hidden states when they are stored (None: run the model)."""
        return None

    def score(self, batch: Batch, candidates: list[LoadedModel], how: BatchScoring) -> Scored:
        return score_batch(
            batch,
            self.model,
            candidates,
            how.vocab_size,
            how.chunk,
            how.temperature,
            how.worst_k,
            kernel=how.kernel,
            reference_rows=self._rows(batch, candidates),
            record_top5=how.record_top5,
        )


class ExactCacheReference(LiveReference):
    """An exact reference cache: stored rows through the stored output layer (live numbers)."""

    def __init__(self, cache: ReferenceCache) -> None:
        super().__init__(cache)  # the cache stands in for the model: it has the output layer
        self.cache = cache

    @property
    def description(self) -> dict[str, Any]:
        return self.cache.description

    def _rows(self, batch: Batch, candidates: list[LoadedModel]) -> Any:
        # On the candidates' device: the output layer runs where their logits are.
        return self.cache.rows(batch.windows, candidates[0].device)


class TopKCacheReference:
    """A compact (top-k) reference cache: exact entropies and NLLs, KL as an interval."""

    schema = BOUNDS_SCHEMA
    exact_kl = False

    def __init__(self, cache: ReferenceCache) -> None:
        self.cache = cache

    @property
    def description(self) -> dict[str, Any]:
        return self.cache.description

    def score(self, batch: Batch, candidates: list[LoadedModel], how: BatchScoring) -> Scored:
        reference = self.cache.topk(batch.windows)
        per_candidate: dict[str, dict[str, np.ndarray]] = {}
        worst: dict[str, list[dict[str, Any]]] = {}
        for candidate in candidates:
            metrics, entries = score_batch_topk(
                batch,
                reference,
                candidate,
                how.vocab_size,
                how.chunk,
                how.temperature,
                how.worst_k,
            )
            per_candidate.update(metrics)
            worst.update(entries)
        return per_candidate, worst


def cache_reference(cache: ReferenceCache) -> ReferenceSource:
    """The source for an opened reference cache (exact or top-k, by its mode)."""
    return TopKCacheReference(cache) if cache.mode == "topk" else ExactCacheReference(cache)
