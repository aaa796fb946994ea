"""``lmkl demo``: the whole job offline on an embedded default.

Builds (once, deterministically, then cached) a tokenizer and two small trained causal LMs from
the English reference text that every CPython ships (``pydoc_data``), then compares the smaller
"student" with the bigger reference on held-out text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from lmkl.cli.common import (
    OutOpt,
    OverwriteOpt,
    QuietOpt,
    friendly_errors,
    stderr,
    stdout,
)


@friendly_errors
def demo(
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    rebuild: Annotated[bool, typer.Option(help="Rebuild the cached demo models.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Build two small models offline (cached) and compare them: the whole job in one command."""
    from lmkl.cli.commands.compare import run_and_show
    from lmkl.models import quiet_hf_logging, set_offline
    from lmkl.specs import ComputeSpec, DataSpec, ModelSpec, OutputSpec, WindowSpec

    set_offline(True)  # the demo never needs the network
    quiet_hf_logging()  # lmkl reports the build's progress itself
    from lmkl.demo.assets import build_demo_assets
    from lmkl.demo.names import demo_cache_dir

    cache = demo_cache_dir()

    def say(message: str) -> None:
        if not quiet:
            stderr.print(f"[dim]{message}[/dim]")

    assets = build_demo_assets(cache, force=rebuild, progress=say)
    run_dir = out or Path("runs") / "demo"
    run_and_show(
        ModelSpec(model=str(assets.reference_dir), label="reference", device="cpu"),
        [ModelSpec(model=str(assets.candidate_dir), label="student", device="cpu")],
        DataSpec(source=str(assets.heldout_path), label="pydoc-heldout"),
        WindowSpec(context_length=256, stride=128),
        ComputeSpec(batch_size=8),
        OutputSpec(dir=str(run_dir), overwrite=overwrite or out is None),
        resume=False,
        quiet=quiet,
    )
    # End with the report people would rather look at: one self-contained HTML page.
    from lmkl.report.render import write_report

    report_path = write_report([run_dir], "html", Path(run_dir) / "report.html")
    stdout.print(
        str(report_path) if quiet else f"report: [bold]{report_path}[/bold]",
        highlight=False,
        soft_wrap=True,
    )


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
