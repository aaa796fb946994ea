"""``lmkl select RUN --out hard.jsonl``: the contexts where the candidate fails most, as data."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from lmkl.cli.funnel import friendly_errors
from lmkl.cli.output import show_path, stderr


class SelectBy(str, Enum):
    kl = "kl"
    reverse_kl = "reverse_kl"
    jsd = "jsd"
    nll_gap = "nll_gap"


@friendly_errors
def select(
    run_dir: Annotated[
        Path, typer.Argument(help="A finished run directory of `lmkl compare`.", show_default=False)
    ],
    out: Annotated[
        Path,
        typer.Option(
            "--out",
            "-o",
            help="hard.jsonl, hard.parquet, or a directory (a `datasets` save_to_disk dataset).",
            show_default=False,
        ),
    ],
    by: Annotated[
        SelectBy,
        typer.Option(
            "--by",
            help="Window score: mean KL(P‖Q), KL(Q‖P), JSD, or nll_gap (−log q(x) + log p(x)).",
        ),
    ] = SelectBy.kl,
    top: Annotated[int, typer.Option("--top", min=1, help="Windows to select at most.")] = 100,
    window: Annotated[
        int,
        typer.Option(
            "--window", min=1, help="Scored tokens per window (1: single tokens with --context)."
        ),
    ] = 32,
    context: Annotated[
        int,
        typer.Option("--context", min=0, help="Tokens of left context put before each window."),
    ] = 0,
    min_score: Annotated[
        float | None,
        typer.Option("--min-score", help="Keep only windows scoring at least this (nats)."),
    ] = None,
    candidate: Annotated[
        str | None,
        typer.Option("--candidate", help="Candidate label (default: the run's first)."),
    ] = None,
    overwrite: Annotated[bool, typer.Option(help="Replace an existing output.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Print only the output.")] = False,
) -> None:
    """Turn a run's hardest contexts into a dataset: the top windows by a per-token score,
    deduplicated, with text, document, span, score and the run's provenance."""
    from lmkl.report.select import check_output, select_contexts, write_selection

    check_output(out, overwrite)  # before any work: a wrong --out costs nothing
    selection = select_contexts(
        run_dir,
        by=by.value,
        top=top,
        window=window,
        context=context,
        min_score=min_score,
        candidate=candidate,
    )
    path = write_selection(selection, out, overwrite)
    if not quiet:
        stderr.print(Text(selection.summary()), soft_wrap=True)
    show_path("selection", path, quiet)


def register(app: typer.Typer) -> None:
    app.command("select", no_args_is_help=True)(select)
