"""Resampling documents: the percentile bootstrap every CI of lmkl uses.

Tokens of one document are correlated, so documents (or, where the whole text is one stream,
its windows) are the independent draws. Per unit we keep the sum of a per-token value and the
number of tokens (:class:`DocSums`); a resample draws, within each stratum (dataset), as many
units as it has, with replacement, and the statistic is the ratio estimator Σ sums / Σ counts.
:mod:`lmkl.analysis.ranking` ranks candidates with it (paired, same resamples for all);
:func:`mean_ci` gives one series' CI, as every candidate's ``kl.ci_low``/``kl.ci_high`` in
results.json.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np

#: Resamples × documents drawn per block (bounds memory: ~8 bytes × this, a few times over).
_BLOCK_ELEMENTS = 1 << 22
#: Resamples of a CI unless the caller asks for others (the ranking's default too).
RESAMPLES = 1000


def bootstrap_unit(documents: int) -> str:
    """The per-token column whose ids are the bootstrap's independent draws: ``doc_id``, or
    ``window_id`` when the tokens come from fewer than two documents (one long document, or
    llama-cpp chunks of one text stream), where resampling documents would give a zero-width
    interval. Every CI of a run (its metrics, its ranking, an attribution's units) uses it."""
    return "window_id" if documents < 2 else "doc_id"


@dataclass
class DocSums:
    """Per-document sufficient statistics of one series of per-token values.

    ``sums`` holds the sum of the finite values; ``pos_inf``/``neg_inf`` count infinite ones;
    ``counts`` counts every included (non-NaN) token.
    """

    sums: np.ndarray
    counts: np.ndarray
    pos_inf: np.ndarray
    neg_inf: np.ndarray

    @classmethod
    def from_tokens(
        cls,
        values: np.ndarray,
        doc_index: np.ndarray,
        n_docs: int,
        include: np.ndarray | None = None,
    ) -> DocSums:
        """Sum ``values`` by document; NaN values (and those outside ``include``) are left out."""
        values = np.asarray(values, dtype=np.float64)
        keep = ~np.isnan(values)
        if include is not None:
            keep &= include
        finite = keep & np.isfinite(values)
        doc = np.asarray(doc_index)
        return cls(
            sums=np.bincount(doc[finite], weights=values[finite], minlength=n_docs),
            counts=np.bincount(doc[keep], minlength=n_docs).astype(np.float64),
            pos_inf=np.bincount(doc[keep & (values == np.inf)], minlength=n_docs).astype(float),
            neg_inf=np.bincount(doc[keep & (values == -np.inf)], minlength=n_docs).astype(float),
        )


class UnitSumsStream:
    """:class:`DocSums` built a chunk of tokens at a time, keyed by raw unit ids (document or
    window ids, non-negative); :meth:`result` keeps the units that occurred, in id order (the
    order ``np.unique`` gives the in-memory path)."""

    def __init__(self) -> None:
        self.sums = np.zeros(0)
        self.counts = np.zeros(0)
        self.pos_inf = np.zeros(0)
        self.neg_inf = np.zeros(0)
        self.seen = np.zeros(0, dtype=bool)

    def add(self, values: np.ndarray, units: np.ndarray, include: np.ndarray | None = None) -> None:
        """Add tokens' ``values`` (NaN and tokens outside ``include`` are left out) by unit."""
        units = np.asarray(units, dtype=np.int64)
        if not units.size:
            return
        top = int(units.max()) + 1
        if top > self.seen.size:
            grow = top - self.seen.size
            self.sums, self.counts, self.pos_inf, self.neg_inf = (
                np.concatenate([a, np.zeros(grow)])
                for a in (self.sums, self.counts, self.pos_inf, self.neg_inf)
            )
            self.seen = np.concatenate([self.seen, np.zeros(grow, dtype=bool)])
        self.seen[units] = True
        # A chunk covers a few consecutive units: count over their id range only, so each chunk
        # costs its own size, not the number of units seen so far.
        lo = int(units.min())
        part = DocSums.from_tokens(values, units - lo, top - lo, include)
        self.sums[lo:top] += part.sums
        self.counts[lo:top] += part.counts
        self.pos_inf[lo:top] += part.pos_inf
        self.neg_inf[lo:top] += part.neg_inf

    def result(self, present: np.ndarray | None = None) -> DocSums:
        """The sums of the units in ``present`` (a mask over ids; default: those seen)."""
        keep = self.seen if present is None else present
        size = keep.size

        def cut(a: np.ndarray) -> np.ndarray:
            return np.concatenate([a, np.zeros(max(0, size - a.size))])[:size][keep]

        return DocSums(cut(self.sums), cut(self.counts), cut(self.pos_inf), cut(self.neg_inf))


def ratio_of_sums(num: np.ndarray, den: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
    """num/den, turned into ±inf where infinite values were drawn (NaN where both signs were)."""
    with np.errstate(divide="ignore", invalid="ignore"):
        out = num / den
    out = np.where(pos > 0, np.inf, out)
    out = np.where(neg > 0, -np.inf, out)
    return np.where((pos > 0) & (neg > 0), np.nan, out)


@dataclass
class Bootstrap:
    """Resampling documents within strata (datasets), shared by every series for pairing.

    ``strata`` gives the number of documents per dataset; documents of dataset ``s`` are the
    contiguous index range after those of datasets ``0..s-1``. ``weights`` are the datasets'
    weights for the macro average.
    """

    strata: Sequence[int]
    weights: Sequence[float] | None = None
    resamples: int = 1000
    seed: int = 0
    average: str = "micro"
    offsets: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        self.offsets = np.concatenate([[0], np.cumsum(self.strata)]).astype(np.int64)
        if self.weights is None:
            self.weights = [1.0] * len(self.strata)

    @property
    def n_docs(self) -> int:
        return int(self.offsets[-1])

    def _draw_counts(self, rng: np.random.Generator, rows: int) -> np.ndarray:
        """``[rows, n_docs]``: how often each document is drawn in each of ``rows`` resamples."""
        n = self.n_docs
        u = rng.random((rows, n))
        idx = np.empty((rows, n), dtype=np.int64)
        for s, size in enumerate(self.strata):
            lo = self.offsets[s]
            idx[:, lo : lo + size] = lo + np.minimum(
                (u[:, lo : lo + size] * size).astype(np.int64), size - 1
            )
        flat = (idx + (np.arange(rows, dtype=np.int64) * n)[:, None]).ravel()
        return np.bincount(flat, minlength=rows * n).reshape(rows, n).astype(np.float64)

    def statistic(self, series: Sequence[DocSums], draws: np.ndarray | None = None) -> np.ndarray:
        """The statistic of each series under document weights ``draws`` (``[B, n]``; None: the
        full sample once). Returns ``[B, len(series)]``."""
        if draws is None:
            draws = np.ones((1, self.n_docs))
        s = np.stack([x.sums for x in series], 1)
        c = np.stack([x.counts for x in series], 1)
        p = np.stack([x.pos_inf for x in series], 1)
        m = np.stack([x.neg_inf for x in series], 1)
        if self.average == "micro":
            return ratio_of_sums(draws @ s, draws @ c, draws @ p, draws @ m)
        total = np.zeros((draws.shape[0], len(series)))
        weights = list(self.weights or [])
        for k, size in enumerate(self.strata):
            lo, hi = self.offsets[k], self.offsets[k] + size
            w = draws[:, lo:hi]
            part = ratio_of_sums(w @ s[lo:hi], w @ c[lo:hi], w @ p[lo:hi], w @ m[lo:hi])
            with np.errstate(invalid="ignore"):
                total = total + weights[k] * part
        return total / float(sum(weights))

    def run(self, series: Sequence[DocSums]) -> np.ndarray:
        """``[resamples, len(series)]`` resampled statistics (same resamples for every series)."""
        rng = np.random.default_rng(self.seed)
        block = max(1, min(self.resamples, _BLOCK_ELEMENTS // max(1, self.n_docs)))
        out = []
        done = 0
        while done < self.resamples:
            rows = min(block, self.resamples - done)
            out.append(self.statistic(series, self._draw_counts(rng, rows)))
            done += rows
        return np.concatenate(out, 0)


def quantile(values: np.ndarray, q: float) -> float:
    """Linear-interpolation quantile that ignores NaN and lets ±inf propagate."""
    ordered = np.sort(values[~np.isnan(values)])
    if ordered.size == 0:
        return math.nan
    h = (ordered.size - 1) * q
    lo, hi = math.floor(h), math.ceil(h)
    a, b, w = float(ordered[lo]), float(ordered[hi]), h - lo
    if w == 0 or a == b:
        return a
    if math.isinf(a) or math.isinf(b):
        if a == -math.inf and b == math.inf:
            return math.nan
        return a if math.isinf(a) else b
    return a + (b - a) * w


def interval(samples: np.ndarray, confidence: float) -> list[float]:
    """The percentile interval ``[lo, hi]`` of bootstrap ``samples``."""
    tail = (1.0 - confidence) / 2.0
    return [quantile(samples, tail), quantile(samples, 1.0 - tail)]


def flip_share(diffs: np.ndarray, observed: float) -> float:
    """Share of resamples whose difference has another sign than the observed difference."""
    diffs = diffs[~np.isnan(diffs)]
    if diffs.size == 0 or math.isnan(observed):
        return math.nan
    return float(np.mean(np.sign(diffs) != np.sign(observed)))


def mean_ci(
    sums: DocSums, *, resamples: int = RESAMPLES, seed: int = 0, confidence: float = 0.95
) -> list[float]:
    """The percentile-bootstrap CI ``[low, high]`` of Σ sums / Σ counts over units (one stratum),
    drawn exactly as :func:`lmkl.analysis.ranking.rank` draws them with the same ``seed``, so a
    candidate's CI here equals its leaderboard CI. NaN for fewer than two units."""
    if sums.counts.size < 2:
        return [math.nan, math.nan]
    boot = Bootstrap([int(sums.counts.size)], resamples=resamples, seed=seed)
    return interval(boot.run([sums])[:, 0], confidence)
