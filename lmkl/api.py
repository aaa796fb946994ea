"""The one-call Python API, the engine's face: ``lmkl.compare(...)`` and ``lmkl.open_run(...)``.

Usage::

    import lmkl

    run = lmkl.compare("org/reference", ["org/candidate-int4"], data="held_out.jsonl",
                       out="runs/int4", context_length=512, dtype="bfloat16")
    int8 = ModelSpec(model="org/model", quantize={"method": "torchao", "scheme": "int8_dynamic"})
    run = lmkl.compare("org/model", [int8, "gguf-dir/model-Q4_0.gguf"], data="held_out.jsonl")
    run.metrics()["kl"]["mean"]          # KL(P‖Q) in nats, averaged over tokens
    run.tokens().to_pandas()             # one row per scored token (tokens.parquet)
    run.report("int4.html")              # the self-contained HTML report

    run = lmkl.open_run("runs/int4")     # the same object for a finished run

Keyword options are the fields of :class:`~lmkl.specs.ModelSpec` (applied to every model given
by name), :class:`~lmkl.specs.DataSpec`, :class:`~lmkl.specs.WindowSpec` and
:class:`~lmkl.specs.ComputeSpec`; spec objects may be passed instead of names.
"""

from __future__ import annotations

import contextlib
import contextvars
import difflib
import functools
import inspect
import re
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

from lmkl.errors import LmklError, UsageError
from lmkl.specs import (
    CANDIDATE_ONLY,
    ComputeSpec,
    DataSpec,
    ModelSpec,
    OutputSpec,
    WindowSpec,
)

_SPECS: tuple[type, ...] = (ModelSpec, DataSpec, WindowSpec, ComputeSpec)


class Run:
    """A finished run directory: its results, per-token rows, worst positions and report."""

    def __init__(self, path: str | Path, results: dict[str, Any] | None = None) -> None:
        from lmkl.engine.rundir import load_results

        self.path = Path(path)
        self.results: dict[str, Any] = results if results is not None else load_results(self.path)

    def __repr__(self) -> str:
        return f"Run({str(self.path)!r}, kind={self.kind!r}, candidates={self.labels})"

    @property
    def kind(self) -> str:
        """``compare``, ``bytes-compare``, ``sample-kl`` or ``experiment``."""
        return str(self.results.get("kind", "compare"))

    @property
    def labels(self) -> list[str]:
        """The candidates' labels, in order."""
        return [c["label"] for c in self.results.get("candidates", [])]

    def metrics(self, label: str | None = None) -> dict[str, Any]:
        """The summary metrics of one candidate (default: the first)."""
        entries = self.results.get("candidates", [])
        if not entries:
            raise UsageError(f"run '{self.path}' has no candidates", "open a finished run")
        if label is None:
            return entries[0]["metrics"]
        for entry in entries:
            if entry["label"] == label:
                return entry["metrics"]
        raise UsageError(
            f"run '{self.path}' has no candidate '{label}'", f"use one of: {', '.join(self.labels)}"
        )

    def _run_dirs(self, dataset: str | None) -> list[tuple[str | None, Path]]:
        """The run directories holding per-token files: an experiment's per-dataset sub-runs."""
        if self.kind != "experiment":
            return [(None, self.path)]
        folder = self.path / "datasets"
        subs = sorted(p for p in folder.iterdir() if p.is_dir()) if folder.is_dir() else []
        chosen = [(p.name, p) for p in subs if dataset is None or p.name == dataset]
        if not chosen:
            names = ", ".join(p.name for p in subs)
            raise UsageError(
                f"experiment '{self.path}' has no dataset '{dataset}'", f"use: {names}"
            )
        return chosen

    def tokens(
        self, columns: list[str] | None = None, label: str | None = None, dataset: str | None = None
    ) -> Any:
        """tokens.parquet as an Arrow table (``.to_pandas()`` for a DataFrame), optionally one
        candidate's rows and some columns only. For an experiment: every dataset's rows with a
        ``dataset`` column (or one ``dataset``'s)."""
        import pyarrow as pa

        from lmkl.engine.rundir import load_tokens

        filters = [("candidate", "=", label)] if label is not None else None
        tables = []
        for name, path in self._run_dirs(dataset):
            table = load_tokens(path, columns=columns, filters=filters)
            if name is not None:
                table = table.append_column("dataset", pa.array([name] * table.num_rows))
            tables.append(table)
        return pa.concat_tables(tables)

    def worst(self, label: str | None = None, dataset: str | None = None) -> list[dict[str, Any]]:
        """The worst positions (highest KL) with context and both models' top-5 next tokens
        (an experiment's entries carry their ``dataset``)."""
        import json

        out = []
        for name, path in self._run_dirs(dataset):
            file = path / "worst.json"
            for entry in json.loads(file.read_text()) if file.exists() else []:
                if label is None or entry.get("candidate") == label:
                    out.append(entry if name is None else entry | {"dataset": name})
        return out

    def report(
        self,
        path: str | Path | None = None,
        format: str = "html",
        *,
        view: str = "summary",
        docs: list[int] | None = None,
    ) -> Path | None:
        """Write the report (html, md or json; default RUN_DIR/report.html); return its path.

        ``view="tokens"`` opens the HTML page on the token view (a run compared with
        ``view_tokens=N``); ``docs`` picks the recorded documents it shows."""
        from lmkl.report.render import write_report

        return write_report([self.path], format, Path(path) if path else None, view=view, docs=docs)


def open_run(path: str | Path) -> Run:
    """A finished run directory as a :class:`Run` (one-line error if it is not one)."""
    return Run(path)


#: ModelSpec fields that apply to the candidates only (see lmkl.specs.CANDIDATE_ONLY).
_CANDIDATE_ONLY = CANDIDATE_ONLY
_NOT_OPTIONS = ("model", "source", "label")


def _split_options(options: dict[str, Any]) -> list[dict[str, Any]]:
    """Route keyword options to the spec that declares them (model, data, windows, compute)."""
    routed: list[dict[str, Any]] = [{} for _ in _SPECS]
    for key, value in options.items():
        for i, spec in enumerate(_SPECS):
            if key in spec.model_fields and key not in _NOT_OPTIONS:
                routed[i][key] = value
                break
        else:
            known = sorted({f for s in _SPECS for f in s.model_fields} - set(_NOT_OPTIONS))
            known += sorted(_API_KEYWORDS - set(known))
            close = difflib.get_close_matches(key, known, n=3, cutoff=0.6)
            if close:
                raise UsageError(
                    f"unknown keyword '{key}'; did you mean {' or '.join(close)}?",
                    f"spell it {close[0]}=... (help(lmkl.compare) lists every keyword)",
                )
            raise UsageError(
                f"unknown keyword '{key}'",
                f"use one of: {', '.join(sorted(known))} (labels: pass ModelSpec/DataSpec objects)",
            )
    return routed


#: The keyword-only parameters of every function decorated by :func:`python_errors` (beside the
#: spec fields they route): the flags an error may name that a Python caller passes as keywords.
_API_KEYWORDS: set[str] = set()


#: A command-line flag inside an error message (``--context-length 256``, ``--overwrite``).
_FLAG = re.compile(r"(?<![\w-])--([a-z][a-z0-9-]*)(?: ([^\s,;)]+))?")
#: Words that follow a flag in a sentence without being its value.
_PROSE = frozenset(
    [
        "to",
        "or",
        "and",
        "directory",
        "with",
        "for",
        "in",
        "of",
        "the",
        "a",
        "an",
        "is",
        "instead",
        "first",
        "too",
        "only",
        "set",
        "that",
        "which",
        "when",
        "if",
        "plus",
        "on",
        "at",
        "as",
        "it",
        "from",
    ]
)


def _keyword_text(text: str | None) -> str | None:
    """``text`` with the command-line flags of lmkl's messages written as the keywords of
    the API (``--context-length 256`` → ``context_length=256``, ``--overwrite`` →
    ``overwrite=True``); flags that are not keywords stay as they are."""
    if not text:
        return text
    fields = {
        name: info.annotation
        for spec in (*_SPECS, OutputSpec)
        for name, info in spec.model_fields.items()
    }
    keywords = set(fields) | _API_KEYWORDS | {"out"}

    def keyword(match: re.Match[str]) -> str:
        name, value = match.group(1).replace("-", "_"), match.group(2)
        if name not in keywords:
            return match.group(0)
        if fields.get(name) is bool or name in ("overwrite", "resume", "different_tokenizers"):
            return f"{name}=True" + (f" {value}" if value else "")
        if name == "quantize" and value and value.count(":") in (1, 2):
            method, scheme, *group = value.split(":")  # a QuantizeSpec's fields, not a string
            fields_text = f"'method': {method!r}, 'scheme': {scheme!r}" + (
                f", 'group_size': {group[0].removeprefix('g')}" if group else ""
            )
            return f"quantize={{{fields_text}}}"
        if value is not None and re.fullmatch(r"[A-Z_]+", value):
            return f"{name}=..."  # a placeholder such as FILE or BITS
        if value is None or value.lower() in _PROSE:
            return f"{name}=..." + (f" {value}" if value else "")
        shown = value if re.fullmatch(r"-?[0-9.e]+", value) else repr(value.strip("'\""))
        return f"{name}={shown}"

    return _FLAG.sub(keyword, text)


#: Set while a CLI command runs: its errors keep naming the command-line flags.
_FROM_COMMAND_LINE: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "lmkl_from_command_line", default=False
)


@contextlib.contextmanager
def command_line_caller() -> Iterator[None]:
    """Within this block (a CLI command), API errors name flags, not keyword arguments."""
    token = _FROM_COMMAND_LINE.set(True)
    try:
        yield
    finally:
        _FROM_COMMAND_LINE.reset(token)


def python_errors(function: Callable[..., Any]) -> Callable[..., Any]:
    """Decorate an API function: called from Python, the :class:`~lmkl.errors.LmklError` it
    raises names keyword arguments instead of command-line flags (the same checks serve the CLI
    and Python; a CLI command runs inside :func:`command_line_caller` and keeps the flags)."""
    _API_KEYWORDS.update(
        name
        for name, param in inspect.signature(function).parameters.items()
        if param.kind is inspect.Parameter.KEYWORD_ONLY
    )

    @functools.wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return function(*args, **kwargs)
        except LmklError as exc:
            if _FROM_COMMAND_LINE.get():
                raise
            exc.message = _keyword_text(exc.message) or exc.message
            exc.hint = _keyword_text(exc.hint)
            exc.args = (exc.message, *exc.args[1:])
            raise

    return wrapper


def _spec(cls: type, given: Any, fields: dict[str, Any], what: str) -> Any:
    """``given`` if it is a ``cls`` already (keywords for it are then refused), else a ``cls``
    built from ``fields``; validation problems become one usage error."""
    from pydantic import ValidationError

    if isinstance(given, cls):
        if fields:
            raise UsageError(
                f"{', '.join(sorted(fields))} given as keywords and {what} as a "
                f"{cls.__name__}: the keywords would be ignored",
                f"put them in the {cls.__name__}, or pass {what} by name",
            )
        return given
    try:
        return cls(**fields)
    except ValidationError as exc:
        problem = exc.errors()[0]
        where = ".".join(str(p) for p in problem["loc"]) or what
        message = str(problem["msg"]).removeprefix("Value error, ")
        raise UsageError(f"{where}: {message}", f"correct {where} of {what}") from None


def _data_spec(data: str | Path | DataSpec | None, fields: dict[str, Any]) -> DataSpec | None:
    """The DataSpec of ``data`` given by name (with ``fields``) or as a spec (None: none)."""
    if data is None:
        return None
    given = {} if isinstance(data, DataSpec) else {"source": str(data)}
    return _spec(DataSpec, data, fields | given, "data")


@python_errors
def compare(
    reference: str | Path | ModelSpec,
    candidates: str | Path | ModelSpec | Sequence[str | Path | ModelSpec],
    data: str | Path | DataSpec | None = None,
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    different_tokenizers: bool = False,
    windows: WindowSpec | None = None,
    compute: ComputeSpec | None = None,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> Run:
    """Compare ``candidates`` with ``reference`` token by token and return the finished run.

    ``reference`` may be a reference cache (``lmkl cache``); ``data`` may then be omitted.
    ``different_tokenizers=True`` compares two models with different tokenizers per byte
    instead (no token-level KL). ``windows``/``compute`` take whole spec objects instead of
    their fields as keywords; ``progress(done, total)`` and ``log(message)`` report as it goes.
    Raises :class:`lmkl.errors.LmklError` for anything the user can fix; KL(P‖Q) always has the
    reference as P, in nats.
    """
    model_opts, data_opts, window_opts, compute_opts = _split_options(options)
    cand_list = [candidates] if isinstance(candidates, str | Path | ModelSpec) else list(candidates)
    ref_opts = {k: v for k, v in model_opts.items() if k not in _CANDIDATE_ONLY}
    if isinstance(reference, ModelSpec):
        ref_spec = _spec(ModelSpec, reference, ref_opts, "the reference")
    else:
        ref_spec = _spec(ModelSpec, None, ref_opts | {"model": str(reference)}, "the reference")
    cand_specs = [
        _spec(ModelSpec, c, model_opts, "a candidate")
        if isinstance(c, ModelSpec)
        else _spec(ModelSpec, None, model_opts | {"model": str(c)}, "a candidate")
        for c in cand_list
    ]
    if data is None and data_opts:
        raise UsageError(
            f"{', '.join(sorted(data_opts))} given without data",
            "pass data=... (a reference cache uses its own data: drop them)",
        )
    data_spec = _data_spec(data, data_opts)
    if windows is not None or window_opts:
        windows = _spec(WindowSpec, windows, window_opts, "windows")
    compute = _spec(ComputeSpec, compute, compute_opts, "compute")
    output = OutputSpec(dir=str(out) if out else None, overwrite=overwrite)
    from lmkl.engine.loop import execute

    kind: Any
    if different_tokenizers:
        from lmkl.engine.bytes_compare import BytesComparison

        if len(cand_specs) != 1 or data_spec is None:
            raise UsageError(
                "a per-byte comparison takes one candidate and data",
                "pass one candidate and data=...",
            )
        kind = BytesComparison(ref_spec, cand_specs[0], data_spec, windows or WindowSpec(), compute)
    else:
        from lmkl.engine.token_compare import TokenComparison

        kind = TokenComparison(ref_spec, cand_specs, data_spec, windows, compute)
    outcome = execute(kind, output, resume=resume, progress=progress, log=log)
    run = Run(outcome.path, outcome.results)
    run.is_main = outcome.is_main  # type: ignore[attr-defined]
    return run


def _is_model_object(value: Any) -> bool:
    """A model given as an object (not a name, path or spec)."""
    return not isinstance(value, str | Path | ModelSpec)


@python_errors
def build_reference_cache(
    reference: str | Path | ModelSpec | Any,
    data: str | Path | DataSpec,
    out: str | Path,
    *,
    tokenizer: Any = None,
    top_k: int | None = None,
    overwrite: bool = False,
    resume: bool = False,
    windows: WindowSpec | None = None,
    compute: ComputeSpec | None = None,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> Path:
    """Run ``reference`` once over ``data`` and write a reference cache to ``out`` (``lmkl cache``).

    ``reference`` is a hub id, a directory, a :class:`~lmkl.specs.ModelSpec` or a causal LM
    object already in memory (then ``tokenizer`` is its tokenizer; it is scored in eval mode and
    left as it was). Keyword options as for :func:`compare`. Returns ``out``.
    """
    from lmkl.engine.cache_build import build_cache
    from lmkl.engine.in_memory import in_memory_model, scoring_mode

    model_opts, data_opts, window_opts, compute_opts = _split_options(options)
    loaded = None
    if _is_model_object(reference):
        if model_opts:
            raise UsageError(
                f"{', '.join(sorted(model_opts))} given for a model object",
                "load the model as wanted before passing it, or drop the options",
            )
        loaded = in_memory_model(reference, tokenizer, label="reference")
        spec = loaded.spec
    elif isinstance(reference, ModelSpec):
        spec = _spec(ModelSpec, reference, model_opts, "the reference")
    else:
        spec = _spec(ModelSpec, None, model_opts | {"model": str(reference)}, "the reference")
    data_spec = _data_spec(data, data_opts)
    if data_spec is None:
        raise UsageError("no data given", "pass data=FILE_OR_DATASET")
    window_spec = _spec(WindowSpec, windows, window_opts, "windows")
    compute_spec = _spec(ComputeSpec, compute, compute_opts, "compute")
    run = dict(top_k=top_k, overwrite=overwrite, resume=resume, progress=progress, log=log)
    if loaded is None:
        build_cache(spec, data_spec, window_spec, compute_spec, out, **run)
    else:
        with scoring_mode(loaded.model):
            build_cache(spec, data_spec, window_spec, compute_spec, out, model=loaded, **run)
    return Path(out)


@python_errors
def score_against(
    reference_cache: str | Path,
    model: Any,
    data: str | Path | DataSpec | None = None,
    *,
    tokenizer: Any = None,
    label: str = "model",
    step: int | None = None,
    out: str | Path | None = None,
    overwrite: bool = False,
    windows: WindowSpec | None = None,
    compute: ComputeSpec | None = None,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> dict[str, Any]:
    """Score a model in memory against a reference cache: the metrics ``lmkl compare`` gives.

    For custom training loops (accelerate, Lightning, plain PyTorch)::

        lmkl.build_reference_cache("org/teacher", "held_out.jsonl", "teacher-cache")
        ...
        metrics = lmkl.score_against("teacher-cache", model, tokenizer=tokenizer, step=step)
        metrics["kl"]["mean"], metrics["kl"]["se"]   # KL(teacher‖model), nats per token

    ``model`` is a causal LM object (with ``tokenizer``) or a loaded
    :class:`~lmkl.models.LoadedModel`; it is scored where it is, in its dtype, in eval mode
    under ``no_grad``, and left as it was: train/eval flags and the Python, NumPy, torch and
    CUDA random generators are restored. Only the model runs: the reference's side is read
    from the cache, whose windows (and data) are used; ``data`` and the window options, if
    given, must be the cache's. Under ``torchrun``/``accelerate launch`` (every process calls
    it) the windows are shared out and merged exactly; every process gets the metrics.
    ``out``: also keep the complete run directory there (``lmkl report``/``lmkl select`` read
    it; ``step`` and ``label`` name the candidate in it); by default it is a temporary
    directory, removed. Returns the candidate's metrics as in results.json (``kl``,
    ``reverse_kl``, ``jsd`` with mean, se and quantiles; ``nll_reference``,
    ``nll_candidate``, ``top1_agree`` with mean and se; ...).
    """
    import os
    import shutil
    import tempfile

    from lmkl.engine.in_memory import IN_MEMORY_PREFIX, in_memory_model, scoring_mode
    from lmkl.engine.loop import execute
    from lmkl.engine.token_compare import TokenComparison
    from lmkl.models import LoadedModel
    from lmkl.refcache.format import is_cache_dir

    if not is_cache_dir(reference_cache):
        raise UsageError(
            f"'{reference_cache}' is not an lmkl reference cache",
            "build one with lmkl cache or lmkl.build_reference_cache(teacher, data, DIR)",
        )
    model_opts, data_opts, window_opts, compute_opts = _split_options(options)
    if model_opts:
        raise UsageError(
            f"{', '.join(sorted(model_opts))} given for a model in memory",
            "drop them: the model is scored as it is",
        )
    if isinstance(model, LoadedModel):
        loaded = model
    else:
        loaded = in_memory_model(model, tokenizer, label=label)
    spec = loaded.spec.model_copy(update={"step": step})
    if not spec.model.startswith(IN_MEMORY_PREFIX):
        raise UsageError(
            f"'{spec.model}' is a model to load, not one in memory",
            "pass the model object, or compare files with lmkl.compare",
        )
    loaded.spec = spec
    loaded.description["step"] = step
    data_spec = _data_spec(data, data_opts)
    if windows is not None or window_opts:
        windows = _spec(WindowSpec, windows, window_opts, "windows")
    if out is None and compute is None:
        # Nothing reads worst.json of a run that is removed: skip collecting it.
        compute_opts.setdefault("worst_k", 0)
    compute_spec = _spec(ComputeSpec, compute, compute_opts, "compute")
    kind = TokenComparison(
        ModelSpec(model=str(reference_cache)),
        [spec],
        data_spec,
        windows,
        compute_spec,
        candidate_models=[loaded],
    )
    # A run nobody keeps: in memory where the system has a tmpfs (its fsyncs cost nothing).
    shm = Path("/dev/shm")
    where = str(shm) if shm.is_dir() and os.access(shm, os.W_OK) else None
    scratch = None if out is not None else Path(tempfile.mkdtemp(prefix="lmkl-score-", dir=where))
    try:
        # (Every process passes a directory; the engine uses rank 0's.)
        target = Path(out) if out is not None else scratch / "run"  # type: ignore[operator]
        with scoring_mode(loaded.model):
            outcome = execute(
                kind,
                OutputSpec(dir=str(target), overwrite=overwrite),
                progress=progress,
                log=log,
            )
    finally:
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    return outcome.results["candidates"][0]["metrics"]


@python_errors
def attribute(
    reference: str | Path | ModelSpec,
    candidate: str | Path | ModelSpec,
    data: str | Path | DataSpec,
    *,
    out: str | Path | None = None,
    overwrite: bool = False,
    resume: bool = False,
    windows: WindowSpec | None = None,
    compute: ComputeSpec | None = None,
    high: str | Path | ModelSpec | None = None,
    budget_bits: float | None = None,
    progress: Callable[[int, int], None] | None = None,
    log: Callable[[str], None] | None = None,
    **options: Any,
) -> Run:
    """Where in the model ``candidate``'s KL comes from: each weight-holding module, decoder
    layer and layer prefix of the reference taken from ``candidate`` (same module structure)
    on its own, with document-bootstrap intervals; ``results["full"]`` is what :func:`compare`
    reports. ``high`` and ``budget_bits`` add a measured mixed-precision recipe (modules of
    ``candidate`` taken from ``high`` within ``budget_bits`` stored bits per weight). Options as
    for :func:`compare`; see README, "Attribution".
    """
    from lmkl.attribution.kind import run_attribution
    from lmkl.specs import high_model_spec

    model_opts, data_opts, window_opts, compute_opts = _split_options(options)

    def model(value: str | Path | ModelSpec, fields: dict[str, Any], what: str) -> ModelSpec:
        given = value if isinstance(value, ModelSpec) else None
        return _spec(ModelSpec, given, fields | ({} if given else {"model": str(value)}), what)

    ref_opts = {k: v for k, v in model_opts.items() if k not in _CANDIDATE_ONLY}
    ref_spec = model(reference, ref_opts, "the reference")
    cand_spec = model(candidate, model_opts, "the candidate")
    high_spec = None
    if high is not None:  # the command line's --high, parsed by the same function
        flag = "--high" if _FROM_COMMAND_LINE.get() else "high"
        high_spec = high_model_spec(high, ref_spec, cand_spec, flag)
    data_spec = _data_spec(data, data_opts)
    if data_spec is None:
        raise UsageError("no data given", "pass data=FILE_OR_DATASET")
    if windows is not None or window_opts:
        windows = _spec(WindowSpec, windows, window_opts, "windows")
    compute = _spec(ComputeSpec, compute, compute_opts, "compute")
    outcome = run_attribution(
        ref_spec,
        cand_spec,
        data_spec,
        windows,
        compute,
        OutputSpec(dir=str(out) if out else None, overwrite=overwrite),
        high=high_spec,
        budget_bits=budget_bits,
        resume=resume,
        progress=progress,
        log=log,
    )
    run = Run(outcome.path, outcome.results)
    run.is_main = outcome.is_main  # type: ignore[attr-defined]
    return run
