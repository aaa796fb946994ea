"""``lmkl demo``: the whole job offline on an embedded default.

Builds (once, deterministically, then cached) a tokenizer and two small trained causal LMs from
the English reference text that every CPython ships (``pydoc_data``), then compares the smaller
"student" with the bigger reference on held-out text.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.text import Text

from lmkl.cli.funnel import friendly_errors
from lmkl.cli.options import OutOpt, OverwriteOpt, QuietOpt
from lmkl.cli.output import TokenProgress, show_path, show_run, stderr

#: Tokens of the worst documents the demo's token view shows (a page that opens instantly).
DEMO_VIEW_TOKENS = 6000
#: The demo's labels: each model by what it is (the table reads "reference P = llama-4x128").
DEMO_REFERENCE_LABEL = "llama-4x128"
DEMO_CANDIDATE_LABEL = "student"
DEMO_DATA_LABEL = "pydoc-heldout"
#: Where the demo writes when no --out is given; it replaces its own earlier output there.
DEMO_OUT = Path("runs") / "demo"


def _is_demo_run(config: dict[str, Any]) -> bool:
    """Whether a run's config.yaml is the demo's (by its data and candidate labels)."""
    data, candidates = config.get("data") or {}, config.get("candidates") or [{}]
    labels = (data.get("label"), candidates[0].get("label"))
    return labels == (DEMO_DATA_LABEL, DEMO_CANDIDATE_LABEL)


@contextmanager
def _no_resume_hint() -> Iterator[None]:
    """The demo has no --resume (a demo run takes seconds): refusals do not suggest it."""
    from lmkl.errors import OutputError

    try:
        yield
    except OutputError as exc:
        if exc.hint and "--resume" in exc.hint:
            exc.hint = "pass --overwrite to replace it, or another --out"
        raise


@friendly_errors
def demo(
    out: OutOpt = None,
    overwrite: OverwriteOpt = False,
    rebuild: Annotated[bool, typer.Option(help="Rebuild the cached demo models.")] = False,
    quiet: QuietOpt = False,
) -> None:
    """Build two small models offline (cached) and compare them: the whole job in one command.

    Without --out the demo writes runs/demo and replaces its own earlier output there (it says
    so); anything else in runs/demo is refused, never deleted. An --out directory that holds a
    run is replaced only with --overwrite.
    """
    import lmkl.api
    from lmkl.engine.rundir import check_own_output
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

    # Checked before the (minutes-long, first time) build: a refusal comes at once.
    replacing = out is None and check_own_output(DEMO_OUT, "lmkl demo", _is_demo_run)
    assets = build_demo_assets(demo_cache_dir(), force=rebuild, progress=say)
    if replacing:
        say(f"replacing {DEMO_OUT} (the demo's own output; --out DIR writes elsewhere)")
    with TokenProgress(quiet) as progress, _no_resume_hint():
        run = lmkl.api.compare(
            ModelSpec(model=str(assets.reference_dir), label=DEMO_REFERENCE_LABEL, device="cpu"),
            [ModelSpec(model=str(assets.candidate_dir), label=DEMO_CANDIDATE_LABEL, device="cpu")],
            DataSpec(source=str(assets.heldout_path), label=DEMO_DATA_LABEL),
            out=out or DEMO_OUT,
            overwrite=overwrite or replacing,
            context_length=256,
            stride=128,
            batch_size=8,
            # Both models' top-5 on the worst documents, so the report opens on the token view.
            view_tokens=DEMO_VIEW_TOKENS,
            progress=progress,
            # Every line, piped too: the header says which context length the KL is for.
            log=say,
        )
    show_run(run, quiet, print_summary)
    # End with the report people would rather look at: one self-contained HTML page (quiet:
    # the run directory alone, as every command prints; the report is inside it).
    report_path = run.report(view="tokens")
    if not quiet:
        show_path("report", report_path, quiet)


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
