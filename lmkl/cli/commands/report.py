"""``lmkl report RUN_DIR...``: HTML, Markdown, JSON or terminal reports of finished runs."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from lmkl.cli.funnel import friendly_errors
from lmkl.cli.output import show_path, stdout


class ReportView(str, Enum):
    summary = "summary"
    tokens = "tokens"


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
    view: Annotated[
        ReportView,
        typer.Option(
            "--view",
            help="tokens: open the page on the token view (documents shaded by KL, both "
            "models' top-5 on hover; needs `lmkl compare --view-tokens N`). summary: the "
            "summary first (a recorded token view follows the worst contexts).",
        ),
    ] = ReportView.summary,
    doc: Annotated[
        list[int] | None,
        typer.Option(
            "--doc",
            help="Show these recorded documents (llama-cpp: chunks) in the token view "
            "(repeatable; default: the worst by mean KL).",
        ),
    ] = None,
    view_max_tokens: Annotated[
        int,
        typer.Option("--view-max-tokens", min=1, help="Tokens the token view embeds at most."),
    ] = 50_000,
) -> None:
    """Turn runs into a report: plain-language summary, tables with errors, plots, worst tokens."""
    from lmkl.report.attribution import is_attribution_run, write_attribution_report
    from lmkl.report.render import write_report

    if any(is_attribution_run(p) for p in run_dirs):
        path = write_attribution_report(run_dirs, fmt.value, out, console=stdout)
        if path is not None:
            show_path("report", path, quiet=False)
        return
    path = write_report(
        run_dirs,
        fmt.value,
        out,
        sort_by=sort_by,
        worst_n=worst,
        console=stdout,
        view=view.value,
        docs=doc or None,
        view_max_tokens=view_max_tokens,
    )
    if path is not None:
        show_path("report", path, quiet=False)


def register(app: typer.Typer) -> None:
    app.command("report", no_args_is_help=True)(report)
