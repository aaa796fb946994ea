"""A model ready for scoring (:class:`LoadedModel`) and its output layer (:class:`OutputHead`).

The runner asks a :class:`LoadedModel` for final hidden states and turns only the scored
positions into logits, a chunk at a time, through the :class:`OutputHead` (the model's own
post-processing such as final-logit soft-capping included).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from lmkl.specs import ModelSpec


@dataclass
class OutputHead:
    """Hidden states → logits for a chunk of positions, exactly as the model's forward does."""

    linear: torch.nn.Module
    softcap: float | None = None
    scale: float | None = None
    divide_by: float | None = None

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor:
        logits = self.linear(hidden)
        if self.scale is not None:
            logits = logits * self.scale
        if self.divide_by is not None:
            logits = logits / self.divide_by
        if self.softcap is not None:
            logits = torch.tanh(logits / self.softcap) * self.softcap
        return logits


@dataclass
class LoadedModel:
    """A model ready for scoring, with its tokenizer and a JSON-able description."""

    spec: ModelSpec
    model: Any
    tokenizer: Any
    device: torch.device
    head: OutputHead | None
    description: dict[str, Any] = field(default_factory=dict)
    #: Run forwards outside inference mode (under no_grad): optimum-quanto's packed weights
    #: make views that inference mode refuses ("Cannot set version_counter").
    no_inference_mode: bool = False
    #: How the weights are quantized (None: full precision); see :mod:`lmkl.quantization`.
    quantization: dict[str, Any] | None = None
    #: How much one text's logits move with the other rows of its batch, measured at load time
    #: (see :func:`lmkl.models.head_split.measure_batch_dependence`; None: not measured).
    batch_dependence: dict[str, Any] | None = None

    @property
    def probe_tolerance(self) -> float:
        """Relative tolerance of the load-time probes: float32 is exact to rounding; half
        precision and quantized kernels (LLM.int8() picks outlier columns over the whole
        input, so a position's logits move by ~1e-3 with later tokens) get 1e-2, still far
        below the O(1) changes of a bidirectional model."""
        exact = self.model.dtype == torch.float32 and self.quantization is None
        return 1e-4 if exact else 1e-2

    @property
    def label(self) -> str:
        """The name in tables (the spec's display name)."""
        return self.spec.display_name

    @property
    def logits_width(self) -> int:
        """Rows of the output layer (may exceed the tokenizer's size)."""
        emb = self.model.get_output_embeddings()
        if emb is not None and hasattr(emb, "weight"):
            return int(emb.weight.shape[0])
        return int(self.model.config.get_text_config().vocab_size)

    @property
    def max_positions(self) -> int | None:
        """The longest input the config allows (None: no stated limit)."""
        return max_positions(self.model.config)

    def hidden_states(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """``[B, T, H]`` final hidden states, or ``[B, T, V]`` logits when the split is off."""
        if self.no_inference_mode and torch.is_inference_mode_enabled():
            with torch.inference_mode(False), torch.no_grad():
                return self.hidden_states(input_ids, attention_mask)
        if self.head is None:
            return self.model(
                input_ids=input_ids, attention_mask=attention_mask, use_cache=False
            ).logits
        out = self.model.base_model(
            input_ids=input_ids, attention_mask=attention_mask, use_cache=False
        )
        return out.last_hidden_state

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Logits for ``[N, H]`` rows of :meth:`hidden_states` (identity when the split is off)."""
        if self.head is None:
            return hidden
        if self.no_inference_mode and torch.is_inference_mode_enabled():
            with torch.inference_mode(False), torch.no_grad():
                return self.head(hidden)
        return self.head(hidden)

    def forward_logits(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The model's own full forward (``[B, T, V]`` logits), for probes and references."""
        if self.no_inference_mode and torch.is_inference_mode_enabled():
            with torch.inference_mode(False), torch.no_grad():
                return self.forward_logits(input_ids, attention_mask)
        out = self.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False)
        return out.logits


def max_positions(config: Any) -> int | None:
    """The longest input a model config allows (None when it states no limit)."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for name in ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length"):
        value = getattr(text, name, None)
        if isinstance(value, int) and value > 0:
            return value
    return None
