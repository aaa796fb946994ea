"""An attribution's numbers from its per-token rows: each unit's mean KL with a document
bootstrap interval, the sum of the isolated module effects, per-layer views, a plain summary.

Every unit is measured on the same tokens, so one set of bootstrap resamples (documents drawn
with replacement, :class:`~lmkl.analysis.ranking.Bootstrap`) serves all of them and the full
candidate: intervals of sums (``sum_of_modules``) come from the same draws.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import numpy as np
import pyarrow as pa

from lmkl.analysis.ranking import Bootstrap, UnitSumsStream, interval
from lmkl.analysis.streaming import Moments
from lmkl.attribution.structure import Structure, Unit
from lmkl.formatting import format_percent, format_ratio

#: Bootstrap resamples and interval level (as ``compare``'s ranking).
RESAMPLES = 1000
CONFIDENCE = 0.95


def module_type(name: str, structure: Structure) -> str:
    """A module's name inside its decoder layer (``mlp.gate_proj``), or its own name."""
    prefix = structure.layers_name + "."
    if name.startswith(prefix):
        return name[len(prefix) :].partition(".")[2]
    return name


class _UnitStats:
    """Streamed sums of one unit: per-document KL sums and token moments."""

    def __init__(self) -> None:
        self.docs = UnitSumsStream()
        self.kl, self.reverse_kl, self.top1 = Moments(), Moments(), Moments()

    def add(
        self, kl: np.ndarray, reverse: np.ndarray | None, top1: np.ndarray | None, units: np.ndarray
    ) -> None:
        self.docs.add(kl, units)
        keep = ~np.isnan(kl)
        self.kl.add(kl[keep])
        if reverse is not None:
            self.reverse_kl.add(reverse[keep])
        if top1 is not None:
            self.top1.add(top1[keep])


def _values(table: pa.Table, name: str, nonfinite: np.ndarray) -> np.ndarray:
    values = table[name].to_numpy(zero_copy_only=False).astype(np.float64)
    return np.where(nonfinite, np.nan, values)


def unit_summaries(
    units: list[Unit],
    structure: Structure,
    unit_tables: Iterable[pa.Table],
    full_tables: Iterable[pa.Table],
    sidecars: list[dict[str, Any]],
    *,
    unit_column: str = "doc_id",
    seed: int = 0,
) -> dict[str, Any]:
    """results.json's attribution fields from the parts' unit rows (``unit_tables``), the full
    candidate's rows (``full_tables``: ``kl``, ``nonfinite`` and ``unit_column``) and the parts'
    sidecars (hidden-state errors)."""
    stats: dict[str, _UnitStats] = {}
    for table in unit_tables:
        if table.num_rows == 0:
            continue
        keys = table["unit"].to_numpy(zero_copy_only=False)
        nonfinite = table["nonfinite"].to_numpy(zero_copy_only=False).astype(bool)
        kl, reverse = _values(table, "kl", nonfinite), _values(table, "reverse_kl", nonfinite)
        top1 = _values(table, "top1_agree", nonfinite)
        ids = table[unit_column].to_numpy(zero_copy_only=False)
        for key in np.unique(keys):
            rows = keys == key
            stats.setdefault(str(key), _UnitStats()).add(
                kl[rows], reverse[rows], top1[rows], ids[rows]
            )
    full = _UnitStats()
    for table in full_tables:
        nonfinite = table["nonfinite"].to_numpy(zero_copy_only=False).astype(bool)
        full.add(_values(table, "kl", nonfinite), None, None, table[unit_column].to_numpy())
    present = full.docs.seen
    order = list(stats)
    series = [full.docs.result(present)] + [stats[k].docs.result(present) for k in order]
    boot = Bootstrap(strata=[int(present.sum())], resamples=RESAMPLES, seed=seed)
    samples = boot.run(series)
    column = {key: i + 1 for i, key in enumerate(order)}

    def kl_block(stat: _UnitStats, draws: np.ndarray) -> dict[str, float]:
        mean, se = stat.kl.mean_se()
        low, high = interval(draws, CONFIDENCE)
        return {"mean": mean, "se": se, "ci_low": low, "ci_high": high}

    zero = {"mean": 0.0, "se": 0.0, "ci_low": 0.0, "ci_high": 0.0}
    out_units = []
    module_draws = np.zeros(samples.shape[0])
    module_sum = 0.0
    for unit in units:
        entry: dict[str, Any] = {"scope": unit.scope, "name": unit.name, "layer": unit.layer}
        stat = stats.get(unit.key)
        if unit.identical or stat is None:
            entry |= {"kl": dict(zero), "reverse_kl": 0.0, "top1_agreement": 1.0}
            entry["identical"] = unit.identical
        else:
            draws = samples[:, column[unit.key]]
            entry |= {
                "kl": kl_block(stat, draws),
                "reverse_kl": stat.reverse_kl.mean(),
                "top1_agreement": stat.top1.mean(),
                "identical": False,
            }
            if unit.scope == "module":
                module_draws = module_draws + draws
        if unit.scope == "module":
            entry["type"] = module_type(unit.name, structure)
            module_sum += entry["kl"]["mean"]
        out_units.append(entry)
    full_kl = kl_block(full, samples[:, 0])
    low, high = interval(module_draws, CONFIDENCE)
    ratio = full_kl["mean"] / module_sum if module_sum > 0 else math.nan
    errors = _hidden_errors(sidecars, structure.num_layers)
    layers = _by_layer(out_units, structure, errors)
    return {
        "full_kl": full_kl,
        "sum_of_modules": {
            "mean": module_sum,
            "ci_low": low,
            "ci_high": high,
            "full_over_sum": ratio,
            "note": "sum of the isolated module KLs; full_over_sum > 1: the modules' errors "
            "compound, < 1: they partly cancel",
        },
        "units": out_units,
        "layers": layers,
        "hidden_state_error": errors,
        "summary": plain_summary(out_units, layers, full_kl["mean"], module_sum),
        "bootstrap": {
            "resamples": RESAMPLES,
            "confidence": CONFIDENCE,
            "unit": "window" if unit_column == "window_id" else "document",
            "seed": seed,
        },
    }


def _hidden_errors(sidecars: list[dict[str, Any]], num_layers: int) -> list[float]:
    """Per layer, the mean of ‖h_Q − h_P‖ / ‖h_P‖ of its output over the scored tokens whose
    ratio is finite (NaN where none is)."""
    sums = np.zeros(num_layers)
    counts = np.zeros(num_layers)
    for sidecar in sidecars:
        found = sidecar.get("hidden_error")
        if found:
            sums += np.asarray(found["sums"], dtype=np.float64)
            # (Parts written before the per-layer counts: every token counted.)
            counts += np.asarray(found.get("counts", [found["tokens"]] * num_layers), float)
    with np.errstate(divide="ignore", invalid="ignore"):
        return [float(x) for x in np.where(counts > 0, sums / counts, math.nan)]


def _by_layer(
    units: list[dict[str, Any]], structure: Structure, errors: list[float]
) -> list[dict[str, Any]]:
    """Per decoder layer: the sum of its isolated module KLs, the layer's and the prefix's KL."""
    out = []
    for layer in range(structure.num_layers):
        of = [u for u in units if u["layer"] == layer]
        layer_unit = next(u for u in of if u["scope"] == "layer")
        prefix = next(u for u in of if u["scope"] == "prefix")
        out.append(
            {
                "layer": layer,
                "name": structure.layer_name(layer),
                "modules_kl": sum(u["kl"]["mean"] for u in of if u["scope"] == "module"),
                "layer_kl": layer_unit["kl"],
                "prefix_kl": prefix["kl"],
                "hidden_state_error": errors[layer],
            }
        )
    return out


def _percent(part: float, whole: float) -> str:
    return format_percent(part / whole)


def plain_summary(
    units: list[dict[str, Any]], layers: list[dict[str, Any]], full: float, module_sum: float
) -> str:
    """One or two sentences: where the isolated KL sits, and how the modules interact."""
    modules = [u for u in units if u["scope"] == "module"]
    if module_sum <= 0:
        return "No module on its own changes the reference's predictions (every isolated KL is 0)."
    top_layer = max(layers, key=lambda row: row["modules_kl"], default=None)
    outside = sum(u["kl"]["mean"] for u in modules if u["layer"] is None)
    words = []
    if top_layer is not None and top_layer["modules_kl"] >= outside:
        in_layer = [u for u in modules if u["layer"] == top_layer["layer"]]
        top = max(in_layer, key=lambda u: u["kl"]["mean"])
        words.append(
            f"{_percent(top_layer['modules_kl'], module_sum)} of the isolated KL sits in "
            f"layer {top_layer['layer']}; its {top['type']} alone is "
            f"{_percent(top['kl']['mean'], module_sum)}."
        )
    else:
        top = max(modules, key=lambda u: u["kl"]["mean"])
        words.append(
            f"{_percent(outside, module_sum)} of the isolated KL sits outside the decoder "
            f"layers; {top['name']} alone is {_percent(top['kl']['mean'], module_sum)}."
        )
    ratio = full / module_sum
    if ratio > 1.1:
        words.append(
            f"The full candidate's KL is {format_ratio(ratio)} the sum of the isolated module KLs: "
            "their errors compound."
        )
    elif ratio < 0.9:
        words.append(
            f"The full candidate's KL is {format_ratio(ratio)} the sum of the isolated module KLs: "
            "their errors partly cancel."
        )
    else:
        words.append(
            f"The full candidate's KL is {format_ratio(ratio)} the sum of the isolated module KLs: "
            "the modules act nearly independently."
        )
    return " ".join(words)
