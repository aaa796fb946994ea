"""SIGKILL every run kind mid-run, resume it, and get exactly the uninterrupted run directory.

Kinds: compare against an exact and a top-k reference cache, compare --different-tokenizers
(per-byte) and sample-kl. The kill point is reached through the test-only hook
``LMKL_TEST_HOLD`` (``part-done:1``: part 1 is in place, progress.json not yet updated), so
parts 0-1 exist and the later ones do not; no timing is involved.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from runtools import VOLATILE, assert_same_run, invoke, kill_at, short_documents

HOLD = "part-done:1"
PROMPTS = ['The "assert" statement', "Suspend the execution of"]


@pytest.fixture(scope="module")
def data(tiny_pair, tmp_path_factory) -> Path:
    """Three short held-out documents (several parts with batch size 2)."""
    return short_documents(tiny_pair, tmp_path_factory.mktemp("data"), 600)


def _cache(tiny_pair, data: Path, out: Path, *top_k: str) -> Path:
    code, output = invoke(
        [
            "cache",
            str(tiny_pair["reference"]),
            "--data",
            str(data),
            "-c",
            "64",
            "--stride",
            "32",
            "--quiet",
            "--out",
            str(out),
            *top_k,
        ]
    )
    assert code == 0, output
    return out


@pytest.fixture(scope="module")
def caches(tiny_pair, data, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("caches")
    return {
        "exact": _cache(tiny_pair, data, root / "exact"),
        "topk": _cache(tiny_pair, data, root / "top8", "--top-k", "8"),
    }


def cached_compare_args(cache: Path, candidate: Path) -> Callable[[Path], list[str]]:
    return lambda out: [
        "compare",
        str(cache),
        str(candidate),
        "--out",
        str(out),
        "--batch-size",
        "2",
        "--quiet",
    ]


def sample_kl_args(tiny_pair, prompts: Path, seed: int = 3) -> Callable[[Path], list[str]]:
    """2 prompts x 4 samples in batches of 2: four parts."""
    return lambda out: [
        "sample-kl",
        str(tiny_pair["reference"]),
        str(tiny_pair["candidate"]),
        "--prompts",
        str(prompts),
        "--num-samples",
        "4",
        "--batch-size",
        "2",
        "--max-new-tokens",
        "5",
        "--seed",
        str(seed),
        "--out",
        str(out),
        "--quiet",
    ]


@pytest.fixture(scope="module")
def prompts(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("prompts") / "p.jsonl"
    path.write_text("".join(json.dumps({"text": p}) + "\n" for p in PROMPTS))
    return path


def _digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def assert_same_run_dir(got: Path, want: Path, row_files: list[str]) -> None:
    """Same entries, same results (timing/provenance aside), same options and per-row files."""
    assert sorted(p.name for p in got.iterdir()) == sorted(p.name for p in want.iterdir())
    ra, rb = (json.loads((d / "results.json").read_text()) for d in (got, want))
    for key in VOLATILE:
        ra.pop(key), rb.pop(key)
    assert ra == rb
    assert (got / "config.yaml").read_text() == (want / "config.yaml").read_text()
    assert json.loads((got / ".lmkl-run").read_text()) == json.loads(
        (want / ".lmkl-run").read_text()
    )
    for name in row_files:
        if name.endswith(".parquet"):
            a, b = pq.read_table(got / name), pq.read_table(want / name)
            assert a.schema == b.schema, name
            assert a.num_rows == b.num_rows > 0, name
            # NaN != NaN for Table.equals: compare the values as Python objects (NaN-safe).
            assert a.equals(b) or _rows(a) == _rows(b), name
        else:
            assert (got / name).read_text() == (want / name).read_text(), name
            assert (got / name).read_text().strip(), name


def _rows(table) -> list[tuple]:
    def key(v):
        return "nan" if isinstance(v, float) and v != v else v

    columns = [table[c].to_pylist() for c in table.column_names]
    return [tuple(key(v) for v in row) for row in zip(*columns, strict=True)]


def kill_then_resume(args: Callable[[Path], list[str]], tmp_path: Path) -> tuple[Path, Path]:
    """Run uninterrupted into ``full``; run into ``killed``, SIGKILL it after part 1, resume."""
    full, killed = tmp_path / "full", tmp_path / "killed"
    code, output = invoke(args(full))
    assert code == 0, output

    kill_at(args(killed), HOLD)
    parts = killed / "parts"
    assert (parts / "part-000000.parquet").exists() and (parts / "part-000001.parquet").exists()
    assert not (parts / "part-000002.parquet").exists()  # the kill came mid-run
    assert not (killed / "results.json").exists()

    code, output = invoke([*args(killed), "--resume"])
    assert code == 0, output
    results = json.loads((killed / "results.json").read_text())
    assert results["provenance"]["resumed_parts"] == 2  # parts 0 and 1 were kept, not redone
    assert not parts.exists() and not (killed / "progress.json").exists()
    return killed, full


@pytest.mark.parametrize("mode", ["exact", "topk"])
def test_cached_compare_killed_then_resumed(tiny_pair, caches, mode, tmp_path):
    killed, full = kill_then_resume(
        cached_compare_args(caches[mode], tiny_pair["candidate"]), tmp_path
    )
    results = json.loads((full / "results.json").read_text())
    assert results["reference_cache"]["mode"] == mode
    assert_same_run(killed, full)
    assert_same_run_dir(killed, full, ["tokens.parquet", "worst.json"])


def test_bytes_compare_killed_then_resumed(tiny_pair, other_tokenizer_model, data, tmp_path):
    def args(out: Path) -> list[str]:
        return [
            "compare",
            str(tiny_pair["reference"]),
            str(other_tokenizer_model),
            "--data",
            str(data),
            "--different-tokenizers",
            "-c",
            "64",
            "--stride",
            "32",
            "-b",
            "2",
            "--out",
            str(out),
            "--quiet",
        ]

    killed, full = kill_then_resume(args, tmp_path)
    assert json.loads((full / "results.json").read_text())["kind"] == "bytes-compare"
    assert not (full / "tokens.parquet").exists()
    assert_same_run_dir(killed, full, ["documents.parquet"])


def test_sample_kl_killed_then_resumed(tiny_pair, prompts, tmp_path):
    killed, full = kill_then_resume(sample_kl_args(tiny_pair, prompts), tmp_path)
    assert json.loads((full / "results.json").read_text())["kind"] == "sample-kl"
    assert pq.read_table(full / "samples.parquet").num_rows == 2 * 4
    assert_same_run_dir(killed, full, ["tokens.parquet", "samples.parquet", "samples.jsonl"])


def test_sample_kl_resume_with_another_seed_is_refused(tiny_pair, prompts, tmp_path):
    out = tmp_path / "killed"
    kill_at(sample_kl_args(tiny_pair, prompts, seed=3)(out), HOLD)
    before = {p.relative_to(out): _digest(p) for p in out.rglob("*") if p.is_file()}

    code, output = invoke([*sample_kl_args(tiny_pair, prompts, seed=4)(out), "--resume"])
    assert code in (1, 2), output
    assert "Traceback" not in output
    errors = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, output
    assert "options differ" in " ".join(output.split()) and "seed" in errors[0], output
    assert any(line.startswith("fix:") for line in output.splitlines()), output
    # The refusal changed nothing: the original run can still be resumed to the end.
    after = {p.relative_to(out): _digest(p) for p in out.rglob("*") if p.is_file()}
    assert after == before
    code, output = invoke([*sample_kl_args(tiny_pair, prompts, seed=3)(out), "--resume"])
    assert code == 0, output
