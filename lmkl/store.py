"""The run directory: what a run writes, how, and how other tools read it back.

Layout (a contract; see README, "Run directory")::

    RUN_DIR/
      config.yaml      resolved options of the run
      results.json     summary statistics, provenance, throughput (written last)
      tokens.parquet   one row per scored token and candidate
      worst.json       the worst positions with both models' top-5 next tokens (for reports)
      parts/           durable per-batch parts while the run is in progress (removed at the end)
      progress.json    how many parts are complete (while in progress)

Every file is written atomically (temporary file, fsync, rename), so a killed run never leaves a
half-written file under its final name.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from lmkl.divergence import TOKEN_METRIC_NAMES
from lmkl.errors import OutputError
from lmkl.stats import to_json_safe

SCHEMA_VERSION = 1

#: Column types of tokens.parquet. Metrics are float32 (their own precision) and null where the
#: logits were not finite.
TOKEN_SCHEMA = pa.schema(
    [
        ("candidate", pa.string()),
        ("doc_id", pa.int64()),
        ("window_id", pa.int64()),
        ("position", pa.int64()),
        ("window_pos", pa.int32()),
        ("token_id", pa.int32()),
        ("bytes", pa.int32()),
        ("nonfinite", pa.bool_()),
    ]
    + [(name, pa.float32()) for name in TOKEN_METRIC_NAMES]
)


#: tokens.parquet of a comparison against a compact (top-k) reference cache: the exact KL is not
#: known there, so ``kl``/``reverse_kl``/``jsd`` are null and a guaranteed interval is stored.
BOUNDS_SCHEMA = pa.schema(
    [*TOKEN_SCHEMA, ("kl_lower", pa.float32()), ("kl_upper", pa.float32())]
)


@contextmanager
def atomic_path(target: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``target``; on success fsync it and rename it into place."""
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with tmp.open("rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, target)
        _fsync_dir(target.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # not supported on every platform; the rename is still atomic
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: Any) -> None:
    """Atomically write strict JSON (non-finite floats become ``"inf"``/``null``)."""
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(to_json_safe(obj), indent=2, allow_nan=False) + "\n")


def write_yaml(path: Path, obj: Any) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(yaml.safe_dump(obj, sort_keys=False, allow_unicode=True))


def tokens_table(columns: dict[str, Any], schema: pa.Schema = TOKEN_SCHEMA) -> pa.Table:
    """A table in :data:`TOKEN_SCHEMA` from per-token arrays; NaN metrics become nulls."""
    arrays = []
    for field in schema:
        values = columns[field.name]
        if pa.types.is_floating(field.type):
            values = np.asarray(values, dtype=np.float32)
            arrays.append(pa.array(values, type=field.type, mask=np.isnan(values)))
        else:
            arrays.append(pa.array(values, type=field.type))
    return pa.Table.from_arrays(arrays, schema=schema)


class RunDirectory:
    """Creates and fills one run directory."""

    def __init__(self, path: Path) -> None:
        self.path = path
        #: Columns of the per-token parts and of tokens.parquet.
        self.schema = TOKEN_SCHEMA

    @property
    def parts_dir(self) -> Path:
        return self.path / "parts"

    @classmethod
    def create(cls, path: Path, overwrite: bool = False) -> RunDirectory:
        """Prepare ``path`` for a new run; refuse to replace an existing run unless ``overwrite``."""
        if path.exists() and any(path.iterdir()):
            if not overwrite:
                raise OutputError(
                    f"output directory '{path}' already holds a run",
                    "pass --overwrite to replace it, --resume to continue it, or another --out",
                )
            if not (path / "config.yaml").exists() and not (path / "results.json").exists():
                raise OutputError(
                    f"'{path}' is not empty and is not an lmkl run; refusing to delete it",
                    "choose an empty or new --out directory",
                )
            shutil.rmtree(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".lmkl-write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise OutputError(f"cannot write to output directory '{path}': {exc.strerror}",
                              "choose a writable --out directory") from exc
        return cls(path)

    def write_config(self, config: dict[str, Any]) -> None:
        write_yaml(self.path / "config.yaml", config)

    def part_path(self, index: int) -> Path:
        return self.parts_dir / f"part-{index:06d}.parquet"

    def write_part(self, index: int, table: pa.Table) -> None:
        """Write one durable part, then record it in progress.json."""
        with atomic_path(self.part_path(index)) as tmp:
            pq.write_table(table, tmp)
        write_json(self.path / "progress.json", {"completed_parts": index + 1})

    def completed_parts(self) -> list[Path]:
        return sorted(self.parts_dir.glob("part-*.parquet")) if self.parts_dir.exists() else []

    def read_parts(self) -> pa.Table:
        parts = self.completed_parts()
        if not parts:
            return self.schema.empty_table()
        return pa.concat_tables([pq.read_table(p, schema=self.schema) for p in parts])

    def finalize(self, results: dict[str, Any], worst: list[dict[str, Any]]) -> Path:
        """Merge parts into tokens.parquet, write worst.json and results.json, drop the parts."""
        parts = self.completed_parts()
        with atomic_path(self.path / "tokens.parquet") as tmp:
            with pq.ParquetWriter(tmp, self.schema) as writer:
                for part in parts:
                    writer.write_table(pq.read_table(part, schema=self.schema))
        write_json(self.path / "worst.json", worst)
        write_json(self.path / "results.json", results)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        (self.path / "progress.json").unlink(missing_ok=True)
        return self.path / "results.json"


def load_results(run_dir: Path) -> dict[str, Any]:
    """Read a finished run's results.json."""
    path = Path(run_dir) / "results.json"
    if not path.exists():
        raise OutputError(f"'{run_dir}' has no results.json (not a finished lmkl run)",
                          "pass the directory that `lmkl compare` or `lmkl run` wrote")
    return json.loads(path.read_text())


def load_tokens(run_dir: Path, columns: list[str] | None = None) -> pa.Table:
    """Read a finished run's tokens.parquet (optionally only some columns)."""
    return pq.read_table(Path(run_dir) / "tokens.parquet", columns=columns)
