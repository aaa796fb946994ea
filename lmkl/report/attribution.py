"""The report of an attribution run (``lmkl report RUN`` on a run of ``lmkl attribute``).

Read from the run directory alone (results.json): the plain-words summary, per-layer bars with
their intervals, a layer × module-type heat map of the isolated module KLs, the prefix curve
beside the full candidate's KL and each layer's hidden-state error, and the top modules. HTML
(one self-contained page) or Markdown with PNGs beside it; ``json`` prints results.json's
attribution fields, ``table`` what ``lmkl attribute`` printed.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from lmkl.attribution.terminal import (
    kl_cells,
    kl_text,
    kl_value,
    print_attribution,
    recipe_sentence,
)
from lmkl.engine.rundir import load_results
from lmkl.errors import UsageError
from lmkl.files import atomic_path
from lmkl.formatting import format_percent, format_ratio, to_float
from lmkl.report.plots import DPI, WIDTH, Plot

#: Modules listed in the report's table.
TOP_MODULES = 20
KIND = "attribution"


def is_attribution_run(path: Path) -> bool:
    """Whether ``path`` holds a finished attribution run."""
    results = Path(path) / "results.json"
    if not results.is_file():
        return False
    try:
        return json.loads(results.read_text()).get("kind") == KIND
    except (OSError, ValueError, AttributeError):
        return False


def _figure(height: float) -> tuple[Any, Any]:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(WIDTH, height), dpi=DPI, layout="constrained")
    return fig, fig.subplots()


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def layer_bars(results: dict[str, Any]) -> Plot:
    """Per decoder layer: that layer alone from the candidate (bar, 95% CI) and the sum of its
    isolated modules (marker)."""
    layers = results["layers"]
    x = np.arange(len(layers))
    kl = np.array([to_float(r["layer_kl"]["mean"]) for r in layers])
    low = np.array([to_float(r["layer_kl"]["ci_low"]) for r in layers])
    high = np.array([to_float(r["layer_kl"]["ci_high"]) for r in layers])
    modules = np.array([to_float(r["modules_kl"]) for r in layers])
    fig, ax = _figure(3.2)
    ax.bar(x, kl, color="#4c78a8", label="layer from the candidate")
    ax.errorbar(x, kl, yerr=[kl - low, high - kl], fmt="none", ecolor="#222831", capsize=3, lw=1)
    ax.plot(x, modules, "D", color="#f58518", ms=4, label="sum of its modules, each alone")
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("KL(P‖hybrid), nats")
    ax.set_xticks(x)
    ax.legend()
    return Plot(
        "attribution_layers",
        "KL per decoder layer",
        "Each bar: the reference with only that decoder layer taken from the candidate, mean KL "
        "over the scored tokens with its 95% document-bootstrap interval. Diamonds: the sum of "
        "the layer's modules taken one at a time.",
        _png(fig),
        {"kl": kl.tolist(), "ci_low": low.tolist(), "ci_high": high.tolist()},
    )


def module_heatmap(results: dict[str, Any]) -> Plot | None:
    """Layers × module types: each module's isolated KL (log colour scale)."""
    modules = [u for u in results["units"] if u["scope"] == "module" and u["layer"] is not None]
    if not modules:
        return None
    types = list(dict.fromkeys(u["type"] for u in modules))
    layers = sorted({u["layer"] for u in modules})
    grid = np.full((len(types), len(layers)), np.nan)
    for u in modules:
        grid[types.index(u["type"]), layers.index(u["layer"])] = to_float(u["kl"]["mean"])
    from matplotlib.colors import LogNorm

    positive = grid[np.isfinite(grid) & (grid > 0)]
    fig, ax = _figure(0.6 + 0.32 * len(types))
    shown = np.where(grid > 0, grid, np.nan)
    norm = (
        LogNorm(positive.min(), positive.max())
        if positive.size and positive.min() < positive.max()
        else None
    )
    image = ax.imshow(shown, aspect="auto", cmap="viridis", norm=norm, interpolation="nearest")
    ax.set_yticks(range(len(types)), types)
    step = max(1, len(layers) // 16)
    ax.set_xticks(
        range(0, len(layers), step), [str(layers[i]) for i in range(0, len(layers), step)]
    )
    ax.set_xlabel("decoder layer")
    ax.grid(False)
    fig.colorbar(image, ax=ax, label="isolated KL, nats")
    return Plot(
        "attribution_heatmap",
        "Isolated KL per module",
        "Each cell: the reference with only that module taken from the candidate (mean KL). "
        "Blank: identical in both models (KL 0).",
        _png(fig),
        {"types": types, "layers": layers, "kl": grid.tolist()},
    )


def prefix_curve(results: dict[str, Any]) -> Plot:
    """Layers 0..l from the candidate: KL along the depth, the full candidate's KL, and each
    layer's hidden-state relative error on a second axis."""
    layers = results["layers"]
    x = np.arange(len(layers))
    kl = np.array([to_float(r["prefix_kl"]["mean"]) for r in layers])
    low = np.array([to_float(r["prefix_kl"]["ci_low"]) for r in layers])
    high = np.array([to_float(r["prefix_kl"]["ci_high"]) for r in layers])
    error = np.array([to_float(e) for e in results["hidden_state_error"]])
    full = to_float(results["full_kl"]["mean"])
    fig, ax = _figure(3.2)
    ax.plot(x, kl, "o-", color="#4c78a8", label="layers 0..l from the candidate")
    ax.fill_between(x, low, high, color="#4c78a8", alpha=0.2, lw=0)
    ax.axhline(full, color="#e45756", ls="--", lw=1.2, label="full candidate")
    ax.set_xticks(x[:: max(1, len(x) // 16)])
    ax.set_xlabel("decoder layer l")
    ax.set_ylabel("KL, nats")
    second = ax.twinx()
    second.plot(x, error, "s:", color="#54a24b", ms=3, label="hidden-state error")
    second.set_ylabel("‖h_Q − h_P‖ / ‖h_P‖")
    second.grid(False)
    lines = ax.get_legend_handles_labels()
    extra = second.get_legend_handles_labels()
    ax.legend(lines[0] + extra[0], lines[1] + extra[1], loc="upper left")
    return Plot(
        "attribution_prefix",
        "Where along the depth the drift builds up",
        "Blue: the reference with its embeddings and layers 0..l taken from the candidate (95% "
        "interval shaded); red: the whole candidate; green: the full candidate's relative "
        "hidden-state error at each layer's output.",
        _png(fig),
        {"prefix_kl": kl.tolist(), "full_kl": full, "hidden_state_error": error.tolist()},
    )


def recipe_point(results: dict[str, Any]) -> Plot | None:
    """Size against KL: the measured recipe beside uniform LOW and uniform HIGH."""
    recipe = results.get("recipe")
    if not recipe:
        return None
    points = [
        ("uniform LOW", recipe.get("low_bits_per_weight"), recipe["uniform_low_kl"], "#4c78a8"),
        ("uniform HIGH", recipe.get("high_bits_per_weight"), recipe["uniform_high_kl"], "#54a24b"),
        ("recipe (measured)", recipe.get("bits_per_weight"), recipe["measured_kl"], "#e45756"),
    ]
    fig, ax = _figure(3.0)
    for label, size, kl, color in points:
        ax.plot([to_float(size)], [to_float(kl)], "o", color=color, ms=7, label=label)
    ax.plot(
        [to_float(recipe.get("bits_per_weight"))],
        [to_float(recipe["predicted_kl"])],
        "x",
        color="#e45756",
        ms=7,
        label="recipe (predicted)",
    )
    if all(to_float(p[2]) > 0 for p in points):
        ax.set_yscale("log")
    ax.set_xlabel("stored bits per weight")
    ax.set_ylabel("mean KL, nats")
    ax.legend()
    return Plot(
        "attribution_recipe",
        "The mixed-precision recipe, measured",
        f"{len(recipe['high'])} modules taken from HIGH within {recipe.get('budget_bits')} bits "
        "per weight, chosen greedily by isolated KL saved per extra stored byte; the mixed model "
        "was built and its KL measured on the same tokens"
        + ("." if recipe.get("better_than_low") else ": it is NO better than uniform LOW."),
        _png(fig),
        {name: [to_float(size), to_float(kl)] for name, size, kl, _ in points},
    )


def top_modules(results: dict[str, Any], top: int = TOP_MODULES) -> list[dict[str, str]]:
    """The ``top`` modules by isolated KL as table rows (text)."""
    modules = [u for u in results["units"] if u["scope"] == "module"]
    total = to_float(results["sum_of_modules"]["mean"])
    ranked = sorted(modules, key=lambda u: -to_float(u["kl"]["mean"]))[:top]
    return [
        {
            "name": u["name"],
            "kl": kl_cells(u["kl"])[0],
            "ci": kl_cells(u["kl"])[1],
            "share": format_percent(to_float(u["kl"]["mean"]) / total if total > 0 else math.nan),
            "reverse_kl": kl_value(u["reverse_kl"]),
            "top1": format_percent(u["top1_agreement"], 4),
        }
        for u in ranked
    ]


def _model_name(model: dict[str, Any], role: str) -> str:
    """A model's label, or its directory's name where the label only says its role."""
    label = model.get("label")
    if label and label != role:
        return str(label)
    return Path(str(model.get("path") or model.get("model") or role)).name or role


def _context(results: dict[str, Any], plots: list[Plot], images: dict[str, str]) -> dict[str, Any]:
    full, total = results["full_kl"], results["sum_of_modules"]
    return {
        "reference": _model_name(results["reference"], "reference"),
        "candidate": results["candidate"].get("label", "candidate"),
        "summary": results["summary"],
        "full": kl_text(full),
        "modules_sum": kl_text(total),
        "ratio": format_ratio(total.get("full_over_sum")),
        "bootstrap_unit": (results.get("bootstrap") or {}).get("unit", "document"),
        "tokens": results["full"]["counts"]["tokens"],
        "documents": results["full"]["counts"]["documents"],
        "plots": [{"title": p.title, "caption": p.caption, "src": images[p.name]} for p in plots],
        "modules": top_modules(results),
        "units": len(results["units"]),
        "recipe": recipe_sentence(results["recipe"]) if results.get("recipe") else None,
    }


def write_attribution_report(
    run_dirs: list[Path], fmt_name: str = "html", out: Path | None = None, console: Any = None
) -> Path | None:
    """Write the report of one attribution run; returns the file (None: printed)."""
    if len(run_dirs) != 1:
        raise UsageError(
            "an attribution run is reported on its own", "pass one attribution run directory"
        )
    run_dir = Path(run_dirs[0])
    results = load_results(run_dir)
    if fmt_name == "table":
        from rich.console import Console

        print_attribution(results, console or Console())
        return None
    if fmt_name == "json":
        text = json.dumps(results, indent=2) + "\n"
        if out is None:
            print(text, end="")
            return None
        with atomic_path(Path(out)) as tmp:
            tmp.write_text(text)
        return Path(out)
    drawn = (layer_bars, module_heatmap, prefix_curve, recipe_point)
    plots = [p for p in (draw(results) for draw in drawn) if p is not None]
    import jinja2

    # Autoescaped HTML, strict about missing values; Markdown is written as it is.
    env = jinja2.Environment(
        loader=jinja2.PackageLoader("lmkl.report", "templates"),
        autoescape=jinja2.select_autoescape(["html.j2"], default_for_string=False),
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    if fmt_name == "html":
        out = Path(out) if out else run_dir / "report.html"
        images = {p.name: p.data_uri() for p in plots}
        text = env.get_template("attribution.html.j2").render(**_context(results, plots, images))
    elif fmt_name == "md":
        out = Path(out) if out else run_dir / "report.md"
        assets = out.parent / f"{out.stem}_files"
        assets.mkdir(parents=True, exist_ok=True)
        for plot in plots:
            with atomic_path(assets / f"{plot.name}.png") as tmp:
                tmp.write_bytes(plot.png)
        images = {p.name: f"{assets.name}/{p.name}.png" for p in plots}
        text = env.get_template("attribution.md.j2").render(**_context(results, plots, images))
    else:
        raise UsageError(f"unknown report format '{fmt_name}'", "use html, md, json or table")
    with atomic_path(out) as tmp:
        tmp.write_text(text)
    return out
