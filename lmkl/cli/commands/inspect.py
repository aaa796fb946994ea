"""``lmkl inspect RUN_DIR``: a document coloured by per-token KL and the worst tokens."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lmkl.cli.funnel import friendly_errors
from lmkl.cli.output import stdout


@friendly_errors
def inspect(
    run_dir: Annotated[
        Path,
        typer.Argument(
            help="A finished run directory (`lmkl compare`, `lmkl demo`) or experiment "
            "directory (`lmkl run`).",
            show_default=False,
        ),
    ],
    doc: Annotated[
        int | None,
        typer.Option(
            "--doc", min=0, help="Document id to show (default: the one holding the worst token)."
        ),
    ] = None,
    worst: Annotated[
        int,
        typer.Option(
            "--worst", "-n", min=0, help="How many worst tokens to list with context and top-5."
        ),
    ] = 10,
    candidate: Annotated[
        str | None,
        typer.Option(
            "--candidate", "-c", help="Candidate label (default: the run's first candidate)."
        ),
    ] = None,
    max_tokens: Annotated[
        int, typer.Option("--max-tokens", min=1, help="Longest stretch of the document to print.")
    ] = 400,
    dataset: Annotated[
        str | None,
        typer.Option(
            "--dataset",
            "-d",
            help="Dataset of an experiment directory to inspect (needed when it has several).",
        ),
    ] = None,
) -> None:
    """Drill down into single tokens: where in the text the candidate diverges, and how.

    Piped or with NO_COLOR, the next token and the highest-KL tokens are put in ⟦brackets⟧."""
    from lmkl.report.drilldown import inspect_run

    what: dict[str, Any] = {"doc": doc, "candidate": candidate, "dataset": dataset}
    inspect_run(run_dir, worst=worst, max_tokens=max_tokens, console=stdout, **what)


def register(app: typer.Typer) -> None:
    app.command("inspect", no_args_is_help=True)(inspect)
