"""Summary statistics of per-token columns read a chunk (one run part) at a time, in bounded memory.

:func:`lmkl.analysis.stats.summarize` defines the ``metrics`` of results.json on arrays held in
memory; a 10M-token run would hold every part plus float64 copies. :class:`TokenSummary` gives
the same numbers from chunks, in two passes over the parts::

    summary = TokenSummary()
    for columns in chunks():          # pass 1: counts, moments, coarse histograms
        summary.add(columns)
    for columns in chunks():          # pass 2: the order statistics the quantiles need
        summary.add_second(columns)
    metrics = summary.result()

How close to :func:`~lmkl.analysis.stats.summarize`:

* **Quantiles are exact** (the same order statistics, interpolated the same way): the stored
  metrics are float32, and a float32 maps to a 32-bit key that sorts like the number, so
  :class:`ExactQuantiles` selects the ``k``-th smallest value by a histogram of the key's high
  16 bits (pass 1), then of the low 16 bits inside the one high bin that holds rank ``k``
  (pass 2). Memory: 512 KiB per quantile group and per selected bin, whatever the token count.
* **Means, standard errors, correlations** combine per-chunk float64 moments (Chan et al.'s
  pairwise update), so they agree with the in-memory numbers to float64 rounding: within
  1e-12 relative for the runs lmkl writes (the test suite checks 1e-10).
* Counts (tokens, documents, windows, infinite values) are exact.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import numpy as np

from lmkl.analysis.bootstrap import UnitSumsStream, bootstrap_unit, mean_ci
from lmkl.analysis.stats import (
    CI_BY_DOCUMENT,
    CI_BY_WINDOW,
    CONFIDENCE_BUCKETS,
    QUANTILES,
    confidence_bucket_index,
    interpolate_quantile,
    metrics_block,
)
from lmkl.metric_names import CALIBRATION_NAMES, DIVERGENCE_NAMES, TOKEN_METRIC_NAMES

_HALF = 16
_BINS = 1 << _HALF
_SIGN = np.uint32(0x80000000)


def sortable_keys(values: np.ndarray) -> np.ndarray:
    """uint32 keys of float32 ``values`` that sort as the numbers do (NaN last, as np.sort)."""
    v = np.asarray(values, dtype=np.float32)
    # One NaN pattern (np.sort puts every NaN last) and one zero (-0.0 == 0.0).
    v = np.where(np.isnan(v), np.float32(np.nan), v) + np.float32(0.0)
    bits = v.view(np.uint32)
    return np.where(bits & _SIGN, ~bits, bits | _SIGN)


def key_values(keys: np.ndarray) -> np.ndarray:
    """The float32 numbers of :func:`sortable_keys` keys."""
    keys = np.asarray(keys, dtype=np.uint32)
    bits = np.where(keys & _SIGN, keys ^ _SIGN, ~keys)
    return bits.astype(np.uint32).view(np.float32)


class ExactQuantiles:
    """Exact linear-interpolation quantiles of float32 values in ``groups`` independent groups,
    from two passes over the values (see the module docstring)."""

    def __init__(self, groups: int = 1) -> None:
        self.groups = groups
        self.high = np.zeros(groups * _BINS, dtype=np.int64)
        self._targets: dict[tuple[int, int], int] | None = None
        self._target_of: np.ndarray | None = None
        self.low: np.ndarray | None = None

    def _index(self, keys: np.ndarray, group: np.ndarray | None) -> np.ndarray:
        high = (keys >> _HALF).astype(np.int64)
        return high if group is None else high + np.asarray(group, dtype=np.int64) * _BINS

    def add(self, values: np.ndarray, group: np.ndarray | None = None) -> None:
        """Pass 1: count ``values`` (of group ``group[i]``, or group 0) by their high key bits."""
        if np.size(values):
            index = self._index(sortable_keys(values), group)
            self.high += np.bincount(index, minlength=self.high.size)

    def counts(self) -> np.ndarray:
        """Values per group."""
        return self.high.reshape(self.groups, _BINS).sum(axis=1)

    def _ranks(self, group: int, probs: Iterable[float]) -> list[int]:
        n = int(self.counts()[group])
        out = []
        for prob in probs:
            h = (n - 1) * prob
            out += [math.floor(h), math.ceil(h)]
        return out

    def plan(self, probs: Iterable[float]) -> None:
        """After pass 1: choose the high bins that hold the order statistics of ``probs``."""
        probs = list(probs)
        cumulative = np.cumsum(self.high.reshape(self.groups, _BINS), axis=1)
        self._targets = {}
        self._rank_at: dict[tuple[int, int], tuple[int, int]] = {}
        for g in range(self.groups):
            if cumulative[g, -1] == 0:
                continue
            for rank in self._ranks(g, probs):
                b = int(np.searchsorted(cumulative[g], rank, side="right"))
                before = int(cumulative[g, b - 1]) if b else 0
                self._targets.setdefault((g, b), len(self._targets))
                self._rank_at[(g, rank)] = (b, rank - before)
        self._target_of = np.full(self.groups * _BINS, -1, dtype=np.int64)
        for (g, b), t in self._targets.items():
            self._target_of[g * _BINS + b] = t
        self.low = np.zeros(len(self._targets) * _BINS, dtype=np.int64)
        self._probs = probs

    def add_second(self, values: np.ndarray, group: np.ndarray | None = None) -> None:
        """Pass 2: the same values again; only those in the planned bins are counted."""
        assert self._target_of is not None and self.low is not None, "call plan() first"
        if not np.size(values) or not self._targets:
            return
        keys = sortable_keys(values)
        target = self._target_of[self._index(keys, group)]
        hit = target >= 0
        if hit.any():
            low = (keys[hit] & np.uint32(_BINS - 1)).astype(np.int64)
            self.low += np.bincount(target[hit] * _BINS + low, minlength=self.low.size)

    def _order_statistic(self, group: int, rank: int) -> float:
        assert self.low is not None and self._targets is not None
        b, within = self._rank_at[(group, rank)]
        t = self._targets[(group, b)]
        cumulative = np.cumsum(self.low[t * _BINS : (t + 1) * _BINS])
        low = int(np.searchsorted(cumulative, within, side="right"))
        return float(key_values(np.asarray([(b << _HALF) | low]))[0])

    def result(self, group: int = 0) -> list[float]:
        """The quantiles of the planned ``probs`` for ``group`` (NaN for an empty group)."""
        if self._targets is None:
            self.plan([])
        if self.counts()[group] == 0:
            return [math.nan] * len(self._probs)
        out = []
        ranks = self._ranks(group, self._probs)
        n = int(self.counts()[group])
        for i, prob in enumerate(self._probs):
            h = (n - 1) * prob
            lo, hi = ranks[2 * i], ranks[2 * i + 1]
            a, b = self._order_statistic(group, lo), self._order_statistic(group, hi)
            out.append(interpolate_quantile(a, b, h - lo))
        return out


class Moments:
    """Count, mean, variance (finite values), infinities, NaNs, extremes and sums of a float64
    stream, combined chunk by chunk (Chan et al.); the same conventions as
    :func:`lmkl.analysis.stats.mean_se` and :func:`~lmkl.analysis.stats.distribution`."""

    def __init__(self) -> None:
        self.n = self.nan = self.pos_inf = self.neg_inf = 0
        self.n_finite, self.mean_finite, self.m2 = 0, 0.0, 0.0
        self.total = 0.0  # plain sum of every value (inf/NaN propagate as in NumPy)
        self.total_sq = 0.0
        self.max, self.min = -math.inf, math.inf

    def add(self, values: np.ndarray) -> None:
        v = np.asarray(values, dtype=np.float64)
        if not v.size:
            return
        self.n += v.size
        nan = np.isnan(v)
        self.nan += int(nan.sum())
        self.pos_inf += int((v == np.inf).sum())
        self.neg_inf += int((v == -np.inf).sum())
        with np.errstate(invalid="ignore", over="ignore"):
            self.total += float(v.sum())
            self.total_sq += float((v * v).sum())
        if not nan.all():
            self.max = max(self.max, float(v[~nan].max()))
            self.min = min(self.min, float(v[~nan].min()))
        finite = v[np.isfinite(v)]
        if finite.size:
            mean = float(finite.mean())
            m2 = float(((finite - mean) ** 2).sum())
            n_a, n_b = self.n_finite, finite.size
            n = n_a + n_b
            delta = mean - self.mean_finite
            self.mean_finite += delta * n_b / n
            self.m2 += m2 + delta * delta * n_a * n_b / n
            self.n_finite = n

    @property
    def infinite(self) -> int:
        return self.pos_inf + self.neg_inf

    def mean(self) -> float:
        if self.n == 0 or self.nan or (self.pos_inf and self.neg_inf):
            return math.nan
        if self.infinite:
            return math.inf if self.pos_inf else -math.inf
        return self.mean_finite

    def mean_se(self) -> tuple[float, float]:
        if self.n == 0:
            return math.nan, math.nan
        if self.infinite:
            return self.mean(), math.inf
        if self.nan or self.n < 2:
            return self.mean(), math.nan
        return self.mean(), math.sqrt(self.m2 / (self.n - 1)) / math.sqrt(self.n)

    def finite_mean(self) -> float:
        """Mean of the values that are not ±inf (NaN if any value is NaN)."""
        if self.nan or self.n_finite == 0:
            return math.nan
        return self.mean_finite

    def extreme(self, which: str) -> float:
        if self.n == 0 or self.nan:
            return math.nan
        return self.max if which == "max" else self.min

    def sum(self) -> float:
        return self.total

    def rms(self) -> float:
        return math.sqrt(self.total_sq / self.n) if self.n else math.nan


class Comoments:
    """Pearson correlation of pairs finite in both, combined chunk by chunk."""

    def __init__(self) -> None:
        self.n, self.mx, self.my, self.sxx, self.syy, self.sxy = 0, 0.0, 0.0, 0.0, 0.0, 0.0

    def add(self, a: np.ndarray, b: np.ndarray) -> None:
        keep = np.isfinite(a) & np.isfinite(b)
        x, y = np.asarray(a, np.float64)[keep], np.asarray(b, np.float64)[keep]
        if not x.size:
            return
        mx, my = float(x.mean()), float(y.mean())
        dx_, dy_ = x - mx, y - my
        sxx, syy, sxy = float(dx_ @ dx_), float(dy_ @ dy_), float(dx_ @ dy_)
        n_a, n_b = self.n, x.size
        n = n_a + n_b
        dx, dy = mx - self.mx, my - self.my
        self.mx += dx * n_b / n
        self.my += dy * n_b / n
        self.sxx += sxx + dx * dx * n_a * n_b / n
        self.syy += syy + dy * dy * n_a * n_b / n
        self.sxy += sxy + dx * dy * n_a * n_b / n
        self.n = n

    def correlation(self) -> float:
        if self.n < 2 or self.sxx == 0 or self.syy == 0:
            return math.nan
        return float(np.clip(self.sxy / math.sqrt(self.sxx * self.syy), -1.0, 1.0))


class IdSet:
    """Which non-negative integer ids (documents, windows) occurred: one byte per id."""

    def __init__(self) -> None:
        self.seen = np.zeros(0, dtype=bool)

    def add(self, ids: np.ndarray) -> None:
        ids = np.asarray(ids, dtype=np.int64)
        if not ids.size:
            return
        top = int(ids.max()) + 1
        if top > self.seen.size:
            self.seen = np.concatenate([self.seen, np.zeros(top - self.seen.size, dtype=bool)])
        self.seen[ids] = True

    def __len__(self) -> int:
        return int(self.seen.sum())


class DistributionStream:
    """:func:`lmkl.analysis.stats.distribution` of a float32 column, streamed."""

    def __init__(self) -> None:
        self.moments = Moments()
        self.quantiles = ExactQuantiles()

    def add(self, values: np.ndarray) -> None:
        self.moments.add(values)
        self.quantiles.add(values)

    def plan(self) -> None:
        self.quantiles.plan(QUANTILES.values())

    def add_second(self, values: np.ndarray) -> None:
        self.quantiles.add_second(values)

    def result(self) -> dict[str, Any]:
        m = self.moments
        mean, se = m.mean_se()
        out: dict[str, Any] = {"mean": mean, "se": se}
        out.update(zip(QUANTILES, self.quantiles.result(), strict=True))
        out["max"], out["min"] = m.extreme("max"), m.extreme("min")
        out["infinite"] = m.infinite
        if m.infinite:
            out["mean_finite"] = m.finite_mean()
        return out


#: Columns whose distribution (quantiles included) results.json reports.
DISTRIBUTIONS = DIVERGENCE_NAMES
#: Columns reported by mean (and standard error) only.
MEANS = tuple(
    name for name in TOKEN_METRIC_NAMES if name not in (*DIVERGENCE_NAMES, *CALIBRATION_NAMES)
)


class TokenSummary:
    """:func:`lmkl.analysis.stats.summarize`, fed a chunk of per-token columns at a time (see
    the module docstring); ``extra`` names more float32 columns to summarize by distribution
    (e.g. a top-k cache's ``kl_lower``/``kl_upper``), read back with :meth:`distribution`."""

    def __init__(self, extra: Iterable[str] = (), seed: int = 0) -> None:
        self.extra = tuple(extra)
        self.seed = seed
        # Per-document (and per-window) KL sums: the bootstrap CI of the mean KL.
        self.kl_by_doc, self.kl_by_window = UnitSumsStream(), UnitSumsStream()
        self.dists = {name: DistributionStream() for name in (*DISTRIBUTIONS, *self.extra)}
        self.means = {name: Moments() for name in MEANS}
        self.ln_ratio = Moments()
        self.both_zero = 0
        self.correlation = Comoments()
        self.bytes = 0.0
        self.bucket_kl = [Moments() for _ in CONFIDENCE_BUCKETS]
        self.bucket_median = ExactQuantiles(len(CONFIDENCE_BUCKETS))
        self.docs, self.windows = IdSet(), IdSet()
        self.rows = self.nonfinite = 0
        self._planned = False

    @staticmethod
    def _kept(columns: Mapping[str, np.ndarray]) -> tuple[np.ndarray, Callable[..., np.ndarray]]:
        keep = ~np.asarray(columns["nonfinite"], dtype=bool)

        def col(name: str, dtype: Any = np.float64) -> np.ndarray:
            return np.asarray(columns[name], dtype=dtype)[keep]

        return keep, col

    def add(self, columns: Mapping[str, np.ndarray]) -> None:
        """Pass 1 over one chunk (the columns of :func:`~lmkl.analysis.stats.summarize`)."""
        assert not self._planned, "add() after add_second()"
        keep, col = self._kept(columns)
        self.rows += keep.size
        self.nonfinite += int((~keep).sum())
        for name, dist in self.dists.items():
            dist.add(col(name, np.float32))
        for name, moments in self.means.items():
            moments.add(col(name))
        nll_p, nll_q = col("nll_reference"), col("nll_candidate")
        both_zero = np.isposinf(nll_p) & np.isposinf(nll_q)
        self.both_zero += int(both_zero.sum())
        self.ln_ratio.add(nll_q[~both_zero] - nll_p[~both_zero])
        self.correlation.add(nll_p, nll_q)
        self.bytes += float(col("bytes").sum())
        kl = col("kl", np.float32)
        bucket = confidence_bucket_index(col("reference_top1_prob"))
        for i, moments in enumerate(self.bucket_kl):
            moments.add(kl[bucket == i])
        self.bucket_median.add(kl, bucket)
        self.docs.add(np.asarray(columns["doc_id"]))
        self.windows.add(np.asarray(columns["window_id"]))
        # Every position, NaN where the logits were not finite: the units match the ranking's.
        all_kl = np.where(keep, np.asarray(columns["kl"], dtype=np.float64), np.nan)
        self.kl_by_doc.add(all_kl, np.asarray(columns["doc_id"]))
        self.kl_by_window.add(all_kl, np.asarray(columns["window_id"]))

    def _plan(self) -> None:
        if not self._planned:
            for dist in self.dists.values():
                dist.plan()
            self.bucket_median.plan([0.5])
            self._planned = True

    def add_second(self, columns: Mapping[str, np.ndarray]) -> None:
        """Pass 2 over the same chunks, in any order (quantiles' order statistics)."""
        self._plan()
        _, col = self._kept(columns)
        for name, dist in self.dists.items():
            dist.add_second(col(name, np.float32))
        kl = col("kl", np.float32)
        self.bucket_median.add_second(kl, confidence_bucket_index(col("reference_top1_prob")))

    def distribution(self, name: str) -> dict[str, Any]:
        """The distribution of column ``name`` (one of :data:`DISTRIBUTIONS` or ``extra``)."""
        return self.dists[name].result()

    def result(self) -> dict[str, Any]:
        """The ``metrics`` object (after both passes; an empty stream needs no second pass)."""
        self._plan()
        kl_count = self.rows - self.nonfinite
        buckets = []
        for i, (lo, hi) in enumerate(CONFIDENCE_BUCKETS):
            mean, se = self.bucket_kl[i].mean_se()
            n = self.bucket_kl[i].n
            buckets.append(
                {
                    "bucket": f"[{lo:.2f}, {hi:.2f}{']' if hi == 1.0 else ')'}",
                    "low": lo,
                    "high": hi,
                    "tokens": n,
                    "share": float(n / max(kl_count, 1)),
                    "kl_mean": mean,
                    "kl_se": se,
                    "kl_median": self.bucket_median.result(i)[0],
                }
            )
        nll_p, nll_q = self.means["nll_reference"], self.means["nll_candidate"]
        ln_mean, ln_se = self.ln_ratio.mean_se()
        dp_mean, dp_se = self.means["delta_p"].mean_se()
        return metrics_block(
            distributions={name: self.distribution(name) for name in DISTRIBUTIONS},
            entropy=(
                self.means["entropy_reference"].mean(),
                self.means["entropy_candidate"].mean(),
            ),
            nll=(nll_p.mean(), nll_q.mean()),
            nll_sums=(nll_p.sum(), nll_q.sum()) if nll_p.n else None,
            ln_ratio=(ln_mean, ln_se, self.both_zero),
            nll_correlation=self.correlation.correlation(),
            total_bytes=self.bytes,
            delta_p=(dp_mean, dp_se, self.means["delta_p"].rms()),
            top1_agreement=self.means["top1_agree"].mean_se(),
            top1_in_top5=self.means["top1_in_top5"].mean_se(),
            buckets=buckets,
            counts={
                "documents": len(self.docs),
                "windows": len(self.windows),
                "tokens": kl_count,
                "nonfinite": self.nonfinite,
                "nonfinite_share": float(self.nonfinite / self.rows) if self.rows else 0.0,
                "infinite": self.dists["kl"].moments.infinite,
            },
            kl_ci=self._kl_ci(),
        )

    def _kl_ci(self) -> tuple[float, float, str]:
        """:func:`lmkl.analysis.stats.kl_ci` from the streamed per-unit sums."""
        by_window = bootstrap_unit(len(self.docs)) == "window_id"
        stream = self.kl_by_window if by_window else self.kl_by_doc
        low, high = mean_ci(stream.result(), seed=self.seed)
        return low, high, CI_BY_WINDOW if by_window else CI_BY_DOCUMENT


def summarize_chunks(
    chunks: Callable[[], Iterable[Mapping[str, np.ndarray]]],
    extra: Iterable[str] = (),
    seed: int = 0,
) -> TokenSummary:
    """Run both passes of a :class:`TokenSummary` over ``chunks()`` (called twice)."""
    summary = TokenSummary(extra, seed)
    for columns in chunks():
        summary.add(columns)
    for columns in chunks():
        summary.add_second(columns)
    return summary
