"""The plain-language reading at the top of a report: a few sentences computed from the numbers."""

from __future__ import annotations

import math
from typing import Any

from lmkl.analysis import metrics as registry
from lmkl.formatting import (
    Z95,
    format_ci,
    format_column,
    format_interval,
    format_ratio,
    format_signed,
    prose,
    to_float,
)
from lmkl.formatting import percent as _percent
from lmkl.report.candidates import confidence_profile
from lmkl.report.data import Report
from lmkl.report.runs import stored_count

#: The KL of a group of positions is "concentrated" there when its share of the KL exceeds its
#: share of the tokens by this much (absolute), or by the factor below; else it is spread like
#: the tokens (most KL where most tokens are says nothing about those positions).
CONCENTRATED_EXCESS = 0.15
CONCENTRATED_RATIO = 1.5


def confidence_clause(profile: list[dict[str, Any]]) -> str | None:
    """Where a candidate's KL comes from, by the reference's confidence (share × mean per bucket).

    Buckets below 0.5 top-1 probability are "low-confidence", [0.5, 0.75) "medium", 0.75 and
    above "confident". Always said as "K of the KL on T of the tokens" of one group: a group where
    the KL is "concentrated" (K clearly exceeds T: by :data:`CONCENTRATED_EXCESS`, or
    :data:`CONCENTRATED_RATIO` times with K at least 10%), the largest such; where none is, the
    KL is "spread like the tokens" and the group with the largest K is named.
    """
    infinite = [b["bucket"] for b in profile if b.get("kl_mean") == math.inf]
    if infinite:
        # Shares of an infinite total are meaningless; say where the infinite KL sits.
        return "its infinite KL sits at positions with reference top-1 probability in " + (
            ", ".join(infinite)
        )
    groups = {
        "low-confidence": [0.0, 0.0],
        "medium-confidence": [0.0, 0.0],
        "confident": [0.0, 0.0],
    }
    for bucket in profile:
        if not math.isfinite(bucket["kl_share"]):
            continue
        name = (
            "low-confidence"
            if bucket["high"] <= 0.5
            else "medium-confidence"
            if bucket["high"] <= 0.75
            else "confident"
        )
        groups[name][0] += bucket["kl_share"]
        groups[name][1] += bucket["share"] if math.isfinite(bucket["share"]) else 0.0
    if not any(share for share, _ in groups.values()):
        return None

    def concentrated(kl_share: float, token_share: float) -> bool:
        # A tiny group (under a tenth of the KL) is not worth naming for its ratio alone.
        return kl_share >= token_share + CONCENTRATED_EXCESS or (
            kl_share >= 0.1 and kl_share >= CONCENTRATED_RATIO * token_share
        )

    # The group where the KL is concentrated (the largest such), else the largest share.
    dense = [kv for kv in groups.items() if concentrated(*kv[1])]
    name, (kl_share, token_share) = max(dense or groups.items(), key=lambda kv: kv[1][0])
    where = {
        "low-confidence": "low-confidence positions (reference top-1 probability < 0.5)",
        "medium-confidence": "medium-confidence positions (reference top-1 probability 0.5–0.75)",
        "confident": "positions where the reference is confident (top-1 probability ≥ 0.75)",
    }[name]
    shares = f"{_percent(kl_share, 0)} of the KL on {_percent(token_share, 0)} of the tokens"
    if dense:
        return f"its KL is concentrated in {where}: {shares}"
    return f"its KL is spread like the tokens: {where} hold {shares}"


def _data_fingerprint(results: dict[str, Any]) -> str:
    """The text a run scored: its data fingerprint (an experiment's: every dataset's)."""
    data = results.get("data") or {}
    sets = data.get("datasets") if isinstance(data.get("datasets"), list) else [data]
    return "+".join(
        str(d.get("fingerprint") or d.get("source")) for d in sets if isinstance(d, dict)
    )


def comparability_warning(runs: list[Any]) -> str | None:
    """The sentence that says why the KLs of ``runs`` cannot be ranked against each other, or
    None when they share windowing, data and reference.

    A mean KL depends on how much context each token had (context length, stride, windowing
    mode), on the text and on the reference: two runs that differ in any of these measure
    different things, however alike their numbers look."""
    if len(runs) < 2:
        return None
    differences = []

    def differ(name: str, values: list[str], show: bool = True) -> None:
        distinct = list(dict.fromkeys(values))
        if len(distinct) > 1:
            differences.append(f"{name} ({' vs '.join(distinct)})" if show else name)

    windows = [run.results.get("windowing") or {} for run in runs]
    differ("context length", [str(w.get("context_length")) for w in windows])
    differ("stride", [str(w.get("stride")) for w in windows])
    differ("windowing mode", [str(w.get("mode")) for w in windows])
    # Fingerprints are long hashes: saying that the data differ is enough.
    differ("data", [_data_fingerprint(run.results) for run in runs], show=False)
    differ(
        "reference",
        [str((run.results.get("reference") or {}).get("model")) for run in runs],
    )
    if not differences:
        return None
    return f"these runs differ in {', '.join(differences)}: their KLs are not comparable"


def plain_reading(report: Report) -> list[str]:
    """A few sentences computed from the numbers, for the top of the report (first, when the
    runs cannot be compared, the warning that says why)."""
    lines = []
    warning = comparability_warning(report.runs)
    if warning:
        lines.append(f"Warning: {warning}.")
    for c in report.candidates:
        m = c.metrics
        agree = c.value("top1_agreement.mean")
        agree_se = to_float(m.get("top1_agreement", {}).get("se"))
        kl, kl_se = c.value("kl.mean"), to_float(m.get("kl", {}).get("se"))
        parts = []
        # "±" is one standard error, in tables only; every interval here is a 95 % CI in
        # brackets that says what it resamples.
        if math.isfinite(agree):
            ci = ""
            if math.isfinite(agree_se):
                bounds = [100 * (agree + z * agree_se) for z in (-Z95, Z95)]
                ci = " (95% CI over tokens [{}%, {}%])".format(*format_column(bounds, 3))
            parts.append(
                f"agrees with the reference's top token on {_percent(agree)} of tokens{ci}"
            )
        if math.isfinite(kl):
            kl_block = m.get("kl", {})
            low, high = to_float(kl_block.get("ci_low")), to_float(kl_block.get("ci_high"))
            if math.isfinite(low) and math.isfinite(high):
                # "document bootstrap", "window bootstrap", "chunk bootstrap within datasets"
                units = str(kl_block.get("ci_method") or "document").split()[0] + "s"
                shown = format_interval(kl, low, high, 3)
                mean_text, bracket = shown.split(" ", 1)
                ci = f" (95% CI {bracket}, resampling {units})"
            else:
                mean_text = prose(kl)
                ci = (
                    f" (95% CI over tokens {format_ci([kl - Z95 * kl_se, kl + Z95 * kl_se], 3)})"
                    if math.isfinite(kl_se)
                    else ""
                )
            parts.append(
                f"has a mean KL(P‖Q) of {mean_text} nats{ci} (median "
                f"{prose(c.value('kl.median'))}, p99 {prose(c.value('kl.p99'))})"
            )
        elif kl == math.inf:
            parts.append(
                "has an infinite mean KL (it gives zero probability to tokens the "
                "reference can produce)"
            )
        sentence = f"{c.key} " + " and ".join(parts) if parts else f"{c.key} has no scored tokens"
        clause = confidence_clause(confidence_profile(m))
        if clause:
            sentence += f"; {clause}"
        ratio = c.value("ppl.ratio")
        if math.isfinite(ratio):
            ppl_q, ppl_p = format_column([c.value("ppl.candidate"), c.value("ppl.reference")], 3)
            sentence += (
                f". Its perplexity is {format_ratio(ratio)} the reference's ({ppl_q} vs {ppl_p})"
            )
        infinite = stored_count(m.get("counts", {}).get("infinite"))
        if infinite:
            sentence += (
                f". {infinite:,} token(s) got zero probability from it where the "
                "reference gave some (KL = inf)"
            )
        nonfinite = stored_count(m.get("counts", {}).get("nonfinite"))
        if nonfinite:
            sentence += f". {nonfinite:,} position(s) had non-finite logits and were excluded"
        lines.append(sentence + ".")
    if len(report.candidates) > 1:
        ordered = report.candidates
        metric = report.sort_by
        best, second = ordered[0], ordered[1]
        best_text, second_text = format_column([best.value(metric), second.value(metric)], 3)
        direction = "highest" if registry.higher_is_better(metric) else "lowest"
        text = (
            f"By {metric}, {best.key} is closest to the reference ({direction}: "
            f"{best_text}), then {second.key} ({second_text})"
        )
        if metric.endswith(".mean"):
            family = metric.split(".")[0]
            se1 = to_float(best.metrics.get(family, {}).get("se"))
            se2 = to_float(second.metrics.get(family, {}).get("se"))
            gap = abs(second.value(metric) - best.value(metric))
            se = math.hypot(se1, se2) if math.isfinite(se1) and math.isfinite(se2) else 0
            if se > 0 and gap < Z95 * se:
                text += "; the gap is within token-level noise (|Δ| < 1.96 combined se)"
        lines.append(text + ".")
        sizes = report.sizes()
        if sizes:
            front = [k for k, f in zip(sizes["keys"], sizes["pareto"], strict=True) if f]
            # The words of `lmkl run` (its ranking's size axis against the mean KL).
            lines.append(
                f"Pareto-optimal ({sizes['axis'].replace('_', ' ')} vs kl.mean): "
                f"{', '.join(front)}."
            )
        for group, series in report.steps().items():
            lines.append(
                f"In the checkpoint series '{group}', the lowest mean KL is at step "
                f"{int(series['best_step'])} ({series['best']})."
            )
    for diff in report.differences:
        kl_row = next(r for r in diff["metrics"] if r["metric"] == "kl.mean")
        text = (
            f"{diff['label']} differs between runs: mean KL {prose(kl_row['a'])} in "
            f"{diff['a']} vs {prose(kl_row['b'])} in {diff['b']}"
        )
        if math.isfinite(kl_row["z"]):
            text += f" (Δ {format_signed(kl_row['delta'], 3)}, z = {kl_row['z']:.1f})"
        paired = diff.get("paired")
        if paired:
            text += (
                f"; on the {paired['tokens']:,} tokens both scored, "
                f"{_percent(paired['identical_share'])} have the same KL (within 1e-6)"
            )
        changed = [c["setting"] for c in diff["changes"] if not c["setting"].startswith("versions")]
        if changed:
            text += "; changed: " + ", ".join(changed[:6]) + ("…" if len(changed) > 6 else "")
        lines.append(text + ".")
    return lines
