"""What ``lmkl attribute`` prints: the summary sentence, the top modules and a bar per layer.

Every number is read from results.json (nothing is computed here). Tables keep numbers on one
line (``no_wrap``) and let only module names fold, so they fit 80 columns and pipes uncut.
"""

from __future__ import annotations

import math
from typing import Any

from rich import box
from rich.console import Console
from rich.table import Table
from rich.text import Text

from lmkl.formatting import (
    MISSING,
    format_interval,
    format_percent,
    format_value,
    to_float,
)

#: Modules listed in the terminal (the report and units.parquet hold every one).
TOP_MODULES = 10
#: Characters of the widest per-layer bar.
BAR_WIDTH = 10


def bar(value: float, largest: float, width: int = BAR_WIDTH) -> str:
    """A bar of eighth-blocks, ``width`` characters at ``largest``."""
    if not (largest > 0 and math.isfinite(value) and value > 0):
        return ""
    eighths = round(8 * width * min(value, largest) / largest)
    full, rest = divmod(eighths, 8)
    return "█" * full + ("" if rest == 0 else " ▏▎▍▌▋▊▉"[rest])


#: Significant digits of a KL in the attribution's tables (more where a CI's ends would
#: print alike: :func:`lmkl.formatting.format_interval`).
KL_DIGITS = 3


def kl_text(kl: dict[str, Any]) -> str:
    """``mean [ci_low, ci_high]`` of a KL object, the three sharing their digits (shared
    formatter: the ends never print alike unless they are equal)."""
    mean, low, high = (to_float(kl.get(key)) for key in ("mean", "ci_low", "ci_high"))
    return format_interval(mean, low, high, KL_DIGITS)


def kl_cells(kl: dict[str, Any]) -> tuple[str, str]:
    """:func:`kl_text` as two table cells, the mean and the bracket (``–`` without a CI)."""
    mean, _, bracket = kl_text(kl).partition(" ")
    return mean, bracket or MISSING


def kl_value(value: Any) -> str:
    """One KL (or a bits-per-weight figure) at the tables' digits."""
    return format_value(value, KL_DIGITS)


def modules_table(results: dict[str, Any], top: int = TOP_MODULES) -> Table:
    """The ``top`` modules by isolated KL, with intervals and shares of the modules' sum."""
    modules = [u for u in results["units"] if u["scope"] == "module"]
    total = to_float(results["sum_of_modules"]["mean"])
    ranked = sorted(modules, key=lambda u: -to_float(u["kl"]["mean"]))[:top]
    table = Table(
        title=f"top {len(ranked)} of {len(modules)} modules by isolated KL (nats)",
        title_justify="left",
        box=box.SIMPLE,
        pad_edge=False,
    )
    table.add_column("module", overflow="fold", ratio=1)
    for name in ("KL", "95% CI", "share"):
        table.add_column(name, justify="right", no_wrap=True)
    for unit in ranked:
        kl = unit["kl"]
        share = to_float(kl["mean"]) / total if total > 0 else math.nan
        table.add_row(Text(unit["name"]), *kl_cells(kl), format_percent(share))
    return table


def layers_table(results: dict[str, Any]) -> Table:
    """Per decoder layer: a bar and the KL of the whole layer taken from the candidate, the
    sum of its isolated modules, and the prefix (layers 0..l) KL."""
    layers = results["layers"]
    largest = max((to_float(r["layer_kl"]["mean"]) for r in layers), default=0.0)
    table = Table(
        title="KL per decoder layer (layer: that layer from the candidate; prefix: layers 0..l)",
        title_justify="left",
        box=box.SIMPLE,
        pad_edge=False,
    )
    table.add_column("layer", justify="right", no_wrap=True, min_width=5)
    table.add_column("", no_wrap=True, min_width=BAR_WIDTH)
    for name in ("layer KL", "95% CI", "modules", "prefix"):
        table.add_column(name, justify="right", no_wrap=True, min_width=len(name))
    for row in layers:
        kl = row["layer_kl"]
        table.add_row(
            str(row["layer"]),
            bar(to_float(kl["mean"]), largest),
            *kl_cells(kl),
            kl_value(row["modules_kl"]),
            kl_value(row["prefix_kl"]["mean"]),
        )
    return table


def print_attribution(results: dict[str, Any], console: Console | None = None) -> None:
    """The summary sentence, the full candidate's KL beside the modules' sum, the tables."""
    console = console or Console()
    full = results["full_kl"]
    total = results["sum_of_modules"]
    console.print(
        Text.assemble(
            ("full candidate KL ", "bold"),
            kl_text(full),
            "; sum of isolated modules ",
            kl_text(total),
        )
    )
    console.print(Text(results["summary"]))
    console.print(modules_table(results))
    console.print(layers_table(results))
    recipe = results.get("recipe")
    if recipe:
        console.print(Text(recipe_sentence(recipe)))
    cost = results.get("cost") or {}
    made, full_calls = (
        to_float(cost.get("layer_calls")),
        to_float(cost.get("full_forward_layer_calls")),
    )
    if made > 0 and full_calls > 0:
        console.print(
            f"[dim]{made:,.0f} decoder layer calls, {format_percent(made / full_calls)} of one "
            f"full forward per unit ({full_calls:,.0f})[/dim]"
        )


def recipe_sentence(recipe: dict[str, Any]) -> str:
    """The measured recipe beside uniform LOW and HIGH, in words (a recipe no better than
    uniform LOW says so)."""

    bits = kl_value
    verdict = (
        "better than uniform LOW"
        if recipe.get("better_than_low")
        else "NO better than uniform LOW: keep LOW, or raise the budget"
    )
    return (
        f"recipe: {len(recipe['high'])} modules from HIGH, {bits(recipe['bits_per_weight'])} "
        f"bits per weight: KL {kl_value(recipe['measured_kl'])} measured (predicted "
        f"{kl_value(recipe['predicted_kl'])}), {verdict}; uniform LOW "
        f"{kl_value(recipe['uniform_low_kl'])} at {bits(recipe.get('low_bits_per_weight'))} "
        f"bits, uniform HIGH {kl_value(recipe['uniform_high_kl'])} at "
        f"{bits(recipe.get('high_bits_per_weight'))} bits (recipe.yaml; lmkl compare REF "
        "--recipe recipe.yaml reproduces it)."
    )
