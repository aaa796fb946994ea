"""``lmkl run CONFIG.yaml [key.path=value ...]``: a whole YAML experiment, ranked and gated."""

from __future__ import annotations

from typing import Any

import typer

from lmkl.cli.funnel import friendly_errors
from lmkl.cli.options import (
    GATE_OPTIONS,
    OUTPUT,
    ConfigArg,
    OfflineOpt,
    OutOpt,
    OverridesArg,
    OverwriteOpt,
    QuietOpt,
    ResumeOpt,
    apply_offline,
    load_with_options,
    option,
    with_options,
)
from lmkl.cli.output import DatasetProgress, show_path, stdout

LimitOpt = option(
    int | None,
    OUTPUT,
    "Score at most N tokens per dataset (sets compute.max_tokens): a quick trial.",
    "--limit",
    min=1,
)
DryRunOpt = option(
    bool,
    OUTPUT,
    "Validate, load tokenizers only, check compatibility and print the plan (models, datasets, "
    "token counts).",
    "--dry-run",
)
#: ``lmkl run``'s options after the arguments, in the order --help lists them.
RUN_OPTIONS = {
    "out": (OutOpt, None),
    "limit": (LimitOpt, None),
    "dry_run": (DryRunOpt, False),
    **GATE_OPTIONS,
    "overwrite": (OverwriteOpt, False),
    "resume": (ResumeOpt, False),
    "offline": (OfflineOpt, False),
    "quiet": (QuietOpt, False),
}


@friendly_errors
@with_options(RUN_OPTIONS)
def run(config: ConfigArg, overrides: OverridesArg = None, **options: Any) -> None:
    """Run the experiment in CONFIG: every candidate against the reference on every dataset,
    then a leaderboard with bootstrap CIs, the Pareto set and quality gates.

    Precedence: command line > YAML > defaults; on the command line, options (--out, --limit,
    --fail-above/--fail-below) beat key.path=value overrides.
    Exit codes: 0 ok, 1 runtime error, 2 config error, 3 a gate failed (results still written).
    """
    out, quiet, dry_run = options["out"], options["quiet"], options["dry_run"]
    apply_offline(options["offline"])
    from lmkl.analysis.gates import parse_gate_options, raise_for_failures

    above = parse_gate_options(options["fail_above"] or [], "--fail-above")
    below = parse_gate_options(options["fail_below"] or [], "--fail-below")
    settings: dict[str, Any] = {
        "output.dir": str(out) if out else None,
        "compute.max_tokens": options["limit"],
        "output.overwrite": True if options["overwrite"] else None,
    }
    cfg = load_with_options(config, overrides, settings)
    if above or below:
        cfg = cfg.model_copy(update={"gates": cfg.gates.merged(above, below)})

    from lmkl.engine.distributed import is_main_process
    from lmkl.experiment.run import plan_experiment, resolve_demo_values, run_experiment
    from lmkl.report.tables import plan_tables
    from lmkl.report.terminal import print_experiment

    main = is_main_process()  # under torchrun only rank 0 shows progress, plan and results
    with DatasetProgress(quiet or not main) as progress:
        if dry_run:
            plan = plan_experiment(resolve_demo_values(cfg, progress.log), progress.log)
            for table in plan_tables(plan) if main else []:
                stdout.print(table)
            if main:
                stdout.print("dry run: nothing was scored")
            return
        outcome = run_experiment(cfg, resume=options["resume"], progress=progress, log=progress.log)
    if not outcome.is_main:
        return
    if not quiet:
        print_experiment(outcome.results, stdout)
    show_path("run directory", outcome.path, quiet)
    raise_for_failures(outcome.results["gates"], len(outcome.results["candidates"]))


def register(app: typer.Typer) -> None:
    app.command("run", no_args_is_help=True)(run)
