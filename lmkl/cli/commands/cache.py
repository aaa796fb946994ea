"""``lmkl cache REFERENCE --data DATA --out CACHE_DIR``: run a reference once, reuse it later."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from lmkl.cli.funnel import friendly_errors
from lmkl.cli.options import (
    BATCH_OPTIONS,
    DATA_OPTIONS,
    MODEL_OPTIONS,
    WINDOW_OPTIONS,
    DeviceMapOpt,
    MemoryOpt,
    OverwriteOpt,
    QuietOpt,
    ResumeOpt,
    TemperatureOpt,
    apply_offline,
    compute_spec,
    data_spec,
    model_spec,
    window_spec,
    with_options,
)
from lmkl.cli.output import TokenProgress, show_path, stdout


@friendly_errors
@with_options(DATA_OPTIONS, WINDOW_OPTIONS, MODEL_OPTIONS, BATCH_OPTIONS)
def cache(
    reference: Annotated[str, typer.Argument(help="Reference model P: hub id or local directory.")],
    out: Annotated[
        Path,
        typer.Option("--out", "-o", help="Cache directory to write.", rich_help_panel="Output"),
    ],
    top_k: Annotated[
        int | None,
        typer.Option(
            "--top-k",
            min=1,
            help="Compact cache: keep the reference's K largest log-probs and the "
            "tail mass; KL is then reported as a guaranteed interval. Default: exact cache "
            "(hidden states + output layer).",
            rich_help_panel="Cache",
        ),
    ] = None,
    device_map: DeviceMapOpt = None,
    memory_budget: MemoryOpt = 1024,
    temperature: TemperatureOpt = 1.0,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    quiet: QuietOpt = False,
    **options: Any,
) -> None:
    """Run REFERENCE once over DATA and store what later comparisons need (`compare CACHE CAND`).

    Ctrl-C finishes the current part and stops; `--resume` continues. Under torchrun the
    processes share the parts and rank 0 writes the cache.
    """
    apply_offline(options["offline"])
    from lmkl.engine.cache_build import build_cache
    from lmkl.engine.distributed import is_main_process
    from lmkl.formatting import byte_size, number

    spec = model_spec(reference, options | {"device_map": device_map})
    data = data_spec(options)
    windows = window_spec(options["windowing"], options["context_length"], options["stride"])
    compute = compute_spec(options, memory_budget_mb=memory_budget, temperature=temperature)
    main = is_main_process()  # under torchrun only rank 0 shows progress and the summary
    with TokenProgress(quiet or not main, "caching") as progress:
        manifest = build_cache(
            spec,
            data,
            windows,
            compute,
            out,
            top_k=top_k,
            overwrite=overwrite,
            resume=resume,
            progress=progress,
            log=progress.log,
        )
    if not main:
        return
    if not quiet:
        counts, size = manifest["counts"], manifest["bytes"]
        mode = "exact" if manifest["mode"] == "exact" else f"top-{manifest['top_k']}"
        # The label is user text: shown as typed, never read as markup.
        stdout.print(
            Text(
                f"cached {counts['tokens']:,} tokens of {manifest['reference']['label']} "
                f"({mode}): {number(size['row_per_token'])} row bytes/token, "
                f"{number(size['per_token'], 1)} bytes/token on disk in all "
                f"({byte_size(size['total'])})"
            )
        )
    show_path("cache directory", out, quiet)
    if not quiet:
        stdout.print(Text(f"use it as the reference: lmkl compare {out} CANDIDATE"), soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("cache", no_args_is_help=True)(cache)
