"""Helpers for tests that drive `lmkl compare` in-process (CliRunner) or as a subprocess.

Subprocesses can be frozen at a precise point of a write with the test-only hook
``LMKL_TEST_HOLD`` (see lmkl/store.py): the process prints a marker and waits there, so a test
can kill or interrupt it at that point without relying on timing.
"""

from __future__ import annotations

import json
import os
import selectors
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from lmkl.cli import app

ROOT = Path(__file__).resolve().parents[1]
#: Fields that legitimately differ between two runs of the same comparison.
VOLATILE = ("provenance", "throughput")


def compare_args(tiny_pair: dict[str, Path], data: Path, out: Path) -> list[str]:
    """Options giving ~10 small parts on the test data, so there are parts before and after."""
    return [
        "compare",
        str(tiny_pair["reference"]),
        str(tiny_pair["candidate"]),
        "--data",
        str(data),
        "--out",
        str(out),
        "--context-length",
        "64",
        "--stride",
        "32",
        "--batch-size",
        "2",
        "--quiet",
    ]


@contextmanager
def disk_full_at(monkeypatch: pytest.MonkeyPatch, write: int, half_file: bool = False):
    """Part files write as usual but the ``write``-th, which fails as on a full disk (after
    leaving half a file when ``half_file``): the run stops with its earlier parts kept."""
    import errno

    from lmkl.engine import rundir

    real_write = pq.write_table
    calls = []

    def write_until_full(table, where, *a, **k):
        calls.append(where)
        if len(calls) == write:
            if half_file:
                Path(where).write_bytes(b"PAR1" + b"\0" * 100)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(table, where, *a, **k)

    with monkeypatch.context() as patch:
        patch.setattr(rundir.pq, "write_table", write_until_full)
        yield


def invoke(args: list[str]) -> tuple[int, str]:
    result = CliRunner().invoke(app, args)
    return result.exit_code, result.output


def check_error(code: int, output: str, expected: int | tuple[int, ...], *fragments: str) -> str:
    """Exactly one ``error:`` line (plus ``fix:``), no traceback, no internal error, the
    documented exit code (or one of several); returns the error line."""
    expected = (expected,) if isinstance(expected, int) else expected
    assert code in expected, f"exit code {code}, expected {expected}:\n{output}"
    assert "Traceback" not in output, output
    assert "internal error" not in output, output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert any(line.startswith("fix:") for line in output.splitlines()), output
    for fragment in fragments:
        assert fragment in errors[0], errors[0]
    return errors[0]


def spawn(args: list[str], hold: str) -> subprocess.Popen[str]:
    env = dict(
        os.environ,
        LMKL_TEST_HOLD=hold,
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    return subprocess.Popen(
        [sys.executable, "-m", "lmkl", *args],
        cwd=ROOT,
        env=env,
        text=True,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


def wait_for_hold(proc: subprocess.Popen[str], hold: str, timeout: float = 300) -> None:
    """Block until the process reports it is held at ``hold``; fail if it exits first."""
    assert proc.stderr is not None
    selector = selectors.DefaultSelector()
    selector.register(proc.stderr, selectors.EVENT_READ)
    seen: list[str] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not selector.select(timeout=1):
            continue
        line = proc.stderr.readline()
        if not line:
            proc.wait()
            out = proc.stdout.read() if proc.stdout else ""
            pytest.fail(f"lmkl exited ({proc.returncode}) before {hold}: {''.join(seen)}{out}")
        seen.append(line)
        if line.strip() == f"lmkl-test-hold {hold}":
            return
    proc.kill()
    pytest.fail(f"lmkl did not reach {hold} in {timeout} s: {''.join(seen)}")


def kill_at(args: list[str], hold: str) -> None:
    proc = spawn(args, hold)
    try:
        wait_for_hold(proc, hold)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=60)
        assert proc.returncode == -signal.SIGKILL
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def assert_same_run(got: Path, want: Path) -> None:
    """Same per-token rows in the same order, same statistics (timing/provenance aside)."""
    a, b = pq.read_table(got / "tokens.parquet"), pq.read_table(want / "tokens.parquet")
    assert a.schema == b.schema
    assert a.num_rows == b.num_rows
    keys = list(zip(*(a[c].to_pylist() for c in ("candidate", "doc_id", "position")), strict=True))
    assert len(set(keys)) == len(keys), "duplicate rows"
    assert a.equals(b)
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (got, want))
    for key in VOLATILE:
        ra.pop(key), rb.pop(key)
    assert ra == rb
    assert json.loads((got / "worst.json").read_text()) == json.loads(
        (want / "worst.json").read_text()
    )
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())


def short_documents(tiny_pair: dict[str, Path], directory: Path, chars: int) -> Path:
    """The first three held-out documents, each cut to ``chars`` characters, as JSONL."""
    lines = tiny_pair["heldout"].read_text().splitlines()[:3]
    path = directory / "small.jsonl"
    path.write_text(
        "".join(json.dumps({"text": json.loads(x)["text"][:chars]}) + "\n" for x in lines)
    )
    return path


def interrupt_at(args: list[str], hold: str) -> tuple[int, str]:
    """Run ``lmkl ARGS`` until ``hold``, press Ctrl-C there; its exit code and stderr."""
    proc = spawn(args, hold)
    try:
        wait_for_hold(proc, hold)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return proc.returncode, stderr


@contextmanager
def lock_held_elsewhere(directory: Path) -> Iterator[None]:
    """``directory``'s lmkl lock held by another live process for the ``with`` block."""
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import time; from pathlib import Path; from lmkl.files import DirectoryLock; "
            f"DirectoryLock(Path({str(directory)!r})).acquire(); print('held', flush=True); "
            "time.sleep(120)",
        ],
        stdout=subprocess.PIPE,
        text=True,
        env=os.environ | {"PYTHONPATH": str(ROOT)},
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        yield
    finally:
        holder.kill()
        holder.wait()


def fake_demo_cache(tiny_pair: dict[str, Path]) -> Path:
    """Put the tiny pair where ``lmkl demo`` looks for its cached build (unless a real build is
    there): the demo command then runs in seconds instead of training for minutes."""
    from dataclasses import asdict

    from lmkl.demo.assets import DEMO_VERSION, DemoSettings
    from lmkl.demo.names import demo_cache_dir

    settings = DemoSettings()
    root = demo_cache_dir() / f"demo-v{DEMO_VERSION}-{settings.key()}"
    if not root.exists():
        shutil.copytree(tiny_pair["reference"], root / "reference")
        shutil.copytree(tiny_pair["candidate"], root / "candidate")
        lines = tiny_pair["heldout"].read_text().splitlines()[:3]
        (root / "heldout.jsonl").write_text(
            "".join(json.dumps({"text": json.loads(x)["text"][:500]}) + "\n" for x in lines)
        )
        (root / "manifest.json").write_text(
            json.dumps(
                {"demo_version": DEMO_VERSION, "settings": json.loads(json.dumps(asdict(settings)))}
            )
        )
    return root
