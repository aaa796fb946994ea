"""What the commands print about a finished run or experiment, with rich (nothing is computed
here; the tables come from :mod:`lmkl.report.tables`).

Labels, paths and messages that quote them are printed as :class:`~rich.text.Text` (styled
pieces assembled around them), never inside a markup string, so they show exactly as typed.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table
from rich.text import Text

from lmkl.formatting import (
    format_ci,
    format_mean_se,
    format_percent,
    format_rate,
    format_seconds,
    number,
)
from lmkl.report.tables import (
    FittedTable,
    checkpoints_table,
    datasets_table,
    leaderboard,
    summary_table,
    table_title,
)

#: The one meaning of "±" and of brackets, said under every table that shows them.
PLUS_MINUS_NOTE = (
    "± is one standard error over tokens; [low, high] is a 95% CI (for the KL mean: a "
    "bootstrap over documents, the interval to quote)."
)


def summary(results: dict[str, Any]) -> FittedTable:
    """:func:`~lmkl.report.tables.summary_table` as printed: one block per candidate where
    the columns do not fit, and the note on ± and brackets."""
    return FittedTable(summary_table(results), by="column", notes=[(None, PLUS_MINUS_NOTE)])


def print_summary(results: dict[str, Any], console: Console | None = None) -> None:
    """The run's summary: every statistic side by side for up to two candidates; with several,
    the leaderboard (the full table would not fit a terminal; ``lmkl report`` has it)."""
    console = console or Console()
    many = len(results.get("candidates", [])) > 2 and results.get("ranking")
    if not many:
        console.print(summary(results))
    if results.get("ranking"):
        console.print(leaderboard(results))
    if many:
        console.print(
            "[dim]every statistic of every candidate: lmkl report RUN --format table[/dim]"
        )
    throughput = results.get("throughput", {})
    tps = throughput.get("tokens_per_s")
    if tps:
        seconds = throughput["seconds"]
        scored = tps * seconds  # the tokens this process scored (a resume: not those kept)
        what = (
            f"scoring the {round(scored):,} tokens not kept"
            if (results.get("provenance") or {}).get("resumed_parts")
            else "of scoring"
        )
        console.print(
            f"[dim]{format_rate(scored, seconds)} over {format_seconds(seconds)} {what}; "
            f"padding efficiency {number(throughput.get('padding_efficiency'), 3)}[/dim]"
        )
    for cand in results.get("candidates", []):
        counts = cand["metrics"]["counts"]
        if counts.get("nonfinite"):
            console.print(
                Text.assemble(
                    ("warning:", "yellow"),
                    f" {counts['nonfinite']:,} positions "
                    f"({format_percent(counts.get('nonfinite_share', 0))}) of ",
                    cand["label"],
                    " had NaN or infinite logits (e.g. float16 overflow); they are excluded "
                    "from every statistic",
                )
            )
    note = results.get("windowing", {}).get("vocab_note")
    if note:
        console.print(Text.assemble(("note:", "yellow"), " ", note))


def print_bytes_summary(results: dict[str, Any], console: Any) -> None:
    """A rich table of the per-byte comparison, with the no-token-level-KL statement."""

    cand = results["candidates"][0]
    m = cand["metrics"]
    ref_label = results["reference"]["label"]
    table = Table(
        title=table_title(
            "per-byte comparison: ",
            ref_label,
            " (P) vs ",
            cand["label"],
            " (Q), different tokenizers",
        ),
        title_justify="left",
    )
    table.add_column("metric", style="bold")
    for name in ("P", "Q", "Q − P ± se", "95% CI"):
        table.add_column(name, justify="right")
    for title, block in (
        ("bits per byte", m["bits_per_byte"]),
        ("log-likelihood per byte (nats, per-doc mean)", m["ll_per_byte"]),
    ):
        d = block["difference"]
        table.add_row(
            title,
            number(block["reference"]),
            number(block["candidate"]),
            format_mean_se(d["mean"], d["se"]),
            format_ci(d["ci95"]),
        )
    table.add_row(
        "tokens per byte",
        number(m["tokens_per_byte"]["reference"]),
        number(m["tokens_per_byte"]["candidate"]),
        "",
        "",
    )
    console.print(FittedTable(table, notes=[(None, PLUS_MINUS_NOTE)]))
    counts = m["counts"]
    console.print(f"[dim]{counts['documents']} documents, {counts['bytes']:,} bytes[/dim]")
    console.print(Text.assemble(("note:", "bold yellow"), " ", results["note"]))


def print_sample_summary(results: dict[str, Any], console: Console) -> None:
    """A rich table of the estimators, then the warning when sampling was not exact."""

    block = results["candidates"][0]["metrics"]["sampled_kl"]
    counts = block["counts"]
    table = Table(
        title=f"sampled {block['target']} over continuations (nats per continuation); "
        f"{counts['prompts']} prompts × {counts['samples'] // max(counts['prompts'], 1)} "
        f"samples, {counts['tokens']:,} tokens",
        title_justify="left",
    )
    for column in ("estimator", "mean ± se", "95% CI", "se (prompts)", "per token", "unbiased"):
        table.add_column(
            column,
            justify="left" if column == "estimator" else "right",
            no_wrap=column == "estimator",
        )
    for name, est in block["estimators"].items():
        table.add_row(
            name,
            format_mean_se(est["mean"], est["se"]),
            format_ci(est["ci95"]),
            number(est["se_prompts"]),
            f"{number(est['per_token']['mean'])}",
            "yes" if est["unbiased"] else "no",
        )
    console.print(FittedTable(table, notes=[(None, PLUS_MINUS_NOTE)]))
    console.print(
        f"[dim]{counts['stopped']} of {counts['samples']} continuations ended at a stop "
        "token; exact_per_step is the headline (unbiased, lowest variance)[/dim]"
    )
    if block["warning"]:
        console.print(Text.assemble(("warning:", "bold yellow"), " ", block["warning"]))


def print_experiment(results: dict[str, Any], console: Console | None = None) -> None:
    """Everything a person needs to choose: summary, leaderboard, datasets, checkpoints, gates."""
    console = console or Console()
    console.print(summary(results))
    console.print(leaderboard(results))
    ranking = results["ranking"]
    if len(results.get("datasets", [])) > 1:
        console.print(FittedTable(datasets_table(results)))
    for series in ranking.get("checkpoints", []):
        console.print(FittedTable(checkpoints_table(series, ranking["metric"]), key_columns=2))
    if ranking["units"] < 20:
        console.print(
            f"[yellow]note:[/yellow] only {ranking['units']} {ranking['unit']}s: the bootstrap "
            "CIs are rough; score more documents for firm conclusions"
        )
    pareto = ranking["pareto"]
    console.print(
        Text(
            f"Pareto-optimal ({pareto['size'].replace('_', ' ')} vs {ranking['metric']}):"
            f" {', '.join(pareto['labels']) or '–'}"
        )
    )
    gates = results.get("gates") or {}
    limits = len(gates.get("fail_above", {})) + len(gates.get("fail_below", {}))
    if limits:
        if gates["passed"]:
            console.print(
                f"[green]gates: every candidate passes {limits} gate"
                f"{'s' if limits != 1 else ''}[/green]"
            )
        else:
            for failure in gates["failures"]:
                console.print(Text.assemble(("gate failed:", "red"), " ", failure["reason"]))
