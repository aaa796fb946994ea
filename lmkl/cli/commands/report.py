"""``lmkl report RUN_DIR...``: HTML, Markdown, JSON or terminal reports of finished runs."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from lmkl.cli.funnel import friendly_errors
from lmkl.cli.output import stdout


class ReportFormat(str, Enum):
    html = "html"
    md = "md"
    json = "json"
    table = "table"


@friendly_errors
def report(
    run_dirs: Annotated[
        list[Path],
        typer.Argument(
            help="One or more run directories; several are shown side by side.", show_default=False
        ),
    ],
    fmt: Annotated[
        ReportFormat,
        typer.Option(
            "--format",
            "-f",
            help="html: one self-contained page; md: Markdown with PNGs in "
            "<name>_files/ beside it; json: the report's data; table: the terminal.",
        ),
    ] = ReportFormat.html,
    out: Annotated[
        Path | None,
        typer.Option(
            "--out",
            "-o",
            help="File to write (default: RUN_DIR/report.html or .md for one run, "
            "./lmkl-report.html or .md for several; json and table print to stdout).",
        ),
    ] = None,
    sort_by: Annotated[
        str,
        typer.Option(
            "--sort-by",
            help="Metric that orders candidates, e.g. kl.mean, kl.p99, jsd.mean, "
            "ppl.ratio, top1_agreement (higher first for agreement metrics).",
        ),
    ] = "kl.mean",
    worst: Annotated[
        int, typer.Option("--worst", min=0, help="Worst contexts shown per candidate.")
    ] = 10,
) -> None:
    """Turn runs into a report: plain-language summary, tables with errors, plots, worst tokens."""
    from lmkl.report.render import write_report

    path = write_report(run_dirs, fmt.value, out, sort_by=sort_by, worst_n=worst, console=stdout)
    if path is not None:
        stdout.print(f"report: [bold]{path}[/bold]", highlight=False, soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("report", no_args_is_help=True)(report)
