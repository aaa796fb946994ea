"""``lmkl run CONFIG.yaml [key.path=value ...]``: a whole YAML experiment, ranked and gated."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from lmkl.cli.common import (
    OUTPUT,
    FailAboveOpt,
    FailBelowOpt,
    OfflineOpt,
    OutOpt,
    OverwriteOpt,
    QuietOpt,
    ResumeOpt,
    TokenProgress,
    apply_offline,
    friendly_errors,
    stderr,
    stdout,
)

ConfigArg = Annotated[
    Path,
    typer.Argument(help="Experiment YAML (`lmkl init --list` shows examples).", show_default=False),
]
OverridesArg = Annotated[
    list[str] | None,
    typer.Argument(
        help="key.path=value overrides with YAML-typed values, e.g. compute.batch_size=4 "
        "candidates.0.dtype=float16.",
        show_default=False,
    ),
]


class DatasetProgress:
    """One rich progress bar per dataset (silent when quiet or not a terminal)."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.current: str | None = None
        self.bar: TokenProgress | None = None

    def __call__(self, dataset: str, done: int, total: int) -> None:
        if dataset != self.current:
            self.close()
            self.current = dataset
            self.bar = TokenProgress(self.quiet, description=f"scoring {dataset}").__enter__()
        assert self.bar is not None
        self.bar(done, total)

    def log(self, message: str) -> None:
        if self.bar is not None:
            self.bar.log(message)
        elif not self.quiet and stderr.is_terminal:
            stderr.print(f"[dim]{message}[/dim]")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.__exit__(None, None, None)
            self.bar = None

    def __enter__(self) -> DatasetProgress:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


def load_with_options(config: Path, overrides: list[str] | None, settings: dict[str, Any]) -> Any:
    """The validated config: YAML, then overrides, then dedicated options (command line wins)."""
    from lmkl.experiment.schema import load_config

    return load_config(
        config, overrides or [], {k: v for k, v in settings.items() if v is not None}
    )


@friendly_errors
def run(
    config: ConfigArg,
    overrides: OverridesArg = None,
    out: OutOpt = None,
    limit: Annotated[
        int | None,
        typer.Option(
            "--limit",
            min=1,
            help="Score at most N tokens per dataset (sets compute.max_tokens): a quick trial.",
            rich_help_panel=OUTPUT,
        ),
    ] = None,
    dry_run: Annotated[
        bool,
        typer.Option(
            "--dry-run",
            help="Validate, load tokenizers only, check compatibility and print the "
            "plan (models, datasets, token counts).",
            rich_help_panel=OUTPUT,
        ),
    ] = False,
    fail_above: FailAboveOpt = None,
    fail_below: FailBelowOpt = None,
    overwrite: OverwriteOpt = False,
    resume: ResumeOpt = False,
    offline: OfflineOpt = False,
    quiet: QuietOpt = False,
) -> None:
    """Run the experiment in CONFIG: every candidate against the reference on every dataset,
    then a leaderboard with bootstrap CIs, the Pareto set and quality gates.

    Precedence: command line > YAML > defaults; on the command line, options (--out, --limit,
    --fail-above/--fail-below) beat key.path=value overrides.
    Exit codes: 0 ok, 1 runtime error, 2 config error, 3 a gate failed (results still written).
    """
    apply_offline(offline)
    from lmkl.analysis.gates import parse_gate_options, raise_for_failures

    above = parse_gate_options(fail_above or [], "--fail-above")
    below = parse_gate_options(fail_below or [], "--fail-below")
    settings: dict[str, Any] = {
        "output.dir": str(out) if out else None,
        "compute.max_tokens": limit,
        "output.overwrite": True if overwrite else None,
    }
    cfg = load_with_options(config, overrides, settings)
    if above or below:
        cfg = cfg.model_copy(update={"gates": cfg.gates.merged(above, below)})

    from lmkl.experiment.run import plan_experiment, resolve_demo_values, run_experiment
    from lmkl.report.leaderboard import plan_tables, print_experiment

    with DatasetProgress(quiet) as progress:
        if dry_run:
            plan = plan_experiment(resolve_demo_values(cfg, progress.log), progress.log)
            for table in plan_tables(plan):
                stdout.print(table)
            stdout.print("dry run: nothing was scored")
            return
        outcome = run_experiment(cfg, resume=resume, progress=progress, log=progress.log)
    if quiet:
        stdout.print(str(outcome.path))
    else:
        print_experiment(outcome.results, stdout)
        stdout.print(f"run directory: [bold]{outcome.path}[/bold]")
    raise_for_failures(outcome.results["gates"], len(outcome.results["candidates"]))


def register(app: typer.Typer) -> None:
    app.command("run", no_args_is_help=True)(run)
