"""``lmkl init [NAME]``: copy a shipped example experiment to edit."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from lmkl.cli.funnel import friendly_errors
from lmkl.cli.output import stdout

DEFAULT_EXAMPLE = "precision"


@friendly_errors
def init(
    name: Annotated[
        str,
        typer.Argument(
            help="Example to copy (see --list); precision runs offline on the demo models."
        ),
    ] = DEFAULT_EXAMPLE,
    list_: Annotated[bool, typer.Option("--list", help="List the shipped examples.")] = False,
    out: Annotated[
        Path | None, typer.Option("--out", "-o", help="Where to write it (default: ./NAME.yaml).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace an existing file.")] = False,
) -> None:
    """Copy a shipped example config (default: precision) into the current directory."""
    from lmkl.errors import OutputError
    from lmkl.experiment.schema import (
        example_data_files,
        example_names,
        example_summary,
        example_text,
    )

    if list_:
        from rich.padding import Padding

        # Each summary wrapped under its name: whole at any width (80 columns, a pipe).
        for example in example_names():
            stdout.print(Text(example, style="bold"))
            stdout.print(Padding(Text(example_summary(example_text(example))), (0, 0, 0, 2)))
        return
    text = example_text(name)
    target = out or Path(f"{name.removesuffix('.yaml')}.yaml")
    if target.exists() and not force:
        raise OutputError(f"'{target}' already exists", "pass --force to replace it, or --out")
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_text(text, encoding="utf-8")
    for filename, data in example_data_files(name).items():  # the data it reads, beside it
        companion = target.parent / filename
        if force or not companion.exists():
            companion.write_text(data, encoding="utf-8")
    stdout.print(Text(f"wrote {target}; edit it, then: lmkl run {target}"), soft_wrap=True)


def register(app: typer.Typer) -> None:
    app.command("init")(init)
