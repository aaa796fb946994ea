"""One process per run directory: a second is refused up front, a dead one's lock is taken over."""

from __future__ import annotations

import errno
import json
import socket
import subprocess
import sys

import pytest

from lmkl.errors import EXIT_BUSY, Busy
from lmkl.files import LOCK_FILE, DirectoryLock


def _dead_pid() -> int:
    """The pid of a process that has exited (and been reaped)."""
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_second_holder_is_refused_naming_the_first(tmp_path):
    with DirectoryLock(tmp_path, "run directory") as first:
        assert first.held and (tmp_path / LOCK_FILE).is_file()
        holder = json.loads((tmp_path / LOCK_FILE).read_text())
        assert holder["host"] == socket.gethostname()
        with pytest.raises(Busy) as caught:
            DirectoryLock(tmp_path, "run directory").acquire()
        assert caught.value.exit_code == EXIT_BUSY == 75
        assert f"in use by another lmkl process (pid {holder['pid']})" in caught.value.message
        assert str(tmp_path / LOCK_FILE) in caught.value.hint
    assert not (tmp_path / LOCK_FILE).exists()  # released: removed
    with DirectoryLock(tmp_path):  # and free again
        pass


def test_lock_held_on_another_host_names_that_host(tmp_path):
    with DirectoryLock(tmp_path):
        (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "gpu-node-7", "pid": 4242}))
        with pytest.raises(Busy, match="on host gpu-node-7 \\(pid 4242\\)"):
            DirectoryLock(tmp_path).acquire()


def test_stale_lock_of_a_dead_process_is_taken_over(tmp_path):
    dead = {"host": socket.gethostname(), "pid": _dead_pid()}
    (tmp_path / LOCK_FILE).write_text(json.dumps(dead))
    with DirectoryLock(tmp_path) as lock:
        assert lock.took_over == dead
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] != dead["pid"]


def test_without_flock_the_file_itself_is_the_lock(tmp_path, monkeypatch):
    """File systems without flock (some NFS mounts): O_EXCL, stale pids on this host taken
    over, other hosts' locks reported."""
    import fcntl

    def no_flock(fd, op):
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", no_flock)
    with DirectoryLock(tmp_path) as first:
        assert first.held
        with pytest.raises(Busy, match="pid"):
            DirectoryLock(tmp_path).acquire()
    assert not (tmp_path / LOCK_FILE).exists()
    dead = {"host": socket.gethostname(), "pid": _dead_pid()}
    (tmp_path / LOCK_FILE).write_text(json.dumps(dead))
    with DirectoryLock(tmp_path) as lock:
        assert lock.took_over == dead
    (tmp_path / LOCK_FILE).write_text(json.dumps({"host": "gpu-node-7", "pid": 1}))
    with pytest.raises(Busy, match="on host gpu-node-7"):
        DirectoryLock(tmp_path).acquire()
