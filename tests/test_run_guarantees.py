"""Run-directory guarantees: --overwrite deletes only lmkl's own runs, validation comes before any
deletion, and --resume checks what a run was computed from on every path.

Everything is driven through the CLI (in-process with ``runtools.invoke``, or ``python -m lmkl``
subprocesses through ``runtools.kill_at``) and through files on disk, so these tests do not
depend on where lmkl's modules live.

Intended behaviour checked here:

1. lmkl writes a JSON marker ``.lmkl-run`` into every run directory it creates. ``--overwrite``
   (or ``output.overwrite: true``) replaces a directory only when it carries the marker and holds
   nothing but files lmkl writes; anything else is refused (exit 1, one ``error:`` line and a
   ``fix:`` line) and left untouched.
2. With ``--overwrite``, inputs are validated before the old run is deleted: a bad input leaves
   the finished run byte-identical.
3. ``--resume`` refuses parts computed from other inputs: a candidate whose weights changed
   (against a reference cache, or in an experiment with a finished dataset sub-run), and parts
   whose recorded identity is missing.
4. ``lmkl run --resume`` on a root whose config.yaml is empty or not a mapping gives a one-line
   error, not an internal error.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from runtools import check_error, compare_args, invoke, kill_at

from lmkl.errors import EXIT_RUNTIME, EXIT_USAGE

MARKER = ".lmkl-run"
KINDS = ["compare", "cached", "bytes", "sample-kl", "run"]


# --- helpers --------------------------------------------------------------------------------


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Every file (content) and directory (None) under ``root``, by relative path."""
    assert root.is_dir(), f"{root} is gone"
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


def write_docs(path: Path, texts: list[str]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def foreign_project(path: Path) -> Path:
    """A user's project folder that merely happens to hold files with lmkl-like names."""
    (path / "src").mkdir(parents=True)
    (path / "config.yaml").write_text("project: my-thesis\nlearning_rate: 0.001\n")
    (path / "results.json").write_text('{"accuracy": 0.93}\n')
    (path / "src" / "x.py").write_text("print('months of work')\n")
    return path


def experiment_yaml(
    path: Path,
    tiny_pair: dict[str, Path],
    datasets: dict[str, Path],
    *,
    candidate: Path | None = None,
    output: dict | None = None,
) -> Path:
    lines = [
        "name: guarantees",
        f"reference: {{model: {tiny_pair['reference']}, device: cpu}}",
        f"candidates: [{{label: cand, model: {candidate or tiny_pair['candidate']}, device: cpu}}]",
        "datasets:",
        *(f"  - {{source: {src}, label: {label}}}" for label, src in datasets.items()),
        "windowing: {mode: documents, context_length: 64, stride: 32}",
        "compute: {batch_size: 4}",
        "ranking: {resamples: 50}",
    ]
    if output:
        lines.append("output: " + json.dumps(output))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def env(tiny_pair, other_tokenizer_model, tmp_path_factory) -> dict[str, Path]:
    """Small data, a reference cache, a broken candidate and one finished run of every kind."""
    root = tmp_path_factory.mktemp("guarantees")
    texts = [json.loads(x)["text"] for x in tiny_pair["heldout"].read_text().splitlines()]
    data = write_docs(root / "docs.jsonl", [t[:500] for t in texts[:2]])
    data_b = write_docs(root / "b.jsonl", [t[:300] for t in texts[2:4]])
    prompts = write_docs(root / "prompts.jsonl", ["The assert statement", "A list is"])
    no_weights = root / "no-weights"
    shutil.copytree(tiny_pair["candidate"], no_weights)
    (no_weights / "model.safetensors").unlink()
    cache = root / "cache"
    code, out = invoke(
        [
            "cache",
            str(tiny_pair["reference"]),
            "--data",
            str(data),
            "-c",
            "64",
            "--stride",
            "32",
            "--out",
            str(cache),
            "--quiet",
        ]
    )
    assert code == 0, out
    env = {
        "root": root,
        "data": data,
        "data_b": data_b,
        "prompts": prompts,
        "cache": cache,
        "no_weights": no_weights,
        "other": other_tokenizer_model,
        "config": experiment_yaml(root / "exp.yaml", tiny_pair, {"a": data}),
    }
    for kind in KINDS:
        run = root / "finished" / kind
        code, out = invoke(kind_args(kind, tiny_pair, env, run))
        assert code == 0, f"{kind}: {out}"
        assert (run / "results.json").exists()
        env[f"finished-{kind}"] = run
    return env


def kind_args(
    kind: str,
    tiny_pair: dict[str, Path],
    env: dict[str, Path],
    out: Path,
    *,
    data: Path | None = None,
    candidate: Path | None = None,
) -> list[str]:
    """The command line of a small run of ``kind`` writing to ``out``."""
    reference = str(tiny_pair["reference"])
    if kind == "compare":
        cand = candidate or tiny_pair["candidate"]
        return [
            "compare", reference, str(cand), "--data", str(data or env["data"]),
            "-c", "64", "--max-tokens", "60", "--no-compile", "--out", str(out), "-q",
        ]  # fmt: skip
    if kind == "cached":
        cand = candidate or tiny_pair["candidate"]
        extra = ["--data", str(data)] if data is not None else []
        return ["compare", str(env["cache"]), str(cand), *extra, "--no-compile", "--out",
                str(out), "-q"]  # fmt: skip
    if kind == "bytes":
        cand = candidate or env["other"]
        return [
            "compare", reference, str(cand), "--data", str(data or env["data"]),
            "--different-tokenizers", "-c", "64", "--max-samples", "2", "--out", str(out), "-q",
        ]  # fmt: skip
    if kind == "sample-kl":
        cand = candidate or tiny_pair["candidate"]
        return [
            "sample-kl", reference, str(cand), "--prompts", str(data or env["prompts"]),
            "-n", "2", "--max-new-tokens", "4", "--out", str(out), "-q",
        ]  # fmt: skip
    if kind == "run":
        if data is None and candidate is None:
            config = env["config"]
        else:
            config = experiment_yaml(
                out.parent / f"{out.name}-exp.yaml",
                tiny_pair,
                {"a": data or env["data"]},
                candidate=candidate,
            )
        return ["run", str(config), "--out", str(out), "-q"]
    raise AssertionError(kind)


def copy_finished(env: dict[str, Path], kind: str, dest: Path) -> Path:
    shutil.copytree(env[f"finished-{kind}"], dest)
    return dest


# --- 1. --overwrite deletes only what lmkl wrote ----------------------------------------------


@pytest.mark.parametrize("kind", ["compare", "run", "bytes", "sample-kl"])
def test_overwrite_refuses_a_foreign_project_folder(tiny_pair, env, tmp_path, kind):
    project = foreign_project(tmp_path / "project")
    before = snapshot(project)
    code, out = invoke([*kind_args(kind, tiny_pair, env, project), "--overwrite"])
    check_error(code, out, EXIT_RUNTIME)
    assert snapshot(project) == before, "files of a directory lmkl did not write were changed"


def test_experiment_output_overwrite_in_yaml_refuses_a_foreign_folder(tiny_pair, env, tmp_path):
    project = foreign_project(tmp_path / "project")
    before = snapshot(project)
    config = experiment_yaml(
        tmp_path / "exp.yaml",
        tiny_pair,
        {"a": env["data"]},
        output={"dir": str(project), "overwrite": True},
    )
    code, out = invoke(["run", str(config), "-q"])
    check_error(code, out, EXIT_RUNTIME)
    assert snapshot(project) == before


@pytest.mark.parametrize("kind", KINDS)
def test_overwrite_refuses_a_run_directory_holding_a_user_file(tiny_pair, env, tmp_path, kind):
    run = copy_finished(env, kind, tmp_path / "run")
    (run / "notes.txt").write_text("my notes about this run\n")
    before = snapshot(run)
    code, out = invoke([*kind_args(kind, tiny_pair, env, run), "--overwrite"])
    check_error(code, out, EXIT_RUNTIME)
    assert snapshot(run) == before


@pytest.mark.parametrize("kind", KINDS)
def test_runs_carry_a_marker_and_overwrite_replaces_them(tiny_pair, env, tmp_path, kind):
    run = tmp_path / "run"
    args = kind_args(kind, tiny_pair, env, run)
    code, out = invoke(args)
    assert code == 0, out
    marker = run / MARKER
    assert marker.is_file(), f"no {MARKER} marker in a run directory lmkl wrote"
    json.loads(marker.read_text())  # JSON
    started = json.loads((run / "results.json").read_text())["provenance"]["started"]
    code, out = invoke([*args, "--overwrite"])  # a real previous lmkl run is replaced
    assert code == 0, out
    assert json.loads((run / "results.json").read_text())["provenance"]["started"] != started
    assert (run / MARKER).is_file()


# --- 2. validate before deleting ----------------------------------------------------------------


BAD_INPUTS = ["missing-data", "missing-candidate", "candidate-without-weights"]
#: Cases where the finished run is deleted before the bad input is noticed (the defect).
DELETES_TODAY = [
    *(("bytes", bad) for bad in BAD_INPUTS),
    *(("sample-kl", bad) for bad in BAD_INPUTS),
    # The cache path checks the candidate's tokenizer before creating the run directory, but
    # loads its weights only after deleting the old run.
    ("cached", "candidate-without-weights"),
]
#: Cases that already validate first today (live compare; cache-path data and tokenizer
#: checks): kept as guards so the fix does not regress them.
ALREADY_SAFE = [
    *(("compare", bad) for bad in BAD_INPUTS),
    ("cached", "missing-data"),
    ("cached", "missing-candidate"),
]


@pytest.mark.parametrize(("kind", "bad"), DELETES_TODAY)
def test_bad_input_with_overwrite_leaves_the_finished_run(tiny_pair, env, tmp_path, kind, bad):
    check_bad_input_leaves_run(tiny_pair, env, tmp_path, kind, bad)


@pytest.mark.parametrize(("kind", "bad"), ALREADY_SAFE)
def test_bad_input_with_overwrite_leaves_the_finished_run_guard(
    tiny_pair, env, tmp_path, kind, bad
):
    """Passes on the current code (behaviour already right); a regression guard for the fix."""
    check_bad_input_leaves_run(tiny_pair, env, tmp_path, kind, bad)


def check_bad_input_leaves_run(tiny_pair, env, tmp_path, kind: str, bad: str) -> None:
    run = copy_finished(env, kind, tmp_path / "run")
    before = snapshot(run)
    if bad == "missing-data":
        args = kind_args(kind, tiny_pair, env, run, data=tmp_path / "missing.jsonl")
    elif bad == "missing-candidate":
        args = kind_args(kind, tiny_pair, env, run, candidate=tmp_path / "no-such-model")
    else:
        args = kind_args(kind, tiny_pair, env, run, candidate=env["no_weights"])
    code, out = invoke([*args, "--overwrite"])
    check_error(code, out, (EXIT_RUNTIME, EXIT_USAGE))
    assert (run / "results.json").exists(), "the finished run was deleted before validation"
    assert snapshot(run) == before


# --- 3. resume checks run identity on every path ------------------------------------------------


def test_resume_against_a_cache_refuses_a_candidate_whose_weights_changed(tiny_pair, env, tmp_path):
    candidate = tmp_path / "cand"
    shutil.copytree(tiny_pair["candidate"], candidate)
    run = tmp_path / "run"
    args = ["compare", str(env["cache"]), str(candidate), "--out", str(run), "--batch-size", "2",
            "--no-compile", "--quiet"]  # fmt: skip
    kill_at(args, "part-done:1")
    assert (run / "parts" / "part-000001.parquet").exists()
    assert not (run / "results.json").exists()
    # Same path, same tokenizer, other weights.
    shutil.rmtree(candidate)
    shutil.copytree(tiny_pair["reference"], candidate)
    code, out = invoke([*args, "--resume"])
    check_error(code, out, EXIT_RUNTIME, "changed")
    assert not (run / "results.json").exists()


@pytest.fixture(scope="module")
def killed_live_run(tiny_pair, env) -> tuple[Path, list[str]]:
    """A live compare SIGKILLed after its second part, with parts on disk and no results."""
    run = env["root"] / "killed-live"
    args = compare_args(tiny_pair, env["data"], run)
    kill_at(args, "part-done:1")
    assert (run / "parts" / "part-000001.parquet").exists()
    assert "identity" in json.loads((run / "progress.json").read_text())
    return run, args


@pytest.mark.parametrize("how", ["drop-identity", "delete-progress"])
def test_resume_refuses_parts_without_a_recorded_identity(killed_live_run, tmp_path, how):
    source, args = killed_live_run
    run = tmp_path / "run"
    shutil.copytree(source, run)
    args = [str(run) if a == str(source) else a for a in args]
    progress = run / "progress.json"
    if how == "drop-identity":
        data = json.loads(progress.read_text())
        del data["identity"]
        progress.write_text(json.dumps(data))
    else:
        progress.unlink()
    code, out = invoke([*args, "--resume"])
    check_error(code, out, EXIT_RUNTIME)
    assert not (run / "results.json").exists()


def test_experiment_resume_refuses_a_finished_sub_run_of_changed_weights(tiny_pair, env, tmp_path):
    candidate = tmp_path / "cand"
    shutil.copytree(tiny_pair["candidate"], candidate)
    config = experiment_yaml(
        tmp_path / "exp.yaml",
        tiny_pair,
        {"a": env["data"], "b": env["data_b"]},
        candidate=candidate,
    )
    out = tmp_path / "run"
    code, output = invoke(["run", str(config), "--out", str(out), "-q"])
    assert code == 0, output
    # Partly finished: dataset a done, dataset b and the combined results missing.
    (out / "results.json").unlink()
    shutil.rmtree(out / "datasets" / "b")
    assert (out / "datasets" / "a" / "results.json").exists()
    shutil.rmtree(candidate)
    shutil.copytree(tiny_pair["reference"], candidate)  # same path, other weights
    code, output = invoke(["run", str(config), "--out", str(out), "--resume", "-q"])
    check_error(code, output, EXIT_RUNTIME)
    assert not (out / "results.json").exists()


# --- 4. experiment resume with a damaged root config.yaml --------------------------------------


@pytest.mark.parametrize("content", ["[]\n", "", "just a string\n"])
def test_experiment_resume_with_a_non_mapping_config_is_one_line(env, tmp_path, content):
    out = tmp_path / "run"
    shutil.copytree(env["finished-run"], out)
    (out / "results.json").unlink()
    (out / "config.yaml").write_text(content)
    code, output = invoke(["run", str(env["config"]), "--out", str(out), "--resume", "-q"])
    check_error(code, output, (EXIT_RUNTIME, EXIT_USAGE))
