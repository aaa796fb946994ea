"""Typed options for a comparison: models, data, windows, compute and output (pydantic v2).

The same models back ``lmkl compare`` (built from command-line options) and YAML experiments, so
a value means the same thing wherever it is set. Every model is strict (``extra="forbid"``): an
unknown key is an error, never silently ignored.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from lmkl.errors import UsageError

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
    recipe: str | None = Field(
        None,
        description="A mixed-precision recipe file (recipe.yaml, as `lmkl attribute --budget-bits` "
        "writes it): its LOW model with the listed modules taken from its HIGH model. model, "
        "gguf_file and quantize then come from the recipe's LOW model; dtype, device and the "
        "trust settings from this spec.",
    )

    @model_validator(mode="before")
    @classmethod
    def _expand_recipe(cls, data: Any) -> Any:
        # recipe: FILE without a model: the model fields are LOW's (the tokenizer, config and
        # weights identity are LOW's; loading then mixes in HIGH's modules).
        if not isinstance(data, dict) or not data.get("recipe") or data.get("model"):
            return data
        low = read_recipe(data["recipe"]).low
        fields = ("model", "revision", "gguf_file", "quantize", "adapter", "adapter_revision")
        taken = {k: getattr(low, k) for k in (*fields, "dtype", "device") if data.get(k) is None}
        if taken.get("quantize") is not None:
            taken["quantize"] = taken["quantize"].model_dump()
        return {**data, **taken}

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
        if self.recipe:
            return f"recipe:{Path(self.recipe).stem}"
        name = self.model.rstrip("/").split("/")[-1] or self.model
        if self.gguf_file:
            name = self.gguf_file.rsplit("/", 1)[-1].removesuffix(".gguf")
        if self.quantize:
            name = f"{name}-{self.quantize.name}"
        return name


#: Settings a recipe's models take from the run, never from the recipe file: where and in
#: which dtype to load, and whether to run shipped code or unpickle (a file must not switch
#: those on).
RUN_SETTINGS = (
    "dtype",
    "device",
    "device_map",
    "trust_remote_code",
    "allow_pickle",
    "attn_implementation",
)

#: ModelSpec fields that belong to the candidate alone (the reference is never adapted or
#: quantized: it is the full-precision P; a recipe's HIGH named beside a candidate takes none).
CANDIDATE_ONLY = ("adapter", "adapter_revision", "quantize", "gguf_file")


def _given(flag: str, entry: str) -> str:
    """How the value was given: ``--quantize 'x'`` on the command line, ``quantize='x'`` (a
    keyword) from Python."""
    return f"{flag} '{entry}'" if flag.startswith("-") else f"{flag}={entry!r}"


def is_quantize_entry(entry: str) -> bool:
    """Whether ``entry`` reads as METHOD:SCHEME[:gGROUP] (a known method before the colon)
    rather than a model's path or hub id."""
    return ":" in entry and entry.split(":")[0] in QUANT_SCHEMES


def parse_quantize(entry: str, flag: str = "--quantize") -> QuantizeSpec:
    """``torchao:int8_weight_only`` or ``torchao:int4_weight_only:g32`` as a QuantizeSpec;
    errors name ``flag``, the option (``--high``) or keyword (``high``) the value came from."""
    parts = entry.split(":")
    given = _given(flag, entry)
    if len(parts) not in (2, 3) or not all(parts):
        raise UsageError(
            f"{given} is not METHOD:SCHEME[:gGROUP]",
            f"e.g. {_given(flag, 'torchao:int8_weight_only')} or "
            f"{_given(flag, 'torchao:int4_weight_only:g32')}",
        )
    group = None
    if len(parts) == 3:
        digits = parts[2].removeprefix("g")
        if not digits.isdigit():
            raise UsageError(
                f"{given}: group '{parts[2]}' is not a number",
                "write the group size as g32, g64, g128...",
            )
        group = int(digits)
    try:
        return QuantizeSpec(method=parts[0], scheme=parts[1], group_size=group)  # type: ignore[arg-type]
    except ValidationError as exc:
        known = "; ".join(f"{m}: {', '.join(s)}" for m, s in QUANT_SCHEMES.items())
        reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise UsageError(f"{given}: {reason}", f"known schemes: {known}") from exc


def high_model_spec(
    high: str | Path | ModelSpec,
    reference: ModelSpec,
    candidate: ModelSpec,
    flag: str = "--high",
) -> ModelSpec:
    """A recipe's HIGH model from what was given: a ModelSpec as it is; METHOD:SCHEME[:gGROUP]
    as the reference quantized while loading; anything else as a model (directory, .gguf file,
    hub id). Named HIGH loads like the candidate (dtype, device, revision, trust settings) but
    takes none of its own fields (adapter, quantization, GGUF file, label). Errors name
    ``flag`` (``--high`` on the command line, ``high`` from Python)."""
    if isinstance(high, ModelSpec):
        return high
    loading = {name: getattr(candidate, name) for name in (*RUN_SETTINGS, "revision")}
    text = str(high)
    if is_quantize_entry(text):
        quantize = parse_quantize(text, flag)
        return ModelSpec(
            **loading
            | {
                "model": reference.model,
                "revision": reference.revision,
                "quantize": quantize,
                "label": quantize.name,
            }
        )
    return ModelSpec(**loading | {"model": text})


class Recipe(StrictModel):
    """A mixed-precision model: LOW with the modules in ``high_modules`` taken from HIGH.

    ``low`` and ``high`` are model specs of the same structure (module names and weight shapes),
    e.g. a 4-bit and an 8-bit quantization of one model or two GGUF files of it; ``reference``
    is the model they were measured against. The numbers below are what the run that chose the
    recipe measured (informational: loading a recipe does not read them).
    """

    reference: ModelSpec | None = Field(None, description="The model P it was measured against.")
    low: ModelSpec = Field(description="The model every module not listed comes from.")
    high: ModelSpec = Field(description="The model the listed modules come from.")
    high_modules: list[str] = Field(
        default_factory=list,
        description="named_modules() names of the modules taken from HIGH "
        "(e.g. model.layers.3.mlp.down_proj).",
    )
    bits_per_weight: float | None = Field(None, description="Stored bits per weight, mixed.")
    predicted_kl: float | None = Field(None, description="KL predicted from the attribution.")
    measured_kl: float | None = Field(None, description="Mean KL(P‖mixed) measured, nats.")
    uniform_low_kl: float | None = Field(None, description="Mean KL(P‖LOW), nats.")
    uniform_high_kl: float | None = Field(None, description="Mean KL(P‖HIGH), nats.")
    tensor_type_args: list[str] | None = Field(
        None, description="llama-quantize --tensor-type arguments (GGUF LOW and HIGH)."
    )

    @model_validator(mode="after")
    def _plain_parts(self) -> Recipe:
        if any(part.recipe for part in (self.low, self.high)):
            raise ValueError("low and high must be models, not recipes")
        return self

    def part_spec(self, part: ModelSpec, run: ModelSpec) -> ModelSpec:
        """``part`` (``self.low`` or ``self.high``) loaded with ``run``'s settings."""
        update = {k: getattr(run, k) for k in RUN_SETTINGS}
        label = f"{run.display_name}:{'high' if part is self.high else 'low'}"
        return part.model_copy(update={**update, "label": label, "recipe": None})


def _beside(raw: Any, directory: Path) -> None:
    """A relative model path that is not found from the working directory but is found beside
    the recipe means that directory (a recipe and its models travel together)."""
    for key in ("reference", "low", "high"):
        part = raw.get(key)
        model = part.get("model") if isinstance(part, dict) else None
        relative = isinstance(model, str) and model and not Path(model).is_absolute()
        if relative and not Path(model).exists() and (directory / model).exists():
            part["model"] = str(directory / model)


def read_recipe(path: str | Path) -> Recipe:
    """Read a recipe file (YAML); a missing, unreadable or invalid file is one line (exit 2)."""
    import yaml

    path = Path(path).expanduser()
    fix = "pass a recipe.yaml as lmkl attribute --budget-bits writes it (low, high, high_modules)"
    try:
        raw = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError(f"recipe file '{path}' not found", fix) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"cannot read recipe file '{path}': {exc}", fix) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1})" if mark is not None else ""
        raise UsageError(f"recipe file '{path}' is not valid YAML{where}", fix) from None
    if not isinstance(raw, dict):
        raise UsageError(f"recipe file '{path}' is not a mapping (low:, high:, ...)", fix)
    nested = [k for k in ("low", "high") if isinstance(raw.get(k), dict) and "recipe" in raw[k]]
    if nested:  # checked before validation: a recipe naming itself would recurse
        raise UsageError(f"recipe file '{path}': {nested[0]}: must be a model, not a recipe", fix)
    _beside(raw, path.parent)
    try:
        return Recipe.model_validate(raw)
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "recipe"
        message = error["msg"].removeprefix("Value error, ")
        raise UsageError(f"recipe file '{path}': {where}: {message}", fix) from None


def write_recipe(path: str | Path, recipe: Recipe) -> Path:
    """Write ``recipe`` as YAML (defaults left out, so the file says only what was chosen)."""
    import yaml

    path = Path(path)
    data = recipe.model_dump(mode="json", exclude_none=True, exclude_defaults=True)
    data["high_modules"] = list(recipe.high_modules)  # always present, even when empty
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


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
