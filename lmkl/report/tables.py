"""Rich tables of a finished run's or experiment's results.json (nothing is computed here).

:mod:`lmkl.report.terminal` prints them; they are apart so the printers of single runs and of
experiments share them without importing each other. Text that comes from the user (labels,
groups, paths, dataset and experiment names) goes into rich as :class:`~rich.text.Text`, never as
a markup string: a label ``[bold]x`` or ``:smile:`` is shown as typed, not styled or replaced.
"""

from __future__ import annotations

import copy
import dataclasses
from collections.abc import Iterable, Sequence
from typing import Any

from rich.console import Console, ConsoleOptions, Group, RenderableType, RenderResult
from rich.measure import Measurement
from rich.table import Table
from rich.text import Text

from lmkl.analysis import metrics as registry
from lmkl.formatting import (
    byte_size,
    format_column,
    format_interval,
    interval,
    mean_se,
    number,
    parameters,
    percent,
)

#: How to see every column of a table that was narrowed: rich reads the width from COLUMNS,
#: in a terminal and in a pipe alike.
WIDE_HINT = "COLUMNS=160 before the command shows every column"


def natural_width(table: Table, console: Console, options: ConsoleOptions) -> int:
    """The width ``table`` needs for no cell, header or number to wrap or be cut."""
    wide = options.update_width(1 << 16)
    return Measurement.get(console, wide, table).maximum


def _cell_text(console: Console, cell: Any) -> Text:
    """A table cell as text (markup strings rendered as rich renders them in the table)."""
    if isinstance(cell, Text):
        return cell
    return console.render_str(str(cell)) if cell is not None else Text("")


def without_columns(table: Table, drop: Iterable[str]) -> Table:
    """A copy of ``table`` without the columns whose header is in ``drop``."""
    drop = set(drop)
    narrow = copy.copy(table)
    kept = [c for c in table.columns if str(c.header) not in drop]
    narrow.columns = [dataclasses.replace(c, _index=i) for i, c in enumerate(kept)]
    return narrow


def vertical(
    table: Table, console: Console, key_columns: int = 1, by: str = "row", width: int = 80
) -> Group:
    """``table`` as blocks of ``header: value`` lines: one block per row, headed by its first
    ``key_columns`` cells (``by="column"``: one block per column but the first, whose cells
    label the lines). Nothing is cut: a value too long for its line (a path) starts a line of
    its own, and folds onto the next only if it is longer than the width."""
    headers = [_cell_text(console, c.header).plain for c in table.columns]
    cells = [[_cell_text(console, x) for x in c._cells] for c in table.columns]
    rows = len(table.rows)
    parts: list[RenderableType] = []
    if table.title:
        title = table.title if isinstance(table.title, Text) else console.render_str(table.title)
        parts.append(Text.assemble(title, style="table.title"))
    if by == "column":
        blocks = [
            (Text(headers[j], style="bold"), [(cells[0][i], cells[j][i]) for i in range(rows)])
            for j in range(1, len(headers))
        ]
    else:
        blocks = []
        for i in range(rows):
            key = Text(" ").join(cells[j][i] for j in range(key_columns) if cells[j][i].plain)
            key.stylize("bold")
            lines = [(Text(headers[j]), cells[j][i]) for j in range(key_columns, len(headers))]
            blocks.append((key, lines))
    for key, lines in blocks:
        parts.append(key)
        for name, value in lines:
            if not value.plain.strip():
                continue
            if len(name) + len(value) + 4 > width and " " not in value.plain:
                parts.append(Text.assemble("  ", name, ":"))
                parts.append(Text.assemble(value, overflow="fold"))
            else:
                parts.append(Text.assemble("  ", name, ": ", value, overflow="fold"))
    return Group(*parts)


class FittedTable:
    """A table that is never cut: as it is where it fits the width; else without the
    ``optional`` columns (in order, as few as needed; a note names them and how to see them);
    else :func:`vertical`. The choice is made at render time, from the console's width."""

    def __init__(
        self,
        table: Table,
        optional: Sequence[str] = (),
        key_columns: int = 1,
        by: str = "row",
        notes: Sequence[tuple[str | None, str]] = (),
    ) -> None:
        """``notes``: ``(column header, sentence)`` printed under the table when that column is
        shown (header None: always)."""
        self.table = table
        self.optional = [h for h in optional if h in {str(c.header) for c in table.columns}]
        self.key_columns = key_columns
        self.by = by
        self.notes = list(notes)

    def _notes(self, shown: set[str]) -> list[Text]:
        return [Text(text, style="dim") for header, text in self.notes if header in shown | {None}]

    def __rich_console__(self, console: Console, options: ConsoleOptions) -> RenderResult:
        width = options.max_width
        headers = {str(c.header) for c in self.table.columns}
        if natural_width(self.table, console, options) <= width:
            yield self.table
            yield from self._notes(headers)
            return
        for n in range(1, len(self.optional) + 1):
            dropped = self.optional[:n]
            narrow = without_columns(self.table, dropped)
            if natural_width(narrow, console, options) <= width:
                yield narrow
                yield from self._notes(headers - set(dropped))
                yield Text(
                    f"not shown at {width} columns: {', '.join(dropped)} ({WIDE_HINT})",
                    style="dim",
                )
                return
        yield vertical(self.table, console, self.key_columns, self.by, width)
        yield from self._notes(headers)


def fitted(renderable: Any) -> Any:
    """``renderable`` with every :class:`~rich.table.Table` in it (in groups too) made a
    :class:`FittedTable`: what the command line prints, so no table of any command is cut."""
    if isinstance(renderable, Table):
        return FittedTable(renderable)
    if isinstance(renderable, Group):
        return Group(*(fitted(r) for r in renderable.renderables))
    return renderable


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
    table.add_column("Δ next [CI]", justify="right", no_wrap=True)
    table.add_column("flips", justify="right", no_wrap=True)
    noise_rows = [r for r in rows if r["kind"] == "noise_floor"]
    if noise_rows:
        table.add_column("> noise", justify="center", no_wrap=True)
    values = format_column([row["value"] for row in rows])
    for row, value in zip(rows, values, strict=True):
        meta = " / ".join(str(x) for x in (row.get("group"), row.get("step")) if x is not None)
        nxt = row.get("vs_next")
        cells = [
            str(row["rank"]) if row["rank"] is not None else "",
            Text(row["label"]),
            *([Text(meta)] if has_meta else []),
            value,
            interval(row["ci"]),
            _size(row.get("size"), size_key),
            "★" if row.get("pareto") else "",
            format_interval(nxt["diff"], *nxt["ci"]) if nxt else "",
            percent(nxt["flip_share"]) if nxt else "",
        ]
        if noise_rows:
            vs = row.get("vs_noise_floor")
            cells.append(("yes" if vs["distinguishable"] else "[yellow]no[/yellow]") if vs else "")
        style = "dim" if row["kind"] == "noise_floor" else None
        table.add_row(*cells, style=style)
    return table


#: What the leaderboard's short headers mean (printed under it when the column is shown).
LEADERBOARD_NOTES: tuple[tuple[str | None, str], ...] = (
    (
        "Δ next [CI]",
        "Δ next: this candidate's value minus the next one's on identical tokens, with its "
        "paired-bootstrap CI;",
    ),
    ("flips", "flips: share of resamples where their order reverses;"),
    ("Pareto", "★: Pareto-optimal (no other candidate is both smaller and closer);"),
    ("> noise", "> noise: whole CI of (candidate − noise floor) above 0;"),
    (None, "[low, high]: 95% CI, bootstrap over documents."),
)


def leaderboard(results: dict[str, Any]) -> FittedTable:
    """:func:`leaderboard_table` as printed: at a narrow width the paired columns go first
    (named under the table), then one block per candidate; its notes explain the columns shown."""
    size_key = results["ranking"]["pareto"]["size"]
    return FittedTable(
        leaderboard_table(results),
        optional=["flips", "Δ next [CI]", "Pareto", _SIZE_HEADERS.get(size_key, size_key)],
        key_columns=2,
        notes=LEADERBOARD_NOTES,
    )


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
    rows = ranking["by_dataset"]
    columns = [
        *([r["datasets"][n] for r in rows] for n in names),
        [r["micro"] for r in rows],
        [r["macro"] for r in rows],
    ]
    shown = [format_column(c) for c in columns]
    for i, row in enumerate(rows):
        table.add_row(Text(row["label"]), *(c[i] for c in shown))
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
    points = series["points"]
    shown = [
        format_column(p[key] for p in points)
        for key in ("value", "kl_mean", "ppl_candidate", "ppl_ratio")
    ]
    for i, point in enumerate(points):
        table.add_row(
            str(point["step"]),
            Text(point["label"]),
            *(c[i] for c in shown),
            "★" if point["step"] == series["best"]["step"] else "",
        )
    return table


def plan_tables(plan: dict[str, Any]) -> list[Any]:
    """The dry-run plan: the reference on one line, the candidates (each with how its weights
    are made: scheme, recipe or GGUF file, since candidates of one model differ only there),
    and the datasets with token counts. Too wide: one block per candidate, headed by its label."""
    reference, *candidates = plan["models"]
    ref_line = Text.assemble(
        ("reference: ", "bold"),
        reference["model"],
        *(
            [" (label ", reference["label"], ")"]
            if reference["label"] not in ("reference", reference["model"])
            else []
        ),
        (
            f" · {reference['dtype']} · {reference['device']}"
            + (f" · {reference['architecture']}" if reference["architecture"] else "")
            + f" · max pos {number(reference['max_positions'])}"
            + (f" · {reference['weights']}" if reference.get("weights", "–") != "–" else ""),
            "dim",
        ),
    )
    models = Table(
        title=table_title("Plan for '", plan["name"], "': candidates (tokenizers checked)"),
        title_justify="left",
    )
    for name in (
        "label",
        "model",
        "weights",
        "dtype",
        "device",
        "group/step",
        "architecture",
        "max pos",
    ):
        models.add_column(name)
    for m in candidates:
        meta = " / ".join(str(x) for x in (m["group"], m["step"]) if x is not None)
        models.add_row(
            Text(m["label"]),
            Text(m["model"]),
            Text(m.get("weights", "–")),
            Text(m["dtype"]),
            Text(m["device"]),
            Text(meta),
            Text(m["architecture"] or "–"),
            number(m["max_positions"]),
        )
    if plan["noise_floor"]:
        models.add_row("noise-floor", "(reference + seeded weight noise)", "", "", "", "", "", "")
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
    return [ref_line, FittedTable(models, key_columns=1), FittedTable(data)]


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

    def pair(a: Any, b: Any) -> str:
        """``a / b``, two values that differ printed differently."""
        return " / ".join(format_column([a, b]))

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
    row("KL(P‖Q) p99 / p99.9", lambda m: pair(m["kl"]["p99"], m["kl"]["p999"]))
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
    row("PPL(P) / PPL(Q)", lambda m: pair(m["ppl"]["reference"], m["ppl"]["candidate"]))
    metric_row("ppl.ratio")
    row("mean ln(PPL(Q)/PPL(P))", lambda m: mean_se(m["ln_ppl_ratio"]))
    row(
        "bits/byte P / Q",
        lambda m: pair(m["bits_per_byte"]["reference"], m["bits_per_byte"]["candidate"]),
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
