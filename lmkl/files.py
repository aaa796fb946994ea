"""Durable file writes, and one writer per directory.

Every file lmkl writes appears complete under its final name or not at all: a write goes to a
temporary file beside the target, is fsync-ed, renamed into place and the directory entry
fsync-ed, so a killed process or a power cut never leaves a half-written file.

:class:`DirectoryLock` keeps a second process out of a directory another one is filling (a run
directory, a reference cache)::

    with DirectoryLock(path, what="run directory"):
        ...  # raises lmkl.errors.Busy (exit code 75) if another live process holds it
"""

from __future__ import annotations

import errno
import json
import math
import os
import shutil
import socket
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import yaml

from lmkl.errors import Busy, OutputError

#: The lock file :class:`DirectoryLock` keeps in a directory while a process works in it.
LOCK_FILE = ".lmkl-lock"


def current_umask() -> int:
    """The process's umask (read without changing it where /proc allows)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # elsewhere the only way to read it is to set it, then put it back
    os.umask(mask)
    return mask


def normal_mode(directory: bool = False) -> int:
    """The mode a plain ``open()`` (0o666) or ``mkdir`` (0o777) gives under the user's umask.

    ``tempfile`` creates files 0o600 and directories 0o700 whatever the umask; a report, a
    results file or a shared cache renamed into place from one must get the normal mode back,
    or a colleague (or a web server) cannot read it.
    """
    return (0o777 if directory else 0o666) & ~current_umask()


def make_temp_dir(parent: Path, prefix: str) -> Path:
    """``tempfile.mkdtemp`` in ``parent`` with the user's normal directory mode (it is renamed
    into place as a final directory)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    path.chmod(normal_mode(directory=True))
    return path


def give_normal_modes(root: Path) -> None:
    """Give every file and directory under ``root`` (and ``root``) the user's normal mode, for a
    tree built privately and then published by a rename (some writers, such as safetensors,
    create their files 0o600 whatever the umask)."""
    file_mode, dir_mode = normal_mode(), normal_mode(directory=True)
    for path in [root, *root.rglob("*")]:
        if not path.is_symlink():
            path.chmod(dir_mode if path.is_dir() else file_mode)


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success fsync it and rename it into place.

    The file ends with the mode a plain write would give it: the user's umask applied to
    0o666, or the mode of the file it replaces."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    try:
        mode = target.stat().st_mode & 0o7777
    except OSError:
        mode = normal_mode()
    os.fchmod(fd, mode)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        if (tmp.stat().st_mode & 0o7777) != mode:  # the writer replaced the file (a rename)
            tmp.chmod(mode)
        os.replace(tmp, target)
        fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on every platform; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    """Atomically write strict JSON (non-finite floats become ``"inf"``/``null``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(to_json_safe(obj), indent=2, allow_nan=False) + "\n")


def write_yaml(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(obj, sort_keys=False, allow_unicode=True))


def fsync_tree(root: Path) -> None:
    """fsync every file under ``root`` and every directory (before renaming ``root`` into place)."""
    for path in sorted(root.rglob("*"), reverse=True):
        if path.is_file():
            with path.open("rb") as handle:
                os.fsync(handle.fileno())
        elif path.is_dir():
            fsync_dir(path)
    fsync_dir(root)


def to_json_safe(value: Any) -> Any:
    """Replace non-finite floats for strict JSON: ``+inf`` → ``"inf"``, NaN → ``None``."""
    if isinstance(value, float):
        if math.isnan(value):
            return None
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return value
    if isinstance(value, dict):
        return {k: to_json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [to_json_safe(v) for v in value]
    if isinstance(value, np.generic):
        return to_json_safe(value.item())
    return value


def user_cache_dir() -> Path:
    """``$LMKL_CACHE_DIR`` if set, else the per-user cache directory (platformdirs)."""
    root = os.environ.get("LMKL_CACHE_DIR")
    if root:
        return Path(root).expanduser()
    from platformdirs import user_cache_dir as platform_cache_dir

    return Path(platform_cache_dir("lmkl"))


def read_memo(name: str) -> dict[str, Any]:
    """The values remembered in ``<user cache>/<name>.json`` across processes ({} if none).

    A memo only saves work (a hash, a compilation guess): an unreadable or damaged file reads
    as empty and the work is redone.
    """
    try:
        value = json.loads((user_cache_dir() / f"{name}.json").read_text())
    except (OSError, ValueError):
        return {}
    return value if isinstance(value, dict) else {}


def remember(name: str, updates: dict[str, Any], keep: int = 1000) -> None:
    """Add ``updates`` to the memo ``name`` (the newest ``keep`` entries are kept).

    Written atomically; when two processes write at once the last one wins, which only costs
    the other's entries being recomputed later. Failures (read-only home) are ignored.
    """
    memo = read_memo(name)
    for key in updates:
        memo.pop(key, None)  # re-inserted last: newest at the end
    memo.update(updates)
    entries = list(memo.items())[-keep:]
    try:
        with atomic_path(user_cache_dir() / f"{name}.json") as tmp:
            tmp.write_text(json.dumps(dict(entries), indent=1) + "\n")
    except OSError:
        pass


class DirectoryLock:
    """An advisory lock on ``directory``: one lmkl process at a time fills it.

    The lock is the file ``directory/.lmkl-lock`` holding the owner's host and pid, locked with
    ``flock`` where the file system supports it (the kernel drops the lock when its process
    dies, however it dies). Where it does not (some NFS mounts), the file itself is the lock,
    created with ``O_EXCL``. Either way a lock whose process is gone is taken over: a dead pid
    on this host is stale; a lock from another host is reported with that host, since only
    that host can tell whether its process still runs.

    ``acquire()`` raises :class:`lmkl.errors.Busy` (one line naming the holder, exit code 75)
    when another live process holds the lock; ``release()`` removes the file, or with
    ``restore=True`` puts back the stale lock it took over, so that a process which was refused
    or failed leaves the directory exactly as it found it. A process that already holds a
    directory's lock cannot take it twice. Usable as a context manager::

        with DirectoryLock(cache_dir, what="reference cache") as lock:
            ...  # lock.took_over names a dead holder whose lock was taken over, if any
    """

    def __init__(self, directory: Path, what: str = "directory") -> None:
        self.directory = Path(directory)
        #: How messages name the directory ("run directory", "reference cache").
        self.what = what
        #: The holder a stale lock named when this process took it over (None: it was free).
        self.took_over: dict[str, Any] | None = None
        self._found: bytes | None = None  # the stale lock file's bytes, for release(restore=True)
        self._fd: int | None = None
        self._held = False

    @property
    def path(self) -> Path:
        return self.directory / LOCK_FILE

    @property
    def held(self) -> bool:
        return self._held

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *_exc: object) -> None:
        self.release()

    def acquire(self) -> DirectoryLock:
        """Take the lock (the directory must exist) or raise :class:`~lmkl.errors.Busy`."""
        if self._held:
            return self
        try:
            import fcntl  # noqa: F401  (POSIX only)
        except ImportError:
            self._acquire_exclusive()
            return self
        for _ in range(5):  # a holder may release (unlink) between our open and our flock
            if self._try_flock():
                return self
        raise Busy(
            f"the lock on {self.what} '{self.directory}' keeps changing hands",
            "another lmkl process is starting in it; retry once it has finished",
        )

    def _try_flock(self) -> bool:
        import fcntl

        try:
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
                created = True
            except FileExistsError:
                fd = os.open(self.path, os.O_RDWR)
                created = False
        except FileNotFoundError:
            return False  # removed between the two opens: try again
        except OSError as exc:
            raise self._unusable(exc) from exc
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _read_holder(self.path)
            os.close(fd)
            raise self._busy(holder) from None
        except OSError as exc:
            if exc.errno in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
                # A file system without flock: the file itself becomes the lock. The empty
                # file our open just created would read as a holder; remove it first (only
                # ours: an empty file someone else created may be their lock being written).
                if created and os.fstat(fd).st_size == 0:
                    self.path.unlink(missing_ok=True)
                os.close(fd)
                self._acquire_exclusive()
                return True
            os.close(fd)
            raise self._unusable(exc) from exc
        try:
            same = os.fstat(fd).st_ino == os.stat(self.path).st_ino
        except FileNotFoundError:
            same = False
        if not same:  # the holder released (and removed) it after our open: try again
            os.close(fd)
            return False
        previous = _read_holder(self.path)
        if previous and previous != _this_holder():
            self.took_over = previous  # the kernel dropped its flock: that process is gone
            self._found = self.path.read_bytes()
        self._fd = fd
        self._write_holder(fd)
        self._held = True
        return True

    def _acquire_exclusive(self) -> None:
        """The lock file itself is the lock: created with O_EXCL, stale if its pid is dead."""
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                holder = _read_holder(self.path)
                if holder is None:  # being written just now, or damaged: look once more
                    time.sleep(0.2)
                    holder = _read_holder(self.path)
                if holder is not None and _is_dead(holder):
                    self._remove_stale(holder)
                    continue
                raise self._busy(holder) from None
            except OSError as exc:
                raise self._unusable(exc) from exc
            self._write_holder(fd)
            os.close(fd)
            self._held = True
            return
        raise Busy(
            f"the lock on {self.what} '{self.directory}' keeps changing hands",
            "another lmkl process is starting in it; retry once it has finished",
        )

    def _remove_stale(self, holder: dict[str, Any]) -> None:
        # Rename first: of two processes taking over the same stale lock only one succeeds,
        # and neither removes a fresh lock the other has just created.
        aside = self.path.with_name(f"{LOCK_FILE}.{os.getpid()}.stale.tmp")
        try:
            os.rename(self.path, aside)
        except FileNotFoundError:
            return
        if _read_holder(aside) == holder:
            self._found = aside.read_bytes()
            aside.unlink(missing_ok=True)
            self.took_over = holder
        else:  # we moved a live lock that replaced the stale one just now: put it back
            os.rename(aside, self.path)

    def _write_holder(self, fd: int) -> None:
        _overwrite(fd, json.dumps(_this_holder()).encode() + b"\n")

    def release(self, restore: bool = False) -> None:
        """Give the lock up and remove its file (does nothing when not held).

        ``restore=True`` (a refused or failed process) writes back the stale lock this lock
        took over instead, leaving the directory as it was found; that holder is dead, so the
        next process takes the lock over again.
        """
        if not self._held:
            return
        self._held = False
        if _read_holder(self.path) == _this_holder():
            if restore and self._found is not None:
                if self._fd is not None:
                    _overwrite(self._fd, self._found)
                else:
                    self.path.write_bytes(self._found)
            else:
                # Removed while still locked: a waiter that opened the old file sees the inode
                # change and tries again.
                self.path.unlink(missing_ok=True)
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None

    def _busy(self, holder: dict[str, Any] | None) -> Busy:
        if holder is None:
            who = "another lmkl process"
        elif holder.get("host") == socket.gethostname():
            who = f"another lmkl process (pid {holder.get('pid')})"
        else:
            who = f"an lmkl process on host {holder.get('host')} (pid {holder.get('pid')})"
        return Busy(
            f"{self.what} '{self.directory}' is in use by {who}",
            "wait for it to finish (or stop it), then rerun; if that process is gone, delete "
            f"{self.path}",
        )

    def _unusable(self, exc: OSError) -> OutputError:
        return OutputError(
            f"cannot lock {self.what} '{self.directory}': {exc.strerror or exc}",
            "check that the directory exists and is writable",
        )


def _overwrite(fd: int, data: bytes) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, data)
    os.fsync(fd)


def _this_holder() -> dict[str, Any]:
    return {"host": socket.gethostname(), "pid": os.getpid()}


def _read_holder(path: Path) -> dict[str, Any] | None:
    """The host and pid recorded in a lock file (None: empty, unreadable or not lmkl's)."""
    try:
        value = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(value, dict) or not isinstance(value.get("pid"), int):
        return None
    return {"host": value.get("host"), "pid": value["pid"]}


def _is_dead(holder: dict[str, Any]) -> bool:
    """Whether the holder's process is known to be gone (only decidable on its own host)."""
    if holder.get("host") != socket.gethostname():
        return False
    try:
        os.kill(int(holder["pid"]), 0)
    except ProcessLookupError:
        return True
    except OSError:  # exists but belongs to someone else
        return False
    return False


def empty_directory(directory: Path, keep: tuple[str, ...] = (LOCK_FILE,)) -> None:
    """Remove everything in ``directory`` but the entries named in ``keep`` (its lock: the
    process emptying it holds it, and another must not find the directory unlocked)."""
    for entry in directory.iterdir():
        if entry.name in keep:
            continue
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink(missing_ok=True)
