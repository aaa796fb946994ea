"""Terminal rendering of results with rich (no computation happens here)."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

from lmkl.analysis import metrics as registry
from lmkl.formatting import interval, mean_se, number


def summary_table(results: dict[str, Any]) -> Table:
    """One column per candidate: the headline statistics of the core comparison."""
    reference = results["reference"]["label"]
    table = Table(title=f"KL(P‖Q) with reference P = {reference} (nats)", title_justify="left")
    table.add_column("metric", style="bold")
    for cand in results["candidates"]:
        table.add_column(cand["label"], justify="right")

    def row(name: str, getter: Any) -> None:
        table.add_row(name, *(getter(c["metrics"]) for c in results["candidates"]))

    def metric_row(path: str) -> None:
        """A row of one registry metric, labelled as the registry declares it."""
        metric = registry.REGISTRY[path]
        shown = [metric.show(c["metrics"]) for c in results["candidates"]]
        label = max((name for name, _ in shown), key=len, default=metric.label)  # "… ± se"
        table.add_row(label, *(text for _, text in shown))

    metric_row("kl.mean")
    metric_row("kl.median")
    row("KL(P‖Q) p99 / p99.9", lambda m: f"{number(m['kl']['p99'])} / {number(m['kl']['p999'])}")
    metric_row("kl.max")
    if any("kl_bounds" in c["metrics"] for c in results["candidates"]):
        # Compact (top-k) reference cache: only a guaranteed interval is known.
        row(
            "KL(P‖Q) mean in",
            lambda m: (
                interval([m["kl_bounds"]["lower"]["mean"], m["kl_bounds"]["upper"]["mean"]])
                if "kl_bounds" in m
                else "–"
            ),
        )
    metric_row("reverse_kl.mean")
    metric_row("jsd.mean")
    row(
        "PPL(P) / PPL(Q)",
        lambda m: f"{number(m['ppl']['reference'], 3)} / {number(m['ppl']['candidate'], 3)}",
    )
    metric_row("ppl.ratio")
    row("mean ln(PPL(Q)/PPL(P))", lambda m: mean_se(m["ln_ppl_ratio"]))
    row(
        "bits/byte P / Q",
        lambda m: (
            f"{number(m['bits_per_byte']['reference'])} / {number(m['bits_per_byte']['candidate'])}"
        ),
    )
    metric_row("top1_agreement.mean")
    metric_row("top1_in_top5.mean")
    row("Δp mean ± se (RMS)", lambda m: f"{mean_se(m['delta_p'])} ({number(m['delta_p']['rms'])})")
    row(
        "tokens (non-finite, inf KL)",
        lambda m: (
            f"{m['counts']['tokens']:,} ({m['counts']['nonfinite']}, {m['counts']['infinite']})"
        ),
    )
    return table


def print_summary(results: dict[str, Any], console: Console | None = None) -> None:
    """The run's summary: every statistic side by side for up to two candidates; with several,
    the leaderboard (the full table would not fit a terminal; ``lmkl report`` has it)."""
    from lmkl.report.leaderboard import leaderboard_table

    console = console or Console()
    many = len(results.get("candidates", [])) > 2 and results.get("ranking")
    if not many:
        console.print(summary_table(results))
    if results.get("ranking"):
        console.print(leaderboard_table(results))
    if many:
        console.print(
            "[dim]every statistic of every candidate: lmkl report RUN --format table[/dim]"
        )
    throughput = results.get("throughput", {})
    tps = throughput.get("tokens_per_s")
    if tps:
        console.print(
            f"[dim]{number(tps, 1)} tokens/s over {number(throughput['seconds'], 1)} s of "
            f"scoring; padding efficiency {number(throughput.get('padding_efficiency'), 3)}"
            "[/dim]"
        )
    for cand in results.get("candidates", []):
        counts = cand["metrics"]["counts"]
        if counts.get("nonfinite"):
            console.print(
                f"[yellow]warning:[/yellow] {counts['nonfinite']:,} positions "
                f"({100 * counts.get('nonfinite_share', 0):.2f}%) of {cand['label']} had NaN or "
                "infinite logits (e.g. float16 overflow); they are excluded from every statistic"
            )
    note = results.get("windowing", {}).get("vocab_note")
    if note:
        console.print(f"[yellow]note:[/yellow] {note}")


def print_bytes_summary(results: dict[str, Any], console: Any) -> None:
    """A rich table of the per-byte comparison, with the no-token-level-KL statement."""
    from rich.table import Table

    cand = results["candidates"][0]
    m = cand["metrics"]
    ref_label = results["reference"]["label"]
    table = Table(
        title=f"per-byte comparison: {ref_label} (P) vs {cand['label']} (Q), different tokenizers",
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
            f"{number(d['mean'])} ± {number(d['se'])}",
            f"[{number(d['ci95'][0])}, {number(d['ci95'][1])}]",
        )
    table.add_row(
        "tokens per byte",
        number(m["tokens_per_byte"]["reference"]),
        number(m["tokens_per_byte"]["candidate"]),
        "",
        "",
    )
    console.print(table)
    counts = m["counts"]
    console.print(f"[dim]{counts['documents']} documents, {counts['bytes']:,} bytes[/dim]")
    console.print(f"[bold yellow]note:[/bold yellow] {results['note']}", highlight=False)


def print_sample_summary(results: dict[str, Any], console: Console) -> None:
    """A rich table of the estimators, then the warning when sampling was not exact."""
    from rich.table import Table

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
        lo, hi = est["ci95"]
        table.add_row(
            name,
            f"{number(est['mean'])} ± {number(est['se'])}",
            f"[{number(lo)}, {number(hi)}]",
            number(est["se_prompts"]),
            f"{number(est['per_token']['mean'])}",
            "yes" if est["unbiased"] else "no",
        )
    console.print(table)
    console.print(
        f"[dim]{counts['stopped']} of {counts['samples']} continuations ended at a stop "
        "token; exact_per_step is the headline (unbiased, lowest variance)[/dim]"
    )
    if block["warning"]:
        console.print(f"[bold yellow]warning:[/bold yellow] {block['warning']}", highlight=False)
