"""The ``lmkl`` command line: a thin Typer layer over the library.

Usage::

    lmkl demo                                   # offline end-to-end example
    lmkl compare REFERENCE CANDIDATE --data held_out.jsonl --out runs/x
    lmkl report runs/x                          # self-contained HTML report
    lmkl select runs/x --out hard.jsonl         # the hardest contexts as a dataset
    lmkl run configs/precision.yaml             # a YAML experiment: many candidates, ranked

``lmkl --help`` stays instant: torch and transformers are imported inside command bodies only.
"""

from __future__ import annotations

from typing import Annotated

import typer
from typer.core import TyperOption

from lmkl.cli.commands import (
    attribute,
    cache,
    compare,
    demo,
    init,
    inspect,
    report,
    run,
    sample_kl,
    select,
    validate,
)
from lmkl.version import __version__

app = typer.Typer(
    name="lmkl",
    help="Compare causal language models by the exact KL divergence of their next-token "
    "distributions. KL(P‖Q): P is the reference, Q the candidate, in nats.",
    no_args_is_help=True,
    pretty_exceptions_show_locals=False,
    add_completion=False,
    # Markdown, not rich markup: "lmkl[quant]" in a help text is text, not a style tag, and
    # a docstring's line breaks do not break a sentence.
    rich_markup_mode="markdown",
)

for module in (
    compare,
    attribute,
    demo,
    run,
    validate,
    init,
    cache,
    sample_kl,
    report,
    inspect,
    select,
):
    module.register(app)

_value_type = TyperOption.display_type_rich


def _flag_without_type(self: TyperOption, ctx: typer.Context) -> str | None:
    """A flag takes no value: its help shows no ``<bool>`` (Typer shows one for every flag)."""
    return None if self.is_flag else _value_type(self, ctx)


TyperOption.display_type_rich = _flag_without_type  # type: ignore[method-assign]


def _version(value: bool) -> None:
    if value:
        typer.echo(f"lmkl {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option("--version", callback=_version, is_eager=True, help="Print the version."),
    ] = False,
) -> None:
    """lmkl: exact token-level KL between causal LMs (reference P, candidate Q)."""
