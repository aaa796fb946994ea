"""Option declarations every command shares (declared once), and the specs built from them."""

from __future__ import annotations

import inspect
import os
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer


def apply_offline(offline: bool) -> None:
    """Set the Hugging Face offline variables before any HF import (they are read at import)."""
    if offline or os.environ.get("LMKL_OFFLINE") == "1":
        from lmkl.models import set_offline

        set_offline(True)


class DType(str, Enum):
    auto = "auto"
    float32 = "float32"
    bfloat16 = "bfloat16"
    float16 = "float16"


class WindowingMode(str, Enum):
    documents = "documents"
    llama_cpp = "llama-cpp"


MODELS = "Models"
DATA = "Data"
WINDOWS = "Windows"
COMPUTE = "Compute"
OUTPUT = "Output"


def option(kind: Any, panel: str, help: str, *names: str, **settings: Any) -> Any:
    """An option alias ``Annotated[kind, typer.Option(...)]`` in one line: its type, its help
    panel, its help text, its names (none: from the parameter), any other ``typer.Option``
    setting (``min``, ``metavar``...). Every shared option is declared once with it."""
    return Annotated[kind, typer.Option(*names, help=help, rich_help_panel=panel, **settings)]


# Shared option aliases: declared once, reused by every command that needs them.
DataOpt = option(
    str | None,
    DATA,
    "Hub dataset, local .txt/.jsonl/.json/.csv/.parquet, or save_to_disk dir.",
    "--data",
    "-d",
)
SplitOpt = option(str | None, DATA, "Dataset split (default: the only one, else 'test').")
DatasetConfigOpt = option(str | None, DATA, "Hub dataset configuration name.", "--dataset-config")
TextFieldOpt = option(str, DATA, "Column holding the text.", "--text-field")
MaxSamplesOpt = option(int | None, DATA, "Use only the first N documents.", "--max-samples", min=1)
MaxTokensOpt = option(
    int | None, DATA, "Stop after this many scored tokens.", "--max-tokens", min=1
)
ContextOpt = option(int, WINDOWS, "Tokens per model input.", "--context-length", "-c", min=2)
StrideOpt = option(
    int | None,
    WINDOWS,
    "New tokens scored per sliding window (documents mode; default: half the context).",
    min=1,
)
WindowingOpt = option(
    WindowingMode,
    WINDOWS,
    "documents: each document alone; llama-cpp: llama-perplexity's chunks (second half scored).",
)
DTypeOpt = option(DType, MODELS, "Weights dtype for both models.")
RefDTypeOpt = option(
    DType | None, MODELS, "Override --dtype for the reference.", "--reference-dtype"
)
CandDTypeOpt = option(
    DType | None, MODELS, "Override --dtype for the candidate.", "--candidate-dtype"
)
DeviceOpt = option(str, MODELS, "auto, cpu, cuda, cuda:N or mps.")
RevisionOpt = option(str | None, MODELS, "Hub revision for both models.")
TrustOpt = option(
    bool, MODELS, "Run code shipped with the checkpoints (off by default).", "--trust-remote-code"
)
AttnOpt = option(str | None, MODELS, "eager, sdpa, flash_attention_2, ...", "--attn-implementation")
AdapterOpt = option(str | None, MODELS, "PEFT adapter applied to the candidate.")
AllowPickleOpt = option(bool, MODELS, "Allow pickle weight files (can run code).", "--allow-pickle")
# Single-value forms of compare's repeatable candidate options (commands of one candidate).
LabelOneOpt = option(str | None, MODELS, "The candidate's name in tables.", "--label")
GgufOneOpt = option(
    str | None,
    MODELS,
    "GGUF file in the candidate's directory or hub repo (a path ending in .gguf needs none).",
    "--gguf-file",
)
QuantizeOneOpt = option(
    str | None,
    MODELS,
    "The candidate is the reference quantized while loading, METHOD:SCHEME[:gGROUP], e.g. "
    "torchao:int4_weight_only:g32 (instead of a CANDIDATE). Needs lmkl[quant].",
    "--quantize",
)
OfflineOpt = option(bool, MODELS, "Never touch the network (HF offline mode).")
BatchOpt = option(int, COMPUTE, "Windows per forward pass.", "--batch-size", "-b", min=1)
ChunkOpt = option(
    int | None,
    COMPUTE,
    "Tokens per KL chunk (default: from --memory-budget).",
    "--chunk-tokens",
    min=1,
)
MemoryOpt = option(int, COMPUTE, "MiB for the KL stage's temporaries.", "--memory-budget", min=16)
MaxBatchTokensOpt = option(
    int | None,
    COMPUTE,
    "Sort windows by length and fill each batch up to this many padded tokens (instead of "
    "--batch-size consecutive windows).",
    "--max-batch-tokens",
    min=1,
)
CompileOpt = option(
    bool,
    COMPUTE,
    "torch.compile the fused KL kernel on large runs where the native CPU kernel does not run "
    "(GPUs; CPUs without a C compiler); falls back to eager if compilation fails.",
    "--compile/--no-compile",
)
DeviceMapOpt = option(
    str | None,
    MODELS,
    "Spread each model over the available devices (e.g. 'auto'; needs accelerate).",
    "--device-map",
)
TemperatureOpt = option(float, COMPUTE, "Compare softened distributions (1 = as is).", min=1e-6)
OutOpt = option(Path | None, OUTPUT, "Run directory to write.", "--out", "-o")
OverwriteOpt = option(bool, OUTPUT, "Replace an existing run directory.")
ResumeOpt = option(bool, OUTPUT, "Continue an interrupted run in --out.")
QuietOpt = option(bool, OUTPUT, "Print only the run directory.", "--quiet", "-q")
FailAboveOpt = option(
    list[str] | None,
    OUTPUT,
    "Exit 3 if a candidate's metric is above VALUE, e.g. kl.mean=0.05 or kl.p99=2 (repeatable).",
    "--fail-above",
    metavar="METRIC=VALUE",
)
FailBelowOpt = option(
    list[str] | None,
    OUTPUT,
    "Exit 3 if a candidate's metric is below VALUE, e.g. top1_agreement=0.9 (repeatable).",
    "--fail-below",
    metavar="METRIC=VALUE",
)


# Option groups: commands declare which groups they take (see :func:`with_options`) instead of
# repeating the same dozen parameters; the values arrive in the command's ``**options``.
OptionGroup = dict[str, tuple[Any, Any]]

MODEL_OPTIONS: OptionGroup = {
    "dtype": (DTypeOpt, DType.auto),
    "device": (DeviceOpt, "auto"),
    "revision": (RevisionOpt, None),
    "trust_remote_code": (TrustOpt, False),
    "attn_implementation": (AttnOpt, None),
    "allow_pickle": (AllowPickleOpt, False),
    "offline": (OfflineOpt, False),
}
PAIR_OPTIONS: OptionGroup = {
    "reference_dtype": (RefDTypeOpt, None),
    "candidate_dtype": (CandDTypeOpt, None),
}
DATA_SOURCE_OPTIONS: OptionGroup = {
    "split": (SplitOpt, None),
    "dataset_config": (DatasetConfigOpt, None),
    "text_field": (TextFieldOpt, "text"),
}
DATA_OPTIONS: OptionGroup = {
    "data": (DataOpt, None),
    **DATA_SOURCE_OPTIONS,
    "max_samples": (MaxSamplesOpt, None),
    "max_tokens": (MaxTokensOpt, None),
}
WINDOW_OPTIONS: OptionGroup = {
    "context_length": (ContextOpt, 512),
    "stride": (StrideOpt, None),
    "windowing": (WindowingOpt, WindowingMode.documents),
}
BATCH_OPTIONS: OptionGroup = {
    "batch_size": (BatchOpt, 8),
    "max_batch_tokens": (MaxBatchTokensOpt, None),
}
KL_OPTIONS: OptionGroup = {
    "chunk_tokens": (ChunkOpt, None),
    "memory_budget": (MemoryOpt, 1024),
}
GATE_OPTIONS: OptionGroup = {
    "fail_above": (FailAboveOpt, None),
    "fail_below": (FailBelowOpt, None),
}
OUTPUT_OPTIONS: OptionGroup = {
    "out": (OutOpt, None),
    "overwrite": (OverwriteOpt, False),
    "resume": (ResumeOpt, False),
    "quiet": (QuietOpt, False),
}


def with_options(*groups: OptionGroup) -> Any:
    """Add option groups to a command's signature (after its arguments).

    The command takes ``**options``; Typer reads the extended signature and passes every
    option by name. A parameter the command declares itself wins over a group's.
    """

    def decorate(func: Any) -> Any:
        signature = inspect.signature(func, eval_str=True)
        own = [p for p in signature.parameters.values() if p.kind is not p.VAR_KEYWORD]
        names = {p.name for p in own}
        added = [
            inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY, default=d, annotation=a)
            for group in groups
            for name, (a, d) in group.items()
            if name not in names
        ]
        # Arguments first, then the groups (their panels come first in --help, in the order
        # given), then the command's own options, which join those panels or add their own.
        leading = [p for p in own if p.default is p.empty]
        trailing = [p.replace(kind=p.KEYWORD_ONLY) for p in own if p.default is not p.empty]
        func.__signature__ = signature.replace(parameters=[*leading, *added, *trailing])
        # Evaluated annotations (this module uses postponed ones): Typer reads both.
        func.__annotations__ = {
            p.name: p.annotation for p in func.__signature__.parameters.values()
        } | {"return": signature.return_annotation}
        return func

    return decorate


def demo_value(value: str) -> str:
    """``demo:reference``, ``demo:candidate`` or ``demo:heldout`` (the models and held-out text
    ``lmkl demo`` builds and caches) → its path, building the demo on first use; other values as
    they are. An unknown demo name is a one-line usage error."""
    from lmkl.demo.names import is_demo_value, resolve_demo_value
    from lmkl.errors import UsageError

    if not is_demo_value(value):
        return value
    try:
        return resolve_demo_value(value, progress=lambda message: typer.echo(message, err=True))
    except ValueError as exc:
        raise UsageError(str(exc), "use one of the names listed") from None


def model_spec(model: str, options: dict[str, Any], **fields: Any) -> Any:
    """A ModelSpec from the model options (``fields`` override them); ``demo:NAME`` models are
    the cached demo's, labelled NAME."""
    from lmkl.demo.names import DEMO_SCHEME
    from lmkl.specs import ModelSpec

    if model and model.startswith(DEMO_SCHEME):
        fields.setdefault("label", model[len(DEMO_SCHEME) :])
        model = demo_value(model)

    values = {
        "dtype": options["dtype"].value,
        "device": options["device"],
        "revision": options["revision"],
        "trust_remote_code": options["trust_remote_code"],
        "attn_implementation": options["attn_implementation"],
        "allow_pickle": options["allow_pickle"],
        "device_map": options.get("device_map"),
    }
    return ModelSpec(model=model, **(values | fields))


def model_pair(reference: str, candidate: str, options: dict[str, Any]) -> tuple[Any, Any]:
    """Reference and candidate ModelSpecs from the shared model options (see
    :func:`model_specs`)."""
    ref_spec, (cand_spec,) = model_specs(reference, [candidate], options)
    return ref_spec, cand_spec


def model_specs(
    reference: str,
    candidates: list[str],
    options: dict[str, Any],
    *,
    labels: list[str] | None = None,
    gguf_files: list[str] | None = None,
    quantize: list[str] | None = None,
) -> tuple[Any, list[Any]]:
    """The reference's ModelSpec and one per candidate, from the shared model options.

    ``--reference-dtype``/``--candidate-dtype`` override ``--dtype``; the adapter applies to the
    named candidates. ``gguf_files`` pairs one GGUF file with each named candidate, in order;
    each ``quantize`` entry (``method:scheme[:gN]``) adds a candidate quantized from the
    reference; ``labels`` name the candidates in that order. A candidate whose display name is
    the reference's is shown as ``candidate`` and the reference as ``reference``.
    """
    from lmkl.errors import UsageError

    dtype = options["dtype"]
    ref_spec = model_spec(reference, options, dtype=(options.get("reference_dtype") or dtype).value)
    cand_dtype = (options.get("candidate_dtype") or dtype).value
    if gguf_files and len(gguf_files) != len(candidates):
        raise UsageError(
            f"{len(gguf_files)} --gguf-file values for {len(candidates)} candidates",
            "give one --gguf-file per candidate, in the candidates' order",
        )
    specs = [
        model_spec(
            name,
            options,
            dtype=cand_dtype,
            adapter=options.get("adapter"),
            **({"gguf_file": gguf_files[i]} if gguf_files else {}),
        )
        for i, name in enumerate(candidates)
    ]
    from lmkl.specs import parse_quantize

    for entry in quantize or []:
        q = parse_quantize(entry, "--quantize")
        specs.append(model_spec(reference, options, dtype=cand_dtype, quantize=q, label=q.name))
    if labels:
        if len(labels) > len(specs):
            raise UsageError(
                f"{len(labels)} --label values for {len(specs)} candidates",
                "give at most one --label per candidate, in order",
            )
        specs = [
            s.model_copy(update={"label": labels[i]}) if i < len(labels) else s
            for i, s in enumerate(specs)
        ]
    if any(s.display_name == ref_spec.display_name for s in specs):
        ref_spec = ref_spec.model_copy(update={"label": "reference"})
        if len(specs) == 1:  # a model against itself (another dtype, say): name both roles
            specs[0] = specs[0].model_copy(update={"label": "candidate"})
    return ref_spec, specs


def compute_spec(options: dict[str, Any], **fields: Any) -> Any:
    """A ComputeSpec from whichever compute options the command has (``fields`` override)."""
    from lmkl.specs import ComputeSpec

    renamed = {"memory_budget": "memory_budget_mb"}
    values = {
        renamed.get(name, name): options[name]
        for name in (
            "batch_size",
            "max_batch_tokens",
            "chunk_tokens",
            "memory_budget",
            "max_tokens",
            "temperature",
            "compile",
        )
        if name in options
    }
    return ComputeSpec(**(values | fields))


def window_spec(windowing: WindowingMode, context_length: int, stride: int | None) -> Any:
    """The WindowSpec of the window options (one-line usage error when they contradict)."""
    from pydantic import ValidationError

    from lmkl.errors import UsageError
    from lmkl.specs import WindowSpec

    try:
        return WindowSpec(windowing=windowing.value, context_length=context_length, stride=stride)
    except ValidationError as exc:
        message = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise UsageError(message, "adjust --stride or --context-length") from None


def data_spec(
    options: dict[str, Any], source: str = "data", samples: str = "max_samples", **fields: Any
) -> Any:
    """The DataSpec of the data options; a one-line usage error when no data is given."""
    from lmkl.errors import UsageError
    from lmkl.specs import DataSpec

    if options.get(source) is None:
        raise UsageError(f"no {source} given", f"pass --{source} FILE_OR_DATASET")
    return DataSpec(
        source=demo_value(options[source]),
        split=options["split"],
        dataset_config=options["dataset_config"],
        text_field=options["text_field"],
        max_samples=options[samples],
        **fields,
    )


def given(ctx: typer.Context, *names: str) -> bool:
    """Whether any of these options was set explicitly (not left at its default)."""
    # Compared by name: typer vendors its own copy of click's ParameterSource enum.
    return any(
        getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")
        for name in names
    )


ConfigArg = Annotated[
    Path,
    typer.Argument(help="Experiment YAML (`lmkl init --list` shows examples).", show_default=False),
]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="key.path=value overrides with YAML-typed values, e.g. compute.batch_size=4 "
        "candidates.0.dtype=float16.",
        show_default=False,
    ),
]


def load_with_options(config: Path, overrides: list[str] | None, settings: dict[str, Any]) -> Any:
    """The validated config: YAML, then overrides, then dedicated options (command line wins)."""
    from lmkl.experiment.schema import load_config

    return load_config(
        config, overrides or [], {k: v for k, v in settings.items() if v is not None}
    )


ViewTokensOpt = option(
    int,
    OUTPUT,
    "Record both models' top-5 next tokens on the worst documents, up to N tokens, for the "
    "report's token view (`lmkl report RUN --view tokens`); 0: off.",
    "--view-tokens",
    min=0,
    metavar="N",
)


class ViewDocs(str, Enum):
    worst = "worst"
    sample = "sample"


ViewDocsOpt = option(
    ViewDocs,
    OUTPUT,
    "Which documents --view-tokens records: the worst by mean KL, or a random (seeded) sample "
    "of typical text.",
    "--view-docs",
)
