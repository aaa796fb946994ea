"""Rank candidates against one reference, with uncertainty that respects documents.

Everything here is NumPy on per-token arrays already aligned across candidates (same tokens, same
order). The statistics, all documented in README ("YAML experiments → ranking statistics"):

**Point estimate.** The ranking metric is a per-token mean (mean KL by default). Over several
datasets it is either *micro* (all tokens pooled) or *macro* (each dataset's mean, averaged with
the datasets' weights).

**Bootstrap over documents.** Tokens of one document are correlated, so documents, not tokens,
are resampled. Per document we keep the sum of the metric and the number of tokens; a resample
draws, *within each dataset*, as many documents as it has, with replacement, and the statistic is
the ratio estimator Σ sums / Σ counts (micro) or the weighted mean of those ratios per dataset
(macro). The CI is the percentile interval of the resampled statistics. Draws are reproducible:
``rng = numpy.random.default_rng(seed)``; resample ``b`` takes ``u = rng.random(n_documents)``
and, for the dataset holding documents ``[o, o + n)``, picks documents ``o + floor(u[o:o+n]·n)``.

**Paired comparison.** Two candidates are compared on the same resamples and on identical
tokens (those finite for both): the difference of their statistics has a paired-bootstrap CI,
and ``flip_share`` is the share of resamples in which the difference has a different sign from
the observed one, i.e. in which the order of the two would change.

**Size and Pareto set.** A candidate is Pareto-optimal when no other candidate is at most as
large and at least as good, and strictly better in one of the two.

Non-finite values: tokens whose logits were not finite are excluded (NaN here). ``+inf`` (the
candidate gives zero probability where the reference does not) makes any resample that contains
such a document ``+inf``; it is never dropped.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmkl.analysis.metrics import lookup, rank_metrics

#: Sizes a candidate can be placed by on the Pareto front: parameter count, bytes of the weight
#: files, parameters × dtype bytes (a quantized model: its bytes as loaded), real bytes of the
#: weights as stored (quantized values at their bit width), and bits per weight
#: (8 · weight_bytes / weights).
SIZE_KEYS = ("parameters", "disk_bytes", "memory_bytes", "weight_bytes", "bits_per_weight")

#: Resamples × documents drawn per block (bounds memory: ~8 bytes × this, a few times over).
_BLOCK_ELEMENTS = 1 << 22


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


def _ratio(num: np.ndarray, den: np.ndarray, pos: np.ndarray, neg: np.ndarray) -> np.ndarray:
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
            return _ratio(draws @ s, draws @ c, draws @ p, draws @ m)
        total = np.zeros((draws.shape[0], len(series)))
        weights = list(self.weights or [])
        for k, size in enumerate(self.strata):
            lo, hi = self.offsets[k], self.offsets[k] + size
            w = draws[:, lo:hi]
            part = _ratio(w @ s[lo:hi], w @ c[lo:hi], w @ p[lo:hi], w @ m[lo:hi])
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


def pareto_front(
    sizes: Sequence[float | None], scores: Sequence[float], higher_is_better: bool
) -> list[bool | None]:
    """Per item: True if no other item is at most as large and at least as good with one of
    the two strict; None where the size (or score) is unknown."""
    out: list[bool | None] = []
    sign = -1.0 if higher_is_better else 1.0
    for i, (size_i, score_i) in enumerate(zip(sizes, scores, strict=True)):
        if not _known(size_i, score_i):
            out.append(None)
            continue
        dominated = False
        for j, (size_j, score_j) in enumerate(zip(sizes, scores, strict=True)):
            if j == i or not _known(size_j, score_j):
                continue
            a, b = sign * score_i, sign * score_j  # lower is better after the sign
            if size_j <= size_i and b <= a and (size_j < size_i or b < a):
                dominated = True
                break
        out.append(not dominated)
    return out


def _known(size: float | None, score: float | None) -> bool:
    return size is not None and score is not None and math.isfinite(size) and not math.isnan(score)


@dataclass
class RankingInput:
    """Aligned per-token values of the ranking metric for every candidate (and the noise floor).

    ``values[k]`` belongs to ``labels[k]``; NaN marks tokens to leave out (non-finite logits).
    ``doc_index`` maps each token to a document ``0..n_docs-1``, documents ordered by dataset
    with ``strata[s]`` documents in dataset ``s``.
    """

    labels: list[str]
    values: np.ndarray
    doc_index: np.ndarray
    strata: list[int]
    dataset_labels: list[str]
    weights: list[float]
    info: list[dict[str, Any]]
    noise_floor: np.ndarray | None = None


#: ``pair_sums(pairs)``: for each ``(i, j)`` (``j`` None: the noise floor), the document sums of
#: series ``i`` and of series ``j`` over the tokens included (not NaN) in both.
PairSums = Callable[
    [list[tuple[int, int | None]]], dict[tuple[int, int | None], tuple[DocSums, DocSums]]
]


@dataclass
class RankingSums:
    """What :func:`rank` needs, as per-document sums: :class:`RankingInput` without the tokens.

    ``own[k]`` sums ``labels[k]``'s values by document; ``pair_sums`` gives the paired series
    once the order is known (a streaming caller reads its parts once more for them); ``tokens``
    is the number of tokens per candidate.
    """

    labels: list[str]
    own: list[DocSums]
    pair_sums: PairSums
    strata: list[int]
    dataset_labels: list[str]
    weights: list[float]
    info: list[dict[str, Any]]
    tokens: int
    noise_floor: DocSums | None = None

    @classmethod
    def from_tokens(cls, data: RankingInput) -> RankingSums:
        n_docs = int(sum(data.strata))

        def pair_sums(pairs: list[tuple[int, int | None]]) -> dict[Any, tuple[DocSums, DocSums]]:
            out = {}
            for i, j in pairs:
                other = data.noise_floor if j is None else data.values[j]
                both = ~np.isnan(data.values[i]) & ~np.isnan(other)
                out[(i, j)] = (
                    DocSums.from_tokens(data.values[i], data.doc_index, n_docs, both),
                    DocSums.from_tokens(other, data.doc_index, n_docs, both),
                )
            return out

        return cls(
            labels=data.labels,
            own=[DocSums.from_tokens(v, data.doc_index, n_docs) for v in data.values],
            pair_sums=pair_sums,
            strata=data.strata,
            dataset_labels=data.dataset_labels,
            weights=data.weights,
            info=data.info,
            tokens=int(data.doc_index.size),
            noise_floor=None
            if data.noise_floor is None
            else DocSums.from_tokens(data.noise_floor, data.doc_index, n_docs),
        )


def rank(
    data: RankingInput | RankingSums,
    metric: str,
    higher_is_better: bool,
    *,
    resamples: int = 1000,
    confidence: float = 0.95,
    seed: int = 0,
    average: str = "micro",
    size_key: str = "parameters",
    noise_label: str = "noise-floor",
    unit: str = "document",
) -> dict[str, Any]:
    """The ``ranking`` section of results.json (see the module docstring for the method).

    ``unit`` names what ``doc_index`` indexes (``document``; ``chunk`` for llama-cpp windowing,
    where the whole text is one stream and its chunks are the resampled units).

    ``info[k]`` may hold ``group``, ``step``, ``parameters``, ``disk_bytes``, ``memory_bytes``
    and ``metrics`` (the candidate's results.json metrics, for the checkpoint series).
    """
    if isinstance(data, RankingInput):
        data = RankingSums.from_tokens(data)
    n_docs = int(sum(data.strata))
    boot = Bootstrap(data.strata, data.weights, resamples, seed, average)
    k = len(data.labels)
    own = data.own
    series: list[DocSums] = list(own)
    noise_at = None
    if data.noise_floor is not None:
        noise_at = len(series)
        series.append(data.noise_floor)

    observed = boot.statistic(series)[0]
    order = sorted(range(k), key=lambda i: _sort_key(observed[i], higher_is_better))

    # Pairs on identical tokens: each candidate with the next in the order, and with the floor.
    pairs: list[tuple[int, int | None]] = [(order[r], order[r + 1]) for r in range(k - 1)]
    if noise_at is not None:
        pairs += [(i, None) for i in range(k)]
    pair_at: dict[tuple[int, int | None], int] = {}
    paired_sums = data.pair_sums(pairs)
    for pair in pairs:
        pair_at[pair] = len(series)
        series.extend(paired_sums[pair])

    samples = boot.run(series)
    paired_observed = boot.statistic(series)[0]

    def paired(i: int, j: int | None) -> dict[str, Any]:
        at = pair_at[(i, j)]
        with np.errstate(invalid="ignore"):
            diffs = samples[:, at] - samples[:, at + 1]
            diff = float(paired_observed[at] - paired_observed[at + 1])
        return {
            "label": noise_label if j is None else data.labels[j],
            "diff": diff,
            "ci": interval(diffs, confidence),
            "flip_share": flip_share(diffs, diff),
        }

    sizes = [data.info[i].get(size_key) for i in range(k)]
    front = pareto_front(sizes, [float(observed[i]) for i in range(k)], higher_is_better)
    rows = []
    for r, i in enumerate(order):
        info = data.info[i]
        row: dict[str, Any] = {
            "rank": r + 1,
            "label": data.labels[i],
            "kind": "candidate",
            "group": info.get("group"),
            "step": info.get("step"),
            "value": float(observed[i]),
            "ci": interval(samples[:, i], confidence),
            "se_bootstrap": _nanstd(samples[:, i]),
            "size": {key: info.get(key) for key in SIZE_KEYS},
            "pareto": front[i],
            "vs_next": paired(i, order[r + 1]) if r + 1 < k else None,
        }
        if noise_at is not None:
            vs_noise = paired(i, None)
            lo, hi = vs_noise["ci"]
            # "Above the floor": the whole CI of (candidate − floor) is on the worse side of 0.
            vs_noise["distinguishable"] = bool(hi < 0 if higher_is_better else lo > 0)
            row["vs_noise_floor"] = vs_noise
        rows.append(row)
    if noise_at is not None:
        rows.append(
            {
                "rank": None,
                "label": noise_label,
                "kind": "noise_floor",
                "group": None,
                "step": None,
                "value": float(observed[noise_at]),
                "ci": interval(samples[:, noise_at], confidence),
                "se_bootstrap": _nanstd(samples[:, noise_at]),
                "size": None,
                "pareto": None,
                "vs_next": None,
            }
        )

    return {
        "metric": metric,
        "direction": "higher is better" if higher_is_better else "lower is better",
        "average": average,
        "method": f"percentile bootstrap over {unit}s (resampled within each dataset), ratio "
        f"estimator of per-{unit} sums and token counts",
        "resamples": resamples,
        "confidence": confidence,
        "seed": seed,
        "unit": unit,
        "units": n_docs,
        "tokens": data.tokens,
        "leaderboard": rows,
        "pareto": {
            "size": size_key,
            "labels": [data.labels[i] for i in order if front[i]],
        },
        "by_dataset": _by_dataset(data, own, boot),
        "checkpoints": checkpoint_series(data, observed, higher_is_better),
    }


def _sort_key(value: float, higher_is_better: bool) -> tuple[int, float]:
    if math.isnan(value):
        return (1, 0.0)
    return (0, -value if higher_is_better else value)


def _nanstd(values: np.ndarray) -> float:
    finite = values[np.isfinite(values)]
    if finite.size < 2 or finite.size < np.count_nonzero(~np.isnan(values)):
        return math.nan if finite.size < 2 else math.inf
    return float(finite.std(ddof=1))


def _by_dataset(data: RankingSums, own: list[DocSums], boot: Bootstrap) -> list[dict[str, Any]]:
    """Per candidate: the metric on each dataset, micro and macro averages."""
    micro = Bootstrap(boot.strata, boot.weights, average="micro")
    macro = Bootstrap(boot.strata, boot.weights, average="macro")
    mic, mac = micro.statistic(own)[0], macro.statistic(own)[0]
    out = []
    for i, label in enumerate(data.labels):
        per = {}
        for s, name in enumerate(data.dataset_labels):
            lo, hi = boot.offsets[s], boot.offsets[s + 1]
            x = own[i]
            per[name] = float(
                _ratio(
                    x.sums[lo:hi].sum(),
                    x.counts[lo:hi].sum(),
                    x.pos_inf[lo:hi].sum(),
                    x.neg_inf[lo:hi].sum(),
                )
            )
        out.append(
            {"label": label, "datasets": per, "micro": float(mic[i]), "macro": float(mac[i])}
        )
    return out


def checkpoint_series(
    data: RankingInput | RankingSums, observed: np.ndarray, higher_is_better: bool
) -> list[dict[str, Any]]:
    """For candidates with a ``step``: KL, PPL and the ranking metric by step, per group."""
    groups: dict[str | None, list[int]] = {}
    for i, info in enumerate(data.info):
        if info.get("step") is not None:
            groups.setdefault(info.get("group"), []).append(i)
    out = []
    for group, members in groups.items():
        members.sort(key=lambda i: data.info[i]["step"])
        points = []
        for i in members:
            metrics = data.info[i].get("metrics") or {}
            points.append(
                {
                    "step": data.info[i]["step"],
                    "label": data.labels[i],
                    "value": float(observed[i]),
                    "kl_mean": lookup(metrics, "kl.mean"),
                    "ppl_candidate": lookup(metrics, "ppl.candidate"),
                    "ppl_ratio": lookup(metrics, "ppl.ratio"),
                }
            )
        best = min(members, key=lambda i: _sort_key(observed[i], higher_is_better))
        out.append(
            {
                "group": group,
                "points": points,
                "best": {
                    "step": data.info[best]["step"],
                    "label": data.labels[best],
                    "value": float(observed[best]),
                },
            }
        )
    return out


def metric_values(columns: dict[str, np.ndarray], metric: str) -> np.ndarray:
    """Per-token values of a rank metric from a candidate's token columns; NaN where the
    logits were not finite (those tokens are left out of every mean)."""
    column = rank_metrics()[metric].column
    if column == "ln_ppl_ratio":
        values = columns["nll_candidate"] - columns["nll_reference"]
    else:
        values = columns[column].astype(np.float64)
    values = np.asarray(values, dtype=np.float64).copy()
    values[np.asarray(columns["nonfinite"], dtype=bool)] = np.nan
    return values


def candidate_sizes(model: dict[str, Any], params: int | None = None) -> dict[str, Any]:
    """The sizes of :data:`SIZE_KEYS` from a model description (results.json ``model``)."""
    count = params if params is not None else model.get("parameters")
    itemsize = _ITEMSIZE.get(str(model.get("dtype")))
    quantized = model.get("quantization") is not None
    return {
        "parameters": count,
        "disk_bytes": model.get("bytes_on_disk"),
        # parameters × dtype bytes says nothing of a quantized model: its bytes as loaded do.
        "memory_bytes": (model.get("loaded_bytes") or model.get("weight_bytes"))
        if quantized
        else (model.get("parameters") * itemsize if model.get("parameters") and itemsize else None),
        "weight_bytes": model.get("weight_bytes"),
        "bits_per_weight": model.get("bits_per_weight"),
    }


_ITEMSIZE = {"float32": 4, "float64": 8, "bfloat16": 2, "float16": 2, "int8": 1, "uint8": 1}


def default_size_key(models: Sequence[dict[str, Any]]) -> str:
    """bits_per_weight when any candidate is quantized (all share one parameter count), else
    parameters."""
    if any(m.get("quantization") is not None for m in models):
        return "bits_per_weight"
    return "parameters"


def rank_one_run(
    values: dict[str, np.ndarray],
    units: np.ndarray,
    models: dict[str, dict[str, Any]],
    *,
    unit: str = "doc_id",
    metric: str = "kl.mean",
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """The ``ranking`` of the candidates of one comparison (one dataset).

    ``values[label]`` are a candidate's per-token values of ``metric`` (see
    :func:`metric_values`), all candidates in one token order; ``units[i]`` is token ``i``'s
    bootstrap unit (its document, or its llama-cpp chunk with ``unit="window_id"``);
    ``models[label]`` the candidate's description (for the sizes)."""
    labels = list(values)
    _, doc_index = np.unique(units, return_inverse=True)
    n_units = int(doc_index.max()) + 1 if doc_index.size else 0
    data = RankingInput(
        labels=labels,
        values=np.stack([values[label] for label in labels]),
        doc_index=doc_index,
        strata=[n_units],
        dataset_labels=["data"],
        weights=[1.0],
        info=[],
    )
    return rank_one_run_sums(
        RankingSums.from_tokens(data),
        models,
        unit=unit,
        metric=metric,
        resamples=resamples,
        seed=seed,
    )


def rank_one_run_sums(
    sums: RankingSums,
    models: dict[str, dict[str, Any]],
    *,
    unit: str = "doc_id",
    metric: str = "kl.mean",
    resamples: int = 1000,
    seed: int = 0,
) -> dict[str, Any]:
    """:func:`rank_one_run` from per-unit sums (one dataset; ``info`` is filled in here), for
    callers that stream their tokens (see :class:`UnitSumsStream`)."""
    labels = sums.labels
    sums.info = [
        {**candidate_sizes(models[label]), "metrics": None, "index": i}
        for i, label in enumerate(labels)
    ]
    return rank(
        sums,
        metric,
        rank_metrics()[metric].higher_is_better,
        resamples=resamples,
        seed=seed,
        size_key=default_size_key([models[label] for label in labels]),
        unit="chunk" if unit == "window_id" else "document",
    )
