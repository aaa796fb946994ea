"""The one-call Python API: ``lmkl.compare`` and ``lmkl.open_run`` over the engine."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from runtools import invoke

import lmkl
from lmkl.errors import UsageError
from lmkl.experiment.schema import example_data_files, load_config


def test_compare_returns_the_run_the_cli_writes(tiny_pair, small_jsonl, tmp_path):
    run = lmkl.compare(
        tiny_pair["reference"],
        tiny_pair["candidate"],
        data=small_jsonl,
        out=tmp_path / "api",
        context_length=64,
        batch_size=2,
        max_tokens=80,
    )
    code, output = invoke(
        [
            "compare",
            str(tiny_pair["reference"]),
            str(tiny_pair["candidate"]),
            "--data",
            str(small_jsonl),
            "--out",
            str(tmp_path / "cli"),
            "--context-length",
            "64",
            "--batch-size",
            "2",
            "--max-tokens",
            "80",
            "--quiet",
        ]
    )
    assert code == 0, output
    cli = json.loads((tmp_path / "cli" / "results.json").read_text())
    assert run.kind == "compare" and run.labels == [c["label"] for c in cli["candidates"]]
    label = run.labels[0]
    assert run.metrics(label)["kl"]["mean"] == pytest.approx(
        cli["candidates"][0]["metrics"]["kl"]["mean"]
    )

    reopened = lmkl.open_run(tmp_path / "api")
    assert reopened.results == json.loads((tmp_path / "api" / "results.json").read_text())
    frame = reopened.tokens(label=label).to_pandas()
    assert len(frame) == 80 == run.metrics()["counts"]["tokens"]
    # The summary's mean KL is the mean of the per-token rows (an independent recomputation).
    assert run.metrics()["kl"]["mean"] == pytest.approx(float(np.mean(frame["kl"])), rel=1e-5)
    worst = reopened.worst(label)
    assert worst and worst[0]["kl"] == pytest.approx(float(frame["kl"].max()), rel=1e-5)
    page = reopened.report(tmp_path / "r.html")
    assert page.exists() and "<html" in page.read_text()[:200].lower()


def test_unknown_option_and_missing_run_are_one_line_errors(tiny_pair, tmp_path):
    with pytest.raises(UsageError, match="unknown keyword 'bach_size'; did you mean batch_size"):
        lmkl.compare(tiny_pair["reference"], tiny_pair["candidate"], data="x", bach_size=2)
    with pytest.raises(lmkl.errors.OutputError, match=r"no results\.json"):
        lmkl.open_run(tmp_path)


def test_relative_data_paths_are_found_beside_the_config(tmp_path, monkeypatch):
    folder = tmp_path / "study"
    folder.mkdir()
    (folder / "held.jsonl").write_text('{"text": "a b c"}\n')
    config = folder / "exp.yaml"
    config.write_text(
        "name: t\nreference: {model: r}\ncandidates: [{label: a, model: c}]\n"
        "datasets: [{source: held.jsonl}]\n"
    )
    monkeypatch.chdir(tmp_path)  # not the config's folder
    assert load_config(config).datasets[0].source == str(folder / "held.jsonl")


def test_init_chat_copies_the_data_it_reads(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, output = invoke(["init", "chat"])
    assert code == 0, output
    assert (tmp_path / "chat.jsonl").read_text() == example_data_files("chat")["chat.jsonl"]
    config = load_config(tmp_path / "chat.yaml")
    assert Path(config.datasets[0].source).resolve() == (tmp_path / "chat.jsonl").resolve()


def test_api_options_are_checked_not_ignored(tiny_pair):
    ref, cand = tiny_pair["reference"], tiny_pair["candidate"]
    with pytest.raises(UsageError, match="dtype"):
        lmkl.compare(ref, cand, data="x.jsonl", dtype="bf16")  # pydantic's error, as one line
    with pytest.raises(UsageError, match="stride"):
        lmkl.compare(ref, cand, data="x.jsonl", context_length=64, stride=100)
    with pytest.raises(UsageError, match="would be ignored"):
        lmkl.compare(ref, cand, data=lmkl.api.DataSpec(source="x.jsonl"), max_samples=1)
    with pytest.raises(UsageError, match="would be ignored"):
        lmkl.compare(lmkl.api.ModelSpec(model=str(ref)), cand, data="x.jsonl", dtype="float16")


def test_adapter_keyword_applies_to_the_candidates_only(tiny_pair, small_jsonl, monkeypatch):
    seen = {}

    def fake_execute(kind, output, **_):
        seen["reference"], seen["candidates"] = kind.reference, kind.candidates
        raise UsageError("stop here")

    monkeypatch.setattr("lmkl.engine.loop.execute", fake_execute)
    with pytest.raises(UsageError, match="stop here"):
        lmkl.compare(
            tiny_pair["reference"],
            tiny_pair["candidate"],
            data=tiny_pair["heldout"],
            adapter="lora",
        )
    assert seen["reference"].adapter is None
    assert [c.adapter for c in seen["candidates"]] == ["lora"]


def test_report_of_a_per_byte_run(tiny_pair, other_tokenizer_model, small_jsonl, tmp_path):
    run = lmkl.compare(
        tiny_pair["reference"],
        other_tokenizer_model,
        data=small_jsonl,
        out=tmp_path / "bytes",
        different_tokenizers=True,
        context_length=64,
    )
    assert run.kind == "bytes-compare" and run.results["token_level"] is False
    assert lmkl.open_run(tmp_path / "bytes").report().exists()
    with pytest.raises(UsageError, match="temperature"):
        lmkl.compare(
            tiny_pair["reference"],
            other_tokenizer_model,
            data=small_jsonl,
            different_tokenizers=True,
            temperature=2.0,
        )


def test_errors_name_the_keywords_of_every_api_function_not_only_compare():
    """Flags of attribute/score_against/build_reference_cache read as their keywords."""
    from lmkl.api import _keyword_text

    assert _keyword_text("pass --high torchao:int8_weight_only --budget-bits BITS") == (
        "pass high='torchao:int8_weight_only' budget_bits=..."
    )
    assert _keyword_text("--budget-bits 3 is too low") == "budget_bits=3 is too low"
    assert _keyword_text("pass --top-k 64 or drop --view-tokens") == (
        "pass top_k=64 or drop view_tokens=..."
    )
    assert _keyword_text("see --no-such-flag") == "see --no-such-flag"
