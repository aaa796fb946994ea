"""``lmkl validate CONFIG.yaml``: check an experiment config without running it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from lmkl.cli.funnel import friendly_errors
from lmkl.cli.options import OfflineOpt, OverridesArg, apply_offline
from lmkl.cli.output import stdout


@friendly_errors
def validate(
    config: Annotated[
        Path | None, typer.Argument(help="Experiment YAML to check.", show_default=False)
    ] = None,
    overrides: OverridesArg = None,
    check_models: Annotated[
        bool,
        typer.Option(
            "--check-models",
            help="Also load every tokenizer and model config (no weights) and "
            "check that the tokenizers match.",
        ),
    ] = False,
    schema: Annotated[
        bool, typer.Option("--schema", help="Print the config's JSON Schema and exit.")
    ] = False,
    offline: OfflineOpt = False,
) -> None:
    """Check CONFIG against the schema and list every problem at once (exit 2 if any)."""
    if schema:
        from lmkl.experiment.schema import json_schema

        typer.echo(json.dumps(json_schema(), indent=2))
        return
    if config is None:
        from lmkl.errors import UsageError

        raise UsageError("no config given", "pass CONFIG.yaml, or --schema for the schema")
    apply_offline(offline)
    from lmkl.experiment.schema import load_config

    # Every problem in one round: schema, duplicate labels, demo names and (--check-models)
    # missing model paths, before any tokenizer loads.
    cfg = load_config(config, overrides or [], check_paths=check_models)
    extras = []
    if cfg.noise_floor.enabled:
        extras.append("noise floor")
    limits = len(cfg.gates.fail_above) + len(cfg.gates.fail_below)
    if limits:
        extras.append(f"{limits} gate{'s' if limits != 1 else ''}")
    stdout.print(
        Text(
            f"{config}: valid: '{cfg.name}', {len(cfg.candidates)} candidate"
            f"{'s' if len(cfg.candidates) != 1 else ''}, {len(cfg.datasets)} dataset"
            f"{'s' if len(cfg.datasets) != 1 else ''}"
            + (f", {', '.join(extras)}" if extras else "")
        ),
        soft_wrap=True,
    )
    if check_models:
        from lmkl.experiment.run import check_models as check
        from lmkl.experiment.run import resolve_demo_values

        rows = check(resolve_demo_values(cfg))
        for row in rows:
            stdout.print(
                Text(
                    f"  {row['role']:9} {row['label']}: {row['architecture']}, tokenizer "
                    f"{row['tokenizer_size']} tokens, max positions {row['max_positions']}"
                ),
                soft_wrap=True,
            )
        stdout.print("models: tokenizers match and the context length fits")


def register(app: typer.Typer) -> None:
    app.command("validate", no_args_is_help=True)(validate)
