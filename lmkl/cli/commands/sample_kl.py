"""``lmkl sample-kl REFERENCE CANDIDATE --prompts DATA``: sampled, sequence-level KL estimates."""

from __future__ import annotations

from enum import Enum
from typing import Annotated, Any

import typer

from lmkl.cli.funnel import friendly_errors
from lmkl.cli.options import (
    COMPUTE,
    DATA,
    DATA_SOURCE_OPTIONS,
    KL_OPTIONS,
    MODEL_OPTIONS,
    OUTPUT_OPTIONS,
    PAIR_OPTIONS,
    OptionGroup,
    apply_offline,
    compute_spec,
    data_spec,
    model_pair,
    with_options,
)
from lmkl.cli.output import TokenProgress, show_run, stderr

SAMPLING = "Sampling"


class Direction(str, Enum):
    forward = "forward"
    reverse = "reverse"


#: How continuations are sampled (the fields of SampleSpec, as options).
SAMPLING_OPTIONS: OptionGroup = {
    "num_samples": (
        Annotated[
            int,
            typer.Option(
                "--num-samples",
                "-n",
                min=2,
                help="Continuations sampled per prompt.",
                rich_help_panel=SAMPLING,
            ),
        ],
        16,
    ),
    "max_new_tokens": (
        Annotated[
            int,
            typer.Option(
                "--max-new-tokens",
                min=1,
                help="Longest continuation (stops earlier at EOS).",
                rich_help_panel=SAMPLING,
            ),
        ],
        64,
    ),
    "direction": (
        Annotated[
            Direction,
            typer.Option(
                help="forward: sample from the reference, estimate KL(P‖Q); reverse: sample "
                "from the candidate, estimate KL(Q‖P).",
                rich_help_panel=SAMPLING,
            ),
        ],
        Direction.forward,
    ),
    "temperature": (
        Annotated[
            float,
            typer.Option(
                min=1e-6,
                help="Sampling temperature. ≠ 1 samples from another distribution: the "
                "estimates are then flagged biased.",
                rich_help_panel=SAMPLING,
            ),
        ],
        1.0,
    ),
    "top_p": (
        Annotated[
            float,
            typer.Option(
                "--top-p",
                min=1e-6,
                max=1.0,
                help="Nucleus sampling (< 1 flags the estimates biased).",
                rich_help_panel=SAMPLING,
            ),
        ],
        1.0,
    ),
    "top_k": (
        Annotated[
            int,
            typer.Option(
                "--top-k",
                min=0,
                help="Top-k sampling, 0 = off (> 0 flags the estimates biased).",
                rich_help_panel=SAMPLING,
            ),
        ],
        0,
    ),
    "seed": (
        Annotated[
            int,
            typer.Option(
                min=0, help="Sampling seed (reproducible runs).", rich_help_panel=SAMPLING
            ),
        ],
        0,
    ),
    "stop_token_id": (
        Annotated[
            list[int] | None,
            typer.Option(
                "--stop-token-id",
                help="Extra stop token id (repeatable); EOS always stops.",
                rich_help_panel=SAMPLING,
            ),
        ],
        None,
    ),
    "batch_size": (
        Annotated[
            int,
            typer.Option(
                "--batch-size",
                "-b",
                min=1,
                help="Continuations sampled and scored together.",
                rich_help_panel=COMPUTE,
            ),
        ],
        16,
    ),
}


@friendly_errors
@with_options(
    DATA_SOURCE_OPTIONS, SAMPLING_OPTIONS, MODEL_OPTIONS, PAIR_OPTIONS, KL_OPTIONS, OUTPUT_OPTIONS
)
def sample_kl(
    reference: Annotated[str, typer.Argument(help="Reference model P: hub id or local directory.")],
    candidate: Annotated[str, typer.Argument(help="Candidate model Q: hub id or local directory.")],
    prompts: Annotated[
        str | None,
        typer.Option(
            "--prompts",
            "-p",
            help="Prompts: hub dataset or local .txt/.jsonl/.json/.csv/.parquet "
            "(a messages column is rendered with the chat template).",
            rich_help_panel=DATA,
        ),
    ] = None,
    max_prompts: Annotated[
        int | None,
        typer.Option(
            "--max-prompts", min=1, help="Use only the first N prompts.", rich_help_panel=DATA
        ),
    ] = None,
    **options: Any,
) -> None:
    """Estimate sequence-level KL by sampling continuations (the "expectation form").

    Samples continuations of each prompt from the reference (the candidate with --direction
    reverse), scores them under both models and reports the estimators k1, k2, k3 and the exact
    per-step sum, with standard errors over samples and over prompts.
    """
    apply_offline(options["offline"])
    from lmkl.engine.loop import execute
    from lmkl.engine.sample_kl import SampledKL
    from lmkl.engine.sampling import SampleSpec
    from lmkl.report.terminal import print_sample_summary
    from lmkl.specs import OutputSpec

    ref_spec, cand_spec = model_pair(reference, candidate, options)
    data = data_spec(
        options | {"prompts": prompts, "max_prompts": max_prompts},
        source="prompts",
        samples="max_prompts",
    )
    fields = {name: options[name] for name in SampleSpec.model_fields if name in options}
    fields |= {"direction": options["direction"].value}
    spec = SampleSpec(
        **fields,
        stop_token_ids=options["stop_token_id"] or [],
    )
    compute = compute_spec(
        {k: v for k, v in options.items() if k in KL_OPTIONS}, seed=options["seed"]
    )
    output = OutputSpec(
        dir=str(options["out"]) if options["out"] else None, overwrite=options["overwrite"]
    )
    quiet = options["quiet"]
    if not spec.exact:
        stderr.print(
            "[bold yellow]warning:[/bold yellow] temperature/top-k/top-p change the "
            "sampling distribution: the estimates will NOT be "
            f"{'KL(P‖Q)' if spec.direction == 'forward' else 'KL(Q‖P)'} "
            "(results are flagged biased)",
            highlight=False,
        )
    with TokenProgress(quiet, description="sampling") as progress:
        outcome = execute(
            SampledKL(ref_spec, cand_spec, data, spec, compute),
            output,
            resume=options["resume"],
            progress=progress,
            log=progress.log,
        )
    if outcome.is_main:
        show_run(outcome, quiet, print_sample_summary)


def register(app: typer.Typer) -> None:
    app.command("sample-kl", no_args_is_help=True)(sample_kl)
