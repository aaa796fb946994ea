"""Two processes (torchrun, gloo on CPU) write the same run directory as one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]


def lmkl_compare(tiny_pair, data: Path, out: Path, processes: int) -> subprocess.CompletedProcess:
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
    ]
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
    return subprocess.run(
        command, env=env, capture_output=True, text=True, timeout=300, cwd=str(out.parent)
    )


def test_two_processes_equal_one(tiny_pair, small_jsonl, tmp_path):
    one = lmkl_compare(tiny_pair, small_jsonl, tmp_path / "one", 1)
    assert one.returncode == 0, one.stderr[-2000:]
    two = lmkl_compare(tiny_pair, small_jsonl, tmp_path / "two", 2)
    assert two.returncode == 0, two.stderr[-2000:]
    # Only rank 0 reports.
    assert two.stdout.strip().splitlines() == [str(tmp_path / "two")]

    a = pq.read_table(tmp_path / "one" / "tokens.parquet")
    b = pq.read_table(tmp_path / "two" / "tokens.parquet")
    assert a.num_rows > 100
    assert a.equals(b)  # same rows, same order, same values
    ra = json.loads((tmp_path / "one" / "results.json").read_text())
    rb = json.loads((tmp_path / "two" / "results.json").read_text())
    assert ra["candidates"] == rb["candidates"]
    assert rb["throughput"]["processes"] == 2 and ra["throughput"]["processes"] == 1
    assert ra["throughput"]["padding_efficiency"] == rb["throughput"]["padding_efficiency"]
    wa = json.loads((tmp_path / "one" / "worst.json").read_text())
    wb = json.loads((tmp_path / "two" / "worst.json").read_text())
    assert wa == wb and wa
    assert not (tmp_path / "two" / "parts").exists()
