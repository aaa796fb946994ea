"""The hard contexts of a finished run as a dataset (``lmkl select RUN``).

A *window* is ``window`` consecutive scored tokens of one document (of one chunk, in llama-cpp
windowing); its score is the mean per-token score over them:

* ``kl``: KL(P‖Q), ``reverse_kl``: KL(Q‖P), ``jsd``: Jensen-Shannon divergence,
* ``nll_gap``: −log q(x) + log p(x), how much worse the candidate predicts the actual text.

Every window start is a contender. The highest-scoring window is taken, every contender that
shares a scored token with it is dropped, and so on until ``top`` windows are taken or the
next scores below ``min_score`` (so the selection never holds a token twice). ``window=1`` with
``context=C`` selects single tokens with C tokens of left context. Each row's ``text`` is the
context followed by the window, decoded with the reference's tokenizer from the run's own
tokens (the data is read again and must be unchanged), so the output can be the ``--data`` of
the next ``lmkl compare`` or a distillation set.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import yaml

from lmkl.engine.rundir import load_results, load_tokens
from lmkl.errors import DataError, OutputError, UsageError
from lmkl.version import __version__

#: What a window can be scored by.
SCORES = ("kl", "reverse_kl", "jsd", "nll_gap")
#: Output formats by file name: a .jsonl or .parquet file, anything else a save_to_disk folder.
SUFFIXES = (".jsonl", ".parquet")


@dataclass
class Selection:
    """The chosen windows (rows of the output) and how much of the run they cover."""

    rows: list[dict[str, Any]]
    by: str
    candidate: str
    #: Scored tokens of the candidate in the run, and in the selection.
    run_tokens: int
    tokens: int
    #: Sum of finite KL(P‖Q) over the run's tokens, and over the selection's.
    run_kl: float
    kl: float
    infinite: int = 0
    notes: list[str] = field(default_factory=list)

    @property
    def kl_share(self) -> float:
        return self.kl / self.run_kl if self.run_kl > 0 else math.nan

    def summary(self) -> str:
        """One line: what was selected and how much of the run's KL it holds."""
        share = self.tokens / self.run_tokens if self.run_tokens else math.nan
        text = (
            f"{len(self.rows)} windows by {self.by} of {self.candidate}: {self.tokens:,} of "
            f"{self.run_tokens:,} scored tokens ({share:.1%}) holding {self.kl_share:.1%} of the "
            f"run's total KL(P‖Q)"
        )
        if self.infinite:
            text += f" (and {self.infinite} of its infinite-KL tokens)"
        return text


def token_scores(table: pa.Table, by: str) -> np.ndarray:
    """Per-token score ``by`` from tokens.parquet columns (NaN where the logits were not finite)."""

    def col(name: str) -> np.ndarray:
        return pc.fill_null(table[name], math.nan).to_numpy().astype(np.float64)

    if by == "nll_gap":
        return col("nll_candidate") - col("nll_reference")
    return col(by)


def window_scores(scores: np.ndarray, window: int) -> np.ndarray:
    """Mean score of every run of ``window`` consecutive tokens (one if there are fewer).

    A non-finite token score (non-finite logits) counts as 0; a +inf KL makes its windows +inf.
    """
    n = scores.size
    if n <= window:
        return np.array([_mean(scores)])
    finite = np.where(np.isfinite(scores), scores, 0.0)
    sums = np.concatenate([[0.0], np.cumsum(finite)])
    means = (sums[window:] - sums[:-window]) / window
    inf = np.concatenate([[0], np.cumsum(np.isposinf(scores))])
    means[(inf[window:] - inf[:-window]) > 0] = math.inf
    return means


def _mean(values: np.ndarray) -> float:
    if np.isposinf(values).any():
        return math.inf
    return float(np.where(np.isfinite(values), values, 0.0).mean()) if values.size else -math.inf


def pick_windows(
    units: list[np.ndarray], window: int, top: int, min_score: float | None
) -> list[tuple[float, int, int, int]]:
    """``(score, unit, start, stop)`` of the chosen windows over per-unit score arrays, best
    first; ties go to the earlier unit and start. No two chosen windows share a token."""
    scores, unit_of, start_of = [], [], []
    for u, values in enumerate(units):
        s = window_scores(values, window)
        scores.append(s)
        unit_of.append(np.full(s.size, u))
        start_of.append(np.arange(s.size))
    if not scores:
        return []
    all_scores = np.concatenate(scores)
    all_units = np.concatenate(unit_of)
    all_starts = np.concatenate(start_of)
    order = np.lexsort((all_starts, all_units, -all_scores))
    taken = [np.zeros(v.size, dtype=bool) for v in units]
    out: list[tuple[float, int, int, int]] = []
    for i in order:
        if len(out) >= top:
            break
        score = float(all_scores[i])
        if min_score is not None and not score >= min_score:
            break
        u, a = int(all_units[i]), int(all_starts[i])
        b = min(a + window, units[u].size)
        if taken[u][a:b].any():
            continue
        taken[u][a:b] = True
        out.append((score, u, a, b))
    return out


def _labels(results: dict[str, Any]) -> list[str]:
    return [str(c.get("label")) for c in results.get("candidates", [])]


def _read_config(run_dir: Path) -> dict[str, Any]:
    try:
        config = yaml.safe_load((run_dir / "config.yaml").read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise OutputError(
            f"cannot read '{run_dir / 'config.yaml'}'", "pass a run directory written by lmkl"
        ) from exc
    if not isinstance(config, dict):
        raise OutputError(f"'{run_dir / 'config.yaml'}' holds no options", "rerun the comparison")
    return config


def run_tokens_by_unit(run_dir: Path, config: dict[str, Any], results: dict[str, Any]) -> Any:
    """The tokenizer and, per unit (document or chunk), position -> token id, rebuilt exactly as
    the run made them (from its reference cache, or by reading and windowing the data again)."""
    from lmkl.data.windows import make_windows
    from lmkl.models import load_tokenizer, tokenizer_adds_bos
    from lmkl.refcache.format import is_cache_dir, open_cache
    from lmkl.specs import ComputeSpec, DataSpec, ModelSpec, WindowSpec

    reference = ModelSpec(**config["reference"])
    windowing = dict(config.get("windowing") or {})
    spec = WindowSpec(
        windowing=windowing.get("windowing", "documents"),
        context_length=windowing.get("context_length", 512),
        stride=windowing.get("stride"),
    )
    if is_cache_dir(reference.model):
        cache = open_cache(reference.model)
        tokenizer, windows = cache.tokenizer, cache.windows()
    else:
        from lmkl.data.corpus import load_corpus

        data = DataSpec(**config["data"])
        corpus = load_corpus(data)
        recorded = (results.get("data") or {}).get("fingerprint")
        current = corpus.description.get("fingerprint")
        if recorded and current and recorded != current:
            raise DataError(
                f"data '{data.source}' changed since run '{run_dir}' was made "
                "(its fingerprint differs)",
                "restore the run's data, or compare again on the new data",
            )
        tokenizer = load_tokenizer(reference)
        compute = ComputeSpec(**config.get("compute", {}))
        windows = make_windows(
            corpus, tokenizer, spec, tokenizer_adds_bos(tokenizer), compute.max_tokens
        )
    by_chunk = spec.windowing == "llama-cpp"
    units: dict[int, dict[int, int]] = {}
    for w in windows:
        unit = units.setdefault(w.window_id if by_chunk else w.doc_id, {})
        for j, token in enumerate(w.input_ids):
            unit.setdefault(w.offset + j, int(token))
    return tokenizer, units, by_chunk


def select_contexts(
    run_dir: str | Path,
    *,
    by: str = "kl",
    top: int = 100,
    window: int = 32,
    context: int = 0,
    min_score: float | None = None,
    candidate: str | None = None,
) -> Selection:
    """Choose the ``top`` highest-scoring windows of a finished run (see the module docstring).

    ``context``: tokens of left context put before each window in ``text`` (not scored, not
    counted as overlap). Raises :class:`~lmkl.errors.LmklError` subclasses with one-line
    messages for a bad run, candidate, score or changed data.
    """
    run_dir = Path(run_dir)
    if by not in SCORES:
        raise UsageError(f"unknown score '{by}'", "use one of: " + ", ".join(SCORES))
    if top < 1 or window < 1 or context < 0:
        raise UsageError(
            "--top and --window must be at least 1, --context at least 0", "correct them"
        )
    results = load_results(run_dir)
    kind = results.get("kind", "compare")
    if kind == "experiment":
        found = sorted(p.name for p in (run_dir / "datasets").glob("*") if p.is_dir())
        raise UsageError(
            f"'{run_dir}' is an experiment, which keeps its tokens per dataset",
            "select from one of its datasets: "
            + ", ".join(f"{run_dir}/datasets/{name}" for name in found),
        )
    if kind != "compare" or not results.get("token_level", True):
        raise UsageError(
            f"run '{run_dir}' ({kind}) has no token-level KL to select by",
            "select from a run of `lmkl compare`",
        )
    labels = _labels(results)
    if candidate is None:
        if not labels:
            raise OutputError(f"run '{run_dir}' has no candidates", "rerun the comparison")
        candidate = labels[0]
    elif candidate not in labels:
        raise UsageError(
            f"no candidate '{candidate}' in run '{run_dir}'", "use one of: " + ", ".join(labels)
        )
    config = _read_config(run_dir)
    by_chunk = (config.get("windowing") or {}).get("windowing") == "llama-cpp"
    unit_col = "window_id" if by_chunk else "doc_id"
    needed = ["doc_id", "window_id", "position", "kl", "reverse_kl", "jsd"]
    needed += ["nll_reference", "nll_candidate"]
    table = load_tokens(run_dir, columns=needed, filters=[("candidate", "=", candidate)])
    table = table.sort_by([(unit_col, "ascending"), ("position", "ascending")])
    scores = token_scores(table, by)
    kl = token_scores(table, "kl")
    unit_ids = table[unit_col].to_numpy()
    positions = table["position"].to_numpy()
    cuts = np.flatnonzero(np.diff(unit_ids)) + 1
    bounds = np.concatenate([[0], cuts, [unit_ids.size]]).astype(np.int64)
    per_unit = [scores[bounds[k] : bounds[k + 1]] for k in range(len(bounds) - 1)]
    chosen = pick_windows(per_unit, window, top, min_score)
    finite_kl = np.where(np.isfinite(kl), kl, 0.0)
    selection = Selection(
        rows=[],
        by=by,
        candidate=candidate,
        run_tokens=int(unit_ids.size),
        tokens=0,
        run_kl=float(finite_kl.sum()),
        kl=0.0,
    )
    if not chosen:
        best = max((float(window_scores(u, window).max()) for u in per_unit if u.size), default=0)
        raise DataError(
            f"no window of run '{run_dir}' scores at least {min_score} by {by} "
            f"(the highest: {best:.4g})",
            "lower --min-score",
        )
    tokenizer, tokens_of, _ = run_tokens_by_unit(run_dir, config, results)
    reference = results.get("reference", {}) or {}
    data = results.get("data", {}) or {}
    for score, u, a, b in chosen:
        lo, hi = bounds[u] + a, bounds[u] + b
        unit = int(unit_ids[lo])
        span_start, span_end = int(positions[lo]), int(positions[hi - 1]) + 1
        ids_of = tokens_of[unit]
        first = min(ids_of)
        context_start = max(first, span_start - context)
        prompt_ids = [ids_of[p] for p in range(context_start, span_start) if p in ids_of]
        target_ids = [ids_of[p] for p in range(span_start, span_end) if p in ids_of]
        selection.rows.append(
            {
                "text": tokenizer.decode(prompt_ids + target_ids, skip_special_tokens=True),
                "prompt": tokenizer.decode(prompt_ids, skip_special_tokens=True),
                "target": tokenizer.decode(target_ids, skip_special_tokens=True),
                "doc_id": int(table["doc_id"][lo].as_py()),
                "chunk": unit if by_chunk else None,
                "span_start": span_start,
                "span_end": span_end,
                "context_start": context_start,
                "tokens": int(hi - lo),
                # JSON has no infinity: an infinite score (a token the candidate rules out)
                # is null, and infinite_tokens says why.
                "score": score if math.isfinite(score) else None,
                "infinite_tokens": int(np.isposinf(kl[lo:hi]).sum()),
                "by": by,
                "kl_sum": float(finite_kl[lo:hi].sum()),
                "candidate": candidate,
                "reference": str(reference.get("label", "")),
                "run": str(run_dir.resolve()),
                "data_source": str(data.get("source", "")),
                "data_fingerprint": str(data.get("fingerprint", "")),
                "lmkl_version": __version__,
            }
        )
        selection.tokens += int(hi - lo)
        selection.kl += float(finite_kl[lo:hi].sum())
        selection.infinite += int(np.isposinf(kl[lo:hi]).sum())
    return selection


#: Column types of the output (a .jsonl holds the same fields).
OUTPUT_SCHEMA = pa.schema(
    [
        ("text", pa.string()),
        ("prompt", pa.string()),
        ("target", pa.string()),
        ("doc_id", pa.int64()),
        ("chunk", pa.int64()),
        ("span_start", pa.int64()),
        ("span_end", pa.int64()),
        ("context_start", pa.int64()),
        ("tokens", pa.int64()),
        ("score", pa.float64()),
        ("infinite_tokens", pa.int64()),
        ("by", pa.string()),
        ("kl_sum", pa.float64()),
        ("candidate", pa.string()),
        ("reference", pa.string()),
        ("run", pa.string()),
        ("data_source", pa.string()),
        ("data_fingerprint", pa.string()),
        ("lmkl_version", pa.string()),
    ]
)


def check_output(out: str | Path, overwrite: bool = False) -> Path:
    """The output path, checked before any work: a known format and nothing to clobber."""
    out = Path(out)
    suffix = out.suffix.lower()
    if suffix and suffix not in SUFFIXES:
        raise UsageError(
            f"unsupported output type '{out.suffix}' for '{out}'",
            "write a .jsonl or .parquet file, or name a directory (a save_to_disk dataset)",
        )
    if out.exists() and not overwrite:
        raise OutputError(f"output '{out}' already exists", "pass --overwrite or another --out")
    saved = (out / "dataset_info.json").is_file()
    if out.is_dir() and suffix == "" and not saved and any(out.iterdir()):
        raise OutputError(
            f"'{out}' is a non-empty directory that is not a saved dataset; refusing to replace it",
            "choose another --out",
        )
    if out.exists() and suffix and out.is_dir():
        raise OutputError(f"output '{out}' is a directory", "choose a file name")
    return out


def write_selection(selection: Selection, out: str | Path, overwrite: bool = False) -> Path:
    """Write the rows as ``.jsonl``, ``.parquet`` or a ``save_to_disk`` directory; returns it."""
    import json
    import shutil

    from lmkl.files import atomic_path

    out = check_output(out, overwrite)
    table = pa.Table.from_pylist(selection.rows, schema=OUTPUT_SCHEMA)
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        suffix = out.suffix.lower()
        if suffix == ".jsonl":
            with atomic_path(out) as tmp, tmp.open("w", encoding="utf-8") as fh:
                for row in selection.rows:
                    fh.write(json.dumps(row, ensure_ascii=False, allow_nan=False) + "\n")
        elif suffix == ".parquet":
            import pyarrow.parquet as pq

            with atomic_path(out) as tmp:
                pq.write_table(table, tmp)
        else:
            from datasets import Dataset

            staging = out.with_name(f".{out.name}.tmp")
            shutil.rmtree(staging, ignore_errors=True)
            Dataset(table).save_to_disk(str(staging))
            if out.exists():
                shutil.rmtree(out)
            staging.rename(out)
    except OSError as exc:
        raise OutputError(
            f"cannot write '{out}': {exc.strerror or exc}", "choose a writable --out"
        ) from exc
    return out
