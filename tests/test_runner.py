"""End-to-end numbers of the compare pipeline against an independent float64 reference."""

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

from lmkl.engine.token_compare import run_comparison
from lmkl.errors import DataError, OutputError, TokenizerMismatchError
from lmkl.specs import ComputeSpec, DataSpec, ModelSpec, OutputSpec, WindowSpec

METRICS = [
    "kl",
    "reverse_kl",
    "jsd",
    "entropy_reference",
    "entropy_candidate",
    "nll_reference",
    "nll_candidate",
    "delta_p",
    "reference_top1_prob",
]


def run(tiny_pair, data: Path, out: Path, candidate: Path | None = None, **compute):
    windows = compute.pop("windows", WindowSpec(context_length=64, stride=32))
    return run_comparison(
        ModelSpec(model=str(tiny_pair["reference"]), label="ref"),
        [ModelSpec(model=str(candidate or tiny_pair["candidate"]), label="cand")],
        DataSpec(source=str(data)),
        windows,
        ComputeSpec(**compute),
        OutputSpec(dir=str(out)),
    )


def float64_reference(
    tiny_pair, data: Path, candidate: Path | None = None, context: int = 64, stride: int = 32
) -> dict[tuple[int, int], dict]:
    """Per (doc, position): metrics from each model's own full forward, in float64 SciPy.

    Windows are rebuilt here from the documented rule, one window per forward, no padding.
    """
    tok = AutoTokenizer.from_pretrained(tiny_pair["reference"])
    models = [
        AutoModelForCausalLM.from_pretrained(p, dtype=torch.float32).eval()
        for p in (tiny_pair["reference"], candidate or tiny_pair["candidate"])
    ]
    vocab = len(tok)
    out = {}
    for doc_id, line in enumerate(data.read_text().splitlines()):
        ids = tok(json.loads(line)["text"])["input_ids"]
        scored = 1
        while scored < len(ids):
            end = min(len(ids), context if scored == 1 else scored + stride)
            begin = max(0, end - context)
            window = torch.tensor([ids[begin:end]])
            with torch.no_grad():
                lp, lq = (
                    special.log_softmax(m(window).logits[0, :, :vocab].double().numpy(), -1)
                    for m in models
                )
            for pos in range(scored, end):
                j = pos - begin - 1
                p, q = np.exp(lp[j]), np.exp(lq[j])
                mix = 0.5 * (p + q)
                x = ids[pos]
                out[(doc_id, pos)] = {
                    "kl": special.rel_entr(p, q).sum(),
                    "reverse_kl": special.rel_entr(q, p).sum(),
                    "jsd": 0.5 * (special.rel_entr(p, mix).sum() + special.rel_entr(q, mix).sum()),
                    "entropy_reference": -(p * lp[j]).sum(),
                    "entropy_candidate": -(q * lq[j]).sum(),
                    "nll_reference": -lp[j][x],
                    "nll_candidate": -lq[j][x],
                    "delta_p": q[x] - p[x],
                    "reference_top1_prob": p.max(),
                    "top1_agree": float(p.argmax() == q.argmax()),
                    "token_id": x,
                }
            scored = end
    return out


def test_per_token_values_match_float64_reference(tiny_pair, small_jsonl, tmp_path):
    outcome = run(tiny_pair, small_jsonl, tmp_path / "run", batch_size=3, chunk_tokens=17)
    table = pq.read_table(outcome.path / "tokens.parquet").to_pylist()
    want = float64_reference(tiny_pair, small_jsonl)
    assert len(table) == len(want)
    assert {(r["doc_id"], r["position"]) for r in table} == set(want)
    worst = 0.0
    for row in table:
        ref = want[(row["doc_id"], row["position"])]
        assert row["token_id"] == ref["token_id"]
        for name in METRICS:
            worst = max(worst, abs(row[name] - ref[name]))
        # Near-ties may flip argmax between float32 and float64; none are expected here.
        assert row["top1_agree"] == ref["top1_agree"]
    assert worst <= 1e-5, worst
    # The summary is computed from the same numbers.
    metrics = outcome.results["candidates"][0]["metrics"]
    kls = np.array([r["kl"] for r in want.values()])
    assert metrics["kl"]["mean"] == pytest.approx(kls.mean(), abs=1e-6)
    assert metrics["kl"]["p99"] == pytest.approx(np.quantile(kls, 0.99), abs=1e-5)
    assert metrics["kl"]["se"] == pytest.approx(kls.std(ddof=1) / math.sqrt(kls.size), rel=1e-4)
    nll_p = np.array([r["nll_reference"] for r in want.values()])
    nll_q = np.array([r["nll_candidate"] for r in want.values()])
    assert metrics["ppl"]["reference"] == pytest.approx(math.exp(nll_p.mean()), rel=1e-5)
    assert metrics["ppl"]["candidate"] == pytest.approx(math.exp(nll_q.mean()), rel=1e-5)
    assert metrics["ln_ppl_ratio"]["mean"] == pytest.approx((nll_q - nll_p).mean(), abs=1e-6)
    assert metrics["nll_correlation"] == pytest.approx(np.corrcoef(nll_p, nll_q)[0, 1], abs=1e-5)
    texts = [json.loads(x)["text"] for x in small_jsonl.read_text().splitlines()]
    total_bytes = sum(len(t.encode()) for t in texts)
    assert metrics["bits_per_byte"]["bytes"] == total_bytes  # BOS is scored-from, so every byte
    assert metrics["bits_per_byte"]["reference"] == pytest.approx(
        nll_p.sum() / total_bytes / math.log(2), rel=1e-5
    )
    assert metrics["counts"]["tokens"] == len(want)
    assert metrics["counts"]["documents"] == 3


def test_batch_size_chunking_and_padding_do_not_change_values(tiny_pair, small_jsonl, tmp_path):
    a = run(tiny_pair, small_jsonl, tmp_path / "a", batch_size=1, chunk_tokens=1000)
    b = run(tiny_pair, small_jsonl, tmp_path / "b", batch_size=4, chunk_tokens=7)
    ta = pq.read_table(a.path / "tokens.parquet").sort_by(
        [("doc_id", "ascending"), ("position", "ascending")]
    )
    tb = pq.read_table(b.path / "tokens.parquet").sort_by(
        [("doc_id", "ascending"), ("position", "ascending")]
    )
    assert ta["token_id"].to_pylist() == tb["token_id"].to_pylist()
    for name in METRICS:
        diff = np.abs(ta[name].to_numpy() - tb[name].to_numpy()).max()
        assert diff <= 1e-5, (name, diff)


def test_same_model_gives_zero_kl(tiny_pair, small_jsonl, tmp_path):
    outcome = run(tiny_pair, small_jsonl, tmp_path / "self", candidate=tiny_pair["reference"])
    kl = pq.read_table(outcome.path / "tokens.parquet")["kl"].to_numpy()
    assert np.abs(kl).max() <= 1e-6
    assert outcome.results["candidates"][0]["metrics"]["top1_agreement"]["mean"] == 1.0


def test_padded_head_is_sliced_to_tokenizer(tiny_pair, padded_candidate, small_jsonl, tmp_path):
    outcome = run(tiny_pair, small_jsonl, tmp_path / "pad", candidate=padded_candidate)
    assert outcome.results["windowing"]["padded_vocab"] is True
    assert outcome.results["windowing"]["vocab_size"] == 512
    assert "sliced" in outcome.results["windowing"]["vocab_note"]
    rows = pq.read_table(outcome.path / "tokens.parquet").to_pylist()
    want = float64_reference(tiny_pair, small_jsonl, candidate=padded_candidate)
    for row in rows:
        ref = want[(row["doc_id"], row["position"])]
        assert abs(row["kl"] - ref["kl"]) <= 1e-5


def test_gpt2_candidate(tiny_pair, gpt2_candidate, small_jsonl, tmp_path):
    outcome = run(
        tiny_pair, small_jsonl, tmp_path / "gpt2", candidate=gpt2_candidate, max_tokens=200
    )
    metrics = outcome.results["candidates"][0]["metrics"]
    assert metrics["counts"]["tokens"] == 200
    assert metrics["kl"]["mean"] > 0


def test_tokenizer_mismatch_is_refused(tiny_pair, other_tokenizer_model, small_jsonl, tmp_path):
    with pytest.raises(TokenizerMismatchError, match="differ"):
        run(tiny_pair, small_jsonl, tmp_path / "x", candidate=other_tokenizer_model)


def test_missing_text_field_lists_fields(tiny_pair, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"body": "hello there", "id": 1}\n')
    with pytest.raises(DataError, match="body, id"):
        run(tiny_pair, data, tmp_path / "x")


def test_empty_dataset(tiny_pair, tmp_path):
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": ""}\n')
    with pytest.raises(DataError, match="no document"):
        run(tiny_pair, data, tmp_path / "x")


def test_existing_run_is_not_overwritten(tiny_pair, small_jsonl, tmp_path):
    run(tiny_pair, small_jsonl, tmp_path / "run", max_tokens=50)
    with pytest.raises(OutputError, match="already holds a run"):
        run(tiny_pair, small_jsonl, tmp_path / "run", max_tokens=50)


def test_llama_cpp_windowing_scores_second_half(tiny_pair, tmp_path):
    text = "\n".join(json.loads(x)["text"] for x in tiny_pair["heldout"].read_text().splitlines())
    data = tmp_path / "stream.txt"
    data.write_text(text[:6000])
    outcome = run(
        tiny_pair,
        data,
        tmp_path / "lc",
        windows=WindowSpec(windowing="llama-cpp", context_length=32),
    )
    table = pq.read_table(outcome.path / "tokens.parquet").to_pylist()
    tok = AutoTokenizer.from_pretrained(tiny_pair["reference"])
    n_tokens = len(tok(data.read_text())["input_ids"])
    chunks = n_tokens // 32
    assert len(table) == chunks * (32 - 1 - 16)
    assert sorted({r["position"] % 32 for r in table}) == list(range(17, 32))
    assert {r["window_pos"] for r in table} == set(range(17, 32))
