"""`lmkl select RUN`: the hardest windows of a run as a dataset.

The chosen windows are checked against an independent pandas computation from tokens.parquet
(rolling means, then greedy non-overlapping picks), the text against the tokenizer, and the
output is loaded back with `datasets` and used as the `--data` of another comparison.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from runtools import check_error, invoke
from tiny_models import tiny_tokenizer

import lmkl
from lmkl.report.select import select_contexts, write_selection


@pytest.fixture(scope="module")
def run_dir(tiny_pair, tmp_path_factory) -> Path:
    lines = tiny_pair["heldout"].read_text().splitlines()[:4]
    data = tmp_path_factory.mktemp("select-data") / "four.jsonl"
    with data.open("w") as fh:
        for line in lines:
            fh.write(json.dumps({"text": json.loads(line)["text"][:900]}) + "\n")
    run = lmkl.compare(
        tiny_pair["reference"],
        tiny_pair["candidate"],
        data=data,
        out=tmp_path_factory.mktemp("select") / "run",
        context_length=64,
        stride=32,
        batch_size=4,
    )
    return run.path


def expected_windows(run_dir: Path, by: str, window: int, top: int) -> list[tuple]:
    """(doc, span_start, span_end, score) by pandas: every window's mean, greedy, no overlap."""
    tokens = pq.read_table(run_dir / "tokens.parquet").to_pandas()
    tokens["nll_gap"] = tokens["nll_candidate"] - tokens["nll_reference"]
    contenders = []
    for doc, rows in tokens.sort_values(["doc_id", "position"]).groupby("doc_id"):
        means = rows[by].rolling(window).mean().to_numpy()[window - 1 :]
        positions = rows["position"].to_numpy()
        for start, score in enumerate(means):
            contenders.append((-score, doc, start, positions[start : start + window]))
    contenders.sort(key=lambda c: (c[0], c[1], c[2]))
    used: set[tuple[int, int]] = set()
    out = []
    for neg, doc, _, positions in contenders:
        if len(out) == top:
            break
        keys = {(doc, int(p)) for p in positions}
        if keys & used:
            continue
        used |= keys
        out.append((int(doc), int(positions[0]), int(positions[-1]) + 1, -neg))
    return out


@pytest.mark.parametrize(("by", "window", "top"), [("kl", 16, 6), ("nll_gap", 5, 9)])
def test_windows_are_the_top_n_by_an_independent_computation(run_dir, by, window, top):
    selection = select_contexts(run_dir, by=by, top=top, window=window, context=8)
    got = [(r["doc_id"], r["span_start"], r["span_end"], r["score"]) for r in selection.rows]
    expected = expected_windows(run_dir, by, window, top)
    assert [g[:3] for g in got] == [e[:3] for e in expected]
    np.testing.assert_allclose([g[3] for g in got], [e[3] for e in expected], rtol=1e-9)
    # Coverage: the selection's share of the run's total KL, from tokens.parquet.
    tokens = pq.read_table(run_dir / "tokens.parquet").to_pandas()
    inside = np.zeros(len(tokens), dtype=bool)
    for doc, a, b, _ in expected:
        inside |= (tokens["doc_id"] == doc) & tokens["position"].between(a, b - 1)
    assert selection.tokens == inside.sum()
    assert selection.kl_share == pytest.approx(
        tokens["kl"][inside].sum() / tokens["kl"].sum(), rel=1e-6
    )


def test_text_is_the_context_and_window_tokens(run_dir, tiny_pair):
    selection = select_contexts(run_dir, by="jsd", top=3, window=4, context=10)
    tokenizer = tiny_tokenizer()
    lines = Path(selection.rows[0]["data_source"]).read_text().splitlines()
    docs = [json.loads(line)["text"] for line in lines]
    for row in selection.rows:
        ids = tokenizer(docs[row["doc_id"]])["input_ids"]
        assert row["span_end"] - row["span_start"] == 4 == row["tokens"]
        assert row["context_start"] == max(0, row["span_start"] - 10)
        prompt = tokenizer.decode(
            ids[row["context_start"] : row["span_start"]], skip_special_tokens=True
        )
        target = tokenizer.decode(ids[row["span_start"] : row["span_end"]])
        assert (row["prompt"], row["target"]) == (prompt, target)
        assert row["text"] == prompt + target
        assert row["text"] in docs[row["doc_id"]]  # byte-level BPE decodes exactly
        assert row["candidate"] == "candidate" and row["by"] == "jsd"
        assert row["run"] == str(run_dir.resolve()) and len(row["data_fingerprint"]) == 64


def test_min_score_stops_the_selection(run_dir):
    full = select_contexts(run_dir, top=50, window=8)
    cut = full.rows[4]["score"]
    some = select_contexts(run_dir, top=50, window=8, min_score=cut)
    assert [r["span_start"] for r in some.rows] == [r["span_start"] for r in full.rows[:5]]


@pytest.mark.parametrize("name", ["hard.jsonl", "hard.parquet", "hard_dataset"])
def test_output_loads_with_datasets_and_feeds_compare(run_dir, tiny_pair, tmp_path, name):
    import datasets

    out = tmp_path / name
    code, output = invoke(
        ["select", str(run_dir), "--out", str(out), "--top", "3", "--window", "12"]
    )
    assert code == 0, output
    assert "of the run's total KL(P‖Q)" in output
    if name.endswith(".jsonl"):
        loaded = datasets.load_dataset("json", data_files=str(out), split="train")
    elif name.endswith(".parquet"):
        loaded = datasets.load_dataset("parquet", data_files=str(out), split="train")
    else:
        loaded = datasets.load_from_disk(str(out))
    assert loaded.num_rows == 3
    assert {"text", "doc_id", "span_start", "span_end", "score", "run"} <= set(loaded.column_names)
    expected = [e[:3] for e in expected_windows(run_dir, "kl", 12, 3)]
    got = list(zip(loaded["doc_id"], loaded["span_start"], loaded["span_end"], strict=True))
    assert got == expected
    code, output = invoke(
        [
            "compare",
            str(tiny_pair["reference"]),
            str(tiny_pair["candidate"]),
            "--data",
            str(out),
            "--out",
            str(tmp_path / "again"),
            "--context-length",
            "64",
            "--quiet",
        ]
    )
    assert code == 0, output
    results = json.loads((tmp_path / "again" / "results.json").read_text())
    assert results["data"]["documents"] == 3


def test_bad_input_is_one_line_with_its_exit_code(run_dir, tmp_path, tiny_pair):
    args = ["select", str(run_dir), "--out"]
    check_error(*invoke([*args, str(tmp_path / "x.csv")]), 2, "unsupported output type '.csv'")
    check_error(*invoke([*args, str(tmp_path / "x.jsonl"), "--candidate", "nope"]), 2, "nope")
    check_error(
        *invoke([*args, str(tmp_path / "x.jsonl"), "--min-score", "1e9"]), 1, "scores at least"
    )
    check_error(
        *invoke(["select", str(tmp_path), "--out", str(tmp_path / "x.jsonl")]), 1, "results.json"
    )
    experiment = tmp_path / "exp"
    (experiment / "datasets" / "wiki").mkdir(parents=True)
    results = {"schema_version": 2, "kind": "experiment"}  # readers check the schema first
    (experiment / "results.json").write_text(json.dumps(results))
    check_error(
        *invoke(["select", str(experiment), "--out", str(tmp_path / "x.jsonl")]),
        2,
        "is an experiment",
    )
    (tmp_path / "taken.jsonl").write_text("keep me\n")
    check_error(*invoke([*args, str(tmp_path / "taken.jsonl")]), 1, "already exists")
    assert (tmp_path / "taken.jsonl").read_text() == "keep me\n"
    code, output = invoke([*args, str(tmp_path / "x.jsonl"), "--by", "entropy"])
    assert code == 2 and "Traceback" not in output
    # The data changed since the run: its windows would not be the run's.
    copy = tmp_path / "copy"
    copy.mkdir()
    for name in ("results.json", "tokens.parquet", "config.yaml"):
        (copy / name).write_bytes((run_dir / name).read_bytes())
    source = Path(json.loads((run_dir / "results.json").read_text())["data"]["source"])
    changed = tmp_path / "changed.jsonl"
    changed.write_text(source.read_text().replace("the", "teh"))
    config = (copy / "config.yaml").read_text().replace(str(source), str(changed))
    (copy / "config.yaml").write_text(config)
    check_error(
        *invoke(["select", str(copy), "--out", str(tmp_path / "y.jsonl")]), 1, "changed since"
    )


def test_write_selection_refuses_to_replace_a_foreign_directory(run_dir, tmp_path):
    selection = select_contexts(run_dir, top=1)
    folder = tmp_path / "project"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    from lmkl.errors import OutputError

    with pytest.raises(OutputError, match="not a saved dataset"):
        write_selection(selection, folder, overwrite=True)
    assert (folder / "notes.txt").read_text() == "mine"
    frame = pd.DataFrame(selection.rows)
    assert frame["score"].iloc[0] == pytest.approx(selection.rows[0]["score"])
