"""lmkl sample-kl: estimators against an exhaustive float64 truth, agreement, seeding, EOS, CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy import special
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from lmkl.cli import app
from lmkl.engine.loop import execute
from lmkl.engine.results import SCHEMA_VERSION
from lmkl.engine.sample_kl import SampledKL
from lmkl.engine.sampling import SampleSpec, draw_tokens, sampling_log_probs, sequence_estimators
from lmkl.specs import ComputeSpec, DataSpec, ModelSpec, OutputSpec

PROMPTS = ['The "assert" statement', "Suspend the execution of", "A list is"]


@pytest.fixture(scope="module")
def hf_models(tiny_pair):
    tok = AutoTokenizer.from_pretrained(tiny_pair["reference"])
    models = [
        AutoModelForCausalLM.from_pretrained(tiny_pair[k], dtype=torch.float32).eval()
        for k in ("reference", "candidate")
    ]
    return tok, models


def prompts_file(path: Path, prompts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in prompts))
    return path


def run(tiny_pair, prompts: Path, out: Path, **sampling) -> dict:
    kind = SampledKL(
        ModelSpec(model=str(tiny_pair["reference"]), label="ref"),
        ModelSpec(model=str(tiny_pair["candidate"]), label="cand"),
        DataSpec(source=str(prompts)),
        SampleSpec(**sampling),
        ComputeSpec(),
    )
    return execute(kind, OutputSpec(dir=str(out))).results


def log_softmax64(model, ids: list[list[int]]) -> np.ndarray:
    """Float64 log-probabilities at the last position of each (equal-length) sequence."""
    with torch.no_grad():
        logits = model(torch.tensor(ids)).logits[:, -1, :512]
    return special.log_softmax(logits.double().numpy(), axis=-1)


def kl64(lp: np.ndarray, lq: np.ndarray) -> np.ndarray:
    return special.rel_entr(np.exp(lp), np.exp(lq)).sum(-1)


def exhaustive_two_token_kl(hf_models, prompt: str, stops: set[int]) -> tuple[float, float]:
    """Exact KL(P‖Q) and KL(Q‖P) over continuations of at most two tokens, stopped at ``stops``.

    Enumerates every first token: KL = KL_1 + Σ_{y1 ∉ stops} s(y1) · KL_2(y1) (chain rule).
    """
    tok, (ref, cand) = hf_models
    x = tok(prompt)["input_ids"]
    lp1, lq1 = (log_softmax64(m, [x])[0] for m in (ref, cand))
    seconds = [[*x, y] for y in range(512)]
    lp2, lq2 = log_softmax64(ref, seconds), log_softmax64(cand, seconds)
    go_on = np.array([y not in stops for y in range(512)], dtype=float)
    forward = kl64(lp1, lq1) + np.sum(np.exp(lp1) * go_on * kl64(lp2, lq2))
    reverse = kl64(lq1, lp1) + np.sum(np.exp(lq1) * go_on * kl64(lq2, lp2))
    return float(forward), float(reverse)


@pytest.mark.parametrize("direction", ["forward", "reverse"])
def test_estimators_match_exhaustive_truth(tiny_pair, hf_models, tmp_path, direction):
    tok, (ref, _) = hf_models
    prompts = PROMPTS[:2]
    # The reference's likeliest first token is made a stop token, so stopping is exercised.
    first = log_softmax64(ref, [tok(prompts[0])["input_ids"]])[0]
    stop = int(first.argmax())
    results = run(
        tiny_pair,
        prompts_file(tmp_path / "p.jsonl", prompts),
        tmp_path / "run",
        num_samples=1500,
        max_new_tokens=2,
        batch_size=500,
        direction=direction,
        stop_token_ids=[stop],
    )
    truths = [exhaustive_two_token_kl(hf_models, p, {stop, tok.eos_token_id}) for p in prompts]
    truth = float(np.mean([t[0 if direction == "forward" else 1] for t in truths]))
    block = results["candidates"][0]["metrics"]["sampled_kl"]
    assert block["target"] == ("KL(P‖Q)" if direction == "forward" else "KL(Q‖P)")
    assert block["biased"] is False and block["counts"]["stopped"] > 0
    est = block["estimators"]
    for name in ("exact_per_step", "k1", "k3", "k3_sequence"):
        assert est[name]["unbiased"] is True
        assert abs(est[name]["mean"] - truth) <= 4 * est[name]["se"], (name, est[name], truth)
    assert est["k2"]["unbiased"] is False
    # Rao-Blackwellisation lowers the variance.
    assert est["exact_per_step"]["se"] < est["k1"]["se"]
    assert est["exact_per_step"]["se"] < 0.02 * truth


def test_longer_continuations_estimators_agree(tiny_pair, tmp_path):
    results = run(
        tiny_pair,
        prompts_file(tmp_path / "p.jsonl", PROMPTS),
        tmp_path / "run",
        num_samples=96,
        max_new_tokens=8,
        batch_size=96,
    )
    est = results["candidates"][0]["metrics"]["sampled_kl"]["estimators"]
    names = ("exact_per_step", "k1", "k3")
    for i, a in enumerate(names):
        for b in names[i + 1 :]:
            gap = abs(est[a]["mean"] - est[b]["mean"])
            assert gap <= 3 * math.hypot(est[a]["se"], est[b]["se"]), (a, b, est[a], est[b])
    seq = results["candidates"][0]["metrics"]["sequence_kl"]
    assert seq["mean"] == est["exact_per_step"]["mean"] and seq["biased"] is False
    assert est["exact_per_step"]["se_prompts"] > 0


@pytest.fixture(scope="module")
def small_run(tiny_pair, tmp_path_factory):
    root = tmp_path_factory.mktemp("small-run")
    prompts = prompts_file(root / "p.jsonl", PROMPTS[:2])
    results = run(
        tiny_pair, prompts, root / "run", num_samples=6, max_new_tokens=10, batch_size=4, seed=7
    )
    return root, prompts, results


def test_per_step_values_match_independent_float64(small_run, hf_models):
    root, _, _ = small_run
    tok, (ref, cand) = hf_models
    sample = json.loads((root / "run" / "samples.jsonl").read_text().splitlines()[3])
    tokens = pq.read_table(root / "run" / "tokens.parquet").to_pandas()
    rows = tokens[(tokens.doc_id == sample["prompt_id"])]
    rows = rows[rows.window_id == rows.window_id.unique()[sample["sample_id"]]]
    prompt = tok(PROMPTS[sample["prompt_id"]])["input_ids"]
    seq = prompt + sample["token_ids"]
    with torch.no_grad():
        lp, lq = (
            special.log_softmax(m(torch.tensor([seq])).logits[0, :, :512].double().numpy(), -1)
            for m in (ref, cand)
        )
    steps = range(len(prompt) - 1, len(seq) - 1)
    want_kl = np.array([kl64(lp[t], lq[t]) for t in steps])
    want_nll_p = np.array([-lp[t, seq[t + 1]] for t in steps])
    want_nll_q = np.array([-lq[t, seq[t + 1]] for t in steps])
    assert rows.token_id.tolist() == sample["token_ids"]
    np.testing.assert_allclose(rows.kl.to_numpy(), want_kl, atol=1e-5)
    np.testing.assert_allclose(rows.nll_reference.to_numpy(), want_nll_p, atol=1e-5)
    np.testing.assert_allclose(rows.nll_candidate.to_numpy(), want_nll_q, atol=1e-5)
    samples = pq.read_table(root / "run" / "samples.parquet").to_pandas()
    row = samples[
        (samples.prompt_id == sample["prompt_id"]) & (samples.sample_id == sample["sample_id"])
    ].iloc[0]
    assert row.exact_per_step == pytest.approx(want_kl.sum(), abs=1e-4)
    assert row.k1 == pytest.approx(want_nll_q.sum() - want_nll_p.sum(), abs=1e-4)
    assert row.log_sampling == pytest.approx(-want_nll_p.sum(), abs=1e-3)  # sampled from P


def test_seeded_runs_are_reproducible(tiny_pair, small_run):
    root, prompts, first = small_run
    again = run(
        tiny_pair, prompts, root / "again", num_samples=6, max_new_tokens=10, batch_size=4, seed=7
    )
    run(tiny_pair, prompts, root / "other", num_samples=6, max_new_tokens=10, batch_size=4, seed=8)
    text = {
        name: [
            json.loads(x)["token_ids"]
            for x in (root / name / "samples.jsonl").read_text().splitlines()
        ]
        for name in ("run", "again", "other")
    }
    assert text["run"] == text["again"]
    assert text["run"] != text["other"]
    est = first["candidates"][0]["metrics"]["sampled_kl"]["estimators"]
    assert est == again["candidates"][0]["metrics"]["sampled_kl"]["estimators"]


def test_stop_tokens_end_continuations(tiny_pair, hf_models, tmp_path):
    tok, _ = hf_models
    stop = tok.convert_tokens_to_ids("e")  # a frequent token, so many continuations stop early
    results = run(
        tiny_pair,
        prompts_file(tmp_path / "p.jsonl", PROMPTS),
        tmp_path / "run",
        num_samples=8,
        max_new_tokens=12,
        batch_size=8,
        stop_token_ids=[stop],
    )
    lines = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert any(s["stopped"] for s in lines) and not all(s["stopped"] for s in lines)
    for s in lines:
        ids = s["token_ids"]
        stops_at = [i for i, t in enumerate(ids) if t in (stop, tok.eos_token_id)]
        if s["stopped"]:
            assert stops_at == [len(ids) - 1]  # the stop token ends it and is kept
        else:
            assert stops_at == [] and len(ids) == 12
    tokens = pq.read_table(tmp_path / "run" / "tokens.parquet")
    assert tokens.num_rows == sum(len(s["token_ids"]) for s in lines)
    counts = results["candidates"][0]["metrics"]["sampled_kl"]["counts"]
    assert counts["stopped"] == sum(s["stopped"] for s in lines)
    assert stop in results["sampling"]["stop_token_ids"]


def test_sampling_log_probs_against_numpy():
    gen = torch.Generator().manual_seed(0)
    logits = torch.randn(5, 40, generator=gen, dtype=torch.float64) * 2
    for temperature, top_k, top_p in (
        (1.0, 0, 1.0),
        (0.7, 0, 1.0),
        (1.3, 6, 1.0),
        (1.0, 0, 0.6),
        (2.0, 10, 0.8),
    ):
        got = sampling_log_probs(logits, temperature, top_k, top_p).numpy()
        for row, out in zip(logits.numpy(), got, strict=True):
            x = row / temperature
            keep = np.ones_like(x, dtype=bool)
            if top_k:
                keep &= x >= np.sort(x)[::-1][top_k - 1]
            p = np.where(keep, np.exp(x - x.max()), 0)
            p /= p.sum()
            if top_p < 1:
                order = np.argsort(-p)
                before = np.concatenate([[0], np.cumsum(p[order])[:-1]])
                nucleus = np.zeros_like(keep)
                nucleus[order[before < top_p]] = True
                p = np.where(nucleus, p, 0)
                p /= p.sum()
            np.testing.assert_allclose(np.exp(out), p, atol=1e-12)


def test_inverse_cdf_draws_follow_the_distribution():
    probs = np.array([0.5, 0.0, 0.3, 0.15, 0.05])
    with np.errstate(divide="ignore"):
        lp = torch.tensor(np.log(probs))[None].repeat(20000, 1)
    u = torch.rand(20000, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    counts = np.bincount(draw_tokens(lp, u).numpy(), minlength=5)
    assert counts[1] == 0  # zero probability is never drawn
    keep = probs > 0
    chi2 = np.sum((counts[keep] - 20000 * probs[keep]) ** 2 / (20000 * probs[keep]))
    assert chi2 < 16.3  # 99.9% quantile of chi-square with 3 degrees of freedom


def test_sequence_estimators_formulas():
    lr = [np.array([0.5, -0.2, 0.1]), np.array([np.inf, 0.0])]
    got = sequence_estimators(lr, [np.array([0.1, 0.2, 0.3]), np.array([1.0, 2.0])])
    assert got["k1"][0] == pytest.approx(0.4)
    assert got["k2"][0] == pytest.approx(0.08)
    assert got["k3_sequence"][0] == pytest.approx(math.exp(-0.4) - 1 + 0.4)
    assert got["k3"][0] == pytest.approx(sum(math.exp(-v) - 1 + v for v in (0.5, -0.2, 0.1)))
    assert got["exact_per_step"].tolist() == pytest.approx([0.6, 3.0])
    # A sampled token the other model forbids: +inf, never NaN.
    assert all(math.isinf(got[k][1]) and got[k][1] > 0 for k in ("k1", "k3", "k3_sequence"))


def test_cli_truncated_sampling_is_flagged(tiny_pair, tmp_path):
    prompts = prompts_file(tmp_path / "p.jsonl", PROMPTS[:2])
    result = CliRunner().invoke(
        app,
        [
            "sample-kl",
            str(tiny_pair["reference"]),
            str(tiny_pair["candidate"]),
            "--prompts",
            str(prompts),
            "-n",
            "4",
            "--max-new-tokens",
            "6",
            "--top-k",
            "5",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "NOT KL(P‖Q)" in result.output.replace("\n", " ")
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["schema_version"] == SCHEMA_VERSION and results["kind"] == "sample-kl"
    assert results["sampling"]["top_k"] == 5 and results["sampling"]["exact"] is False
    metrics = results["candidates"][0]["metrics"]
    block = metrics["sampled_kl"]
    assert block["biased"] is True and "NOT KL(P‖Q)" in block["warning"]
    assert not any(e["unbiased"] for e in block["estimators"].values())
    assert metrics["sequence_kl"]["biased"] is True
    # The standard per-token keys are there for `lmkl report`.
    assert {"kl", "reverse_kl", "jsd", "ppl", "top1_agreement", "counts"} <= set(metrics)
    assert metrics["counts"]["documents"] == 2 and metrics["counts"]["windows"] == 8
    samples = pq.read_table(tmp_path / "run" / "samples.parquet")
    assert samples.num_rows == 8
    assert {
        "k1",
        "k2",
        "k3",
        "k3_sequence",
        "exact_per_step",
        "log_p",
        "log_q",
        "log_sampling",
        "stopped",
        "tokens",
    } <= set(samples.column_names)
    # With top-k = 5 every sampled token was among the reference's 5 likeliest.
    tokens = pq.read_table(tmp_path / "run" / "tokens.parquet").to_pandas()
    assert len(tokens) == int(samples["tokens"].to_numpy().sum())


def test_cli_needs_prompts(tiny_pair):
    result = CliRunner().invoke(
        app, ["sample-kl", str(tiny_pair["reference"]), str(tiny_pair["candidate"])]
    )
    assert result.exit_code == 2
    assert "--prompts" in result.output
