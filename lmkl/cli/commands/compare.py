"""``lmkl compare REFERENCE CANDIDATE --data DATA``: one candidate against one reference."""

from __future__ import annotations

import os
from enum import Enum
from typing import Annotated, Any

import typer

from lmkl.cli.common import (
    DATA,
    MODELS,
    AdapterOpt,
    AllowPickleOpt,
    AttnOpt,
    BatchOpt,
    CandDTypeOpt,
    ChunkOpt,
    CompileOpt,
    ContextOpt,
    DataOpt,
    DatasetConfigOpt,
    DeviceMapOpt,
    DeviceOpt,
    DType,
    DTypeOpt,
    FailAboveOpt,
    FailBelowOpt,
    MaxBatchTokensOpt,
    MaxSamplesOpt,
    MaxTokensOpt,
    MemoryOpt,
    OfflineOpt,
    OutOpt,
    OverwriteOpt,
    QuietOpt,
    RefDTypeOpt,
    ResumeOpt,
    RevisionOpt,
    SplitOpt,
    StrideOpt,
    TemperatureOpt,
    TextFieldOpt,
    TokenProgress,
    TrustOpt,
    WindowingMode,
    WindowingOpt,
    apply_offline,
    friendly_errors,
    model_pair,
    stdout,
)


class ScoreOn(str, Enum):
    all = "all"
    assistant = "assistant"


ScoreOnOpt = Annotated[
    ScoreOn | None,
    typer.Option(
        "--score-on",
        help="Chat data (a messages column): score the assistant tokens (default) or "
        "all tokens of the rendered conversation.",
        rich_help_panel=DATA,
    ),
]
DifferentTokenizersOpt = Annotated[
    bool,
    typer.Option(
        "--different-tokenizers",
        help="The models have different tokenizers: compare bits per "
        "byte on the same text instead (no token-level KL).",
        rich_help_panel=MODELS,
    ),
]


@friendly_errors
def compare(
    ctx: typer.Context,
    reference: Annotated[
        str,
        typer.Argument(
            help="Reference model P: hub id, local directory, or a reference cache (`lmkl cache`)."
        ),
    ],
    candidate: Annotated[str, typer.Argument(help="Candidate model Q: hub id or local directory.")],
    data: DataOpt = None,
    split: SplitOpt = None,
    dataset_config: DatasetConfigOpt = None,
    text_field: TextFieldOpt = "text",
    score_on: ScoreOnOpt = None,
    max_samples: MaxSamplesOpt = None,
    max_tokens: MaxTokensOpt = None,
    context_length: ContextOpt = 512,
    stride: StrideOpt = None,
    windowing: WindowingOpt = WindowingMode.documents,
    dtype: DTypeOpt = DType.auto,
    reference_dtype: RefDTypeOpt = None,
    candidate_dtype: CandDTypeOpt = None,
    device: DeviceOpt = "auto",
    device_map: DeviceMapOpt = None,
    revision: RevisionOpt = None,
    trust_remote_code: TrustOpt = False,
    attn_implementation: AttnOpt = None,
    adapter: AdapterOpt = None,
    allow_pickle: AllowPickleOpt = False,
    offline: OfflineOpt = False,
    different_tokenizers: DifferentTokenizersOpt = False,
    batch_size: BatchOpt = 8,
    max_batch_tokens: MaxBatchTokensOpt = None,
    chunk_tokens: ChunkOpt = None,
    memory_budget: MemoryOpt = 1024,
    temperature: TemperatureOpt = 1.0,
    compile: CompileOpt = True,
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
    fail_above: FailAboveOpt = None,
    fail_below: FailBelowOpt = None,
) -> None:
    """Compare CANDIDATE with REFERENCE token by token: KL both ways, JSD, PPL, agreement."""
    apply_offline(offline)
    from lmkl.analysis.gates import (
        gates_from_mapping,
        gates_report,
        parse_gate_options,
        raise_for_failures,
    )
    from lmkl.errors import UsageError
    from lmkl.refcache.format import is_cache_dir
    from lmkl.specs import ComputeSpec, DataSpec, OutputSpec, WindowSpec

    # Parsed before any work so that a bad gate is a usage error (exit 2), not a late surprise.
    gates = gates_from_mapping(
        parse_gate_options(fail_above or [], "--fail-above"),
        parse_gate_options(fail_below or [], "--fail-below"),
    )

    cached = is_cache_dir(reference)
    if data is None and not cached:
        raise UsageError("no data given", "pass --data FILE_OR_DATASET")
    common = {
        "revision": revision,
        "device": device,
        "trust_remote_code": trust_remote_code,
        "attn_implementation": attn_implementation,
        "allow_pickle": allow_pickle,
        "device_map": device_map,
    }
    ref_spec, cand_spec = model_pair(
        reference, candidate, dtype, reference_dtype, candidate_dtype, adapter, **common
    )
    data_spec = (
        DataSpec(
            source=data,
            split=split,
            dataset_config=dataset_config,
            text_field=text_field,
            max_samples=max_samples,
            score_on=score_on.value if score_on else None,
        )
        if data
        else None
    )
    window_spec = _window_spec(WindowSpec, windowing, context_length, stride)
    if cached and not _given(ctx, "context_length", "stride", "windowing"):
        window_spec = None  # a reference cache holds its windows; given ones must match them
    compute = ComputeSpec(
        batch_size=batch_size,
        chunk_tokens=chunk_tokens,
        memory_budget_mb=memory_budget,
        max_tokens=max_tokens,
        temperature=temperature,
        max_batch_tokens=max_batch_tokens,
        compile=compile,
    )
    output = OutputSpec(dir=str(out) if out else None, overwrite=overwrite)
    if different_tokenizers:
        if gates:
            raise UsageError(
                "--fail-above/--fail-below need token-level metrics, which "
                "--different-tokenizers does not compute",
                "drop the gates or compare models that share a tokenizer",
            )
        run_bytes_and_show(
            ref_spec, cand_spec, data_spec, window_spec, compute, output, resume, quiet
        )
        return
    outcome = run_and_show(
        ref_spec, [cand_spec], data_spec, window_spec, compute, output, resume, quiet
    )
    if gates and outcome is not None:  # results are written; exit 3, one line per failure
        raise_for_failures(gates_report(outcome.results["candidates"], gates), 1)


def _given(ctx: typer.Context, *names: str) -> bool:
    """Whether any of these options was set explicitly (not left at its default)."""
    # Compared by name: typer vendors its own copy of click's ParameterSource enum.
    return any(
        getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")
        for name in names
    )


def _window_spec(
    cls: type, windowing: WindowingMode, context_length: int, stride: int | None
) -> object:
    from pydantic import ValidationError

    from lmkl.errors import UsageError

    try:
        return cls(windowing=windowing.value, context_length=context_length, stride=stride)
    except ValidationError as exc:
        message = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise UsageError(message, "adjust --stride or --context-length") from None


def run_and_show(
    ref_spec, cand_specs, data_spec, window_spec, compute, output, resume: bool, quiet: bool
) -> Any:
    """Run a comparison with a progress bar, then print the summary and the run directory."""
    from lmkl.engine.distributed import env_world_size
    from lmkl.engine.token_compare import run_comparison
    from lmkl.report.terminal import print_summary

    # Under torchrun/accelerate only rank 0 shows progress and the summary.
    main = env_world_size() <= 1 or os.environ.get("RANK", "0") == "0"
    with TokenProgress(quiet or not main) as progress:
        outcome = run_comparison(
            ref_spec,
            cand_specs,
            data_spec,
            window_spec,
            compute,
            output,
            resume=resume,
            progress=progress,
            log=progress.log,
        )
    if not outcome.is_main:
        return None
    if not quiet:
        print_summary(outcome.results, stdout)
        stdout.print(f"run directory: [bold]{outcome.path}[/bold]")
    else:
        stdout.print(str(outcome.path))
    return outcome


def run_bytes_and_show(
    ref_spec, cand_spec, data_spec, window_spec, compute, output, resume: bool, quiet: bool
) -> None:
    """``--different-tokenizers``: per-byte comparison (no token-level KL), then its summary."""
    from lmkl.engine.bytes_compare import run_bytes_comparison
    from lmkl.errors import UsageError
    from lmkl.report.terminal import print_bytes_summary
    from lmkl.specs import WindowSpec

    if data_spec is None:
        raise UsageError("no data given", "pass --data FILE_OR_DATASET")
    with TokenProgress(quiet) as progress:
        outcome = run_bytes_comparison(
            ref_spec,
            cand_spec,
            data_spec,
            window_spec or WindowSpec(),
            compute,
            output,
            resume=resume,
            progress=progress,
            log=progress.log,
        )
    if not quiet:
        print_bytes_summary(outcome.results, stdout)
        stdout.print(f"run directory: [bold]{outcome.path}[/bold]")
    else:
        stdout.print(str(outcome.path))


def register(app: typer.Typer) -> None:
    app.command("compare", no_args_is_help=True)(compare)
