"""What a new user meets first: quantized models whose logits depend on the batch, file
permissions, refusals that come early and say the right thing, and names that match.

Each test failed before its fix (issue 21, items 1, 2, 4 and 10).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import torch
from runtools import check_error, fake_demo_cache, invoke

import lmkl.api
from lmkl.models import head_split


def _compare(models: list[Path], data: Path, out: Path, *extra: str) -> tuple[int, str]:
    """``lmkl compare`` on ``models`` (reference first) at context 64, in-process."""
    args = ["compare", *map(str, models), "--data", str(data), "--out", str(out)]
    return invoke([*args, "--context-length", "64", *extra])


def _compare_logged(tiny_pair: dict[str, Path], data: Path, out: Path) -> tuple[Any, list[str]]:
    """``lmkl.compare`` of the tiny pair at context 64, with the lines it logs."""
    lines: list[str] = []
    run = lmkl.api.compare(
        str(tiny_pair["reference"]),
        [str(tiny_pair["candidate"])],
        data=str(data),
        out=out,
        context_length=64,
        log=lines.append,
    )
    return run, lines


def _hooked_make_head(monkeypatch: pytest.MonkeyPatch, target: Path, hook) -> None:
    """Make ``target``'s final hidden states pass through ``hook`` (both the split and the
    full forward go through the final norm, so the split check stays exact)."""
    real = head_split.make_head

    def make_head(model):
        if Path(model.name_or_path).resolve() == target.resolve():
            model.model.norm.register_forward_hook(lambda _m, _i, out: hook(out))
        return real(model)

    monkeypatch.setattr(head_split, "make_head", make_head)


def _batch_coupled(out: torch.Tensor) -> torch.Tensor:
    # Every token's output moves with the mean over all tokens of the forward, all rows alike:
    # the way LLM.int8()'s batch-wide outlier columns couple tokens, only larger.
    return out + 0.5 * out.mean(dim=(0, 1), keepdim=True)


def _looks_ahead(out: torch.Tensor) -> torch.Tensor:
    # Each position sees the last token of its own row: a bidirectional model, no batch coupling.
    return out + 0.5 * out[:, -1:, :]


def test_batch_dependent_model_is_not_called_an_encoder(
    monkeypatch: pytest.MonkeyPatch, tiny_pair: dict[str, Path], small_jsonl: Path, tmp_path: Path
) -> None:
    """Item 1: a model whose logits depend on the batch (like LLM.int8()) runs, and the run
    measures and reports how much the same text moves with other batch companions."""
    _hooked_make_head(monkeypatch, tiny_pair["candidate"], _batch_coupled)
    run, lines = _compare_logged(tiny_pair, small_jsonl, tmp_path / "run")
    found = run.results["candidates"][0]["model"]["batch_dependence"]
    assert found["significant"] is True
    assert found["max_abs_logit_diff"] > 0.01
    assert 0 < found["mean_kl"] <= found["max_kl"]
    assert run.results["reference"]["batch_dependence"]["significant"] is False
    notes = [line for line in lines if "depend on the other texts of a batch" in line]
    assert len(notes) == 1 and notes[0].startswith("candidate:"), lines
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert saved["candidates"][0]["model"]["batch_dependence"] == found


def test_model_that_sees_later_tokens_is_still_refused(
    monkeypatch: pytest.MonkeyPatch, tiny_pair: dict[str, Path], small_jsonl: Path, tmp_path: Path
) -> None:
    """Item 1's other half: attention to later tokens of the same row is still an encoder."""
    _hooked_make_head(monkeypatch, tiny_pair["candidate"], _looks_ahead)
    pair = [tiny_pair["reference"], tiny_pair["candidate"]]
    code, output = _compare(pair, small_jsonl, tmp_path / "run")
    check_error(code, output, 1, "is not a causal language model")


def _kl_float64(alone: torch.Tensor, batched: torch.Tensor) -> torch.Tensor:
    p = torch.log_softmax(alone.double(), -1)
    q = torch.log_softmax(batched.double(), -1)
    return (p.exp() * (p - q)).sum(-1)


def test_bitsandbytes_int8_runs_on_cpu_and_reports_its_batch_dependence(
    tiny_pair: dict[str, Path], small_jsonl: Path, tmp_path: Path
) -> None:
    """Item 1 with the real thing: LLM.int8() on CPU (outlier columns over the whole input)."""
    pytest.importorskip("bitsandbytes")
    code, output = _compare(
        [tiny_pair["reference"]], small_jsonl, tmp_path / "run", "--quantize", "bitsandbytes:int8"
    )
    assert code == 0, output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    found = results["candidates"][0]["model"]["batch_dependence"]
    # Independently: the same probe row alone and next to other rows, in float64 KL.
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    model = AutoModelForCausalLM.from_pretrained(
        tiny_pair["reference"],
        quantization_config=BitsAndBytesConfig(load_in_8bit=True),
        dtype=torch.float32,
        device_map="cpu",
    )
    row = torch.randint(0, 500, (1, 8), generator=torch.Generator().manual_seed(7))
    others = torch.randint(0, 500, (3, 8), generator=torch.Generator().manual_seed(8))
    with torch.no_grad():
        alone = model(input_ids=row).logits[0]
        batched = model(input_ids=torch.cat([row, others])).logits[0]
    assert float((alone - batched).abs().max()) > 0  # int8 on CPU is batch-dependent here
    assert found["significant"] is True
    assert found["max_abs_logit_diff"] > 0 and 0 < found["mean_kl"] <= found["max_kl"]
    # Same order of magnitude as an independent measurement on another row and companions.
    independent = float(_kl_float64(alone, batched).max())
    assert independent / 100 < found["max_kl"] < independent * 100


@pytest.fixture
def umask():
    """Set the process umask for one test (restored afterwards)."""
    old = os.umask(0o022)
    os.umask(old)
    yield lambda mask: os.umask(mask)
    os.umask(old)


def _modes(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_mode & 0o777 for p in [root, *root.rglob("*")]}


@pytest.mark.parametrize("mask", [0o022, 0o077])
def test_written_files_get_the_users_normal_permissions(
    umask, mask: int, tiny_pair: dict[str, Path], small_jsonl: Path, tmp_path: Path
) -> None:
    """Item 2: results, per-token files, the report, a reference cache and temporary
    directories renamed into place end with 0o666/0o777 minus the umask, not 0o600/0o700."""
    from lmkl.files import atomic_path, give_normal_modes, make_temp_dir

    umask(mask)
    file_mode, dir_mode = 0o666 & ~mask, 0o777 & ~mask
    run_dir, cache_dir = tmp_path / "run", tmp_path / "cache"
    code, output = _compare([tiny_pair["reference"], tiny_pair["candidate"]], small_jsonl, run_dir)
    assert code == 0, output
    code, output = invoke(["report", str(run_dir)])
    assert code == 0, output
    code, output = invoke(
        [
            *("cache", str(tiny_pair["reference"]), "--data", str(small_jsonl), "-c", "64"),
            *("--quiet", "--out", str(cache_dir)),
        ]
    )
    assert code == 0, output
    for root in (run_dir, cache_dir):
        modes = _modes(root)
        assert (root / "results.json").exists() or root == cache_dir
        for name, mode in modes.items():
            want = dir_mode if (root / name).is_dir() else file_mode
            assert mode == want, f"{root.name}/{name}: {oct(mode)}, want {oct(want)}"
    assert any(name.endswith(".html") for name in _modes(run_dir))

    made = make_temp_dir(tmp_path, ".demo-tmp")  # the demo cache is built in one
    assert made.stat().st_mode & 0o777 == dir_mode
    (made / "model.safetensors").write_text("x")
    (made / "model.safetensors").chmod(0o600)  # as safetensors writes it
    give_normal_modes(made)  # before the demo build is renamed into place
    assert _modes(made) == {".": dir_mode, "model.safetensors": file_mode}
    kept = tmp_path / "kept.txt"
    kept.write_text("old")
    kept.chmod(0o640)
    with atomic_path(kept) as tmp:
        tmp.write_text("new")
    assert kept.stat().st_mode & 0o777 == 0o640  # a replaced file keeps its own mode


def test_nf4_that_does_not_fit_is_refused_before_any_model_loads(
    monkeypatch: pytest.MonkeyPatch, tiny_pair: dict[str, Path], small_jsonl: Path, tmp_path: Path
) -> None:
    """Item 4a: bitsandbytes 4-bit blocks of 64 on a model 32 wide: refused from the config,
    before the reference or the other candidates load, with schemes that fit (nf4 has no other
    block size to name)."""
    import lmkl.models.loading

    loaded: list[str] = []
    real = lmkl.models.loading.load_model

    def counting(spec, *args, **kwargs):
        loaded.append(spec.display_name)
        return real(spec, *args, **kwargs)

    monkeypatch.setattr("lmkl.engine.common.load_model", counting)
    out = tmp_path / "run"
    schemes = ["--quantize", "torchao:int8_weight_only", "--quantize", "bitsandbytes:nf4"]
    code, output = _compare([tiny_pair["candidate"]], small_jsonl, out, *schemes)  # 32 wide
    error = check_error(code, output, 1, "bitsandbytes nf4 block size 64 does not divide", "32")
    assert loaded == [], loaded
    fix = next(line for line in output.splitlines() if line.startswith("fix:"))
    assert "group size" not in fix and "g64" not in fix, fix
    assert "torchao:int4_weight_only:g16" in fix and "quanto:int4" in fix, fix
    assert "CUDA" in fix, fix
    assert not out.exists(), error


@pytest.mark.parametrize("overwrite", [False, True])
def test_out_holding_only_notes_says_it_is_not_a_run(
    overwrite: bool, tiny_pair: dict[str, Path], small_jsonl: Path, tmp_path: Path
) -> None:
    """Item 4b: a folder of the user's notes is never called a run, and --overwrite is never
    suggested for it (it would refuse)."""
    out = tmp_path / "project"
    out.mkdir()
    (out / "notes.txt").write_text("my notes")
    pair = [tiny_pair["reference"], tiny_pair["candidate"]]
    code, output = _compare(pair, small_jsonl, out, *(["--overwrite"] if overwrite else []))
    error = check_error(code, output, 1, "is not empty and is not an lmkl run (holds notes.txt)")
    assert "already holds a run" not in output and "--overwrite" not in output, output
    assert "choose another --out" in output, error
    assert [p.name for p in out.iterdir()] == ["notes.txt"]


def test_validate_lists_every_problem_in_one_round(tmp_path: Path) -> None:
    """Item 4c: duplicate labels (beside an invalid candidate), stride, an unknown demo: name
    and a missing model path all come in the first round, each with its config path."""
    config = tmp_path / "bad.yaml"
    config.write_text(
        """
name: bad
reference: {model: "demo:referense"}
candidates:
  - {label: a, model: ./missing-model}
  - {label: a, model: "demo:reference", quantize: {method: torchao, scheme: int3}}
datasets:
  - source: "demo:heldout"
windowing: {context_length: 64, stride: 128}
"""
    )
    code, output = invoke(["validate", str(config), "--check-models"])
    assert code == 2, output
    assert "error: " in output and "Traceback" not in output
    problems = [line.strip() for line in output.splitlines() if line.startswith("  ")]
    wanted = [
        "candidates: label 'a' is used twice",
        "windowing: stride (128) must be at most context_length - 1 (63)",
        "reference.model: unknown demo name 'demo:referense'",
        "candidates.0.model: model directory './missing-model' does not exist",
        "candidates.1.quantize",
    ]
    for fragment in wanted:
        assert sum(line.startswith(fragment) for line in problems) == 1, (fragment, output)
    # Without --check-models paths are not checked (a hub id or a path made later is fine).
    code, output = invoke(["validate", str(config)])
    assert code == 2 and "missing-model" not in output, output


def test_demo_says_it_replaces_its_own_output_and_refuses_anything_else(
    tiny_pair: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 10: `lmkl demo` replaces runs/demo (its own output) and says so; it refuses a
    runs/demo that holds anything else; -q prints one line; the reference is named by what it
    is, not "reference P = reference"."""
    fake_demo_cache(tiny_pair)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("COLUMNS", "80")
    code, output = invoke(["demo", "-q"])
    assert code == 0, output
    assert output.splitlines() == [str(Path("runs") / "demo")], output  # the path alone
    code, output = invoke(["demo"])
    assert code == 0, output
    assert "replacing runs/demo (the demo's own output" in output, output
    assert "reference P = llama-4x128" in output and "reference P = reference" not in output

    # Not the demo's: refused before anything is built or deleted.
    other = tmp_path / "elsewhere"
    other.mkdir()
    monkeypatch.chdir(other)
    (other / "runs" / "demo").mkdir(parents=True)
    (other / "runs" / "demo" / "notes.txt").write_text("mine")
    code, output = invoke(["demo"])
    check_error(code, output, 1, "is not lmkl demo's own output (holds notes.txt)")
    assert [p.name for p in (other / "runs" / "demo").iterdir()] == ["notes.txt"]


def test_loading_lines_name_the_label_and_the_scheme() -> None:
    """Item 10: four schemes of one model are four different loading lines, each by the label
    the tables use ("student", not "candidate"), with the path and the scheme."""
    from lmkl.engine.common import loading_message
    from lmkl.specs import ModelSpec

    student = ModelSpec(model="/m/candidate", label="student")
    assert loading_message(student, "candidate") == "loading candidate student (/m/candidate)"
    schemes = [
        {"method": "torchao", "scheme": "int8_weight_only"},
        {"method": "torchao", "scheme": "int4_weight_only", "group_size": 32},
        {"method": "bitsandbytes", "scheme": "nf4"},
        {"method": "quanto", "scheme": "int2"},
    ]
    lines = [loading_message(ModelSpec(model="/m/ref", quantize=q), "candidate") for q in schemes]
    assert len(set(lines)) == 4
    assert lines[1] == (
        "loading candidate ref-torchao-int4_weight_only-g32 "
        "(/m/ref, quantized on load: torchao int4_weight_only group size 32)"
    )


def test_rows_without_text_are_counted_and_reported(
    tiny_pair: dict[str, Path], small_jsonl: Path, tmp_path: Path
) -> None:
    """Item 10: rows whose text is null or empty are not documents; the run says how many it
    skipped and which, and the header line gives the context length the KL is for."""
    rows = [json.loads(line) for line in small_jsonl.read_text().splitlines()]
    data = tmp_path / "gaps.jsonl"
    with data.open("w") as fh:
        for row in [rows[0], {"text": None}, rows[1], {"text": ""}, rows[2]]:
            fh.write(json.dumps(row) + "\n")
    run, lines = _compare_logged(tiny_pair, data, tmp_path / "run")
    described = run.results["data"]
    assert described["documents"] == 3
    assert described["skipped_rows"] == {
        "count": 2,
        "reason": "no text (null or empty)",
        "rows": [1, 3],
    }
    assert any("2 rows skipped for having no text" in line and "row 1, 3" in line for line in lines)
    header = [line for line in lines if line.startswith("scoring ")]
    tokens = run.results["data"]["scored_tokens"]
    assert header == [
        f"scoring {tokens:,} tokens of 3 documents: context length 64 tokens, stride 32 "
        "(documents longer than the context slide); KL depends on the context length: "
        "compare only runs made with the same one"
    ], lines


def test_broken_jsonl_names_the_line(
    tiny_pair: dict[str, Path], small_jsonl: Path, tmp_path: Path
) -> None:
    """Item 10: a JSONL line that is not JSON is named by its line number, not a character
    offset into the file."""
    good = small_jsonl.read_text().splitlines()
    data = tmp_path / "broken.jsonl"
    data.write_text("\n".join([good[0], good[1], '{"text": "unterminated', good[2]]) + "\n")
    code, output = _compare([tiny_pair["reference"], tiny_pair["candidate"]], data, tmp_path / "r")
    error = check_error(code, output, 1, "line 3 is not valid JSON")
    assert "column" in error and "unterminated" in error
    assert "fix: fix line 3" in output


def test_api_errors_name_keywords_and_suggest_close_ones(
    tiny_pair: dict[str, Path], small_jsonl: Path, tmp_path: Path
) -> None:
    """Item 10: called from Python, errors name keyword arguments (the CLI keeps its flags), and
    a misspelled keyword gets "did you mean" instead of a list of every name."""
    from lmkl.errors import LmklError, UsageError

    with pytest.raises(UsageError) as caught:
        lmkl.api.compare("a", "b", data="x.jsonl", context_lenght=128)
    assert "did you mean context_length?" in str(caught.value)
    assert "batch_size" not in str(caught.value)  # not the whole list

    run_dir = tmp_path / "run"
    args = (str(tiny_pair["reference"]), [str(tiny_pair["candidate"])])
    lmkl.api.compare(*args, data=str(small_jsonl), out=run_dir, context_length=64)
    with pytest.raises(LmklError) as caught:
        lmkl.api.compare(*args, data=str(small_jsonl), out=run_dir, context_length=64)
    assert "already holds a run" in caught.value.message
    assert caught.value.hint == (
        "pass overwrite=True to replace it, resume=True to continue it, or another out=..."
    )
    assert "--" not in str(caught.value)
    with pytest.raises(LmklError) as caught:
        lmkl.api.compare(*args, data=str(small_jsonl), out=tmp_path / "r2", context_length=4096)
    assert "--" not in str(caught.value) and "context_length=" in str(caught.value), caught.value


def test_sample_kl_with_a_temperature_does_not_title_itself_kl(
    tiny_pair: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Item 10: sampling at T ≠ 1 estimates an expectation under the tempered sampler; the
    table's title names T and says it is not KL(P‖Q) (at T = 1 it is KL(P‖Q))."""
    monkeypatch.setenv("COLUMNS", "80")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"text": "The assert statement"}\n{"text": "A class definition"}\n')

    def title(out: Path, *extra: str) -> str:
        code, output = invoke(
            [
                *("sample-kl", str(tiny_pair["reference"]), str(tiny_pair["candidate"])),
                *("--prompts", str(prompts), "--num-samples", "4", "--max-new-tokens", "3"),
                *("--out", str(out), *extra),
            ]
        )
        assert code == 0, output
        return " ".join(output.split())  # the title as one line, however rich wrapped it

    tempered = title(tmp_path / "t", "--temperature", "0.7")
    assert "sampled E_S(log P − log Q) with S = P at T=0.7 (not KL(P‖Q))" in tempered, tempered
    assert "sampled KL(P‖Q) over" not in tempered
    plain = title(tmp_path / "plain")
    assert "sampled KL(P‖Q) over continuations" in plain, plain


def test_demo_names_work_on_the_command_line(tiny_pair, tmp_path):
    """``demo:NAME`` names the cached demo's models and text in a command, as in a YAML config."""
    fake_demo_cache(tiny_pair)
    out = tmp_path / "run"
    models = ["demo:reference", "demo:candidate", "--data", "demo:heldout"]
    code, output = invoke(["compare", *models, "--context-length", "64", "--out", str(out), "-q"])
    assert code == 0, output
    results = json.loads((out / "results.json").read_text())
    assert [c["label"] for c in results["candidates"]] == ["candidate"]
    assert str(results["data"]["source"]).endswith("heldout.jsonl")  # the demo cache's text
    code, output = invoke(["compare", "demo:reference", "demo:nope", "--data", "demo:heldout"])
    check_error(code, output, 2, "unknown demo name 'demo:nope'")


def test_demo_refusing_an_out_that_holds_a_run_does_not_suggest_resume(tiny_pair, tmp_path):
    """``lmkl demo`` has no --resume: its refusal names only what it has."""
    fake_demo_cache(tiny_pair)
    out = str(tmp_path / "demo")
    code, output = invoke(["demo", "--out", out, "-q"])
    assert code == 0, output
    code, output = invoke(["demo", "--out", out, "-q"])
    check_error(code, output, 1, "already holds a run")
    assert "fix: pass --overwrite" in output and "--resume" not in output, output


def test_command_list_and_example_list_are_whole_at_80_columns(monkeypatch):
    """``lmkl --help`` lists every command with a whole summary (click cut them with "...");
    ``lmkl init --list`` gives each example's first sentence whole, wrapped, never cut."""
    import subprocess
    import sys

    monkeypatch.setenv("COLUMNS", "80")
    run = [sys.executable, "-m", "lmkl", "--help"]
    output = subprocess.run(run, capture_output=True, text=True, check=True).stdout
    commands = output.split("Commands:")[1].splitlines()[1:]
    assert len([line for line in commands if line.strip()]) == 11, output
    assert not any(line.rstrip().endswith("...") for line in commands), output
    assert all(len(line) <= 80 for line in output.splitlines()), output
    code, output = invoke(["init", "--list"])
    assert code == 0, output
    assert all(len(line.rstrip()) <= 80 for line in output.splitlines()), output
    text = " ".join(output.split())
    assert "from its teacher on the assistant's turns only." in text, output
    assert "closest to a bigger teacher?" in text, output


def test_a_misspelled_config_key_gets_a_did_you_mean(tmp_path):
    """``dtyp:`` in a YAML experiment: the one-line problem names the key it probably meant."""
    config = Path(__file__).resolve().parent.parent / "configs" / "quantization.yaml"
    bad = tmp_path / "bad.yaml"
    bad.write_text(config.read_text().replace("  dtype: float32", "  dtyp: float32", 1))
    code, output = invoke(["validate", str(bad)])
    assert code == 2, output
    assert "reference.dtyp: unknown key (not allowed here); did you mean 'dtype'?" in output
