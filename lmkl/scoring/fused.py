"""Every per-token quantity in one or two sweeps over the vocabulary, optionally ``torch.compile``d.

:func:`~.divergence.token_metrics` is the readable definition; this module computes the same
numbers faster and with fewer ``[N, V]`` temporaries, which is what bounds the cost of the KL
stage next to the two forward passes:

* :func:`token_metrics_fused` is the eager version (about 7 float32 ``[N, V]`` temporaries instead
  of about 20, and no top-k sort).
* :class:`MetricsKernel` picks the fastest path that works here: on a CPU the C kernel of
  :mod:`~.native` (two sweeps per row in cache, built once per machine); elsewhere (or without a
  C compiler) the same math through ``torch.compile`` when that pays (a large vocabulary times
  many tokens): Inductor fuses it into one kernel that reads each logit row a few times while it
  is still in cache and allocates no ``[N, V]`` temporary at all. The compiled graph has a
  static vocabulary width and a dynamic number of rows, so one compilation serves every chunk.
  If compilation is unavailable or fails, the eager version is used.

Both give the values of ``token_metrics`` to float32 rounding (the tests hold them to 1e-5) and
keep its semantics for rows that are not plain finite distributions: the fast path never has to
decide anything about ``-inf``/NaN/``+inf`` logits itself. Such a row makes at least one fast-path
result non-finite (``0 * -inf`` is NaN), and every row with a non-finite result is recomputed with
``token_metrics``, which returns ``+inf`` KL where the candidate gives zero probability to a token
the reference does not, and NaN plus the ``nonfinite`` flag for broken rows.

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
from lmkl.scoring.divergence import TOKEN_METRIC_NAMES, token_metrics
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

# A lower bound that no finite log-probability reaches; used where p = q = 0 (both underflow),
# so that 0 * (log p - log m) stays 0 instead of 0 * inf = NaN. Rows with real -inf logits still
# produce NaN there and take the exact fallback.
_LOG_FLOOR = -1e30


def temporaries_per_token(backend: str) -> int:
    """Float32 vocabulary-wide rows alive per scored token in the KL stage (for chunk sizing).

    Two are the reference and candidate logits themselves; the eager fused path adds its
    temporaries, the compiled kernel none (one more row of slack for dtype casts), the native
    kernel float32 copies of half-precision logits.
    """
    return {"compiled": 3, "native": 4}.get(backend, 11)


def _stack(values: dict[str, torch.Tensor]) -> torch.Tensor:
    return torch.stack([values[name].float() for name in TOKEN_METRIC_NAMES])


def _core_compiled(
    ref: torch.Tensor,
    cand: torch.Tensor,
    targets: torch.Tensor,
    inv_temperature: torch.Tensor,
    vocab: int,
    top_k: int,
) -> torch.Tensor:
    """All metrics as a ``[len(TOKEN_METRIC_NAMES), N]`` tensor, written for Inductor to fuse.

    Elementwise expressions are recomputed rather than stored: fused, they cost nothing in
    memory and little in time, whereas in eager mode each would be an ``[N, V]`` tensor.
    """
    # The temperature is a tensor, not a constant: no recompilation per temperature (x 1.0 is
    # exact, and fused it costs nothing).
    a = ref[:, :vocab].float() * inv_temperature
    b = cand[:, :vocab].float() * inv_temperature
    max_a, top_a = a.max(-1, keepdim=True)
    max_b, top_b = b.max(-1, keepdim=True)
    lse_a = max_a + torch.log(torch.exp(a - max_a).sum(-1, keepdim=True))
    lse_b = max_b + torch.log(torch.exp(b - max_b).sum(-1, keepdim=True))
    lp = a - lse_a
    lq = b - lse_b
    p = torch.exp(lp)
    q = torch.exp(lq)
    d = lp - lq
    lm = torch.log(p + q).clamp_min(_LOG_FLOOR) - LN2
    kl = (p * d).sum(-1).clamp_min(0.0)
    rkl = (-(q * d)).sum(-1).clamp_min(0.0)
    hp = -(p * lp).sum(-1)
    hq = -(q * lq).sum(-1)
    jsd = (0.5 * (p * (lp - lm) + q * (lq - lm))).sum(-1).clamp(0.0, LN2)
    rank = (b > b.gather(-1, top_a)).sum(-1)
    t = targets[:, None]
    lp_x = lp.gather(-1, t).squeeze(-1)
    lq_x = lq.gather(-1, t).squeeze(-1)
    return torch.stack(
        [
            kl,
            rkl,
            jsd,
            hp,
            hq,
            -lp_x,
            -lq_x,
            lq_x.exp() - lp_x.exp(),
            (top_a == top_b).squeeze(-1).float(),
            (rank < top_k).float(),
            (max_a - lse_a).squeeze(-1).exp(),
            lse_a.squeeze(-1),
            lse_b.squeeze(-1),
        ]
    )


def _core_eager(
    ref: torch.Tensor,
    cand: torch.Tensor,
    targets: torch.Tensor,
    inv_temperature: float,
    vocab: int,
    top_k: int,
) -> torch.Tensor:
    """The same values as :func:`_core_compiled` with few, reused ``[N, V]`` temporaries."""
    a = ref[:, :vocab]
    b = cand[:, :vocab]
    if inv_temperature != 1.0:
        a = a.float() * inv_temperature
        b = b.float() * inv_temperature
    lp = torch.log_softmax(a, -1, dtype=torch.float32)
    lq = torch.log_softmax(b, -1, dtype=torch.float32)
    p = lp.exp()
    q = lq.exp()
    work = lp - lq
    kl = (p * work).sum(-1).clamp_min_(0.0)
    rkl = (q * work).sum(-1).neg_().clamp_min_(0.0)
    hp = (p * lp).sum(-1).neg_()
    hq = (q * lq).sum(-1).neg_()
    # work <- log m = log((p + q) / 2), floored where both probabilities underflow to 0.
    torch.add(p, q, out=work).log_().clamp_min_(_LOG_FLOOR).sub_(LN2)
    jsd = ((p * (lp - work)).sum(-1) + (q * (lq - work)).sum(-1)).mul_(0.5).clamp_(0.0, LN2)
    del work
    # max() gives the index too (the first maximum, as argmax): one sweep instead of two; the
    # count in int32 sums a third faster than in int64 (exact: V < 2^31).
    max_lp, top_p = lp.max(-1)
    max_lq, top_q = lq.max(-1)
    rank = (lq > lq.gather(-1, top_p[:, None])).sum(-1, dtype=torch.int32)
    t = targets[:, None]
    lp_x = lp.gather(-1, t).squeeze(-1)
    lq_x = lq.gather(-1, t).squeeze(-1)
    # log-normalisers (lp = a - lse), read off at each row's top token: no extra sweep.
    lse_a = a.gather(-1, top_p[:, None]).squeeze(-1).float() - max_lp
    lse_b = b.gather(-1, top_q[:, None]).squeeze(-1).float() - max_lq
    return torch.stack(
        [
            kl,
            rkl,
            jsd,
            hp,
            hq,
            -lp_x,
            -lq_x,
            lq_x.exp() - lp_x.exp(),
            (top_p == top_q).float(),
            (rank < top_k).float(),
            max_lp.exp(),
            lse_a,
            lse_b,
        ]
    )


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
    out = {name: stacked[i] for i, name in enumerate(TOKEN_METRIC_NAMES)}
    out["lse_reference"], out["lse_candidate"] = stacked[n_metrics], stacked[n_metrics + 1]
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
            scaled = logits[rows, :vocab].float() / temperature
            out[key][rows] = torch.logsumexp(scaled, -1).to(out[key].device)
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
    stacked = _core_eager(
        reference_logits, candidate_logits, targets, 1.0 / temperature, vocab, top_k
    )
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
                cls._compiled_fn = torch.compile(_core_compiled, dynamic=False)
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
