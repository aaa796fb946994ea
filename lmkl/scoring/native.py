"""The fused per-token metrics as a small C kernel, compiled once per machine (CPU runs).

On a CPU the KL stage's cost is sweeps over ``[tokens, vocabulary]`` logits. Eager torch makes
about twenty of them (one per op, each allocating a temporary); ``torch.compile`` fuses them but
costs seconds per process even with a warm cache. ``token_metrics.c`` makes two sweeps per row
in cache, with inline vectorised ``exp``/``log``, and meets the same accuracy contract as the
torch kernel (:mod:`~.accuracy`; ``scripts/bench.py``, ``tests/test_accuracy_contract.py``).

It is built with the machine's C compiler (``$CC``, else ``cc``/``gcc``/``clang``) in a fraction
of a second the first time it is needed, for this CPU (``-march=native``), and kept in the user
cache (``$LMKL_CACHE_DIR/kernels``) under a name derived from the source, the compiler, the
flags and the CPU's features, so a shared home directory never loads a build for another CPU.
A new build is published without replacing one that exists (another host may have it mapped).
Each process checks the loaded kernel: its output order against :data:`~.divergence.OUTPUT_NAMES`
and its values against the float64 definition under the contract; a cached build that fails is
rebuilt once. Anything else that goes wrong (no compiler, a failed build, a failed check) means
"not available": callers use the torch kernel, which meets the same contract. Set
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

from lmkl.scoring.accuracy import check
from lmkl.scoring.divergence import OUTPUT_NAMES, token_metrics

__all__ = ["NativeKernel", "load_native_kernel", "native_unavailable_reason"]

#: Outputs per row, in the order of OUTPUT_NAMES (token_metrics.c reports its own; checked).
N_OUTPUTS = len(OUTPUT_NAMES)
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
    if platform.system() == "Darwin":
        return _darwin_cpu_features()
    return platform.processor()


def _darwin_cpu_features() -> str:
    """macOS has no /proc/cpuinfo: the CPU's brand and feature lists from ``sysctl``.

    Intel Macs list their extensions in ``machdep.cpu.features``/``leaf7_features``; Apple
    silicon reports each as an ``hw.optional.*`` flag. (``platform.processor()`` only says
    "i386" or "arm", which would let two different CPUs share a ``-march=native`` build.)
    """
    try:
        done = subprocess.run(["sysctl", "-a"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return platform.processor()
    keep = ("machdep.cpu.brand_string", "machdep.cpu.features", "machdep.cpu.leaf7_features")
    lines = sorted(
        line.strip()
        for line in done.stdout.splitlines()
        if line.startswith(keep) or line.startswith("hw.optional.")
    )
    return "\n".join(lines) or platform.processor()


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


def _compile(compiler: str, source: bytes, directory: Path, name: str) -> Path:
    """Compile and link ``source`` into ``directory/name``."""
    c_file = directory / "token_metrics.c"
    c_file.write_bytes(source)
    built = directory / name
    command = [compiler, *CFLAGS, "-shared", str(c_file), "-o", str(built), *LIBS]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    if done.returncode != 0:
        first = (done.stderr.strip().splitlines() or ["no output"])[0]
        raise RuntimeError(f"{Path(compiler).name} failed: {first[:200]}")
    return built


def _publish(built: Path, target: Path, *, replace: bool) -> None:
    """Make ``built`` the cached build ``target``, atomically.

    A new build is hard-linked into place, which fails if another process published first: an
    existing build is never replaced, since another process (on another host of a shared NFS
    home, where an unlinked file does not stay alive) may have it mapped. Only a build that
    failed to load or to check here is replaced, by a rename.
    """
    if replace:
        os.replace(built, target)
        return
    try:
        os.link(built, target)
    except FileExistsError:
        pass
    except OSError:  # a file system without hard links: rename, still never over a build
        if not target.exists():
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
        library.lmkl_outputs.restype = ctypes.c_int32
        library.lmkl_output_names.restype = ctypes.c_char_p
        names = tuple(library.lmkl_output_names().decode().split(","))
        if library.lmkl_outputs() != N_OUTPUTS or names != OUTPUT_NAMES:
            raise RuntimeError(
                f"the build writes {library.lmkl_outputs()} outputs ({', '.join(names)}), "
                f"lmkl reads {N_OUTPUTS} ({', '.join(OUTPUT_NAMES)})"
            )
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
    """Hold the kernel to the accuracy contract on rows that exercise every branch of it.

    The reference is the float64 definition (:func:`~.divergence.token_metrics`), not another
    fast kernel: a build that is merely as wrong as float32 is refused.
    """
    generator = torch.Generator().manual_seed(0)
    vocab = 2 * 1024 + 37  # more than one block, and a partial last one
    ref = torch.randn(8, vocab, generator=generator) * 3
    cand = ref + torch.randn(8, vocab, generator=generator)
    cand[1] = ref[1]  # identical rows: KL exactly 0
    ref[2, 1500] = 40.0  # peaked: the maximum in a later block, entropy near 0
    ref[3, 5] = cand[3, 7] = float("-inf")  # non-finite: NaN, left to the exact path
    cand[5] = ref[5] + 1e-4 * torch.randn(vocab, generator=generator) + 0.5  # KL ~ 1e-9
    cand[6] = ref[6] + 3e-3 * torch.randn(vocab, generator=generator)  # KL ~ 1e-6
    targets = torch.randint(0, vocab, (8,), generator=generator)
    out = torch.empty(N_OUTPUTS, 8)
    kernel.metrics(ref, cand, targets, 1 / 1.5, vocab, 5, out, (0, 8))
    if not bool(out[:, 3].isnan().all()):
        raise RuntimeError("self-check failed: a non-finite row was not flagged")
    if float(out[0, 1]) != 0.0:
        raise RuntimeError("self-check failed: identical rows gave a non-zero KL")
    finite = [0, 1, 2, 4, 5, 6, 7]
    want = token_metrics(ref[finite], cand[finite], targets[finite], temperature=1.5)
    for name, logits in (("lse_reference", ref), ("lse_candidate", cand)):
        want[name] = torch.logsumexp(logits[finite].double() / 1.5, -1)
    got = {name: out[i, finite] for i, name in enumerate(OUTPUT_NAMES)}
    if problems := check(got, want):
        raise RuntimeError(f"self-check failed: {problems[0]}")


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


def _check_complete(path: Path) -> None:
    """Raise if an ELF library is shorter than its own headers say (a truncated copy).

    Loading a truncated library does not fail cleanly: the loader maps what the headers
    promise and the process dies of SIGBUS when it touches the missing part. gcc and clang put
    the section header table last, so its end is the file's expected size. (Other formats,
    such as macOS's Mach-O, are left to the loader.)
    """
    with open(path, "rb") as fh:
        header = fh.read(64)
        size = os.fstat(fh.fileno()).st_size
    if header[:4] != b"\x7fELF" or len(header) < 52:
        return
    wide, order = header[4] == 2, "little" if header[5] == 1 else "big"
    if wide and len(header) < 64:
        raise RuntimeError(f"{path.name} is truncated")
    offset, entry, count = (40, 58, 60) if wide else (32, 46, 48)
    table = int.from_bytes(header[offset : offset + (8 if wide else 4)], order)
    entry_size = int.from_bytes(header[entry : entry + 2], order)
    entries = int.from_bytes(header[count : count + 2], order)
    if table + entry_size * entries > size:
        raise RuntimeError(f"{path.name} is truncated ({size} bytes)")


def _load(path: Path) -> NativeKernel:
    """Load a build and hold it to the contract (any failure raises)."""
    _check_complete(path)
    kernel = NativeKernel(ctypes.CDLL(str(path)))
    _self_check(kernel)
    return kernel


_FAILURES = (OSError, RuntimeError, subprocess.SubprocessError, AttributeError)


@functools.cache
def _built_and_checked() -> tuple[NativeKernel | None, str | None]:
    """Build (once per machine), load and check the kernel (once per process).

    A cached build that fails to load or to check (a truncated file, another compiler's
    output, an older source) is rebuilt once and replaced; if the new build fails too, the
    kernel is unavailable in this process, with the reason.
    """
    compiler = _compiler()
    if compiler is None:
        return None, "no C compiler found (set CC)"
    from lmkl.files import user_cache_dir

    try:
        source = _source()
        target = user_cache_dir() / "kernels" / f"token_metrics-{_build_key(compiler, source)}.so"
        stale = None
        with _build_lock:  # (threads of one process: one loads or builds, the others wait)
            if target.exists():
                try:
                    return _load(target), None
                except _FAILURES as exc:
                    stale = exc
            target.parent.mkdir(parents=True, exist_ok=True)
            # The build is loaded from here and then unlinked: on NFS that leaves a .nfsXXXX
            # file until the process exits, and the folder cannot go yet (not an error).
            with tempfile.TemporaryDirectory(
                dir=target.parent, prefix=".build-", ignore_cleanup_errors=True
            ) as tmp:
                built = _compile(compiler, source, Path(tmp), target.name)
                kernel = _load(built)
                _publish(built, target, replace=stale is not None)
    except _FAILURES as exc:
        return None, (str(exc).splitlines() or [type(exc).__name__])[0][:200]
    return kernel, None


def native_unavailable_reason() -> str | None:
    """Why the last :func:`load_native_kernel` returned None (None if it loaded)."""
    return _reason
