"""Two processes (torchrun, gloo on CPU) write the same run directory as one process."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import pytest
from runtools import short_documents, wait_for_hold

from lmkl.engine.distributed import Shard
from lmkl.engine.loop import Part, Plan, _score_parts, gather_parts
from lmkl.engine.rundir import TOKEN_SCHEMA, RunDirectory, tokens_table
from lmkl.files import LOCK_FILE
from lmkl.scoring.divergence import TOKEN_METRIC_NAMES

ROOT = Path(__file__).resolve().parents[1]


def lmkl_compare(
    tiny_pair,
    data: Path,
    out: Path,
    processes: int,
    hold: str | None = None,
    wait: bool = True,
    extra: list[str] | None = None,
) -> Any:
    """Run `lmkl compare` with 1 or K processes (``wait=False``: the started launcher)."""
    env = os.environ | {
        "PYTHONPATH": str(ROOT),
        # One thread per process in both runs: float summation order then matches exactly.
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_DATASETS_OFFLINE": "1",
    }
    env.pop("WORLD_SIZE", None)
    args = [
        "compare",
        str(tiny_pair["reference"]),
        str(tiny_pair["candidate"]),
        "--data",
        str(data),
        "-c",
        "48",
        "--stride",
        "24",
        "--max-batch-tokens",
        "100",
        "--chunk-tokens",
        "40",
        "--no-compile",
        "--out",
        str(out),
        "-q",
        *(extra or []),
    ]
    if hold is not None:
        env["LMKL_TEST_HOLD"] = hold
    if processes == 1:
        command = [sys.executable, "-m", "lmkl", *args]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            "-m",
            "lmkl",
            *args,
        ]
    if not wait:
        return subprocess.Popen(
            command,
            env=env,
            text=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd=str(out.parent),
        )
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, cwd=str(out.parent)
    )


@pytest.fixture(scope="module")
def data(tiny_pair, tmp_path_factory) -> Path:
    """The first three held-out documents, cut short (as conftest's small_jsonl, shared here)."""
    return short_documents(tiny_pair, tmp_path_factory.mktemp("data"), 1500)


@pytest.fixture(scope="module")
def one_process(tiny_pair, data, tmp_path_factory) -> Path:
    """The run directory of the comparison made by one process (what K processes must equal)."""
    out = tmp_path_factory.mktemp("one-process") / "one"
    one = lmkl_compare(tiny_pair, data, out, 1)
    assert one.returncode == 0, one.stderr[-2000:]
    return out


def test_two_processes_equal_one(tiny_pair, data, one_process, tmp_path):
    two = lmkl_compare(tiny_pair, data, tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-2000:]
    # Only rank 0 reports.
    assert two.stdout.strip().splitlines() == [str(tmp_path / "two")]

    a = pq.read_table(one_process / "tokens.parquet")
    b = pq.read_table(tmp_path / "two" / "tokens.parquet")
    assert a.num_rows > 100
    assert a.equals(b)  # same rows, same order, same values
    ra = json.loads((one_process / "results.json").read_text())
    rb = json.loads((tmp_path / "two" / "results.json").read_text())
    assert ra["candidates"] == rb["candidates"]
    assert rb["throughput"]["processes"] == 2 and ra["throughput"]["processes"] == 1
    assert ra["throughput"]["padding_efficiency"] == rb["throughput"]["padding_efficiency"]
    wa = json.loads((one_process / "worst.json").read_text())
    wb = json.loads((tmp_path / "two" / "worst.json").read_text())
    assert wa == wb and wa
    assert not (tmp_path / "two" / "parts").exists()


class _RankOneOfTwo(Shard):
    """Rank 1 of 2 without a process group: collectives answer as rank 0 would."""

    def __init__(self, present_on_main: list[int]) -> None:
        super().__init__(rank=1, world_size=2)
        self.present_on_main = present_on_main
        self.sent: Any = None

    def barrier(self) -> None:
        pass

    def broadcast(self, obj: Any) -> Any:
        return self.present_on_main

    def gather(self, obj: Any) -> list[Any] | None:
        self.sent = obj
        return None


def test_a_rank_sends_only_the_parts_it_wrote_in_this_run(tmp_path):
    """A stale part left in a rank's own directory (no shared filesystem, an earlier attempt)
    is never merged: rank 0 decides what is done, and ranks send only what they wrote now."""
    run_dir = RunDirectory(tmp_path / "rank1")
    table = tokens_table(
        {
            "candidate": ["c"],
            "doc_id": [0],
            "window_id": [0],
            "position": [1],
            "window_pos": [1],
            "token_id": [5],
            "bytes": [1],
            "nonfinite": [False],
            **{name: [0.5] for name in TOKEN_METRIC_NAMES},
        }
    )
    for index in (1, 3, 5):
        run_dir.write_part(index, table, sidecar={"worst": {}})
    shard = _RankOneOfTwo(present_on_main=[0, 2])
    gather_parts(shard, run_dir, written=[3, 5], counters={"seconds": 1.0})
    payload, counters = shard.sent
    assert sorted(payload) == [3, 5], "part 1 is stale: it was not written in this run"
    assert counters == {"seconds": 1.0}
    assert payload[3][0] == run_dir.part_path(3).read_bytes()
    # A part rank 0 already has is not sent again.
    shard = _RankOneOfTwo(present_on_main=[0, 2, 3])
    gather_parts(shard, run_dir, written=[3, 5], counters={})
    assert sorted(shard.sent[0]) == [5]


def lmkl_run(config: Path, out: Path, processes: int) -> subprocess.CompletedProcess:
    """``lmkl run CONFIG --out OUT -q`` in one process or under torchrun."""
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    env.pop("WORLD_SIZE", None)
    launcher = [sys.executable, "-m", "lmkl"]
    if processes > 1:
        launcher = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            "-m",
            "lmkl",
        ]
    return subprocess.run(
        [*launcher, "run", str(config), "--out", str(out), "-q"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        cwd=str(out.parent),
    )


def test_two_processes_run_an_experiment_as_one(tiny_pair, tmp_path):
    """Each dataset's batches are shared over the ranks; rank 0 alone writes the directory."""
    texts = [json.loads(x)["text"] for x in tiny_pair["heldout"].read_text().splitlines()]
    for name, chunk in (("a", texts[:3]), ("b", texts[3:5])):
        (tmp_path / f"{name}.jsonl").write_text(
            "".join(json.dumps({"text": t[:400]}) + "\n" for t in chunk)
        )
    config = tmp_path / "study.yaml"
    config.write_text(f"""
name: two-ranks
reference: {{model: {tiny_pair["reference"]}, device: cpu}}
candidates:
  - {{label: small, model: {tiny_pair["candidate"]}, device: cpu}}
  - {{label: bf16, model: {tiny_pair["reference"]}, dtype: bfloat16, device: cpu}}
datasets:
  - {{source: {tmp_path / "a.jsonl"}, label: a}}
  - {{source: {tmp_path / "b.jsonl"}, label: b}}
windowing: {{mode: documents, context_length: 48, stride: 24}}
compute: {{batch_size: 2, compile: false}}
ranking: {{resamples: 200}}
""")
    one = lmkl_run(config, tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr[-2000:]
    two = lmkl_run(config, tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-2000:]
    assert two.stdout.strip().splitlines() == [str(tmp_path / "two")]  # only rank 0 reports

    ra = json.loads((tmp_path / "one" / "results.json").read_text())
    rb = json.loads((tmp_path / "two" / "results.json").read_text())
    for key in ("provenance", "throughput"):
        ra.pop(key), rb.pop(key)
    assert ra == rb
    for name in ("a", "b"):
        sub_a, sub_b = (tmp_path / run / "datasets" / name for run in ("one", "two"))
        a, b = pq.read_table(sub_a / "tokens.parquet"), pq.read_table(sub_b / "tokens.parquet")
        assert a.num_rows > 50 and a.equals(b)
        sa = json.loads((sub_b / "results.json").read_text())
        assert sa["throughput"]["processes"] == 2  # the dataset really was shared
        assert not (sub_b / "parts").exists()


def _child_with_rank(parent: int, rank: int, timeout: float = 120) -> int:
    """The pid of the launcher's worker process whose environment has ``RANK=rank``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
                environ = (entry / "environ").read_bytes().split(b"\0")
            except OSError:
                continue
            ppid = int(stat.rpartition(")")[2].split()[1])
            if ppid == parent and f"RANK={rank}".encode() in environ:
                return int(entry.name)
        time.sleep(0.2)
    raise AssertionError(f"no worker with RANK={rank} under {parent}")


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="needs Linux /proc")
def test_ctrl_c_on_rank_0_stops_every_rank_and_the_run_resumes(
    tiny_pair, data, one_process, tmp_path
):
    """A graceful stop on one rank reaches every rank: rank 0 is held writing part 2 (rank 1
    has no part 2) and only rank 0 gets SIGINT; both stop after their current part, say so in
    one line, and nothing blocks. A one-process resume then equals an uninterrupted run."""
    out = tmp_path / "two"
    launcher = lmkl_compare(tiny_pair, data, out, 2, hold="part-written:2", wait=False)
    try:
        wait_for_hold(launcher, "part-written:2")
        os.kill(_child_with_rank(launcher.pid, 0), signal.SIGINT)
        _, stderr = launcher.communicate(timeout=120)
    finally:
        if launcher.poll() is None:
            launcher.kill()
            launcher.wait()
    assert "internal error" not in stderr, stderr[-3000:]
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 2, stderr[-3000:]  # one line per rank
    assert any("stopped (SIGINT)" in line for line in errors), errors
    assert any("stopped (requested on another rank)" in line for line in errors), errors
    assert not (out / "results.json").exists()
    assert (out / "parts" / "part-000002.parquet").exists()  # the held part was finished
    assert not (out / LOCK_FILE).exists()  # rank 0 released the lock

    resumed = lmkl_compare(tiny_pair, data, out, 1, extra=["--resume"])
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a = pq.read_table(one_process / "tokens.parquet")
    assert a.equals(pq.read_table(out / "tokens.parquet"))


class _FakeKind:
    """Scores a one-row part per index (what the loop needs of a run kind, nothing more)."""

    kind, token_level = "fake", True

    def ready(self, index: int) -> None:
        pass

    def score(self, index: int) -> Part:
        return Part(table=_one_row_table(), sidecar={"worst": {}})


def _one_row_table():
    return tokens_table(
        {
            "candidate": ["c"],
            "doc_id": [0],
            "window_id": [0],
            "position": [1],
            "window_pos": [1],
            "token_id": [5],
            "bytes": [1],
            "nonfinite": [False],
            **{name: [0.5] for name in TOKEN_METRIC_NAMES},
        }
    )


def test_only_rank_0_writes_progress(tmp_path):
    """Ranks never rewrite progress.json concurrently: rank 1 writes its parts, not progress
    (which it would read back and could lose the run identity from on a hiccup)."""
    plan = Plan(part_rows=[1] * 6, identity={"x": 1}, schema=TOKEN_SCHEMA)
    run_dir = RunDirectory(tmp_path / "run")
    run_dir.parts_dir.mkdir(parents=True)
    run_dir.records_progress = False  # as execute() sets it on every rank but 0
    shard = _RankOneOfTwo(present_on_main=[])
    shard.highest = lambda flag: flag  # type: ignore[method-assign]
    result = _score_parts(_FakeKind(), shard, run_dir, plan, set(), None, lambda _m: None)
    assert result[1] == [1, 3, 5]
    assert run_dir.completed_indices() == [1, 3, 5]
    assert not (run_dir.path / "progress.json").exists()
