"""``lmkl attribute REFERENCE CANDIDATE --data DATA``: where in the model the KL comes from.

Each weight-holding module, decoder layer and layer prefix of the reference is taken from the
candidate (same modules: a quantized copy, a fine-tune, a later checkpoint) on its own and its
KL measured on the same tokens as ``compare``, with document-bootstrap intervals.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer

from lmkl.cli.funnel import friendly_errors
from lmkl.cli.options import (
    BATCH_OPTIONS,
    DATA_OPTIONS,
    KL_OPTIONS,
    MODEL_OPTIONS,
    OUTPUT_OPTIONS,
    PAIR_OPTIONS,
    WINDOW_OPTIONS,
    CompileOpt,
    GgufOneOpt,
    LabelOneOpt,
    QuantizeOneOpt,
    TemperatureOpt,
    apply_offline,
    compute_spec,
    data_spec,
    model_specs,
    window_spec,
    with_options,
)
from lmkl.cli.output import TokenProgress, show_run

HighOpt = Annotated[
    str | None,
    typer.Option(
        "--high",
        help="Recipe: the higher-precision model to take modules from, a model like the "
        "candidate (directory, .gguf file) or METHOD:SCHEME[:gGROUP] quantizing the reference. "
        "Needs --budget-bits.",
        rich_help_panel="Recipe",
    ),
]
BudgetOpt = Annotated[
    float | None,
    typer.Option(
        "--budget-bits",
        min=0.0,
        help="Recipe: stored bits per weight the mixed model may take (greedy by isolated KL "
        "saved per extra byte; the result is measured).",
        rich_help_panel="Recipe",
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
def attribute(
    reference: Annotated[str, typer.Argument(help="Reference model P: hub id or directory.")],
    candidate: Annotated[
        str | None,
        typer.Argument(
            help="Candidate Q with the reference's modules: hub id, directory or .gguf file "
            "(or --quantize).",
            show_default=False,
        ),
    ] = None,
    label: LabelOneOpt = None,
    gguf_file: GgufOneOpt = None,
    quantize: QuantizeOneOpt = None,
    high: HighOpt = None,
    budget_bits: BudgetOpt = None,
    temperature: TemperatureOpt = 1.0,
    compile: CompileOpt = True,
    **options: Any,
) -> None:
    """Attribute CANDIDATE's KL to the reference's modules, layers and layer prefixes."""
    apply_offline(options["offline"])
    import lmkl.api
    from lmkl.attribution.terminal import print_attribution
    from lmkl.engine.distributed import is_main_process
    from lmkl.errors import UsageError
    from lmkl.specs import high_model_spec

    if (candidate is None) == (quantize is None):
        raise UsageError(
            "attribution takes exactly one candidate",
            "name one CANDIDATE after the reference, or pass --quantize METHOD:SCHEME instead",
        )
    ref_spec, cand_specs = model_specs(
        reference,
        [candidate] if candidate else [],
        options | {"adapter": None, "device_map": None},
        labels=[label] if label else None,
        gguf_files=[gguf_file] if gguf_file else None,
        quantize=[quantize] if quantize else None,
    )
    high_spec = None
    if high is not None:
        high_spec = high_model_spec(high, ref_spec, cand_specs[0], "--high")
    with TokenProgress(options["quiet"] or not is_main_process()) as progress:
        run = lmkl.api.attribute(
            ref_spec,
            cand_specs[0],
            data_spec(options),
            windows=window_spec(options["windowing"], options["context_length"], options["stride"]),
            compute=compute_spec(options, temperature=temperature, compile=compile),
            high=high_spec,
            budget_bits=budget_bits,
            out=options["out"],
            overwrite=options["overwrite"],
            resume=options["resume"],
            progress=progress,
            log=progress.log,
        )
    if run.is_main:
        show_run(run, options["quiet"], print_attribution)


def register(app: typer.Typer) -> None:
    app.command("attribute", no_args_is_help=True)(attribute)
