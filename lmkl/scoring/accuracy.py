"""The accuracy contract every per-token kernel meets, and the check that measures it.

lmkl prints the same numbers wherever it runs: the native C kernel (CPUs with a compiler), the
torch kernel run eagerly (CPUs without one, small GPU runs) or through ``torch.compile`` (large
GPU runs), and the float64 definition (:func:`~.divergence.token_metrics`, which takes the rare
rows with non-finite logits). Each is held to the float64 value of the same float32 logits:

====================  ==========  ======================================================
metric                tolerance   meaning
====================  ==========  ======================================================
kl, reverse_kl        1e-3        relative, for values down to 1e-9 nats per token; below
                                  that, 1e-12 nats absolute
jsd                   1e-3        relative down to 2.5e-10 (JSD is about KL / 4); below,
                                  2.5e-13 absolute
entropy_*             1e-4        relative down to 1e-9 nats (peaked rows included)
nll_*                 1e-5        relative down to 1e-7 nats (a sure token's NLL is tiny)
delta_p               1e-6        absolute (a difference of probabilities)
reference_top1_prob   1e-6        relative
lse_*                 1e-6        relative down to 1 (the log-normalisers)
top1_*                exact       on rows without ties within float32 rounding
====================  ==========  ======================================================

Plain float32 arithmetic does not meet it: for near-identical models (a good 8-bit quantization,
bf16 against fp16, a fine-tune's first steps, KL of 1e-7 to 1e-10 nats) the rounding of the two
log-normalisers enters KL whole, and an entropy near 0 is lost below ``1 + rest``'s resolution.
``tests/test_accuracy_contract.py`` runs the check on every kernel available, and the native
kernel runs :func:`check` on load (a build that fails it is rebuilt once, then not used).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

import torch

__all__ = ["CONTRACT", "Tolerance", "check", "errors"]


@dataclass(frozen=True)
class Tolerance:
    """``|got - want| <= rtol * max(|want|, floor)``: relative above ``floor``, absolute below."""

    rtol: float
    floor: float = 0.0

    def bound(self, want: torch.Tensor) -> torch.Tensor:
        """The largest error allowed for each float64 value in ``want``."""
        return self.rtol * want.abs().clamp_min(self.floor)


#: The written contract (see the module docstring), one entry per kernel output.
CONTRACT: Mapping[str, Tolerance] = {
    "kl": Tolerance(1e-3, 1e-9),
    "reverse_kl": Tolerance(1e-3, 1e-9),
    "jsd": Tolerance(1e-3, 2.5e-10),
    "entropy_reference": Tolerance(1e-4, 1e-9),
    "entropy_candidate": Tolerance(1e-4, 1e-9),
    "nll_reference": Tolerance(1e-5, 1e-7),
    "nll_candidate": Tolerance(1e-5, 1e-7),
    "delta_p": Tolerance(1e-6, 1.0),
    "top1_agree": Tolerance(0.0),
    "top1_in_top5": Tolerance(0.0),
    "reference_top1_prob": Tolerance(1e-6),
    "lse_reference": Tolerance(1e-6, 1.0),
    "lse_candidate": Tolerance(1e-6, 1.0),
}


def errors(
    got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]
) -> dict[str, torch.Tensor]:
    """Each token's error as a multiple of what :data:`CONTRACT` allows (``<= 1`` meets it).

    ``want`` holds float64 values; names absent from either side are skipped, and so are rows
    where the float64 value is not finite (those must match exactly: see :func:`check`).
    """
    out = {}
    for name, tolerance in CONTRACT.items():
        if name not in got or name not in want:
            continue
        value = want[name].double().cpu()
        error = (got[name].double().cpu() - value).abs()
        finite = torch.isfinite(value)
        bound = tolerance.bound(value)
        ratio = torch.where(error == 0, torch.zeros_like(error), error / bound)
        # A NaN where float64 has a number is the worst error there is, not a pass.
        ratio = torch.where(ratio.isnan(), torch.full_like(ratio, math.inf), ratio)
        out[name] = torch.where(finite, ratio, torch.zeros_like(ratio))
    return out


def check(got: Mapping[str, torch.Tensor], want: Mapping[str, torch.Tensor]) -> list[str]:
    """What breaks the contract, one line per output (empty: it is met)."""
    problems = []
    for name, ratio in errors(got, want).items():
        worst = int(ratio.argmax()) if ratio.numel() else 0
        if ratio.numel() and float(ratio[worst]) > 1.0:
            problems.append(
                f"{name}: row {worst} is {float(ratio[worst]):.3g}x the allowed error "
                f"(got {float(got[name][worst]):.9g}, float64 {float(want[name][worst]):.9g})"
            )
        value, value_got = want[name].double().cpu(), got[name].double().cpu()
        special = ~torch.isfinite(value)
        same = (value_got[special] == value[special]) | (
            value_got[special].isnan() & value[special].isnan()
        )
        if not bool(same.all()):
            problems.append(f"{name}: a non-finite float64 value was not reproduced")
    return problems
