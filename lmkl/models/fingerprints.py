"""Content hashes of weight files, computed once per set of unchanged files.

A run hashes a local checkpoint for its identity (so a resume notices changed weights); the
hash is remembered in this process and, keyed by path, inode, size, mtime and ctime, across
processes in a small memo under the user cache directory.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

#: Content hashes already computed in this process, keyed by each file's path, inode, size,
#: modification and change time (a run hashes a checkpoint for its identity before loading it
#: and again to describe it; any write to a file changes its ctime, which no copy can set back).
_FINGERPRINTS: dict[tuple[tuple[str, int, int, int, int], ...], str] = {}
#: The same hashes across processes: a small memo under the user cache directory (hashing a
#: checkpoint reads all of it: about a second per GB, every run).
_FINGERPRINT_MEMO = "weights-sha256"


def file_key(path: Path) -> tuple[str, int, int, int, int]:
    """What identifies a file's content without reading it: path, inode, size, mtime, ctime."""
    stat = path.stat()
    return str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns


def fingerprint_files(paths: list[Path]) -> str:
    """SHA-256 over the names and contents of ``paths`` (a content hash of local weights).

    Computed once per set of files: a later call, in this process or another, with every file's
    path, inode, size, mtime and ctime unchanged reuses it (a changed file is hashed again).
    """
    from lmkl.files import read_memo, remember

    key = tuple(file_key(p) for p in paths)
    if key in _FINGERPRINTS:
        return _FINGERPRINTS[key]
    memo_key = json.dumps(key)
    known = read_memo(_FINGERPRINT_MEMO).get(memo_key)
    if isinstance(known, str) and len(known) == 64:
        _FINGERPRINTS[key] = known
        return known
    digest = hashlib.sha256()
    for path in paths:
        digest.update(path.name.encode())
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(8 * 2**20), b""):
                digest.update(block)
    # Files changed while they were read are not remembered across processes.
    if tuple(file_key(p) for p in paths) == key:
        remember(_FINGERPRINT_MEMO, {memo_key: digest.hexdigest()})
    _FINGERPRINTS[key] = digest.hexdigest()
    return _FINGERPRINTS[key]
