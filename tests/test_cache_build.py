"""`lmkl cache` runs on the engine: killed or stopped half-way it resumes to the same cache,
leaves nothing beside it, and two processes build the cache one process builds.

The uninterrupted build is the reference every time: the resumed (or two-process) cache must hold
the same files, byte for byte where they are raw arrays, and comparisons against it must equal
the comparisons against the uninterrupted cache per token (NumPy equality).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from runtools import (
    check_error,
    interrupt_at,
    invoke,
    kill_at,
    lock_held_elsewhere,
    short_documents,
)

from lmkl.errors import EXIT_INTERRUPTED
from lmkl.refcache.format import MANIFEST, open_cache

ROOT = Path(__file__).resolve().parents[1]
#: Manifest fields that record when and how fast a build ran, not what it holds.
VOLATILE_MANIFEST = ("created", "seconds", "versions")


@pytest.fixture(scope="module")
def data(tiny_pair, tmp_path_factory) -> Path:
    """Three short held-out documents: five parts with the options of :func:`cache_args`."""
    return short_documents(tiny_pair, tmp_path_factory.mktemp("data"), 600)


def cache_args(tiny_pair, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "cache",
        str(tiny_pair["reference"]),
        "--data",
        str(data),
        "-c",
        "64",
        "--stride",
        "32",
        "--batch-size",
        "2",
        "--quiet",
        "--out",
        str(out),
        *extra,
    ]


@pytest.fixture(scope="module")
def full(tiny_pair, data, tmp_path_factory) -> dict[str, Path]:
    """Uninterrupted exact and top-8 caches, each alone in its folder."""
    import huggingface_hub.constants

    root = tmp_path_factory.mktemp("full")
    caches = {}
    # Offline as in every test (conftest's autouse fixture runs only after module fixtures):
    # transformers records it in the saved tokenizer_config.json.
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
        for mode, extra in (("exact", ()), ("topk", ("--top-k", "8"))):
            out = root / mode / "cache"
            code, output = invoke(cache_args(tiny_pair, data, out, *extra))
            assert code == 0, output
            caches[mode] = out
    return caches


def _columns(path: Path) -> dict[str, np.ndarray]:
    table = pq.read_table(path)
    return {name: table[name].to_numpy(zero_copy_only=False) for name in table.column_names}


def assert_same_table(got: Path, want: Path) -> None:
    """Same columns, same rows in the same order, equal values (NaN equal to NaN)."""
    a, b = _columns(got), _columns(want)
    assert list(a) == list(b), got.name
    assert len(next(iter(b.values()))) > 0, got.name
    for name in b:
        if a[name].dtype.kind == "f":
            assert np.array_equal(a[name], b[name], equal_nan=True), (got.name, name)
        elif a[name].dtype == object:  # list columns (windows.parquet)
            assert [list(x) if x is not None else None for x in a[name]] == [
                list(x) if x is not None else None for x in b[name]
            ], (got.name, name)
        else:
            assert np.array_equal(a[name], b[name]), (got.name, name)


def _files(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*") if p.is_file())


def assert_same_cache(got: Path, want: Path) -> None:
    """Every file of the cache equal: raw arrays byte for byte, tables value for value, the
    manifest but for when and how fast it was built."""
    assert _files(got) == _files(want)
    for name in _files(want):
        if name == MANIFEST:
            ma, mb = (json.loads((d / MANIFEST).read_text()) for d in (got, want))
            for key in VOLATILE_MANIFEST:
                ma.pop(key), mb.pop(key)
            assert ma == mb
        elif name.endswith(".parquet"):
            assert_same_table(got / name, want / name)
        else:
            a, b = (hashlib.sha256((d / name).read_bytes()).hexdigest() for d in (got, want))
            assert a == b, name


def assert_same_comparisons(tiny_pair, got: Path, want: Path, tmp_path: Path) -> None:
    """`lmkl compare CACHE CANDIDATE` gives equal per-token rows against either cache."""
    runs = []
    for name, cache in (("got", got), ("want", want)):
        out = tmp_path / f"compare-{name}"
        code, output = invoke(
            ["compare", str(cache), str(tiny_pair["candidate"]), "--out", str(out), "--quiet"]
        )
        assert code == 0, output
        runs.append(out / "tokens.parquet")
    assert_same_table(*runs)


def test_killed_build_resumes_to_the_uninterrupted_cache(tiny_pair, data, full, tmp_path):
    out = tmp_path / "killed" / "cache"
    args = cache_args(tiny_pair, data, out)
    kill_at(args, "part-done:1")  # SIGKILL once part 1 is in place
    work = out.parent / ".cache.build"
    assert not out.exists()
    assert (work / "parts" / "part-000001.parquet").exists()
    assert not (work / "parts" / "part-000002.parquet").exists()  # killed half-way

    # A plain rerun refuses to throw the kept parts away, and changes nothing.
    before = {p: p.read_bytes() for p in work.rglob("*") if p.is_file()}
    code, output = invoke(args)
    check_error(code, output, 1, "interrupted build", str(out))
    assert "fix: pass --resume to continue it" in output
    # A resume with other options is refused, naming the option and how to start over.
    code, output = invoke([*cache_args(tiny_pair, data, out, "--batch-size", "3"), "--resume"])
    error = check_error(code, output, 1, "options differ", "compute.batch_size")
    assert str(work) not in error and "--overwrite" in output
    assert {p: p.read_bytes() for p in work.rglob("*") if p.is_file()} == before

    code, output = invoke([*args, "--resume"])
    assert code == 0, output
    assert [p.name for p in out.parent.iterdir()] == ["cache"]  # nothing left beside it
    assert_same_cache(out, full["exact"])
    assert_same_comparisons(tiny_pair, out, full["exact"], tmp_path)

    # Nothing is left to resume now.
    check_error(*invoke([*args, "--resume"]), 1, "complete")


def test_ctrl_c_keeps_done_parts_and_says_how_to_resume(tiny_pair, data, full, tmp_path):
    out = tmp_path / "stopped" / "cache"
    args = cache_args(tiny_pair, data, out, "--top-k", "8")
    code, stderr = interrupt_at(args, "part-written:1")
    assert code == EXIT_INTERRUPTED, stderr
    assert "Traceback" not in stderr
    assert "stopped (SIGINT)" in stderr
    assert "fix: continue with the same command plus --resume" in stderr, stderr
    parts = out.parent / ".cache.build" / "parts"
    # The part being written when Ctrl-C came was finished and kept; no later part was started.
    assert sorted(p.name for p in parts.glob("part-*")) == [
        "part-000000.parquet",
        "part-000001.parquet",
    ]
    code, output = invoke([*args, "--resume"])
    assert code == 0, output
    assert [p.name for p in out.parent.iterdir()] == ["cache"]
    assert_same_cache(out, full["topk"])
    assert_same_comparisons(tiny_pair, out, full["topk"], tmp_path)


def test_overwrite_discards_an_interrupted_build(tiny_pair, data, full, tmp_path):
    out = tmp_path / "again" / "cache"
    kill_at(cache_args(tiny_pair, data, out), "part-done:0")
    code, output = invoke(cache_args(tiny_pair, data, out, "--overwrite"))
    assert code == 0, output
    assert [p.name for p in out.parent.iterdir()] == ["cache"]
    assert_same_cache(out, full["exact"])


def test_leftovers_of_a_killed_build_are_removed_by_the_next_open(full, tmp_path):
    out = tmp_path / "parent" / "cache"
    shutil.copytree(full["exact"], out)
    # A temporary directory of a build made before builds could resume, and the build directory
    # of a build killed after installing its cache but before removing that directory.
    legacy = out.parent / ".cache.k2j4_x9a.tmp"
    (legacy / "rows").mkdir(parents=True)
    (legacy / "rows" / "rows.bin").write_bytes(b"\0" * 4096)
    finished = out.parent / ".cache.build"
    finished.mkdir()
    (finished / ".lmkl-run").write_text("{}")
    (finished / "results.json").write_text("{}")
    # Not a leftover of this cache: another cache's temporary name, and a user's file.
    (out.parent / ".cache-2.k2j4_x9a.tmp").mkdir()
    (out.parent / "notes.txt").write_text("mine")

    open_cache(out)
    assert sorted(p.name for p in out.parent.iterdir()) == [
        ".cache-2.k2j4_x9a.tmp",
        "cache",
        "notes.txt",
    ]


def test_an_interrupted_build_is_kept_by_open(full, tmp_path):
    """Parts of an interrupted rebuild are what --resume continues from: open keeps them."""
    out = tmp_path / "parent" / "cache"
    shutil.copytree(full["exact"], out)
    work = out.parent / ".cache.build"
    (work / "parts").mkdir(parents=True)
    (work / "config.yaml").write_text("command: cache\n")
    (work / "parts" / "part-000000.parquet").write_bytes(b"PAR1")
    open_cache(out)
    assert (work / "parts" / "part-000000.parquet").exists()


def _lmkl(args: list[str], processes: int, cwd: Path) -> subprocess.CompletedProcess:
    env = os.environ | {
        "PYTHONPATH": str(ROOT),
        # One thread per process in both builds: float summation order then matches exactly.
        "OMP_NUM_THREADS": "1",
    }
    env.pop("WORLD_SIZE", None)
    launcher = (
        [sys.executable, "-m", "lmkl"]
        if processes == 1
        else [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            f"--nproc_per_node={processes}",
            "-m",
            "lmkl",
        ]
    )
    return subprocess.run(
        [*launcher, *args], env=env, capture_output=True, text=True, timeout=300, cwd=str(cwd)
    )


def test_two_processes_build_the_cache_one_process_builds(tiny_pair, data, tmp_path):
    one, two = tmp_path / "one" / "cache", tmp_path / "two" / "cache"
    done = _lmkl(cache_args(tiny_pair, data, one), 1, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    done = _lmkl(cache_args(tiny_pair, data, two), 2, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().splitlines() == [str(two)]  # only rank 0 reports
    assert [p.name for p in two.parent.iterdir()] == ["cache"]
    assert_same_cache(two, one)
    windows = json.loads((one / MANIFEST).read_text())["counts"]["windows"]
    assert windows >= 4  # two parts or more per rank (batch size 2): both ranks had work


def test_a_second_build_of_one_cache_is_refused_up_front(tiny_pair, data, full, tmp_path):
    # Two builds of one cache (a scheduler restarting a job whose first copy still runs): the
    # second is refused in one line, before loading anything, and changes nothing; a cache being
    # installed is not tidied away by a reader that opens it meanwhile.
    from lmkl.errors import EXIT_BUSY
    from lmkl.refcache.format import build_dir, remove_leftovers

    out = tmp_path / "busy" / "cache"
    work = build_dir(out)
    work.mkdir(parents=True)
    (work / "results.json").write_text("{}")  # as if between its results and its install
    with lock_held_elsewhere(work):
        before = sorted(p.name for p in work.iterdir())
        code, output = invoke(cache_args(tiny_pair, data, out))
        check_error(code, output, EXIT_BUSY, "in use by another lmkl process", str(work))
        assert remove_leftovers(out) == []  # held: a live build's directory is left alone
        assert sorted(p.name for p in work.iterdir()) == before and not out.exists()
    # Its holder gone, the same directory is a leftover of a finished build and is tidied.
    assert remove_leftovers(out) == [work.name] and not work.exists()
    code, output = invoke(cache_args(tiny_pair, data, out))
    assert code == 0, output
    assert [p.name for p in out.parent.iterdir()] == ["cache"]
    assert_same_cache(out, full["exact"])
