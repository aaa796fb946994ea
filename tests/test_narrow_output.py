"""Every table a command prints, read at 80 columns and piped (issue 21, item 5).

Rich assumes 80 columns when output is not a terminal; its tables then cut what does not fit
with "…" (``4.074…``, ``kl.me…``, two ``torchao-i…`` columns, paths as ``/tmp/n…``) or squeeze
columns to nothing. Labels here are long and alike, numbers tiny, paths long: every label, every
number and every path must appear whole, and no line may run past 80 columns.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
from typer.testing import CliRunner

from lmkl.cli import app
from lmkl.formatting import format_ci, format_column, format_value

LONG = ("torchao-int4_weight_only-g32", "torchao-int4_weight_only-g16")
WIDTHS = ({"COLUMNS": "80"}, {})  # an 80-column terminal; a pipe (no COLUMNS: rich's 80)


def run_cli(args: list[str], env: dict[str, str]) -> str:
    base = {k: v for k, v in os.environ.items() if k != "COLUMNS"}
    old = dict(os.environ)
    os.environ.clear()
    os.environ.update(base)
    try:
        result = CliRunner().invoke(app, args, env=env)
    finally:
        os.environ.clear()
        os.environ.update(old)
    assert result.exit_code in (0, 3), result.output  # 3: a gate failed, results written
    return result.output


def small_compare(reference, candidates, data, out, *extra: str) -> list[str]:
    """``lmkl compare`` on 200 tokens of ``data``, tables printed (not --quiet)."""
    models = [str(m) for m in (reference, *candidates)]
    return ["compare", *models, "--data", str(data), "--out", str(out), "-c", "48",
            "--max-tokens", "200", *extra]  # fmt: skip


def assert_uncut(output: str, *whole: str, lines: bool = True) -> None:
    """No "…", no line past 80 columns (``lines``; messages printed as one unwrapped line, such
    as validate's, may run past), and each of ``whole`` present in full (a value longer than a
    line may fold onto the next one: compared with line breaks and indentation removed)."""
    assert "…" not in output, [line for line in output.splitlines() if "…" in line]
    # `name: PATH` lines (lmkl.cli.output.show_path) keep a path whole on one line to copy.
    long_lines = [
        line
        for line in output.splitlines()
        if len(line.rstrip()) > 80 and not re.match(r"^[a-z ]+: /\S+$", line)
    ]
    assert not (lines and long_lines), long_lines
    flat = re.sub(r"\n\s*", "", output)
    for text in whole:
        assert text in output or text in flat, (text, output)


def run_tiny_study(
    tiny_pair: dict, root: Path, name: str, labels: tuple[str, str], extra: str
) -> dict:
    """Run (at 80 columns) a study of two candidates named ``labels``: the tiny student, and the
    reference in bfloat16 (KL ~1e-5), on five short documents, with YAML ``extra`` lines."""
    texts = [json.loads(x)["text"] for x in tiny_pair["heldout"].read_text().splitlines()]
    data = root / "documents.jsonl"
    data.write_text("".join(json.dumps({"text": t[:200]}) + "\n" for t in texts[:5]))
    config = root / "study.yaml"
    config.write_text(f"""
name: {name}
reference: {{model: {tiny_pair["reference"]}, device: cpu}}
candidates:
  - {{label: {labels[0]}, model: {tiny_pair["candidate"]}, device: cpu}}
  - {{label: {labels[1]}, model: {tiny_pair["reference"]}, dtype: bfloat16, device: cpu}}
datasets:
  - {{source: {data}, label: documents}}
windowing: {{mode: documents, context_length: 48, stride: 24}}
{extra}""")
    out = root / "run"
    printed = run_cli(["run", str(config), "--out", str(out)], {"COLUMNS": "80"})
    return {"config": config, "out": out, "printed": printed, "data": data}


@pytest.fixture(scope="module")
def narrow_study(tiny_pair, tmp_path_factory):
    """A two-candidate study with long, alike labels; one candidate is the reference in
    bfloat16, whose KL is tiny (~1e-5)."""
    root = tmp_path_factory.mktemp("narrow-study-with-a-long-directory-name")
    extra = "ranking: {resamples: 200}\nnoise_floor: true\ngates: {fail_above: {kl.mean: 0.01}}\n"
    return run_tiny_study(tiny_pair, root, "narrow", LONG, extra)


def test_experiment_tables_fit_80_columns(narrow_study):
    results = json.loads((narrow_study["out"] / "results.json").read_text())
    board = results["ranking"]["leaderboard"]
    values = format_column([row["value"] for row in board])
    assert_uncut(
        narrow_study["printed"],
        *LONG,
        *values,
        *(format_ci(row["ci"]) for row in board),
        "> noise",  # the study's noise column (it vanished at 80 columns)
        str(narrow_study["out"]),
    )
    tiny = min(row["value"] for row in board if row["kind"] == "candidate")
    assert tiny < 1e-3 and format_value(tiny).endswith(("e-05", "e-06", "e-04"))
    # The summary's CI of each candidate is the leaderboard's, printed alike.
    for row in board[:2]:  # the noise floor is not a candidate
        kl = next(c for c in results["candidates"] if c["label"] == row["label"])["metrics"]["kl"]
        assert [kl["ci_low"], kl["ci_high"]] == row["ci"]


@pytest.mark.parametrize("env", WIDTHS)
def test_dry_run_plan_and_report_table_fit_80_columns(narrow_study, env, tiny_pair):
    checked = run_cli(["validate", str(narrow_study["config"]), "--check-models"], env)
    assert_uncut(checked, *LONG, lines=False)
    plan = run_cli(["run", str(narrow_study["config"]), "--dry-run"], env)
    assert_uncut(plan, *LONG, str(tiny_pair["reference"]), str(narrow_study["data"]))
    report = run_cli(["report", str(narrow_study["out"]), "--format", "table"], env)
    results = json.loads((narrow_study["out"] / "results.json").read_text())
    means = [c["metrics"]["kl"]["mean"] for c in results["candidates"]]
    assert_uncut(report, *LONG)
    for mean in means:
        assert format_value(mean) in report


@pytest.mark.parametrize("env", WIDTHS)
def test_compare_summary_and_leaderboard_fit_80_columns(tiny_pair, small_jsonl, tmp_path, env):
    out = tmp_path / "run"
    printed = run_cli(
        small_compare(
            tiny_pair["reference"],
            [tiny_pair["candidate"], tiny_pair["reference"]],
            small_jsonl,
            out,
            "--label",
            LONG[0],
            "--label",
            LONG[1],
        ),
        env,
    )
    results = json.loads((out / "results.json").read_text())
    kl = [c["metrics"]["kl"] for c in results["candidates"]]
    assert_uncut(printed, *LONG, str(out), *(format_ci([k["ci_low"], k["ci_high"]]) for k in kl))
    # One meaning of ± and of brackets, said under the table.
    assert "± is one standard error" in printed
    inspect = run_cli(["inspect", str(out), "--candidate", LONG[1], "--worst", "3"], env)
    assert_uncut(inspect, LONG[1])


def test_single_candidate_shows_its_bootstrap_ci(tiny_pair, small_jsonl, tmp_path):
    out = tmp_path / "run"
    printed = run_cli(
        small_compare(tiny_pair["reference"], [tiny_pair["candidate"]], small_jsonl, out),
        {"COLUMNS": "80"},
    )
    kl = json.loads((out / "results.json").read_text())["candidates"][0]["metrics"]["kl"]
    # 200 tokens are one document here: its windows are resampled instead.
    assert kl["ci_method"] in ("document bootstrap", "window bootstrap")
    assert kl["ci_low"] < kl["mean"] < kl["ci_high"]
    assert "KL(P‖Q) mean [95% CI]" in printed
    assert_uncut(printed, format_ci([kl["ci_low"], kl["ci_high"]]))


def test_a_table_too_wide_names_what_it_left_out():
    from io import StringIO

    from rich.console import Console
    from rich.table import Table

    from lmkl.cli.output import FitTables
    from lmkl.report.tables import FittedTable

    table = Table(title="t")
    for name in ("candidate", "kl.mean", "extra one", "extra two"):
        table.add_column(name)
    table.add_row(LONG[0], "4.074e-05", "x" * 20, "y" * 20)
    table.add_row(LONG[1], "4.075e-05", "x" * 20, "y" * 20)
    buffer = StringIO()
    console = Console(file=buffer, width=80, color_system=None)
    console.push_render_hook(FitTables())
    notes = [("extra one", "extra one: explained"), ("extra two", "extra two: explained")]
    console.print(FittedTable(table, optional=["extra two", "extra one"], notes=notes))
    text = buffer.getvalue()
    assert "not shown at 80 columns: extra two" in text and "COLUMNS=" in text
    # A note explains only a column that is shown (no note for a dropped column).
    assert "extra one: explained" in text and "extra two: explained" not in text
    assert_uncut(text, *LONG, "4.074e-05", "4.075e-05", "x" * 20)
    # Nothing optional to drop: one block per row, every cell whole.
    buffer.truncate(0)
    buffer.seek(0)
    console.print(table)
    assert_uncut(buffer.getvalue(), *LONG, "x" * 20, "y" * 20, "extra two: " + "y" * 20)


def test_progress_shows_no_rate_before_a_second_has_passed(monkeypatch):
    # The first reading was one batch over microseconds: "1,137,556 tok/s".
    from io import StringIO

    from rich.console import Console

    from lmkl.cli import output

    monkeypatch.setattr(output, "is_interactive", lambda quiet: True)
    monkeypatch.setattr(output, "stderr", Console(file=StringIO(), force_terminal=True))
    with output.TokenProgress(quiet=False) as progress:
        progress(4096, 1_000_000)
        task = progress._progress.tasks[0]
        assert task.fields["rate"] == "–"
        monkeypatch.setattr(type(task), "elapsed", property(lambda self: 2.0))
        progress(40_000, 1_000_000)
        assert task.fields["rate"] == "20,000"
