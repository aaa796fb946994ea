"""``lmkl compare REFERENCE CANDIDATE [CANDIDATE ...] --data DATA``: candidates against one
reference, the reference run once per batch for all of them, one leaderboard at the end."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

import typer

from lmkl.cli.funnel import friendly_errors
from lmkl.cli.options import (
    BATCH_OPTIONS,
    DATA,
    DATA_OPTIONS,
    KL_OPTIONS,
    MODEL_OPTIONS,
    MODELS,
    OUTPUT_OPTIONS,
    PAIR_OPTIONS,
    WINDOW_OPTIONS,
    AdapterOpt,
    CompileOpt,
    DeviceMapOpt,
    FailAboveOpt,
    FailBelowOpt,
    TemperatureOpt,
    ViewDocs,
    ViewDocsOpt,
    ViewTokensOpt,
    apply_offline,
    compute_spec,
    data_spec,
    given,
    model_spec,
    model_specs,
    window_spec,
    with_options,
)
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
LabelOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--label",
        help="Name of a candidate in tables (repeatable: one per candidate, in order; "
        "default: from the model name, GGUF file or scheme).",
        rich_help_panel=MODELS,
    ),
]
GgufFileOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--gguf-file",
        help="GGUF file in the candidate's directory or hub repo (repeatable: one per "
        "candidate, in order). A candidate path ending in .gguf needs none.",
        rich_help_panel=MODELS,
    ),
]
QuantizeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--quantize",
        help="Add a candidate: the reference quantized while loading, METHOD:SCHEME[:gGROUP] "
        "(repeatable), e.g. torchao:int8_weight_only, torchao:int4_weight_only:g32, "
        "bitsandbytes:nf4, quanto:int4. Needs lmkl[quant].",
        rich_help_panel=MODELS,
    ),
]
RecipeOpt = Annotated[
    list[str] | None,
    typer.Option(
        "--recipe",
        help="Add a candidate: a mixed-precision recipe file (recipe.yaml from lmkl attribute "
        "--budget-bits), its LOW model with the listed modules from HIGH (repeatable; label: "
        "recipe:FILE-STEM).",
        rich_help_panel=MODELS,
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
@with_options(
    DATA_OPTIONS,
    WINDOW_OPTIONS,
    MODEL_OPTIONS,
    PAIR_OPTIONS,
    BATCH_OPTIONS,
    KL_OPTIONS,
    OUTPUT_OPTIONS,
)
def compare(
    ctx: typer.Context,
    reference: Annotated[
        str,
        typer.Argument(
            help="Reference model P: hub id, local directory, or a reference cache (`lmkl cache`)."
        ),
    ],
    candidates: Annotated[
        list[str] | None,
        typer.Argument(
            help="Candidate models Q: hub ids, local directories or .gguf files (optional with "
            "--quantize or --recipe).",
            show_default=False,
        ),
    ] = None,
    label: LabelOpt = None,
    gguf_file: GgufFileOpt = None,
    quantize: QuantizeOpt = None,
    recipe: RecipeOpt = None,
    score_on: ScoreOnOpt = None,
    device_map: DeviceMapOpt = None,
    adapter: AdapterOpt = None,
    different_tokenizers: DifferentTokenizersOpt = False,
    temperature: TemperatureOpt = 1.0,
    compile: CompileOpt = True,
    view_tokens: ViewTokensOpt = 0,
    view_docs: ViewDocsOpt = ViewDocs.worst,
    fail_above: FailAboveOpt = None,
    fail_below: FailBelowOpt = None,
    **options: Any,
) -> None:
    """Compare each CANDIDATE with REFERENCE token by token: KL both ways, JSD, PPL, agreement."""
    apply_offline(options["offline"])
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

    # Parsed before any work so that a bad gate is a usage error (exit 2), not a late surprise.
    gates = gates_from_mapping(
        parse_gate_options(fail_above or [], "--fail-above"),
        parse_gate_options(fail_below or [], "--fail-below"),
    )
    if different_tokenizers and gates:
        raise UsageError(
            "--fail-above/--fail-below need token-level metrics, which "
            "--different-tokenizers does not compute",
            "drop the gates or compare models that share a tokenizer",
        )
    options |= {"device_map": device_map, "adapter": adapter}
    if not candidates and not quantize and not recipe:
        raise UsageError(
            "no candidate given",
            "name a candidate model after the reference, or pass --quantize or --recipe",
        )
    cached = is_cache_dir(reference)
    if cached and quantize:
        raise UsageError(
            "--quantize derives candidates from the reference model, but the reference is a cache",
            "pass the reference model itself",
        )
    ref_spec, cand_specs = model_specs(
        reference,
        candidates or [],
        options,
        labels=label,
        gguf_files=gguf_file,
        quantize=quantize,
    )
    cand_dtype = (options.get("candidate_dtype") or options["dtype"]).value
    cand_specs += [model_spec(None, options, dtype=cand_dtype, recipe=r) for r in recipe or []]
    data = None
    if options["data"] is not None or not cached:
        data = data_spec(options, score_on=score_on.value if score_on else None)
    windows = window_spec(options["windowing"], options["context_length"], options["stride"])
    if cached and not given(ctx, "context_length", "stride", "windowing"):
        windows = None  # a reference cache holds its windows; given ones must match them
    quiet = options["quiet"]
    # Under torchrun/accelerate only rank 0 shows progress and the summary.
    with TokenProgress(quiet or not is_main_process()) as progress:
        run = lmkl.api.compare(
            ref_spec,
            cand_specs,
            data,
            windows=windows,
            compute=compute_spec(
                options,
                temperature=temperature,
                compile=compile,
                view_tokens=view_tokens,
                view_docs=view_docs.value,
            ),
            out=options["out"],
            overwrite=options["overwrite"],
            resume=options["resume"],
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
