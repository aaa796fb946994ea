"""Write a :class:`lmkl.report.data.Report` as HTML, Markdown, JSON or a terminal table.

HTML is one self-contained file: figures are embedded as base64 PNG, the CSS is inline, there is
no JavaScript and no reference to any network resource; a Content-Security-Policy forbids
scripts and remote loads as a second line of defence. All text from the data (document contexts,
token strings, labels, paths) goes through Jinja2's HTML autoescaping; Markdown output escapes it
for Markdown. Markdown writes its figures as PNG files in a folder beside the ``.md`` file.
"""

from __future__ import annotations

import datetime as _dt
import json
import math
import re
from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from lmkl.analysis.metrics import higher_is_better
from lmkl.engine.rundir import atomic_path
from lmkl.formatting import (
    Z95,
    byte_size,
    format_column,
    format_percent,
    format_percent_column,
    format_rate,
    format_ratio,
    format_seconds,
    format_signed,
    format_value,
    interval,
    mean_se,
    metric_ci,
    normal_interval,
    number,
    parameters,
    percent,
    percent_se,
)
from lmkl.report.build import build_report
from lmkl.report.candidates import CandidateView, confidence_profile
from lmkl.report.data import Report
from lmkl.report.token_strings import visible
from lmkl.version import __version__

FORMATS = ("html", "md", "json", "table")
VIEWS = ("summary", "tokens")


# --------------------------------------------------------------------------------------------
# Number formatting shared by every format


def _size_cell(c: Any, axis: str | None = None) -> str:
    """A candidate's size with its unit, on ``axis`` (the report's size axis: the one its
    Pareto set uses) when known; else bits per weight for a quantized candidate, else
    parameters (or bytes on disk)."""
    if axis is not None and math.isfinite(size := c.size(axis)):
        if axis == "bits_per_weight":
            return f"{size:.2f} bpw"
        return f"{parameters(size)} params" if axis == "parameters" else byte_size(size)
    if c.quantized and math.isfinite(c.bits_per_weight):
        return f"{c.bits_per_weight:.2f} bpw"
    return (
        f"{parameters(c.params)} params" if math.isfinite(c.params) else byte_size(c.bytes_on_disk)
    )


def _pair(m: dict[str, Any], family: str, a: str, b: str, digits: int = 4) -> str:
    obj = m.get(family) or {}
    return f"{number(obj.get(a), digits)} / {number(obj.get(b), digits)}"


#: The full statistics table: (row name, getter over a candidate's metrics).
STAT_ROWS: tuple[tuple[str, Any], ...] = (
    ("KL(P‖Q) mean ± se", lambda m: mean_se(m.get("kl"))),
    # The interval to quote is the document bootstrap; mean ± 1.96 se over tokens ignores
    # that neighbouring tokens are correlated, so it is only a "token interval".
    ("KL(P‖Q) mean, 95% CI (bootstrap over documents)", lambda m: metric_ci(m.get("kl"))),
    ("KL(P‖Q) mean, token interval (± 1.96 se)", lambda m: normal_interval(m.get("kl"))),
    ("KL(P‖Q) median", lambda m: number((m.get("kl") or {}).get("median"))),
    ("KL(P‖Q) p90 / p95", lambda m: _pair(m, "kl", "p90", "p95")),
    ("KL(P‖Q) p99 / p99.9", lambda m: _pair(m, "kl", "p99", "p999")),
    ("KL(P‖Q) min / max", lambda m: _pair(m, "kl", "min", "max")),
    ("KL(Q‖P) mean ± se", lambda m: mean_se(m.get("reverse_kl"))),
    ("KL(Q‖P) median / p99", lambda m: _pair(m, "reverse_kl", "median", "p99")),
    ("JSD mean ± se", lambda m: mean_se(m.get("jsd"))),
    ("JSD median / p99", lambda m: _pair(m, "jsd", "median", "p99")),
    ("PPL(P) / PPL(Q)", lambda m: _pair(m, "ppl", "reference", "candidate", 3)),
    ("PPL(Q) / PPL(P)", lambda m: number((m.get("ppl") or {}).get("ratio"))),
    ("mean ln(PPL(Q)/PPL(P)) ± se", lambda m: mean_se(m.get("ln_ppl_ratio"))),
    ("NLL correlation P, Q", lambda m: number(m.get("nll_correlation"))),
    ("bits/byte P / Q", lambda m: _pair(m, "bits_per_byte", "reference", "candidate")),
    ("entropy P / Q (nats)", lambda m: _pair(m, "entropy", "reference", "candidate")),
    ("Δp = q(x) − p(x), mean ± se", lambda m: mean_se(m.get("delta_p"))),
    ("Δp RMS", lambda m: number((m.get("delta_p") or {}).get("rms"))),
    ("top-1 agreement ± se", lambda m: percent_se(m.get("top1_agreement"))),
    ("P's top-1 in Q's top-5 ± se", lambda m: percent_se(m.get("top1_in_top5"))),
    (
        "documents / windows",
        lambda m: (
            f"{number((m.get('counts') or {}).get('documents'))} / "
            f"{number((m.get('counts') or {}).get('windows'))}"
        ),
    ),
    ("scored tokens", lambda m: number((m.get("counts") or {}).get("tokens"))),
    (
        "non-finite logits / infinite KL",
        lambda m: (
            f"{number((m.get('counts') or {}).get('nonfinite'))}"
            f" / {number((m.get('counts') or {}).get('infinite'))}"
        ),
    ),
)


def stat_rows(report: Report) -> list[dict[str, Any]]:
    return [
        {"name": name, "cells": [getter(c.metrics) for c in report.candidates]}
        for name, getter in STAT_ROWS
    ]


def leaderboard(report: Report) -> list[dict[str, Any]]:
    """Compact rows, best first by the sort metric."""
    sizes = report.sizes()
    pareto = dict(zip(sizes.get("keys", []), sizes.get("pareto", []), strict=True))
    failed = {g["run"]: {str(f.get("candidate")) for f in g["failures"]} for g in report.gates()}
    # One column of means: as many digits as keep different candidates' values apart.
    kl_means = format_column(c.value("kl.mean") for c in report.candidates)
    rows = []
    for rank, c in enumerate(report.candidates, 1):
        m = c.metrics
        boot = report.document_ci(c)
        scale = report.scale(c)
        ranked = report.ranking_row(c) or {}
        nxt = ranked.get("vs_next") if isinstance(ranked.get("vs_next"), dict) else None
        rows.append(
            {
                "rank": rank,
                "key": c.key,
                "color": c.color,
                "run": c.run.name,
                "reference": c.run.reference_label,
                "sort_value": number(c.value(report.sort_by)),
                "kl": mean_se(m.get("kl")),
                "kl_mean": kl_means[rank - 1],
                "kl_ci": normal_interval(m.get("kl")),
                "kl_median": number((m.get("kl") or {}).get("median")),
                "kl_p99": number((m.get("kl") or {}).get("p99")),
                "top1": percent_se(m.get("top1_agreement")),
                "top1_changed": format_percent(scale["top1_changed"]),
                "ppl_ratio": format_ratio((m.get("ppl") or {}).get("ratio")),
                "size": _size_cell(c, sizes.get("axis")),
                "pareto": pareto.get(c.key),
                "boot": interval(boot) if boot else None,
                "next": None
                if nxt is None
                else {
                    "label": nxt.get("label"),
                    "diff": number(nxt.get("diff"), 3),
                    "ci": interval(nxt.get("ci"), 3),
                    "flips": percent(nxt.get("flip_share")),
                },
                "above_noise": scale["above_noise_floor"],
                "gate_failed": c.label in failed.get(c.run.name, set()),
                "group": c.group,
                "step": None if not math.isfinite(c.step) else int(c.step),
            }
        )
    return rows


def noise_floor_rows(report: Report) -> list[dict[str, Any]]:
    """One row per run with a noise floor: its mean KL, bootstrap CI and top-1 changes."""
    rows = []
    for run in report.runs:
        floor = report.noise_floor(run)
        if floor is None:
            continue
        ranking = run.results.get("ranking") or {}
        entry = next(
            (
                e
                for e in ranking.get("leaderboard") or []
                if isinstance(e, dict) and e.get("kind") == "noise_floor"
            ),
            {},
        )
        agree = floor["top1_agreement"]
        rows.append(
            {
                "run": run.name,
                "kl_mean": number(floor["kl_mean"]),
                "boot": interval(entry["ci"]) if entry.get("ci") else None,
                "top1_changed": format_percent(1.0 - agree) if math.isfinite(agree) else "–",
                "relative_std": number(floor["relative_std"]),
            }
        )
    return rows


def _load_familiar_pairs() -> tuple[tuple[str, str, float], ...]:
    """(name, description, mean KL) of each pair in ``familiar_pairs.json``, by KL."""
    from importlib import resources

    text = resources.files("lmkl.report").joinpath("familiar_pairs.json").read_text("utf-8")
    pairs = json.loads(text)["pairs"]
    return tuple(
        sorted(((p["name"], p["pair"], float(p["kl"])) for p in pairs), key=lambda x: x[2])
    )


#: What familiar pairs measure, for orientation: mean KL(P‖Q) in nats as lmkl measured it on
#: its small demo models (``scripts/familiar_pairs.py`` writes ``familiar_pairs.json``; the
#: README's table shows the same file). Only orders of magnitude carry over to other models and
#: data; the run's own scale comes first.
FAMILIAR_PAIRS: tuple[tuple[str, str, float], ...] = _load_familiar_pairs()


def familiar_pairs_markdown(entries: list[dict[str, Any]]) -> str:
    """The README's table of familiar pairs (rows of ``familiar_pairs.json``): a value measured
    on several schemes shows its range."""

    def cell(entry: dict[str, Any], key: str, fmt: Callable[[Any], str]) -> str:
        if f"{key}_range" in entry:
            low, high = entry[f"{key}_range"]
            return f"{fmt(low)} to {fmt(high)}"
        return fmt(entry[key])

    lines = [
        "| pair | mean KL (nats) | top-1 changed | PPL(Q)/PPL(P) |",
        "| --- | --: | --: | --: |",
    ]
    for e in entries:
        kl, top1 = cell(e, "kl", format_value), cell(e, "top1_changed", format_percent)
        lines.append(f"| {e['pair']} | {kl} | {top1} | {cell(e, 'ppl_ratio', format_ratio)} |")
    return "\n".join(lines)


def _familiar(kl: float) -> str:
    """``kl`` placed among :data:`FAMILIAR_PAIRS` by order of magnitude: ``"between int2 and
    demo student"``, ``"above demo student"`` (``–`` when undefined)."""
    if not math.isfinite(kl) or kl < 0:
        return "above demo student" if kl == math.inf else "–"
    below = [name for name, _, value in FAMILIAR_PAIRS if value <= kl]
    above = [name for name, _, value in FAMILIAR_PAIRS if value > kl]
    if not below:
        return f"below {above[0]}"
    if not above:
        return f"above {below[-1]}"
    return f"between {below[-1]} and {above[0]}"


def scale_rows(report: Report) -> list[dict[str, Any]]:
    """Per candidate, its mean KL on the scales its own run gives (see :meth:`Report.scale`)."""
    kl_means = format_column(c.value("kl.mean") for c in report.candidates)
    rows = []
    for c, kl_mean in zip(report.candidates, kl_means, strict=True):
        scale = report.scale(c)
        times = scale["times_noise_floor"]
        rows.append(
            {
                "key": c.key,
                "color": c.color,
                "kl_mean": kl_mean,
                "familiar": _familiar(scale["kl_mean"]),
                "top1_changed": format_percent(scale["top1_changed"]),
                "ppl_ratio": format_ratio(scale["ppl_ratio"]),
                "noise_floor": None
                if not math.isfinite(scale["noise_floor"])
                else number(scale["noise_floor"]),
                "times_noise_floor": None if not math.isfinite(times) else _times(times),
                "above_noise": scale["above_noise_floor"],
            }
        )
    return rows


def _times(ratio: float) -> str:
    """A multiple as people say it: ``9.51×``, ``137×``, ``47,300×`` (three significant
    digits, no exponent)."""
    if ratio >= 1000:
        digits = math.floor(math.log10(ratio)) - 2
        return f"{round(ratio, -digits):,.0f}×"
    return f"{ratio:.3g}×"


def familiar_pairs() -> list[dict[str, str]]:
    return [
        {"name": name, "pair": pair, "kl": format_value(kl)} for name, pair, kl in FAMILIAR_PAIRS
    ]


def dataset_tables(report: Report) -> list[dict[str, Any]]:
    """Per experiment with two or more datasets: its ranking metric per dataset and candidate,
    with the micro (by token) and macro (by dataset) averages; each column's digits keep the
    candidates apart."""
    tables = []
    for run in report.runs:
        ranking = run.results.get("ranking")
        rows = (ranking or {}).get("by_dataset") or []
        names = list(rows[0].get("datasets") or {}) if rows else []
        if len(names) < 2:
            continue
        columns = [format_column(r["datasets"].get(n) for r in rows) for n in names] + [
            format_column(r.get(k) for r in rows) for k in ("micro", "macro")
        ]
        tables.append(
            {
                "run": run.name,
                "metric": ranking.get("metric"),
                "datasets": names,
                "rows": [
                    {"label": r["label"], "cells": [col[i] for col in columns]}
                    for i, r in enumerate(rows)
                ],
            }
        )
    return tables


def gate_blocks(report: Report) -> list[dict[str, Any]]:
    """Quality gates per run: passed, or each failing candidate with its reason."""
    return [
        {
            "run": g["run"],
            "limits": g["limits"],
            "passed": g["passed"],
            "reasons": [str(f.get("reason", "")) for f in g["failures"]],
        }
        for g in report.gates()
    ]


def confidence_rows(report: Report) -> list[dict[str, Any]]:
    """One row per confidence bucket, one cell per candidate: mean / median KL, share of KL."""
    profiles = [confidence_profile(c.metrics) for c in report.candidates]
    first = next((p for p in profiles if p), [])
    rows = []
    for i, bucket in enumerate(first):
        cells = []
        for profile in profiles:
            b = profile[i] if i < len(profile) else None
            cells.append(
                {
                    "mean": number(b["kl_mean"]) if b else "–",
                    "median": number(b["kl_median"]) if b else "–",
                    "kl_share": percent(b["kl_share"]) if b else "–",
                    "share": percent(b["share"]) if b else "–",
                }
            )
        shares = {c["share"] for c in cells}
        rows.append(
            {
                "bucket": bucket["bucket"],
                "tokens": number(bucket["tokens"]),
                "share": shares.pop() if len(shares) == 1 else "varies",
                "cells": cells,
            }
        )
    return rows


def reading_items(report: Report) -> list[dict[str, str]]:
    """Reading lines split into a leading candidate name (shown bold) and the rest."""
    keys = sorted((c.key for c in report.candidates), key=len, reverse=True)
    items = []
    for line in report.reading:
        subject = next((k for k in keys if line.startswith(k + " ")), "")
        items.append({"subject": subject, "rest": line[len(subject) :]})
    return items


def _context_tail(text: str, limit: int = 320) -> str:
    if len(text) <= limit:
        return text
    cut = text[-limit:]
    space = cut.find(" ")
    return "…" + (cut[space + 1 :] if 0 <= space < 40 else cut)


def worst_cards(report: Report) -> list[dict[str, Any]]:
    """Per candidate, its worst positions ready for display (raw strings; templates escape)."""
    out = []
    for c in report.candidates:
        entries = []
        for rank, e in enumerate(report.worst.get(c.key, []), 1):

            def side(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
                return [
                    {
                        "token": visible(i.get("token") or "", 24),
                        "prob": i["prob"],
                        "prob_text": percent(i["prob"], 1),
                        "width": f"{max(0.0, min(1.0, i['prob'])) * 100:.1f}"
                        if math.isfinite(i["prob"])
                        else "0",
                        "is_target": i["is_target"],
                    }
                    for i in items
                ]

            # p and q side by side: digits that keep them apart (never "0.0% → 0.00%").
            p_text, q_text = (
                format_percent_column([e["p_token"], e["q_token"]])
                if "p_token" in e and "q_token" in e
                else (None, None)
            )
            entries.append(
                {
                    "rank": rank,
                    "kl": number(e.get("kl")),
                    "doc_id": e.get("doc_id"),
                    "position": e.get("position"),
                    "dataset": e.get("dataset"),
                    "context": _context_tail(str(e.get("context") or "")),
                    # Whitespace-only tokens would be invisible when highlighted: show them marked.
                    "token": token
                    if (token := str(e.get("token") or "")).strip()
                    else visible(token),
                    "token_visible": visible(str(e.get("token") or ""), 40),
                    "p_token": p_text,
                    "q_token": q_text,
                    "reference_top5": side(e.get("reference_top5") or []),
                    "candidate_top5": side(e.get("candidate_top5") or []),
                }
            )
        out.append({"key": c.key, "color": c.color, "entries": entries})
    return out


def token_tables(report: Report) -> list[dict[str, Any]]:
    out = []
    for c in report.candidates:
        table = report.tokens.get(c.key)
        if not table:
            continue

        def rows(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
            return [
                {
                    "token": visible(r.get("token", f"#{r['token_id']}"), 28),
                    "token_id": r["token_id"],
                    "count": number(r["count"]),
                    "total": number(r["total_kl"]),
                    "mean": number(r["mean_kl"]),
                    "share": percent(r["share_of_kl"], 1)
                    if math.isfinite(r["share_of_kl"])
                    else "–",
                    "infinite": r["infinite"],
                }
                for r in items
            ]

        out.append(
            {
                "key": c.key,
                "color": c.color,
                "by_total": rows(table["by_total"]),
                "by_mean": rows(table["by_mean"]),
                "min_count": table["min_count"],
            }
        )
    return out


def difference_blocks(report: Report) -> list[dict[str, Any]]:
    blocks = []
    for d in report.differences:
        metrics = []
        for r in d["metrics"]:
            significant = math.isfinite(r["z"]) and abs(r["z"]) >= Z95
            metrics.append(
                {
                    "metric": r["metric"],
                    "a": number(r["a"]),
                    "b": number(r["b"]),
                    "delta": format_signed(r["delta"]),
                    "z": "–" if not math.isfinite(r["z"]) else f"{r['z']:.1f}",
                    "significant": significant,
                }
            )
        paired = d.get("paired")
        blocks.append(
            {
                "label": d["label"],
                "a": d["a"],
                "b": d["b"],
                "run_a": d["run_a"],
                "run_b": d["run_b"],
                "changes": [
                    {"setting": c["setting"], "a": _short_value(c["a"]), "b": _short_value(c["b"])}
                    for c in d["changes"]
                ],
                "metrics": metrics,
                "paired": None
                if not paired
                else {
                    "tokens": number(paired["tokens"]),
                    "coverage": f"{percent(paired['coverage_a'])} / "
                    f"{percent(paired['coverage_b'])}",
                    "mean_delta": f"{format_signed(paired['mean_delta'])} ± {number(paired['se'])}",
                    "max_abs_delta": number(paired["max_abs_delta"]),
                    "identical": percent(paired["identical_share"], 1),
                    "b_higher": percent(paired["b_higher_share"], 1),
                    "correlation": number(paired["correlation"]),
                },
            }
        )
    return blocks


def _short_value(value: Any, limit: int = 60) -> str:
    text = "–" if value is None else str(value)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def provenance(report: Report) -> list[dict[str, Any]]:
    rows = []
    for run in report.runs:
        r = run.results
        prov = r.get("provenance", {}) or {}
        data = r.get("data", {}) or {}
        win = r.get("windowing", {}) or {}
        thr = r.get("throughput", {}) or {}
        ref = r.get("reference", {}) or {}
        versions = prov.get("versions", {}) or {}
        rows.append(
            {
                "name": run.name,
                "path": str(run.path),
                "reference": f"{ref.get('label', '?')} ({ref.get('model', '?')}, "
                f"{ref.get('dtype', '?')}, {parameters(ref.get('parameters'))} "
                "params)",
                "candidates": ", ".join(
                    f"{c.get('label')} ({(c.get('model') or {}).get('dtype', '?')})"
                    for c in r.get("candidates", [])
                ),
                "data": f"{data.get('source', '?')} ({number(data.get('documents'))} documents, "
                f"{number(data.get('scored_tokens'))} scored tokens)",
                "windowing": f"{win.get('mode', '?')}, context {win.get('context_length', '?')}"
                + (f", stride {win['stride']}" if win.get("stride") else ""),
                "vocab_note": win.get("vocab_note"),
                "versions": ", ".join(f"{k} {v}" for k, v in versions.items()),
                "time": f"{_when(prov.get('started'))} → {_when(prov.get('ended'))}",
                "throughput": f"{format_rate(thr['tokens_per_s'] * thr['seconds'], thr['seconds'])}"
                f" over {format_seconds(thr['seconds'])}"
                if thr.get("tokens_per_s") and thr.get("seconds")
                else "–",
            }
        )
    return rows


def _when(stamp: Any) -> str:
    """An ISO timestamp as ``2026-01-31 12:00:00 UTC`` (unchanged if it does not parse)."""
    try:
        moment = _dt.datetime.fromisoformat(str(stamp))
    except ValueError:
        return str(stamp or "?")
    return moment.strftime("%Y-%m-%d %H:%M:%S ") + (moment.tzname() or "")


def _context(report: Report, plots: list[Any], images: dict[str, str]) -> dict[str, Any]:
    multi_run = len(report.runs) > 1
    return {
        "title": report.title,
        "version": __version__,
        "generated": _dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z").strip(),
        "runs": [{"name": r.name, "path": str(r.path)} for r in report.runs],
        "multi_run": multi_run,
        "multi_reference": len({r.reference_label for r in report.runs}) > 1,
        "reading": report.reading,
        "reading_items": reading_items(report),
        "notes": report.notes,
        "sort_by": report.sort_by,
        "sort_direction": "higher is closer"
        if higher_is_better(report.sort_by)
        else "lower is closer",
        "ranking_metric": report.ranking_metric(),
        "has_boot": any(report.document_ci(c) for c in report.candidates),
        "candidates": [{"key": c.key, "color": c.color} for c in report.candidates],
        "leaderboard": leaderboard(report),
        "has_pareto": bool(report.sizes()),
        "has_next": any(report.ranking_row(c) for c in report.candidates),
        "has_noise": any(report.noise_floor(r) for r in report.runs),
        "noise_floors": noise_floor_rows(report),
        "scale_rows": scale_rows(report),
        "familiar_pairs": familiar_pairs(),
        "gates": gate_blocks(report),
        "dataset_tables": dataset_tables(report),
        "experiments": [r.name for r in report.runs if r.is_experiment],
        "dataset_names": [d.name for d in report.datasets],
        "stat_rows": stat_rows(report),
        "confidence_rows": confidence_rows(report),
        "plots": [
            {"name": p.name, "title": p.title, "caption": p.caption, "src": images[p.name]}
            for p in plots
        ],
        "worst": worst_cards(report),
        "tokens": token_tables(report),
        "token_source": {
            "tokenizer": "decoded with the reference's tokenizer",
            "worst.json": "strings from worst.json where known, else ids",
            "ids": "token ids (no tokenizer available)",
        }[report.token_source],
        "differences": difference_blocks(report),
        "provenance": provenance(report),
        "steps": report.steps(),
    }


# --------------------------------------------------------------------------------------------
# Writers


#: Characters with a meaning in Markdown; ``$`` starts math where renderers support it (GitHub).
_MD_SPECIAL = re.compile(r"([\\`*_\[\]|~$])")


def md_escape(value: Any) -> str:
    """Text safe inside Markdown (tables included): no markup, no math, no raw HTML, one line."""
    text = str(value).replace("&", "&amp;").replace("\r", " ").replace("\n", " ↵ ")
    return _MD_SPECIAL.sub(r"\\\1", text).replace("<", "&lt;").replace(">", "&gt;")


def md_code_block(text: str) -> str:
    """A fenced code block that ``text`` cannot close (fence longer than any backtick run)."""
    longest = max((len(m) for m in re.findall(r"`+", text)), default=0)
    fence = "`" * max(3, longest + 1)
    return f"{fence}text\n{text}\n{fence}"


#: Where a long candidate name may break: after a separator, never inside a word.
_NAME_BREAKS = re.compile(r"([-_/])")


def breakable(value: Any) -> Any:
    """HTML-escaped text with a line-break opportunity (``<wbr>``) after each ``-``, ``_``
    and ``/``, so a long candidate name wraps at its separators instead of mid-word."""
    from markupsafe import Markup, escape

    return Markup(_NAME_BREAKS.sub(r"\1<wbr>", str(escape(value))))


def _environment() -> Any:
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(
        loader=PackageLoader("lmkl.report", "templates"),
        # Autoescape HTML templates only; Markdown escapes explicitly with the `md` filter.
        autoescape=lambda name: bool(name) and name.endswith(".html.j2"),
        undefined=StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters["md"] = md_escape
    env.filters["md_code"] = md_code_block
    env.filters["breakable"] = breakable
    return env


def render_html(
    report: Report, plots: list[Any], token_view: Any = None, token_view_first: bool = False
) -> str:
    """The report as one self-contained HTML page; ``token_view`` (a
    :class:`lmkl.report.token_view.TokenView`) adds the token view, first or after the worst
    contexts."""
    images = {p.name: p.data_uri() for p in plots}
    template = _environment().get_template("report.html.j2")
    return template.render(
        **_context(report, plots, images),
        tv=token_view,
        tv_first=token_view_first,
        tv_multi=len(report.runs) > 1 or bool(report.datasets),
        tv_source="dataset" if report.datasets else "run",
    )


def render_markdown(report: Report, plots: list[Any], asset_dir: str) -> str:
    """The report as Markdown; figures referenced as ``asset_dir/<name>.png``."""
    images = {p.name: f"{asset_dir}/{p.name}.png" for p in plots}
    template = _environment().get_template("report.md.j2")
    return template.render(**_context(report, plots, images))


def print_table(report: Report, console: Any) -> None:
    """The report in the terminal with rich: reading, leaderboard, statistics, drill-down.

    Run and candidate names, tokens and notes go in as :class:`~rich.text.Text`: never parsed
    as markup (``[bold]``) or emoji codes (``:smile:``), so they show as they are.
    """
    from rich.table import Table
    from rich.text import Text

    from lmkl.report.tables import table_title

    console.print(Text.assemble(("lmkl report", "bold"), ": ", report.title))
    for gate in gate_blocks(report):
        if gate["passed"]:
            console.print(Text(f"gates: every candidate passes {gate['limits']}", style="green"))
        for reason in gate["reasons"]:
            console.print(Text.assemble(("gate failed:", "bold red"), " ", reason))
    for line in report.reading:
        console.print(Text(f"  • {line}"), soft_wrap=False)
    for note in report.notes:
        console.print(Text.assemble(("note:", "yellow"), " ", note))
    for floor in noise_floor_rows(report):
        console.print(
            Text(
                f"  noise floor ({floor['run']}): mean KL {floor['kl_mean']}, top-1 changed "
                f"on {floor['top1_changed']} of tokens"
            ),
            soft_wrap=False,
        )
    from lmkl.report.tables import LEADERBOARD_NOTES, FittedTable
    from lmkl.report.terminal import PLUS_MINUS_NOTE

    board = Table(title=f"Leaderboard (sorted by {report.sort_by})", title_justify="left")
    multi = len(report.runs) > 1
    rows = leaderboard(report)
    # An experiment's paired columns, as `lmkl run` prints them, where results.json has them.
    has_next = any(row["next"] for row in rows)
    has_noise = any(row["above_noise"] is not None for row in rows)
    for name in (
        "#",
        "candidate",
        *(("run",) if multi else ()),
        "KL mean ± se",
        "95% CI",
        "median",
        "p99",
        "top-1 agree",
        "PPL ratio",
        "size",
        *(("Δ next [CI]",) if has_next else ()),
        *(("> noise",) if has_noise else ()),
    ):
        board.add_column(
            name,
            justify="left" if name in ("candidate", "run") else "right",
            no_wrap=name not in ("candidate", "run"),
        )
    for row in rows:
        nxt = row["next"]
        board.add_row(
            str(row["rank"]),
            Text.assemble(("■", row["color"]), " ", row["key"]),
            *((Text(row["run"]),) if multi else ()),
            row["kl"],
            # The interval to quote: the document bootstrap, as `lmkl compare` prints it.
            row["boot"] or "–",
            row["kl_median"],
            row["kl_p99"],
            row["top1"],
            row["ppl_ratio"],
            row["size"],
            *((f"{nxt['diff']} {nxt['ci']}" if nxt else "",) if has_next else ()),
            *(
                ("" if row["above_noise"] is None else "yes" if row["above_noise"] else "no",)
                if has_noise
                else ()
            ),
        )
    console.print(
        FittedTable(
            board,
            optional=["PPL ratio", "p99", "median", "Δ next [CI]"],
            key_columns=2,
            notes=[
                *(n for n in LEADERBOARD_NOTES if n[0] in ("Δ next [CI]", "> noise")),
                (None, PLUS_MINUS_NOTE),
            ],
        )
    )
    stats = Table(title="All statistics (nats)", title_justify="left")
    stats.add_column("metric", style="bold")
    for c in report.candidates:
        stats.add_column(Text(c.key), justify="right")
    for row in stat_rows(report):
        stats.add_row(row["name"], *row["cells"])
    console.print(stats)
    for card in token_tables(report):
        table = Table(
            title=table_title(card["key"], ": tokens with the most total KL"),
            title_justify="left",
        )
        for name in ("token", "id", "count", "total KL", "share", "mean KL"):
            table.add_column(name, justify="left" if name == "token" else "right")
        for r in card["by_total"][:10]:
            table.add_row(
                Text(r["token"]),
                str(r["token_id"]),
                r["count"],
                r["total"],
                r["share"],
                r["mean"],
            )
        console.print(table)
    for block in difference_blocks(report):
        table = Table(
            title=table_title(block["label"], ": ", block["a"], " → ", block["b"]),
            title_justify="left",
        )
        for name in ("metric", "a", "b", "Δ", "z"):
            table.add_column(name, justify="left" if name == "metric" else "right")
        for r in block["metrics"]:
            style = "bold" if r["significant"] else ""
            table.add_row(r["metric"], r["a"], r["b"], r["delta"], r["z"], style=style)
        console.print(table)
        for ch in block["changes"]:
            console.print(Text(f"  changed {ch['setting']}: {ch['a']} → {ch['b']}"))
    console.print("[dim]drill down into single tokens with `lmkl inspect RUN_DIR`[/dim]")


def default_output(run_dirs: list[Path], fmt_name: str) -> Path | None:
    """Where a report goes without ``--out``: inside a single run, else the current folder."""
    if fmt_name in ("json", "table"):
        return None
    suffix = ".html" if fmt_name == "html" else ".md"
    if len(run_dirs) == 1:
        return Path(run_dirs[0]) / f"report{suffix}"
    return Path(f"lmkl-report{suffix}")


def write_report(
    run_dirs: list[Path],
    fmt_name: str = "html",
    out: Path | None = None,
    *,
    sort_by: str = "kl.mean",
    worst_n: int = 10,
    console: Any = None,
    view: str = "summary",
    docs: list[int] | None = None,
    view_max_tokens: int = 50_000,
) -> Path | None:
    """Build the report of ``run_dirs`` and write it; returns the file written (None: stdout).

    ``view="tokens"`` opens the HTML page on the token view (the run must have been compared
    with ``--view-tokens``); ``docs`` picks its documents, ``view_max_tokens`` caps its size.
    Without ``view="tokens"`` a run's recorded token view is shown after the worst contexts."""
    if fmt_name not in FORMATS:
        from lmkl.errors import UsageError

        raise UsageError(f"unknown report format '{fmt_name}'", "use html, md, json or table")
    if view not in VIEWS:
        from lmkl.errors import UsageError

        raise UsageError(f"unknown view '{view}'", "use summary or tokens")
    if (view == "tokens" or docs) and fmt_name != "html":
        from lmkl.errors import UsageError

        raise UsageError(
            "the token view (--view tokens, --doc) is part of the HTML report only",
            "drop --view/--doc, or use --format html",
        )
    report = build_report([Path(p) for p in run_dirs], sort_by=sort_by, worst_n=worst_n)
    out = Path(out) if out else default_output(run_dirs, fmt_name)
    if fmt_name == "json":
        text = json.dumps(report.to_dict(), indent=2, allow_nan=False) + "\n"
        if out is None:
            if console is None:
                print(text, end="")
            else:
                console.out(text, end="", highlight=False)
            return None
        _write_text(out, text)
        return out
    if fmt_name == "table":
        if out is None:
            from rich.console import Console

            print_table(report, console or Console())
            return None
        from rich.console import Console

        with atomic_path(out) as tmp, tmp.open("w") as handle:
            print_table(report, Console(file=handle, width=140, color_system=None))
        return out
    from lmkl.report.plots import make_plots

    plots = make_plots(report)
    assert out is not None
    if fmt_name == "html":
        from lmkl.report.token_view import report_token_view

        # An experiment's token views live in its datasets' runs (datasets/<name>/view.parquet).
        sources = SimpleNamespace(runs=[*report.runs, *report.datasets])
        tv = report_token_view(sources, view == "tokens", docs, view_max_tokens)
        _write_text(out, render_html(report, plots, tv, token_view_first=view == "tokens"))
        return out
    asset_name = f"{out.stem}_files"
    asset_dir = out.parent / asset_name
    asset_dir.mkdir(parents=True, exist_ok=True)
    for plot in plots:
        with atomic_path(asset_dir / f"{plot.name}.png") as tmp:
            tmp.write_bytes(plot.png)
    _write_text(out, render_markdown(report, plots, asset_name))
    return out


def _write_text(path: Path, text: str) -> None:
    from lmkl.errors import OutputError

    try:
        with atomic_path(path) as tmp:
            tmp.write_text(text, encoding="utf-8")
    except OSError as exc:
        raise OutputError(
            f"cannot write report '{path}': {exc.strerror}", "choose a writable --out path"
        ) from exc


__all__ = [
    "FORMATS",
    "CandidateView",
    "default_output",
    "md_escape",
    "print_table",
    "render_html",
    "render_markdown",
    "write_report",
]
