"""Ctrl-C, full disks and unwritable directories: clean stops, kept parts, exact resumes."""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from runtools import (
    assert_same_run,
    compare_args,
    disk_full_at,
    interrupt_at,
    invoke,
    short_documents,
)

from lmkl.engine import rundir as store
from lmkl.engine.interrupt import GracefulStop, stop_requested
from lmkl.engine.rundir import RunDirectory, tokens_table
from lmkl.errors import EXIT_INTERRUPTED


@pytest.fixture(scope="module")
def data(tiny_pair, tmp_path_factory) -> Path:
    """Three short held-out documents (~10 parts with compare_args' options)."""
    return short_documents(tiny_pair, tmp_path_factory.mktemp("data"), 1500)


@pytest.fixture(scope="module")
def full_run(tiny_pair, data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("full") / "run"
    code, output = invoke(compare_args(tiny_pair, data, out))
    assert code == 0, output
    return out


def test_sigint_flushes_current_part_and_prints_resume(tiny_pair, data, full_run, tmp_path):
    out = tmp_path / "run"
    args = compare_args(tiny_pair, data, out)
    code, stderr = interrupt_at(args, "part-written:2")
    assert code == EXIT_INTERRUPTED, stderr
    assert "Traceback" not in stderr
    assert "stopped (SIGINT)" in stderr and f"--resume --out {out}" in stderr
    # The part being written when Ctrl-C came was finished and kept; no later part was started.
    parts = sorted(p.name for p in (out / "parts").iterdir())
    assert parts == sorted(
        f"{kind}-{i:06d}.{ext}"
        for i in range(3)
        for kind, ext in (("part", "parquet"), ("worst", "json"))
    )
    assert json.loads((out / "progress.json").read_text())["completed_parts"] == 3
    code, output = invoke([*args, "--resume"])
    assert code == 0, output
    assert_same_run(out, full_run)


def test_second_signal_stops_at_once_and_handlers_are_restored():
    before = signal.getsignal(signal.SIGINT)
    with GracefulStop() as stop:
        os.kill(os.getpid(), signal.SIGINT)
        _wait(lambda: stop.requested)
        assert stop_requested() and stop.signal_name == "SIGINT"
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)
            _wait(lambda: False)
    assert signal.getsignal(signal.SIGINT) is before
    assert not stop_requested()


def _wait(condition, seconds: float = 5.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.01)


def test_full_disk_keeps_parts_and_resume_completes(
    tiny_pair, data, full_run, tmp_path, monkeypatch
):
    out = tmp_path / "run"
    args = compare_args(tiny_pair, data, out)
    # The third part: half a file, then the disk is full.
    with disk_full_at(monkeypatch, 3, half_file=True):
        code, output = invoke(args)
    assert code == 1
    assert "Traceback" not in output
    error_lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and "No space left on device" in error_lines[0]
    assert f"--resume --out {out}" in output
    parts = out / "parts"
    assert [p.name for p in sorted(parts.glob("part-*"))] == [
        "part-000000.parquet",
        "part-000001.parquet",
    ]
    assert not [p for p in parts.iterdir() if p.name.endswith(".tmp")]  # failed write removed
    for part in parts.glob("part-*"):
        assert pq.read_table(part).num_rows > 0  # completed parts are intact

    # A resume with other options is refused, naming what changed.
    code, output = invoke([*args[:-1], "--batch-size", "3", "--quiet", "--resume"])
    assert code == 1 and "compute.batch_size" in output and "Traceback" not in output
    # So is a resume on data whose content changed since the run started.
    original = data.read_text()
    try:
        data.write_text(original.replace("e", "E", 1))
        code, output = invoke([*args, "--resume"])
        assert code == 1 and "data_fingerprint" in output, output
    finally:
        data.write_text(original)

    code, output = invoke([*args, "--resume"])
    assert code == 0, output
    assert_same_run(out, full_run)


def test_unwritable_output_fails_before_loading_and_leaves_nothing(tiny_pair, data, tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    code, output = invoke(compare_args(tiny_pair, data, blocker / "run"))
    assert code == 1 and "Traceback" not in output
    assert "cannot write to output directory" in output
    code, output = invoke(compare_args(tiny_pair, data, blocker))
    assert code == 1 and "is a file" in output


def test_failed_run_leaves_no_directory(tiny_pair, tmp_path):
    # A bad input is found before the run directory is created, so the rerun needs no flags.
    out = tmp_path / "nested" / "run"
    code, output = invoke(compare_args(tiny_pair, tmp_path / "missing.jsonl", out))
    assert code == 1 and "does not exist" in output
    assert not out.exists() and not out.parent.exists()


def test_resume_needs_out_and_excludes_overwrite(tiny_pair, data, tmp_path):
    args = compare_args(tiny_pair, data, tmp_path / "run")
    code, output = invoke([*args, "--resume", "--overwrite"])
    assert code == 2 and "contradict" in output
    without_out = [a for a in args if a not in ("--out", str(tmp_path / "run"))]
    code, output = invoke([*without_out, "--resume"])
    assert code == 2 and "--out" in output
    code, output = invoke([*args, "--resume"])
    assert code == 1 and "no started run" in output


def _table(n: int) -> pa.Table:
    columns = {field.name: [0] * n for field in store.TOKEN_SCHEMA}
    columns["candidate"] = ["c"] * n
    columns["nonfinite"] = [False] * n
    return tokens_table(columns)


def test_clean_incomplete_removes_only_leftovers(tmp_path):
    run = RunDirectory.create(tmp_path / "run")
    run.write_config({"a": 1})
    run.write_progress({"x": 1})
    run.write_part(0, _table(3), sidecar={"c": []})
    (run.parts_dir / ".part-000001.parquet.abc.tmp").write_bytes(b"PAR1")
    (run.parts_dir / "worst-000001.json").write_text("{}")
    (run.path / ".tokens.parquet.xyz.tmp").write_bytes(b"")
    removed = run.clean_incomplete()
    assert removed == [
        ".part-000001.parquet.abc.tmp",
        ".tokens.parquet.xyz.tmp",
        "worst-000001.json",
    ]
    assert run.completed_indices() == [0] and run.part_rows(0) == 3
    assert run.sidecar_path(0).exists()
    assert run.read_progress() == {"identity": {"x": 1}, "completed_parts": 1}
    # A damaged part is reported as unreadable (the runner recomputes it).
    run.part_path(1).write_bytes(b"garbage")
    assert run.part_rows(1) is None


def test_directory_with_only_temporary_files_counts_as_empty(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    (out / ".config.yaml.123.tmp").write_text("partial")
    RunDirectory.check_new(out)  # no error: nothing of a run is there
    (out / "notes.txt").write_text("mine")
    with pytest.raises(store.OutputError, match="not an lmkl run"):
        RunDirectory.check_new(out, overwrite=True)
