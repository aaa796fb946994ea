"""The fused per-token metrics as a small C kernel, compiled once per machine (CPU runs).

On a CPU the KL stage's cost is sweeps over ``[tokens, vocabulary]`` logits. Eager torch makes
about twenty of them (one per op, each allocating a temporary); ``torch.compile`` fuses them but
costs seconds per process even with a warm cache. ``token_metrics.c`` makes two sweeps per row
in cache, with inline vectorised ``exp``/``log``, and refines the one float32 rounding that
limits KL for near-identical models (see the C file): faster than the eager path and exact
where float32 torch is not (``scripts/bench.py``, ``tests/test_native.py``).

It is built with the machine's C compiler (``$CC``, else ``cc``/``gcc``/``clang``) in a fraction
of a second the first time it is needed, for this CPU (``-march=native``), and kept in the user
cache (``$LMKL_CACHE_DIR/kernels``) under a name derived from the source, the compiler, the
flags and the CPU's features, so a shared home directory never loads a build for another CPU.
Each process checks the loaded kernel against the eager torch path on a small input before
using it. Anything that goes wrong (no compiler, a failed build, a failed check) means
"not available": callers use the torch path (the same numbers to float32 rounding). Set
``LMKL_NATIVE_KERNEL=0`` to never build or use it.
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
from importlib import resources
from pathlib import Path

import torch

from lmkl.scoring.divergence import TOKEN_METRIC_NAMES

__all__ = ["NativeKernel", "load_native_kernel", "native_unavailable_reason"]

#: Outputs per row: the token metrics, then both log-normalisers (see token_metrics.c).
N_OUTPUTS = len(TOKEN_METRIC_NAMES) + 2
#: No reassociation (the KL refinement needs each log-ratio computed once, as written): the
#: reductions vectorise by their ``omp simd`` pragmas; contraction (FMA) and no errno. See the C
#: file's header. -march=native: the build is for this machine only (x86: 512-bit vectors where
#: the CPU has them).
CFLAGS = (
    "-O3",
    "-march=native",
    "-fopenmp-simd",
    "-fno-math-errno",
    "-fno-trapping-math",
    "-ffp-contract=fast",
    "-fPIC",
) + (("-mprefer-vector-width=512",) if platform.machine().lower() in {"x86_64", "amd64"} else ())
LIBS = ("-lm",)
#: Rows per task handed to a worker thread: small enough to balance shared cores.
ROWS_PER_TASK = 8

_build_lock = threading.Lock()
_reason: str | None = None


def _source() -> bytes:
    return resources.files("lmkl.scoring").joinpath("token_metrics.c").read_bytes()


def _compiler() -> str | None:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and (path := shutil.which(name)):
            return path
    return None


def _cpu_features() -> str:
    """What the build depends on besides the source: the CPU's instruction set extensions."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.startswith(("flags", "Features")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor()


def _build_key(compiler: str, source: bytes) -> str:
    stat = os.stat(compiler)
    parts = [
        source.hex(),
        compiler,
        str(stat.st_size),
        str(stat.st_mtime_ns),
        " ".join(CFLAGS + LIBS),
        platform.machine(),
        _cpu_features(),
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:24]


def _build(compiler: str, source: bytes, target: Path) -> None:
    """Compile and link ``source`` into ``target`` atomically (concurrent processes are safe)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=".build-") as tmp:
        c_file = Path(tmp) / "token_metrics.c"
        c_file.write_bytes(source)
        built = Path(tmp) / target.name
        command = [compiler, *CFLAGS, "-shared", str(c_file), "-o", str(built), *LIBS]
        done = subprocess.run(command, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            first = (done.stderr.strip().splitlines() or ["no output"])[0]
            raise RuntimeError(f"{Path(compiler).name} failed: {first[:200]}")
        os.replace(built, target)


class NativeKernel:
    """The loaded C kernel: :meth:`metrics` fills a ``[N_OUTPUTS, N]`` float32 tensor."""

    def __init__(self, library: ctypes.CDLL) -> None:
        function = library.lmkl_token_metrics
        pointer, int64 = ctypes.c_void_p, ctypes.c_int64
        function.argtypes = [pointer, int64, pointer, int64, int64, int64, pointer]
        function.argtypes += [ctypes.c_float, ctypes.c_int32, pointer, int64, pointer]
        function.restype = None
        library.lmkl_blocks.argtypes = [int64]
        library.lmkl_blocks.restype = int64
        self._function = function
        self._blocks = library.lmkl_blocks
        self._scratch = threading.local()

    def _buffer(self, vocab: int) -> torch.Tensor:
        """This thread's scratch for per-block figures, grown as needed."""
        size = 4 * int(self._blocks(vocab))
        held = getattr(self._scratch, "blocks", None)
        if held is None or held.numel() < size:
            held = self._scratch.blocks = torch.empty(size, dtype=torch.float64)
        return held

    def metrics(
        self,
        ref: torch.Tensor,
        cand: torch.Tensor,
        targets: torch.Tensor,
        inv_temperature: float,
        vocab: int,
        top_k: int,
        out: torch.Tensor,
        rows: tuple[int, int],
    ) -> None:
        """Rows ``[start, stop)`` of float32 ``[N, >= vocab]`` logits into ``out[:, start:stop]``.

        ``ref``/``cand`` must have unit stride along the vocabulary, ``targets`` be int64,
        contiguous and in ``[0, vocab)``, ``out`` contiguous ``[N_OUTPUTS, N]`` float32 (the
        caller checks; the C code trusts them). Releases the GIL while it runs.
        """
        start, stop = rows
        blocks = self._buffer(vocab)
        self._function(
            ref.data_ptr() + 4 * start * ref.stride(0),
            ref.stride(0),
            cand.data_ptr() + 4 * start * cand.stride(0),
            cand.stride(0),
            stop - start,
            vocab,
            targets.data_ptr() + 8 * start,
            inv_temperature,
            top_k,
            out.data_ptr() + 4 * start,
            out.shape[1],
            blocks.data_ptr(),
        )


def _self_check(kernel: NativeKernel) -> None:
    """Compare with the eager torch path on rows that exercise every branch of the kernel."""
    from lmkl.scoring.fused import token_metrics_fused

    generator = torch.Generator().manual_seed(0)
    vocab = 2 * 1024 + 37  # more than one block, and a partial last one
    ref = torch.randn(6, vocab, generator=generator) * 3
    cand = ref + torch.randn(6, vocab, generator=generator)
    cand[1] = ref[1]  # identical rows: KL exactly 0
    ref[2, 1500] = 40.0  # peaked: the maximum in a later block
    ref[3, 5] = cand[3, 7] = float("-inf")  # non-finite: NaN, left to the exact path
    targets = torch.randint(0, vocab, (6,), generator=generator)
    out = torch.empty(N_OUTPUTS, 6)
    kernel.metrics(ref, cand, targets, 1 / 1.5, vocab, 5, out, (0, 6))
    expected = token_metrics_fused(ref, cand, targets, temperature=1.5)
    if not bool(out[:, 3].isnan().all()):
        raise RuntimeError("self-check failed: a non-finite row was not flagged")
    if float(out[0, 1]) != 0.0:
        raise RuntimeError("self-check failed: identical rows gave a non-zero KL")
    finite = [0, 1, 2, 4, 5]
    for i, name in enumerate([*TOKEN_METRIC_NAMES, "lse_reference", "lse_candidate"]):
        want = expected[name][finite].float()
        if not torch.allclose(out[i, finite], want, rtol=1e-4, atol=1e-5):
            raise RuntimeError(f"self-check failed on {name}")


def load_native_kernel() -> NativeKernel | None:
    """The C kernel for this machine (built on first use), or None if it cannot be had here.

    The reason it is unavailable is kept for :func:`native_unavailable_reason`.
    """
    global _reason
    if os.environ.get("LMKL_NATIVE_KERNEL", "1").strip().lower() in {"0", "false", "no", "off"}:
        kernel, _reason = None, "turned off by LMKL_NATIVE_KERNEL"
    else:
        kernel, _reason = _built_and_checked()
    return kernel


@functools.cache
def _built_and_checked() -> tuple[NativeKernel | None, str | None]:
    """Build (once per machine), load and check the kernel (once per process)."""
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found (set CC)"
    from lmkl.files import user_cache_dir

    try:
        source = _source()
        target = user_cache_dir() / "kernels" / f"token_metrics-{_build_key(compiler, source)}.so"
        with _build_lock:
            if not target.exists():
                _build(compiler, source, target)
        kernel = NativeKernel(ctypes.CDLL(str(target)))
        _self_check(kernel)
    except (OSError, RuntimeError, subprocess.SubprocessError, AttributeError) as exc:
        return None, (str(exc).splitlines() or [type(exc).__name__])[0][:200]
    return kernel, None


def native_unavailable_reason() -> str | None:
    """Why the last :func:`load_native_kernel` returned None (None if it loaded)."""
    return _reason
