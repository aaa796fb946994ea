"""Kill `lmkl compare` with SIGKILL at precise points, resume it, and get the uninterrupted result.

The points are reached through the test-only hook ``LMKL_TEST_HOLD`` (see lmkl/store.py): the
process prints a marker and waits there, and the test kills it. No timing is involved.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import pyarrow.parquet as pq
from runtools import (
    ROOT,
    assert_same_run,
    check_error,
    compare_args,
    invoke,
    kill_at,
    wait_for_hold,
)


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
