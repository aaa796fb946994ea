"""Report figures with matplotlib (Agg, no pyplot global state, no display needed).

Every function takes a :class:`~.data.Report` and returns a :class:`Plot` holding the PNG and
the data as drawn: values are read back from the matplotlib artists (bar heights, line
coordinates, histogram steps), so tests check what the figure shows, not only that it exists.
A function returns ``None`` when its view does not apply (e.g. no sizes known).
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from lmkl.formatting import Z95
from lmkl.report.data import Report

#: Figure width in inches and resolution: ~880 px wide, crisp in a 900 px column.
WIDTH = 8.8
DPI = 100

_STYLE = {
    "font.size": 9.5,
    "axes.titlesize": 10.5,
    "axes.titleweight": "bold",
    "axes.labelsize": 9.5,
    "axes.edgecolor": "#9aa3ad",
    "axes.labelcolor": "#222831",
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e3e7eb",
    "grid.linewidth": 0.8,
    "xtick.color": "#4a5560",
    "ytick.color": "#4a5560",
    "legend.frameon": False,
    "legend.fontsize": 8.5,
    "figure.facecolor": "white",
    "savefig.facecolor": "white",
    # Labels are user text: a matplotlibrc asking for LaTeX would make '_', '%' or '&' in a
    # label fail the report after the run (and needs a LaTeX install).
    "text.usetex": False,
}


@dataclass
class Plot:
    """One rendered figure: PNG bytes plus the data it shows."""

    name: str
    title: str
    caption: str
    png: bytes
    data: dict[str, Any] = field(default_factory=dict)

    def data_uri(self) -> str:
        """The PNG as a ``data:`` URI, for a self-contained HTML page."""
        return "data:image/png;base64," + base64.b64encode(self.png).decode("ascii")


def _figure(height: float, ncols: int = 1) -> tuple[Any, Any]:
    from matplotlib import rc_context
    from matplotlib.figure import Figure

    with rc_context(_STYLE):
        fig = Figure(figsize=(WIDTH, height), dpi=DPI, layout="constrained")
        axes = fig.subplots(1, ncols, squeeze=False)[0]
    return fig, axes


def _png(fig: Any) -> bytes:
    from matplotlib import rc_context

    buffer = io.BytesIO()
    with rc_context(_STYLE):
        fig.savefig(buffer, format="png", dpi=DPI)
    return buffer.getvalue()


def _styled(draw: Callable[..., Plot | None]) -> Callable[..., Plot | None]:
    """Run a drawing function under the report style (fonts, grid, spines)."""

    def wrapper(report: Report) -> Plot | None:
        from matplotlib import rc_context

        with rc_context(_STYLE):
            return draw(report)

    wrapper.__name__ = draw.__name__
    wrapper.__doc__ = draw.__doc__
    return wrapper


def _colors(report: Report) -> dict[str, str]:
    return {c.key: c.color for c in report.candidates}


def _literal(text: str, limit: int = 28) -> str:
    """User text (a label, a group) as matplotlib should draw it: cut to ``limit`` characters,
    and every ``$`` escaped so it is drawn as a dollar sign, never parsed as math text (where
    ``a$b$c`` loses its dollars and ``$\\oops$`` makes the figure fail to save)."""
    short = text if len(text) <= limit else text[: limit - 1] + "…"
    return short.replace("$", r"\$")


#: Title and caption of each figure, by name; a figure may add sentences about its data.
FIGURES: dict[str, tuple[str, str]] = {
    "kl_distribution": (
        "KL distribution",
        "Per-token KL(P‖Q) on log-spaced bins shared by all candidates; the CDF shows the "
        "share of tokens at or below each KL value.",
    ),
    "kl_by_position": (
        "KL by position",
        "Mean (solid) and median (dashed) per-token KL against the number of tokens the "
        "models could see. Early positions have little context; a candidate that "
        "degrades with long context rises to the right.",
    ),
    "kl_by_confidence": (
        "KL by reference confidence",
        "Tokens grouped by how sure the reference was (its top-1 probability). Left: "
        "mean KL with 95% intervals. Right: each group's share of the total KL (token "
        "share × mean KL); dots give the share of tokens.",
    ),
    "ppl_ratio": (
        "Perplexity ratio",
        "Perplexity of each candidate divided by the reference's on the same tokens, "
        "with a 95% interval from the standard error of the mean log ratio.",
    ),
    "size_vs_kl": (
        "Size vs KL",
        "Each candidate's size against its mean KL (95% intervals). Outlined points are "
        "Pareto-optimal: no other candidate is both smaller and closer to the reference.",
    ),
    "kl_by_step": (
        "KL by step",
        "Mean KL with 95% intervals and the perplexity ratio for each checkpoint series.",
    ),
}


def _plot(name: str, fig: Any, drawn: dict[str, Any], more: str = "") -> Plot:
    """The finished figure ``name`` with its title and caption (plus ``more``); ``drawn``
    gains the ``layout`` as saved (pixel boxes of the figure, its axes and its legends)."""
    title, caption = FIGURES[name]
    png = _png(fig)
    drawn["layout"] = _layout(fig)
    return Plot(name, title, caption + more, png, drawn)


def _layout(fig: Any) -> dict[str, Any]:
    """Pixel boxes ``[x0, y0, x1, y1]`` of the figure, each axes and each legend, after the
    constrained layout has placed them: tests check that no legend covers an axes or is cut."""

    def box(bbox: Any) -> list[float]:
        return [float(bbox.x0), float(bbox.y0), float(bbox.x1), float(bbox.y1)]

    from matplotlib import rc_context

    with rc_context(_STYLE):
        fig.draw_without_rendering()
    legends = list(fig.legends) + [ax.get_legend() for ax in fig.axes if ax.get_legend()]
    return {
        "figure": box(fig.bbox),
        "axes": [box(ax.get_window_extent()) for ax in fig.axes],
        "legends": [box(legend.get_window_extent()) for legend in legends],
    }


#: Legend entries per column beside the axes before a second column starts.
_LEGEND_ROWS = 14


def _legend_outside(fig: Any, handles: list[Any], labels: list[str]) -> Any:
    """The legend to the right of the axes, outside them: it never covers data, and the
    constrained layout shrinks the axes to make room instead of cutting it off."""
    if not handles:
        return None
    ncols = max(1, math.ceil(len(handles) / _LEGEND_ROWS))
    return fig.legend(handles, labels, loc="outside right upper", ncols=ncols)


def _log_if_wide(ax: Any, values: list[Any], spread: float = 30.0) -> bool:
    """Put the y axis of ``ax`` on a log scale when the positive finite ``values`` span more
    than ``spread``× (a quantized candidate's KL beside a distilled one's), with plain tick
    labels. Returns whether it did."""
    data = np.concatenate([np.asarray(v, dtype=float).ravel() for v in values])
    positive = data[np.isfinite(data) & (data > 0)]
    if positive.size < 2 or positive.max() / positive.min() <= spread:
        return False
    ax.set_yscale("log")
    _plain_log_ticks(ax.yaxis)
    return True


@_styled
def kl_distribution(report: Report) -> Plot | None:
    """Histogram of per-token KL on a log axis (share of tokens per bin) and its CDF."""
    hist, cdf = report.histogram, report.cdf
    if not hist.get("series"):
        return None
    colors = _colors(report)
    fig, (left, right) = _figure(3.4, 2)
    edges = np.asarray(hist["edges"])
    drawn: dict[str, Any] = {"edges": edges, "histogram": {}, "cdf": {}}
    for key, series in hist["series"].items():
        artist = left.stairs(
            series["share"],
            edges,
            color=colors[key],
            linewidth=1.6,
            label=_literal(key),
            fill=len(hist["series"]) == 1,
            alpha=0.9,
        )
        if len(hist["series"]) == 1:
            artist.set_alpha(0.35)
            left.stairs(series["share"], edges, color=colors[key], linewidth=1.6)
        drawn["histogram"][key] = np.asarray(artist.get_data().values)
    left.set_xscale("log")
    left.set_xlabel("KL(P‖Q) per token, nats (log scale)")
    left.set_ylabel("share of tokens")
    left.set_title("Distribution of per-token KL")
    left.yaxis.set_major_formatter(_percent_formatter())
    for key, series in cdf.get("series", {}).items():
        x = np.maximum(np.asarray(series["x"]), edges[0])
        (line,) = right.plot(x, series["y"], color=colors[key], linewidth=1.8, label=_literal(key))
        drawn["cdf"][key] = {"x": np.asarray(line.get_xdata()), "y": np.asarray(line.get_ydata())}
    right.set_xscale("log")
    for ax in (left, right):
        # Same x range in both panels; no crowded minor labels when the range is narrow.
        ax.set_xlim(edges[0], edges[-1])
        ax.xaxis.set_minor_formatter(_null_formatter())
    right.set_ylim(0, 1.01)
    right.set_xlabel("KL(P‖Q) per token, nats (log scale)")
    right.set_ylabel("share of tokens with KL ≤ x")
    right.set_title("Cumulative distribution")
    right.yaxis.set_major_formatter(_percent_formatter())
    for q in (0.5, 0.9, 0.99):
        right.axhline(q, color="#c4cbd2", linewidth=0.8, linestyle=":", zorder=0)
    if len(hist["series"]) > 1:
        _legend_outside(fig, *right.get_legend_handles_labels())
    infinite = sum(s["infinite"] for s in hist["series"].values())
    below = sum(s["below"] for s in hist["series"].values())
    caption = ""
    if below:
        caption += (
            f" {below:,} token(s) below {edges[0]:.0e} (including exact zeros) are in "
            "the first bin."
        )
    if infinite:
        caption += (
            f" {infinite:,} token(s) with infinite KL are not binned; their CDF stays below 100%."
        )
    return _plot("kl_distribution", fig, drawn, caption)


def _bucket_label(bucket: dict[str, Any]) -> str:
    """``<.25``, ``.25–.5``, …, ``≥.95``: short enough for five ticks side by side."""

    def short(x: float) -> str:
        return f"{x:.2f}".lstrip("0")

    low, high = bucket["low"], bucket["high"]
    if low <= 0:
        return f"<{short(high)}"
    if high >= 1:
        return f"≥{short(low)}"
    return f"{short(low)}–{short(high)}"


def _plain_log_ticks(axis: Any) -> None:
    """Log-axis labels as plain numbers (0.02, 0.1) instead of 2×10⁻²."""
    from matplotlib.ticker import FuncFormatter, NullFormatter

    axis.set_major_formatter(FuncFormatter(lambda v, _pos: f"{v:g}"))
    axis.set_minor_formatter(NullFormatter())


def _null_formatter() -> Any:
    from matplotlib.ticker import NullFormatter

    return NullFormatter()


def _percent_formatter() -> Any:
    from matplotlib.ticker import PercentFormatter

    return PercentFormatter(1.0, decimals=None)


@_styled
def kl_by_position(report: Report) -> Plot | None:
    """Mean (solid) and median (dashed) KL by position in the context window."""
    series_map = report.by_position.get("series", {})
    if not series_map:
        return None
    colors = _colors(report)
    fig, (ax,) = _figure(3.3)
    width = report.by_position.get("bin_width", 1)
    drawn: dict[str, Any] = {"bin_width": width, "series": {}}
    for key, series in series_map.items():
        x = np.asarray(series["center"], dtype=float)
        (mean_line,) = ax.plot(
            x, series["mean"], color=colors[key], linewidth=1.8, label=_literal(key)
        )
        (median_line,) = ax.plot(
            x, series["median"], color=colors[key], linewidth=1.2, linestyle="--"
        )
        drawn["series"][key] = {
            "x": np.asarray(mean_line.get_xdata()),
            "mean": np.asarray(mean_line.get_ydata()),
            "median": np.asarray(median_line.get_ydata()),
        }
    _log_if_wide(
        ax, [np.asarray(s[k]) for s in drawn["series"].values() for k in ("mean", "median")]
    )
    ax.set_xlabel(
        "position in the context window (tokens of left context)"
        + (f", bins of {width}" if width > 1 else "")
    )
    ax.set_ylabel("KL(P‖Q), nats")
    from matplotlib.lines import Line2D

    handles, labels = ax.get_legend_handles_labels()
    handles += [
        Line2D([], [], color="#39424b", linewidth=1.8),
        Line2D([], [], color="#39424b", linewidth=1.2, linestyle="--"),
    ]
    labels += ["mean", "median"]
    ax.set_title("KL by position in the context window")
    _legend_outside(fig, handles, labels)
    return _plot("kl_by_position", fig, drawn)


@_styled
def kl_by_confidence(report: Report) -> Plot | None:
    """Mean KL per reference-confidence bucket, and each bucket's share of the total KL."""
    profiles = report.confidence()
    profiles = {k: p for k, p in profiles.items() if p}
    if not profiles:
        return None
    colors = _colors(report)
    fig, (left, right) = _figure(3.4, 2)
    keys = list(profiles)
    buckets = [b["bucket"] for b in next(iter(profiles.values()))]
    n, width = len(keys), 0.8 / max(len(keys), 1)
    x = np.arange(len(buckets))
    drawn: dict[str, Any] = {"buckets": buckets, "series": {}}
    for i, key in enumerate(keys):
        rows = profiles[key]
        offset = (i - (n - 1) / 2) * width
        means = np.asarray([r["kl_mean"] for r in rows], dtype=float)
        errors = np.asarray([Z95 * r["kl_se"] if math.isfinite(r["kl_se"]) else 0.0 for r in rows])
        bars = left.bar(
            x + offset,
            np.nan_to_num(means, nan=0.0, posinf=0.0),
            width,
            color=colors[key],
            label=_literal(key),
            yerr=errors,
            error_kw={"elinewidth": 0.9, "capsize": 2, "ecolor": "#39424b"},
        )
        share_bars = right.bar(
            x + offset, [r["kl_share"] for r in rows], width, color=colors[key], label=_literal(key)
        )
        drawn["series"][key] = {
            "kl_mean": np.asarray([b.get_height() for b in bars]),
            "kl_share": np.asarray([b.get_height() for b in share_bars]),
            "token_share": np.asarray([r["share"] for r in rows]),
        }
    token_shares = [drawn["series"][k]["token_share"] for k in keys]
    same_tokens = all(np.allclose(s, token_shares[0], equal_nan=True) for s in token_shares)
    labels = [_bucket_label(b) for b in next(iter(profiles.values()))]
    if same_tokens:
        labels = [
            f"{lab}\n{100 * s:.0f}% tok" for lab, s in zip(labels, token_shares[0], strict=True)
        ]
        right.plot(
            x,
            token_shares[0],
            color="#39424b",
            marker="o",
            markersize=4,
            linewidth=0,
            label="share of tokens",
        )
    for ax in (left, right):
        # Small enough that five two-line labels fit however much the legend narrows the axes.
        ax.set_xticks(x, labels, fontsize=7.5)
        ax.set_xlabel("reference top-1 probability")
        ax.grid(axis="x", visible=False)
    # Quantized candidates' KL is orders of magnitude below a distilled one's: on a linear
    # axis their bars would be invisible.
    _log_if_wide(left, [drawn["series"][k]["kl_mean"] for k in keys])
    drawn["kl_mean_axis"] = {"scale": left.get_yscale(), "ylim": left.get_ylim()}
    left.set_ylabel("mean KL(P‖Q), nats")
    left.set_title("Mean KL by reference confidence")
    right.set_ylabel("share of the total KL")
    right.set_title("Where the total KL comes from")
    right.yaxis.set_major_formatter(_percent_formatter())
    if n > 1 or same_tokens:
        _legend_outside(fig, *right.get_legend_handles_labels())
    return _plot("kl_by_confidence", fig, drawn)


@_styled
def ppl_ratio(report: Report) -> Plot | None:
    """PPL(Q)/PPL(P) per candidate with a 95% interval from the error of ln(PPL ratio)."""
    data = report.ppl()
    if not any(math.isfinite(r) for r in data["ratio"]):
        return None
    colors = _colors(report)
    keys = data["keys"]
    fig, (ax,) = _figure(max(1.6, 0.9 + 0.42 * len(keys)))
    y = np.arange(len(keys))[::-1]
    ratio = np.asarray(data["ratio"], dtype=float)
    low, high = np.asarray(data["low"], dtype=float), np.asarray(data["high"], dtype=float)
    # Infinite ratios (a token with zero candidate probability) get no bar, only a label.
    finite = np.isfinite(ratio)
    shown = np.where(finite, ratio, np.nan)
    bounded = finite & np.isfinite(low) & np.isfinite(high)
    err = np.vstack([np.where(bounded, shown - low, 0.0), np.where(bounded, high - shown, 0.0)])
    bars = ax.barh(
        y,
        np.where(finite, shown - 1.0, 0.0),
        left=1.0,
        height=0.6,
        color=[colors[k] for k in keys],
        xerr=err,
        error_kw={"elinewidth": 1.0, "capsize": 3, "ecolor": "#39424b"},
    )
    ax.axvline(1.0, color="#39424b", linewidth=1.0)
    ax.set_yticks(y, [_literal(k, 36) for k in keys])
    ax.grid(axis="y", visible=False)
    for bar, value, lo_v, hi_v, ok in zip(bars, ratio, low, high, bounded, strict=True):
        above = not math.isfinite(value) or value >= 1
        # The label sits beyond the interval's end so it never covers the error bar.
        end = (hi_v if above else lo_v) if ok else (value if math.isfinite(value) else 1.0)
        ax.annotate(
            f"{value:.3f}×" if math.isfinite(value) else "inf (zero-probability tokens)",
            (end, bar.get_y() + bar.get_height() / 2),
            xytext=(5 if above else -5, 0),
            textcoords="offset points",
            ha="left" if above else "right",
            va="center",
            fontsize=8.5,
        )
    span = np.concatenate([low[bounded], high[bounded], shown[finite], [1.0]])
    lo, hi = float(span.min()), float(span.max())
    pad = (hi - lo) * 0.25 + 1e-3
    ax.set_xlim(lo - pad, hi + pad)
    ax.set_xlabel("PPL(Q) / PPL(P)  (1 = same perplexity as the reference)")
    ax.set_title("Perplexity ratio, candidate over reference")
    drawn = {
        "keys": keys,
        "ratio": np.where(finite, [b.get_x() + b.get_width() for b in bars], np.nan),
        "low": low,
        "high": high,
    }
    return _plot("ppl_ratio", fig, drawn)


@_styled
def size_vs_kl(report: Report) -> Plot | None:
    """Candidate size against mean KL, with the Pareto front (smaller and closer wins)."""
    data = report.sizes()
    if not data:
        return None
    # Candidates with an infinite mean KL cannot be placed; the caption names them.
    drawable = [math.isfinite(v) for v in data["kl_mean"]]
    left_out = [k for k, ok in zip(data["keys"], drawable, strict=True) if not ok]
    if sum(drawable) == 0:
        return None
    keys = [k for k, ok in zip(data["keys"], drawable, strict=True) if ok]
    colors = _colors(report)
    fig, (ax,) = _figure(3.6)
    sizes = np.asarray(data["size"], dtype=float)[drawable]
    kls = np.asarray(data["kl_mean"], dtype=float)[drawable]
    errs = np.asarray([Z95 * s if math.isfinite(s) else 0.0 for s in data["kl_se"]])[drawable]
    front = np.asarray(data["pareto"], dtype=bool)[drawable]
    # Neighbours by size alternate their labels above and below the point, so the names of
    # two close candidates do not print over each other.
    below = np.zeros(len(keys), dtype=bool)
    below[np.argsort(sizes, kind="stable")[1::2]] = True
    for key, s, k, e, on, under in zip(keys, sizes, kls, errs, front, below, strict=True):
        ax.errorbar(
            [s],
            [k],
            yerr=[e],
            fmt="o",
            color=colors[key],
            markersize=7 if on else 5,
            markeredgecolor="#222831" if on else colors[key],
            capsize=2,
            elinewidth=0.9,
        )
        # Labels of points in the right part go to their left, so they stay inside the axes.
        right_side = s > sizes.min() + 0.6 * (sizes.max() - sizes.min())
        ax.annotate(
            _literal(key),
            (s, k),
            xytext=(-6 if right_side else 6, -5 if under else 5),
            textcoords="offset points",
            ha="right" if right_side else "left",
            va="top" if under else "bottom",
            fontsize=8.5,
        )
    order = np.argsort(sizes[front])
    (front_line,) = ax.plot(
        sizes[front][order],
        kls[front][order],
        color="#39424b",
        linewidth=1.1,
        linestyle="--",
        drawstyle="steps-post",
        label="Pareto front",
    )
    if sizes.max() / max(sizes.min(), 1) > 8:
        ax.set_xscale("log")
    positive = kls[kls > 0]
    if positive.size >= 2 and positive.max() / positive.min() > 100 and positive.size == kls.size:
        ax.set_yscale("log")  # quantizations span orders of magnitude of KL
    unit = {
        "parameters": "parameters",
        "bytes_on_disk": "bytes on disk",
        "bits_per_weight": "bits per weight (real bytes of the weights as stored)",
    }.get(data["axis"], data["axis"].replace("_", " "))  # a ranking's axis: memory bytes
    ax.set_xlabel(unit)
    ax.set_ylabel("mean KL(P‖Q), nats")
    ax.set_title(f"Size vs divergence ({unit.split(' (')[0]})")
    handles, names = [front_line], ["Pareto front"]
    floor = report.noise_floor_kl()
    if math.isfinite(floor) and floor > 0:
        # What the study is measured against: the reference's own noise.
        handles.append(ax.axhline(floor, color="#8a96a3", linewidth=1.0, linestyle=":"))
        names.append("noise floor")
        drawn_floor = floor
    else:
        drawn_floor = math.nan
    _legend_outside(fig, handles, names)
    drawn = {
        "keys": keys,
        "size": sizes,
        "kl_mean": kls,
        "pareto": front,
        "front_x": np.asarray(front_line.get_xdata()),
        "front_y": np.asarray(front_line.get_ydata()),
        "noise_floor": drawn_floor,
    }
    more = f" Not shown (infinite mean KL): {', '.join(left_out)}." if left_out else ""
    return _plot("size_vs_kl", fig, drawn, more)


@_styled
def kl_by_step(report: Report) -> Plot | None:
    """Mean KL (and PPL ratio) by training step for checkpoint series."""
    series_map = report.steps()
    if not series_map:
        return None
    fig, (left, right) = _figure(3.3, 2)
    palette = [c.color for c in report.candidates]
    drawn: dict[str, Any] = {"series": {}}
    for i, (group, series) in enumerate(series_map.items()):
        color = palette[i % len(palette)]
        steps = np.asarray(series["step"], dtype=float)
        kls = np.asarray(series["kl_mean"], dtype=float)
        kls[~np.isfinite(kls)] = np.nan  # an infinite mean leaves a gap, not a broken axis
        errs = np.asarray([Z95 * s if math.isfinite(s) else 0.0 for s in series["kl_se"]])
        container = left.errorbar(
            steps,
            kls,
            yerr=errs,
            color=color,
            marker="o",
            markersize=4,
            capsize=2,
            linewidth=1.6,
            label=_literal(group),
        )
        best = series["keys"].index(series["best"])
        left.plot(
            [steps[best]],
            [kls[best]],
            marker="*",
            markersize=12,
            color=color,
            markeredgecolor="#222831",
            linewidth=0,
        )
        (ratio_line,) = right.plot(
            steps,
            np.where(np.isfinite(series["ppl_ratio"]), series["ppl_ratio"], np.nan),
            color=color,
            marker="o",
            markersize=4,
            linewidth=1.6,
            label=_literal(group),
        )
        line = container.lines[0]
        drawn["series"][group] = {
            "step": np.asarray(line.get_xdata()),
            "kl_mean": np.asarray(line.get_ydata()),
            "ppl_ratio": np.asarray(ratio_line.get_ydata()),
            "best_step": series["best_step"],
        }
    left.set_xlabel("training step")
    left.set_ylabel("mean KL(P‖Q), nats")
    left.set_title("KL by checkpoint (★ = lowest)")
    right.axhline(1.0, color="#39424b", linewidth=0.9)
    right.set_xlabel("training step")
    right.set_ylabel("PPL(Q) / PPL(P)")
    right.set_title("Perplexity ratio by checkpoint")
    if len(series_map) > 1:
        _legend_outside(fig, *left.get_legend_handles_labels())
    return _plot("kl_by_step", fig, drawn)


#: Figures in report order.
PLOTS: tuple[Callable[[Report], Plot | None], ...] = (
    kl_distribution,
    kl_by_position,
    kl_by_confidence,
    ppl_ratio,
    size_vs_kl,
    kl_by_step,
)


def make_plots(report: Report) -> list[Plot]:
    """Every figure that applies to ``report``, in report order."""
    plots = []
    for draw in PLOTS:
        plot = draw(report)
        if plot is not None:
            plots.append(plot)
    return plots
