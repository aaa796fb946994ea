"""The native C kernel: float64 SciPy values, token_metrics' semantics, its build and fallbacks."""

from __future__ import annotations

import math
import os
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy import special
from test_fused import assert_same, float64_metrics, logits_with_special_rows

from lmkl.scoring import native
from lmkl.scoring.divergence import TOKEN_METRIC_NAMES, token_metrics
from lmkl.scoring.fused import MetricsKernel

# Built inside the isolated cache of conftest's fixtures, never at collection in the user's;
# under LMKL_REQUIRE_NATIVE=1 (CI) a kernel that does not build or check fails, not skips.
pytestmark = pytest.mark.usefixtures("native_kernel")


def cpu_kernel(**kwargs) -> MetricsKernel:
    kernel = MetricsKernel(device="cpu", **kwargs)
    assert kernel.backend == "native"
    return kernel


# Vocabularies around the kernel's 1024-entry blocks, and a realistic one.
@pytest.mark.parametrize("vocab", [1, 7, 1023, 1024, 1025, 5000, 50_257])
def test_native_matches_float64_scipy(vocab):
    gen = torch.Generator().manual_seed(vocab)
    rows = 12
    ref = torch.randn(rows, vocab, generator=gen) * 4
    cand = ref + torch.randn(rows, vocab, generator=gen)
    if vocab > 3000:
        ref[3, vocab - 2] = 30.0  # peaked reference, its maximum in the last block
        cand[4, 2100] = 25.0  # peaked candidate, the maximum in a middle block
    targets = torch.randint(0, vocab, (rows,), generator=gen)
    got = cpu_kernel()(ref, cand, targets)
    assert not got["nonfinite"].any()
    for i in range(rows):
        want = float64_metrics(ref[i].double().numpy(), cand[i].double().numpy(), int(targets[i]))
        for name, value in want.items():
            assert abs(float(got[name][i]) - value) <= 1e-5 * max(1.0, abs(value)), (name, i)
    lse = torch.logsumexp(ref.double(), -1)
    assert torch.allclose(got["lse_reference"].double(), lse, atol=1e-5)


@pytest.mark.parametrize("vocab", [1000, 50_257])
@pytest.mark.parametrize("noise, rtol", [(1e-3, 1e-3), (1e-4, 1e-2)])
def test_near_identical_models_keep_their_digits(vocab, noise, rtol):
    # A good 8-bit quantization: KL around 1e-7..1e-9, below float32 torch's rounding (it is
    # off by 50% to 100x here). The candidate's logits are also shifted by a constant, which
    # changes nothing but its log-normaliser.
    gen = torch.Generator().manual_seed(int(noise * 1e6) + vocab)
    ref = torch.randn(6, vocab, generator=gen) * 3
    cand = ref + noise * torch.randn(6, vocab, generator=gen) + 2.5
    targets = torch.randint(0, vocab, (6,), generator=gen)
    got = cpu_kernel()(ref, cand, targets)
    for i in range(6):
        lp = special.log_softmax(ref[i].double().numpy())
        lq = special.log_softmax(cand[i].double().numpy())
        p, q = np.exp(lp), np.exp(lq)
        m = 0.5 * (p + q)
        want = {
            "kl": special.rel_entr(p, q).sum(),
            "reverse_kl": special.rel_entr(q, p).sum(),
            "jsd": 0.5 * (special.rel_entr(p, m).sum() + special.rel_entr(q, m).sum()),
        }
        assert want["kl"] < 1e-5
        for name, value in want.items():
            assert abs(float(got[name][i]) - value) <= rtol * value, (name, i, value)


def test_native_keeps_token_metrics_semantics_for_special_rows():
    # -inf masks, +inf KL, NaN and all-masked rows go to the exact path: same values and flags.
    for vocab in (512, 3000):
        ref, cand, targets = logits_with_special_rows(40, vocab, seed=vocab)
        got = cpu_kernel()(ref, cand, targets)
        assert_same(got, token_metrics(ref, cand, targets))
        assert got["nonfinite"][[3, 4, 5]].all() and not got["nonfinite"][[0, 1, 2, 6]].any()
        assert math.isinf(float(got["kl"][2]))


def test_temperature_padded_heads_strides_and_half_precision():
    gen = torch.Generator().manual_seed(5)
    wide_ref = torch.randn(20, 2100, generator=gen) * 2
    wide_cand = torch.randn(20, 2200, generator=gen) * 2  # padded head: 2000 columns compared
    targets = torch.randint(0, 2000, (20,), generator=gen)
    want = token_metrics(wide_ref[:, :2000], wide_cand[:, :2000], targets, temperature=0.7)
    kernel = cpu_kernel()
    assert_same(kernel(wide_ref, wide_cand, targets, temperature=0.7, vocab_size=2000), want)
    # Rows taken with a stride (every other row) and a column-major copy.
    strided = wide_ref[::2], wide_cand[::2]
    want = token_metrics(strided[0][:, :2000], strided[1][:, :2000], targets[::2])
    assert_same(kernel(*strided, targets[::2], vocab_size=2000), want)
    column_major = wide_ref[:, :2000].t().contiguous().t()
    want = token_metrics(wide_ref[:, :2000], wide_cand[:, :2000], targets)
    assert_same(kernel(column_major, wide_cand, targets, vocab_size=2000), want)
    half = wide_ref.bfloat16(), wide_cand.bfloat16()
    want = token_metrics(half[0][:, :2000], half[1][:, :2000], targets)
    assert_same(kernel(*half, targets, vocab_size=2000), want)


def test_identical_rows_give_exactly_zero_and_ties_take_the_first_maximum():
    gen = torch.Generator().manual_seed(2)
    ref = torch.randn(9, 3000, generator=gen) * 3
    got = cpu_kernel()(ref, ref.clone(), torch.zeros(9, dtype=torch.long))
    for name in ("kl", "reverse_kl", "jsd"):  # log-probability differences are exactly 0
        assert float(got[name].abs().max()) == 0.0, name
    # Ties: the reference's maximum twice (first at 100); the candidate's single maximum at the
    # second copy: the top tokens differ, as argmax (the first maximum) says.
    ref[0, 100] = ref[0, 2500] = 20.0
    cand = ref.clone()
    cand[0, 100] = 19.0
    got = cpu_kernel()(ref, cand, torch.zeros(9, dtype=torch.long))
    want = token_metrics(ref, cand, torch.zeros(9, dtype=torch.long))
    assert float(got["top1_agree"][0]) == float(want["top1_agree"][0]) == 0.0
    assert_same(got, want)


def test_threads_split_rows_without_changing_values():
    gen = torch.Generator().manual_seed(8)
    ref = torch.randn(53, 4096, generator=gen) * 3  # several tasks of ROWS_PER_TASK rows
    cand = ref + torch.randn(53, 4096, generator=gen)
    targets = torch.randint(0, 4096, (53,), generator=gen)
    many = cpu_kernel()(ref, cand, targets)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        one = cpu_kernel()(ref, cand, targets)
    finally:
        torch.set_num_threads(threads)
    for name in (*TOKEN_METRIC_NAMES, "lse_reference", "lse_candidate"):
        assert torch.equal(many[name], one[name]), name
    # Each row's values do not depend on the chunk it came in.
    alone = cpu_kernel()(ref[17:18], cand[17:18], targets[17:18])
    for name in TOKEN_METRIC_NAMES:
        assert torch.equal(alone[name], many[name][17:18]), name


def test_targets_outside_the_rows_are_left_to_the_torch_path():
    ref, cand = torch.randn(4, 600), torch.randn(4, 600)
    with pytest.raises((RuntimeError, IndexError)):
        cpu_kernel()(ref, cand, torch.tensor([0, 1, 2, 600]))


# --- the build --------------------------------------------------------------------------------


@pytest.fixture
def fresh_build(tmp_path, monkeypatch):
    """An empty kernel cache and no kernel loaded in this process yet."""
    monkeypatch.setenv("LMKL_CACHE_DIR", str(tmp_path / "cache"))
    native._built_and_checked.cache_clear()
    yield tmp_path / "cache" / "kernels"
    native._built_and_checked.cache_clear()


def test_built_once_per_machine_and_named_for_the_cpu(fresh_build, monkeypatch):
    assert native.load_native_kernel() is not None
    (built,) = fresh_build.glob("token_metrics-*.so")
    stamp = built.stat().st_mtime_ns
    native._built_and_checked.cache_clear()
    assert native.load_native_kernel() is not None
    assert built.stat().st_mtime_ns == stamp  # loaded, not rebuilt
    assert not list(fresh_build.glob(".build-*"))  # no build leftovers
    # Another CPU (a shared home directory on a cluster) gets a build of its own.
    monkeypatch.setattr(native, "_cpu_features", lambda: "sse2 only")
    native._built_and_checked.cache_clear()
    assert native.load_native_kernel() is not None
    assert len(list(fresh_build.glob("token_metrics-*.so"))) == 2


def test_unavailable_kernel_means_the_torch_path(fresh_build, monkeypatch, tmp_path):
    monkeypatch.setenv("LMKL_NATIVE_KERNEL", "0")
    assert native.load_native_kernel() is None
    assert "LMKL_NATIVE_KERNEL" in native.native_unavailable_reason()
    assert MetricsKernel(device="cpu", compile=False).backend == "eager"
    monkeypatch.delenv("LMKL_NATIVE_KERNEL")
    # A compiler that fails: no kernel, a reason, and nothing left in the cache.
    failing = tmp_path / "bin" / "cc"
    failing.parent.mkdir()
    failing.write_text("#!/bin/sh\necho 'cc: error: unrecognized option' >&2\nexit 1\n")
    failing.chmod(0o755)
    monkeypatch.setenv("CC", str(failing))
    assert native.load_native_kernel() is None
    assert "failed" in native.native_unavailable_reason()
    assert not list(fresh_build.glob("*.so"))
    logged: list[str] = []
    kernel = MetricsKernel(device="cpu", compile=False, log=logged.append)
    assert kernel.backend == "eager" and "native KL kernel unavailable" in logged[0]
    # No compiler at all.
    monkeypatch.setenv("CC", "")
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    native._built_and_checked.cache_clear()
    assert native.load_native_kernel() is None
    assert "no C compiler" in native.native_unavailable_reason()


def test_a_wrong_kernel_is_refused_by_the_self_check(fresh_build, monkeypatch):
    # A build whose KL is off (the source edited: kl doubled) must not be used.
    source = native._source().replace(b"out[0] = kl < 0 ? 0 : kl;", b"out[0] = 2 * kl;")
    assert source != native._source()
    monkeypatch.setattr(native, "_source", lambda: source)
    assert native.load_native_kernel() is None
    assert "self-check failed: kl" in native.native_unavailable_reason()
    assert not list(fresh_build.glob("*.so"))  # a build that fails is never published


def test_a_build_with_another_output_order_is_refused(fresh_build, monkeypatch):
    # The C file reports its outputs; a build whose order differs from OUTPUT_NAMES (an edited
    # or stale source) would put each metric in another's column.
    source = native._source().replace(b'"kl,reverse_kl,', b'"reverse_kl,kl,')
    assert source != native._source()
    monkeypatch.setattr(native, "_source", lambda: source)
    assert native.load_native_kernel() is None
    assert "outputs" in native.native_unavailable_reason()


def test_a_broken_cached_build_is_rebuilt_once(fresh_build, monkeypatch):
    assert native.load_native_kernel() is not None
    (built,) = fresh_build.glob("token_metrics-*.so")
    good = built.read_bytes()

    def corrupt(data: bytes) -> None:
        # A new file renamed over it: this process has the old one mapped (writing into a
        # mapped library in place is what kills a process with SIGBUS).
        (fresh_build / "corrupt").write_bytes(data)
        os.replace(fresh_build / "corrupt", built)

    corrupt(good[: len(good) // 3])  # a truncated copy (a crash, a full disk)
    native._built_and_checked.cache_clear()
    assert native.load_native_kernel() is not None
    assert built.read_bytes() == good  # rebuilt and replaced, not kept as a fallback
    # A cached build that loads but fails the check (an older source under the same name).
    wrong = native._source().replace(b"out[0] = kl < 0 ? 0 : kl;", b"out[0] = 2 * kl;")
    compiled = native._compile(native._compiler(), wrong, fresh_build, "wrong.so")
    os.replace(compiled, built)
    native._built_and_checked.cache_clear()
    assert native.load_native_kernel() is not None
    assert built.read_bytes() == good
    # A rebuild that fails too: unavailable, with the reason (no loop, no exception).
    corrupt(b"not a library")
    monkeypatch.setattr(native, "_source", lambda: wrong)
    monkeypatch.setattr(native, "_build_key", lambda compiler, source: built.stem.split("-")[1])
    native._built_and_checked.cache_clear()
    assert native.load_native_kernel() is None
    assert "self-check failed" in native.native_unavailable_reason()


def test_a_published_build_is_never_replaced(tmp_path):
    # Another process (on another host of an NFS home) published first and may have the file
    # mapped: a new build is linked into place only where none exists.
    target, first, second = tmp_path / "k.so", tmp_path / "a", tmp_path / "b"
    first.write_bytes(b"first")
    second.write_bytes(b"second")
    native._publish(first, target, replace=False)
    inode = target.stat().st_ino
    native._publish(second, target, replace=False)
    assert target.read_bytes() == b"first" and target.stat().st_ino == inode
    native._publish(second, target, replace=True)  # only a build that failed here is replaced
    assert target.read_bytes() == b"second"


def test_macos_builds_are_keyed_by_the_cpus_real_features(monkeypatch):
    import subprocess

    outputs = {
        "intel": "machdep.cpu.brand_string: Intel(R) Core(TM) i9\n"
        "machdep.cpu.features: FPU SSE SSE2 AVX1.0\nmachdep.cpu.leaf7_features: AVX2 AVX512F\n"
        "kern.hostname: a\n",
        "m1": "machdep.cpu.brand_string: Apple M1\nhw.optional.arm.FEAT_BF16: 0\nkern.x: 1\n",
        "m3": "machdep.cpu.brand_string: Apple M3\nhw.optional.arm.FEAT_BF16: 1\nkern.x: 1\n",
    }
    features = {}
    for name, text in outputs.items():

        def fake_run(*args, text_out=text, **kwargs):
            return subprocess.CompletedProcess(args, 0, stdout=text_out, stderr="")

        monkeypatch.setattr(native.subprocess, "run", fake_run)
        features[name] = native._darwin_cpu_features()
    assert "AVX512F" in features["intel"] and "kern.hostname" not in features["intel"]
    assert features["m1"] != features["m3"]  # platform.processor() says "arm" for both


def test_a_gpu_run_does_not_take_the_cpu_kernel():
    kernel = MetricsKernel(device="meta", compile=False)
    assert kernel.native is None and kernel.backend == "eager"


def test_compare_records_the_native_backend_and_matches_eager(tiny_pair, small_jsonl, tmp_path):
    import pyarrow.parquet as pq

    from lmkl.api import compare

    def run(name: str, native_on: bool):
        os.environ["LMKL_NATIVE_KERNEL"] = "1" if native_on else "0"
        try:
            return compare(
                str(tiny_pair["reference"]),
                str(tiny_pair["candidate"]),
                data=str(small_jsonl),
                out=str(tmp_path / name),
                max_tokens=300,
            )
        finally:
            os.environ.pop("LMKL_NATIVE_KERNEL", None)

    fast, eager = run("native", True), run("eager", False)
    assert fast.results["compute"]["kernel"] == "native"
    assert eager.results["compute"]["kernel"] == "eager"
    assert fast.results["compute"]["part_kernels"] == {"native": 1}
    a = pq.read_table(Path(fast.path) / "tokens.parquet")
    b = pq.read_table(Path(eager.path) / "tokens.parquet")
    for name in ("kl", "reverse_kl", "jsd", "entropy_reference", "nll_candidate"):
        x, y = a[name].to_numpy(), b[name].to_numpy()
        assert np.abs(x - y).max() <= 1e-5 * max(1.0, np.abs(y).max()), name


def test_results_count_the_kernel_of_every_part(tmp_path):
    # A run resumed elsewhere (a GPU, a machine without a compiler) mixes kernels: each part's
    # kernel is kept in its file, and results.json counts them.
    import pyarrow as pa
    import pyarrow.parquet as pq

    from lmkl.engine.loop import KERNEL_KEY, _record_part_kernels
    from lmkl.engine.rundir import RunDirectory

    run_dir = RunDirectory(tmp_path)
    run_dir.parts_dir.mkdir(parents=True)
    for index, kernel in enumerate([b"native", b"eager", b"native"]):
        table = pa.table({"kl": [0.5]}).replace_schema_metadata({KERNEL_KEY: kernel})
        pq.write_table(table, run_dir.part_path(index))
    run_dir.rescan()
    results = {"compute": {"kernel": "eager"}}
    _record_part_kernels(results, run_dir)
    assert results["compute"] == {"kernel": "mixed", "part_kernels": {"eager": 1, "native": 2}}


@pytest.mark.skipif(shutil.which("cc") is None, reason="needs cc")
def test_the_source_ships_with_the_package():
    assert (Path(native.__file__).parent / "token_metrics.c").is_file()
    assert b"lmkl_token_metrics" in native._source()


# --- the kernel's polynomials -----------------------------------------------------------------


def _coefficients(function: str) -> list[float]:
    """The Horner coefficients of a C function in token_metrics.c, highest degree first."""
    import re

    source = native._source().decode()
    body = source[source.index(f"static inline float {function}(") :]
    body = body[: body.index("\n}\n")]
    return [float(v) for v in re.findall(r"(?:y = |fmaf\(y, [-\w]+, )(-?[\d.]+(?:e-?\d+)?)f", body)]


def test_jsd_series_coefficients_are_the_taylor_series():
    sympy = pytest.importorskip("sympy")
    d = sympy.symbols("d")
    t = sympy.tanh(d / 2)
    per_p = (1 + sympy.exp(-d)) * ((1 + t) * sympy.log(1 + t) + (1 - t) * sympy.log(1 - t)) / 4
    series = sympy.Poly(sympy.series(per_p, d, 0, 11).removeO(), d).all_coeffs()  # d^10 .. d^0
    want = [float(c) for c in series[:-2]]  # d^10 .. d^2 (the last two are 0)
    assert _coefficients("jsd_series") == pytest.approx(want, rel=1e-7)


def test_log_polynomial_is_within_float32_rounding():
    coefficients = _coefficients("log_approx")
    assert len(coefficients) == 8
    x = np.linspace(np.sqrt(0.5) - 1, np.sqrt(2) - 1, 100_001)
    approx = x - x**2 / 2 + x**3 * np.polyval(coefficients, x)
    assert np.abs(approx - np.log1p(x)).max() < 1e-8


def test_exp_and_phi_coefficients_are_reciprocal_factorials():
    exp = _coefficients("exp_approx")  # r^7 .. r^1 terms (y = ..., then one FMA per degree)
    assert exp[:-1] == pytest.approx([1 / math.factorial(k) for k in range(7, 0, -1)], rel=1e-7)
    # phi(w) = w + expm1(-w): even terms 1/10! .. 1/2!, odd 1/11! .. 1/3! (as in fused.py).
    even, odd = _literals("phi_even"), _literals("phi_odd")
    assert even == pytest.approx([1 / math.factorial(k) for k in range(10, 0, -2)], rel=1e-7)
    assert odd == pytest.approx([1 / math.factorial(k) for k in range(11, 2, -2)], rel=1e-7)


def _literals(function: str) -> list[float]:
    """Every float literal of a C function in token_metrics.c, in order."""
    import re

    source = native._source().decode()
    body = source[source.index(f"static inline float {function}(") :]
    body = body[: body.index("\n}\n")]
    return [float(v) for v in re.findall(r"(-?\d+\.\d+(?:e-?\d+)?)f\b", body)]
