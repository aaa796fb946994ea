"""Numerical robustness: extreme logits never give NaN, broken models are counted and excluded.

Hypothesis checks the divergence library on extreme rows against a float64 log-space reference;
end-to-end tests poison tiny models (NaN weights, float16 overflow) and check that exactly the
positions whose logits the model itself cannot produce finitely are flagged, excluded from the
statistics and reported with their share.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from runtools import invoke
from scipy import special
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmkl.data.corpus import load_corpus
from lmkl.data.windows import make_windows
from lmkl.scoring import divergence as D
from lmkl.specs import DataSpec, WindowSpec

EXTREME = st.one_of(st.floats(-1e4, 1e4), st.just(-math.inf))


def _rows(min_v: int = 1, max_v: int = 12):
    """float64 logit rows with at least one finite entry each (so each row is a distribution)."""
    shape = st.tuples(st.integers(1, 3), st.integers(min_v, max_v))
    return arrays(np.float64, shape, elements=EXTREME).filter(
        lambda a: bool(np.isfinite(a).any(-1).all())
    )


def _kl64(lp: np.ndarray, lq: np.ndarray) -> float:
    """Σ p (log p − log q) over P's support, decided in log space; +inf off Q's support."""
    s = lp > -np.inf
    if np.any(s & (lq == -np.inf)):
        return math.inf
    return float(np.sum(np.exp(lp[s]) * (lp[s] - lq[s])))


def _mix64(lp: np.ndarray, lq: np.ndarray, beta: float) -> np.ndarray:
    return np.logaddexp(lp + math.log(beta), lq + math.log1p(-beta))


@settings(max_examples=120, deadline=None)
@given(_rows(), st.data(), st.floats(0.05, 0.95))
def test_library_functions_never_nan_and_match_float64(p, data, beta):
    q = data.draw(
        arrays(np.float64, p.shape, elements=EXTREME).filter(
            lambda a: bool(np.isfinite(a).any(-1).all())
        )
    )
    results = {
        "kl": D.kl_divergence(p, q),
        "reverse_kl": D.reverse_kl_divergence(p, q),
        "jsd": D.js_divergence(p, q),
        "gjsd": D.generalized_jsd(p, q, beta=beta),
        "tv": D.total_variation(p, q),
        "entropy": D.entropy(p),
        "cross_entropy": D.cross_entropy(p, q),
    }
    for name, value in results.items():
        assert isinstance(value, np.ndarray) and value.dtype == np.float64, name
        assert not np.isnan(value).any(), name
    for i in range(p.shape[0]):
        lp, lq = special.log_softmax(p[i]), special.log_softmax(q[i])
        pp, qq = np.exp(lp), np.exp(lq)
        h = -float(np.sum(pp[lp > -np.inf] * lp[lp > -np.inf]))
        want = {
            "kl": _kl64(lp, lq),
            "reverse_kl": _kl64(lq, lp),
            "jsd": 0.5 * (_kl64(lp, _mix64(lp, lq, 0.5)) + _kl64(lq, _mix64(lp, lq, 0.5))),
            "gjsd": beta * _kl64(lp, _mix64(lp, lq, beta))
            + (1 - beta) * _kl64(lq, _mix64(lp, lq, beta)),
            "tv": 0.5 * float(np.abs(pp - qq).sum()),
            "entropy": h,
            "cross_entropy": h + _kl64(lp, lq),
        }
        for name, expected in want.items():
            got = float(results[name][i])
            if math.isinf(expected):
                assert got == math.inf, name
            else:
                assert got == pytest.approx(expected, abs=1e-9, rel=1e-9), name
        assert 0 <= results["jsd"][i] <= math.log(2)
        assert 0 <= results["tv"][i] <= 1


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 64),
    st.floats(-1e4, 1e4),
    st.floats(-1e4, 1e4),
    st.sampled_from([torch.float32, torch.float64]),
)
def test_all_equal_rows_are_uniform(vocab, a, b, dtype):
    ref = torch.full((2, vocab), a, dtype=dtype)
    cand = torch.full((2, vocab), b, dtype=dtype)
    got = D.token_metrics(ref, cand, torch.zeros(2, dtype=torch.long))
    assert not got["nonfinite"].any()
    for name in ("kl", "reverse_kl", "jsd"):
        assert got[name].abs().max() <= 1e-6, name
    assert torch.allclose(
        got["entropy_reference"].double(),
        torch.full((2,), math.log(vocab), dtype=torch.float64),
        atol=1e-5,
    )
    assert torch.allclose(
        got["nll_candidate"].double(),
        torch.full((2,), math.log(vocab), dtype=torch.float64),
        atol=1e-5,
    )


@settings(max_examples=40, deadline=None)
@given(
    st.lists(
        st.one_of(st.floats(-1e4, 1e4), st.just(-math.inf), st.just(math.inf), st.just(math.nan)),
        min_size=2,
        max_size=2,
    )
)
def test_single_token_vocabulary_is_zero_or_flagged(values):
    ref, cand = torch.tensor([[values[0]]]), torch.tensor([[values[1]]])
    got = D.token_metrics(ref, cand, torch.tensor([0]))
    valid = all(math.isfinite(v) for v in values)
    assert bool(got["nonfinite"][0]) is not valid
    if valid:
        for name in ("kl", "reverse_kl", "jsd", "nll_reference", "nll_candidate", "delta_p"):
            assert float(got[name][0]) == 0, name
        assert float(got["reference_top1_prob"][0]) == 1
    else:
        assert all(math.isnan(float(got[n][0])) for n in D.TOKEN_METRIC_NAMES)


def test_float64_inputs_are_computed_in_float64():
    gen = torch.Generator().manual_seed(5)
    ref = torch.randn(16, 200, generator=gen, dtype=torch.float64) * 8
    cand = ref + torch.randn(16, 200, generator=gen, dtype=torch.float64) * 1e-3
    got = D.token_metrics(ref, cand, torch.zeros(16, dtype=torch.long))
    lp, lq = special.log_softmax(ref.numpy(), -1), special.log_softmax(cand.numpy(), -1)
    want = np.array([_kl64(lp[i], lq[i]) for i in range(16)])
    # The values are tiny (1e-11 .. 1e-6): float64 keeps them, float32 would lose them.
    np.testing.assert_allclose(got["kl"].numpy(), want, rtol=1e-5, atol=1e-14)
    # float32 inputs are computed in float64 too: the result is the float64 KL of the
    # float32-rounded logits (plain float32 arithmetic is off by up to 100% here).
    ref32, cand32 = ref.float(), cand.float()
    f32 = D.token_metrics(ref32, cand32, torch.zeros(16, dtype=torch.long))
    lp, lq = (
        special.log_softmax(ref32.double().numpy(), -1),
        special.log_softmax(cand32.double().numpy(), -1),
    )
    want32 = np.array([_kl64(lp[i], lq[i]) for i in range(16)])
    np.testing.assert_allclose(f32["kl"].numpy(), want32, rtol=1e-5, atol=1e-14)


# --- broken models end to end -------------------------------------------------------------

ARGS = ["--context-length", "64", "--stride", "32", "--batch-size", "2"]


def _windows(model_dir: Path, data: Path) -> list:
    tok = AutoTokenizer.from_pretrained(model_dir)
    corpus = load_corpus(DataSpec(source=str(data)))
    return make_windows(corpus, tok, WindowSpec(context_length=64, stride=32), True)


@torch.inference_mode()
def _forward_rows(model, windows) -> dict[tuple[int, int], torch.Tensor]:
    """Each scored row's logits from the model's own full forward, one window at a time."""
    out = {}
    for w in windows:
        logits = model(torch.tensor([w.input_ids])).logits[0]
        for j in range(w.first_target, len(w.input_ids)):
            out[(w.window_id, j)] = logits[j - 1]
    return out


def _check_report(
    out: Path, expected: dict[tuple[int, int], bool], ambiguous: frozenset = frozenset()
) -> None:
    """Flags match ``expected`` (``ambiguous`` rows aside); flagged rows are reported, not used."""
    table = pq.read_table(out / "tokens.parquet")
    flags = {
        (w, j): f
        for w, j, f in zip(
            table["window_id"].to_pylist(),
            table["window_pos"].to_pylist(),
            table["nonfinite"].to_pylist(),
            strict=True,
        )
    }
    assert flags.keys() == expected.keys()
    assert {k: f for k, f in flags.items() if k not in ambiguous} == {
        k: f for k, f in expected.items() if k not in ambiguous
    }
    n_bad = sum(flags.values())
    assert 0 < n_bad < len(flags)
    results = json.loads(
        (out / "results.json").read_text(),
        parse_constant=lambda c: pytest.fail(f"non-strict JSON: {c}"),
    )
    metrics = results["candidates"][0]["metrics"]
    assert metrics["counts"]["nonfinite"] == n_bad
    assert metrics["counts"]["tokens"] == len(flags) - n_bad
    assert metrics["counts"]["nonfinite_share"] == pytest.approx(n_bad / len(flags))
    kl = table["kl"].to_numpy(zero_copy_only=False).astype(np.float64)
    bad = np.array(table["nonfinite"].to_pylist())
    assert np.isnan(kl[bad]).all() and np.isfinite(kl[~bad]).all()
    assert metrics["kl"]["mean"] == pytest.approx(kl[~bad].mean(), rel=1e-6)


def test_nan_weights_are_counted_excluded_and_reported(tiny_pair, small_jsonl, tmp_path):
    windows = _windows(tiny_pair["candidate"], small_jsonl)
    # Poison a token that occurs in some windows only.
    counts: dict[int, int] = {}
    for w in windows:
        for t in set(w.input_ids):
            counts[t] = counts.get(t, 0) + 1
    token = min((t for t in counts if t > 2), key=lambda t: (counts[t], t))
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["candidate"], dtype=torch.float32)
    with torch.no_grad():
        model.get_input_embeddings().weight[token] = math.nan
    poisoned = tmp_path / "poisoned"
    model.save_pretrained(poisoned)
    AutoTokenizer.from_pretrained(tiny_pair["candidate"]).save_pretrained(poisoned)
    expected = {
        key: not bool(torch.isfinite(row).all())
        for key, row in _forward_rows(model.eval(), windows).items()
    }

    out = tmp_path / "run"
    code, output = invoke(
        [
            "compare",
            str(tiny_pair["reference"]),
            str(poisoned),
            "--data",
            str(small_jsonl),
            "--out",
            str(out),
            *ARGS,
        ]
    )
    assert code == 0, output
    assert "NaN or infinite logits" in output and "excluded" in output
    _check_report(out, expected)


def test_float16_overflow_is_detected_not_averaged(tiny_pair, small_jsonl, tmp_path):
    windows = _windows(tiny_pair["candidate"], small_jsonl)
    half = AutoModelForCausalLM.from_pretrained(tiny_pair["candidate"], dtype=torch.float16)
    rows = _forward_rows(half.eval(), windows)
    peaks = {k: float(r.float().abs().max()) for k, r in rows.items()}
    # Scaling the output layer by 2^15 is exact in floating point, so in float16 a row's logits
    # overflow (|logit| > 65504) exactly where its unscaled float16 peak is >= 2. Rows within a
    # few float16 steps of 2 could flip with the batch shape and are not compared.
    scale = 2**15
    expected = {k: v * scale > 65504 for k, v in peaks.items()}
    ambiguous = frozenset(k for k, v in peaks.items() if abs(v - 2.0) < 0.01)
    assert len(ambiguous) < 0.05 * len(peaks)
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["candidate"], dtype=torch.float32)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    scaled = tmp_path / "scaled"
    model.save_pretrained(scaled)
    AutoTokenizer.from_pretrained(tiny_pair["candidate"]).save_pretrained(scaled)

    common = [str(tiny_pair["reference"]), str(scaled), "--data", str(small_jsonl), *ARGS]
    code, output = invoke(["compare", *common, "--out", str(tmp_path / "fp32"), "--quiet"])
    assert code == 0, output
    fp32 = json.loads((tmp_path / "fp32" / "results.json").read_text())
    assert fp32["candidates"][0]["metrics"]["counts"]["nonfinite"] == 0  # fine in float32

    out = tmp_path / "fp16"
    code, output = invoke(["compare", *common, "--out", str(out), "--candidate-dtype", "float16"])
    assert code == 0, output
    assert "NaN or infinite logits" in output
    _check_report(out, expected, ambiguous)


def test_float16_negative_overflow_is_not_taken_for_a_mask():
    # Only -inf entries: in float16 that is overflow (flagged); in float32 a deliberate mask.
    logits = torch.tensor([[1.0, -7e4, 2.0], [1.0, -3.0, 2.0]])
    ref = torch.tensor([[1.0, 0.5, 2.0], [1.0, 0.5, 2.0]])
    from lmkl.scoring.token_scoring import overflow_as_nan as overflow_as_nan

    half = overflow_as_nan(logits.half())
    assert torch.isnan(half[0]).all() and torch.isfinite(half[1]).all()
    got = D.token_metrics(ref, half.float(), torch.zeros(2, dtype=torch.long))
    assert got["nonfinite"].tolist() == [True, False]
    masked = overflow_as_nan(torch.tensor([[1.0, -math.inf, 2.0]]))
    assert torch.isneginf(masked[0, 1])  # float32: kept as a mask (KL = +inf where p > 0)
