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

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from lmkl.errors import UsageError
from lmkl.specs import ComputeSpec, DataSpec, ModelSpec, OutputSpec, WindowSpec

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


#: ModelSpec fields that apply to the candidates only (the reference is never adapted or
#: quantized: it is the full-precision P).
_CANDIDATE_ONLY = ("adapter", "adapter_revision", "quantize", "gguf_file")
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
            raise UsageError(
                f"unknown option '{key}'",
                f"use one of: {', '.join(known)} (labels: pass ModelSpec/DataSpec objects)",
            )
    return routed


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
    data_spec = (
        None
        if data is None
        else _spec(
            DataSpec,
            data,
            data_opts | ({} if isinstance(data, DataSpec) else {"source": str(data)}),
            "data",
        )
    )
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
    model_opts, data_opts, window_opts, compute_opts = _split_options(options)

    def model(value: str | Path | ModelSpec, fields: dict[str, Any], what: str) -> ModelSpec:
        given = value if isinstance(value, ModelSpec) else None
        return _spec(ModelSpec, given, fields | ({} if given else {"model": str(value)}), what)

    ref_opts = {k: v for k, v in model_opts.items() if k not in _CANDIDATE_ONLY}
    ref_spec = model(reference, ref_opts, "the reference")
    cand_spec = model(candidate, model_opts, "the candidate")
    high_spec = None if high is None else model(high, model_opts, "HIGH")
    given_data = data if isinstance(data, DataSpec) else None
    source = {} if given_data else {"source": str(data)}
    data_spec = _spec(DataSpec, given_data, data_opts | source, "data")
    if windows is not None or window_opts:
        windows = _spec(WindowSpec, windows, window_opts, "windows")
    compute = _spec(ComputeSpec, compute, compute_opts, "compute")
    from lmkl.attribution.kind import run_attribution

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
