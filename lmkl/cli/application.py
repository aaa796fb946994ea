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

#: One line per command in ``lmkl --help`` (click would cut the docstring's first sentence with
#: "..." to fit the terminal): each fits an 80-column terminal whole.
SHORT_HELP = {
    "compare": "KL of candidates against a reference, token by token.",
    "attribute": "Where in the model a candidate's KL comes from.",
    "demo": "The whole job offline, on two small built-in models.",
    "run": "Run a YAML experiment: candidates ranked, gated.",
    "validate": "Check an experiment config; list every problem.",
    "init": "Copy a shipped example config to edit.",
    "cache": "Store a reference's outputs once, for later runs.",
    "sample-kl": "Sequence-level KL, by sampling continuations.",
    "report": "HTML, Markdown or table report of runs.",
    "inspect": "Single tokens of a run: context, top-5, KL.",
    "select": "A run's hardest contexts as a dataset.",
}
for command in app.registered_commands:
    command.short_help = SHORT_HELP[command.name or ""]

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
