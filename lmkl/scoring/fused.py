"""Every per-token quantity in a few sweeps over the vocabulary, optionally ``torch.compile``d.

:func:`~.divergence.token_metrics` is the readable float64 definition; this module computes the
same numbers in float32 to the accuracy contract of :mod:`~.accuracy`, faster and with fewer
``[N, V]`` temporaries, which is what bounds the cost of the KL stage next to the two forward
passes. :func:`_core` is the one torch implementation (see its docstring for how it stays exact
for near-identical models, where plain float32 is off by up to 100%):

* :func:`token_metrics_fused` runs it eagerly, with temporaries updated in place.
* :class:`MetricsKernel` picks the fastest path that works here: on a CPU the C kernel of
  :mod:`~.native` (two sweeps per row in cache, built once per machine, the same math);
  elsewhere (or without a C compiler) :func:`_core` through ``torch.compile`` when that pays (a
  large vocabulary times many tokens): Inductor fuses it into a few kernels that allocate no
  ``[N, V]`` temporary. The compiled graph has a static vocabulary width and a dynamic number
  of rows, so one compilation serves every chunk. If compilation is unavailable or fails, the
  eager version is used.

Every path keeps ``token_metrics``' semantics for rows that are not plain finite
distributions: the fast paths never decide anything about ``-inf``/NaN/``+inf`` logits
themselves. Such a row makes at least one fast-path result non-finite (``0 * -inf`` is NaN), and
every row with a non-finite result is recomputed with ``token_metrics``, which returns ``+inf``
KL where the candidate gives zero probability to a token the reference does not, and NaN plus
the ``nonfinite`` flag for broken rows.

One documented difference: ``top1_in_top5`` is computed as "fewer than 5 candidate logits are
strictly greater than the candidate's logit for the reference's top token" (one comparison sweep
instead of a top-k sort); it differs from a top-k membership test only under exact ties.
"""

from __future__ import annotations

import math
import os
import threading
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager

import torch

from lmkl.errors import LmklWarning
from lmkl.scoring.divergence import OUTPUT_NAMES, TOKEN_METRIC_NAMES, token_metrics
from lmkl.scoring.native import (
    N_OUTPUTS,
    ROWS_PER_TASK,
    NativeKernel,
    load_native_kernel,
    native_unavailable_reason,
)

__all__ = [
    "MetricsKernel",
    "compile_threshold",
    "temporaries_per_token",
    "token_metrics_fused",
]

LN2 = math.log(2.0)

#: Whether compiling pays is decided per run from measured costs (``scripts/bench.py``, 2 CPU
#: cores): the compiled kernel saves about this many seconds per ``token x vocabulary`` entry
#: over the eager one (about 4.5 vs 9 ns per entry), and compiling costs about
#: ``COMPILE_SECONDS_WARM`` once Inductor's on-disk cache holds the kernel for this vocabulary,
#: ``COMPILE_SECONDS_COLD`` before. So a run compiles when its entries times the saving exceed
#: the expected cost: about 7e8 entries when the cache is warm, 7e9 when it is cold.
#: ``LMKL_COMPILE_MIN_ELEMENTS`` sets a fixed threshold instead.
COMPILE_SAVING_PER_ELEMENT_S = 4.5e-9
COMPILE_SECONDS_WARM = 3.0
COMPILE_SECONDS_COLD = 30.0
#: The vocabularies lmkl compiled the kernel for (per torch version), across processes.
_COMPILED_MEMO = "compiled-kernels"


def _inductor_cache_dir() -> str:
    """Where Inductor keeps compiled kernels (its default, without importing Inductor)."""
    import getpass
    import tempfile

    default = os.path.join(tempfile.gettempdir(), f"torchinductor_{getpass.getuser()}")
    return os.environ.get("TORCHINDUCTOR_CACHE_DIR") or default


def _compiled_key(vocab: int, top_k: int) -> str:
    return f"torch {torch.__version__} vocab {vocab} top {top_k} at {_inductor_cache_dir()}"


def compile_threshold(vocab_size: int | None, top_k: int = 5) -> float:
    """The fewest ``token x vocabulary`` entries for which compiling the kernel pays."""
    from lmkl.files import read_memo

    if "LMKL_COMPILE_MIN_ELEMENTS" in os.environ:
        return float(os.environ["LMKL_COMPILE_MIN_ELEMENTS"])
    warm = (
        vocab_size is not None
        and _compiled_key(vocab_size, top_k) in read_memo(_COMPILED_MEMO)
        and os.path.isdir(_inductor_cache_dir())
    )
    cost = COMPILE_SECONDS_WARM if warm else COMPILE_SECONDS_COLD
    return cost / COMPILE_SAVING_PER_ELEMENT_S


#: Bytes of one float32 ``[rows, V]`` temporary per eager block on a CPU (about the size of a
#: core's L2 cache); see :meth:`MetricsKernel._eager`.
EAGER_CPU_BLOCK_BYTES = 2 * 2**20


def temporaries_per_token(backend: str) -> int:
    """Float32 vocabulary-wide rows alive per scored token in the KL stage (for chunk sizing).

    Two are the reference and candidate logits themselves; the eager path adds at most 9.25
    (``tests/test_fused.py`` counts them, for float32 and half-precision logits, with and
    without a temperature), the compiled kernel none (one more row of slack for dtype casts), the
    native kernel float32 copies of half-precision logits.
    """
    return {"compiled": 3, "native": 4}.get(backend, 12)


# phi(w) = w + expm1(-w) = w^2 (E(w^2) - w O(w^2)): E holds the Taylor coefficients 1/(2k)!, O
# the 1/(2k+1)!, each a polynomial in w^2; to w^11 the relative error is below 1e-11 for
# |w| < SERIES_LIMIT (tests/test_accuracy_contract.py derives them).
PHI_EVEN = (1 / 2, 1 / 24, 1 / 720, 1 / 40_320, 1 / 3_628_800)
PHI_ODD = (1 / 6, 1 / 120, 1 / 5_040, 1 / 362_880, 1 / 39_916_800)
#: |log-ratio| below which phi comes from its series and the JSD term from its log1p form.
SERIES_LIMIT = 0.5


def _horner(x: torch.Tensor, coefficients: tuple[float, ...]) -> torch.Tensor:
    """``sum_k c_k x^k`` as one new tensor, updated in place (no temporary per step)."""
    y = x * coefficients[-1]
    for c in reversed(coefficients[1:-1]):
        y.add_(c).mul_(x)
    return y.add_(coefficients[0])


def _psi(s: torch.Tensor) -> torch.Tensor:
    """``s - log1p(s)`` (about ``s^2 / 2``) without cancellation, for per-row values ``s``."""
    series = s * s * (0.5 - s * (1 / 3 - s * (0.25 - s * 0.2)))
    return torch.where(s.abs() < 1e-2, series, s - torch.log1p(s))


def _softmax_parts(
    x: torch.Tensor, inv_temperature: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(max, argmax, z, e, rest)`` of logit rows ``x`` at a temperature: ``z = (x - max) / T``
    (from the raw difference, so the maximum's ``z`` is exactly 0 even where a compiler fuses a
    multiply into the subtraction), ``e = exp(z)``, and ``rest`` the sum of ``e`` over every
    entry but the first maximum (whose term is exactly 1).

    The log-normaliser is then ``max / T + log1p(rest)``: for a peaked row ``rest`` is below
    float32's resolution of ``1 + rest``, and the entropy and the top token's log-probability
    live in it.
    """
    top, arg = x.max(-1, keepdim=True)
    z = x - top
    if _scaled(inv_temperature):
        z.mul_(inv_temperature)
    e = z.exp()
    e.scatter_(-1, arg, 0.0)
    rest = e.sum(-1, keepdim=True)
    e.scatter_(-1, arg, 1.0)
    return top, arg, z, e, rest


def _scaled(inv_temperature: torch.Tensor | float) -> bool:
    """Whether logits need scaling (a compiled call passes a tensor and always scales)."""
    return isinstance(inv_temperature, torch.Tensor) or inv_temperature != 1.0


def _row_sums(small: torch.Tensor, series: torch.Tensor, direct: torch.Tensor) -> torch.Tensor:
    """Per-row sums of ``series`` where the series applies, else ``direct``."""
    return torch.where(small, series, direct).sum(-1, keepdim=True)


def _core(
    ref: torch.Tensor,
    cand: torch.Tensor,
    targets: torch.Tensor,
    inv_temperature: torch.Tensor | float,
    vocab: int,
    top_k: int,
) -> torch.Tensor:
    """Every metric, then both log-normalisers, as a ``[N_OUTPUTS, N]`` float32 tensor: the one
    torch implementation, run eagerly or through ``torch.compile``.

    It meets :data:`~.accuracy.CONTRACT` where plain float32 does not. For near-identical
    models (KL of 1e-7 .. 1e-10 nats) the rounding of each row's log-normalisers (about 1e-6)
    enters KL whole, and ``sum p (log p - log q)`` is a sum of first-order terms that cancel
    down to the second-order KL. So:

    * the log-ratio is ``w = (x - (y - o)) / T - c``, ``o`` the whole number nearest the gap
      of the rows' maxima and ``c`` the float32 difference of the log-normalisers less
      ``o / T``: ``x - (y - o)`` is exact for nearby logits (also for heads offset by a
      constant), and ``c``'s error is one constant ``eta`` per row;
    * with ``p`` normalised, ``KL = sum p phi(w) - psi(S)`` exactly, where
      ``phi(w) = w + expm1(-w) >= 0`` (second order: a sum of positive terms),
      ``S = sum p expm1(-w) = e^eta - 1`` and ``psi(s) = s - log1p(s)``; reverse KL the same
      way with ``q`` and ``-w``. No first-order sum cancels, and ``eta`` drops out;
    * JSD is ``sum m (t d + log1p(-t^2)) / 2`` with ``d = w + log1p(S)`` the refined log-ratio,
      ``m = (p + q) / 2`` and ``t = tanh(d / 2)``: both terms are second order;
    * entropies and log-probabilities use ``log1p`` of the mass outside each row's maximum
      (:func:`_softmax_parts`).

    Where ``|w| >= SERIES_LIMIT`` the terms use ``p e^-w = q`` (no overflow where ``p``
    underflows); that is off by the factor ``e^eta``, so KL is off by about ``eta * q`` per
    such entry, which itself adds at least ``q / 10`` to KL: at most ``10 eta`` relative. A
    row with a non-finite logit gives NaN and is recomputed by the caller. Temporaries are
    updated in place wherever that saves an ``[N, V]`` allocation.
    """
    a = ref[:, :vocab].float()
    b = cand[:, :vocab].float()
    t = targets[:, None]
    max_a, top_a, z, p, rest_a = _softmax_parts(a, inv_temperature)
    log1p_a = torch.log1p(rest_a)
    lp_x = z.gather(-1, t) - log1p_a
    entropy_a = log1p_a - z.mul_(p).sum(-1, keepdim=True) / (1 + rest_a)
    del z
    max_b, top_b, z, q, rest_b = _softmax_parts(b, inv_temperature)
    log1p_b = torch.log1p(rest_b)
    lq_x = z.gather(-1, t) - log1p_b
    entropy_b = log1p_b - z.mul_(q).sum(-1, keepdim=True) / (1 + rest_b)
    del z
    rank = (b > b.gather(-1, top_a)).sum(-1, keepdim=True, dtype=torch.int32)
    # The log-ratio from a difference of raw logits, exact for nearby values (Sterbenz), where
    # a difference of separately scaled or normalised values is not. The candidate's row is
    # first moved by the whole number nearest the gap of the maxima (exactly: a whole number is
    # a multiple of its spacing), so heads offset by a constant are nearby values too.
    offset = torch.round(max_b - max_a)
    w = (b - offset).neg_().add_(a)
    del a, b  # float32 copies of half-precision logits are not needed past here
    if _scaled(inv_temperature):
        w.mul_(inv_temperature)
    lse_a, lse_b = max_a * inv_temperature + log1p_a, max_b * inv_temperature + log1p_b
    w.sub_(lse_a - lse_b + offset * inv_temperature)
    p.div_(p.sum(-1, keepdim=True))
    q.div_(q.sum(-1, keepdim=True))

    small = w.abs() < SERIES_LIMIT
    w2 = w * w
    even = _horner(w2, PHI_EVEN)
    odd = _horner(w2, PHI_ODD).mul_(w)
    phi_pos = (even - odd).mul_(w2)  # phi(w)
    phi_neg = even.add_(odd).mul_(w2)  # phi(-w)
    del w2, odd, even

    # F = sum p phi(w) and G = sum q phi(-w); where the series does not apply, p phi(w) is
    # p w + q - p (from p e^-w = q) and q phi(-w) is -q w + p - q.
    q_minus_p = q - p
    forward = _row_sums(small, phi_pos.mul_(p), torch.addcmul(q_minus_p, p, w))
    reverse = _row_sums(small, phi_neg.mul_(q), torch.addcmul(q_minus_p, q, w).neg_())
    del phi_pos, phi_neg, q_minus_p, small
    # S = sum p expm1(-w) = F - sum p w and T = sum q expm1(w) = G + sum q w, term by term.
    shift = forward - (p * w).sum(-1, keepdim=True)
    back = reverse + (q * w).sum(-1, keepdim=True)
    kl = (forward - _psi(shift)).clamp_min(0.0)
    rkl = (reverse - _psi(back)).clamp_min(0.0)

    d = w.add_(torch.log1p(shift))
    abs_d = d.abs()
    half_tanh = torch.tanh(d * 0.5)
    g = half_tanh * d  # t d >= 0
    near = torch.log1p(half_tanh.mul_(half_tanh).neg_())
    del half_tanh
    # log(1 - t^2) = -2 log cosh(d / 2), written without t where t rounds to 1.
    far = torch.nn.functional.softplus(-abs_d).mul_(-2.0).sub_(abs_d).add_(2 * LN2)
    g.add_(torch.where(abs_d < 2 * SERIES_LIMIT, near, far))
    del near, far, abs_d
    jsd = (0.25 * g.mul_(p.add_(q)).sum(-1, keepdim=True)).clamp(0.0, LN2)

    columns = {
        "kl": kl,
        "reverse_kl": rkl,
        "jsd": jsd,
        "entropy_reference": entropy_a,
        "entropy_candidate": entropy_b,
        "nll_reference": -lp_x,
        "nll_candidate": -lq_x,
        "delta_p": lq_x.exp() - lp_x.exp(),
        "top1_agree": (top_a == top_b).float(),
        "top1_in_top5": (rank < top_k).float(),
        "reference_top1_prob": torch.exp(-log1p_a),
        "lse_reference": lse_a,
        "lse_candidate": lse_b,
    }
    return torch.cat([columns[name] for name in OUTPUT_NAMES], dim=-1).T.contiguous()


def _finish(
    stacked: torch.Tensor,
    ref: torch.Tensor,
    cand: torch.Tensor,
    targets: torch.Tensor,
    temperature: float,
    vocab: int,
    top_k: int,
) -> dict[str, torch.Tensor]:
    """Unstack, and recompute rows with any non-finite result exactly (see the module doc)."""
    n_metrics = len(TOKEN_METRIC_NAMES)
    redo = ~torch.isfinite(stacked[:n_metrics]).all(0)
    out = {name: stacked[i] for i, name in enumerate(OUTPUT_NAMES)}
    nonfinite = torch.zeros(stacked.shape[1], dtype=torch.bool, device=stacked.device)
    if bool(redo.any()):
        rows = redo.nonzero().squeeze(-1)
        exact = token_metrics(
            ref[rows, :vocab],
            cand[rows, :vocab],
            targets[rows],
            temperature=temperature,
            top_k=top_k,
        )
        out = {name: value.clone() for name, value in out.items()}
        for name in TOKEN_METRIC_NAMES:
            out[name][rows] = exact[name].to(out[name].device)
        nonfinite[rows] = exact["nonfinite"].to(nonfinite.device)
        for key, logits in (("lse_reference", ref), ("lse_candidate", cand)):
            scaled = logits[rows, :vocab].double() / temperature
            out[key][rows] = torch.logsumexp(scaled, -1).float().to(out[key].device)
    out["nonfinite"] = nonfinite
    return out


def _check(
    ref: torch.Tensor, cand: torch.Tensor, temperature: float, vocab: int | None = None
) -> None:
    # Widths may differ (padded heads) as long as both cover the compared vocabulary.
    width = vocab or ref.shape[-1]
    if (
        ref.dim() != 2
        or cand.dim() != 2
        or ref.shape[0] != cand.shape[0]
        or min(ref.shape[-1], cand.shape[-1]) < width
        or (vocab is None and ref.shape != cand.shape)
    ):
        raise ValueError(
            f"logit shapes differ or are not [N, V]: {tuple(ref.shape)} vs {tuple(cand.shape)}"
        )
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")


def token_metrics_fused(
    reference_logits: torch.Tensor,
    candidate_logits: torch.Tensor,
    targets: torch.Tensor,
    *,
    temperature: float = 1.0,
    top_k: int = 5,
    vocab_size: int | None = None,
) -> dict[str, torch.Tensor]:
    """:func:`~.divergence.token_metrics` (same names, values and flags), computed faster.

    Also returns ``lse_reference``/``lse_candidate``, each row's log-normaliser of the
    (temperature-scaled) logits, so callers get log-probabilities of a few tokens without
    another sweep (float64 inputs, handled by ``token_metrics``, come without them).
    ``vocab_size`` slices wider (padded) logit rows inside the computation, without a copy.
    float64 inputs are handed to ``token_metrics`` unchanged (they ask for float64 math).
    """
    _check(reference_logits, candidate_logits, temperature, vocab_size)
    vocab = vocab_size or reference_logits.shape[-1]
    targets = targets.to(reference_logits.device).long()
    if reference_logits.dtype == torch.float64 or reference_logits.shape[0] == 0:
        return token_metrics(
            reference_logits[:, :vocab],
            candidate_logits[:, :vocab],
            targets,
            temperature=temperature,
            top_k=top_k,
        )
    stacked = _core(reference_logits, candidate_logits, targets, 1.0 / temperature, vocab, top_k)
    return _finish(stacked, reference_logits, candidate_logits, targets, temperature, vocab, top_k)


_POOLS: dict[int, ThreadPoolExecutor] = {}


def _pool(threads: int) -> ThreadPoolExecutor:
    pool = _POOLS.get(threads)
    if pool is None:
        pool = _POOLS[threads] = ThreadPoolExecutor(threads, thread_name_prefix="lmkl-kl")
    return pool


@contextmanager
def _one_thread_per_block(threads: int) -> Iterator[ThreadPoolExecutor]:
    """A pool of ``threads`` workers while torch's own ops run single-threaded."""
    pool = _pool(threads)
    torch.set_num_threads(1)
    try:
        yield pool
    finally:
        torch.set_num_threads(threads)


def _float32_rows(logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """float32 rows with unit stride along the vocabulary (a copy only where needed)."""
    if logits.dtype != torch.float32:
        return logits[:, :vocab].float()
    return logits if logits.stride(-1) == 1 else logits[:, :vocab].contiguous()


class MetricsKernel:
    """Per-chunk metrics by the fastest path that works here (all agree to float32 rounding).

    On a CPU (``device`` "cpu", or any CPU tensors when ``device`` is None) the native C kernel
    of :mod:`~.native` runs if it could be built (``native=False`` skips it). Otherwise
    ``compile`` asks for the ``torch.compile``d kernel; it is actually used only when
    ``expected_elements`` (tokens x vocabulary the run will score) reaches
    :func:`compile_threshold`, and only if compilation works here: any failure (no C++ compiler,
    unsupported device, ...) falls back to the eager fused path once, with a warning, and the run
    goes on. ``backend`` records which path ran ("native", "compiled" or "eager"), for the
    results' provenance.
    """

    _compiled_fn: Callable[..., torch.Tensor] | None = None
    _lock = threading.Lock()

    def __init__(
        self,
        *,
        compile: bool = True,
        expected_elements: int | None = None,
        vocab_size: int | None = None,
        top_k: int = 5,
        log: Callable[[str], None] | None = None,
        device: torch.device | str | None = None,
        native: bool = True,
    ) -> None:
        self.top_k = top_k
        self.log = log or (lambda _msg: None)
        device_type = None if device is None else torch.device(device).type
        self.native: NativeKernel | None = None
        if native and device_type in (None, "cpu"):
            self.native = load_native_kernel()
            if self.native is None and (reason := native_unavailable_reason()):
                self.log(f"native KL kernel unavailable ({reason}); using torch")
        on_cpu_natively = self.native is not None and device_type == "cpu"
        self.use_compile = (
            bool(compile)
            and not on_cpu_natively
            and (
                expected_elements is None
                or expected_elements >= compile_threshold(vocab_size, top_k)
            )
        )
        self._remembered = False
        self.backend = "native" if on_cpu_natively else "compiled" if self.use_compile else "eager"
        #: Rows per eager call (None: all at once); set by callers that size chunks for the
        #: compiled kernel, so that a fallback to eager keeps to the same memory budget.
        self.eager_rows: int | None = None

    def _eager(
        self,
        ref: torch.Tensor,
        cand: torch.Tensor,
        targets: torch.Tensor,
        temperature: float,
        vocab_size: int | None,
    ) -> dict[str, torch.Tensor]:
        # Chunks sized for the compiled kernel are split so the eager temporaries fit as well.
        rows = ref.shape[0]
        step = self.eager_rows or rows
        on_cpu = ref.device.type == "cpu"
        if on_cpu:
            # On a CPU the eager path makes about twenty sweeps over its [rows, V] temporaries:
            # in blocks that stay in cache, each worked by one thread (no barrier per op, which
            # stalls whenever another process holds a core), it takes a third of the CPU time
            # of whole-chunk calls (measured: about 12 vs 38 CPU-ns per token and vocabulary
            # entry at V=128k). Blocks keep at least two rows and no one-row block is left
            # over: a finite row's numbers are then those of a whole-chunk call, bit for bit
            # (tests/test_fused.py checks it).
            width = vocab_size or ref.shape[-1]
            step = min(step, max(2, EAGER_CPU_BLOCK_BYTES // (4 * width)))
        step = max(step, 1)
        starts = list(range(0, max(rows, 1), step))
        if len(starts) > 1 and rows - starts[-1] == 1 and step > 1:
            starts.pop()  # a last one-row block joins the one before it (see above)
        spans = list(zip(starts, [*starts[1:], max(rows, 1)], strict=True))

        def block(span: tuple[int, int]) -> dict[str, torch.Tensor]:
            s, e = span
            return token_metrics_fused(
                ref[s:e],
                cand[s:e],
                targets[s:e],
                temperature=temperature,
                top_k=self.top_k,
                vocab_size=vocab_size,
            )

        threads = torch.get_num_threads()
        if on_cpu and len(spans) > 1 and threads > 1:
            with _one_thread_per_block(threads) as pool:
                parts = list(pool.map(block, spans))
        else:
            parts = [block(span) for span in spans]
        if len(parts) == 1:
            return parts[0]
        return {name: torch.cat([p[name] for p in parts]) for name in parts[0]}

    def _native(
        self,
        ref: torch.Tensor,
        cand: torch.Tensor,
        targets: torch.Tensor,
        temperature: float,
        vocab_size: int | None,
    ) -> dict[str, torch.Tensor]:
        assert self.native is not None
        _check(ref, cand, temperature, vocab_size)
        vocab = vocab_size or ref.shape[-1]
        targets = targets.to(ref.device).long().contiguous()
        rows = ref.shape[0]
        if rows == 0 or int(targets.min()) < 0 or int(targets.max()) >= vocab:
            # (Nothing to do, or targets the C code must not index: the eager path decides.)
            return self._eager(ref, cand, targets, temperature, vocab_size)
        a, b = _float32_rows(ref, vocab), _float32_rows(cand, vocab)
        out = torch.empty(N_OUTPUTS, rows)
        spans = [(s, min(s + ROWS_PER_TASK, rows)) for s in range(0, rows, ROWS_PER_TASK)]

        def block(span: tuple[int, int]) -> None:
            assert self.native is not None
            self.native.metrics(a, b, targets, 1.0 / temperature, vocab, self.top_k, out, span)

        threads = torch.get_num_threads()
        if len(spans) > 1 and threads > 1:
            # ctypes releases the GIL: the rows are worked on every core.
            list(_pool(threads).map(block, spans))
        else:
            for span in spans:
                block(span)
        self.backend = "native"
        return _finish(out, ref, cand, targets, temperature, vocab, self.top_k)

    @classmethod
    def _compiled(cls) -> Callable[..., torch.Tensor]:
        with cls._lock:
            if cls._compiled_fn is None:
                cls._compiled_fn = torch.compile(_core, dynamic=False)
            return cls._compiled_fn

    def __call__(
        self,
        reference_logits: torch.Tensor,
        candidate_logits: torch.Tensor,
        targets: torch.Tensor,
        *,
        temperature: float = 1.0,
        vocab_size: int | None = None,
    ) -> dict[str, torch.Tensor]:
        """Metrics for ``[N, V']`` logit rows (``V' >= vocab_size``); see :func:`token_metrics`."""
        if (
            self.native is not None
            and reference_logits.device.type == "cpu"
            and reference_logits.dtype != torch.float64
        ):
            return self._native(
                reference_logits, candidate_logits, targets, temperature, vocab_size
            )
        if not self.use_compile or reference_logits.dtype == torch.float64:
            return self._eager(reference_logits, candidate_logits, targets, temperature, vocab_size)
        _check(reference_logits, candidate_logits, temperature, vocab_size)
        vocab = vocab_size or reference_logits.shape[-1]
        targets = targets.to(reference_logits.device).long()
        n = reference_logits.shape[0]
        ref, cand, tgt = reference_logits, candidate_logits, targets
        if n < 2:
            # Dynamo specialises sizes 0 and 1; pad to two rows so one graph serves every chunk.
            pad = 2 - n
            ref = torch.cat([ref, ref.new_zeros(pad, ref.shape[1])])
            cand = torch.cat([cand, cand.new_zeros(pad, cand.shape[1])])
            tgt = torch.cat([tgt, tgt.new_zeros(pad)])
        try:
            for tensor in (ref, cand, tgt):
                torch._dynamo.mark_dynamic(tensor, 0)
            inv_t = torch.tensor(1.0 / temperature, dtype=torch.float32, device=ref.device)
            stacked = self._compiled()(ref, cand, tgt, inv_t, vocab, self.top_k)
        except Exception as exc:  # compilation can fail in many ways; eager is always right
            self.use_compile = False
            self.backend = "eager"
            message = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
            warnings.warn(
                LmklWarning(f"torch.compile unavailable ({message}); using the eager fused KL"),
                stacklevel=2,
            )
            self.log(f"torch.compile failed ({message}); using the eager fused KL")
            return self(
                reference_logits,
                candidate_logits,
                targets,
                temperature=temperature,
                vocab_size=vocab_size,
            )
        if not self._remembered:
            # Inductor's cache now holds this kernel: later runs expect the warm cost.
            from lmkl.files import remember

            remember(_COMPILED_MEMO, {_compiled_key(vocab, self.top_k): True})
            self._remembered = True
        stacked = stacked[:, :n]
        return _finish(
            stacked, reference_logits, candidate_logits, targets, temperature, vocab, self.top_k
        )
