"""What a newcomer reads first in a report, and whether it fits: figures' legends beside (never
over) the data, a log axis where quantized candidates' KL would be invisible, the leaderboard at
1280 px without sideways scrolling, and experiment roots reported from their datasets (gates,
noise floor, worst contexts) and inspected one dataset at a time.

Experiment roots are built without models: synthetic dataset runs combined by the experiment
runner's own ``combine``. The browser test reuses one page load (Playwright driving chromium).
"""

from __future__ import annotations

import datetime as dt
import json
import math
import shutil
from html import escape as html_escape
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from synthetic import SyntheticCandidate, synthesize_run
from test_token_view_browser import browser  # noqa: F401  (the shared Playwright fixture)
from typer.testing import CliRunner

from lmkl.cli import app
from lmkl.experiment.run import combine
from lmkl.experiment.schema import ExperimentConfig
from lmkl.files import write_json
from lmkl.formatting import format_column
from lmkl.report.build import build_report
from lmkl.report.plots import make_plots
from lmkl.report.render import render_html, write_report
from lmkl.report.token_strings import visible

#: Quantization-like candidates: long names with separators, KL spanning four decades.
QUANTIZED = [
    SyntheticCandidate("int8-weight-only-torchao-per-channel", 2e-4, params=8_000_000),
    SyntheticCandidate("float8-e4m3-weight-only-torchao", 2e-3, params=8_100_000),
    SyntheticCandidate("int4-weight-only-g32-torchao-asymmetric", 1.5e-2, params=4_000_000),
    SyntheticCandidate("int4-weight-only-g128-torchao-asymmetric", 2e-2, params=3_900_000),
    SyntheticCandidate("quanto_int4_packed/groups_128", 2.5e-2, params=3_800_000),
    SyntheticCandidate("quanto_int2_packed/groups_64", 0.3, params=2_000_000),
    SyntheticCandidate("distilled-student-2-layers", 1.0, params=1_000_000),
]
GATE = 0.05


@pytest.fixture(scope="module")
def quant_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("layout")
    return synthesize_run(
        root / "run", 6000, QUANTIZED, seed=5, context_length=128, vocab_size=600, worst_k=3
    )


@pytest.fixture(scope="module")
def quant_plots(quant_run):
    return {p.name: p for p in make_plots(build_report([quant_run]))}


@pytest.fixture(scope="module")
def experiment_root(tmp_path_factory) -> Path:
    """Two datasets, a noise floor, and a gate that the int2-like candidate fails."""
    root = tmp_path_factory.mktemp("experiment") / "study"
    candidates = [
        SyntheticCandidate("int8-like", 1e-3, params=1000),
        SyntheticCandidate("int2-like", 3.0, params=250),
        SyntheticCandidate("noise-floor", 2e-5),
    ]
    subs = []
    for seed, name in enumerate(("wiki", "code")):
        synthesize_run(
            root / "datasets" / name,
            2500,
            candidates,
            seed=seed,
            context_length=128,
            vocab_size=500,
            worst_k=4,
        )
        subs.append(json.loads((root / "datasets" / name / "results.json").read_text()))
    config = ExperimentConfig.model_validate(
        {
            "name": "synthetic-study",
            "reference": {"model": "reference"},
            "candidates": [
                {"label": "int8-like", "model": "int8"},
                {"label": "int2-like", "model": "int2"},
            ],
            "datasets": [
                {"source": "wiki.jsonl", "label": "wiki"},
                {"source": "code.jsonl", "label": "code"},
            ],
            "ranking": {"resamples": 200},
            "noise_floor": True,
            "gates": {"fail_above": {"kl.mean": GATE}},
        }
    )
    now = dt.datetime.now(dt.timezone.utc)
    write_json(root / "results.json", combine(root, config, subs, now, now))
    return root


def _pooled_kl(root: Path, label: str) -> np.ndarray:
    parts = []
    for name in ("wiki", "code"):
        table = pq.read_table(root / "datasets" / name / "tokens.parquet").to_pandas()
        parts.append(table.loc[table["candidate"] == label, "kl"].to_numpy(np.float64))
    return np.concatenate(parts)


# --------------------------------------------------------------------------------------------
# Figures


def _overlap(a: list[float], b: list[float]) -> float:
    """Area shared by two pixel boxes [x0, y0, x1, y1]."""
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return max(w, 0.0) * max(h, 0.0)


def test_legends_sit_beside_the_axes_and_inside_the_figure(quant_plots):
    with_legend = {n: p for n, p in quant_plots.items() if p.data["layout"]["legends"]}
    # Seven long names: the distribution, position, confidence and size figures have legends.
    assert {"kl_distribution", "kl_by_position", "kl_by_confidence", "size_vs_kl"} <= set(
        with_legend
    )
    for name, plot in with_legend.items():
        layout = plot.data["layout"]
        fx0, fy0, fx1, fy1 = layout["figure"]
        for legend in layout["legends"]:
            # Not cut: the whole legend is inside the saved figure.
            assert legend[0] >= fx0 - 1 and legend[2] <= fx1 + 1, (name, legend, layout)
            assert legend[1] >= fy0 - 1 and legend[3] <= fy1 + 1, (name, legend, layout)
            # Covers no data: it shares no pixel with any axes.
            for axes in layout["axes"]:
                assert _overlap(legend, axes) == 0, (name, legend, axes)


def test_mean_kl_by_confidence_shows_every_candidate_on_a_log_axis(quant_run, quant_plots):
    plot = quant_plots["kl_by_confidence"]
    axis = plot.data["kl_mean_axis"]
    assert axis["scale"] == "log"
    low, high = axis["ylim"]
    results = json.loads((quant_run / "results.json").read_text())
    for cand in results["candidates"]:
        drawn = plot.data["series"][cand["label"]]["kl_mean"]
        stored = [b["kl_mean"] for b in cand["metrics"]["kl_by_confidence"]]
        np.testing.assert_allclose(drawn, stored, rtol=1e-12)
        # Each bar rises at least 5% of the axis height (int8's were ~0.02% on a linear axis).
        for height in drawn[np.asarray(drawn) > 0]:
            assert math.log(height / low) / math.log(high / low) > 0.05, (cand["label"], height)


# --------------------------------------------------------------------------------------------
# Experiment roots


def test_experiment_report_reads_its_datasets_and_shows_gates_and_noise_floor(experiment_root):
    report = build_report([experiment_root], worst_n=5)
    assert not report.notes, report.notes  # no "no tokens.parquet"
    assert [d.name for d in report.datasets] == ["wiki", "code"]
    # The histogram pools both datasets' tokens (independent count from the parquet files).
    for label in ("int8-like", "int2-like"):
        kl = _pooled_kl(experiment_root, label)
        assert label in report.histogram["series"]
        view = next(c for c in report.candidates if c.label == label)
        assert view.tokens.kl.size == kl.size
        np.testing.assert_allclose(np.sort(view.tokens.kl), np.sort(kl), rtol=0, atol=0)
        # Worst contexts: the five highest of both datasets' worst.json, each with its dataset.
        stored = []
        for name in ("wiki", "code"):
            for e in json.loads((experiment_root / "datasets" / name / "worst.json").read_text()):
                if e["candidate"] == label:
                    stored.append((e["kl"], name))
        stored.sort(reverse=True)
        got = [(e["kl"], e["dataset"]) for e in report.worst[view.key]]
        assert got == stored[:5]
        # Scale: mean KL over the noise floor's, both from the tokens.
        scale = report.scale(view)
        noise = _pooled_kl(experiment_root, "noise-floor")
        assert scale["times_noise_floor"] == pytest.approx(kl.mean() / noise.mean(), rel=1e-6)
    html = render_html(report, make_plots(report))
    assert "Quality gate failed" in html
    results = json.loads((experiment_root / "results.json").read_text())
    (failure,) = results["gates"]["failures"]
    assert failure["candidate"] == "int2-like" and html_escape(failure["reason"]) in html
    assert html.index("Quality gate failed") < html.index('id="leaderboard"')
    assert "noise floor" in html and "Δ next" in html and "order flips" in html
    assert "dataset wiki, document" in html or "dataset code, document" in html
    # The ranking metric by dataset, from each dataset's own tokens.
    assert "kl.mean by dataset" in html
    for name in ("wiki", "code"):
        table = pq.read_table(experiment_root / "datasets" / name / "tokens.parquet").to_pandas()
        means = [
            table.loc[table["candidate"] == label, "kl"].astype(np.float64).mean()
            for label in ("int8-like", "int2-like")
        ]
        for text in format_column(means):
            assert f'<td class="num">{text}</td>' in html, (name, text)


def test_inspect_an_experiment_picks_or_asks_for_a_dataset(experiment_root, tmp_path):
    runner = CliRunner()
    asked = runner.invoke(app, ["inspect", str(experiment_root)], env={"COLUMNS": "80"})
    assert asked.exit_code == 2, asked.output
    lines = [line for line in asked.output.splitlines() if line.strip()]
    assert lines[0].startswith("error: ") and "2 datasets" in lines[0]
    assert "--dataset NAME, one of: wiki, code" in asked.output
    assert "Traceback" not in asked.output
    wrong = runner.invoke(app, ["inspect", str(experiment_root), "--dataset", "nope"])
    assert wrong.exit_code == 2 and "one of: wiki, code" in wrong.output

    shown = runner.invoke(
        app,
        ["inspect", str(experiment_root), "-d", "code", "-c", "int2-like", "--worst", "3"],
        env={"COLUMNS": "200"},
    )
    assert shown.exit_code == 0, shown.output
    assert "dataset code of" in shown.output
    assert "no worst positions stored" not in shown.output
    # Not a tty: the next token of each worst context is bracketed instead of coloured.
    worst = [
        e
        for e in json.loads((experiment_root / "datasets" / "code" / "worst.json").read_text())
        if e["candidate"] == "int2-like"
    ]
    top = max(worst, key=lambda e: e["kl"])
    assert f"⟦{visible(top['token'])}⟧" in shown.output

    # A run holding neither tokens nor worst positions is an error, not an empty exit 0.
    bare = tmp_path / "bare"
    shutil.copytree(experiment_root / "datasets" / "wiki", bare)
    (bare / "tokens.parquet").unlink()
    (bare / "worst.json").unlink()
    empty = runner.invoke(app, ["inspect", str(bare)])
    assert empty.exit_code == 1 and "neither tokens.parquet nor worst positions" in empty.output


# --------------------------------------------------------------------------------------------
# The page at 1280 px


def test_leaderboard_fits_1280_px_and_names_break_only_at_separators(
    browser,  # noqa: F811
    quant_run,
    tmp_path,
):
    page_file = write_report([quant_run], "html", tmp_path / "report.html")
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    page = context.new_page()
    page.goto(page_file.resolve().as_uri())
    got = page.evaluate(
        """() => {
        const wrap = document.querySelector('#leaderboard .scroll');
        const table = wrap.querySelector('table');
        const heads = [...table.querySelectorAll('thead th')].map(th => th.textContent.trim());
        const right = wrap.getBoundingClientRect().right;
        const last = table.querySelector('thead th:last-child').getBoundingClientRect().right;
        const cells = [...table.querySelectorAll('tbody td.cand')];
        const style = c => getComputedStyle(c).overflowWrap + '/' + getComputedStyle(c).wordBreak;
        return {
          page: document.documentElement.scrollWidth,
          wrapScroll: wrap.scrollWidth, wrapClient: wrap.clientWidth,
          heads, lastRight: last, right,
          cellOverflow: cells.filter(c => c.scrollWidth > c.clientWidth + 1).length,
          wrapStyle: cells.map(style),
          summaryTop: document.querySelector('#reading').getBoundingClientRect().top,
        };
    }"""
    )
    context.close()
    assert got["page"] <= 1280, got
    assert got["wrapScroll"] <= got["wrapClient"], got  # no sideways scrolling
    assert got["lastRight"] <= got["right"] + 1, got  # the last column (Pareto) is visible
    assert any("PPL" in h for h in got["heads"]) and any("size" in h.lower() for h in got["heads"])
    assert any("Pareto" in h for h in got["heads"])
    # Names may break only where the page allows it (<wbr> after - _ /), never mid-word.
    assert set(got["wrapStyle"]) == {"normal/normal"}, got["wrapStyle"]
    assert got["cellOverflow"] == 0, got
    assert got["summaryTop"] < 400, got
    html = page_file.read_text()
    assert "int8-<wbr>weight-<wbr>only-<wbr>torchao-<wbr>per-<wbr>channel" in html
    assert "quanto_<wbr>int2_<wbr>packed/<wbr>groups_<wbr>64" in html


def test_a_candidate_is_placed_among_the_familiar_pairs(quant_run):
    from lmkl.report.render import FAMILIAR_PAIRS, _familiar, scale_rows

    values = {name: kl for name, _, kl in FAMILIAR_PAIRS}
    assert 1e-5 < values["int8"] < 1e-4 and 0.1 < values["int2"] < 0.3  # the shipped study
    assert _familiar(1e-10) == "below float16 rounding"
    assert _familiar(0.3) == "between int2 and demo student"
    assert _familiar(5.0) == "above demo student"
    assert _familiar(math.nan) == "–"
    report = build_report([quant_run])
    results = json.loads((quant_run / "results.json").read_text())
    means = {c["label"]: c["metrics"]["kl"]["mean"] for c in results["candidates"]}
    for row in scale_rows(report):
        kl = means[row["key"]]
        below = max((v for v in values.values() if v <= kl), default=None)
        above = min((v for v in values.values() if v > kl), default=None)
        names = {v: k for k, v in values.items()}
        if below is not None and above is not None:
            assert row["familiar"] == f"between {names[below]} and {names[above]}"


@pytest.mark.parametrize(("no_color", "bracketed"), [(False, False), (True, True)])
def test_inspect_brackets_tokens_only_where_colour_cannot_mark_them(
    experiment_root, no_color, bracketed
):
    import io

    from rich.console import Console

    from lmkl.report.drilldown import inspect_run

    buffer = io.StringIO()
    console = Console(file=buffer, force_terminal=True, no_color=no_color, width=160)
    inspect_run(experiment_root, dataset="wiki", worst=2, max_tokens=40, console=console)
    assert ("⟦" in buffer.getvalue()) is bracketed


def test_readme_shows_the_measured_familiar_pairs():
    """README's table is the one scripts/familiar_pairs.py wrote with the report's own values."""
    from lmkl.report.render import familiar_pairs_markdown

    root = Path(__file__).resolve().parent.parent
    shipped = json.loads((root / "lmkl" / "report" / "familiar_pairs.json").read_text())
    table = familiar_pairs_markdown(shipped["pairs"])
    assert table in (root / "README.md").read_text()
    assert table in (root / "scripts" / "results" / "familiar_pairs.md").read_text()


def test_readme_quotes_the_measured_demo_intervals_and_int8_batch_dependence():
    """The README's demo intervals and LLM.int8() batch dependence are the recorded run's."""
    from lmkl.formatting import format_ci, format_value

    root = Path(__file__).resolve().parent.parent
    shipped = json.loads((root / "lmkl" / "report" / "familiar_pairs.json").read_text())
    readme = " ".join((root / "README.md").read_text().split())
    demo = shipped["demo"]
    assert (
        f"the mean KL of {format_value(demo['kl_mean'])} has a token interval of "
        f"{format_ci(demo['token_interval'])} and a document-bootstrap CI of "
        f"{format_ci(demo['bootstrap_ci'])}"
    ) in readme
    int8 = next(p for p in shipped["pairs"] if "batch_dependence" in p)
    dependence = int8["batch_dependence"]
    assert (
        f"mean KL {format_value(int8['kl'])} while the batch alone moves it by up to "
        f"{format_value(dependence['max_kl'])} (mean {format_value(dependence['mean_kl'])}, "
        f"|Δlogit| up to {format_value(dependence['max_abs_logit_diff'])})"
    ) in readme
