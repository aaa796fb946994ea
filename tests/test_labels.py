"""Candidate labels: always distinct (rows are selected by label), and shown literally wherever
they are printed or drawn (rich markup, matplotlib math text)."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_runner import float64_reference
from typer.testing import CliRunner

from lmkl.cli import app
from lmkl.engine.token_compare import unique_labels
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
