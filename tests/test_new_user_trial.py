"""What a new user's trial of lmkl found confusing, each checked where it was seen: the report
table's intervals, runs that cannot be compared, the summary's wording, inspect's numbers, the
dry-run plan of a quantization study, resuming, and the report's size axis."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import test_report
from synthetic import SyntheticCandidate, synthesize_run
from test_narrow_output import assert_uncut, run_cli, run_tiny_study

from lmkl.formatting import format_ci, format_percent, format_value, normal_interval
from lmkl.report.runs import load_run

#: A real run of the tiny models (two candidates, worst positions with their top-5 lists).
real_run = test_report.real_run

COMPARE_NOTE = (
    "± is one standard error over tokens; [low, high] is a 95% CI (for the KL mean: a "
    "bootstrap over documents, the interval to quote)"
)


def flat(output: str) -> str:
    """The output as one line: a note folded at 80 columns reads whole."""
    return re.sub(r"\s*\n\s*", " ", output)


@pytest.fixture(scope="module")
def study(tiny_pair, tmp_path_factory):
    """A two-candidate experiment with a noise floor, sized by memory bytes."""
    root = tmp_path_factory.mktemp("trial-study")
    extra = "ranking: {resamples: 200, size: memory_bytes}\nnoise_floor: true\n"
    return run_tiny_study(tiny_pair, root, "trial", ("student", "half"), extra)


@pytest.fixture(scope="module")
def two_windowings(tmp_path_factory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("windowings")
    a = synthesize_run(root / "demo", 2000, [SyntheticCandidate("a", 1.0)], seed=5,
                       context_length=256)  # fmt: skip
    b = synthesize_run(root / "int", 2000, [SyntheticCandidate("b", 1.3)], seed=5,
                       context_length=512)  # fmt: skip
    return a, b


# ------------------------------------------------------------------------------------------
# 1. The report table's "95% CI" is the document bootstrap


@pytest.mark.parametrize("env", ({"COLUMNS": "80"}, {}))
def test_report_table_quotes_the_bootstrap_ci(two_windowings, env):
    run = two_windowings[0]
    output = run_cli(["report", str(run), "--format", "table"], env)
    assert_uncut(output)
    kl = json.loads((run / "results.json").read_text())["candidates"][0]["metrics"]["kl"]
    boot = format_ci([kl["ci_low"], kl["ci_high"]])
    token = normal_interval(kl)
    assert boot != token
    lines = output.splitlines()
    # In the leaderboard the bracket is the bootstrap; the token interval is labelled so.
    board = "\n".join(lines[: next(i for i, x in enumerate(lines) if "All statistics" in x)])
    assert "95% CI" in board and boot in board and token not in board
    assert COMPARE_NOTE in flat(output)
    text = flat(output)
    assert f"95% CI (bootstrap over documents) {boot}" in text or re.search(
        r"95% CI \(bootstrap over documents\)[^\[]*" + re.escape(boot), text
    )
    assert re.search(r"token interval \(± 1\.96 se\)[^\[]*" + re.escape(token), text)
    assert not re.search(r"95% CI[^\[(]*" + re.escape(token), text)


def test_report_table_of_an_experiment_has_next_and_noise_columns(study):
    output = run_cli(["report", str(study["out"]), "--format", "table"], {"COLUMNS": "160"})
    results = json.loads((study["out"] / "results.json").read_text())
    rows = [r for r in results["ranking"]["leaderboard"] if r["kind"] == "candidate"]
    assert "Δ next [CI]" in output and "> noise" in output
    first = rows[0]
    assert format_ci(first["vs_next"]["ci"], 3) in output
    for row in rows:
        assert format_ci(row["ci"]) in output


# ------------------------------------------------------------------------------------------
# 2. Runs with different windowing, data or reference are not ranked silently


def test_report_warns_first_when_runs_differ_in_windowing(two_windowings, study):
    from lmkl.report.build import build_report

    report = build_report(list(two_windowings))
    assert report.reading[0] == (
        "Warning: these runs differ in context length (256 vs 512), stride (128 vs 256): "
        "their KLs are not comparable."
    )
    output = run_cli(["report", *map(str, two_windowings), "--format", "table"], {})
    assert "stride (128 vs 256): their KLs are not comparable" in flat(output)
    # A second run with the same windowing, data and reference: no warning.
    same = build_report([two_windowings[0], two_windowings[0]])
    assert not any("not comparable" in line for line in same.reading)
    # Different data and reference (an experiment on the tiny models) are named as well.
    mixed = build_report([two_windowings[0], study["out"]])
    assert mixed.reading[0].startswith(
        "Warning: these runs differ in context length (256 vs 48), stride (128 vs 24), data, "
        "reference ("
    )


# ------------------------------------------------------------------------------------------
# 8. One wording for where the KL comes from; "concentrated" only when it clearly is


def _profile(low_tokens: float, low_kl: float) -> list[dict[str, float]]:
    """Two buckets: below 0.5 (low-confidence) and from 0.95 (confident)."""
    return [
        {"low": 0.0, "high": 0.5, "share": low_tokens, "kl_share": low_kl},
        {"low": 0.95, "high": 1.0, "share": 1 - low_tokens, "kl_share": 1 - low_kl},
    ]


def test_confidence_wording_is_one_and_says_concentrated_only_when_it_is():
    from lmkl.report.reading import confidence_clause

    # The trial's two candidates: 90% and 89% of the KL on 81% of the tokens.
    first, second = (confidence_clause(_profile(0.81, k)) for k in (0.90, 0.89))
    for clause, kl in ((first, "90%"), (second, "89%")):
        assert clause == (
            "its KL is spread like the tokens: low-confidence positions (reference top-1 "
            f"probability < 0.5) hold {kl} of the KL on 81% of the tokens"
        )
    # Clearly more KL than tokens (share + 0.15, or 1.5×): concentrated, same numbers' wording.
    assert confidence_clause(_profile(0.40, 0.56)).startswith(
        "its KL is concentrated in low-confidence positions"
    )
    assert confidence_clause(_profile(0.10, 0.16)).endswith("16% of the KL on 10% of the tokens")
    assert "concentrated" in confidence_clause(_profile(0.10, 0.16))
    assert "spread like" in confidence_clause(_profile(0.40, 0.54))


# ------------------------------------------------------------------------------------------
# 12, 13. inspect: probabilities to three significant digits; --doc lists that document's tokens


def test_inspect_prints_small_probabilities_and_kl_digits(real_run):
    output = run_cli(["inspect", str(real_run), "-n", "3"], {"COLUMNS": "160"})
    worst = sorted(
        (e for e in load_run(real_run).worst if e["candidate"] == "student"), key=lambda e: -e["kl"]
    )[:3]
    probs = [item["prob"] for e in worst for side in ("reference_top5", "candidate_top5")
             for item in e[side]]  # fmt: skip
    assert min(probs) < 0.005  # a probability that rounds to "0%" at whole percents
    text = flat(output)
    for prob in probs:
        assert format_percent(prob) in text, (format_percent(prob), text)
    assert not re.search(r"\s0%", output)
    for e in worst:
        assert format_value(e["kl"]) in output


def test_inspect_doc_lists_the_worst_tokens_of_that_document(real_run):
    worst = sorted(
        (e for e in load_run(real_run).worst if e["candidate"] == "student"), key=lambda e: -e["kl"]
    )
    docs = [e["doc_id"] for e in worst]
    other = next(d for d in docs if d != docs[0])  # not the document of the run's worst token
    output = run_cli(["inspect", str(real_run), "--doc", str(other), "-n", "5"], {})
    mine = [e for e in worst if e["doc_id"] == other][:5]
    assert f"worst {len(mine)} tokens of student in document {other}" in flat(output)
    listed = re.findall(r"doc:pos: (\d+):(\d+)", output)  # 80 columns: one block per token
    assert [(int(d), int(p)) for d, p in listed] == [(e["doc_id"], e["position"]) for e in mine]


# ------------------------------------------------------------------------------------------
# 15. The dry-run plan shows each candidate's quantization; the reference once


@pytest.mark.parametrize("env", ({"COLUMNS": "80"}, {}))
def test_dry_run_plan_shows_schemes_and_the_reference_once(tiny_pair, tmp_path, env):
    data = tmp_path / "docs.jsonl"
    data.write_text(json.dumps({"text": "def f(x):\n    return x + 1\n" * 5}) + "\n")
    ref = tiny_pair["reference"]
    config = tmp_path / "quant.yaml"
    config.write_text(f"""
name: quant
reference: {{model: {ref}, device: cpu}}
candidates:
  - {{label: a, model: {ref}, device: cpu, quantize: {{method: torchao, scheme: int8_weight_only}}}}
  - {{label: b, model: {ref}, device: cpu,
      quantize: {{method: torchao, scheme: int4_weight_only, group_size: 32}}}}
datasets: [{{source: {data}}}]
windowing: {{context_length: 32, stride: 16}}
""")
    output = run_cli(["run", str(config), "--dry-run"], env)
    assert_uncut(output, str(ref))
    text = flat(output)
    assert "torchao:int8_weight_only" in text and "torchao:int4_weight_only:g32" in text
    assert text.count(f"reference: {ref}") == 1
    assert "reference reference" not in text


# ------------------------------------------------------------------------------------------
# 18. A resume says so (piped too), and its throughput names the tokens it covers


def test_resume_says_what_it_keeps_and_what_its_rate_covers(
    tiny_pair, small_jsonl, tmp_path, monkeypatch
):
    import pyarrow.parquet as pq
    from runtools import compare_args, disk_full_at, invoke

    out = tmp_path / "run"
    args = compare_args(tiny_pair, small_jsonl, out)
    with disk_full_at(monkeypatch, 3):  # the third part: two parts are kept
        code, _ = invoke(args)
    assert code == 1
    kept = sorted((out / "parts").glob("part-*"))
    kept_rows = sum(pq.read_table(p).num_rows for p in kept)
    assert len(kept) == 2
    code, output = invoke([*args[:-1], "--resume"])  # not --quiet, and piped (CliRunner)
    assert code == 0, output
    results = json.loads((out / "results.json").read_text())
    resumed = re.search(r"resuming: 2 of (\d+) parts kept, scoring the rest\n", output)
    assert resumed and int(resumed.group(1)) > 2, output
    rest = results["candidates"][0]["metrics"]["counts"]["tokens"] - kept_rows
    assert rest > 0
    seconds = results["throughput"]["seconds"]
    from lmkl.formatting import format_rate, format_seconds

    line = (
        f"{format_rate(rest, seconds)} over {format_seconds(seconds)} scoring the {rest:,} "
        "tokens not kept"
    )
    assert line in flat(output), output


# ------------------------------------------------------------------------------------------
# 10. The report's Pareto set uses the run's size axis, and its size column has a unit


def test_report_uses_the_runs_size_axis_with_its_unit(study):
    from lmkl.formatting import byte_size
    from lmkl.report.build import build_report

    results = json.loads((study["out"] / "results.json").read_text())
    pareto = results["ranking"]["pareto"]
    assert pareto["size"] == "memory_bytes"
    said = f"Pareto-optimal (memory bytes vs kl.mean): {', '.join(pareto['labels'])}"
    assert said in flat(study["printed"])
    report = build_report([study["out"]])
    front = [k for k, on in zip(report.sizes()["keys"], report.sizes()["pareto"], strict=True)
             if on]  # fmt: skip
    assert sorted(front) == sorted(pareto["labels"])
    assert f"Pareto-optimal (memory bytes vs kl.mean): {', '.join(front)}." in report.reading
    output = run_cli(["report", str(study["out"]), "--format", "table"], {"COLUMNS": "160"})
    for row in results["ranking"]["leaderboard"]:
        if row["kind"] == "candidate":
            assert byte_size(row["size"]["memory_bytes"]) in output
    assert "by parameters" not in output
