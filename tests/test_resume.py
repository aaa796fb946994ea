"""Kill `lmkl compare` with SIGKILL at precise points, resume it, and get the uninterrupted result.

The points are reached through the test-only hook ``LMKL_TEST_HOLD`` (see lmkl/store.py): the
process prints a marker and waits there, and the test kills it. No timing is involved.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from runtools import (
    ROOT,
    assert_same_run,
    check_error,
    compare_args,
    invoke,
    kill_at,
    wait_for_hold,
)

from lmkl.engine import rundir
from lmkl.engine.rundir import RunDirectory, load_results
from lmkl.errors import OutputError


def test_sigkill_at_several_points_then_resume_equals_uninterrupted_run(
    tiny_pair, small_jsonl, tmp_path
):
    full, killed = tmp_path / "full", tmp_path / "killed"
    code, output = invoke(compare_args(tiny_pair, small_jsonl, full))
    assert code == 0, output
    n_parts = json.loads((full / "results.json").read_text())["provenance"]["resumed_parts"]
    assert n_parts == 0
    parts = killed / "parts"

    # 1. Killed while part 1 is being written: its temporary file and worst file exist.
    args = compare_args(tiny_pair, small_jsonl, killed)
    kill_at(args, "part-written:1")
    assert (parts / "part-000000.parquet").exists()
    assert not (parts / "part-000001.parquet").exists()
    assert (parts / "worst-000001.json").exists()  # a worst file without its part
    assert [p for p in parts.iterdir() if p.name.startswith(".part-000001")]  # orphan temp file
    assert not (killed / "results.json").exists()

    # A plain rerun refuses to touch the interrupted run.
    code, output = invoke(args)
    assert code == 1 and "--resume" in output

    # 2. Resumed, then killed after part 4 is in place but before progress.json records it.
    kill_at([*args, "--resume"], "part-done:4")
    assert not [p for p in parts.iterdir() if p.name.endswith(".tmp")]  # cleaned on resume
    assert (parts / "part-000004.parquet").exists()
    assert json.loads((killed / "progress.json").read_text())["completed_parts"] == 4

    # 3. Resumed, then killed during finalisation: tokens.parquet exists, results.json not yet.
    kill_at([*args, "--resume"], "finalize:0")
    assert (killed / "tokens.parquet").exists() and not (killed / "results.json").exists()

    # 4. Resumed to the end.
    code, output = invoke([*args, "--resume"])
    assert code == 0, output
    assert_same_run(killed, full)
    resumed = json.loads((killed / "results.json").read_text())["provenance"]["resumed_parts"]
    windows = len(pq.read_table(full / "tokens.parquet").column("window_id").unique())
    assert resumed == -(-windows // 2)  # every part was complete before the last resume
    assert not parts.exists() and not (killed / "progress.json").exists()

    # A finished run cannot be resumed again.
    code, output = invoke([*args, "--resume"])
    assert code == 1 and "already complete" in output


def test_progress_read_retries_and_never_passes_an_error_for_no_progress(tmp_path, monkeypatch):
    """A transient read error (an NFS hiccup) is retried; a persistent one is a one-line error,
    never an empty progress (which would drop the run identity and the run's resumability)."""
    run = RunDirectory.create(tmp_path / "run")
    run.write_progress({"x": 1})
    real_read = Path.read_text
    failures = {"left": 1}

    def flaky(self, *args, **kwargs):
        if self.name == "progress.json" and failures["left"] > 0:
            failures["left"] -= 1
            raise OSError(errno.EIO, "Input/output error")
        return real_read(self, *args, **kwargs)

    monkeypatch.setattr(rundir, "_READ_RETRIES", (0.0, 0.0, 0.0), raising=False)
    monkeypatch.setattr(Path, "read_text", flaky)
    assert RunDirectory(run.path).read_progress()["identity"] == {"x": 1}
    failures["left"] = 100
    with pytest.raises(OutputError, match="Input/output error") as caught:
        RunDirectory(run.path).read_progress()
    assert "--resume" in caught.value.hint
    # A later update of a run that knows its identity never reads the file back.
    run.write_part(0, _table(), sidecar={"c": []})
    failures["left"] = 0
    assert RunDirectory(run.path).read_progress() == {"identity": {"x": 1}, "completed_parts": 1}


def _table():
    columns = {field.name: [0] for field in rundir.TOKEN_SCHEMA}
    columns["candidate"], columns["nonfinite"] = ["c"], [False]
    return rundir.tokens_table(columns)


def test_readers_refuse_a_newer_or_unknown_schema(tiny_pair, small_jsonl, tmp_path):
    """results.json, progress.json and the run marker are read only in a schema this lmkl
    knows; a newer one is refused in one line that says to upgrade."""
    out = tmp_path / "run"
    args = compare_args(tiny_pair, small_jsonl, out)
    code, output = invoke(args)
    assert code == 0, output
    results_path = out / "results.json"
    results = json.loads(results_path.read_text())
    results_path.write_text(json.dumps(results | {"schema_version": 99}))
    with pytest.raises(OutputError, match="newer than this lmkl reads") as caught:
        load_results(out)
    assert "upgrade lmkl" in caught.value.hint
    code, output = invoke(["report", str(out), "--out", str(tmp_path / "r.html")])
    check_error(code, output, 1, "schema version 99")
    results.pop("schema_version")
    results_path.write_text(json.dumps(results))
    with pytest.raises(OutputError, match="unknown schema version"):
        load_results(out)
    for damaged in ([1], {"v": 1}, "1", True):  # one line, never a TypeError (unhashable)
        results_path.write_text(json.dumps(results | {"schema_version": damaged}))
        with pytest.raises(OutputError, match="unknown schema version"):
            load_results(out)

    run = RunDirectory(tmp_path / "other")
    run.path.mkdir()
    (run.path / "progress.json").write_text(json.dumps({"schema_version": 3, "identity": {}}))
    with pytest.raises(OutputError, match="schema version 3"):
        run.read_progress()
    # A run directory written by a newer lmkl is not resumed.
    killed = tmp_path / "killed"
    kill_args = compare_args(tiny_pair, small_jsonl, killed)
    kill_at(kill_args, "part-done:1")
    marker = json.loads((killed / rundir.MARKER).read_text())
    (killed / rundir.MARKER).write_text(json.dumps(marker | {"schema_version": 7}))
    code, output = invoke([*kill_args, "--resume"])
    check_error(code, output, 1, "schema version 7")


def test_resume_after_a_code_change_is_refused(tiny_pair, small_jsonl, tmp_path):
    """The run identity pins lmkl's code, not only its version string (which does not change
    with every commit): a resume with edited scoring code refuses in one line saying so."""
    copy = tmp_path / "src"
    shutil.copytree(ROOT / "lmkl", copy / "lmkl", ignore=shutil.ignore_patterns("__pycache__"))
    env = dict(os.environ, PYTHONPATH=str(copy))
    out = tmp_path / "run"
    args = [sys.executable, "-m", "lmkl", *compare_args(tiny_pair, small_jsonl, out)]
    proc = subprocess.Popen(
        args,
        cwd=copy,
        env=env | {"LMKL_TEST_HOLD": "part-done:1"},
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_for_hold(proc, "part-done:1")
        proc.kill()
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    divergence = copy / "lmkl" / "scoring" / "divergence.py"
    divergence.write_text(divergence.read_text() + "\n# a change to the scoring code\n")
    resumed = subprocess.run(
        [*args, "--resume"], cwd=copy, env=env, text=True, capture_output=True, timeout=300
    )
    check_error(resumed.returncode, resumed.stderr, 1, "lmkl's code changed")
    assert (out / "parts" / "part-000001.parquet").exists()  # nothing computed is lost
