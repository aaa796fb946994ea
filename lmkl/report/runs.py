"""Reading finished run directories back: results.json, worst.json and tokens.parquet.

Only the run directory contract is read (no model, no torch). Tokens are split by candidate label
with one stable sort, never a per-label scan of the table.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from lmkl.analysis.per_token import CandidateTokens
from lmkl.engine.results import check_schema
from lmkl.engine.rundir import load_tokens
from lmkl.errors import OutputError, UsageError
from lmkl.formatting import to_float

#: Columns of tokens.parquet the report reads (the others are not needed for any view).
REPORT_COLUMNS = (
    "candidate",
    "doc_id",
    "position",
    "window_pos",
    "token_id",
    "kl",
    "nll_reference",
    "nll_candidate",
)


def stored_count(value: Any) -> int:
    """A count from results.json (0 when missing: a per-byte run counts no KL tokens)."""
    x = to_float(value)
    return int(x) if math.isfinite(x) else 0


@dataclass
class RunInfo:
    """One run directory and its results."""

    path: Path
    name: str
    results: dict[str, Any]
    worst: list[dict[str, Any]]

    @property
    def reference_label(self) -> str:
        return str(self.results.get("reference", {}).get("label", "reference"))

    @property
    def is_experiment(self) -> bool:
        """An experiment root (``lmkl run``): per-token data lives in ``datasets/<name>/``."""
        return self.results.get("kind") == "experiment"


def experiment_datasets(run: RunInfo) -> list[RunInfo]:
    """The per-dataset sub-runs of an experiment root, named by dataset label (``[]`` for a
    plain run). Each is a core run directory with its own tokens.parquet and worst.json."""
    if not run.is_experiment:
        return []
    subs = []
    for entry in run.results.get("datasets") or []:
        if not isinstance(entry, dict) or not isinstance(entry.get("dir"), str):
            continue
        path = run.path / entry["dir"]
        if (path / "results.json").is_file():
            sub = load_run(path)
            sub.name = str(entry.get("label") or path.name)
            subs.append(sub)
    return subs


def _load_json(path: Path, what: str) -> Any:
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise OutputError(
            f"{what} '{path}' is not valid JSON ({exc.msg}, line {exc.lineno})",
            "rerun the comparison to rewrite it",
        ) from exc


def load_run(path: Path) -> RunInfo:
    """Read a finished run directory's results.json and worst.json (tokens are read later)."""
    path = Path(path)
    if not path.is_dir():
        raise UsageError(
            f"run directory '{path}' does not exist",
            "pass a directory written by `lmkl compare`, `lmkl run` or `lmkl demo`",
        )
    results_path = path / "results.json"
    if not results_path.exists():
        hint = (
            "the run is unfinished; continue it with --resume"
            if (path / "progress.json").exists() or (path / "parts").exists()
            else "pass a directory written by `lmkl compare`, `lmkl run` or `lmkl demo`"
        )
        raise OutputError(f"'{path}' has no results.json (not a finished lmkl run)", hint)
    results = _load_json(results_path, "results file")
    if isinstance(results, dict):
        check_schema(results, results_path, "results file")
    if not isinstance(results, dict) or not isinstance(results.get("candidates"), list):
        raise OutputError(
            f"'{results_path}' has no candidates list", "pass a run directory written by lmkl"
        )
    worst_path = path / "worst.json"
    worst = _load_json(worst_path, "worst-positions file") if worst_path.exists() else []
    return RunInfo(
        path=path,
        name=path.resolve().name,
        results=results,
        worst=worst if isinstance(worst, list) else [],
    )


def read_candidate_tokens(run_dir: Path, labels: Iterable[str]) -> dict[str, CandidateTokens]:
    """Per-candidate NumPy columns of a run's tokens.parquet, split by label without row loops."""
    labels = list(labels)
    path = Path(run_dir) / "tokens.parquet"
    if not path.exists():
        return {}
    try:
        available = set(pq.read_schema(path).names)
    except (OSError, pa.ArrowException) as exc:
        raise OutputError(
            f"cannot read '{path}': the file is damaged ({str(exc).splitlines()[0][:120]})",
            "rerun the comparison to write it again",
        ) from exc
    columns = [c for c in REPORT_COLUMNS if c in available]
    table = load_tokens(Path(run_dir), columns=columns)
    # One array first: chunks encoded separately could carry different dictionaries.
    encoded = pc.dictionary_encode(table["candidate"].combine_chunks())
    codes = encoded.indices.to_numpy(zero_copy_only=False)
    names = encoded.dictionary.to_pylist()
    # One stable sort by candidate code, then contiguous slices: no per-label full-table filter.
    order = np.argsort(codes, kind="stable")
    bounds = np.searchsorted(codes[order], np.arange(len(names) + 1))

    def column(name: str, dtype: Any, fill: float = 0) -> np.ndarray:
        if name not in table.column_names:
            return np.full(len(codes), fill, dtype=dtype)
        chunked = table[name]
        if pa.types.is_floating(chunked.type):
            chunked = pc.fill_null(chunked, math.nan)
        return chunked.to_numpy().astype(dtype, copy=False)[order]

    kl = column("kl", np.float64, math.nan)
    window_pos = column("window_pos", np.int64)
    token_id = column("token_id", np.int64)
    doc_id = column("doc_id", np.int64)
    position = column("position", np.int64)
    nll_p = column("nll_reference", np.float64, math.nan)
    nll_q = column("nll_candidate", np.float64, math.nan)
    out: dict[str, CandidateTokens] = {}
    for code, name in enumerate(names):
        if name not in labels:
            continue
        s = slice(bounds[code], bounds[code + 1])
        out[name] = CandidateTokens(
            kl=kl[s],
            window_pos=window_pos[s],
            token_id=token_id[s],
            doc_id=doc_id[s],
            position=position[s],
            nll_reference=nll_p[s],
            nll_candidate=nll_q[s],
        )
    return out
