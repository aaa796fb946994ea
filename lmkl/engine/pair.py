"""What the two-model run kinds share: one reference, one candidate, their options and names."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lmkl.engine.common import default_run_dir, unique_labels
from lmkl.specs import ComputeSpec, DataSpec, ModelSpec


class PairKind:
    """Base of the run kinds over one reference and one candidate (per-byte, sampled KL)."""

    #: The command recorded in config.yaml (``compare --different-tokenizers``, ``sample-kl``).
    command: str

    def __init__(
        self, reference: ModelSpec, candidate: ModelSpec, data: DataSpec, compute: ComputeSpec
    ) -> None:
        self.reference, self.candidate = unique_labels([reference, candidate])
        self.data, self.compute = data, compute

    def own_options(self) -> dict[str, Any]:
        """The kind's own option sections (windowing, sampling...), placed before compute."""
        return {}

    def options(self) -> dict[str, Any]:
        return {
            "command": self.command,
            "reference": self.reference.model_dump(),
            "candidates": [self.candidate.model_dump()],
            "data": self.data.model_dump(),
            **self.own_options(),
            "compute": self.compute.model_dump(),
        }

    def default_dir(self) -> Path:
        return default_run_dir(self.reference.display_name, [self.candidate])

    def ready(self, index: int) -> None:
        """Both models are loaded by ``prepare``: nothing to get per part."""
