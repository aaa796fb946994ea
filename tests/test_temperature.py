"""compare --temperature: softened distributions against a float64 reference, and recorded."""

from __future__ import annotations

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy import special, stats
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from lmkl.cli import app

T = 2.0


def test_temperature_two_matches_float64_softened_logits(tiny_pair, tmp_path):
    texts = [json.loads(x)["text"][:400] for x in tiny_pair["heldout"].read_text().splitlines()[:3]]
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    result = CliRunner().invoke(
        app,
        [
            "compare",
            str(tiny_pair["reference"]),
            str(tiny_pair["candidate"]),
            "--data",
            str(data),
            "--temperature",
            str(T),
            "-c",
            "256",
            "--out",
            str(tmp_path / "run"),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["compute"]["temperature"] == T
    assert results["provenance"]["options"]["compute"]["temperature"] == T

    tok = AutoTokenizer.from_pretrained(tiny_pair["reference"])
    ref, cand = (
        AutoModelForCausalLM.from_pretrained(tiny_pair[k], dtype=torch.float32).eval()
        for k in ("reference", "candidate")
    )
    rows = pq.read_table(tmp_path / "run" / "tokens.parquet").to_pandas()
    plain_kl = []
    for doc_id, text in enumerate(texts):
        ids = tok(text)["input_ids"]
        assert len(ids) <= 256  # one window per document
        with torch.no_grad():
            logits = [
                m(torch.tensor([ids])).logits[0, :-1, :512].double().numpy() for m in (ref, cand)
            ]
        lp, lq = (special.log_softmax(x / T, -1) for x in logits)
        p, q = np.exp(lp), np.exp(lq)
        targets = np.array(ids[1:])
        got = rows[rows.doc_id == doc_id].sort_values("position")
        assert got.position.tolist() == list(range(1, len(ids)))
        np.testing.assert_allclose(got.kl, special.rel_entr(p, q).sum(-1), atol=1e-5)
        np.testing.assert_allclose(got.reverse_kl, special.rel_entr(q, p).sum(-1), atol=1e-5)
        np.testing.assert_allclose(got.entropy_reference, stats.entropy(p, axis=-1), atol=1e-5)
        rows_idx = np.arange(len(targets))
        np.testing.assert_allclose(got.nll_candidate, -lq[rows_idx, targets], atol=1e-5)
        pl, ql = (special.softmax(x, -1) for x in logits)
        plain_kl.append(special.rel_entr(pl, ql).sum(-1))
    # Softening changes the numbers: T = 2 is not T = 1 in disguise.
    assert not np.allclose(
        np.concatenate(plain_kl), rows.sort_values(["doc_id", "position"]).kl, atol=1e-3
    )
    assert results["candidates"][0]["metrics"]["kl"]["mean"] == pytest.approx(
        rows.kl.mean(), rel=1e-5
    )
