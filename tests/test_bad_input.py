"""The bad-input catalogue through the CLI: each mistake gives one error line, a fix and its code.

Exit codes (lmkl.errors, README "Troubleshooting"): 1 for a runtime problem with a model, data or
the output, 2 for a usage error.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from runtools import check_error, invoke
from transformers import AutoModelForMaskedLM, AutoTokenizer, BertConfig, DistilBertConfig

from lmkl.errors import EXIT_RUNTIME, EXIT_USAGE


def compare(
    tiny_pair,
    *args: str,
    reference: str | Path | None = None,
    candidate: str | Path | None = None,
    data: Path | None = None,
    out: Path | None = None,
) -> tuple[int, str]:
    argv = [
        "compare",
        str(reference or tiny_pair["reference"]),
        str(candidate or tiny_pair["candidate"]),
        "--quiet",
        "--context-length",
        "64",
        "--max-tokens",
        "40",
    ]
    if data is not None:
        argv += ["--data", str(data)]
    if out is not None:
        argv += ["--out", str(out)]
    return invoke([*argv, *args])


def _with_tokenizer(model, tokenizer_dir: Path, out: Path) -> Path:
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def encoders(tiny_pair, tmp_path_factory) -> dict[str, Path]:
    """Tiny BERT (loads through AutoModelForCausalLM but is bidirectional) and DistilBERT."""
    root = tmp_path_factory.mktemp("encoders")
    tok = tiny_pair["reference"]
    bert = AutoModelForMaskedLM.from_config(
        BertConfig(
            vocab_size=512,
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            intermediate_size=64,
            max_position_embeddings=128,
        )
    )
    distil = AutoModelForMaskedLM.from_config(
        DistilBertConfig(vocab_size=512, dim=32, n_layers=1, n_heads=2, hidden_dim=64)
    )
    return {
        "bert": _with_tokenizer(bert, tok, root / "bert"),
        "distilbert": _with_tokenizer(distil, tok, root / "distilbert"),
    }


# --- models ---------------------------------------------------------------------------------


def test_model_directory_that_does_not_exist(tiny_pair, small_jsonl, tmp_path):
    code, out = compare(
        tiny_pair, candidate=tmp_path / "no-such-model", data=small_jsonl, out=tmp_path / "run"
    )
    check_error(code, out, EXIT_RUNTIME, "does not exist")
    assert not (tmp_path / "run").exists()


def test_hub_id_not_reachable_offline(tiny_pair, small_jsonl, tmp_path):
    code, out = compare(
        tiny_pair,
        "--offline",
        candidate="no-such-org/no-such-model",
        data=small_jsonl,
        out=tmp_path / "run",
    )
    check_error(code, out, EXIT_RUNTIME, "no-such-org/no-such-model", "offline hub cache")


def test_model_path_is_a_file_or_lacks_config(tiny_pair, small_jsonl, tmp_path):
    code, out = compare(tiny_pair, candidate=small_jsonl, data=small_jsonl, out=tmp_path / "r")
    check_error(code, out, EXIT_RUNTIME, "is a file")
    empty = tmp_path / "empty-model"
    empty.mkdir()
    code, out = compare(tiny_pair, candidate=empty, data=small_jsonl, out=tmp_path / "r")
    check_error(code, out, EXIT_RUNTIME, "no config.json")


def test_model_without_weights(tiny_pair, small_jsonl, tmp_path):
    broken = tmp_path / "no-weights"
    shutil.copytree(tiny_pair["candidate"], broken)
    (broken / "model.safetensors").unlink()
    code, out = compare(tiny_pair, candidate=broken, data=small_jsonl, out=tmp_path / "r")
    check_error(code, out, EXIT_RUNTIME, str(broken))


@pytest.mark.parametrize("kind", ["bert", "distilbert"])
def test_model_that_is_not_a_causal_lm(tiny_pair, encoders, small_jsonl, tmp_path, kind):
    code, out = compare(tiny_pair, candidate=encoders[kind], data=small_jsonl, out=tmp_path / "run")
    check_error(code, out, EXIT_RUNTIME, "not a causal language model")


def test_tokenizers_that_differ(tiny_pair, other_tokenizer_model, small_jsonl, tmp_path):
    code, out = compare(
        tiny_pair, candidate=other_tokenizer_model, data=small_jsonl, out=tmp_path / "run"
    )
    check_error(code, out, EXIT_RUNTIME, "tokenizers", "differ")


def test_context_length_above_model_maximum(tiny_pair, small_jsonl, tmp_path):
    code, out = compare(
        tiny_pair, "--context-length", "1024", data=small_jsonl, out=tmp_path / "run"
    )
    check_error(code, out, EXIT_USAGE, "1024", "512")


def test_invalid_stride_and_option_values(tiny_pair, small_jsonl, tmp_path):
    code, out = compare(tiny_pair, "--stride", "200", data=small_jsonl, out=tmp_path / "run")
    check_error(code, out, EXIT_USAGE, "stride")
    code, out = compare(tiny_pair, "--windowing", "sideways", data=small_jsonl)
    assert code == EXIT_USAGE and "Traceback" not in out  # Typer's own usage error


# --- data -----------------------------------------------------------------------------------


def test_no_data_given(tiny_pair):
    code, out = compare(tiny_pair)
    check_error(code, out, EXIT_USAGE, "no data")


@pytest.mark.parametrize(
    ("name", "content", "fragments"),
    [
        ("missing.jsonl", None, ("does not exist",)),
        ("broken.jsonl", '{"text": "fine"}\n{not json\n', ("line 2 is not valid JSON",)),
        ("broken.csv", 'text,other\n"unclosed,1\n', ("cannot parse",)),
        ("notes.docx", "hello", ("unsupported data file type",)),
        ("latin1.txt", b"caf\xe9 au lait", ("not UTF-8",)),
        ("fields.jsonl", '{"body": "hello there", "id": 1}\n', ("'text' not found", "body, id")),
        ("empty.jsonl", "", ("is empty",)),
        ("blank.txt", "\n\n  \n", ("is empty",)),
        ("short.jsonl", '{"text": ""}\n{"text": null}\n', ("no document has two or more tokens",)),
    ],
)
def test_bad_data_files(tiny_pair, tmp_path, name, content, fragments):
    path = tmp_path / name
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content)
    code, out = compare(tiny_pair, data=path, out=tmp_path / "run")
    check_error(code, out, EXIT_RUNTIME, *fragments)
    assert not (tmp_path / "run").exists()


def test_unreadable_data_file(tiny_pair, small_jsonl, tmp_path, monkeypatch):
    # Tests may run as root, which chmod cannot stop; make the read itself fail instead.
    real = Path.read_bytes

    def deny(self: Path) -> bytes:
        if self.name == small_jsonl.name:
            raise PermissionError(13, "Permission denied", str(self))
        return real(self)

    monkeypatch.setattr(Path, "read_bytes", deny)
    code, out = compare(tiny_pair, data=small_jsonl, out=tmp_path / "run")
    check_error(code, out, EXIT_RUNTIME, "cannot read data file", "Permission denied")


def test_hub_dataset_not_available_offline(tiny_pair, tmp_path):
    code, out = compare(tiny_pair, data=Path("no-such-dataset-xyz"), out=tmp_path / "run")
    check_error(code, out, EXIT_RUNTIME, "no-such-dataset-xyz", "hub")


def test_llama_cpp_windowing_with_too_little_text(tiny_pair, tmp_path):
    data = tmp_path / "tiny.txt"
    data.write_text("just a few words")
    code, out = compare(tiny_pair, "--windowing", "llama-cpp", data=data, out=tmp_path / "run")
    check_error(code, out, EXIT_RUNTIME, "fewer than 64 tokens")


# --- output ---------------------------------------------------------------------------------


def test_output_directory_holding_a_run(tiny_pair, small_jsonl, tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text("{}\n")
    (run / ".lmkl-run").write_text("")  # lmkl's marker: a run, which --overwrite may replace
    code, out = compare(tiny_pair, data=small_jsonl, out=run)
    check_error(code, out, EXIT_RUNTIME, "already holds a run")
    (run / "mine.txt").write_text("x")
    (run / "config.yaml").unlink()
    (run / ".lmkl-run").unlink()
    code, out = compare(tiny_pair, "--overwrite", data=small_jsonl, out=run)
    check_error(code, out, EXIT_RUNTIME, "not an lmkl run")
    assert (run / "mine.txt").exists()


# --- adapters -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def adapters(tmp_path_factory) -> dict[str, Path]:
    """LoRA adapters: one for a wider base (does not fit the candidate), one that fits."""
    pytest.importorskip("peft")
    from peft import LoraConfig, get_peft_model

    from lmkl.demo.assets import build_model

    root = tmp_path_factory.mktemp("adapters")
    out = {}
    for name, hidden in (("wider", 48), ("fits", 32)):
        base = build_model("llama", 512, hidden, 1, 2, seed=2)
        lora = LoraConfig(r=2, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        get_peft_model(base, lora).save_pretrained(root / name)
        config_path = root / name / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = f"some-org/base-{hidden}"
        config_path.write_text(json.dumps(config))
        out[name] = root / name
    return out


def test_adapter_for_a_different_base_model(tiny_pair, adapters, small_jsonl, tmp_path):
    code, out = compare(
        tiny_pair, "--adapter", str(adapters["wider"]), data=small_jsonl, out=tmp_path / "run"
    )
    check_error(code, out, EXIT_RUNTIME, "does not fit", "some-org/base-48")
    code, out = compare(
        tiny_pair, "--adapter", str(tmp_path / "nowhere"), data=small_jsonl, out=tmp_path / "run"
    )
    check_error(code, out, EXIT_RUNTIME, "cannot load adapter")


def test_adapter_named_for_another_base_that_fits_warns_in_one_line(
    tiny_pair, adapters, small_jsonl, tmp_path
):
    code, out = compare(
        tiny_pair, "--adapter", str(adapters["fits"]), data=small_jsonl, out=tmp_path / "run"
    )
    assert code == 0, out
    warnings = [line for line in out.splitlines() if "some-org/base-32" in line]
    assert len(warnings) == 1 and warnings[0].startswith("warning:")
    assert "UserWarning" not in out
