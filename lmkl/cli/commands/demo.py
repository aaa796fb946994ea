"""``lmkl demo``: the whole job offline on an embedded default.

Builds (once, deterministically, then cached) a tokenizer and two small trained causal LMs from
the English reference text that every CPython ships (``pydoc_data``), then compares the smaller
"student" with the bigger reference on held-out text.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.text import Text

from lmkl.cli.funnel import friendly_errors
from lmkl.cli.options import OutOpt, OverwriteOpt, QuietOpt
from lmkl.cli.output import TokenProgress, show_path, show_run, stderr

#: Tokens of the worst documents the demo's token view shows (a page that opens instantly).
DEMO_VIEW_TOKENS = 6000


@friendly_errors
def demo(
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    rebuild: Annotated[bool, typer.Option(help="Rebuild the cached demo models.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Build two small models offline (cached) and compare them: the whole job in one command."""
    import lmkl.api
    from lmkl.models import quiet_hf_logging, set_offline
    from lmkl.report.terminal import print_summary
    from lmkl.specs import DataSpec, ModelSpec

    set_offline(True)  # the demo never needs the network
    quiet_hf_logging()  # lmkl reports the build's progress itself
    from lmkl.demo.assets import build_demo_assets
    from lmkl.demo.names import demo_cache_dir

    def say(message: str) -> None:
        if not quiet:
            stderr.print(Text(message, style="dim"))

    assets = build_demo_assets(demo_cache_dir(), force=rebuild, progress=say)
    with TokenProgress(quiet) as progress:
        run = lmkl.api.compare(
            ModelSpec(model=str(assets.reference_dir), label="reference", device="cpu"),
            [ModelSpec(model=str(assets.candidate_dir), label="student", device="cpu")],
            DataSpec(source=str(assets.heldout_path), label="pydoc-heldout"),
            out=out or Path("runs") / "demo",
            overwrite=overwrite or out is None,
            context_length=256,
            stride=128,
            batch_size=8,
            # Both models' top-5 on the worst documents, so the report opens on the token view.
            view_tokens=DEMO_VIEW_TOKENS,
            progress=progress,
            log=progress.log,
        )
    show_run(run, quiet, print_summary)
    # End with the report people would rather look at: one self-contained HTML page.
    report_path = run.report(view="tokens")
    show_path("report", report_path, quiet)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
