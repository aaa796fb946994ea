"""Building a reference cache (``lmkl cache``): a run kind of the one engine loop.

A part is one batch of the cache's windows: the reference runs on it once and the part keeps
what the cache stores of its tokens (rows of hidden states, or top-k data), under their row
numbers in the cache. The build's run directory is ``.NAME.build`` beside the cache
(:func:`lmkl.refcache.format.build_dir`), so a cache build behaves like every run: the first
Ctrl-C finishes the current part and stops, SIGKILL loses only the part being computed,
``--resume`` continues from the kept parts after the usual option and identity checks, and under
``torchrun`` the ranks compute disjoint parts. Once every part is there, rank 0 writes the cache
into the run directory (:class:`lmkl.refcache.build.CacheWriter`), renames it into place
(:func:`lmkl.refcache.build.install`) and removes the run directory: nothing is left beside the
finished cache, whose files are those of a cache built in one go (rows are placed by row number,
so neither the process count nor a resume changes a byte of them).
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq

from lmkl.data.corpus import load_corpus
from lmkl.data.windows import make_windows
from lmkl.engine.distributed import Shard, device_for_rank, init_shard
from lmkl.engine.identity import run_identity
from lmkl.engine.loop import LogCallback, Part, Plan, ProgressCallback, Summary, execute
from lmkl.engine.results import now
from lmkl.engine.rundir import RunDirectory
from lmkl.errors import Interrupted, LmklError, OutputError, ResumeError, UsageError
from lmkl.files import DirectoryLock
from lmkl.refcache.build import CacheWriter, install
from lmkl.refcache.format import BUILT, build_dir, is_cache_dir, recover, remove_leftovers
from lmkl.specs import ComputeSpec, DataSpec, ModelSpec, OutputSpec, WindowSpec

#: Where the run directory assembles the cache, and the cache once complete (then installed).
ASSEMBLING, ASSEMBLED = f"{BUILT}.partial", BUILT


class CacheBuild:
    """The ``cache`` run kind (see the module docstring)."""

    kind = "cache"
    token_level = False

    def __init__(
        self,
        reference: ModelSpec,
        data: DataSpec,
        windows: WindowSpec,
        compute: ComputeSpec,
        top_k: int | None,
        out: Path,
        model: Any = None,
    ) -> None:
        self.reference, self.data, self.windows, self.compute = reference, data, windows, compute
        #: The reference already in memory (a LoadedModel), used instead of loading ``reference``.
        self.model = model
        self.top_k = top_k
        self.out = out
        self.started = now().isoformat()

    def options(self) -> dict[str, Any]:
        return {
            "command": "cache",
            "reference": self.reference.model_dump(),
            "data": self.data.model_dump(),
            "windowing": self.windows.model_dump() | {"stride": self.windows.effective_stride},
            "compute": self.compute.model_dump(),
            "top_k": self.top_k,
        }

    def default_dir(self) -> Path:
        return build_dir(self.out)

    def prepare(self, shard: Shard, log: LogCallback) -> Plan:
        from lmkl.engine.common import load_logged
        from lmkl.models import check_context_length, shared_vocab_size, tokenizer_adds_bos
        from lmkl.scoring.batches import window_groups

        self.shard = shard
        # Data first: a wrong path should not wait for a large model to load.
        log(f"reading data {self.data.source}")
        corpus = load_corpus(self.data)
        spec = self.reference.model_copy(
            update={"device": device_for_rank(self.reference.device, shard)}
        )
        if self.model is not None:
            model = self.model
            self.model = None  # held by the writer only: freed with it once the cache is built
        else:
            model = load_logged(spec, "reference", log)
        check_context_length([model], self.windows)
        vocab_size, padded = shared_vocab_size([model])
        adds_bos = tokenizer_adds_bos(model.tokenizer)
        window_list = make_windows(
            corpus, model.tokenizer, self.windows, adds_bos, self.compute.max_tokens
        )
        self.writer = CacheWriter(
            model,
            window_list,
            data=self.data,
            corpus_description=corpus.description,
            windows=self.windows,
            compute=self.compute,
            top_k=self.top_k,
            vocab_size=vocab_size,
            padded=padded,
            adds_bos=adds_bos,
        )
        pad_id = model.tokenizer.pad_token_id
        self.pad_id = pad_id if pad_id is not None else 0
        self.groups = list(
            window_groups(window_list, self.compute.batch_size, self.compute.max_batch_tokens)
        )
        part_rows = [sum(w.num_targets for w in group) for group in self.groups]
        identity = run_identity(
            [(model.label, model.description)],
            corpus.description.get("fingerprint"),
            part_rows,
            windows=len(window_list),
            tokens=sum(part_rows),
            cache={"mode": self.writer.mode, "top_k": self.writer.k},
        )
        return Plan(part_rows=part_rows, identity=identity, schema=self.writer.part_schema)

    def ready(self, index: int) -> None:
        """The reference was loaded by ``prepare``: nothing to get per part."""

    def score(self, index: int) -> Part:
        from lmkl.scoring.batches import make_batch

        table = self.writer.part(make_batch(self.groups[index], self.pad_id))
        return Part(table=table, counters={"tokens": table.num_rows})

    def summarize(self, run_dir: RunDirectory, totals: dict[str, float]) -> Summary:
        """Write the cache from every part into the run directory (installed by the caller)."""
        assembling, assembled = run_dir.path / ASSEMBLING, run_dir.path / ASSEMBLED
        for path in (assembling, assembled):  # from a build killed while writing them
            shutil.rmtree(path, ignore_errors=True)
        tables = (pq.read_table(run_dir.part_path(i)) for i in run_dir.completed_indices())
        manifest = self.writer.write(
            assembling, tables, seconds=totals["seconds"], created=self.started
        )
        # Renamed only once complete: a complete cache in the run directory is what a resume
        # after a kill installs without writing it again.
        assembling.rename(assembled)
        seconds, tokens = totals["seconds"], totals.get("tokens", 0.0)
        return Summary(
            body={"cache": str(self.out), "manifest": manifest},
            throughput={
                "seconds": seconds,
                "tokens_per_s": tokens / seconds if seconds > 0 else None,
                "processes": self.shard.world_size,
                "cpu_seconds": totals["cpu_seconds"],
            },
            merge_parts_as=None,
        )


def build_cache(
    reference: ModelSpec,
    data: DataSpec,
    windows: WindowSpec,
    compute: ComputeSpec,
    out: str | Path,
    *,
    top_k: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
    progress: ProgressCallback | None = None,
    log: LogCallback | None = None,
    model: Any = None,
) -> dict[str, Any]:
    """Run ``reference`` once over ``data`` and write a reference cache to ``out``.

    ``model``: the reference already in memory (a :class:`~lmkl.models.LoadedModel`, see
    :func:`lmkl.engine.in_memory.in_memory_model`), built from instead of loading ``reference``.

    ``top_k=None`` writes the exact cache; ``top_k=K`` the compact one. Returns the manifest
    (on every rank of a multi-process build). ``resume`` continues an interrupted build of
    ``out`` from its kept parts; ``overwrite`` replaces an existing cache (and discards an
    interrupted build). Nothing is changed before the options, the output path and the models
    and data are checked. Raises :class:`lmkl.errors.LmklError` subclasses for anything the
    user can fix; :class:`lmkl.errors.Interrupted` after a graceful stop (parts are kept).
    """
    out = Path(out).expanduser()
    if top_k is not None and top_k < 1:
        raise UsageError("--top-k must be at least 1", "pass --top-k 32, for example")
    if resume and overwrite:
        raise UsageError(
            "--resume and --overwrite contradict each other",
            "pass --resume to continue the interrupted build, or --overwrite to start over",
        )
    work = build_dir(out)
    kind = CacheBuild(reference, data, windows, compute, top_k, out, model)
    shard = init_shard()
    lock: DirectoryLock | None = None
    installed = created = False
    try:
        # Rank 0 locks the build directory before anything looks at or removes it, and holds
        # the lock until the cache is installed: a second build of the same cache (a scheduler
        # restarting a job whose first copy still runs) is refused up front, in one line.
        if shard.is_main:
            lock = DirectoryLock(work, "reference cache build")
            created = not work.exists()
        shard.on_main(_lock_build, lock)  # (the other ranks get its error, if any)
        replace = shard.on_main(_check_destination, out, work, resume, overwrite, log)
        with _errors_name_the_cache(out, work, overwrite):
            outcome = execute(
                kind,
                OutputSpec(dir=str(work), overwrite=replace),
                resume=resume,
                # A build killed after writing its cache but before installing it: install it.
                reuse_finished=True,
                progress=progress,
                log=log,
                held_lock=lock,
            )
        shard.on_main(_install, work, out)
        installed = True
        shard.barrier()  # no rank tears the process group down while another still uses it
        return outcome.results["manifest"]
    finally:
        if lock is not None:
            # A refused or stopped build leaves a stale lock it took over as it found it.
            lock.release(restore=not installed)
            if created and not installed:
                with contextlib.suppress(OSError):  # only if nothing was kept in it
                    work.rmdir()
        shard.close()


def _lock_build(lock: DirectoryLock) -> None:
    """Create the build directory if need be and take its lock (or raise Busy)."""
    try:
        lock.directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise OutputError(
            f"cannot create the build directory '{lock.directory}': {exc.strerror}",
            "choose a writable --out directory",
        ) from exc
    lock.acquire()


def _check_destination(
    out: Path, work: Path, resume: bool, overwrite: bool, log: LogCallback | None
) -> bool:
    """Check ``out`` and its build directory before anything loads; change nothing a user made.

    Finishes or removes what a killed build left behind that nothing can use, and removes the
    cache a killed build was assembling (it is rewritten from the parts). Returns whether the
    engine is to replace the build directory (a new build over a stale or discarded one).
    """
    recover(out)
    for name in remove_leftovers(out, locked=True):
        if log:
            log(f"removed {name}, left behind by a killed build")
    if out.exists() and not out.is_dir():
        raise OutputError(f"'{out}' is a file, not a directory", "choose another --out directory")
    occupied = out.is_dir() and any(out.iterdir())
    if occupied and not is_cache_dir(out):
        raise OutputError(
            f"'{out}' is not empty and is not an lmkl cache; refusing to replace it",
            "choose an empty or new --out directory",
        )
    started = (work / "config.yaml").is_file()
    if resume:
        if not started:
            if occupied:
                raise ResumeError(
                    f"cache '{out}' is complete: no interrupted build of it to resume",
                    "drop --resume (add --overwrite to build it again)",
                )
            raise ResumeError(
                f"no interrupted build of '{out}' to resume", "drop --resume to start the build"
            )
        return False
    if occupied and not overwrite:
        raise OutputError(
            f"'{out}' already exists", "pass --overwrite to replace it, or choose another --out"
        )
    if not work.exists():
        return False
    finished = (work / "results.json").is_file()
    parts = len(RunDirectory(work).completed_indices())
    if (finished or parts) and not overwrite:
        state = "complete but not installed" if finished else f"{parts} parts done"
        raise OutputError(
            f"an interrupted build of '{out}' is kept in '{work}' ({state})",
            "pass --resume to continue it, or --overwrite to start over",
        )
    # Derived from the parts, and not files a run directory holds: the engine would refuse to
    # replace the directory with them in it.
    for name in (ASSEMBLING, ASSEMBLED):
        shutil.rmtree(work / name, ignore_errors=True)
    return True


def _install(work: Path, out: Path) -> None:
    """Rename the cache the build wrote into place, then remove the build directory."""
    assembled = work / ASSEMBLED
    if assembled.is_dir():
        try:
            install(assembled, out)
        except OSError as exc:
            raise OutputError(
                f"cannot put the finished cache in place at '{out}': "
                f"{exc.strerror or type(exc).__name__}; it is kept complete in '{assembled}'",
                "fix the directory's permissions or free disk space, then rerun the same "
                "command with --resume (it installs the kept cache without computing it again)",
            ) from exc
    shutil.rmtree(work, ignore_errors=True)


@contextmanager
def _errors_name_the_cache(out: Path, work: Path, overwrite: bool) -> Iterator[None]:
    """The engine's messages name its run directory and say ``--resume --out RUN_DIR``; the
    user named the cache, and ``lmkl cache`` resumes with ``--resume`` and the same ``--out``."""
    resume = "--resume" + (" in place of --overwrite" if overwrite else "")
    try:
        yield
    except Interrupted as exc:
        raise Interrupted(
            exc.message.replace(str(work), f"'{work}'"),
            f"continue with the same command plus {resume}"
            if not overwrite
            else f"continue with the same command, {resume}",
        ) from exc
    except LmklError as exc:
        hint = exc.hint or ""
        hint = hint.replace(f"with --resume --out {work}", f"with {resume}")
        hint = hint.replace("start a new run with another --out", "start over with --overwrite")
        hint = hint.replace("(see its config.yaml)", f"(see {work / 'config.yaml'})")
        message = exc.message.replace(f"'{work}'", f"the build of '{out}'")
        clone = type(exc).__new__(type(exc))
        LmklError.__init__(clone, message, hint or None)
        clone.problems = getattr(exc, "problems", [])  # type: ignore[attr-defined]
        raise clone from exc
