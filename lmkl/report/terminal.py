"""Terminal rendering of results with rich (no computation happens here)."""

from __future__ import annotations

import math
from typing import Any

from rich.console import Console
from rich.table import Table


def fmt(value: Any, digits: int = 4) -> str:
    """A number for humans: ``inf`` stays ``inf``, missing is ``–``."""
    if value is None:
        return "–"
    if value == "inf" or (isinstance(value, float) and math.isinf(value)):
        return "inf"
    if isinstance(value, float) and math.isnan(value):
        return "–"
    if isinstance(value, int):
        return f"{value:,}"
    if abs(value) >= 1e4:
        return f"{value:,.0f}"
    if value != 0 and abs(value) < 10**-digits:
        return f"{value:.{digits - 1}e}"
    return f"{value:.{digits}f}"


def pm(metric: dict[str, Any], key: str = "mean", digits: int = 4) -> str:
    """``mean ± se`` of a metric object."""
    return f"{fmt(metric.get(key), digits)} ± {fmt(metric.get('se'), digits)}"


def summary_table(results: dict[str, Any]) -> Table:
    """One column per candidate: the headline statistics of the core comparison."""
    reference = results["reference"]["label"]
    table = Table(title=f"KL(P‖Q) with reference P = {reference} (nats)", title_justify="left")
    table.add_column("metric", style="bold")
    for cand in results["candidates"]:
        table.add_column(cand["label"], justify="right")

    def row(name: str, getter: Any) -> None:
        table.add_row(name, *(getter(c["metrics"]) for c in results["candidates"]))

    row("KL(P‖Q) mean ± se", lambda m: pm(m["kl"]))
    row("KL(P‖Q) median", lambda m: fmt(m["kl"]["median"]))
    row("KL(P‖Q) p99 / p99.9", lambda m: f"{fmt(m['kl']['p99'])} / {fmt(m['kl']['p999'])}")
    row("KL(P‖Q) max", lambda m: fmt(m["kl"]["max"]))
    if any("kl_bounds" in c["metrics"] for c in results["candidates"]):
        # Compact (top-k) reference cache: only a guaranteed interval is known.
        row(
            "KL(P‖Q) mean in",
            lambda m: (
                f"[{fmt(m['kl_bounds']['lower']['mean'])}, {fmt(m['kl_bounds']['upper']['mean'])}]"
                if "kl_bounds" in m
                else "–"
            ),
        )
    row("KL(Q‖P) mean ± se", lambda m: pm(m["reverse_kl"]))
    row("JSD mean ± se", lambda m: pm(m["jsd"]))
    row(
        "PPL(P) / PPL(Q)",
        lambda m: f"{fmt(m['ppl']['reference'], 3)} / {fmt(m['ppl']['candidate'], 3)}",
    )
    row("PPL ratio Q/P", lambda m: fmt(m["ppl"]["ratio"]))
    row("mean ln(PPL(Q)/PPL(P))", lambda m: pm(m["ln_ppl_ratio"]))
    row(
        "bits/byte P / Q",
        lambda m: (
            f"{fmt(m['bits_per_byte']['reference'])} / {fmt(m['bits_per_byte']['candidate'])}"
        ),
    )
    row("top-1 agreement", lambda m: _pct(m["top1_agreement"]))
    row("P's top-1 in Q's top-5", lambda m: _pct(m["top1_in_top5"]))
    row("Δp mean ± se (RMS)", lambda m: f"{pm(m['delta_p'])} ({fmt(m['delta_p']['rms'])})")
    row(
        "tokens (non-finite, inf KL)",
        lambda m: (
            f"{m['counts']['tokens']:,} ({m['counts']['nonfinite']}, {m['counts']['infinite']})"
        ),
    )
    return table


def _pct(metric: dict[str, Any]) -> str:
    mean, se = metric.get("mean"), metric.get("se")
    if not isinstance(mean, float) or math.isnan(mean):
        return "–"
    se_text = f" ± {100 * se:.2f}%" if isinstance(se, float) and math.isfinite(se) else ""
    return f"{100 * mean:.2f}%{se_text}"


def print_summary(results: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    console.print(summary_table(results))
    throughput = results.get("throughput", {})
    tps = throughput.get("tokens_per_s")
    if tps:
        console.print(
            f"[dim]{fmt(tps, 1)} tokens/s over {fmt(throughput['seconds'], 1)} s of "
            f"scoring; padding efficiency {fmt(throughput.get('padding_efficiency'), 3)}"
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
            fmt(block["reference"]),
            fmt(block["candidate"]),
            f"{fmt(d['mean'])} ± {fmt(d['se'])}",
            f"[{fmt(d['ci95'][0])}, {fmt(d['ci95'][1])}]",
        )
    table.add_row(
        "tokens per byte",
        fmt(m["tokens_per_byte"]["reference"]),
        fmt(m["tokens_per_byte"]["candidate"]),
        "",
        "",
    )
    console.print(table)
    counts = m["counts"]
    console.print(f"[dim]{counts['documents']} documents, {counts['bytes']:,} bytes[/dim]")
    console.print(f"[bold yellow]note:[/bold yellow] {results['note']}", highlight=False)
