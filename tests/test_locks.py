"""One process per run directory: a second is refused up front, a dead one's lock is taken over."""

from __future__ import annotations

import errno
import json
import signal
import socket
import subprocess
import sys

import pytest
from runtools import (
    assert_same_run,
    check_error,
    compare_args,
    invoke,
    kill_at,
    spawn,
    wait_for_hold,
)

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
    assert not (tmp_path / LOCK_FILE).exists()
    # A process that was refused or failed leaves the directory as it found it.
    (tmp_path / LOCK_FILE).write_text(json.dumps(dead))
    before = (tmp_path / LOCK_FILE).read_bytes()
    lock = DirectoryLock(tmp_path).acquire()
    lock.release(restore=True)
    assert (tmp_path / LOCK_FILE).read_bytes() == before


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


def test_second_resume_of_one_run_is_refused_up_front(tiny_pair, small_jsonl, tmp_path):
    """Two `--resume` of the same killed run started together (a scheduler restarting a job
    whose first copy still runs): the second is refused in one line, exit code 75, before it
    computes anything; the first copy's work is not disturbed."""
    full, out = tmp_path / "full", tmp_path / "run"
    code, output = invoke(compare_args(tiny_pair, small_jsonl, full))
    assert code == 0, output
    args = compare_args(tiny_pair, small_jsonl, out)
    kill_at(args, "part-done:1")
    first = spawn([*args, "--resume"], "part-written:3")
    try:
        wait_for_hold(first, "part-written:3")
        code, output = invoke([*args, "--resume"])
        check_error(code, output, EXIT_BUSY, "in use by another lmkl process", str(first.pid))
        # --overwrite would delete the running copy's parts: refused the same way.
        code, output = invoke([*args, "--overwrite"])
        check_error(code, output, EXIT_BUSY, "in use by")
        assert (out / "parts" / "part-000001.parquet").exists()
        first.send_signal(signal.SIGKILL)  # the first copy dies holding the lock
        first.wait(timeout=60)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert (out / LOCK_FILE).exists()  # left behind by the killed process: stale
    code, output = invoke([*args, "--resume"])
    assert code == 0, output
    assert_same_run(out, full)  # no lock file left either
