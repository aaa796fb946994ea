"""The per-token quantities lmkl computes, named once for every layer.

The scoring kernels (torch and C) produce them in this order, tokens.parquet stores them, and
the summaries (:mod:`lmkl.analysis.streaming`) report them; this module holds only names, so
that the analysis layer can share them without importing torch.
"""

from __future__ import annotations

#: Per-token quantities of :func:`lmkl.scoring.divergence.token_metrics`, in storage order.
TOKEN_METRIC_NAMES: tuple[str, ...] = (
    "kl",
    "reverse_kl",
    "jsd",
    "entropy_reference",
    "entropy_candidate",
    "nll_reference",
    "nll_candidate",
    "delta_p",
    "top1_agree",
    "top1_in_top5",
    "reference_top1_prob",
)
#: The divergences, whose whole distribution (quantiles included) results.json reports.
DIVERGENCE_NAMES: tuple[str, ...] = ("kl", "reverse_kl", "jsd")
#: Kept per token for the calibration views, not summarized by a mean of its own.
CALIBRATION_NAMES: tuple[str, ...] = ("reference_top1_prob",)
