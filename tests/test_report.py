"""Reports: the plotted data against independent NumPy recomputations from tokens.parquet, the
renderers (HTML self-contained and escaped, Markdown, JSON, table) and the CLI commands."""

from __future__ import annotations

import base64
import itertools
import json
import math
import re
from collections import defaultdict
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from synthetic import SyntheticCandidate, synthesize_run
from typer.testing import CliRunner

from lmkl.cli import app
from lmkl.engine.token_compare import run_comparison
from lmkl.report.build import build_report
from lmkl.report.candidates import pareto_front
from lmkl.report.plots import (
    kl_by_confidence,
    kl_by_position,
    kl_by_step,
    kl_distribution,
    make_plots,
    size_vs_kl,
)
from lmkl.report.plots import ppl_ratio as ppl_plot
from lmkl.report.reading import confidence_clause
from lmkl.report.render import md_escape, render_html, render_markdown, write_report
from lmkl.specs import ComputeSpec, DataSpec, ModelSpec, OutputSpec, WindowSpec

runner = CliRunner()
XSS = "<script>document.title='pwned'</script><img src=x onerror=alert(1)> & done"


@pytest.fixture(scope="module")
def real_run(tiny_pair, tmp_path_factory) -> Path:
    """A real two-candidate run of the tiny models (tokenizer available for decoding)."""
    root = tmp_path_factory.mktemp("real-run")
    lines = tiny_pair["heldout"].read_text().splitlines()[:3]
    data = root / "small.jsonl"
    data.write_text(
        "".join(json.dumps({"text": json.loads(x)["text"][:1500]}) + "\n" for x in lines)
    )
    outcome = run_comparison(
        ModelSpec(model=str(tiny_pair["reference"]), label="ref"),
        [
            ModelSpec(model=str(tiny_pair["candidate"]), label="student"),
            ModelSpec(model=str(tiny_pair["reference"]), label="self", dtype="bfloat16"),
        ],
        DataSpec(source=str(data)),
        WindowSpec(context_length=64, stride=32),
        ComputeSpec(batch_size=4, worst_k=12),
        OutputSpec(dir=str(root / "run")),
    )
    return outcome.path


@pytest.fixture(scope="module")
def series_run(tmp_path_factory) -> Path:
    """A synthetic checkpoint series with sizes, and hostile text in every worst context."""
    root = tmp_path_factory.mktemp("series")
    return synthesize_run(
        root / "series",
        6000,
        [
            SyntheticCandidate("ckpt-100", 2.0, params=10_000_000, step=100, group="run-a"),
            SyntheticCandidate("ckpt-200", 1.0, params=50_000_000, step=200, group="run-a"),
            SyntheticCandidate("ckpt-300", 0.7, params=200_000_000, step=300, group="run-a"),
            SyntheticCandidate("wide", 1.5, params=100_000_000),
        ],
        seed=3,
        context_length=128,
        vocab_size=500,
        worst_k=6,
        context_text=XSS,
    )


def parquet_columns(run_dir: Path, label: str) -> dict[str, np.ndarray]:
    table = pq.read_table(run_dir / "tokens.parquet").to_pydict()
    keep = np.asarray(table["candidate"]) == label
    return {
        k: np.asarray(v, dtype=object if k == "candidate" else None)[keep]
        for k, v in table.items()
        if k != "candidate"
    }


# ------------------------------------------------------------------------------------------
# Plotted data against independent recomputation


def test_kl_distribution_plot_data(real_run):
    report = build_report([real_run])
    plot = kl_distribution(report)
    edges = plot.data["edges"]
    assert plot.png.startswith(b"\x89PNG")
    for label in ("student", "self"):
        cols = parquet_columns(real_run, label)
        kl = cols["kl"].astype(np.float64)
        kl = kl[np.isfinite(kl)]
        positive = kl[kl > 0]
        assert edges[0] <= positive.min() and edges[-1] >= positive.max()
        expected = []
        for i, (lo, hi) in enumerate(itertools.pairwise(edges)):
            last = i == len(edges) - 2
            in_bin = (kl >= lo) & ((kl <= hi) if last else (kl < hi))
            if i == 0:
                in_bin |= kl < lo
            expected.append(in_bin.sum() / kl.size)
        np.testing.assert_allclose(plot.data["histogram"][label], expected, atol=1e-12)
        cdf = plot.data["cdf"][label]
        ordered = np.sort(kl)
        at_most = np.searchsorted(ordered, cdf["x"], side="right") / kl.size
        below = np.searchsorted(ordered, cdf["x"], side="left") / kl.size
        mask = cdf["x"] > edges[0]
        slack = 1.0 / kl.size + 1e-12
        assert np.all(at_most[mask] >= cdf["y"][mask] - slack)
        assert np.all(below[mask] <= cdf["y"][mask] + slack)
        assert np.all(np.diff(cdf["y"]) >= 0) and cdf["y"][-1] == pytest.approx(1.0)


def test_kl_by_position_plot_data(real_run):
    report = build_report([real_run])
    plot = kl_by_position(report)
    assert plot.data["bin_width"] == 1
    cols = parquet_columns(real_run, "student")
    kl, pos = cols["kl"].astype(np.float64), cols["window_pos"]
    series = plot.data["series"]["student"]
    positions = sorted(set(pos.tolist()))
    np.testing.assert_array_equal(series["x"], positions)
    for x, mean, median in zip(series["x"], series["mean"], series["median"], strict=True):
        values = kl[pos == x]
        assert mean == pytest.approx(values.mean(), rel=1e-9, abs=1e-12)
        assert median == pytest.approx(np.median(values), rel=1e-9, abs=1e-12)


def test_kl_by_position_bins_long_windows():
    report_tokens = {"a": _tokens(window_pos=np.arange(1000) % 500, kl=np.arange(1000.0))}
    from lmkl.analysis.per_token import kl_by_position as aggregate

    out = aggregate(report_tokens, max_bins=64)
    width = out["bin_width"]
    assert width == math.ceil(500 / 64)
    series = out["series"]["a"]
    for start, mean, median in zip(series["start"], series["mean"], series["median"], strict=True):
        values = np.arange(1000.0)[
            (np.arange(1000) % 500 >= start) & (np.arange(1000) % 500 < start + width)
        ]
        assert mean == pytest.approx(values.mean()) and median == pytest.approx(np.median(values))


def _tokens(window_pos, kl):
    from lmkl.analysis.per_token import CandidateTokens

    n = len(kl)
    zeros = np.zeros(n, dtype=np.int64)
    return CandidateTokens(
        kl=np.asarray(kl, float),
        window_pos=np.asarray(window_pos),
        token_id=zeros,
        doc_id=zeros,
        position=np.arange(n),
        nll_reference=np.zeros(n),
        nll_candidate=np.zeros(n),
    )


def test_kl_by_confidence_plot_data(real_run):
    report = build_report([real_run])
    plot = kl_by_confidence(report)
    cols = parquet_columns(real_run, "student")
    kl, conf = cols["kl"].astype(np.float64), cols["reference_top1_prob"].astype(np.float64)
    edges = [(0.0, 0.25), (0.25, 0.5), (0.5, 0.75), (0.75, 0.95), (0.95, 1.01)]
    series = plot.data["series"]["student"]
    for i, (lo, hi) in enumerate(edges):
        values = kl[(conf >= lo) & (conf < hi)]
        if values.size:
            assert series["kl_mean"][i] == pytest.approx(values.mean(), rel=1e-6)
        assert series["kl_share"][i] == pytest.approx(values.sum() / kl.sum(), rel=1e-6, abs=1e-12)
        assert series["token_share"][i] == pytest.approx(values.size / kl.size)


def test_ppl_ratio_plot_data(real_run):
    report = build_report([real_run])
    plot = ppl_plot(report)
    for key, ratio, low, high in zip(
        plot.data["keys"], plot.data["ratio"], plot.data["low"], plot.data["high"], strict=True
    ):
        cols = parquet_columns(real_run, key)
        d = cols["nll_candidate"].astype(np.float64) - cols["nll_reference"].astype(np.float64)
        se = d.std(ddof=1) / math.sqrt(d.size)
        assert ratio == pytest.approx(math.exp(d.mean()), rel=1e-9)
        assert low == pytest.approx(math.exp(d.mean() - 1.959964 * se), rel=1e-6)
        assert high == pytest.approx(math.exp(d.mean() + 1.959964 * se), rel=1e-6)


def test_size_and_step_plots(series_run):
    report = build_report([series_run])
    sizes = size_vs_kl(report)
    by_key = dict(zip(sizes.data["keys"], sizes.data["pareto"], strict=True))
    kl = {k: parquet_columns(series_run, k)["kl"].astype(np.float64).mean() for k in by_key}
    np.testing.assert_allclose(
        sizes.data["kl_mean"], [kl[k] for k in sizes.data["keys"]], rtol=1e-9
    )
    keys, size = sizes.data["keys"], dict(zip(sizes.data["keys"], sizes.data["size"], strict=True))
    expected = {
        k: not any(
            o != k
            and size[o] <= size[k]
            and kl[o] <= kl[k]
            and (size[o] < size[k] or kl[o] < kl[k])
            for o in keys
        )
        for k in keys
    }
    assert by_key == expected
    # By construction (KL scales 2.0, 1.0, 0.7 with growing size; "wide" is 1.5 at 100M).
    assert by_key == {"ckpt-100": True, "ckpt-200": True, "ckpt-300": True, "wide": False}
    steps = kl_by_step(report).data["series"]["run-a"]
    np.testing.assert_array_equal(steps["step"], [100, 200, 300])
    np.testing.assert_allclose(
        steps["kl_mean"], [kl["ckpt-100"], kl["ckpt-200"], kl["ckpt-300"]], rtol=1e-9
    )
    assert steps["best_step"] == [100, 200, 300][int(np.argmin(steps["kl_mean"]))]


def test_pareto_front_by_hand():
    sizes = [10.0, 50.0, 200.0, 100.0, 100.0]
    kls = [0.09, 0.05, 0.02, 0.06, 0.05]
    assert pareto_front(sizes, kls) == [True, True, True, False, False]
    assert pareto_front([1.0, float("nan")], [0.1, 0.0]) == [True, False]


def test_token_tables_match_groupby(real_run):
    report = build_report([real_run])
    cols = parquet_columns(real_run, "student")
    sums, counts = defaultdict(float), defaultdict(int)
    for token, value in zip(cols["token_id"].tolist(), cols["kl"].tolist(), strict=True):
        sums[token] += value
        counts[token] += 1
    table = report.tokens["student"]
    by_total = sorted(sums, key=lambda t: -sums[t])[: len(table["by_total"])]
    assert [r["token_id"] for r in table["by_total"]] == by_total
    for row in table["by_total"]:
        assert row["total_kl"] == pytest.approx(sums[row["token_id"]], rel=1e-9)
        assert row["count"] == counts[row["token_id"]]
    frequent = [t for t in sums if counts[t] >= table["min_count"]]
    by_mean = sorted(frequent, key=lambda t: -sums[t] / counts[t])[: len(table["by_mean"])]
    assert [r["token_id"] for r in table["by_mean"]] == by_mean
    # The reference directory exists, so token strings are decoded with its tokenizer.
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(
        json.loads((real_run / "results.json").read_text())["reference"]["path"]
    )
    assert report.token_source == "tokenizer"
    for row in table["by_total"]:
        assert row["token"] == tok.decode([row["token_id"]])


def test_worst_entries_carry_both_probabilities(real_run):
    report = build_report([real_run], worst_n=5)
    cols = parquet_columns(real_run, "student")
    worst = report.worst["student"]
    assert len(worst) == 5
    assert [e["kl"] for e in worst] == sorted((e["kl"] for e in worst), reverse=True)
    assert worst[0]["kl"] == pytest.approx(cols["kl"].max(), rel=1e-5)
    for e in worst:
        row = np.flatnonzero((cols["doc_id"] == e["doc_id"]) & (cols["position"] == e["position"]))
        assert row.size == 1
        assert e["p_token"] == pytest.approx(math.exp(-cols["nll_reference"][row[0]]), rel=1e-6)
        assert e["q_token"] == pytest.approx(math.exp(-cols["nll_candidate"][row[0]]), rel=1e-6)
        assert len(e["reference_top5"]) == len(e["candidate_top5"]) == 5


# ------------------------------------------------------------------------------------------
# Reading, differences, sorting


def test_plain_reading_numbers(real_run):
    report = build_report([real_run])
    results = json.loads((real_run / "results.json").read_text())
    student = next(c for c in results["candidates"] if c["label"] == "student")["metrics"]
    line = next(x for x in report.reading if x.startswith("student "))
    agree = student["top1_agreement"]
    assert f"on {100 * agree['mean']:.3g}% of tokens (95% CI over tokens [" in line
    # The KL's CI is the document bootstrap stored for every candidate; "±" is left to tables.
    kl = student["kl"]
    assert kl["ci_method"] == "document bootstrap" and kl["ci_low"] < kl["mean"] < kl["ci_high"]
    assert f"{kl['ci_low']:.3g}" in line and "resampling documents" in line
    assert "±" not in " ".join(report.reading)
    assert "its KL" in line
    # Sorted by mean KL: the bfloat16 copy of the reference is closer than the student.
    assert [c.key for c in report.candidates] == ["self", "student"]
    assert any(x.startswith("By kl.mean, self is closest") for x in report.reading)


def test_confidence_clause_names_the_dominant_group():
    def profile(shares, means):
        lows = [0.0, 0.25, 0.5, 0.75, 0.95]
        highs = [0.25, 0.5, 0.75, 0.95, 1.0]
        total = sum(s * m for s, m in zip(shares, means, strict=True))
        return [
            {"low": lo, "high": hi, "share": s, "kl_share": s * m / total}
            for lo, hi, s, m in zip(lows, highs, shares, means, strict=True)
        ]

    low = confidence_clause(profile([0.2, 0.2, 0.2, 0.2, 0.2], [1.0, 0.8, 0.1, 0.05, 0.05]))
    assert "concentrated in low-confidence positions" in low
    assert "90% of the KL on 40% of the tokens" in low
    # 91% of the KL on 80% of the tokens: not clearly more than their share of the tokens.
    sure = confidence_clause(profile([0.05, 0.05, 0.1, 0.3, 0.5], [0.1, 0.1, 0.1, 0.2, 0.3]))
    assert sure.startswith("its KL is spread like the tokens: positions where the reference")
    assert "91% of the KL on 80% of the tokens" in sure
    # Most tokens low-confidence, KL in proportion: said as such, not as "dominated".
    even = confidence_clause(profile([0.5, 0.45, 0.03, 0.01, 0.01], [1.0, 1.0, 1.0, 1.0, 1.0]))
    assert even == (
        "its KL is spread like the tokens: low-confidence positions (reference top-1 "
        "probability < 0.5) hold 95% of the KL on 95% of the tokens"
    )


def test_two_runs_of_one_candidate_show_differences(tmp_path):
    a = synthesize_run(tmp_path / "a", 3000, [SyntheticCandidate("student", 1.0)], seed=5)
    b = synthesize_run(
        tmp_path / "b", 3000, [SyntheticCandidate("student", 1.4, dtype="bfloat16")], seed=5
    )
    report = build_report([a, b])
    assert [c.key for c in report.candidates] == ["student · a", "student · b"]
    (diff,) = report.differences
    assert {"setting": "candidate.dtype", "a": "float32", "b": "bfloat16"} in diff["changes"]
    ka = parquet_columns(a, "student")["kl"].astype(np.float64)
    kb = parquet_columns(b, "student")["kl"].astype(np.float64)
    paired = diff["paired"]
    assert paired["tokens"] == 3000
    assert paired["mean_delta"] == pytest.approx((kb - ka).mean(), rel=1e-9)
    assert paired["se"] == pytest.approx((kb - ka).std(ddof=1) / math.sqrt(3000), rel=1e-9)
    kl_row = next(r for r in diff["metrics"] if r["metric"] == "kl.mean")
    assert kl_row["delta"] == pytest.approx(kb.mean() - ka.mean(), rel=1e-6)
    assert any(x.startswith("student differs between runs") for x in report.reading)
    html = render_html(report, [])
    assert "Differences between runs of the same candidate" in html and "bfloat16" in html


def test_sort_by_metric_and_direction(series_run):
    by_kl = build_report([series_run], sort_by="kl.mean")
    means = [c.value("kl.mean") for c in by_kl.candidates]
    assert means == sorted(means)
    by_agree = build_report([series_run], sort_by="top1_agreement")
    agree = [c.value("top1_agreement.mean") for c in by_agree.candidates]
    assert agree == sorted(agree, reverse=True)


# ------------------------------------------------------------------------------------------
# Renderers


def test_html_is_self_contained_and_escaped(series_run):
    report = build_report([series_run])
    plots = make_plots(report)
    assert [p.name for p in plots] == [
        "kl_distribution",
        "kl_by_position",
        "kl_by_confidence",
        "ppl_ratio",
        "size_vs_kl",
        "kl_by_step",
    ]
    html = render_html(report, plots)
    assert "<script" not in html.lower() and "<link" not in html.lower()
    assert "<img src=x" not in html
    assert "&lt;script&gt;document.title=&#39;pwned&#39;&lt;/script&gt;" in html
    sources = re.findall(r'\bsrc="([^"]*)"', html)
    assert len(sources) == len(plots)
    for src in sources:
        assert src.startswith("data:image/png;base64,")
        assert base64.b64decode(src.split(",", 1)[1]).startswith(b"\x89PNG")
    assert all(h.startswith("#") for h in re.findall(r'\bhref="([^"]*)"', html))
    assert not re.search(r"url\(|@import|https?://", html)
    for section in (
        "reading",
        "leaderboard",
        "statistics",
        "plots",
        "worst",
        "tokens",
        "provenance",
    ):
        assert f'id="{section}"' in html


def test_markdown_escapes_and_writes_images(series_run, tmp_path):
    out = write_report([series_run], "md", tmp_path / "r.md")
    text = out.read_text()
    images = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert images and all((tmp_path / i).is_file() for i in images)
    assert all((tmp_path / i).read_bytes().startswith(b"\x89PNG") for i in images)
    # Worst contexts sit in fenced code blocks (inert); everywhere else no raw HTML.
    outside_code = re.sub(r"(`{3,})text\n.*?\n\1", "", text, flags=re.S)
    assert "<script" not in outside_code and "<img" not in outside_code
    assert md_escape("a|b <i>*x*</i>") == r"a\|b &lt;i&gt;\*x\*&lt;/i&gt;"


def test_markdown_code_block_cannot_be_closed_by_data(tmp_path):
    run = synthesize_run(
        tmp_path / "ticks",
        500,
        [SyntheticCandidate("s")],
        worst_k=2,
        context_text="```\n<script>x</script>\n````",
    )
    report = build_report([run], worst_n=2)
    text = render_markdown(report, [], "r_files")
    assert "`````text\n```\n<script>x</script>\n````⟦" in text


def test_json_report_is_strict_and_matches(series_run, tmp_path):
    out = write_report([series_run], "json", tmp_path / "r.json")
    data = json.loads(out.read_text())
    assert data["sort_by"] == "kl.mean"
    results = json.loads((series_run / "results.json").read_text())
    by_label = {c["label"]: c["metrics"] for c in results["candidates"]}
    for cand in data["candidates"]:
        assert cand["metrics"]["kl"]["mean"] == by_label[cand["label"]]["kl"]["mean"]
    assert set(data["kl_histogram"]["series"]) == set(by_label)


# ------------------------------------------------------------------------------------------
# CLI


def test_report_cli_formats(real_run, tmp_path):
    result = runner.invoke(app, ["report", str(real_run)])
    assert result.exit_code == 0, result.output
    assert (real_run / "report.html").is_file() and "report.html" in result.output
    result = runner.invoke(
        app, ["report", str(real_run), "--format", "json", "--sort-by", "jsd.mean"]
    )
    assert result.exit_code == 0
    assert json.loads(result.stdout)["sort_by"] == "jsd.mean"
    result = runner.invoke(app, ["report", str(real_run), "--format", "table"])
    assert result.exit_code == 0 and "Leaderboard" in result.output
    result = runner.invoke(app, ["report", str(real_run), "--sort-by", "bogus"])
    assert result.exit_code == 2 and "unknown metric 'bogus'" in result.output
    result = runner.invoke(app, ["report", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "does not exist" in result.output
    (tmp_path / "unfinished" / "parts").mkdir(parents=True)
    result = runner.invoke(app, ["report", str(tmp_path / "unfinished")])
    assert result.exit_code == 1 and "--resume" in result.output


def test_inspect_cli(real_run):
    result = runner.invoke(
        app,
        ["inspect", str(real_run), "--worst", "3", "--candidate", "student"],
        env={"COLUMNS": "160"},
    )
    assert result.exit_code == 0, result.output
    worst = json.loads((real_run / "worst.json").read_text())
    top = max((e for e in worst if e["candidate"] == "student"), key=lambda e: e["kl"])
    assert f"document {top['doc_id']}:" in result.output
    assert f"{top['doc_id']}:{top['position']}" in result.output
    assert "worst 3 tokens of student" in result.output
    result = runner.invoke(app, ["inspect", str(real_run), "--doc", "1", "--worst", "0"])
    assert result.exit_code == 0 and "document 1:" in result.output
    result = runner.invoke(app, ["inspect", str(real_run), "--candidate", "nobody"])
    assert result.exit_code == 2 and "student" in result.output
    result = runner.invoke(app, ["inspect", str(real_run), "--doc", "99"])
    assert result.exit_code == 2 and "document 99" in result.output


def test_infinite_and_nonfinite_tokens_are_reported_not_plotted(tmp_path):
    run = synthesize_run(
        tmp_path / "inf",
        4000,
        [
            SyntheticCandidate("broken", 1.0, params=1_000_000, step=1, infinite=3, nonfinite=5),
            SyntheticCandidate("fine", 1.0, params=2_000_000, step=2),
        ],
    )
    report = build_report([run])
    broken = next(c for c in report.candidates if c.key == "broken")
    assert broken.value("kl.mean") == math.inf and broken.value("ppl.ratio") == math.inf
    hist = report.histogram["series"]["broken"]
    assert hist["infinite"] == 3 and hist["tokens"] == 4000 - 5
    assert hist["counts"].sum() == 4000 - 5 - 3
    assert report.cdf["series"]["broken"]["y"][-1] == pytest.approx((4000 - 8) / (4000 - 5))
    line = next(x for x in report.reading if x.startswith("broken "))
    assert "infinite mean KL" in line and "3 token(s) got zero probability" in line
    assert "5 position(s) had non-finite logits" in line
    assert "its infinite KL sits at positions with reference top-1 probability in [" in line
    plots = {p.name: p for p in make_plots(report)}
    assert [c.key for c in report.candidates] == ["fine", "broken"]
    assert plots["ppl_ratio"].data["ratio"][0] == pytest.approx(
        report.candidates[0].value("ppl.ratio")
    )
    assert math.isnan(plots["ppl_ratio"].data["ratio"][1])  # drawn as "inf", not as a bar
    assert plots["size_vs_kl"].data["keys"] == ["fine"]
    html = render_html(report, list(plots.values()))
    assert "infinite mean KL" in html


def test_pareto_front_never_stars_an_infinite_kl():
    assert pareto_front([1e6, 2e6, 3e6], [float("inf"), 0.2, 0.1]) == [False, True, True]
