"""Summaries streamed over a run's parts: the in-memory numbers, in bounded memory.

Issue 18, defect 6: ``summarize`` held every part in RAM plus float64 copies. The streamed
summary (lmkl/analysis/streaming.py) must give the same numbers: quantiles and counts exactly,
means and standard errors within float64 rounding (checked at 1e-10 relative), against the
in-memory :func:`lmkl.analysis.stats.summarize` and against NumPy directly, and it must never
hold more than one batch's parts.
"""

from __future__ import annotations

import json
import math
import tracemalloc
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from runtools import invoke

from lmkl.analysis import stats
from lmkl.analysis.ranking import rank_one_run
from lmkl.analysis.streaming import ExactQuantiles, summarize_chunks
from lmkl.engine.common import candidate_columns
from lmkl.engine.rundir import RunDirectory, tokens_table
from lmkl.files import to_json_safe
from lmkl.scoring.divergence import TOKEN_METRIC_NAMES

RTOL = 1e-10


def synthetic_part(rng: np.random.Generator, start_doc: int, rows: int, label: str) -> pa.Table:
    """One part of a comparison: heavy-tailed KL with exact zeros, ties, +inf and nonfinite rows."""
    kl = rng.lognormal(-8, 3, rows).astype(np.float32)
    kl[rng.random(rows) < 0.05] = 0.0  # identical distributions: many exact ties
    kl[rng.random(rows) < 0.002] = np.inf  # candidate gives probability 0
    nonfinite = rng.random(rows) < 0.01
    columns = {
        "candidate": [label] * rows,
        "doc_id": start_doc + np.sort(rng.integers(0, 7, rows)),
        "window_id": start_doc * 3 + np.sort(rng.integers(0, 20, rows)),
        "position": np.arange(rows),
        "window_pos": np.arange(rows) % 64,
        "token_id": rng.integers(0, 500, rows),
        "bytes": rng.integers(1, 6, rows),
        "nonfinite": nonfinite,
        "kl": kl,
        "reverse_kl": rng.lognormal(-8, 2, rows),
        "jsd": rng.lognormal(-10, 2, rows),
        "entropy_reference": rng.gamma(2, 1, rows),
        "entropy_candidate": rng.gamma(2, 1, rows),
        "nll_reference": rng.gamma(2, 1.5, rows),
        "nll_candidate": rng.gamma(2, 1.6, rows),
        "delta_p": rng.normal(0, 0.05, rows),
        "top1_agree": (rng.random(rows) < 0.8).astype(np.float32),
        "top1_in_top5": (rng.random(rows) < 0.97).astype(np.float32),
        "reference_top1_prob": rng.random(rows),
    }
    for name in TOKEN_METRIC_NAMES:  # nonfinite rows are stored as nulls
        columns[name] = np.where(nonfinite, np.nan, columns[name])
    return tokens_table(columns)


def synthetic_run(root: Path, parts: int, rows: int, seed: int = 0) -> RunDirectory:
    rng = np.random.default_rng(seed)
    run_dir = RunDirectory.create(root)
    for i in range(parts):
        run_dir.write_part(i, synthetic_part(rng, 7 * i, rows, "cand"))
    return run_dir


def _close(got, want, path=""):
    """Equal structure; floats equal (NaN too) or within RTOL."""
    if isinstance(want, dict):
        assert got.keys() == want.keys(), path
        for key in want:
            _close(got[key], want[key], f"{path}.{key}")
    elif isinstance(want, list):
        assert len(got) == len(want), path
        for i, (g, w) in enumerate(zip(got, want, strict=True)):
            _close(g, w, f"{path}[{i}]")
    elif isinstance(want, float):
        if math.isnan(want):
            assert math.isnan(got), path
        else:
            assert got == pytest.approx(want, rel=RTOL, abs=0), path
    else:
        assert got == want, path


def test_streamed_summary_equals_the_in_memory_one_on_a_multi_part_run(tmp_path):
    run_dir = synthetic_run(tmp_path / "run", parts=12, rows=3000)
    streamed = summarize_chunks(
        lambda: (candidate_columns(p, "cand") for p in run_dir.iter_parts())
    ).result()
    in_memory = stats.summarize(candidate_columns(run_dir.read_parts(), "cand"))
    _close(streamed, in_memory)
    for name in ("kl", "reverse_kl", "jsd"):  # exact, not merely close
        for q in stats.QUANTILES:
            assert streamed[name][q] == in_memory[name][q]


def test_streamed_summary_against_numpy(tmp_path):
    """Independent reference: NumPy float64 on all tokens at once."""
    run_dir = synthetic_run(tmp_path / "run", parts=9, rows=2500, seed=3)
    metrics = summarize_chunks(
        lambda: (candidate_columns(p, "cand") for p in run_dir.iter_parts())
    ).result()
    table = pq.read_table(run_dir.parts_dir)
    keep = ~table["nonfinite"].to_numpy()

    def col(name):
        return table[name].to_numpy(zero_copy_only=False).astype(np.float64)[keep]

    for name in ("reverse_kl", "jsd"):
        values = col(name)
        assert metrics[name]["mean"] == pytest.approx(values.mean(), rel=RTOL)
        se = values.std(ddof=1) / math.sqrt(values.size)
        assert metrics[name]["se"] == pytest.approx(se, rel=RTOL)
        for q, p in stats.QUANTILES.items():
            assert metrics[name][q] == np.quantile(values, p)  # exact order statistics
        assert metrics[name]["max"] == values.max() and metrics[name]["min"] == values.min()
    kl = col("kl")
    finite = kl[np.isfinite(kl)]
    assert metrics["kl"]["infinite"] == np.isinf(kl).sum() > 0
    assert metrics["kl"]["mean"] == math.inf
    assert metrics["kl"]["mean_finite"] == pytest.approx(finite.mean(), rel=RTOL)
    assert metrics["kl"]["median"] == np.quantile(kl, 0.5)
    nll_p, nll_q = col("nll_reference"), col("nll_candidate")
    assert metrics["nll_correlation"] == pytest.approx(np.corrcoef(nll_p, nll_q)[0, 1], rel=RTOL)
    ratio = nll_q - nll_p
    assert metrics["ln_ppl_ratio"]["mean"] == pytest.approx(ratio.mean(), rel=RTOL)
    assert metrics["delta_p"]["rms"] == pytest.approx(np.sqrt(np.mean(col("delta_p") ** 2)))
    total_bytes = table["bytes"].to_numpy()[keep].sum()
    bpb = nll_q.sum() / total_bytes / math.log(2)
    assert metrics["bits_per_byte"]["candidate"] == pytest.approx(bpb, rel=RTOL)
    prob = col("reference_top1_prob")
    for bucket in metrics["kl_by_confidence"]:
        hi_ok = prob <= bucket["high"] if bucket["high"] == 1.0 else prob < bucket["high"]
        inside = kl[(prob >= bucket["low"]) & hi_ok]
        assert bucket["tokens"] == inside.size
        assert bucket["kl_median"] == np.quantile(inside, 0.5) or (
            math.isinf(bucket["kl_median"]) and np.quantile(inside, 0.5) == np.inf
        )
    counts = metrics["counts"]
    assert counts["documents"] == np.unique(table["doc_id"].to_numpy()).size
    assert counts["windows"] == np.unique(table["window_id"].to_numpy()).size
    assert counts["tokens"] == keep.sum() and counts["nonfinite"] == (~keep).sum()


@pytest.mark.parametrize("seed", range(4))
def test_exact_quantiles_select_numpy_order_statistics(seed):
    """Negative values, zeros of both signs, ties, ±inf and NaN, over uneven chunks."""
    rng = np.random.default_rng(seed)
    values = rng.standard_cauchy(5001).astype(np.float32)
    values[rng.random(values.size) < 0.1] = -0.0
    values[rng.random(values.size) < 0.1] = 0.0
    values[:3] = [np.inf, -np.inf, 1.5]
    values[3:40] = 1.5
    if seed == 3:
        values[-5:] = np.nan  # np.sort puts NaN last; so must the selection
    probs = [0.0, 0.001, 0.25, 0.5, 0.9, 0.99, 0.999, 1.0]
    quantiles = ExactQuantiles()
    cuts = np.sort(rng.integers(0, values.size, 7))
    chunks = np.split(values, cuts)
    for chunk in chunks:
        quantiles.add(chunk)
    quantiles.plan(probs)
    for chunk in chunks[::-1]:  # the second pass may see the chunks in any order
        quantiles.add_second(chunk)
    want = stats.quantiles(values.astype(np.float64), probs)
    np.testing.assert_array_equal(quantiles.result(), want)  # NaN where NaN, else identical


def _peak_bytes(run_dir: RunDirectory) -> int:
    tracemalloc.start()
    tracemalloc.reset_peak()
    summarize_chunks(lambda: (candidate_columns(p, "cand") for p in run_dir.iter_parts()))
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    return peak


def test_streamed_summary_memory_does_not_grow_with_the_run(tmp_path):
    """Eight times the parts, the same peak (NumPy allocations, measured by tracemalloc)."""
    small = synthetic_run(tmp_path / "small", parts=4, rows=20_000)
    large = synthetic_run(tmp_path / "large", parts=32, rows=20_000)
    peak_small, peak_large = _peak_bytes(small), _peak_bytes(large)
    # The whole large run's float64 columns would be ~60 MB; the stream holds one part's
    # columns and fixed-size histograms.
    assert peak_large < 1.1 * peak_small + 2**20, (peak_small, peak_large)
    assert peak_large < 30 * 2**20


def test_compare_summary_reads_one_batch_at_a_time_and_ranks_like_the_in_memory_path(
    tiny_pair, gpt2_candidate, small_jsonl, tmp_path, monkeypatch
):
    """A real two-candidate run of many parts: the summary never reads more than one part per
    candidate group at once, and its metrics and leaderboard equal the in-memory numbers
    computed from tokens.parquet."""
    largest = []
    original = RunDirectory.read_part

    def read_part(self, index, columns=None):
        table = original(self, index, columns)
        largest.append(table.num_rows)
        return table

    def read_all(self):
        raise AssertionError("the summary read every part at once")

    monkeypatch.setattr(RunDirectory, "read_part", read_part)
    monkeypatch.setattr(RunDirectory, "read_parts", read_all)
    out = tmp_path / "run"
    code, output = invoke(
        [
            "compare",
            str(tiny_pair["reference"]),
            str(tiny_pair["candidate"]),
            str(gpt2_candidate),
            "--data",
            str(small_jsonl),
            "--out",
            str(out),
            "--context-length",
            "32",
            "--stride",
            "16",
            "--batch-size",
            "2",
            "--quiet",
        ]
    )
    assert code == 0, output
    tokens = pq.read_table(out / "tokens.parquet")
    per_part_max = 2 * 32 * 2  # batch of 2 windows × 32 tokens × 2 candidates
    assert largest and max(largest) <= per_part_max < tokens.num_rows / 4

    results = json.loads((out / "results.json").read_text())
    values, units, models = {}, None, {}
    for entry in results["candidates"]:
        label = entry["label"]
        columns = candidate_columns(tokens, label)
        _close(entry["metrics"], to_json_safe(stats.summarize(columns)))
        order = np.lexsort((columns["window_pos"], columns["window_id"]))
        kl = columns["kl"].copy()
        kl[columns["nonfinite"].astype(bool)] = np.nan
        values[label], units = kl[order], columns["doc_id"][order]
        models[label] = entry["model"]
    want = rank_one_run(values, units, models, seed=0)
    _close(results["ranking"], to_json_safe(want))
