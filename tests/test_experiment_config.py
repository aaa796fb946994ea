"""Experiment configs: schema, overrides, every error at once, shipped examples, CLI."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lmkl.analysis.gates import Gate, evaluate_gates, parse_gate_options
from lmkl.analysis.metrics import numeric_paths as metric_paths
from lmkl.analysis.metrics import resolve as normalize_metric_path
from lmkl.cli import app
from lmkl.errors import ConfigError, UsageError
from lmkl.experiment.schema import (
    ExperimentConfig,
    apply_overrides,
    example_names,
    example_text,
    json_schema,
    load_config,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = sorted((ROOT / "configs").glob("*.yaml"))

MINIMAL = """
name: t
reference: {model: ref}
candidates:
  - {label: a, model: cand-a}
  - {label: b, model: cand-b, dtype: bfloat16}
datasets: [{source: data.jsonl}]
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "exp.yaml"
    path.write_text(text)
    return path


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_every_shipped_config_validates_and_says_how_to_launch_it(path):
    config = load_config(path)
    assert isinstance(config, ExperimentConfig)
    first = path.read_text().splitlines()[0]
    assert first.startswith("# Launch: lmkl run configs/" + path.name), first


def test_configs_dir_mirrors_the_packaged_examples():
    assert CONFIGS, "configs/ holds the shipped examples"
    assert [p.stem for p in CONFIGS] == example_names()
    for path in CONFIGS:
        assert path.read_text() == example_text(path.stem), path.name


def test_required_examples_are_shipped():
    configs = {p.stem: load_config(p) for p in CONFIGS}
    precision = configs["precision"]
    assert {c.dtype for c in precision.candidates} == {"bfloat16", "float16"}
    assert precision.reference.dtype == "float32"
    assert precision.reference.model == "demo:reference"  # runnable offline
    assert len(configs["distillation"].candidates) == 2
    assert all(c.step is not None for c in configs["checkpoints"].candidates)
    assert configs["noise-floor"].noise_floor.enabled


def test_every_error_is_listed_at_once(tmp_path):
    path = write(
        tmp_path,
        """
name: t
reference: {model: ref, dtype: fp8}
candidates:
  - {label: a, model: x, colour: red}
  - {model: y}
datasets: [{source: d.jsonl, max_samples: 0}]
windowing: {mode: sliding, context_length: 64, stride: 64}
compute: {batch_size: many}
ranking: {metric: kl.p99}
gates: {fail_above: {kl.mean: 0.1, klmean: 0.2}}
surprise: 1
""",
    )
    with pytest.raises(ConfigError) as info:
        load_config(path, ["compute.memory_budget_mb=1", "nonsense"])
    problems = info.value.problems
    wanted = [
        "reference.dtype:",
        "candidates.0.colour: unknown key",
        "candidates.1.label: required",
        "datasets.0.max_samples:",
        "windowing.mode:",
        "compute.batch_size:",
        "compute.memory_budget_mb:",
        "ranking.metric:",
        "gates.fail_above: unknown metric 'klmean'",
        "surprise: unknown key",
        "nonsense: an override must look like",
    ]
    for want in wanted:
        assert any(p.startswith(want) for p in problems), (want, problems)
    assert len(problems) == len(wanted)
    assert info.value.exit_code == 2


def test_stride_check_is_reported_with_its_path(tmp_path):
    path = write(tmp_path, MINIMAL + "windowing: {context_length: 64, stride: 64}\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert info.value.problems == [
        "windowing: stride (64) must be at most context_length - 1 "
        "(63) so that every token is scored"
    ]


def test_duplicate_and_reserved_labels(tmp_path):
    text = MINIMAL.replace("label: b", "label: a")
    with pytest.raises(ConfigError, match="1 problem") as info:
        load_config(write(tmp_path, text))
    assert "used twice" in info.value.problems[0]
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, MINIMAL.replace("label: b", "label: noise-floor")))
    assert "reserved" in info.value.problems[0]


def test_yaml_syntax_and_shape_errors(tmp_path):
    with pytest.raises(ConfigError, match="not valid YAML at line 4"):
        load_config(write(tmp_path, "name: t\nreference:\n  model: [unclosed\n"))
    with pytest.raises(ConfigError, match="mapping"):
        load_config(write(tmp_path, "- a\n- b\n"))
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "missing.yaml")


def test_overrides_are_yaml_typed_and_take_precedence(tmp_path):
    path = write(tmp_path, MINIMAL + "seed: 5\ncompute: {batch_size: 2}\n")
    config = load_config(
        path,
        [
            "seed=7",
            "candidates.0.dtype=float16",
            "compute.max_tokens=100",
            "windowing.context_length=128",
            "datasets.0.split=null",
            "noise_floor=true",
            "candidates.2.label=c",
            "candidates.2.model=cand-c",
            "output.dir=runs/x",
        ],
    )
    assert config.seed == 7 and config.compute.seed == 7  # copied unless compute.seed is set
    assert config.candidates[0].dtype == "float16"
    assert config.candidates[1].dtype == "bfloat16"  # YAML kept where not overridden
    assert config.compute.batch_size == 2 and config.compute.max_tokens == 100
    assert config.windowing.context_length == 128 and config.windowing.stride is None
    assert config.noise_floor.enabled and config.noise_floor.relative_std == 1e-3  # default
    assert [c.label for c in config.candidates] == ["a", "b", "c"]
    assert config.output.dir == "runs/x"
    # Dedicated options (settings) beat key=value overrides.
    config = load_config(path, ["output.dir=runs/x"], {"output.dir": "runs/y"})
    assert config.output.dir == "runs/y"


def test_override_problems(tmp_path):
    raw = yaml.safe_load(MINIMAL)
    problems = apply_overrides(
        raw,
        ["candidates.5.dtype=float16", "name.sub=1", "=3", "candidates.x.dtype=float16", "seed=[1"],
    )
    assert [p.split(":")[0] for p in problems] == [
        "candidates.5.dtype",
        "name.sub",
        "=3",
        "candidates.x.dtype",
        "seed",
    ]


def test_gates_accept_dotted_or_nested_keys_and_normalise(tmp_path):
    path = write(
        tmp_path,
        MINIMAL
        + """
gates:
  fail_above: {kl.mean: 0.05, kl: {p99: 2}}
  fail_below: {top1_agreement: 0.9}
""",
    )
    config = load_config(path, ["gates.fail_above.kl.mean=0.04"])
    assert config.gates.fail_above == {"kl.mean": 0.04, "kl.p99": 2.0}
    assert config.gates.fail_below == {"top1_agreement.mean": 0.9}
    merged = config.gates.merged({"kl.mean": 0.01}, {})
    assert merged.fail_above["kl.mean"] == 0.01 and merged.fail_above["kl.p99"] == 2.0


def test_metric_paths_and_gate_evaluation():
    assert "kl.p999" in metric_paths() and "ppl.ratio" in metric_paths()
    assert normalize_metric_path("top1_agreement") == "top1_agreement.mean"
    with pytest.raises(ValueError, match="known under 'kl'"):
        normalize_metric_path("kl.p98")
    assert parse_gate_options(["kl.mean=0.05", "kl.p99=2"], "--fail-above") == {
        "kl.mean": 0.05,
        "kl.p99": 2.0,
    }
    with pytest.raises(UsageError) as info:
        parse_gate_options(["kl.mean", "kl.mean=x", "foo=1"], "--fail-above")
    assert info.value.message.count("--fail-above") == 3
    cands = [
        {"label": "a", "metrics": {"kl": {"mean": 0.1}, "top1_agreement": {"mean": 0.95}}},
        {"label": "b", "metrics": {"kl": {"mean": "inf"}, "top1_agreement": {"mean": None}}},
    ]
    gates = [Gate("kl.mean", "fail_above", 0.2), Gate("top1_agreement.mean", "fail_below", 0.9)]
    failures = evaluate_gates(cands, gates)
    assert [(f.candidate, f.gate.metric) for f in failures] == [
        ("b", "kl.mean"),
        ("b", "top1_agreement.mean"),
    ]  # inf fails, undefined fails


def test_json_schema_export():
    schema = json_schema()
    assert schema["additionalProperties"] is False
    assert {"name", "reference", "candidates", "datasets"} <= set(schema["required"])
    assert "gates" in schema["properties"]
    assert {"type": "boolean"} in schema["properties"]["noise_floor"]["anyOf"]
    assert "mode" in schema["$defs"]["ExperimentWindows"]["properties"]
    result = CliRunner().invoke(app, ["validate", "--schema"])
    assert result.exit_code == 0
    assert json.loads(result.stdout)["title"] == "lmkl experiment"


def test_validate_command(tmp_path):
    runner = CliRunner()
    good = write(tmp_path, MINIMAL)
    result = runner.invoke(app, ["validate", str(good)])
    assert result.exit_code == 0 and "valid" in result.stdout
    bad = tmp_path / "bad.yaml"
    bad.write_text(MINIMAL.replace("dtype: bfloat16", "dtype: bf16") + "extra_key: 1\n")
    result = runner.invoke(app, ["validate", str(bad), "compute.batch_size=0"])
    assert result.exit_code == 2
    for line in (
        "3 problems",
        "candidates.1.dtype:",
        "extra_key: unknown key",
        "compute.batch_size:",
    ):
        assert line in result.stderr, result.stderr
    assert "Traceback" not in result.output


def test_init_copies_examples(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    runner = CliRunner()
    listing = runner.invoke(app, ["init", "--list"])
    assert listing.exit_code == 0
    assert all(name in listing.stdout for name in example_names())
    result = runner.invoke(app, ["init", "distillation"])
    assert result.exit_code == 0
    assert (tmp_path / "distillation.yaml").read_text() == example_text("distillation")
    assert runner.invoke(app, ["init", "distillation"]).exit_code == 1  # no silent overwrite
    assert runner.invoke(app, ["init", "distillation", "--force"]).exit_code == 0
    assert runner.invoke(app, ["init"]).exit_code == 0  # default: the offline precision study
    assert (tmp_path / "precision.yaml").exists()
    result = runner.invoke(app, ["init", "nope"])
    assert result.exit_code == 2 and "precision" in result.stderr
