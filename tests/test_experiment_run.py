"""End to end: a three-candidate YAML experiment on tiny fixtures, offline.

Checks the reference is computed once per batch (and loaded once for all datasets), the
leaderboard and Pareto set against numbers recomputed from tokens.parquet, micro/macro averages,
gates and their exit code, the dry run, the noise floor and the ``demo:`` names.
"""

from __future__ import annotations

import json
import math
import shutil
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from typer.testing import CliRunner

from lmkl import models as models_module
from lmkl.cli import app
from lmkl.engine.results import SCHEMA_VERSION
from lmkl.experiment.run import perturb_weights, plan_experiment
from lmkl.experiment.schema import load_config

ROOT = Path(__file__).resolve().parents[1]
BATCH = 3
GATE = 0.01  # tiny students sit far above it (KL ~0.1), bfloat16 far below (KL ~1e-5)


def write_docs(path: Path, texts: list[str]) -> Path:
    with path.open("w") as fh:
        for text in texts:
            fh.write(json.dumps({"text": text}) + "\n")
    return path


@pytest.fixture(scope="module")
def study(tiny_pair, gpt2_candidate, tmp_path_factory):
    """Write the config and data of a three-candidate, two-dataset study."""
    root = tmp_path_factory.mktemp("study")
    texts = [json.loads(x)["text"] for x in tiny_pair["heldout"].read_text().splitlines()]
    write_docs(root / "a.jsonl", [t[:300] for t in texts[:4]])
    write_docs(root / "b.jsonl", [t[:250] for t in texts[4:6]])
    config = root / "study.yaml"
    config.write_text(f"""
name: tiny-study
seed: 3
reference: {{model: {tiny_pair["reference"]}, device: cpu}}
candidates:
  - {{label: small, model: {tiny_pair["candidate"]}, group: students, device: cpu}}
  - {{label: gpt2, model: {gpt2_candidate}, group: students, device: cpu}}
  - {{label: bf16, model: {tiny_pair["reference"]}, dtype: bfloat16, device: cpu}}
datasets:
  - {{source: {root / "a.jsonl"}, label: a}}
  - {{source: {root / "b.jsonl"}, label: b, weight: 3}}
windowing: {{mode: documents, context_length: 48, stride: 24}}
compute: {{batch_size: 8}}
ranking: {{resamples: 300}}
noise_floor: true
""")
    return {"root": root, "config": config}


@pytest.fixture(scope="module")
def ran(study):
    """Run the study through the CLI while counting forward calls and model loads."""
    calls: dict[str, int] = {}
    loads: list[str] = []
    loading = []
    original_hidden = models_module.LoadedModel.hidden_states
    original_load = models_module.load_model

    def counting_hidden(self, input_ids, attention_mask):
        if not loading:  # load_model's own probe of the decoder/head split is not scoring
            calls[self.label] = calls.get(self.label, 0) + 1
        return original_hidden(self, input_ids, attention_mask)

    def counting_load(spec, device=None, tokenizer=None):
        loads.append(spec.display_name)
        loading.append(spec)
        try:
            return original_load(spec, device, tokenizer)
        finally:
            loading.pop()

    out = study["root"] / "run"
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(models_module.LoadedModel, "hidden_states", counting_hidden)
        mp.setattr(models_module, "load_model", counting_load)
        mp.setattr("lmkl.engine.token_compare.load_model", counting_load)
        mp.setattr("lmkl.engine.common.load_model", counting_load)
        result = CliRunner().invoke(
            app,
            [
                "run",
                str(study["config"]),
                f"compute.batch_size={BATCH}",
                "--out",
                str(out),
                "--fail-above",
                f"kl.mean={GATE}",
            ],
        )
    return {
        "result": result,
        "out": out,
        "calls": calls,
        "loads": loads,
        "results": json.loads((out / "results.json").read_text()),
    }


def tokens(out: Path, dataset: str) -> dict[str, dict[str, np.ndarray]]:
    table = pq.read_table(out / "datasets" / dataset / "tokens.parquet").to_pandas()
    return {
        label: {c: group[c].to_numpy() for c in group.columns}
        for label, group in table.groupby("candidate")
    }


def test_reference_runs_once_per_batch_and_models_load_once(ran):
    out, calls = ran["out"], ran["calls"]
    batches = 0
    for dataset in ("a", "b"):
        table = pq.read_table(out / "datasets" / dataset / "tokens.parquet")
        windows = len(set(table["window_id"].to_pylist()))
        batches += math.ceil(windows / BATCH)
    assert batches >= 3
    # One reference forward per batch, shared by all candidates (never once per candidate).
    assert calls["reference"] == batches
    for label in ("small", "gpt2", "bf16", "noise-floor"):
        assert calls[label] == batches
    # Two datasets, yet every model was loaded once.
    assert sorted(ran["loads"]) == sorted(["reference", "small", "gpt2", "bf16", "noise-floor"])


def test_gate_fails_with_exit_3_after_writing_results(ran):
    result, out, results = ran["result"], ran["out"], ran["results"]
    assert result.exit_code == 3, result.output
    pooled = {}
    for dataset in ("a", "b"):
        for label, cols in tokens(out, dataset).items():
            pooled.setdefault(label, []).append(cols["kl"].astype(np.float64))
    means = {label: np.concatenate(parts).mean() for label, parts in pooled.items()}
    failing = {label for label in ("small", "gpt2", "bf16") if means[label] > GATE}
    assert failing and failing != {"small", "gpt2", "bf16"}  # the gate separates them
    assert {f["candidate"] for f in results["gates"]["failures"]} == failing
    assert results["gates"]["passed"] is False
    assert f"{len(failing)} of 3 candidates failed a quality gate" in result.stderr
    for label in failing:
        assert f"{label}: kl.mean = " in result.stderr
    assert "noise-floor: kl.mean" not in result.stderr  # gates apply to candidates only


def test_leaderboard_pareto_and_averages_match_tokens(ran):
    out, results = ran["out"], ran["results"]
    ranking = results["ranking"]
    assert ranking["metric"] == "kl.mean" and ranking["resamples"] == 300
    per = {"a": tokens(out, "a"), "b": tokens(out, "b")}
    labels = ["small", "gpt2", "bf16"]
    micro = {
        lab: np.concatenate([per[d][lab]["kl"] for d in per]).astype(np.float64).mean()
        for lab in labels
    }
    macro = {
        lab: (
            per["a"][lab]["kl"].astype(np.float64).mean()
            + 3 * per["b"][lab]["kl"].astype(np.float64).mean()
        )
        / 4
        for lab in labels
    }
    board = [r for r in ranking["leaderboard"] if r["kind"] == "candidate"]
    assert [r["label"] for r in board] == sorted(labels, key=micro.get)
    for row in board:
        assert row["value"] == pytest.approx(micro[row["label"]], rel=1e-9)
        assert row["ci"][0] <= row["value"] <= row["ci"][1]
    for row in ranking["by_dataset"]:
        assert row["micro"] == pytest.approx(micro[row["label"]], rel=1e-9)
        assert row["macro"] == pytest.approx(macro[row["label"]], rel=1e-9)
    # Top-level candidates hold the core metrics over all tokens (micro).
    for cand in results["candidates"]:
        assert cand["metrics"]["kl"]["mean"] == pytest.approx(micro[cand["label"]], rel=1e-9)
        assert cand["macro"]["kl.mean"] == pytest.approx(macro[cand["label"]], rel=1e-9)
        docs = sum(len(set(per[d][cand["label"]]["doc_id"])) for d in per)
        assert cand["metrics"]["counts"]["documents"] == docs
    # Paired difference with the next candidate, on identical tokens.
    first, second = board[0]["label"], board[1]["label"]
    assert board[0]["vs_next"]["label"] == second
    assert board[0]["vs_next"]["diff"] == pytest.approx(micro[first] - micro[second], rel=1e-9)
    # Pareto set from sizes (parameters), recomputed by a sweep.
    sizes = {r["label"]: r["size"]["parameters"] for r in board}
    assert sizes["bf16"] > sizes["small"]  # the reference is bigger than the student
    best, front = math.inf, set()
    for label in sorted(labels, key=lambda x: (sizes[x], micro[x])):
        if micro[label] < best:
            front.add(label)
            best = micro[label]
    assert set(ranking["pareto"]["labels"]) == front
    assert {r["label"] for r in board if r["pareto"]} == front
    # Terminal output: the leaderboard with CI and the Pareto line.
    stdout = ran["result"].stdout
    assert "Leaderboard: kl.mean" in stdout and "95% CI" in stdout
    assert (
        f"Pareto-optimal (parameters vs kl.mean): {', '.join(ranking['pareto']['labels'])}"
        in stdout
    )


def test_noise_floor_row_and_sub_runs_keep_the_core_contract(ran):
    out, results = ran["out"], ran["results"]
    floor = [r for r in results["ranking"]["leaderboard"] if r["kind"] == "noise_floor"]
    assert len(floor) == 1 and floor[0]["rank"] is None
    per = {"a": tokens(out, "a"), "b": tokens(out, "b")}
    noise = np.concatenate([per[d]["noise-floor"]["kl"] for d in per]).astype(np.float64)
    assert floor[0]["value"] == pytest.approx(noise.mean(), rel=1e-9)
    assert 0 < floor[0]["value"] < results["ranking"]["leaderboard"][0]["value"] * 1e3
    assert results["noise_floor"]["relative_std"] == 1e-3
    students = [r for r in results["ranking"]["leaderboard"] if r["label"] in ("small", "gpt2")]
    assert all(r["vs_noise_floor"]["distinguishable"] for r in students)
    for dataset in ("a", "b"):
        sub = json.loads((out / "datasets" / dataset / "results.json").read_text())
        assert sub["schema_version"] == SCHEMA_VERSION
        assert [c["label"] for c in sub["candidates"]] == ["small", "gpt2", "bf16", "noise-floor"]
        assert (out / "datasets" / dataset / "config.yaml").exists()
    assert [d["dir"] for d in results["datasets"]] == ["datasets/a", "datasets/b"]
    config = load_config(out / "config.yaml")  # the resolved config is itself a valid config
    assert config.compute.batch_size == BATCH and config.gates.fail_above == {"kl.mean": GATE}


def test_resume_finishes_a_missing_dataset_identically(ran, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(ran["out"], out)
    (out / "results.json").unlink()
    shutil.rmtree(out / "datasets" / "b")
    result = CliRunner().invoke(
        app, ["run", str(out / "config.yaml"), "--out", str(out), "--resume", "-q"]
    )
    assert result.exit_code == 3, result.output  # same gates, same failures
    again = json.loads((out / "results.json").read_text())
    for old, new in zip(
        ran["results"]["ranking"]["leaderboard"], again["ranking"]["leaderboard"], strict=True
    ):
        assert new["label"] == old["label"]
        assert new["value"] == pytest.approx(old["value"], rel=1e-6)
    done = CliRunner().invoke(app, ["run", str(out / "config.yaml"), "--out", str(out), "--resume"])
    assert done.exit_code == 1 and "already complete" in done.stderr


def test_dry_run_plans_without_loading_weights(study, ran, monkeypatch):
    def no_weights(*_args, **_kwargs):
        raise AssertionError("a dry run must not load weights")

    monkeypatch.setattr(models_module, "load_model", no_weights)
    monkeypatch.setattr("lmkl.engine.token_compare.load_model", no_weights)
    monkeypatch.setattr("lmkl.engine.common.load_model", no_weights)
    plan = plan_experiment(load_config(study["config"], [f"compute.batch_size={BATCH}"]))
    for row in plan["datasets"]:
        scored = pq.read_table(ran["out"] / "datasets" / row["label"] / "tokens.parquet")
        assert row["tokens"] * 4 == scored.num_rows  # 3 candidates + the noise floor
    assert [m["label"] for m in plan["models"]] == ["reference", "small", "gpt2", "bf16"]
    result = CliRunner().invoke(
        app,
        [
            "run",
            str(study["config"]),
            "--dry-run",
            "--limit",
            "30",
            "--out",
            str(study["root"] / "never"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "dry run: nothing was scored" in result.stdout and "tokens" in result.stdout
    assert not (study["root"] / "never").exists()


def test_validate_check_models(study, other_tokenizer_model, tmp_path):
    runner = CliRunner()
    ok = runner.invoke(app, ["validate", str(study["config"]), "--check-models"])
    assert ok.exit_code == 0 and "tokenizers match" in ok.stdout
    bad = runner.invoke(
        app,
        [
            "validate",
            str(study["config"]),
            "--check-models",
            f"candidates.1.model={other_tokenizer_model}",
        ],
    )
    assert bad.exit_code == 1 and "differ" in bad.stderr


def test_noise_floor_perturbation_is_the_documented_one(tiny_pair):
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_pair["reference"], dtype=torch.float32)
    noisy = AutoModelForCausalLM.from_pretrained(tiny_pair["reference"], dtype=torch.float32)
    perturb_weights(noisy, 1e-3, seed=5)
    gen = torch.Generator().manual_seed(5)
    for (name, p), (_, q) in zip(base.named_parameters(), noisy.named_parameters(), strict=True):
        z = torch.randn(p.shape, generator=gen, dtype=torch.float32)
        torch.testing.assert_close(q, p * (1 + 1e-3 * z), rtol=1e-6, atol=0, msg=name)


def test_compare_accepts_gates(tiny_pair, small_jsonl, tmp_path):
    runner = CliRunner()
    args = [
        "compare",
        str(tiny_pair["reference"]),
        str(tiny_pair["candidate"]),
        "--data",
        str(small_jsonl),
        "--max-tokens",
        "30",
        "-q",
    ]
    bad = runner.invoke(app, [*args, "--out", str(tmp_path / "bad"), "--fail-above", "kl=x"])
    assert bad.exit_code == 2 and not (tmp_path / "bad").exists()
    failed = runner.invoke(
        app, [*args, "--out", str(tmp_path / "f"), "--fail-below", "top1_agreement=1.01"]
    )  # agreement can never exceed 1
    assert failed.exit_code == 3, failed.output
    assert "candidate: top1_agreement.mean = " in failed.stderr
    assert (tmp_path / "f" / "results.json").exists()


def test_precision_example_runs_on_demo_names(tiny_pair, tmp_path):
    """configs/precision.yaml end to end, its demo: names resolved to a prepared demo cache."""
    from lmkl.demo.assets import DEMO_VERSION, DemoSettings
    from lmkl.demo.names import demo_cache_dir

    settings = DemoSettings()
    root = demo_cache_dir() / f"demo-v{DEMO_VERSION}-{settings.key()}"
    if not root.exists():  # the tiny pair stands in for the real (1.5 min) demo build
        shutil.copytree(tiny_pair["reference"], root / "reference")
        shutil.copytree(tiny_pair["candidate"], root / "candidate")
        lines = tiny_pair["heldout"].read_text().splitlines()[:2]
        write_docs(root / "heldout.jsonl", [json.loads(x)["text"][:400] for x in lines])
        (root / "manifest.json").write_text(
            json.dumps(
                {"demo_version": DEMO_VERSION, "settings": json.loads(json.dumps(asdict(settings)))}
            )
        )
    out = tmp_path / "precision"
    result = CliRunner().invoke(
        app,
        [
            "run",
            str(ROOT / "configs" / "precision.yaml"),
            "--limit",
            "40",
            "--out",
            str(out),
            "ranking.resamples=100",
        ],
    )
    results = json.loads((out / "results.json").read_text())
    assert result.exit_code == (0 if results["gates"]["passed"] else 3), result.output
    rows = {r["label"]: r for r in results["ranking"]["leaderboard"]}
    assert set(rows) == {"bfloat16", "float16", "noise-floor"}
    assert results["reference"]["path"] == str((root / "reference").resolve())
    assert (
        rows["bfloat16"]["size"]["memory_bytes"] * 2 == results["reference"]["parameters"] * 4
    )  # same model, half the bytes per parameter
    assert all(0 < r["value"] < 0.1 for r in rows.values())


def test_llama_cpp_windowing_resamples_chunks(tiny_pair, tmp_path):
    """One stream of text has one document; its chunks are the bootstrap's units instead."""
    from lmkl.experiment.run import run_experiment

    text = "\n".join(json.loads(x)["text"] for x in tiny_pair["heldout"].read_text().splitlines())
    (tmp_path / "stream.txt").write_text(text[:2500])
    config = tmp_path / "lc.yaml"
    config.write_text(f"""
name: lc
reference: {{model: {tiny_pair["reference"]}, device: cpu}}
candidates: [{{label: small, model: {tiny_pair["candidate"]}, device: cpu}}]
datasets: [{{source: {tmp_path / "stream.txt"}}}]
windowing: {{mode: llama-cpp, context_length: 32}}
ranking: {{resamples: 200}}
output: {{dir: {tmp_path / "run"}, save_tokens: false}}
""")
    outcome = run_experiment(load_config(config))
    ranking = outcome.results["ranking"]
    chunks = outcome.results["datasets"][0]["data"]["windows"]
    assert ranking["unit"] == "chunk" and ranking["units"] == chunks > 5
    low, high = ranking["leaderboard"][0]["ci"]
    assert low < ranking["leaderboard"][0]["value"] < high
    assert not (tmp_path / "run" / "datasets" / "stream.txt" / "tokens.parquet").exists()
    assert (tmp_path / "run" / "datasets" / "stream.txt" / "results.json").exists()


def test_a_second_run_of_one_experiment_is_refused_up_front(ran, tmp_path, monkeypatch):
    # Two `lmkl run --resume` of one experiment (a scheduler restarting a job whose first copy
    # still runs): the second is refused in one line before any model loads, changing nothing.
    from runtools import lock_held_elsewhere

    from lmkl.errors import EXIT_BUSY

    out = tmp_path / "copy"
    shutil.copytree(ran["out"], out)
    (out / "results.json").unlink()
    with lock_held_elsewhere(out):
        before = sorted(p.relative_to(out) for p in out.rglob("*"))

        def no_loading(*args, **kwargs):
            raise AssertionError("a model was loaded before the lock was checked")

        monkeypatch.setattr(models_module, "load_model", no_loading)
        monkeypatch.setattr("lmkl.engine.common.load_model", no_loading)
        result = CliRunner().invoke(
            app, ["run", str(out / "config.yaml"), "--out", str(out), "--resume"]
        )
        assert result.exit_code == EXIT_BUSY, result.output
        assert "in use by another lmkl process" in result.stderr
        assert sorted(p.relative_to(out) for p in out.rglob("*")) == before
