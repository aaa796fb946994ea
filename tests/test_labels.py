"""Candidate labels: always distinct (rows are selected by label), and shown literally wherever
they are printed or drawn (rich markup, matplotlib math text)."""

from __future__ import annotations

import html
import io
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from synthetic import SyntheticCandidate, synthesize_run
from test_runner import float64_reference
from typer.testing import CliRunner

from lmkl.cli import app
from lmkl.engine.common import unique_labels
from lmkl.specs import ModelSpec

runner = CliRunner()


@pytest.mark.parametrize(
    "models",
    [
        ["a/ckpt", "b/ckpt", "c/ckpt-2"],
        ["x", "x", "x-2", "x", "x-3"],
        ["m", "m-2", "m", "m-2", "m"],
    ],
)
def test_unique_labels_are_distinct_and_keep_given_names(models):
    specs = unique_labels([ModelSpec(model=m) for m in models])
    labels = [s.display_name for s in specs]
    assert len(set(labels)) == len(labels), labels
    # A name seen for the first time is kept as it is; a repeat gets its name plus "-N".
    for i, (model, label) in enumerate(zip(models, labels, strict=True)):
        name = model.rsplit("/", 1)[-1]
        if name not in [m.rsplit("/", 1)[-1] for m in models[:i]]:
            assert label == name
        else:
            assert label.startswith(f"{name}-") and label[len(name) + 1 :].isdigit()
    # Deterministic: the same input gives the same labels.
    assert [s.display_name for s in unique_labels([ModelSpec(model=m) for m in models])] == labels


def test_candidates_named_alike_stay_apart_end_to_end(
    tiny_pair, gpt2_candidate, small_jsonl, tmp_path
):
    """``a/ckpt b/ckpt c/ckpt-2``: three candidates, three labels, each with its own rows."""
    models = {
        "a/ckpt": tiny_pair["candidate"],
        "b/ckpt": gpt2_candidate,
        "c/ckpt-2": tiny_pair["reference"],
    }
    paths = []
    for name, target in models.items():
        link = tmp_path / name
        link.parent.mkdir()
        link.symlink_to(target, target_is_directory=True)
        paths.append(link)
    out = tmp_path / "run"
    args = ["compare", str(tiny_pair["reference"]), *map(str, paths)]
    args += ["--data", str(small_jsonl), "--out", str(out), "-c", "64", "--stride", "32"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    labels = [c["label"] for c in results["candidates"]]
    assert len(set(labels)) == 3, labels
    table = pq.read_table(out / "tokens.parquet").to_pylist()
    for label, target in zip(labels, models.values(), strict=True):
        rows = [r for r in table if r["candidate"] == label]
        want = float64_reference(tiny_pair, small_jsonl, candidate=target)
        assert len(rows) == len(want)
        assert {(r["doc_id"], r["position"]) for r in rows} == set(want)
        kl = np.array([r["kl"] for r in rows])
        expected = np.array([want[(r["doc_id"], r["position"])]["kl"] for r in rows])
        np.testing.assert_allclose(kl, expected, atol=1e-5)
        entry = next(c for c in results["candidates"] if c["label"] == label)
        assert entry["metrics"]["counts"]["tokens"] == len(want)
        assert entry["metrics"]["kl"]["mean"] == pytest.approx(expected.mean(), abs=1e-6)


# ------------------------------------------------------------------------------------------
# Labels are shown as typed: never rich markup or emoji codes, never matplotlib math text

#: Candidate labels: rich markup, math text (drawn: dollars lost), math text that does not parse
#: (the figure fails to save), an emoji code.
LABELS = ["[bold]x[/bold]", "a$b$c", r"$\oops$", "q:100:"]
#: Groups and dataset names are user text too.
GROUPS = ["[red]g[/red]", "$g2$"]
DATASETS = ["[i]d1[/i]", "d$2$"]


def _svg_text(figures: list) -> str:
    """The text of figures saved as SVG with text kept as text (not paths), concatenated."""
    from matplotlib import rc_context

    out = []
    for fig in figures:
        buffer = io.StringIO()
        with rc_context({"svg.fonttype": "none"}):
            fig.savefig(buffer, format="svg")
        out.append(html.unescape(buffer.getvalue()))
    return "\n".join(out)


def test_report_shows_labels_literally_in_tables_html_and_figures(tmp_path, monkeypatch):
    from lmkl.report import plots

    candidates = [
        SyntheticCandidate(
            label,
            1.0 + i,
            params=10_000_000 * (i + 1),
            step=100 * (1 + i // 2),
            group=GROUPS[i % 2],
        )
        for i, label in enumerate(LABELS)
    ]
    run = synthesize_run(
        tmp_path / "run", 3000, candidates, context_length=64, vocab_size=300, worst_k=4
    )
    figures: list = []
    draw_png = plots._png
    monkeypatch.setattr(plots, "_png", lambda fig: figures.append(fig) or draw_png(fig))
    page = tmp_path / "report.html"
    result = runner.invoke(app, ["report", str(run), "--out", str(page)])
    assert result.exit_code == 0, result.output
    text = page.read_text()
    drawn = _svg_text(figures)
    (ppl,) = (t for t in map(_svg_text, ([f] for f in figures)) if "candidate over reference" in t)
    for label in LABELS:
        assert html.escape(label) in text, label
        assert label in drawn, label
        assert label in ppl, label  # one tick label per candidate
    for group in GROUPS:
        assert group in drawn, group  # the checkpoint series' legend
    table = runner.invoke(app, ["report", str(run), "--format", "table"], env={"COLUMNS": "400"})
    assert table.exit_code == 0, table.output
    for label in LABELS:
        assert label in table.output, label
    markdown = tmp_path / "report.md"
    result = runner.invoke(app, ["report", str(run), "--format", "md", "--out", str(markdown)])
    assert result.exit_code == 0, result.output
    # Escaped for Markdown: brackets are not links, dollars do not open math (GitHub).
    for escaped in (r"\[bold\]x\[/bold\]", r"a\$b\$c", r"\$\\oops\$", "q:100:"):
        assert escaped in markdown.read_text(), escaped
    for label in LABELS:
        args = ["inspect", str(run), "--candidate", label, "--worst", "3"]
        inspected = runner.invoke(app, args, env={"COLUMNS": "400"})
        assert inspected.exit_code == 0, inspected.output
        assert f"worst 3 tokens of {label} (" in inspected.output


def _docs(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def test_compare_and_run_print_labels_datasets_and_paths_literally(
    tiny_pair, gpt2_candidate, small_jsonl, tmp_path
):
    out = tmp_path / "[dim]runs[/dim]" / "a$b$c"
    args = ["compare", str(tiny_pair["reference"]), str(tiny_pair["candidate"])]
    args += [str(gpt2_candidate), "--label", LABELS[0], "--label", LABELS[3]]
    args += ["--data", str(small_jsonl), "-c", "64", "--max-tokens", "200"]
    result = runner.invoke(app, [*args, "--out", str(out)], env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    assert LABELS[0] in result.output and LABELS[3] in result.output  # the summary table
    assert f"run directory: {out}" in result.output
    quiet = runner.invoke(app, [*args, "--out", str(out), "--overwrite", "-q"])
    assert quiet.exit_code == 0, quiet.output
    assert quiet.stdout == f"{out}\n"  # one line, as typed, whatever the terminal width

    texts = [json.loads(x)["text"][:200] for x in tiny_pair["heldout"].read_text().splitlines()]
    data = [_docs(tmp_path / f"{i}.jsonl", texts[2 * i : 2 * i + 2]) for i in range(2)]
    config = tmp_path / "study.yaml"
    config.write_text(
        json.dumps(
            {
                "name": "[b]study[/b]",
                "reference": {"model": str(tiny_pair["reference"]), "device": "cpu"},
                "candidates": [
                    {
                        "label": LABELS[0],
                        "model": str(tiny_pair["candidate"]),
                        "group": GROUPS[0],
                        "step": 1,
                        "device": "cpu",
                    },
                    {
                        "label": LABELS[1],
                        "model": str(gpt2_candidate),
                        "group": GROUPS[0],
                        "step": 2,
                        "device": "cpu",
                    },
                ],
                "datasets": [
                    {"source": str(path), "label": name}
                    for path, name in zip(data, DATASETS, strict=True)
                ],
                "windowing": {"context_length": 48},
                "ranking": {"resamples": 50},
            }
        )
    )
    plan = runner.invoke(app, ["run", str(config), "--dry-run"], env={"COLUMNS": "400"})
    assert plan.exit_code == 0, plan.output
    for name in (*LABELS[:2], *DATASETS, "[b]study[/b]", str(data[0])):
        assert name in plan.output, name
    out = tmp_path / "[b]exp[/b]"
    args = ["run", str(config), "--out", str(out), "--fail-above", "kl.mean=1e-9"]
    ran = runner.invoke(app, args, env={"COLUMNS": "400"})
    assert ran.exit_code == 3, ran.output  # every candidate fails the gate, and says so
    printed = ran.output
    for name in (*LABELS[:2], *DATASETS, GROUPS[0]):
        assert name in printed, name
    assert f"run directory: {out}" in printed
    assert sum(f"gate failed: {LABELS[i]}" in printed for i in range(2)) == 2, printed


def test_per_byte_summary_shows_labels_literally(
    tiny_pair, other_tokenizer_model, small_jsonl, tmp_path
):
    args = ["compare", str(tiny_pair["reference"]), str(other_tokenizer_model)]
    args += ["--different-tokenizers", "--label", LABELS[0], "--data", str(small_jsonl)]
    args += ["-c", "64", "--out", str(tmp_path / "run")]
    result = runner.invoke(app, args, env={"COLUMNS": "400"})
    assert result.exit_code == 0, result.output
    reference = json.loads((tmp_path / "run" / "results.json").read_text())["reference"]["label"]
    assert f"per-byte comparison: {reference} (P) vs {LABELS[0]} (Q)" in result.output
