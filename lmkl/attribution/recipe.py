"""A mixed-precision recipe chosen from an attribution and then measured.

``lmkl attribute REFERENCE LOW --high HIGH --budget-bits B``: LOW's modules were attributed;
which of them to take from HIGH (a higher-precision copy of the same structure) within ``B``
stored bits per weight? :func:`choose_modules` is greedy by *isolated KL saved per extra stored
byte*: a module's isolated KL under LOW is what taking it from HIGH can save at most (HIGH's own
error is taken as negligible beside it), its extra bytes are HIGH's stored bytes minus LOW's
(:func:`lmkl.models.mixed.module_bytes`, as shipped). Modules are added in that order while the
total stays within the budget. The prediction is only a guide: the run then builds the mixed
model through the recipe file (exactly as ``lmkl compare REF --recipe recipe.yaml`` loads it)
and measures its KL on the same tokens, beside uniform LOW and uniform HIGH.
"""

from __future__ import annotations

import math
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from lmkl.errors import UsageError
from lmkl.specs import ModelSpec, Recipe, write_recipe


@dataclass
class Choice:
    """Modules taken from HIGH and the stored size the choice predicts."""

    names: list[str]
    stored_bytes: float
    weights: int
    saved_kl: float
    #: Modules considered, in the greedy order, with their saving and extra bytes.
    order: list[dict[str, Any]] = field(default_factory=list)

    @property
    def bits_per_weight(self) -> float:
        return 8 * self.stored_bytes / self.weights if self.weights else math.nan


def choose_modules(
    isolated_kl: dict[str, float],
    low_bytes: dict[str, int],
    high_bytes: dict[str, int],
    low_stored_bytes: float,
    weights: int,
    budget_bits: float,
) -> Choice:
    """Greedy by KL saved per extra byte within ``budget_bits`` per weight (see the module
    docstring). ``isolated_kl``: each module's isolated KL under LOW; ``low_stored_bytes`` and
    ``weights``: LOW's whole stored size and weight count."""
    budget = budget_bits * weights / 8
    if low_stored_bytes > budget:
        raise UsageError(
            f"--budget-bits {budget_bits:g} is below LOW's own "
            f"{8 * low_stored_bytes / weights:.3f} bits per weight",
            "give a budget between LOW's and HIGH's bits per weight",
        )
    scored = []
    for name, kl in isolated_kl.items():
        if kl <= 0 or name not in low_bytes or name not in high_bytes:
            continue
        extra = high_bytes[name] - low_bytes[name]
        # Free or cheaper modules first (infinite value per byte), then by saving per byte.
        value = math.inf if extra <= 0 else kl / extra
        scored.append((value, kl, name, extra))
    scored.sort(key=lambda item: (-item[0], -item[1], item[2]))
    total, saved, names, order = float(low_stored_bytes), 0.0, [], []
    for _value, kl, name, extra in scored:
        taken = total + extra <= budget
        if taken:
            total += extra
            saved += kl
            names.append(name)
        order.append({"name": name, "saved_kl": kl, "extra_bytes": extra, "taken": taken})
    return Choice(names, total, weights, saved, order)


def predicted_kl(uniform_low_kl: float, saved: float, isolated_total: float) -> float:
    """LOW's full KL less the chosen modules' share of the isolated KL."""
    if isolated_total <= 0:
        return uniform_low_kl
    return uniform_low_kl * (1 - saved / isolated_total)


def _portable(spec: ModelSpec) -> ModelSpec:
    """``spec`` with a local model path made absolute (a recipe file may move)."""
    path = Path(spec.model).expanduser()
    return spec.model_copy(update={"model": str(path.resolve())}) if path.exists() else spec


def measure_recipe(
    *,
    reference: Any,
    reference_spec: ModelSpec,
    low_spec: ModelSpec,
    high_spec: ModelSpec,
    choice: Choice,
    uniform_low_kl: float,
    isolated_total: float,
    run_comparison: Callable[..., Any],
    load_model: Callable[..., Any],
) -> tuple[dict[str, Any], Recipe]:
    """Build the mixed model from a recipe file and measure it with ``run_comparison`` (the
    engine's comparison, given the loaded reference, mixed model and HIGH) on the same data.
    HIGH is loaded (``load_model``) once the mixed model is built, whose own HIGH is freed by
    then: at most the reference, LOW and HIGH are in memory at once, never two HIGHs.

    Returns results.json's ``recipe`` object and the :class:`Recipe` to write beside it.
    """
    import shutil

    recipe = Recipe(
        reference=_portable(reference_spec),
        low=_portable(low_spec.model_copy(update={"label": None})),
        high=_portable(high_spec.model_copy(update={"label": None})),
        high_modules=choice.names,
    )
    scratch = Path(tempfile.mkdtemp(prefix="lmkl-recipe-"))
    try:
        path = write_recipe(scratch / "recipe.yaml", recipe)
        mixed_spec = low_spec.model_copy(
            update={"recipe": str(path), "label": "recipe", "model": recipe.low.model}
        )
        mixed = load_model(mixed_spec)
        high = load_model(high_spec)
        outcome = run_comparison(
            [mixed_spec, high_spec], (reference, [mixed, high]), scratch / "measure"
        )
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    entries = {e["label"]: e for e in outcome.results["candidates"]}
    mixed_entry = entries[mixed_spec.display_name]
    measured = float(mixed_entry["metrics"]["kl"]["mean"])
    high_kl = float(entries[high_spec.display_name]["metrics"]["kl"]["mean"])
    bits = mixed_entry["model"].get("bits_per_weight")
    predicted = predicted_kl(uniform_low_kl, choice.saved_kl, isolated_total)
    summary = {
        "high": list(choice.names),
        "bits_per_weight": bits,
        "predicted_bits_per_weight": choice.bits_per_weight,
        "predicted_kl": predicted,
        "measured_kl": measured,
        "uniform_low_kl": uniform_low_kl,
        "uniform_high_kl": high_kl,
        "low_bits_per_weight": None,
        "high_bits_per_weight": entries[high_spec.display_name]["model"].get("bits_per_weight"),
        "better_than_low": measured < uniform_low_kl,
        "method": "greedy by isolated KL saved per extra stored byte, within the budget",
    }
    recipe = recipe.model_copy(
        update={
            "bits_per_weight": bits,
            "predicted_kl": predicted,
            "measured_kl": measured,
            "uniform_low_kl": uniform_low_kl,
            "uniform_high_kl": high_kl,
        }
    )
    return summary, recipe
