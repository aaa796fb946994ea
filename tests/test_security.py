"""Security defaults: no remote code, no pickle weights unless asked, no eval/exec, safe YAML."""

from __future__ import annotations

import ast
import hashlib
import json
import os
import shutil
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from runtools import invoke
from safetensors.torch import load_file

from lmkl.specs import ModelSpec

LMKL = Path(__file__).resolve().parents[1] / "lmkl"


def _args(tiny_pair, candidate: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "compare",
        str(tiny_pair["reference"]),
        str(candidate),
        "--data",
        str(data),
        "--out",
        str(out),
        "--context-length",
        "64",
        "--max-tokens",
        "60",
        "--quiet",
        *extra,
    ]


@pytest.fixture
def pickle_model(tiny_pair, tmp_path) -> Path:
    """The tiny candidate with its weights pickled (pytorch_model.bin), not in safetensors."""
    out = tmp_path / "pickled"
    shutil.copytree(tiny_pair["candidate"], out)
    weights = load_file(out / "model.safetensors")
    (out / "model.safetensors").unlink()
    torch.save(weights, out / "pytorch_model.bin")
    return out


def test_pickle_weights_refused_unless_allowed(tiny_pair, pickle_model, small_jsonl, tmp_path):
    code, out = invoke(_args(tiny_pair, pickle_model, small_jsonl, tmp_path / "refused"))
    assert code == 1 and "Traceback" not in out
    assert "pickle" in out and "arbitrary code" in out and "--allow-pickle" in out
    assert not (tmp_path / "refused").exists()

    code, out = invoke(
        _args(tiny_pair, pickle_model, small_jsonl, tmp_path / "allowed", "--allow-pickle")
    )
    assert code == 0, out
    code, out = invoke(_args(tiny_pair, tiny_pair["candidate"], small_jsonl, tmp_path / "safe"))
    assert code == 0, out
    a = pq.read_table(tmp_path / "allowed" / "tokens.parquet").drop_columns(["candidate"])
    b = pq.read_table(tmp_path / "safe" / "tokens.parquet").drop_columns(["candidate"])
    assert a.equals(b)  # the same weights either way (only the label differs)


def test_remote_code_is_never_run_unless_asked(tiny_pair, small_jsonl, tmp_path):
    model = tmp_path / "custom"
    shutil.copytree(tiny_pair["candidate"], model)
    marker = tmp_path / "code-ran"
    config = json.loads((model / "config.json").read_text())
    config["model_type"] = "custom-llama"
    config["auto_map"] = {
        "AutoConfig": "configuration_custom.CustomConfig",
        "AutoModelForCausalLM": "modeling_custom.CustomModel",
    }
    (model / "config.json").write_text(json.dumps(config))
    side_effect = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n"
    (model / "configuration_custom.py").write_text(
        side_effect + "from transformers import LlamaConfig\n\n"
        "class CustomConfig(LlamaConfig):\n    model_type = 'custom-llama'\n"
    )
    (model / "modeling_custom.py").write_text(
        side_effect + "from transformers import LlamaForCausalLM\n\n"
        "class CustomModel(LlamaForCausalLM):\n    pass\n"
    )

    code, out = invoke(_args(tiny_pair, model, small_jsonl, tmp_path / "run"))
    assert code == 1 and "Traceback" not in out
    assert "custom code" in out and "--trust-remote-code" in out
    assert not marker.exists()
    assert ModelSpec(model="x").trust_remote_code is False


def _calls(tree: ast.AST) -> list[str]:
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call):
            func = node.func
            if isinstance(func, ast.Name):
                names.append(func.id)
            elif isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name):
                names.append(f"{func.value.id}.{func.attr}")
    return names


@pytest.mark.parametrize("path", sorted(LMKL.rglob("*.py")), ids=lambda p: p.name)
def test_source_has_no_eval_exec_pickle_or_unsafe_yaml(path):
    tree = ast.parse(path.read_text(), filename=str(path))
    calls = _calls(tree)
    forbidden = {
        "eval",
        "exec",
        "compile",
        "__import__",
        "yaml.load",
        "yaml.unsafe_load",
        "yaml.full_load",
        "torch.load",
        "pickle.load",
        "pickle.loads",
    }
    assert not forbidden & set(calls), (path, forbidden & set(calls))
    imports = {
        alias.name
        for node in ast.walk(tree)
        if isinstance(node, ast.Import | ast.ImportFrom)
        for alias in node.names
    }
    modules = {node.module for node in ast.walk(tree) if isinstance(node, ast.ImportFrom)}
    assert not {"pickle", "marshal", "shelve", "dill"} & (imports | modules), path
    for node in ast.walk(tree):
        if isinstance(node, ast.keyword) and node.arg == "trust_remote_code":
            assert not (isinstance(node.value, ast.Constant) and node.value.value is True), path


def test_weight_hash_is_computed_once_and_follows_every_write(tmp_path):
    """The identity of local weights: hashed once per process, new after any change to a file."""
    from lmkl.models import fingerprint_files

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 1000)
    first = fingerprint_files([weights])
    assert first == hashlib.sha256(b"model.safetensors" + b"a" * 1000).hexdigest()
    stat = weights.stat()
    weights.write_bytes(b"b" * 1000)  # same size; the mtime is put back as a copy would
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert (
        fingerprint_files([weights])
        == hashlib.sha256(b"model.safetensors" + b"b" * 1000).hexdigest()
    )


def test_weight_hash_is_remembered_across_processes_only_for_unchanged_files(tmp_path):
    """A second process reuses the hash from the user cache; any write makes it hash again."""
    import json
    import subprocess
    import sys

    from lmkl.files import read_memo

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(b"a" * 1000)
    code = (
        "import sys, pathlib\nfrom lmkl.models import fingerprint_files\n"
        f"print(fingerprint_files([pathlib.Path({str(weights)!r})]))\n"
    )

    def in_new_process() -> str:
        run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert run.returncode == 0, run.stderr
        return run.stdout.strip()

    assert in_new_process() == hashlib.sha256(b"model.safetensors" + b"a" * 1000).hexdigest()
    # The memo is shared by the test session: find this file's entry.
    (key,) = [k for k in read_memo("weights-sha256") if str(weights.resolve()) in k]
    # Plant a different value for the same file state: a new process must take it unread.
    planted = "0" * 64
    memo_file = os.path.join(os.environ["LMKL_CACHE_DIR"], "weights-sha256.json")
    with open(memo_file, "w") as handle:
        json.dump({key: planted}, handle)
    assert in_new_process() == planted
    stat = weights.stat()
    weights.write_bytes(b"b" * 1000)  # same size, mtime put back: the ctime still moves
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert in_new_process() == hashlib.sha256(b"model.safetensors" + b"b" * 1000).hexdigest()
