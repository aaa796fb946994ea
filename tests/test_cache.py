"""Reference caches: exact equality with live runs, refusals, and valid top-k KL bounds."""

from __future__ import annotations

import json
import math

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy import special
from typer.testing import CliRunner

from lmkl.cli import app
from lmkl.engine.cache_build import build_cache
from lmkl.engine.token_compare import run_comparison
from lmkl.errors import TokenizerMismatchError, UsageError
from lmkl.refcache.format import is_cache_dir, open_cache
from lmkl.scoring.divergence import TOKEN_METRIC_NAMES
from lmkl.scoring.topk import topk_kl_bounds
from lmkl.specs import ComputeSpec, DataSpec, ModelSpec, OutputSpec, WindowSpec

WINDOWS = WindowSpec(context_length=48, stride=24)
EXACT = list(TOKEN_METRIC_NAMES)  # every per-token metric is exact with an exact cache


@pytest.fixture(scope="module")
def built(tiny_pair, tmp_path_factory):
    """An exact and a top-8 cache of the tiny reference, and the live run they must reproduce."""
    root = tmp_path_factory.mktemp("cache")
    lines = tiny_pair["heldout"].read_text().splitlines()[:3]
    data = root / "small.jsonl"
    data.write_text(
        "".join(json.dumps({"text": json.loads(x)["text"][:1200]}) + "\n" for x in lines)
    )
    ref = ModelSpec(model=str(tiny_pair["reference"]), label="ref", dtype="float32")
    cand = ModelSpec(model=str(tiny_pair["candidate"]), label="cand", dtype="float32")
    compute = ComputeSpec(batch_size=3, chunk_tokens=50, compile=False)
    live = run_comparison(
        ref,
        [cand],
        DataSpec(source=str(data)),
        WINDOWS,
        compute,
        OutputSpec(dir=str(root / "live")),
    )
    exact = build_cache(ref, DataSpec(source=str(data)), WINDOWS, compute, root / "exact")
    topk = build_cache(ref, DataSpec(source=str(data)), WINDOWS, compute, root / "top8", top_k=8)
    return {
        "root": root,
        "data": data,
        "ref": ref,
        "cand": cand,
        "compute": compute,
        "live": live,
        "exact": exact,
        "topk": topk,
    }


def tokens(path) -> dict[str, np.ndarray]:
    table = pq.read_table(path / "tokens.parquet")
    return {n: table[n].to_numpy(zero_copy_only=False) for n in table.column_names}


def test_exact_cache_reproduces_live_run(built, tmp_path):
    manifest = built["exact"]
    assert is_cache_dir(built["root"] / "exact") and not is_cache_dir(built["root"] / "live")
    assert manifest["mode"] == "exact" and manifest["rows"]["kind"] == "hidden"
    hidden = manifest["rows"]["shape"][1]
    assert manifest["bytes"]["row_per_token"] == hidden * 4  # float32 hidden state per token
    # Other batching than the cache was built with: rows are gathered by token index.
    outcome = run_comparison(
        ModelSpec(model=str(built["root"] / "exact")),
        [built["cand"]],
        None,
        None,
        ComputeSpec(batch_size=2, chunk_tokens=33, compile=False),
        OutputSpec(dir=str(tmp_path / "cached")),
    )
    live, cached = tokens(built["live"].path), tokens(outcome.path)
    order_live = np.lexsort((live["position"], live["doc_id"]))
    order_cached = np.lexsort((cached["position"], cached["doc_id"]))
    for name in ("doc_id", "position", "window_id", "token_id", "bytes"):
        assert np.array_equal(live[name][order_live], cached[name][order_cached])
    for name in EXACT:
        diff = np.abs(live[name][order_live] - cached[name][order_cached]).max()
        assert diff <= 1e-6, (name, diff)
    results = outcome.results
    assert results["reference_cache"]["mode"] == "exact"
    assert results["reference"]["label"] == "ref"
    live_kl = built["live"].results["candidates"][0]["metrics"]["kl"]["mean"]
    assert results["candidates"][0]["metrics"]["kl"]["mean"] == pytest.approx(live_kl, abs=1e-7)


def test_cache_refuses_mismatches(built, tmp_path, other_tokenizer_model):
    cache_ref = ModelSpec(model=str(built["root"] / "exact"))
    compute = ComputeSpec(compile=False)
    out = OutputSpec(dir=str(tmp_path / "x"))
    with pytest.raises(TokenizerMismatchError, match="reference cache"):
        run_comparison(
            cache_ref, [ModelSpec(model=str(other_tokenizer_model))], None, None, compute, out
        )
    with pytest.raises(UsageError, match="context_length"):
        run_comparison(
            cache_ref, [built["cand"]], None, WindowSpec(context_length=64), compute, out
        )
    other = tmp_path / "other.jsonl"
    other.write_text('{"text": "something else entirely"}\n')
    with pytest.raises(UsageError, match="data differs"):
        run_comparison(cache_ref, [built["cand"]], DataSpec(source=str(other)), None, compute, out)
    with pytest.raises(UsageError, match="max-tokens"):
        run_comparison(
            cache_ref, [built["cand"]], None, None, ComputeSpec(max_tokens=10, compile=False), out
        )
    # The same data and windows as the cache's are accepted.
    outcome = run_comparison(
        cache_ref, [built["cand"]], DataSpec(source=str(built["data"])), WINDOWS, compute, out
    )
    assert outcome.results["candidates"][0]["metrics"]["counts"]["tokens"] == len(
        tokens(built["live"].path)["kl"]
    )


def test_topk_cache_bounds_contain_exact_kl(built, tmp_path):
    manifest = built["topk"]
    assert manifest["mode"] == "topk" and manifest["top_k"] == 8
    assert manifest["bytes"]["row_per_token"] == 8 * (4 + 4)
    outcome = run_comparison(
        ModelSpec(model=str(built["root"] / "top8")),
        [built["cand"]],
        None,
        None,
        ComputeSpec(compile=False),
        OutputSpec(dir=str(tmp_path / "top8")),
    )
    live, cached = tokens(built["live"].path), tokens(outcome.path)
    assert np.array_equal(live["token_id"], cached["token_id"])
    kl = live["kl"].astype(np.float64)
    assert (cached["kl_lower"] <= kl + 1e-6).all() and (cached["kl_upper"] >= kl - 1e-6).all()
    assert (cached["kl_lower"] < cached["kl_upper"]).mean() > 0.5
    assert np.isnan(cached["kl"]).all()  # no point estimate
    for name in (
        "entropy_reference",
        "nll_reference",
        "nll_candidate",
        "entropy_candidate",
        "delta_p",
        "top1_agree",
        "top1_in_top5",
        "reference_top1_prob",
    ):
        assert np.abs(live[name] - cached[name]).max() <= 1e-5, name
    bounds = outcome.results["candidates"][0]["metrics"]["kl_bounds"]
    assert bounds["lower"]["mean"] <= kl.mean() <= bounds["upper"]["mean"]
    assert bounds["lower"]["p90"] <= np.quantile(kl, 0.9) <= bounds["upper"]["p90"]


def random_case(n: int, vocab: int, k: int, seed: int, sharp: float):
    gen = np.random.default_rng(seed)
    ref = gen.normal(size=(n, vocab)) * sharp
    cand = ref + gen.normal(size=(n, vocab)) * 0.7
    lp, lq = special.log_softmax(ref, -1), special.log_softmax(cand, -1)
    order = np.argsort(-lp, axis=-1)[:, :k]
    top = np.take_along_axis(lp, order, -1)
    tail = lp.copy()
    np.put_along_axis(tail, order, -np.inf, -1)
    log_tail = special.logsumexp(tail, -1)
    entropy = special.entr(np.exp(lp)).sum(-1)
    return lp, lq, order, top, log_tail, entropy


@pytest.mark.parametrize(
    ("k", "sharp", "tail_values"), [(1, 1.0, 64), (8, 3.0, 64), (32, 6.0, 2), (200, 2.0, 64)]
)
def test_topk_bounds_hold_against_float64_kl(k, sharp, tail_values):
    lp, lq, order, top, log_tail, entropy = random_case(64, 200, k, seed=k, sharp=sharp)
    exact = special.rel_entr(np.exp(lp), np.exp(lq)).sum(-1)
    lower, upper, top_part = topk_kl_bounds(
        torch.tensor(top, dtype=torch.float32),
        torch.tensor(order),
        torch.tensor(log_tail, dtype=torch.float32),
        torch.tensor(entropy, dtype=torch.float32),
        torch.tensor(lq, dtype=torch.float32),
        tail_values=tail_values,
    )
    lower, upper = lower.numpy(), upper.numpy()
    assert (lower <= exact + 1e-6).all() and (upper >= exact - 1e-6).all()
    p_top = np.exp(top)
    want_top = (p_top * (top - np.take_along_axis(lq, order, -1))).sum(-1)
    assert np.abs(top_part.numpy() - want_top).max() <= 1e-5
    if k == 200:  # the whole vocabulary is "top": the interval closes on the exact value
        assert np.abs(upper - lower).max() <= 1e-4


def test_topk_bounds_with_masked_candidate_tokens():
    _, lq, order, top, log_tail, entropy = random_case(4, 50, 5, seed=9, sharp=2.0)
    tail_token = next(j for j in range(50) if j not in order[0])
    lq[0, tail_token] = -np.inf  # candidate masks a tail token: upper bound becomes +inf
    lq[1, order[1, 0]] = -np.inf  # candidate masks the reference's top token: KL is +inf
    lower, upper, _ = topk_kl_bounds(
        torch.tensor(top, dtype=torch.float32),
        torch.tensor(order),
        torch.tensor(log_tail, dtype=torch.float32),
        torch.tensor(entropy, dtype=torch.float32),
        torch.tensor(lq, dtype=torch.float32),
    )
    assert math.isinf(float(upper[0])) and math.isfinite(float(lower[0]))
    assert math.isinf(float(lower[1])) and math.isinf(float(upper[1]))
    assert np.isfinite(upper[2:].numpy()).all()


def test_cli_cache_then_compare_without_data(tiny_pair, small_jsonl, tmp_path):
    runner = CliRunner()
    cache_dir = tmp_path / "c"
    result = runner.invoke(
        app,
        [
            "cache",
            str(tiny_pair["reference"]),
            "--data",
            str(small_jsonl),
            "-c",
            "48",
            "--max-tokens",
            "120",
            "--out",
            str(cache_dir),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "row bytes/token" in result.output
    result = runner.invoke(
        app,
        [
            "compare",
            str(cache_dir),
            str(tiny_pair["candidate"]),
            "--out",
            str(tmp_path / "run"),
            "--no-compile",
            "-q",
        ],
    )
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["candidates"][0]["metrics"]["counts"]["tokens"] == 120
    assert results["windowing"]["context_length"] == 48
    # An explicit window setting that differs from the cache's is refused in one line.
    result = runner.invoke(
        app,
        [
            "compare",
            str(cache_dir),
            str(tiny_pair["candidate"]),
            "-c",
            "64",
            "--out",
            str(tmp_path / "run2"),
        ],
    )
    assert result.exit_code == 2
    assert "differ from the reference cache" in result.output
    assert open_cache(cache_dir).num_tokens == 120


def test_yaml_experiment_accepts_a_reference_cache(built, tmp_path):
    """``reference: {cache: DIR}`` in YAML: only the candidate loads; numbers equal the live run."""
    import yaml
    from typer.testing import CliRunner

    from lmkl.cli import app

    config = {
        "name": "cached",
        "reference": {"cache": str(built["root"] / "exact"), "label": "ref"},
        "candidates": [{"model": built["cand"].model, "label": "cand", "dtype": "float32"}],
        "datasets": [{"source": str(built["data"])}],
        "windowing": {"mode": "documents", "context_length": 48, "stride": 24},
        "compute": {"batch_size": 3, "chunk_tokens": 50, "compile": False},
    }
    path = tmp_path / "cached.yaml"
    path.write_text(yaml.safe_dump(config))
    out = tmp_path / "run"
    result = CliRunner().invoke(app, ["run", str(path), "--out", str(out)])
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    live_kl = built["live"].results["candidates"][0]["metrics"]["kl"]["mean"]
    assert results["candidates"][0]["metrics"]["kl"]["mean"] == pytest.approx(live_kl, abs=1e-7)
