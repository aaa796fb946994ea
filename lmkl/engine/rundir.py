"""The run directory: what a run writes, how, and how other tools read it back.

Layout (a contract; see README, "Run directory")::

    RUN_DIR/
      .lmkl-run        marker: lmkl wrote this directory (kind, version; identity once finished)
      config.yaml      resolved options of the run
      results.json     summary statistics, provenance, throughput (written last)
      tokens.parquet   one row per scored token and candidate
      worst.json       the worst positions with both models' top-5 next tokens (for reports)
      view.parquet     both models' top-5 next tokens on a bounded set of documents, for the
                       report's token view (only with ``compute.view_tokens``)
      parts/           durable parts while the run is in progress (removed at the end)
      progress.json    completed parts and the run identity (while in progress; rank 0 alone
                       writes it)
      .lmkl-lock       host and pid of the process working in the directory (while it runs;
                       see :class:`lmkl.files.DirectoryLock`)

Run kinds add their own files (``documents.parquet`` for per-byte comparisons, ``samples.*``
for sampled KL; an experiment keeps one run directory per dataset under ``datasets/``).

Every file is written atomically (:mod:`lmkl.files`), so a killed run never leaves a
half-written file under its final name. A part counts as complete once ``part-NNNNNN.parquet``
exists; its sidecar (``worst-NNNNNN.json``) is written just before it. ``--resume`` removes what
a killed write can leave behind and recomputes from the first missing part. ``--overwrite``
deletes only a directory that carries the marker and holds nothing lmkl did not write.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from lmkl.engine.results import SCHEMA_VERSION, check_schema
from lmkl.errors import OutputError, ResumeError
from lmkl.files import LOCK_FILE, atomic_path, empty_directory, write_json, write_yaml
from lmkl.scoring.divergence import TOKEN_METRIC_NAMES
from lmkl.version import __version__

#: The file that marks a directory as written by lmkl (and so as one ``--overwrite`` may delete).
MARKER = ".lmkl-run"
#: Entries lmkl writes in a run directory; anything else makes ``--overwrite`` refuse.
RUN_FILES = frozenset(
    {
        MARKER,
        "config.yaml",
        "results.json",
        "tokens.parquet",
        "worst.json",
        "view.parquet",
        "progress.json",
        "parts",
        "documents.parquet",
        "samples.parquet",
        "units.parquet",
        "recipe.yaml",
        "samples.jsonl",
        "report.html",
        "report.md",
        "report_files",
        "datasets",
        LOCK_FILE,
    }
)

#: How often, and after how long, a failed read of progress.json is tried again: a network
#: file system's transient error must not pass for "no progress" (which loses the identity).
_READ_RETRIES = (0.1, 0.5, 2.0)

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


#: Test-only hook: ``LMKL_TEST_HOLD=POINT:INDEX`` freezes the process at a named point of a write
#: (``part-written``: part N's temporary file is complete but not renamed, its worst file exists;
#: ``part-done``: part N is in place, progress.json not yet updated; ``finalize:0``: tokens.parquet
#: is written, results.json not yet), printing ``lmkl-test-hold POINT:INDEX`` to stderr, so a test
#: can SIGKILL it there. A graceful stop request (first Ctrl-C) releases the hold. Never set it in
#: real use.
TEST_HOLD_ENV = "LMKL_TEST_HOLD"


_PART_RE = re.compile(r"^part-(\d{6})\.parquet$")


def _test_hold(point: str, index: int = 0) -> None:
    if os.environ.get(TEST_HOLD_ENV) != f"{point}:{index}":
        return
    from lmkl.engine.interrupt import stop_requested

    print(f"lmkl-test-hold {point}:{index}", file=sys.stderr, flush=True)
    deadline = time.monotonic() + 300  # never hang forever if the test that set it died
    while not stop_requested() and time.monotonic() < deadline:
        time.sleep(0.05)


@contextmanager
def _writing(run_dir: Path, what: str) -> Iterator[None]:
    """Turn an OSError while writing ``what`` (full disk, permissions) into one clear line."""
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or str(exc) or type(exc).__name__
        raise OutputError(
            f"cannot write {what} in '{run_dir}': {reason}; completed parts are kept",
            "free disk space or fix the directory's permissions, then rerun the same command "
            f"with --resume --out {run_dir}",
        ) from exc


#: tokens.parquet of a comparison against a compact (top-k) reference cache: the exact KL is not
#: known there, so ``kl``/``reverse_kl``/``jsd`` are null and a guaranteed interval is stored.
BOUNDS_SCHEMA = pa.schema([*TOKEN_SCHEMA, ("kl_lower", pa.float32()), ("kl_upper", pa.float32())])


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


def _is_temporary(name: str) -> bool:
    """Files lmkl writes only transiently: atomic-write temporaries and the writability probe."""
    return (name.startswith(".") and name.endswith(".tmp")) or name == ".lmkl-write-test"


def _is_empty(path: Path) -> bool:
    """No entries except leftovers of an interrupted write (which hold no results) and the
    lock this process may already hold."""
    return all(_is_temporary(p.name) or p.name == LOCK_FILE for p in path.iterdir())


def foreign_entries(path: Path) -> list[str]:
    """Entries of a run directory that lmkl did not write (``datasets/*`` checked as runs)."""
    found = []
    for entry in sorted(path.iterdir()):
        if _is_temporary(entry.name):
            continue
        if entry.name not in RUN_FILES:
            found.append(entry.name)
        elif entry.name == "datasets" and entry.is_dir():
            for sub in sorted(entry.iterdir()):
                if not sub.is_dir() or not (sub / MARKER).is_file():
                    found.append(f"datasets/{sub.name}")
                else:
                    found += [f"datasets/{sub.name}/{n}" for n in foreign_entries(sub)]
    return found


def _is_legacy_run(path: Path) -> bool:
    """A run written before the marker existed: its config plus results or parts, and nothing
    but files lmkl writes (a project folder that merely holds a config.yaml is not one)."""
    has_output = (path / "results.json").is_file() or (path / "parts").is_dir()
    return (path / "config.yaml").is_file() and has_output and not foreign_entries(path)


class RunDirectory:
    """Creates and fills one run directory."""

    def __init__(self, path: Path, schema: pa.Schema | None = None, sidecar: str = "worst") -> None:
        self.path = path
        #: Whether :meth:`write_part` updates progress.json: only rank 0 of a multi-process run
        #: does, so ranks never race on the file (nor read it back mid-rename on NFS).
        self.records_progress = True
        #: The run identity progress.json records (kept here, so updates never re-read it).
        self.identity: dict[str, Any] | None = None
        self._completed: set[int] | None = None  # listed once, then kept up to date
        #: Columns of the per-token parts and of tokens.parquet.
        self.schema = schema or TOKEN_SCHEMA
        #: Name stem of each part's JSON sidecar (``worst`` for comparisons).
        self.sidecar = sidecar

    @property
    def parts_dir(self) -> Path:
        return self.path / "parts"

    @staticmethod
    def check_new(path: Path, overwrite: bool = False) -> None:
        """Fail early (before models load) if ``path`` cannot hold a new run; changes nothing.

        An existing non-empty directory is replaced only with ``overwrite``, only if it carries
        lmkl's marker, and only if it holds nothing but files lmkl writes.
        """
        if path.exists() and not path.is_dir():
            raise OutputError(
                f"output path '{path}' is a file, not a directory", "choose another --out directory"
            )
        if path.exists() and not _is_empty(path):
            if not (path / MARKER).is_file() and not _is_legacy_run(path):
                # Said first, with or without --overwrite: --overwrite never deletes it.
                held = sorted(p.name for p in path.iterdir() if not _is_temporary(p.name))
                shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if held[3:] else "")
                raise OutputError(
                    f"'{path}' is not empty and is not an lmkl run (holds {shown}); "
                    "lmkl will not write into it or delete it",
                    "choose another --out directory (a new or empty one)",
                )
            if not overwrite:
                raise OutputError(
                    f"output directory '{path}' already holds a run",
                    "pass --overwrite to replace it, --resume to continue it, or another --out",
                )
            foreign = foreign_entries(path)
            if foreign:
                raise OutputError(
                    f"'{path}' holds files lmkl did not write ({', '.join(foreign[:3])}); "
                    "refusing to delete it",
                    "move those files away, or choose another --out directory",
                )
        # Probe writability, then remove whatever the probe created.
        missing = []
        existing = path
        while not existing.exists() and existing != existing.parent:
            missing.append(existing)
            existing = existing.parent
        try:
            path.mkdir(parents=True, exist_ok=True)
            probe = path / ".lmkl-write-test"
            probe.write_text("ok")
            probe.unlink()
        except OSError as exc:
            raise OutputError(
                f"cannot write to output directory '{path}': {exc.strerror}",
                "choose a writable --out directory",
            ) from exc
        finally:
            for directory in missing:
                try:
                    directory.rmdir()
                except OSError:
                    break

    @classmethod
    def create(cls, path: Path, overwrite: bool = False, kind: str = "compare") -> RunDirectory:
        """Prepare ``path`` for a new run of ``kind`` (writes the marker first)."""
        cls.check_new(path, overwrite)
        try:
            if path.exists() and not _is_empty(path):
                # check_new allowed it: --overwrite of an lmkl run. The lock stays: this
                # process holds it.
                empty_directory(path)
        except OSError as exc:
            raise _unpreparable(path, exc) from exc
        make_output_dir(path)
        run_dir = cls(path)
        run_dir.write_marker({"kind": kind})
        return run_dir

    def write_marker(self, fields: dict[str, Any]) -> None:
        """Write (or update) the marker: lmkl's version, the run kind, and ``fields``."""
        marker = self.read_marker() | {"schema_version": SCHEMA_VERSION, "lmkl": __version__}
        marker |= fields
        with _writing(self.path, MARKER):
            write_json(self.path / MARKER, marker)

    def read_marker(self) -> dict[str, Any]:
        """The marker's fields ({} if unreadable: it only guards deletion and reuse, and a run
        whose marker records no identity is not reused); a newer schema is refused."""
        try:
            value = json.loads((self.path / MARKER).read_text())
        except (OSError, ValueError):
            return {}
        if not isinstance(value, dict):
            return {}
        check_schema(value, self.path / MARKER, "run marker", required=False)
        return value

    def write_config(self, config: dict[str, Any]) -> None:
        with _writing(self.path, "config.yaml"):
            write_yaml(self.path / "config.yaml", config)

    def part_path(self, index: int) -> Path:
        return self.parts_dir / f"part-{index:06d}.parquet"

    def sidecar_path(self, index: int) -> Path:
        return self.parts_dir / f"{self.sidecar}-{index:06d}.json"

    def extra_path(self, name: str, index: int) -> Path:
        """Part ``index``'s extra table ``name`` (e.g. ``view``), written before the part."""
        return self.parts_dir / f"{name}-{index:06d}.parquet"

    def write_part(
        self,
        index: int,
        table: pa.Table,
        sidecar: Any = None,
        extra: dict[str, pa.Table] | None = None,
    ) -> None:
        """Write part ``index`` durably (its sidecar and extra tables first), then update
        progress.json. A part counts as complete only once its own file exists, so extras of a
        part that was never completed are removed by :meth:`clean_incomplete`."""
        with _writing(self.path, f"part {index}"):
            if sidecar is not None:
                write_json(self.sidecar_path(index), sidecar)
            for name, extra_table in (extra or {}).items():
                with atomic_path(self.extra_path(name, index)) as tmp:
                    pq.write_table(extra_table, tmp)
            with atomic_path(self.part_path(index)) as tmp:
                pq.write_table(table, tmp)
                _test_hold("part-written", index)
            self._completed = set(self.completed_indices()) | {index}
            _test_hold("part-done", index)
            self.write_progress()

    def read_sidecar(self, index: int) -> Any:
        path = self.sidecar_path(index)
        return json.loads(path.read_text()) if path.exists() else None

    def write_progress(self, identity: dict[str, Any] | None = None) -> None:
        """Record the completed parts (and what the run is computed from) in progress.json.

        ``identity`` (data fingerprint, model hashes, window count...) is kept from the first
        call (or :attr:`identity`) so that ``--resume`` can refuse to mix parts computed from
        other inputs. Does nothing where :attr:`records_progress` is off (ranks other than 0).
        """
        if not self.records_progress:
            return
        if identity is not None:
            self.identity = identity
        elif self.identity is None:
            # Read once (retried, never silently empty), then kept: a later transient read
            # error cannot drop the identity from the file.
            self.identity = self.read_progress().get("identity")
        progress: dict[str, Any] = {"schema_version": SCHEMA_VERSION}
        if self.identity is not None:
            progress["identity"] = self.identity
        progress["completed_parts"] = len(self.completed_indices())
        with _writing(self.path, "progress.json"):
            write_json(self.path / "progress.json", progress)

    def read_progress(self) -> dict[str, Any]:
        """progress.json's fields ({} when the run has none yet), its schema checked.

        A failed read is tried again briefly (a network file system's hiccup); one that
        persists, or a damaged file, is a one-line error, never an empty progress.
        """
        path = self.path / "progress.json"
        for delay in (*_READ_RETRIES, None):
            try:
                value = json.loads(path.read_text())
                break
            except FileNotFoundError:
                return {}
            except (OSError, ValueError) as exc:
                if delay is not None:
                    time.sleep(delay)
                    continue
                if isinstance(exc, OSError):
                    raise OutputError(
                        f"cannot read '{path}': {exc.strerror or exc} (tried "
                        f"{len(_READ_RETRIES) + 1} times); its parts are kept",
                        f"fix the file system (a network mount?), then rerun with --resume "
                        f"--out {self.path}",
                    ) from exc
                raise ResumeError(
                    f"'{path}' is damaged ({exc}); the run's parts cannot be checked against "
                    "its inputs without it",
                    "start a new run with another --out (or --overwrite)",
                ) from exc
        if not isinstance(value, dict):
            raise ResumeError(
                f"'{path}' is damaged (not a JSON object); the run's parts cannot be checked "
                "against its inputs without it",
                "start a new run with another --out (or --overwrite)",
            )
        check_schema(value, path, "progress file", required=False)
        value.pop("schema_version", None)
        return value

    def rescan(self) -> None:
        """Forget the cached listing: other processes (ranks) may have added parts."""
        self._completed = None

    def completed_indices(self) -> list[int]:
        """Indices of the parts whose file is in place (a part is complete once it exists)."""
        if self._completed is None:
            if not self.parts_dir.exists():
                return []
            found = (_PART_RE.match(p.name) for p in self.parts_dir.iterdir())
            self._completed = {int(m.group(1)) for m in found if m}
        return sorted(self._completed)

    def part_rows(self, index: int) -> int | None:
        """Row count of a complete part from its footer, or None if the file is unreadable."""
        try:
            return int(pq.read_metadata(self.part_path(index)).num_rows)
        except Exception:  # a damaged file: the caller recomputes the part
            return None

    def remove_part(self, index: int) -> None:
        if self._completed is not None:
            self._completed.discard(index)
        self.part_path(index).unlink(missing_ok=True)
        self.sidecar_path(index).unlink(missing_ok=True)
        for path in self.extra_paths(index):
            path.unlink(missing_ok=True)

    def extra_paths(self, index: int) -> list[Path]:
        """The extra tables written with part ``index`` (see :meth:`write_part`)."""
        if not self.parts_dir.is_dir():
            return []
        return sorted(
            p for p in self.parts_dir.glob(f"*-{index:06d}.parquet") if not _PART_RE.match(p.name)
        )

    def read_extra(self, name: str) -> pa.Table | None:
        """The extra table ``name`` of every complete part, concatenated (None: no part has it)."""
        tables = [
            pq.read_table(path)
            for i in self.completed_indices()
            if (path := self.extra_path(name, i)).exists()
        ]
        return pa.concat_tables(tables) if tables else None

    def clean_incomplete(self) -> list[str]:
        """Remove what a killed write leaves: temporary files and sidecars without a part."""
        removed = []
        for directory in (self.path, self.parts_dir):
            if not directory.is_dir():
                continue
            for path in directory.iterdir():
                if path.is_file() and (_is_temporary(path.name)):
                    path.unlink(missing_ok=True)
                    removed.append(path.name)
        done = set(self.completed_indices())
        if self.parts_dir.is_dir():
            leftovers = [*self.parts_dir.glob("*-*.json"), *self.parts_dir.glob("*-*.parquet")]
            for path in leftovers:
                if _PART_RE.match(path.name):
                    continue
                index = path.stem.rpartition("-")[2]
                if not index.isdigit() or int(index) not in done:
                    path.unlink(missing_ok=True)
                    removed.append(path.name)
        return sorted(removed)

    def completed_parts(self) -> list[Path]:
        return [self.part_path(i) for i in self.completed_indices()]

    def read_part(self, index: int, columns: list[str] | None = None) -> pa.Table:
        """Complete part ``index`` (optionally only some ``columns``)."""
        return pq.read_table(self.part_path(index), columns=columns, schema=self.schema)

    def iter_parts(self, columns: list[str] | None = None) -> Iterator[pa.Table]:
        """The complete parts one at a time, in index order: what a summary streams over, so
        that no more than one part is in memory (see :mod:`lmkl.analysis.streaming`)."""
        for index in self.completed_indices():
            yield self.read_part(index, columns)

    def read_parts(self) -> pa.Table:
        parts = self.completed_parts()
        if not parts:
            return self.schema.empty_table()
        return pa.concat_tables([pq.read_table(p, schema=self.schema) for p in parts])

    def finalize(
        self,
        results: dict[str, Any],
        files: dict[str, Callable[[Path], None]],
        *,
        merge_parts_as: str | None = "tokens.parquet",
        identity: dict[str, Any] | None = None,
    ) -> Path:
        """Merge the parts (into ``merge_parts_as``), write ``files`` and results.json, tidy up.

        ``files`` maps a file name to a function writing it at a given (temporary) path. The
        marker then records the run identity, so a finished run can be checked before reuse;
        results.json is written last and marks the run as finished.
        """
        parts = self.completed_parts()
        with _writing(self.path, "the final results"):
            if merge_parts_as is not None:
                with (
                    atomic_path(self.path / merge_parts_as) as tmp,
                    pq.ParquetWriter(tmp, self.schema) as writer,
                ):
                    for part in parts:
                        writer.write_table(pq.read_table(part, schema=self.schema))
            _test_hold("finalize", 0)
            for name, write in files.items():
                with atomic_path(self.path / name) as tmp:
                    write(tmp)
            if identity is not None:
                self.write_marker({"identity": identity})
            write_json(self.path / "results.json", results)
        shutil.rmtree(self.parts_dir, ignore_errors=True)
        self._completed = None
        (self.path / "progress.json").unlink(missing_ok=True)
        return self.path / "results.json"


def load_results(run_dir: Path) -> dict[str, Any]:
    """Read a finished run's results.json (one-line errors for a missing or damaged file)."""
    path = _existing(
        run_dir,
        "results.json",
        "not a finished lmkl run",
        "pass the directory that `lmkl compare` or `lmkl run` wrote",
    )
    try:
        results = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise _damaged(path, exc) from exc
    if not isinstance(results, dict):
        raise OutputError(f"'{path}' is not an lmkl results file", "rerun the comparison")
    check_schema(results, path, "results file")
    return results


def load_tokens(run_dir: Path, columns: list[str] | None = None, **kwargs: Any) -> pa.Table:
    """Read a finished run's tokens.parquet (optionally only some columns or rows)."""
    path = _existing(
        run_dir,
        "tokens.parquet",
        "the run kept no per-token results",
        "rerun the comparison (experiments: output.save_tokens: true)",
    )
    try:
        return pq.read_table(path, columns=columns, **kwargs)
    except (OSError, pa.ArrowException) as exc:
        raise _damaged(path, exc) from exc


def _existing(run_dir: Path, name: str, why: str, hint: str) -> Path:
    """``run_dir/name``, or a one-line error saying the run has no such file."""
    path = Path(run_dir) / name
    if not path.exists():
        raise OutputError(f"'{run_dir}' has no {name} ({why})", hint)
    return path


def _unpreparable(path: Path, exc: OSError) -> OutputError:
    return OutputError(
        f"cannot prepare output directory '{path}': {exc.strerror}",
        "choose a writable --out directory",
    )


def check_own_output(path: Path, owner: str, is_own: Callable[[dict[str, Any]], bool]) -> bool:
    """For a command that replaces its own output directory on every run (``lmkl demo`` and
    ``runs/demo``): True when ``path`` holds such a run to replace, False when it is missing or
    empty; refuses (one line) anything else, so that a user's files there are never deleted.

    ``is_own`` is given the run's config.yaml (a mapping) and says whether ``owner`` wrote it.
    """
    if not path.exists() or (path.is_dir() and _is_empty(path)):
        return False
    config: Any = None
    if path.is_dir() and ((path / MARKER).is_file() or _is_legacy_run(path)):
        try:
            config = yaml.safe_load((path / "config.yaml").read_text(encoding="utf-8"))
        except (OSError, yaml.YAMLError):
            config = None
    if isinstance(config, dict) and is_own(config) and not foreign_entries(path):
        return True
    held = sorted(p.name for p in path.iterdir()) if path.is_dir() else []
    shown = ", ".join(held[:3]) + (f" and {len(held) - 3} more" if held[3:] else "")
    raise OutputError(
        f"'{path}' is not {owner}'s own output"
        + (f" (holds {shown})" if held else " (it is a file)")
        + f"; {owner} replaces that directory on every run, so it will not touch this one",
        f"move '{path}' away, or give {owner} another --out directory",
    )


def make_output_dir(path: Path) -> None:
    """Create ``path`` (and its parents) or raise a one-line :class:`OutputError`."""
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _unpreparable(path, exc) from exc


def _damaged(path: Path, exc: BaseException) -> OutputError:
    """One line for a run file that exists but cannot be read."""
    reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:120]
    return OutputError(
        f"cannot read '{path}': the file is damaged ({reason})",
        "rerun the comparison to write it again",
    )
