"""The one run loop: every run kind is executed by :func:`execute`, which owns the lifecycle.

A run kind (see :class:`RunKind`) says what a run is made of and how one part is scored; the
engine does everything else, the same way for every kind:

1. check the options and the output directory, changing nothing;
2. let the kind load its models and data (:meth:`RunKind.prepare`), which raises one-line errors
   for anything unusable, still before any file is created or deleted;
3. create the run directory (marker, config.yaml, run identity), or on ``--resume`` check that
   the options and the identity are those of the interrupted run and keep its valid parts;
4. score the parts this process owns (round-robin over ranks), each written durably; the first
   Ctrl-C/SIGTERM on any rank finishes every rank's current part and stops with the command to
   resume;
5. bring every rank's parts to rank 0, which alone summarizes and writes results.json.

Rank 0 holds the run directory's lock (:class:`lmkl.files.DirectoryLock`) from the moment the
directory exists until the run ends, so a second process on the same directory (two
``--resume`` of one killed run) is refused up front (exit code 75) instead of computing the
same parts and failing at the merge.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import pyarrow as pa
import pyarrow.parquet as pq
import yaml

from lmkl.engine.distributed import Shard, init_shard
from lmkl.engine.identity import changed_keys, check_identity
from lmkl.engine.interrupt import GracefulStop
from lmkl.engine.results import envelope, now
from lmkl.engine.rundir import RunDirectory, load_results, make_output_dir
from lmkl.errors import Interrupted, ResumeError, UsageError
from lmkl.files import DirectoryLock, atomic_path
from lmkl.specs import OutputSpec

ProgressCallback = Callable[[int, int], None]
LogCallback = Callable[[str], None]


@dataclass
class RunOutcome:
    """What a finished run produced."""

    path: Path
    results: dict[str, Any]
    #: False on the other ranks of a multi-process run (only rank 0 reports).
    is_main: bool = True


@dataclass
class Plan:
    """What a run is made of, known once its models and data are loaded."""

    #: Rows each part's table must hold (a resumed part with another count is refused; None:
    #: known only once scored, e.g. sampled continuations).
    part_rows: list[int | None]
    #: Run identity (see :mod:`lmkl.engine.identity`): recorded, and checked on resume.
    identity: dict[str, Any]
    #: Columns of the parts' tables.
    schema: pa.Schema
    #: Work per part for the progress bar (default: ``part_rows``).
    part_work: list[int] | None = None
    #: Name stem of each part's JSON sidecar.
    sidecar: str = "worst"
    #: The unit of ``part_work`` in messages.
    unit: str = "tokens"

    @property
    def work(self) -> list[int]:
        return self.part_work if self.part_work is not None else [n or 0 for n in self.part_rows]


@dataclass
class Part:
    """One scored part: its rows, its sidecar (JSON) and counters summed over the run."""

    table: pa.Table
    sidecar: Any = None
    counters: dict[str, float] = field(default_factory=dict)
    #: Further per-part tables (name -> table), kept with the part across a resume.
    extra: dict[str, pa.Table] = field(default_factory=dict)
    #: The kernel that computed its metrics (see MetricsKernel.backend), kept in the part's
    #: file: a resumed or multi-process run can mix kernels, and results.json says so.
    kernel: str | None = None


@dataclass
class Summary:
    """What a kind makes of all parts: its results fields, extra files, throughput."""

    body: dict[str, Any]
    throughput: dict[str, Any]
    #: Files to write beside results.json: name -> function writing it at a given path.
    files: dict[str, Callable[[Path], None]] = field(default_factory=dict)
    #: Merge the parts into this file (None: the kind writes its own per-row file).
    merge_parts_as: str | None = "tokens.parquet"


class RunKind(Protocol):
    """A kind of run: its options, how it prepares, scores one part and summarizes."""

    #: ``compare``, ``bytes-compare``, ``sample-kl`` (written to results.json and the marker).
    kind: str
    #: Whether results hold token-level KL (false for per-byte comparisons).
    token_level: bool

    def options(self) -> dict[str, Any]:
        """The resolved options (config.yaml); a resume must present the same."""
        ...

    def default_dir(self) -> Path:
        """The run directory when none is given."""
        ...

    def prepare(self, shard: Shard, log: LogCallback) -> Plan:
        """Load and check models and data; raise one-line errors; write nothing."""
        ...

    def ready(self, index: int) -> None:
        """Get what part ``index`` needs (e.g. load its model); not counted as scoring time."""
        ...

    def score(self, index: int) -> Part:
        """Compute part ``index``."""
        ...

    def summarize(self, run_dir: RunDirectory, totals: dict[str, float]) -> Summary:
        """Results from the complete parts (rank 0 only); ``totals``: counters of all ranks."""
        ...


def _noop(_message: str) -> None:
    pass


def execute(
    kind: RunKind,
    output: OutputSpec,
    *,
    resume: bool = False,
    reuse_finished: bool = False,
    progress: ProgressCallback | None = None,
    log: LogCallback | None = None,
    held_lock: DirectoryLock | None = None,
) -> RunOutcome:
    """Run ``kind`` into a run directory (see the module docstring for the lifecycle).

    ``held_lock``: the caller (rank 0) already holds ``output.dir``'s lock and keeps it past
    the run (a cache build, which installs the cache afterwards); it is used, not released.
    ``resume`` continues an interrupted run in ``output.dir``. ``reuse_finished`` (with
    ``resume``) returns a finished run's results instead of refusing it, once its options and
    run identity are checked to be the current ones (experiments reuse finished datasets).
    """
    log = log or _noop
    if resume and output.overwrite:
        raise UsageError(
            "--resume and --overwrite contradict each other",
            "pass --resume to continue the run, or --overwrite to replace it",
        )
    if resume and not output.dir:
        raise UsageError(
            "--resume needs the run directory to continue",
            "pass --resume --out DIR with the directory of the interrupted run",
        )
    shard = init_shard()
    lock: DirectoryLock | None = None
    completed = False
    try:
        path = shard.broadcast(Path(output.dir) if output.dir else kind.default_dir())
        if shard.is_main:
            lock = held_lock or DirectoryLock(path, "run directory")
        config = json.loads(json.dumps(kind.options()))
        if not resume:
            # Rank 0 checks first (a directory that is not lmkl's is refused as such, not as
            # one it cannot lock); the collective also keeps a fast rank 0 from creating the
            # directory before a slow rank has looked at it.
            shard.on_main(RunDirectory.check_new, path, output.overwrite)
        # Up front when the directory exists (a resume, an --overwrite), else once created;
        # before anything reads what another process may be writing.
        shard.on_main(_lock_if_exists, lock)
        finished = resume and shard.on_main(_check_resumable, path, config, reuse_finished)
        started = now()
        try:
            plan = kind.prepare(shard, log)
        except KeyboardInterrupt as exc:
            raise Interrupted(
                "interrupted before anything was scored",
                "rerun the command" + (" with --resume" if resume else ""),
            ) from exc
        if finished:
            shard.on_main(_check_finished, path, plan.identity)
            outcome = _orderly(
                shard, RunOutcome(path, shard.on_main(load_results, path), shard.is_main)
            )
            completed = True
            return outcome
        if resume:
            done = shard.on_main(_resumable_parts, path, plan, log)
        else:
            shard.on_main(_create, path, kind.kind, config, plan.identity, output.overwrite, lock)
            done = set()
        run_dir = RunDirectory(path, plan.schema, plan.sidecar)
        run_dir.records_progress = shard.is_main
        run_dir.identity = plan.identity
        run_dir.parts_dir.mkdir(parents=True, exist_ok=True)
        counters, written, stopped = _score_parts(kind, shard, run_dir, plan, done, progress, log)
        totals = gather_parts(shard, run_dir, written, counters)
        if stopped is not None:
            # Every rank stopped after the same round; the parts other ranks wrote are now
            # with rank 0 too, so a resume (with any number of processes) keeps them.
            run_dir.write_progress()
            shard.barrier()  # see _orderly
            raise Interrupted(
                f"{stopped}; {len(run_dir.completed_indices())} completed parts are kept in "
                f"{run_dir.path}",
                f"continue with the same command plus --resume --out {run_dir.path}",
            )

        def finish() -> dict[str, Any]:
            assert totals is not None
            summary = kind.summarize(run_dir, totals)
            results = envelope(
                kind.kind,
                kind.token_level,
                summary.body,
                config,
                started,
                now(),
                summary.throughput,
            )
            results["provenance"]["resumed_parts"] = len(done)
            _record_part_kernels(results, run_dir)
            run_dir.finalize(
                results,
                summary.files,
                merge_parts_as=summary.merge_parts_as,
                identity=plan.identity,
            )
            return results

        outcome = _orderly(shard, RunOutcome(path, shard.on_main(finish), shard.is_main))
        completed = True
        return outcome
    finally:
        if lock is not None and lock is not held_lock:
            # A refused or stopped process leaves a stale lock it took over as it found it.
            lock.release(restore=not completed)
        shard.close()


#: How the log line of a resume begins: the one log line printed also when output is piped
#: (lmkl.cli.output), since it says why the run takes less time than a fresh one.
RESUMING = "resuming:"


#: Parquet metadata key of the kernel that scored a part.
KERNEL_KEY = b"lmkl.kernel"


def _record_part_kernels(results: dict[str, Any], run_dir: RunDirectory) -> None:
    """``compute.part_kernels``: how many parts each kernel scored; ``compute.kernel`` names
    the one kernel, or "mixed" where a resumed or multi-process run used several."""
    counts: dict[str, int] = {}
    for path in run_dir.completed_parts():
        kernel = (pq.read_schema(path).metadata or {}).get(KERNEL_KEY)
        if kernel is not None:
            counts[kernel.decode()] = counts.get(kernel.decode(), 0) + 1
    compute = results.get("compute")
    if counts and isinstance(compute, dict):
        compute["part_kernels"] = dict(sorted(counts.items()))
        compute["kernel"] = next(iter(counts)) if len(counts) == 1 else "mixed"


def _lock_if_exists(lock: DirectoryLock | None) -> None:
    """Take the run directory's lock (rank 0) if the directory exists already."""
    if lock is not None and lock.directory.is_dir():
        lock.acquire()


def _orderly(shard: Shard, outcome: RunOutcome) -> RunOutcome:
    """Wait until every rank holds rank 0's results before any rank tears the process group
    down: a rank that destroys it while a peer still reads the last broadcast can abort that
    peer (gloo, SIGABRT). Only on success: after an error the ranks may not meet again."""
    shard.barrier()
    return outcome


#: What each rank tells the others after a round of parts (the highest wins).
_GO, _STOP, _FAILED = 0, 1, 2


def _score_parts(
    kind: RunKind,
    shard: Shard,
    run_dir: RunDirectory,
    plan: Plan,
    done: set[int],
    progress: ProgressCallback | None,
    log: LogCallback,
) -> tuple[dict[str, float], list[int], str | None]:
    """Score this rank's missing parts: summed counters, the parts written here, and why the
    run stopped early (None: every part is done).

    Ranks go in rounds, one part each, and agree after every round whether to go on: a
    graceful stop requested on any rank stops all of them after that round (so no rank waits
    forever for one that left), and a rank that fails or is stopped at once (second Ctrl-C)
    tells the others before it raises.
    """
    work = plan.work
    total = sum(work)
    count = len(plan.part_rows)
    counters: dict[str, float] = {"seconds": 0.0, "cpu_seconds": 0.0}
    written: list[int] = []
    finished_work = 0
    resume_hint = f"continue with the same command plus --resume --out {run_dir.path}"
    try:
        with GracefulStop(
            lambda name: log(
                f"{name}: finishing the current part, then stopping "
                "(press Ctrl-C again to stop at once)"
            )
        ) as stop:
            for first in range(0, count, shard.world_size):
                index = first + shard.rank
                failure: BaseException | None = None
                if index < count and index in done:
                    finished_work += work[index]
                elif index < count:
                    try:
                        kind.ready(index)
                        t0, c0 = time.perf_counter(), time.process_time()
                        part = kind.score(index)
                        # A kind may time its scoring itself (leaving out e.g. decoding text).
                        counters["seconds"] += part.counters.pop(
                            "seconds", time.perf_counter() - t0
                        )
                        counters["cpu_seconds"] += part.counters.pop(
                            "cpu_seconds", time.process_time() - c0
                        )
                        for key, value in part.counters.items():
                            counters[key] = counters.get(key, 0.0) + value
                        table = part.table
                        if part.kernel is not None:
                            metadata = dict(table.schema.metadata or {})
                            metadata[KERNEL_KEY] = part.kernel.encode()
                            table = table.replace_schema_metadata(metadata)
                        run_dir.write_part(index, table, sidecar=part.sidecar, extra=part.extra)
                        written.append(index)
                        finished_work += work[index]
                        if progress and shard.is_main:
                            progress(min(finished_work * shard.world_size, total), total)
                    except BaseException as exc:  # re-raised below, after telling the others
                        if not shard.distributed:
                            raise
                        failure = exc
                flag = _FAILED if failure is not None else _STOP if stop.requested else _GO
                agreed = shard.highest(flag)
                if failure is not None:
                    raise failure
                if agreed == _FAILED:
                    raise Interrupted(
                        f"stopped after {finished_work:,} of {total:,} {plan.unit}: another rank "
                        f"failed or was stopped at once; {len(run_dir.completed_indices())} "
                        f"completed parts are kept in {run_dir.path}",
                        resume_hint + " (see the other rank's message)",
                    )
                if agreed == _STOP and first + shard.world_size < count:
                    why = stop.signal_name if stop.requested else "requested on another rank"
                    return (
                        counters,
                        written,
                        f"stopped ({why}) after {finished_work:,} of {total:,} {plan.unit}",
                    )
    except KeyboardInterrupt as exc:
        raise Interrupted(
            f"interrupted after {finished_work:,} of {total:,} {plan.unit}; "
            f"{len(run_dir.completed_indices())} completed parts are kept in {run_dir.path}",
            resume_hint,
        ) from exc
    return counters, written, None


def _create(
    path: Path,
    kind: str,
    config: dict[str, Any],
    identity: dict[str, Any],
    overwrite: bool,
    lock: DirectoryLock | None = None,
) -> None:
    if lock is not None and not lock.held:
        # A new directory: create it (checked again, models are loaded now), then lock it
        # before anything else is written, so a second process cannot start in it.
        RunDirectory.check_new(path, overwrite)
        make_output_dir(path)
        lock.acquire()
    run_dir = RunDirectory.create(path, overwrite=overwrite, kind=kind)
    run_dir.write_config(config)
    run_dir.write_progress(identity)


def read_run_config(path: Path, what: str = "run") -> dict[str, Any]:
    """The options in ``path/config.yaml`` of a ``what`` to resume (one-line errors)."""
    config_path = path / "config.yaml"
    try:
        previous = yaml.safe_load(config_path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ResumeError(
            f"cannot read '{config_path}' of the {what} to resume",
            "start a new run with another --out",
        ) from exc
    if not isinstance(previous, dict):
        raise ResumeError(
            f"'{config_path}' of the {what} to resume holds no options (empty or not a mapping)",
            "start a new run with another --out",
        )
    return previous


def _check_resumable(path: Path, config: dict[str, Any], reuse_finished: bool) -> bool:
    """Check that ``path`` holds a run with these options; True if it is already finished."""
    finished = (path / "results.json").exists()
    if finished and not reuse_finished:
        raise ResumeError(f"run '{path}' is already complete", "nothing to resume")
    if not (path / "config.yaml").exists():
        raise ResumeError(
            f"'{path}' holds no started run to resume", "drop --resume to start a new run"
        )
    RunDirectory(path).read_marker()  # refuses a run written by a newer lmkl
    previous = read_run_config(path)
    if previous != config:
        changed = changed_keys(previous, config)
        raise ResumeError(
            f"cannot resume '{path}': options differ from the original run ({', '.join(changed)})",
            "resume with the original options (see its config.yaml), or start a new run with "
            "another --out",
        )
    return finished


def _check_finished(path: Path, identity: dict[str, Any]) -> None:
    """A finished run is reused only if its recorded identity is the current one."""
    check_identity(RunDirectory(path).read_marker().get("identity"), identity, str(path))


def _resumable_parts(path: Path, plan: Plan, log: LogCallback) -> set[int]:
    """The completed parts that can be kept; refuse parts computed from other inputs."""
    run_dir = RunDirectory(path, plan.schema, plan.sidecar)
    removed = run_dir.clean_incomplete()
    if removed:
        log(f"removed {len(removed)} leftover files of an interrupted write")
    recorded = run_dir.read_progress().get("identity")
    if recorded is None and not run_dir.completed_indices():
        run_dir.write_progress(plan.identity)  # nothing was scored yet: start it afresh
        recorded = plan.identity
    check_identity(recorded, plan.identity, str(path))
    done: set[int] = set()
    for index in run_dir.completed_indices():
        rows = run_dir.part_rows(index)
        if rows is None:
            log(f"part {index} is unreadable; computing it again")
            run_dir.remove_part(index)
            continue
        if index >= len(plan.part_rows):
            raise ResumeError(
                f"cannot resume '{path}': it holds part {index}, but this run has only "
                f"{len(plan.part_rows)}; it was computed from other inputs",
                "start a new run with another --out",
            )
        expected = plan.part_rows[index]
        if expected is not None and rows != expected:
            raise ResumeError(
                f"cannot resume '{path}': part {index} holds {rows} rows, expected "
                f"{expected}; it was computed from other inputs",
                "start a new run with another --out",
            )
        done.add(index)
    log(f"{RESUMING} {len(done)} of {len(plan.part_rows)} parts kept, scoring the rest")
    return done


def gather_parts(
    shard: Shard, run_dir: RunDirectory, written: list[int], counters: dict[str, float]
) -> dict[str, float] | None:
    """Bring the parts other ranks wrote in this run to rank 0; sum every rank's counters.

    On a shared filesystem nothing moves. Otherwise a rank sends only the parts it wrote in
    this run (never a stale file from an earlier one), and only those rank 0 cannot see.
    Returns the summed counters on rank 0 (``seconds`` is the slowest rank's), None elsewhere.
    """
    if not shard.distributed:
        return dict(counters)
    shard.barrier()
    if shard.is_main:
        run_dir.rescan()
    present = set(run_dir.completed_indices()) if shard.is_main else set()
    present = set(shard.broadcast(sorted(present)))
    payload = {}
    for index in written:
        if index not in present:
            sidecar = run_dir.sidecar_path(index)
            payload[index] = (
                run_dir.part_path(index).read_bytes(),
                sidecar.read_bytes() if sidecar.exists() else None,
                {p.name: p.read_bytes() for p in run_dir.extra_paths(index)},
            )
    gathered = shard.gather((payload, counters))
    if gathered is None:
        return None
    totals: dict[str, float] = {}
    for rank_payload, rank_counters in gathered:
        for index, (part_bytes, sidecar_bytes, extras) in sorted(rank_payload.items()):
            if sidecar_bytes is not None:
                with atomic_path(run_dir.sidecar_path(index)) as tmp:
                    tmp.write_bytes(sidecar_bytes)
            for name, extra_bytes in extras.items():
                with atomic_path(run_dir.parts_dir / name) as tmp:
                    tmp.write_bytes(extra_bytes)
            with atomic_path(run_dir.part_path(index)) as tmp:
                tmp.write_bytes(part_bytes)
        for key, value in rank_counters.items():
            totals[key] = (
                max(totals.get(key, 0.0), value)
                if key == "seconds"
                else (totals.get(key, 0.0) + value)
            )
    run_dir.rescan()  # parts received from other ranks were written behind its back
    totals["world_size"] = shard.world_size
    return totals
