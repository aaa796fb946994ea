"""YAML experiments: one reference, many candidates, several datasets, one config file.

A config (see ``configs/`` and README, "YAML experiments") is loaded with PyYAML's ``safe_load``,
then dotted ``key.path=value`` overrides from the command line are applied to the raw mapping,
then the result is validated by :class:`ExperimentConfig`. Precedence is therefore
**command line > YAML > defaults**. Override values are parsed as YAML (``seed=3`` is an int,
``compute.max_tokens=null`` is None, ``candidates.0.dtype=float16`` a string); a number in the
path indexes a list (``candidates.1.label=small``; the index one past the end appends an item).

Every problem (YAML syntax, bad override, unknown key, wrong type, bad value) is collected and
raised together as one :class:`lmkl.errors.ConfigError` with ``path.to.field: message`` lines
(exit code 2). :func:`json_schema` exports the schema (``lmkl validate --schema``).

Usage::

    from lmkl.experiment.schema import load_config
    config = load_config("configs/precision.yaml", ["compute.batch_size=4"])
"""

from __future__ import annotations

import difflib
import functools
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import AliasChoices, Field, ValidationError, field_validator, model_validator

from lmkl.analysis.metrics import rank_metrics
from lmkl.errors import ConfigError
from lmkl.specs import (
    ComputeSpec,
    DataSpec,
    ModelSpec,
    OutputSpec,
    StrictModel,
    Windowing,
    WindowSpec,
)

#: Label of the noise-floor row (the reference scored against a perturbed copy of itself).
NOISE_FLOOR_LABEL = "noise-floor"

#: Metrics a leaderboard can rank by (the registry's metrics with a per-token column): each is
#: a per-token mean, so a bootstrap over documents can resample it as a ratio of per-document
#: sums and counts. ``ln_ppl_ratio.mean`` uses nll_candidate − nll_reference per token.
RankMetric = Literal[tuple(rank_metrics())]  # type: ignore[valid-type]
SizeKey = Literal["parameters", "disk_bytes", "memory_bytes", "weight_bytes", "bits_per_weight"]


class CandidateSpec(ModelSpec):
    """A candidate model: a :class:`~lmkl.specs.ModelSpec` whose ``label`` is required."""

    label: str = Field(min_length=1, description="Unique name in tables, rankings and gates.")

    @model_validator(mode="before")
    @classmethod
    def _recipe_label(cls, data: Any) -> Any:
        # recipe: FILE alone names itself recipe:<file stem>, as on the command line.
        if isinstance(data, dict) and data.get("recipe") and not data.get("label"):
            data = {**data, "label": f"recipe:{Path(str(data['recipe'])).stem}"}
        return data


class ExperimentWindows(WindowSpec):
    """:class:`~lmkl.specs.WindowSpec` where the protocol is spelled ``mode`` in YAML."""

    windowing: Windowing = Field(
        "documents",
        validation_alias=AliasChoices("mode", "windowing"),
        description="documents: each document on its own, sliding windows when long; "
        "llama-cpp: llama-perplexity's chunks, second half of each chunk scored.",
    )


class ExperimentOutput(OutputSpec):
    """Where the run directory goes and what it keeps."""

    save_tokens: bool = Field(
        True,
        description="Keep each dataset's tokens.parquet (per-token rows, for reports). false "
        "deletes them once the ranking is computed, to save disk on big runs.",
    )


class RankingSpec(StrictModel):
    """How candidates are ranked and how sure the ranking is."""

    metric: RankMetric = Field(
        "kl.mean",
        description="Per-token mean to rank by (lower is better except top1_* and delta_p).",
    )
    average: Literal["micro", "macro"] = Field(
        "micro",
        description="Over several datasets: micro pools all tokens; macro averages the "
        "datasets' means with their weights.",
    )
    resamples: int = Field(
        1000,
        ge=50,
        le=100_000,
        description="Bootstrap resamples (documents drawn with replacement).",
    )
    confidence: float = Field(0.95, gt=0.5, lt=1.0, description="Confidence level of the CIs.")
    size: SizeKey = Field(
        "parameters",
        description="Size used for the Pareto set: parameters, disk_bytes (weight "
        "files), memory_bytes (parameters × bytes per parameter of the loaded dtype; real "
        "bytes as loaded for a quantized model), weight_bytes (real bytes of the weights as a "
        "saved or served model stores them: quantized values at their bit width, scales, zero "
        "points; GGUF: the file's tensors) or bits_per_weight (8 × weight_bytes / weights; the "
        "axis of a quantization study).",
    )


class GateSpec(StrictModel):
    """Quality gates: ``{metric path: limit}``; nested YAML maps are flattened to dotted paths."""

    fail_above: dict[str, float] = Field(
        default_factory=dict, description="Maxima, e.g. {kl.mean: 0.05, kl.p99: 2.0}."
    )
    fail_below: dict[str, float] = Field(
        default_factory=dict, description="Minima, e.g. {top1_agreement: 0.9}."
    )

    @field_validator("fail_above", "fail_below", mode="before")
    @classmethod
    def _flatten(cls, value: Any) -> Any:
        if not isinstance(value, Mapping):
            return value
        flat: dict[str, Any] = {}

        def walk(prefix: str, sub: Any) -> None:
            if isinstance(sub, Mapping):
                for key, item in sub.items():
                    walk(f"{prefix}.{key}" if prefix else str(key), item)
            else:
                flat[prefix] = sub

        walk("", value)
        return flat

    @field_validator("fail_above", "fail_below")
    @classmethod
    def _known_metrics(cls, value: dict[str, float]) -> dict[str, float]:
        from lmkl.analysis.metrics import resolve as normalize_metric_path

        out, problems = {}, []
        for path, limit in value.items():
            try:
                out[normalize_metric_path(path)] = limit
            except ValueError as exc:
                problems.append(str(exc))
        if problems:
            raise ValueError("; ".join(problems))
        return out

    def merged(self, fail_above: Mapping[str, float], fail_below: Mapping[str, float]) -> GateSpec:
        """These gates with command-line ones added (the command line wins per metric)."""
        return GateSpec(
            fail_above={**self.fail_above, **fail_above},
            fail_below={**self.fail_below, **fail_below},
        )

    def gates(self) -> list[Any]:
        from lmkl.analysis.gates import gates_from_mapping

        return gates_from_mapping(self.fail_above, self.fail_below)


class NoiseFloorSpec(StrictModel):
    """The reference against a copy of itself with seeded, tiny multiplicative weight noise.

    Every floating-point parameter ``w`` of the copy becomes ``w · (1 + relative_std · z)``
    with ``z ~ N(0, 1)`` drawn (in float32, parameter by parameter in ``named_parameters``
    order) from ``torch.Generator().manual_seed(seed)``. KL values of candidates that are not
    clearly above this row are indistinguishable from numerical noise of that size. ``true`` in
    YAML is short for ``{enabled: true}``.
    """

    enabled: bool = Field(False, description="Add the noise-floor row.")
    relative_std: float = Field(
        1e-3,
        gt=0,
        le=0.1,
        description="Relative size of the weight noise (1e-3 ≈ float16/bfloat16 rounding).",
    )

    @model_validator(mode="before")
    @classmethod
    def _from_bool(cls, value: Any) -> Any:
        return {"enabled": value} if isinstance(value, bool) else value


class ExperimentConfig(StrictModel):
    """A whole comparison study: ``lmkl run CONFIG.yaml``."""

    name: str = Field(min_length=1, description="Names the run directory and the report.")
    description: str | None = Field(None, description="Free text shown in results.json.")
    seed: int = Field(
        0,
        description="Seed for the bootstrap, the noise floor and torch "
        "(copied to compute.seed unless that is set).",
    )
    reference: ModelSpec = Field(
        description="The reference model P (teacher, full precision, final checkpoint)."
    )
    candidates: list[CandidateSpec] = Field(
        min_length=1,
        description="Candidate models Q, each with a unique label; optional "
        "group, params and step metadata.",
    )
    datasets: list[DataSpec] = Field(
        min_length=1,
        description="Text sources; each gets its own sub-run, then micro and macro averages.",
    )
    windowing: ExperimentWindows = Field(default_factory=ExperimentWindows)
    compute: ComputeSpec = Field(default_factory=ComputeSpec)
    output: ExperimentOutput = Field(default_factory=ExperimentOutput)
    ranking: RankingSpec = Field(default_factory=RankingSpec)
    gates: GateSpec = Field(default_factory=GateSpec)
    noise_floor: NoiseFloorSpec = Field(default_factory=NoiseFloorSpec)

    @field_validator("candidates")
    @classmethod
    def _unique_labels(cls, value: list[CandidateSpec]) -> list[CandidateSpec]:
        seen: set[str] = set()
        for cand in value:
            if cand.label == NOISE_FLOOR_LABEL:
                raise ValueError(f"label '{NOISE_FLOOR_LABEL}' is reserved for the noise floor")
            if cand.label in seen:
                raise ValueError(f"label '{cand.label}' is used twice; labels must be unique")
            seen.add(cand.label)
        return value

    @field_validator("datasets")
    @classmethod
    def _unique_datasets(cls, value: list[DataSpec]) -> list[DataSpec]:
        names = [dataset_dir_name(d) for d in value]
        for name in names:
            if names.count(name) > 1:
                raise ValueError(f"two datasets are both named '{name}'; give them distinct labels")
        return value

    @model_validator(mode="before")
    @classmethod
    def _reference_cache(cls, data: Any) -> Any:
        """``reference: {cache: DIR}`` names a reference cache (``lmkl cache``) as the reference.

        It is a :class:`ModelSpec` whose ``model`` is the cache directory; the runner recognises
        the cache by its manifest and uses its stored hidden states instead of a live model.
        """
        if isinstance(data, dict) and isinstance(data.get("reference"), dict):
            reference = dict(data["reference"])
            if "cache" in reference:
                if "model" in reference:
                    raise ValueError("reference: give either 'model' or 'cache', not both")
                reference["model"] = reference.pop("cache")
                data = {**data, "reference": reference}
        return data

    @model_validator(mode="after")
    def _copy_seed(self) -> ExperimentConfig:
        if "seed" not in self.compute.model_fields_set and self.compute.seed != self.seed:
            self.compute = self.compute.model_copy(update={"seed": self.seed})
        return self

    def windows(self) -> WindowSpec:
        """The plain :class:`~lmkl.specs.WindowSpec` for the runner."""
        return WindowSpec(**self.windowing.model_dump())


def dataset_dir_name(spec: DataSpec) -> str:
    """The sub-run directory name of a dataset: its label, made filesystem-safe."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", spec.display_name).strip("-.")
    return name or "dataset"


# --------------------------------------------------------------------------------------------
# Loading, overrides, errors
# --------------------------------------------------------------------------------------------

_MISSING = object()


def read_yaml(path: Path) -> dict[str, Any]:
    """The raw mapping of a YAML config (safe_load); :class:`ConfigError` if unreadable."""
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(
            f"config file '{path}' does not exist", "check the path, or create one with `lmkl init`"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(
            f"cannot read config file '{path}': {exc}", "check the file and its permissions"
        ) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(
            f"'{path}' is not valid YAML{where}: {problem}",
            "fix the YAML syntax (indentation, colons, quotes)",
        ) from None
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"'{path}' must hold a mapping of keys (name, reference, candidates, "
            f"...), not a {type(raw).__name__}",
            "see `lmkl init --list`",
        )
    return raw


def apply_overrides(raw: dict[str, Any], overrides: Iterable[str]) -> list[str]:
    """Apply ``key.path=value`` overrides to ``raw`` in place; return the problems found.

    A key that exists literally with dots in it (``gates.fail_above.kl.mean`` where the YAML
    says ``kl.mean: 0.05``) is matched before the path is split further.
    """
    problems = []
    for override in overrides:
        path, sep, text = override.partition("=")
        path = path.strip()
        if not sep or not path:
            problems.append(f"{override}: an override must look like key.path=value")
            continue
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError:
            problems.append(f"{path}: cannot parse value {text!r} as YAML (quote it)")
            continue
        problem = _set_path(raw, path.split("."), value)
        if problem:
            problems.append(f"{path}: {problem}")
    return problems


def _set_path(node: Any, parts: list[str], value: Any) -> str | None:
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, dict):
            rest = ".".join(parts[i:])
            if rest in node and not last:
                node[rest] = value
                return None
            if last:
                node[part] = value
                return None
            nxt = node.get(part, _MISSING)
            if nxt is _MISSING or nxt is None:
                nxt = [] if parts[i + 1].isdigit() else {}
                node[part] = nxt
            node = nxt
        elif isinstance(node, list):
            if not part.isdigit():
                return f"'{part}' is not a list index (use 0, 1, ...)"
            index = int(part)
            if index > len(node):
                return f"index {index} is past the end of a list of {len(node)} items"
            if index == len(node):
                node.append({} if not last else value)
                if last:
                    return None
            if last:
                node[index] = value
                return None
            node = node[index]
        else:
            where = ".".join(parts[:i])
            return f"'{where}' is a {type(node).__name__}, not a mapping or list"
    return None


@functools.cache
def _schema_keys() -> tuple[str, ...]:
    """Every key the experiment schema knows, at any depth (for "did you mean")."""
    keys: set[str] = set()

    def walk(node: Any) -> None:
        if isinstance(node, dict):
            keys.update(node.get("properties", {}))
            for value in node.values():
                walk(value)
        elif isinstance(node, list):
            for value in node:
                walk(value)

    walk(ExperimentConfig.model_json_schema())
    return tuple(sorted(keys))


def format_validation_error(exc: ValidationError) -> list[str]:
    """``path.to.field: message`` lines, one per pydantic error."""
    lines = []
    for err in exc.errors(include_url=False):
        loc = ".".join(str(p) for p in err["loc"] if p not in ("function-after",)) or "(top)"
        kind, msg = err["type"], err["msg"]
        if kind == "extra_forbidden":
            msg = "unknown key (not allowed here)"
            close = difflib.get_close_matches(str(err["loc"][-1]), _schema_keys(), n=1)
            if close:
                msg += f"; did you mean '{close[0]}'?"
        elif kind == "missing":
            msg = "required but missing"
        else:
            msg = msg.removeprefix("Value error, ")
            given = err.get("input")
            if isinstance(given, str | int | float | bool) and kind not in ("value_error",):
                msg += f" (got {given!r})"
        lines.append(f"{loc}: {msg}")
    return lines


def _model_values(raw: Mapping[str, Any]) -> Iterable[tuple[str, str, str]]:
    """``(where, value, kind)`` of every model and data source named in a raw config."""
    reference = raw.get("reference")
    if isinstance(reference, dict):
        value = reference.get("model", reference.get("cache"))
        if isinstance(value, str):
            yield "reference.model", value, "model"
    for key, field, kind in (("candidates", "model", "model"), ("datasets", "source", "data")):
        items = raw.get(key)
        for i, item in enumerate(items if isinstance(items, list) else []):
            if isinstance(item, dict) and isinstance(item.get(field), str):
                yield f"{key}.{i}.{field}", item[field], kind


def raw_problems(raw: Mapping[str, Any], check_paths: bool = False) -> list[str]:
    """Problems found in the raw mapping, so that they are reported together with the schema's
    (pydantic skips a list's validator when one item is invalid): duplicate candidate labels,
    unknown ``demo:`` names and, with ``check_paths``, model paths that do not exist."""
    problems = []
    items = raw.get("candidates")
    labels = (
        [c.get("label") for c in items if isinstance(c, dict)] if isinstance(items, list) else []
    )
    for label in dict.fromkeys(x for x in labels if isinstance(x, str) and labels.count(x) > 1):
        problems.append(f"candidates: label '{label}' is used twice; labels must be unique")
    for where, value, kind in _model_values(raw):
        if value.startswith("demo:"):
            from lmkl.demo.names import DEMO_NAMES, DEMO_SCHEME

            if value[len(DEMO_SCHEME) :] not in DEMO_NAMES:
                known = ", ".join(f"{DEMO_SCHEME}{n}" for n in DEMO_NAMES)
                problems.append(f"{where}: unknown demo name '{value}' (use {known})")
        elif check_paths and kind == "model" and not Path(value).expanduser().exists():
            from lmkl.models.sources import looks_like_path

            if looks_like_path(value):
                problems.append(
                    f"{where}: model directory '{value}' does not exist "
                    "(check the path; a hub id looks like org/name)"
                )
    return problems


def validate_config(
    raw: Mapping[str, Any],
    source: str = "config",
    problems: Sequence[str] = (),
    check_paths: bool = False,
) -> ExperimentConfig:
    """Validate a raw mapping; raise one :class:`ConfigError` listing ``problems``, all schema
    errors and the :func:`raw_problems` (model paths too with ``check_paths``)."""
    found = list(problems)
    config = None
    try:
        config = ExperimentConfig.model_validate(raw)
    except ValidationError as exc:
        found.extend(format_validation_error(exc))
    found.extend(raw_problems(raw, check_paths))
    found = list(dict.fromkeys(found))  # a duplicate label found by both checks, once
    if found or config is None:
        count = f"{len(found)} problem{'s' if len(found) != 1 else ''}"
        raise ConfigError(
            f"{source}: {count}",
            "fix the lines above (lmkl validate --schema prints the schema)",
            problems=found,
        )
    return config


def load_config(
    path: str | Path,
    overrides: Iterable[str] = (),
    settings: Mapping[str, Any] | None = None,
    check_paths: bool = False,
) -> ExperimentConfig:
    """Read ``path``, apply ``overrides`` (command line > YAML > defaults) and validate.

    ``settings`` maps dotted paths to already-typed values (from command-line options such as
    ``--out``); they are applied after ``overrides``, so the dedicated options win.
    ``check_paths``: also report model paths that do not exist, among the other problems.
    """
    raw = read_yaml(Path(path))
    problems = apply_overrides(raw, overrides)
    for key, value in (settings or {}).items():
        problem = _set_path(raw, key.split("."), value)
        if problem:
            problems.append(f"{key}: {problem}")
    _sources_beside(raw, Path(path).parent)
    return validate_config(raw, str(path), problems, check_paths)


def _sources_beside(raw: dict[str, Any], config_dir: Path) -> None:
    """A relative data path or recipe file that is not found from the working directory but is
    found beside the config means that file (a config and its files travel together)."""
    datasets = raw.get("datasets")
    candidates = raw.get("candidates")
    entries = [(e, "source") for e in (datasets if isinstance(datasets, list) else [])]
    entries += [(e, "recipe") for e in (candidates if isinstance(candidates, list) else [])]
    for entry, key in entries:
        source = entry.get(key) if isinstance(entry, dict) else None
        if not isinstance(source, str) or Path(source).is_absolute() or Path(source).exists():
            continue
        beside = config_dir / source
        if beside.exists():
            entry[key] = str(beside)


def json_schema() -> dict[str, Any]:
    """The JSON Schema of an experiment config (draft 2020-12, as pydantic writes it)."""
    schema = ExperimentConfig.model_json_schema()
    # ``noise_floor: true`` is accepted as short for ``{enabled: true}`` (see NoiseFloorSpec).
    floor = schema["properties"]["noise_floor"]
    schema["properties"]["noise_floor"] = {"anyOf": [{"type": "boolean"}, floor]}
    # A candidate is a model with a label, or a recipe file (which names its model and label).
    candidate = schema["$defs"]["CandidateSpec"]
    required = [k for k in candidate.pop("required", []) if k not in ("model", "label")]
    candidate["anyOf"] = [{"required": ["model", "label"]}, {"required": ["recipe"]}]
    if required:
        candidate["required"] = required
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "lmkl experiment"
    return schema


# --------------------------------------------------------------------------------------------
# Shipped examples (package data, mirrored in the repository's configs/)
# --------------------------------------------------------------------------------------------


def example_names() -> list[str]:
    """Names of the example configs shipped in ``lmkl/examples`` (``lmkl init --list``)."""
    from importlib import resources

    root = resources.files("lmkl.experiment") / "examples"
    return sorted(p.name.removesuffix(".yaml") for p in root.iterdir() if p.name.endswith(".yaml"))


def example_text(name: str) -> str:
    """The text of the shipped example ``name``; :class:`ConfigError` listing names if unknown."""
    from importlib import resources

    names = example_names()
    if name.removesuffix(".yaml") not in names:
        raise ConfigError(f"no example named '{name}'", f"choose one of: {', '.join(names)}")
    path = resources.files("lmkl.experiment") / "examples" / f"{name.removesuffix('.yaml')}.yaml"
    return path.read_text(encoding="utf-8")


def example_data_files(name: str) -> dict[str, str]:
    """Data files shipped beside example ``name`` that it reads (file name → text)."""
    from importlib import resources

    root = resources.files("lmkl.experiment") / "examples"
    raw = yaml.safe_load(example_text(name)) or {}
    out = {}
    for entry in raw.get("datasets") or []:
        source = str(entry.get("source", "")) if isinstance(entry, dict) else ""
        if source and "/" not in source and (root / source).is_file():
            out[source] = (root / source).read_text(encoding="utf-8")
    return out


def example_summary(text: str) -> str:
    """The first sentence of an example's descriptive comment (after its launch command), which
    may run over several comment lines."""
    words: list[str] = []
    for line in text.splitlines():
        stripped = line.lstrip("# ").strip()
        if not line.startswith("#") or (words and not stripped):
            break
        if not stripped or (not words and stripped.startswith(("lmkl ", "Launch"))):
            continue
        words.append(stripped)
        if stripped.endswith((".", "?", "!")):
            break
    summary = " ".join(words)
    ends = [i for i in (summary.find(". "), summary.find("? ")) if i >= 0]
    return summary[: min(ends) + 1] if ends else summary
