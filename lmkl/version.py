"""The package version (one definition; the package, results and caches record it), and a hash of
the code that computes results (run identities record it, so a resume notices a code change
that the version string, bumped by hand, does not)."""

from __future__ import annotations

import functools
import hashlib
from pathlib import Path

__version__ = "0.1.0"

#: The parts of the package whose code decides a run's per-token numbers: the math and its
#: kernels, the run loop and kinds, how data becomes windows, how models and caches load and
#: quantize, and the option models. The CLI, reports, analysis (re-run on every resume anyway)
#: and experiment plumbing are left out, so editing them never invalidates a run in progress.
RESULT_CODE = ("scoring", "engine", "data", "models", "refcache", "quantization", "specs")


@functools.cache
def code_hash() -> str:
    """SHA-256 (first 16 hex digits) of the package's source files in :data:`RESULT_CODE`.

    Reads ~0.5 MB once per process (a few milliseconds). Paths are hashed with the contents,
    so moving code between files counts as a change too.
    """
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    files = sorted(
        path
        for path in root.rglob("*")
        if path.suffix in (".py", ".c", ".h")
        and path.is_file()
        and "__pycache__" not in path.parts
        and path.relative_to(root).parts[0].split(".")[0] in RESULT_CODE
    )
    for path in files:
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]
