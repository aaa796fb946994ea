"""The fused per-token metrics equal token_metrics (and float64 SciPy), special rows included."""

from __future__ import annotations

import math
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import special
from torch.multiprocessing.reductions import StorageWeakRef
from torch.utils._python_dispatch import TorchDispatchMode

from lmkl.scoring.divergence import TOKEN_METRIC_NAMES, token_metrics
from lmkl.scoring.fused import MetricsKernel, temporaries_per_token, token_metrics_fused


def logits_with_special_rows(n: int, vocab: int, seed: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    ref = torch.randn(n, vocab, generator=gen) * 3
    cand = ref + torch.randn(n, vocab, generator=gen)
    targets = torch.randint(0, vocab, (n,), generator=gen)
    ref[1, 7] = -math.inf  # reference masks a token: its terms are 0
    cand[2, 9] = -math.inf  # candidate masks a token the reference allows: KL = +inf
    ref[3, :] = -math.inf  # not a distribution
    cand[4, 2] = math.nan  # broken logits
    ref[5, 1] = math.inf  # broken logits
    ref[6, 20:] = -200.0  # far tails that underflow in both (0 * log 0 territory)
    cand[6, 20:] = -260.0
    return ref, cand, targets


def float64_metrics(ref: np.ndarray, cand: np.ndarray, x: int) -> dict[str, float]:
    lp, lq = special.log_softmax(ref, -1), special.log_softmax(cand, -1)
    p, q = np.exp(lp), np.exp(lq)
    m = 0.5 * (p + q)
    return {
        "kl": special.rel_entr(p, q).sum(),
        "reverse_kl": special.rel_entr(q, p).sum(),
        "jsd": 0.5 * (special.rel_entr(p, m).sum() + special.rel_entr(q, m).sum()),
        "entropy_reference": special.entr(p).sum(),
        "entropy_candidate": special.entr(q).sum(),
        "nll_reference": -lp[x],
        "nll_candidate": -lq[x],
        "delta_p": q[x] - p[x],
        "top1_agree": float(p.argmax() == q.argmax()),
        "top1_in_top5": float(p.argmax() in np.argsort(-q)[:5]),
        "reference_top1_prob": p.max(),
    }


def assert_same(
    got: dict[str, torch.Tensor], want: dict[str, torch.Tensor], tol: float = 1e-5
) -> None:
    assert torch.equal(got["nonfinite"], want["nonfinite"])
    for name in TOKEN_METRIC_NAMES:
        a, b = got[name], want[name]
        assert torch.equal(torch.isnan(a), torch.isnan(b)), name
        assert torch.equal(torch.isposinf(a), torch.isposinf(b)), name
        finite = torch.isfinite(b)
        # Relative for large values (an NLL of 200 nats is only known to float32 precision).
        err = ((a[finite] - b[finite]).abs() / b[finite].abs().clamp(min=1.0)).max()
        assert float(err) <= tol, (name, float(err))


@pytest.mark.parametrize("vocab", [512, 4096])
def test_fused_equals_token_metrics_with_special_rows(vocab):
    ref, cand, targets = logits_with_special_rows(40, vocab, seed=vocab)
    want = token_metrics(ref, cand, targets)
    got = token_metrics_fused(ref, cand, targets)
    assert_same(got, want)
    assert got["nonfinite"][[3, 4, 5]].all() and not got["nonfinite"][[0, 1, 2, 6]].any()
    assert math.isinf(float(got["kl"][2])) and math.isfinite(float(got["reverse_kl"][2]))
    assert not torch.isnan(got["kl"][~got["nonfinite"]]).any()
    # The log-normalisers come along (the worst-position report uses them).
    for key, logits in (("lse_reference", ref), ("lse_candidate", cand)):
        assert torch.allclose(got[key], torch.logsumexp(logits, -1), atol=1e-5, equal_nan=True)


def test_fused_matches_float64_scipy():
    ref, cand, targets = logits_with_special_rows(24, 1000, seed=1)
    got = token_metrics_fused(ref, cand, targets)
    for i in (0, 7, 8, 15, 23):  # ordinary rows, computed by the fast path
        want = float64_metrics(ref[i].double().numpy(), cand[i].double().numpy(), int(targets[i]))
        for name, value in want.items():
            assert abs(float(got[name][i]) - value) <= 1e-5, (name, i)


def test_temperature_padded_width_and_half_precision():
    gen = torch.Generator().manual_seed(5)
    ref = torch.randn(16, 600, generator=gen) * 2
    cand = torch.randn(16, 640, generator=gen) * 2  # padded head: only 600 columns compared
    targets = torch.randint(0, 600, (16,), generator=gen)
    want = token_metrics(ref[:, :600], cand[:, :600], targets, temperature=0.7)
    got = token_metrics_fused(ref, cand, targets, temperature=0.7, vocab_size=600)
    assert_same(got, want)
    half_ref, half_cand = ref.bfloat16(), cand.bfloat16()
    want = token_metrics(half_ref[:, :600], half_cand[:, :600], targets)
    got = token_metrics_fused(half_ref, half_cand, targets, vocab_size=600)
    assert_same(got, want)


def test_identical_inputs_give_zero_divergence():
    ref = torch.randn(8, 300) * 4
    got = token_metrics_fused(ref, ref.clone(), torch.zeros(8, dtype=torch.long))
    for name in ("kl", "reverse_kl", "jsd"):
        assert float(got[name].abs().max()) <= 1e-6
    assert got["top1_agree"].eq(1).all() and got["top1_in_top5"].eq(1).all()


def test_eager_kernel_splits_rows_without_changing_values():
    ref, cand, targets = logits_with_special_rows(37, 512, seed=3)
    kernel = MetricsKernel(compile=False, native=False)
    kernel.eager_rows = 5
    assert_same(kernel(ref, cand, targets), token_metrics(ref, cand, targets), tol=1e-6)
    # Below the size threshold the kernel does not compile at all.
    small = MetricsKernel(compile=True, expected_elements=1000, native=False)
    assert small.backend == "eager" and not small.use_compile


@pytest.mark.parametrize("rows, vocab", [(9, 131072), (7, 524288), (5, 2**20)])
def test_cache_sized_eager_blocks_give_whole_chunk_values_bit_for_bit(rows, vocab):
    # On a CPU the eager kernel works in blocks of about EAGER_CPU_BLOCK_BYTES per temporary,
    # with no one-row block left over; each finite row's values equal one whole-chunk call's.
    from lmkl.scoring.fused import EAGER_CPU_BLOCK_BYTES

    gen = torch.Generator().manual_seed(5)
    ref = torch.randn(rows, vocab, generator=gen) * 3
    cand = ref + torch.randn(rows, vocab, generator=gen)
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    assert max(2, EAGER_CPU_BLOCK_BYTES // (4 * vocab)) < rows  # the kernel does split them
    got = MetricsKernel(compile=False, native=False)(ref, cand, targets)
    whole = token_metrics_fused(ref, cand, targets)
    for name, value in whole.items():
        assert torch.equal(got[name], value), name
    # Special rows take the exact fallback within their block: equal to float32 rounding.
    ref, cand, targets = logits_with_special_rows(9, 131072, seed=6)
    eager = MetricsKernel(compile=False, native=False)
    assert_same(eager(ref, cand, targets), token_metrics(ref, cand, targets))


@pytest.mark.skipif(
    shutil.which("g++") is None and shutil.which("cc") is None,
    reason="torch.compile on CPU needs a C++ compiler",
)
def test_compiled_kernel_equals_token_metrics():
    kernel = MetricsKernel(compile=True, native=False)
    for n, seed in ((23, 11), (9, 12), (1, 13)):  # one graph serves every row count
        ref, cand, targets = logits_with_special_rows(max(n, 7), 512, seed=seed)
        ref, cand, targets = ref[:n], cand[:n], targets[:n]
        got = kernel(ref, cand, targets, temperature=1.3)
        assert_same(got, token_metrics(ref, cand, targets, temperature=1.3))
        assert torch.allclose(
            got["lse_candidate"], torch.logsumexp(cand / 1.3, -1), atol=1e-5, equal_nan=True
        )
    assert kernel.backend == "compiled"
    # Inductor's cache now holds this kernel: a later run of this vocabulary expects the warm
    # compilation cost.
    from lmkl.scoring.fused import (
        COMPILE_SAVING_PER_ELEMENT_S,
        COMPILE_SECONDS_WARM,
        compile_threshold,
    )

    expected = COMPILE_SECONDS_WARM / COMPILE_SAVING_PER_ELEMENT_S
    assert compile_threshold(512) == pytest.approx(expected)


def test_compiling_only_where_the_saving_exceeds_the_expected_cost(monkeypatch):
    from lmkl.files import remember
    from lmkl.scoring import fused

    monkeypatch.delenv("LMKL_COMPILE_MIN_ELEMENTS", raising=False)
    vocab = 77_777  # a vocabulary no other test compiles
    warm = fused.COMPILE_SECONDS_WARM / fused.COMPILE_SAVING_PER_ELEMENT_S
    cold = fused.COMPILE_SECONDS_COLD / fused.COMPILE_SAVING_PER_ELEMENT_S
    assert fused.compile_threshold(vocab) == pytest.approx(cold)
    between = int((warm + cold) / 2)
    assert not MetricsKernel(expected_elements=between, vocab_size=vocab).use_compile
    assert MetricsKernel(expected_elements=int(cold) + 1, vocab_size=vocab).use_compile
    # Once this vocabulary's kernel is in Inductor's cache (as a compiled run records), the
    # warm cost applies, if that cache is still there.
    monkeypatch.setattr(fused, "_inductor_cache_dir", lambda: str(Path.cwd()))
    remember("compiled-kernels", {fused._compiled_key(vocab, 5): True})
    assert fused.compile_threshold(vocab) == pytest.approx(warm)
    assert MetricsKernel(expected_elements=between, vocab_size=vocab).use_compile
    assert not MetricsKernel(expected_elements=between, vocab_size=vocab + 1).use_compile
    monkeypatch.setattr(fused, "_inductor_cache_dir", lambda: "/nonexistent/inductor")
    assert fused.compile_threshold(vocab) == pytest.approx(cold)  # the key names the old dir
    monkeypatch.setenv("LMKL_COMPILE_MIN_ELEMENTS", "10")
    assert MetricsKernel(expected_elements=10, vocab_size=vocab).use_compile


class _LiveStorages(TorchDispatchMode):
    """The peak bytes of storages that ops create and that are still alive (inputs aside)."""

    def __init__(self, inputs: list[torch.Tensor]) -> None:
        super().__init__()
        self.skip = {t.untyped_storage().data_ptr() for t in inputs}
        self.refs: dict[int, tuple[StorageWeakRef, int]] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for tensor in out if isinstance(out, tuple | list) else [out]:
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key = storage.data_ptr()
                if key not in self.skip and key not in self.refs:
                    self.refs[key] = (StorageWeakRef(storage), storage.nbytes())
        self.refs = {k: v for k, v in self.refs.items() if not v[0].expired()}
        self.peak = max(self.peak, sum(size for _, size in self.refs.values()))
        return out


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("temperature", [1.0, 0.5])
def test_eager_temporaries_fit_the_chunk_budget(dtype, temperature):
    # Chunks are sized by temporaries_per_token: the eager kernel's [N, V] temporaries at their
    # peak must fit in it, next to the two logit inputs.
    rows, vocab = 16, 4096
    gen = torch.Generator().manual_seed(0)
    ref = torch.randn(rows, vocab, generator=gen)
    cand = (ref + 1e-2 * torch.randn(rows, vocab, generator=gen)).to(dtype)
    ref, targets = ref.to(dtype), torch.randint(0, vocab, (rows,), generator=gen)
    with _LiveStorages([ref, cand, targets]) as live:
        token_metrics_fused(ref, cand, targets, temperature=temperature)
    inputs = 2 * ref.element_size() * rows * vocab
    assert (inputs + live.peak) / (4 * rows * vocab) <= temporaries_per_token("eager")
