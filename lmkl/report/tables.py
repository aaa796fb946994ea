"""Rich tables of a finished run's or experiment's results.json (nothing is computed here).

:mod:`lmkl.report.terminal` prints them; they are apart so the printers of single runs and of
experiments share them without importing each other. Text that comes from the user (labels,
groups, paths, dataset and experiment names) goes into rich as :class:`~rich.text.Text`, never as
a markup string: a label ``[bold]x`` or ``:smile:`` is shown as typed, not styled or replaced.
"""

from __future__ import annotations

from typing import Any

from rich.table import Table
from rich.text import Text

from lmkl.analysis import metrics as registry
from lmkl.formatting import byte_size, interval, mean_se, number, parameters, percent


def table_title(*parts: str | tuple[str, str]) -> Text:
    """A table title from plain strings (user text included) and ``(text, style)`` pairs.

    Nothing in it is read as markup; it keeps the italic that rich gives string titles.
    """
    return Text.assemble(*parts, style="table.title")


_SIZE_HEADERS = {"bits_per_weight": "bits/weight", "disk_bytes": "disk", "memory_bytes": "memory"}


def _size(size: dict[str, Any] | None, key: str) -> str:
    """A candidate's size (parameters or bytes) from a ranking row."""
    if not size or size.get(key) is None:
        return "–"
    if key == "bits_per_weight":
        return f"{size[key]:.2f}"
    return parameters(size[key]) if key == "parameters" else byte_size(size[key])


def leaderboard_table(results: dict[str, Any]) -> Table:
    """Rank, candidate, metric with CI, size, Pareto mark, paired difference with the next."""
    ranking = results["ranking"]
    size_key = ranking["pareto"]["size"]
    conf = f"{100 * ranking['confidence']:.0f}%"
    reference = results["reference"].get("label", "reference")
    table = Table(
        title=table_title(
            f"Leaderboard: {ranking['metric']} vs reference P = ",
            reference,
            f" ({ranking['direction']}; {conf} CI, bootstrap over {ranking['units']} "
            f"{ranking['unit']}s)",
        ),
        title_justify="left",
    )
    rows = ranking["leaderboard"]
    has_meta = any(r.get("group") is not None or r.get("step") is not None for r in rows)
    # Labels and numbers never wrap; on a narrow terminal the paired difference folds.
    table.add_column("#", justify="right", no_wrap=True)
    table.add_column("candidate", style="bold", no_wrap=True)
    if has_meta:
        table.add_column("group / step")
    table.add_column(ranking["metric"], justify="right", no_wrap=True)
    table.add_column(f"{conf} CI", justify="right", no_wrap=True)
    table.add_column(_SIZE_HEADERS.get(size_key, size_key), justify="right", no_wrap=True)
    table.add_column("Pareto", justify="center", no_wrap=True)
    table.add_column("Δ next [CI]", justify="right", overflow="fold", min_width=10)
    table.add_column("flips", justify="right", no_wrap=True)
    noise_rows = [r for r in rows if r["kind"] == "noise_floor"]
    if noise_rows:
        table.add_column("> noise", justify="center")
    for row in rows:
        meta = " / ".join(str(x) for x in (row.get("group"), row.get("step")) if x is not None)
        nxt = row.get("vs_next")
        cells = [
            str(row["rank"]) if row["rank"] is not None else "",
            Text(row["label"]),
            *([Text(meta)] if has_meta else []),
            number(row["value"]),
            interval(row["ci"], 3),
            _size(row.get("size"), size_key),
            "★" if row.get("pareto") else "",
            f"{number(nxt['diff'], 3)} {interval(nxt['ci'], 3)}" if nxt else "",
            percent(nxt["flip_share"]) if nxt else "",
        ]
        if noise_rows:
            vs = row.get("vs_noise_floor")
            cells.append(("yes" if vs["distinguishable"] else "[yellow]no[/yellow]") if vs else "")
        style = "dim" if row["kind"] == "noise_floor" else None
        table.add_row(*cells, style=style)
    return table


def datasets_table(results: dict[str, Any]) -> Table:
    """The ranking metric per dataset, with micro (by token) and macro (by dataset) averages."""
    ranking = results["ranking"]
    table = Table(title=f"{ranking['metric']} by dataset", title_justify="left")
    table.add_column("candidate", style="bold", no_wrap=True)
    names = list(ranking["by_dataset"][0]["datasets"]) if ranking["by_dataset"] else []
    for name in names:
        table.add_column(Text(name), justify="right")
    table.add_column("micro", justify="right")
    table.add_column("macro", justify="right")
    for row in ranking["by_dataset"]:
        table.add_row(
            Text(row["label"]),
            *(number(row["datasets"][n]) for n in names),
            number(row["micro"]),
            number(row["macro"]),
        )
    return table


def checkpoints_table(series: dict[str, Any], metric: str) -> Table:
    """One checkpoint series: metric, KL and PPL by step, best step marked."""
    group = series["group"] or "checkpoints"
    table = Table(
        title=table_title(group, f": by training step (best: step {series['best']['step']})"),
        title_justify="left",
    )
    for name in ("step", "candidate", metric, "KL mean", "PPL(Q)", "PPL ratio", "best"):
        table.add_column(name, justify="right" if name != "candidate" else "left")
    for point in series["points"]:
        table.add_row(
            str(point["step"]),
            Text(point["label"]),
            number(point["value"]),
            number(point["kl_mean"]),
            number(point["ppl_candidate"], 3),
            number(point["ppl_ratio"]),
            "★" if point["step"] == series["best"]["step"] else "",
        )
    return table


def plan_tables(plan: dict[str, Any]) -> list[Table]:
    """The dry-run plan: models and datasets with token counts."""
    models = Table(
        title=table_title("Plan for '", plan["name"], "': models (tokenizers checked)"),
        title_justify="left",
    )
    for name in (
        "role",
        "label",
        "model",
        "dtype",
        "device",
        "group/step",
        "architecture",
        "max pos",
    ):
        models.add_column(name)
    for m in plan["models"]:
        meta = " / ".join(str(x) for x in (m["group"], m["step"]) if x is not None)
        models.add_row(
            m["role"],
            Text(m["label"]),
            Text(m["model"]),
            Text(m["dtype"]),
            Text(m["device"]),
            Text(meta),
            Text(m["architecture"] or "–"),
            number(m["max_positions"]),
        )
    if plan["noise_floor"]:
        models.add_row(
            "noise floor", "noise-floor", "(reference + seeded weight noise)", "", "", "", "", ""
        )
    data = Table(
        title="Datasets (tokens scored with the reference tokenizer)", title_justify="left"
    )
    for name in ("dataset", "source", "weight", "documents", "windows", "tokens", "batches"):
        data.add_column(name, justify="left" if name in ("dataset", "source") else "right")
    for d in plan["datasets"]:
        data.add_row(
            Text(d["label"]),
            Text(d["source"]),
            number(d["weight"], 2),
            number(d["documents"]),
            number(d["windows"]),
            number(d["tokens"]),
            number(d["batches"]),
        )
    data.add_row(
        "total",
        "",
        "",
        "",
        "",
        number(plan["total_tokens"]),
        number(plan["reference_batches"]),
        style="bold",
    )
    return [models, data]


def summary_table(results: dict[str, Any]) -> Table:
    """One column per candidate: the headline statistics of the core comparison."""
    reference = results["reference"]["label"]
    table = Table(
        title=table_title("KL(P‖Q) with reference P = ", reference, " (nats)"),
        title_justify="left",
    )
    table.add_column("metric", style="bold")
    for cand in results["candidates"]:
        table.add_column(Text(cand["label"]), justify="right")

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
