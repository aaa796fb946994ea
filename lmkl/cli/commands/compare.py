"""``lmkl compare REFERENCE CANDIDATE --data DATA``: one candidate against one reference."""

from __future__ import annotations

from enum import Enum
from typing import Annotated

import typer

from lmkl.cli.funnel import friendly_errors
from lmkl.cli.options import (
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
    TrustOpt,
    WindowingMode,
    WindowingOpt,
    apply_offline,
    given,
    model_pair,
    window_spec,
)
from lmkl.cli.options import data_spec as build_data_spec
from lmkl.cli.output import TokenProgress, show_run


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
    import lmkl.api
    from lmkl.analysis.gates import (
        gates_from_mapping,
        gates_report,
        parse_gate_options,
        raise_for_failures,
    )
    from lmkl.engine.distributed import is_main_process
    from lmkl.errors import UsageError
    from lmkl.refcache.format import is_cache_dir
    from lmkl.report.terminal import print_bytes_summary, print_summary
    from lmkl.specs import ComputeSpec

    # Parsed before any work so that a bad gate is a usage error (exit 2), not a late surprise.
    gates = gates_from_mapping(
        parse_gate_options(fail_above or [], "--fail-above"),
        parse_gate_options(fail_below or [], "--fail-below"),
    )

    cached = is_cache_dir(reference)
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
        None
        if data is None and cached
        else build_data_spec(
            data,
            split,
            dataset_config,
            text_field,
            max_samples,
            score_on.value if score_on else None,
        )
    )
    windows = window_spec(windowing, context_length, stride)
    if cached and not given(ctx, "context_length", "stride", "windowing"):
        windows = None  # a reference cache holds its windows; given ones must match them
    compute = ComputeSpec(
        batch_size=batch_size,
        chunk_tokens=chunk_tokens,
        memory_budget_mb=memory_budget,
        max_tokens=max_tokens,
        temperature=temperature,
        max_batch_tokens=max_batch_tokens,
        compile=compile,
    )
    if different_tokenizers and gates:
        raise UsageError(
            "--fail-above/--fail-below need token-level metrics, which "
            "--different-tokenizers does not compute",
            "drop the gates or compare models that share a tokenizer",
        )
    # Under torchrun/accelerate only rank 0 shows progress and the summary.
    with TokenProgress(quiet or not is_main_process()) as progress:
        run = lmkl.api.compare(
            ref_spec,
            [cand_spec],
            data_spec,
            windows=windows,
            compute=compute,
            out=out,
            overwrite=overwrite,
            resume=resume,
            different_tokenizers=different_tokenizers,
            progress=progress,
            log=progress.log,
        )
    if not run.is_main:
        return
    show_run(run, quiet, print_bytes_summary if different_tokenizers else print_summary)
    if gates:  # results are written; exit 3, one line per failure
        raise_for_failures(gates_report(run.results["candidates"], gates), 1)


def register(app: typer.Typer) -> None:
    app.command("compare", no_args_is_help=True)(compare)
