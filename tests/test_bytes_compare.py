"""compare --different-tokenizers: per-byte numbers against an independent float64 computation."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from scipy import special
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

from lmkl.cli import app
from lmkl.engine.results import SCHEMA_VERSION

CONTEXT, STRIDE = 64, 32


def doc_nll_float64(model_dir: Path, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per document: Σ −log p(token) over tokens 1.., and the token count, from full forwards.

    Long documents follow the documented sliding-window rule (window of CONTEXT tokens, each
    new window scoring the next STRIDE tokens), one window per forward, no padding.
    """
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    vocab = len(tok)
    nll, count = [], []
    for text in texts:
        ids = tok(text)["input_ids"]
        total, scored = 0.0, 1
        while scored < len(ids):
            end = min(len(ids), CONTEXT if scored == 1 else scored + STRIDE)
            begin = max(0, end - CONTEXT)
            with torch.no_grad():
                logits = model(torch.tensor([ids[begin:end]])).logits[0, :, :vocab]
            lp = special.log_softmax(logits.double().numpy(), -1)
            total += sum(-lp[pos - begin - 1, ids[pos]] for pos in range(scored, end))
            scored = end
        nll.append(total)
        count.append(len(ids) - 1)
    return np.array(nll), np.array(count)


@pytest.fixture
def texts(tiny_pair) -> list[str]:
    docs = [json.loads(x)["text"] for x in tiny_pair["heldout"].read_text().splitlines()]
    return [docs[0][:700], docs[1][:150], docs[2][:400], "naïve café — ünïcode", docs[3][:90]]


def test_per_byte_comparison_matches_float64(tiny_pair, other_tokenizer_model, texts, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    result = CliRunner().invoke(
        app,
        [
            "compare",
            str(tiny_pair["reference"]),
            str(other_tokenizer_model),
            "--data",
            str(data),
            "--different-tokenizers",
            "-c",
            str(CONTEXT),
            "--stride",
            str(STRIDE),
            "-b",
            "3",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 0, result.output
    assert "no token-level KL was computed" in " ".join(result.output.split())
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    assert results["token_level"] is False and results["schema_version"] == SCHEMA_VERSION
    metrics = results["candidates"][0]["metrics"]
    assert "kl" not in metrics and metrics["token_level"] is False

    nll_p, n_p = doc_nll_float64(tiny_pair["reference"], texts)
    nll_q, n_q = doc_nll_float64(other_tokenizer_model, texts)
    b = np.array([len(t.encode()) for t in texts], dtype=float)
    ln2 = math.log(2)
    bpb = metrics["bits_per_byte"]
    assert bpb["bytes"] == b.sum()
    assert bpb["reference"] == pytest.approx(nll_p.sum() / b.sum() / ln2, rel=1e-5)
    assert bpb["candidate"] == pytest.approx(nll_q.sum() / b.sum() / ln2, rel=1e-5)
    # Difference with a ratio-estimator (delta-method) se over documents, computed here anew.
    d = (nll_q - nll_p) / ln2
    ratio = d.sum() / b.sum()
    se = np.sqrt(np.sum((d - ratio * b) ** 2) / (len(b) * (len(b) - 1))) / b.mean()
    assert bpb["difference"]["mean"] == pytest.approx(ratio, rel=1e-5)
    assert bpb["difference"]["se"] == pytest.approx(se, rel=1e-4)
    assert bpb["difference"]["ci95"] == pytest.approx(
        [ratio - 1.96 * se, ratio + 1.96 * se], rel=1e-4
    )
    ll_diff = (-nll_q / b) - (-nll_p / b)
    llpb = metrics["ll_per_byte"]
    assert llpb["reference"] == pytest.approx(np.mean(-nll_p / b), rel=1e-5)
    assert llpb["candidate"] == pytest.approx(np.mean(-nll_q / b), rel=1e-5)
    assert llpb["difference"]["mean"] == pytest.approx(ll_diff.mean(), rel=1e-5)
    assert llpb["difference"]["se"] == pytest.approx(
        ll_diff.std(ddof=1) / math.sqrt(len(b)), rel=1e-4
    )
    assert metrics["counts"]["tokens_reference"] == n_p.sum()
    assert metrics["counts"]["tokens_candidate"] == n_q.sum()
    assert metrics["uncovered_bytes"] == {"reference": 0, "other": 0}

    docs = pq.read_table(tmp_path / "run" / "documents.parquet").to_pandas()
    np.testing.assert_allclose(docs.nll_reference, nll_p, rtol=1e-5)
    np.testing.assert_allclose(docs.nll_candidate, nll_q, rtol=1e-5)


def test_mismatched_tokenizers_point_to_the_option(
    tiny_pair, other_tokenizer_model, texts, tmp_path
):
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    result = CliRunner().invoke(
        app,
        [
            "compare",
            str(tiny_pair["reference"]),
            str(other_tokenizer_model),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 1
    assert "--different-tokenizers" in result.output


def test_llama_cpp_windowing_is_refused(tiny_pair, other_tokenizer_model, texts, tmp_path):
    data = tmp_path / "d.txt"
    data.write_text("\n\n".join(texts))
    result = CliRunner().invoke(
        app,
        [
            "compare",
            str(tiny_pair["reference"]),
            str(other_tokenizer_model),
            "--data",
            str(data),
            "--different-tokenizers",
            "--windowing",
            "llama-cpp",
            "--out",
            str(tmp_path / "run"),
        ],
    )
    assert result.exit_code == 2
    assert "llama-cpp" in result.output
