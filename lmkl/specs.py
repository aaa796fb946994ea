"""Typed options for a comparison: models, data, windows, compute and output (pydantic v2).

The same models back ``lmkl compare`` (built from command-line options) and YAML experiments, so
a value means the same thing wherever it is set. Every model is strict (``extra="forbid"``): an
unknown key is an error, never silently ignored.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
Windowing = Literal["documents", "llama-cpp"]


class StrictModel(BaseModel):
    """Base for every options model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelSpec(StrictModel):
    """Where a model comes from and how to load it (lm-evaluation-harness option names)."""

    model: str = Field(description="Hub id (org/name) or local directory.")
    label: str | None = Field(None, description="Name shown in tables; defaults to the model.")
    revision: str | None = Field(None, description="Hub branch, tag or commit.")
    dtype: DTypeName = Field("auto", description="Weights dtype; auto = the checkpoint's own.")
    device: str = Field("auto", description="auto, cpu, cuda, cuda:N or mps.")
    device_map: str | None = Field(
        None,
        description="Spread one model over several devices (Hugging Face device_map, e.g. "
        "'auto'; needs accelerate). Overrides device.",
    )
    trust_remote_code: bool = Field(
        False, description="Run model code shipped with the checkpoint (off: it is arbitrary code)."
    )
    attn_implementation: str | None = Field(None, description="eager, sdpa, flash_attention_2...")
    adapter: str | None = Field(None, description="PEFT adapter applied on top (needs lmkl[peft]).")
    adapter_revision: str | None = Field(
        None, description="Hub branch, tag or commit of the adapter (when it is a hub id)."
    )
    allow_pickle: bool = Field(
        False, description="Allow pickle-based weight files (.bin/.pt), which can run code on load."
    )
    group: str | None = Field(None, description="Free-form group for reports (e.g. 'students').")
    params: int | None = Field(None, ge=0, description="Parameter count, if known in advance.")
    step: int | None = Field(None, ge=0, description="Training step, for checkpoint series.")

    @property
    def display_name(self) -> str:
        return self.label or self.model.rstrip("/").split("/")[-1] or self.model


class DataSpec(StrictModel):
    """A text source: hub dataset, local file (.txt/.jsonl/.json/.csv/.parquet) or saved dataset."""

    source: str = Field(description="Hub dataset name, local file, or save_to_disk directory.")
    split: str | None = Field(None, description="Split; default: the only split, else 'test'.")
    dataset_config: str | None = Field(None, description="Hub dataset configuration name.")
    text_field: str = Field("text", description="Column holding the text.")
    max_samples: int | None = Field(None, gt=0, description="Use only the first N documents.")
    label: str | None = Field(None, description="Name shown in tables; defaults to the source.")
    weight: float = Field(1.0, gt=0, description="Weight in multi-dataset averages.")
    score_on: Literal["all", "assistant"] | None = Field(
        None,
        description="Chat data (a messages column): score only the assistant tokens (default) "
        "or all tokens of the rendered conversation. Plain text is always scored whole.",
    )

    @property
    def display_name(self) -> str:
        return self.label or self.source.rstrip("/").split("/")[-1]


class WindowSpec(StrictModel):
    """How token streams are cut into model inputs and which positions are scored."""

    windowing: Windowing = Field(
        "documents",
        description="documents: each document on its own, sliding windows when long; "
        "llama-cpp: llama-perplexity's chunks, second half of each chunk scored.",
    )
    context_length: int = Field(512, ge=2, description="Tokens per model input (llama.cpp: -c).")
    stride: int | None = Field(
        None,
        ge=1,
        description="New tokens scored per sliding window (documents mode). Smaller = more "
        "left context per token but more compute. Default: context_length // 2.",
    )

    @model_validator(mode="after")
    def _check_stride(self) -> WindowSpec:
        if self.stride is not None and self.stride > self.context_length - 1:
            raise ValueError(
                f"stride ({self.stride}) must be at most context_length - 1 "
                f"({self.context_length - 1}) so that every token is scored"
            )
        return self

    @property
    def effective_stride(self) -> int:
        return self.stride or max(1, self.context_length // 2)


class ComputeSpec(StrictModel):
    """Batching, memory and numerical settings."""

    batch_size: int = Field(8, ge=1, description="Windows per forward pass.")
    max_batch_tokens: int | None = Field(
        None,
        ge=1,
        description="Sort windows by length and fill each batch up to this many (padded) tokens "
        "instead of batch_size consecutive windows.",
    )
    chunk_tokens: int | None = Field(
        None,
        ge=1,
        description="Tokens per KL chunk; extra memory is about 40 bytes x chunk x vocab. "
        "Default: from memory_budget_mb.",
    )
    memory_budget_mb: int = Field(
        1024, ge=16, description="Budget for the KL stage's temporaries, in MiB."
    )
    max_tokens: int | None = Field(None, gt=0, description="Stop after this many scored tokens.")
    temperature: float = Field(1.0, gt=0, description="Compare softened distributions p^(1/T).")
    worst_k: int = Field(
        50, ge=0, description="Worst positions kept with top-5 tokens for reports."
    )
    view_tokens: int = Field(
        0,
        ge=0,
        description="Record both models' top-5 next tokens on the worst documents (by mean KL), "
        "up to this many tokens, for the report's token view (view.parquet; 0 = off).",
    )
    view_docs: Literal["worst", "sample"] = Field(
        "worst",
        description="Which documents view_tokens records: the worst by mean KL, or a random "
        "sample (seeded by seed) to see typical text.",
    )
    seed: int = Field(0, description="Seed for anything random (bootstrap, sampling).")
    compile: bool = Field(
        True,
        description="torch.compile the fused KL kernel when the run is big enough for it to pay "
        "(falls back to eager if compilation fails).",
    )

    def chunk_size(self, vocab_size: int, temporaries: int = 10) -> int:
        """Tokens per KL chunk: explicit, else as many as fit the memory budget.

        ``temporaries`` is the number of float32 ``[chunk, V]`` rows alive per token in the KL
        stage (see :func:`lmkl.scoring.fused.temporaries_per_token`).
        """
        if self.chunk_tokens:
            return self.chunk_tokens
        per_token = temporaries * 4 * vocab_size
        return max(1, min(4096, (self.memory_budget_mb * 2**20) // per_token))


class OutputSpec(StrictModel):
    """Where results go."""

    dir: str | None = Field(None, description="Run directory; default runs/<name>-<time>.")
    overwrite: bool = Field(False, description="Replace an existing run directory.")
