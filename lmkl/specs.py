"""Typed options for a comparison: models, data, windows, compute and output (pydantic v2).

The same models back ``lmkl compare`` (built from command-line options) and YAML experiments, so
a value means the same thing wherever it is set. Every model is strict (``extra="forbid"``): an
unknown key is an error, never silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DTypeName = Literal["auto", "float32", "bfloat16", "float16"]
Windowing = Literal["documents", "llama-cpp"]


class StrictModel(BaseModel):
    """Base for every options model: unknown keys are errors."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


QuantMethod = Literal["torchao", "bitsandbytes", "quanto"]


@dataclass(frozen=True)
class QuantScheme:
    """What a quantization scheme stores: bits per weight and the group sizes it accepts."""

    bits: int
    group_sizes: tuple[int, ...] = ()
    default_group: int | None = None  # None: one scale per output channel (or per tensor)
    summary: str = ""


#: The on-the-fly schemes lmkl knows, per method (built in :mod:`lmkl.quantization`). All of them
#: run on CPU with the CPU builds of torchao, bitsandbytes and optimum-quanto.
QUANT_SCHEMES: dict[str, dict[str, QuantScheme]] = {
    "torchao": {
        "int8_weight_only": QuantScheme(8, summary="int8 weights, per-channel scales"),
        "int8_dynamic": QuantScheme(8, summary="int8 weights and per-token int8 activations"),
        "int4_weight_only": QuantScheme(
            4, (16, 32, 64, 128, 256), 32, "int4 weights, one scale per group"
        ),
        "int8_dynamic_int4": QuantScheme(
            4, (16, 32, 64, 128, 256), 32, "int4 weights by group, int8 activations"
        ),
        "float8_weight_only": QuantScheme(8, summary="float8 (e4m3) weights"),
    },
    "bitsandbytes": {
        "int8": QuantScheme(8, summary="LLM.int8() weights"),
        "nf4": QuantScheme(4, default_group=64, summary="NormalFloat4, blocks of 64"),
        "fp4": QuantScheme(4, default_group=64, summary="FP4, blocks of 64"),
    },
    "quanto": {
        "int8": QuantScheme(8, summary="int8 weights, per-channel scales"),
        "int4": QuantScheme(4, default_group=128, summary="int4 weights, groups of 128"),
        "int2": QuantScheme(2, default_group=128, summary="int2 weights, groups of 128"),
        "float8": QuantScheme(8, summary="float8 (e4m3) weights"),
    },
}


class QuantizeSpec(StrictModel):
    """Quantize a model while loading it (the candidate is derived from full-precision weights).

    ``scheme`` names a scheme of the method (see :data:`lmkl.quantization.SCHEMES`), e.g.
    torchao ``int8_weight_only``, ``int4_weight_only``; bitsandbytes ``nf4``; quanto ``int4``.
    """

    method: QuantMethod = Field(description="torchao, bitsandbytes or quanto.")
    scheme: str = Field(min_length=1, description="The method's scheme, e.g. int8_weight_only.")
    group_size: int | None = Field(
        None, ge=1, description="Weights per scale, for schemes with groups (e.g. 32, 64, 128)."
    )

    @model_validator(mode="after")
    def _check_scheme(self) -> QuantizeSpec:
        schemes = QUANT_SCHEMES[self.method]
        scheme = schemes.get(self.scheme)
        if scheme is None:
            raise ValueError(
                f"{self.method} has no scheme '{self.scheme}'; known: {', '.join(schemes)}"
            )
        if self.group_size is not None and not scheme.group_sizes:
            raise ValueError(f"{self.method} {self.scheme} has no group size")
        if self.group_size is not None and self.group_size not in scheme.group_sizes:
            sizes = ", ".join(map(str, scheme.group_sizes))
            raise ValueError(f"{self.method} {self.scheme} takes group_size {sizes}")
        return self

    @property
    def bits(self) -> int:
        """Bits per quantized weight, before scales."""
        return QUANT_SCHEMES[self.method][self.scheme].bits

    @property
    def effective_group_size(self) -> int | None:
        """The group size used: the given one, else the scheme's default (None: per channel)."""
        return self.group_size or QUANT_SCHEMES[self.method][self.scheme].default_group

    @property
    def name(self) -> str:
        """Short label, e.g. ``torchao-int4_weight_only-g32``."""
        return f"{self.method}-{self.scheme}" + (f"-g{self.group_size}" if self.group_size else "")


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
    gguf_file: str | None = Field(
        None,
        description="GGUF file inside the model's directory or hub repo (loaded through "
        "transformers, dequantized). A model path ending in .gguf sets it by itself.",
    )
    quantize: QuantizeSpec | None = Field(
        None, description="Quantize the weights while loading (method, scheme, group size)."
    )
    group: str | None = Field(None, description="Free-form group for reports (e.g. 'students').")
    params: int | None = Field(None, ge=0, description="Parameter count, if known in advance.")
    step: int | None = Field(None, ge=0, description="Training step, for checkpoint series.")

    @model_validator(mode="before")
    @classmethod
    def _split_gguf_path(cls, data: Any) -> Any:
        # "dir/model-Q4_K_M.gguf" means: the directory, and that file in it (transformers' form).
        model = data.get("model") if isinstance(data, dict) else None
        if isinstance(model, str) and model.lower().endswith(".gguf") and not data.get("gguf_file"):
            head, _, name = model.rstrip("/").rpartition("/")
            data = {**data, "model": head or ".", "gguf_file": name}
        return data

    @property
    def display_name(self) -> str:
        if self.label:
            return self.label
        name = self.model.rstrip("/").split("/")[-1] or self.model
        if self.gguf_file:
            name = self.gguf_file.rsplit("/", 1)[-1].removesuffix(".gguf")
        if self.quantize:
            name = f"{name}-{self.quantize.name}"
        return name


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
        "and the native CPU kernel does not run (GPUs; CPUs without a C compiler; "
        "LMKL_NATIVE_KERNEL=0); falls back to eager if compilation fails.",
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
