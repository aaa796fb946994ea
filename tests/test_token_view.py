"""The token view without a browser: what the page embeds, its caps, choices and errors, and
`lmkl demo` opening on it. (tests/test_token_view_browser.py drives it in chromium.)"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from runtools import check_error, fake_demo_cache, invoke

import lmkl
from lmkl.report.runs import load_run
from lmkl.report.token_view import SHADES, _safe_json, build_token_view, log_edges, shade


@pytest.fixture(scope="module")
def view_run(tiny_pair, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("tv")
    lines = tiny_pair["heldout"].read_text().splitlines()[:5]
    data = root / "docs.jsonl"
    data.write_text(
        "".join(json.dumps({"text": json.loads(x)["text"][:300]}) + "\n" for x in lines)
    )
    run = lmkl.compare(
        tiny_pair["reference"],
        tiny_pair["candidate"],
        data=data,
        out=root / "run",
        context_length=128,
        batch_size=4,
        view_tokens=10_000,
    )
    return run.path


def _data(tv) -> dict:
    return json.loads(tv.data_json)


def test_embedded_numbers_are_tokens_parquet_in_page_order(view_run):
    tv = build_token_view(load_run(view_run))
    data = _data(tv)
    tokens = pq.read_table(view_run / "tokens.parquet").to_pandas()
    view = pq.read_table(view_run / "view.parquet").to_pandas()
    # Documents worst first by mean KL, each document's scored tokens by position.
    means = tokens.groupby("doc_id")["kl"].mean().sort_values(ascending=False)
    assert data["units"] == means.index.tolist()
    order = tokens.set_index("doc_id").loc[data["units"]].reset_index()
    order = order.sort_values(["doc_id", "position"]).set_index("doc_id").loc[data["units"]]
    assert data["pos"] == order["position"].tolist()
    for name in ("kl", "reverse_kl", "jsd"):
        np.testing.assert_allclose(data["c"][0][name], order[name], rtol=5e-4)
    np.testing.assert_allclose(data["c"][0]["nll_reference"], order["nll_reference"], rtol=5e-5)
    # Top-5 strings and probabilities, five per token.
    scored = view[view["scored"]].set_index(["doc_id", "position"])
    first = scored.loc[(data["units"][0], data["pos"][0])]
    assert [data["vocab"][i] for i in data["rt"][:5]] == list(first["reference_top5_tokens"])
    np.testing.assert_allclose(data["c"][0]["cp"][:5], first["candidate_top5_probs"], rtol=5e-4)
    # The text holds every token of the shown documents, context ones unshaded.
    assert tv.text_html.count('<span class="t') == len(data["pos"])
    assert tv.text_html.count('<span class="c">') == (~view["scored"]).sum()
    assert "5 documents" in tv.cap_note and "at most 50,000 tokens" in tv.cap_note


def test_shading_is_a_log_scale_of_the_metric():
    values = np.array([0.0, 1e-6, 1e-3, 0.01, 0.1, 1.0, 10.0, np.inf, np.nan])
    edges = log_edges(values)
    assert len(edges) == SHADES + 1
    ratios = np.diff(np.log(edges))
    np.testing.assert_allclose(ratios, ratios[0])  # equal steps in log space
    assert edges[-1] == 10.0
    got = shade(values, edges)
    expected = [
        -1 if np.isnan(v) else SHADES if v == np.inf else int(np.sum(v >= np.array(edges[:-1])))
        for v in values
    ]
    assert got.tolist() == expected
    assert got[0] == 0 and got[-2] == SHADES and got[-1] == -1


def test_data_block_cannot_close_its_script_element():
    text = _safe_json(["</script><script>alert(1)</script>", "a & b", "\u2028"])
    assert "<" not in text and ">" not in text and "&" not in text and "\u2028" not in text
    assert json.loads(text)[0] == "</script><script>alert(1)</script>"


def test_doc_choice_and_caps(view_run, tmp_path):
    tv = build_token_view(load_run(view_run), docs=[3, 1])
    assert _data(tv)["units"] == [3, 1]
    small = build_token_view(load_run(view_run), max_tokens=120)
    view = pq.read_table(view_run / "view.parquet").to_pandas()
    sizes = view.groupby("unit").size()
    shown = _data(small)["units"]
    assert small.text_html.count("<span ") <= 120  # every shown position, scored or context
    assert len(shown) == 1 or sizes.loc[shown].sum() <= 120
    # A document longer than the cap is cut to it, around its worst token.
    tiny = build_token_view(load_run(view_run), max_tokens=20)
    data = _data(tiny)
    assert len(data["units"]) == 1 and len(data["pos"]) <= 20
    assert "the 20 tokens around its worst one are shown" in tiny.cap_note
    tokens = pq.read_table(view_run / "tokens.parquet").to_pandas()
    doc = tokens[tokens["doc_id"] == data["units"][0]]
    assert int(doc.loc[doc["kl"].idxmax(), "position"]) in data["pos"]
    out = tmp_path / "r.html"
    code, output = invoke(
        ["report", str(view_run), "--view", "tokens", "--doc", "42", "-o", str(out)]
    )
    check_error(code, output, 2, "document 42 is not in the token view")
    code, output = invoke(["report", str(view_run), "--view", "tokens", "--format", "md"])
    check_error(code, output, 2, "HTML report only")
    code, output = invoke(
        ["report", str(view_run), "--view", "tokens", "--doc", "2", "-o", str(out)]
    )
    assert code == 0, output
    html = out.read_text()
    # The verdict first, then the token view, then the leaderboard and the rest.
    assert html.index('id="reading"') < html.index('id="token-view"')
    assert html.index('id="token-view"') < html.index('id="leaderboard"')
    assert re.findall(r'<div class="tv-doc" id="tv-u(\d+)"', html) == ["2"]


def test_report_without_a_recorded_view(tiny_pair, small_jsonl, tmp_path):
    run = lmkl.compare(
        tiny_pair["reference"],
        tiny_pair["candidate"],
        data=small_jsonl,
        out=tmp_path / "plain",
        context_length=64,
        max_tokens=60,
    )
    code, output = invoke(["report", str(run.path), "--view", "tokens"])
    check_error(code, output, 1, "recorded no token view")
    code, output = invoke(["report", str(run.path)])
    assert code == 0, output
    html = (run.path / "report.html").read_text()
    assert "<script" not in html and "script-src" not in html  # no view: still no script at all


def test_demo_report_opens_on_the_summary_then_the_token_view(tiny_pair, tmp_path):
    fake_demo_cache(tiny_pair)  # the tiny pair stands in for the real (1.5 min) demo build
    code, output = invoke(["demo", "--out", str(tmp_path / "demo"), "--quiet"])
    assert code == 0, output
    html = (tmp_path / "demo" / "report.html").read_text()
    # The verdict first, then the token view, then the leaderboard and the rest.
    assert html.index('id="reading"') < html.index('id="token-view"')
    assert html.index('id="token-view"') < html.index('id="leaderboard"')
    assert (tmp_path / "demo" / "view.parquet").is_file()
    tokens = pq.read_table(tmp_path / "demo" / "tokens.parquet").to_pandas()
    worst = tokens.groupby("doc_id")["kl"].mean().idxmax()
    assert re.search(r'<div class="tv-doc" id="tv-u(\d+)"', html).group(1) == str(worst)


def test_an_experiment_report_shows_its_dataset_token_view(view_run, tmp_path):
    """`lmkl report EXPERIMENT --view tokens` finds the view in datasets/<name>/."""
    import datetime as dt

    from lmkl.experiment.run import combine
    from lmkl.experiment.schema import ExperimentConfig
    from lmkl.files import write_json
    from lmkl.report.render import write_report

    root = tmp_path / "study"
    shutil.copytree(view_run, root / "datasets" / "heldout")
    sub = json.loads((root / "datasets" / "heldout" / "results.json").read_text())
    label = sub["candidates"][0]["label"]
    config = ExperimentConfig.model_validate(
        {
            "name": "one-dataset",
            "reference": {"model": "reference"},
            "candidates": [{"label": label, "model": "candidate"}],
            "datasets": [{"source": "docs.jsonl", "label": "heldout"}],
            "ranking": {"resamples": 50},
        }
    )
    now = dt.datetime.now(dt.timezone.utc)
    write_json(root / "results.json", combine(root, config, [sub], now, now))
    html = write_report([root], "html", tmp_path / "r.html", view="tokens").read_text()
    assert 'id="token-view"' in html and "dataset heldout" in html
    assert "no tokens.parquet" not in html
    first_unit = re.search(r'<div class="tv-doc" id="tv-u(\d+)"', html).group(1)
    expected = build_token_view(load_run(root / "datasets" / "heldout"))
    assert first_unit == str(_data(expected)["units"][0])
