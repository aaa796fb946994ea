"""Quantized candidates: GGUF files, on-the-fly quantization, pre-quantized checkpoints, the size
axis, one-line errors for missing backends and devices, several candidates on the CLI."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from gguf_files import write_gguf
from runtools import check_error, invoke
from transformers import AutoModelForCausalLM

gguf = pytest.importorskip("gguf")

COMMON = ["--context-length", "64", "--stride", "32", "--batch-size", "4", "--quiet"]


def compare(*args: object) -> tuple[int, str]:
    """``lmkl compare`` in-process with the small-run options."""
    return invoke(["compare", *(str(a) for a in args), *COMMON])


def run_on(tiny_pair: dict, data: Path, *args: object, out: Path) -> tuple[int, str]:
    """``lmkl compare REFERENCE *args --data DATA --out OUT`` (the tiny reference)."""
    return compare(tiny_pair["reference"], *args, "--data", data, "--out", out)


def _kl(run: Path, label: str) -> np.ndarray:
    table = pq.read_table(run / "tokens.parquet", filters=[("candidate", "==", label)])
    order = np.lexsort((table["window_pos"].to_numpy(), table["window_id"].to_numpy()))
    return table["kl"].to_numpy()[order].astype(np.float64)


def _entries(run: Path) -> dict[str, dict]:
    results = json.loads((run / "results.json").read_text())
    return {c["label"]: c for c in results["candidates"]}


@pytest.fixture(scope="module")
def gguf_files(tiny_pair, tmp_path_factory) -> dict[str, Path]:
    """The tiny reference as GGUF files of four types, alone in a directory (as in a GGUF hub
    repo): tokenizer and config come from each file's metadata."""
    root = tmp_path_factory.mktemp("gguf")
    return {
        t: write_gguf(tiny_pair["reference"], root / f"model-{t}.gguf", t)
        for t in ("F32", "F16", "Q8_0", "Q4_0")
    }


@pytest.fixture(scope="module")
def gguf_run(tiny_pair, gguf_files, small_jsonl_module, tmp_path_factory) -> Path:
    """One command ranks four GGUF quantizations of the reference."""
    out = tmp_path_factory.mktemp("gguf-run") / "run"
    code, output = compare(
        tiny_pair["reference"],
        *(gguf_files[t] for t in ("F32", "F16", "Q8_0", "Q4_0")),
        "--data",
        small_jsonl_module,
        "--out",
        out,
    )
    assert code == 0, output
    return out


@pytest.fixture(scope="module")
def small_jsonl_module(tiny_pair, tmp_path_factory) -> Path:
    lines = tiny_pair["heldout"].read_text().splitlines()[:4]
    path = tmp_path_factory.mktemp("qdata") / "small.jsonl"
    path.write_text(
        "".join(json.dumps({"text": json.loads(x)["text"][:1200]}) + "\n" for x in lines)
    )
    return path


def test_gguf_f32_matches_the_original_and_kl_grows_as_bits_shrink(gguf_run):
    kl = {t: _kl(gguf_run, f"model-{t}") for t in ("F32", "F16", "Q8_0", "Q4_0")}
    assert kl["F32"].size > 100
    assert np.abs(kl["F32"]).max() <= 1e-6  # the same weights, read back from GGUF
    means = [kl[t].mean() for t in ("F32", "F16", "Q8_0", "Q4_0")]
    assert means[0] < means[1] < means[2] < means[3]
    assert 0 < means[3] < 0.1


def test_gguf_provenance_and_bits_per_weight(gguf_run, gguf_files):
    entries = _entries(gguf_run)
    # Q8_0 stores 34 bytes per 32 weights (8.5 bits), Q4_0 18 (4.5), F16 16 bits: the 1-D norms
    # stay F32 and add a little.
    expected = {"F32": (32, 32.001), "F16": (16, 16.3), "Q8_0": (8.5, 8.8), "Q4_0": (4.5, 4.8)}
    for t, (low, high) in expected.items():
        model = entries[f"model-{t}"]["model"]
        assert model["quantization"]["method"] == "gguf"
        assert model["quantization"]["scheme"] == t
        assert low <= model["bits_per_weight"] <= high, (t, model["bits_per_weight"])
        assert model["size_source"] == "GGUF tensors"
        assert model["bytes_on_disk"] == gguf_files[t].stat().st_size
        assert model["weights_sha256"]
    assert entries["model-Q4_0"]["model"]["quantization"]["group_size"] == 32
    ranking = json.loads((gguf_run / "results.json").read_text())["ranking"]
    assert ranking["pareto"]["size"] == "bits_per_weight"
    assert ranking["leaderboard"][0]["label"] == "model-F32"


def test_gguf_kl_equals_that_of_the_dequantized_weights(
    tiny_pair, gguf_files, gguf_run, small_jsonl_module, tmp_path
):
    """Independent path: dequantize the Q4_0 tensors with NumPy, save them as an ordinary HF
    checkpoint, compare that: the per-token KL is the GGUF candidate's."""
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["reference"], dtype=torch.float32)
    with torch.no_grad():
        for param in model.parameters():
            data = param.detach().numpy().astype(np.float32)
            if data.ndim != 2:
                continue
            packed = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q4_0)
            param.copy_(
                torch.from_numpy(
                    gguf.quants.dequantize(packed, gguf.GGMLQuantizationType.Q4_0).reshape(
                        data.shape
                    )
                )
            )
    fake = tmp_path / "fake-q4_0"
    model.save_pretrained(fake)
    shutil.copy(tiny_pair["reference"] / "tokenizer.json", fake)
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_pair["reference"] / name).exists():
            shutil.copy(tiny_pair["reference"] / name, fake)
    out = tmp_path / "run"
    code, output = compare(
        str(tiny_pair["reference"]), str(fake), "--data", str(small_jsonl_module), "--out", str(out)
    )
    assert code == 0, output
    np.testing.assert_allclose(_kl(out, "fake-q4_0"), _kl(gguf_run, "model-Q4_0"), atol=1e-6)


def test_gguf_tokenizer_is_read_from_the_file(tiny_pair, gguf_files):
    from transformers import AutoTokenizer

    from lmkl.models import GgufTokenizer, load_tokenizer
    from lmkl.specs import ModelSpec

    reference = AutoTokenizer.from_pretrained(tiny_pair["reference"])
    tokenizer = load_tokenizer(ModelSpec(model=str(gguf_files["Q4_0"])))
    assert isinstance(tokenizer, GgufTokenizer)
    assert tokenizer.get_vocab() == reference.get_vocab()
    assert len(tokenizer) == len(reference)
    for attr in ("bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id"):
        assert getattr(tokenizer, attr) == getattr(reference, attr)
    text = "def f(x):\n    return x ** 2  # wörld"
    assert tokenizer(text)["input_ids"] == reference(text)["input_ids"]


def test_hub_style_gguf_file_option(tiny_pair, gguf_files, small_jsonl_module, tmp_path):
    """``--gguf-file NAME`` picks the file inside a directory (the form a hub repo takes)."""
    directory = gguf_files["Q8_0"].parent
    out = tmp_path / "run"
    code, output = run_on(
        tiny_pair,
        small_jsonl_module,
        str(directory),
        "--gguf-file",
        "model-Q8_0.gguf",
        "--label",
        "q8",
        out=str(out),
    )
    assert code == 0, output
    assert _entries(out)["q8"]["model"]["quantization"]["scheme"] == "Q8_0"


def test_gguf_file_count_must_match_the_candidates(tiny_pair, small_jsonl_module, tmp_path):
    code, output = run_on(
        tiny_pair, small_jsonl_module, "a", "b", "--gguf-file", "x.gguf", out=str(tmp_path / "r")
    )
    check_error(code, output, 2, "--gguf-file")


def test_missing_gguf_file_is_one_line(tiny_pair, small_jsonl_module, tmp_path):
    code, output = run_on(
        tiny_pair, small_jsonl_module, str(tmp_path / "none-Q4_0.gguf"), out=str(tmp_path / "r")
    )
    check_error(code, output, 1, "none-Q4_0")


@pytest.fixture(scope="module")
def on_the_fly_run(tiny_pair, small_jsonl_module, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("otf") / "run"
    code, output = run_on(
        tiny_pair,
        small_jsonl_module,
        "--quantize",
        "torchao:int8_weight_only",
        "--quantize",
        "torchao:int4_weight_only:g32",
        "--quantize",
        "quanto:int4",
        out=str(out),
    )
    assert code == 0, output
    return out


def test_on_the_fly_quantization_small_positive_kl_and_provenance(on_the_fly_run):
    entries = _entries(on_the_fly_run)
    assert set(entries) == {
        "torchao-int8_weight_only",
        "torchao-int4_weight_only-g32",
        "quanto-int4",
    }
    int8 = _kl(on_the_fly_run, "torchao-int8_weight_only").mean()
    int4 = _kl(on_the_fly_run, "torchao-int4_weight_only-g32").mean()
    assert 0 < int8 < int4 < 0.05
    model = entries["torchao-int4_weight_only-g32"]["model"]
    assert model["quantization"] == {
        "kind": "on-the-fly",
        "method": "torchao",
        "scheme": "int4_weight_only",
        "bits": 4,
        "group_size": 32,
        "summary": "int4 weights, one scale per group",
    }
    assert entries["quanto-int4"]["model"]["quantization"]["group_size"] == 128
    # Real bytes: quantized storage is smaller than the float32 checkpoint.
    for entry in entries.values():
        assert entry["model"]["weight_bytes"] < entry["model"]["bytes_on_disk"]
        assert entry["model"]["bits_per_weight"] < 32


def test_rankings_use_the_stored_size_and_keep_the_loaded_one_beside(on_the_fly_run):
    """torchao int4 on CPU: stored below int8, loaded above its stored size; the leaderboard's
    bits per weight is the stored figure, its memory_bytes the loaded one."""
    entries = _entries(on_the_fly_run)
    int4 = entries["torchao-int4_weight_only-g32"]["model"]
    int8 = entries["torchao-int8_weight_only"]["model"]
    assert int4["bits_per_weight"] < int8["bits_per_weight"] < int4["loaded_bits_per_weight"]
    assert int8["loaded_bits_per_weight"] == int8["bits_per_weight"]
    ranking = json.loads((on_the_fly_run / "results.json").read_text())["ranking"]
    sizes = {r["label"]: r["size"] for r in ranking["leaderboard"] if r["kind"] == "candidate"}
    for label, entry in entries.items():
        assert sizes[label]["bits_per_weight"] == entry["model"]["bits_per_weight"]
        assert sizes[label]["memory_bytes"] == entry["model"]["loaded_bytes"]


def test_on_the_fly_quantization_is_reproducible(
    tiny_pair, on_the_fly_run, small_jsonl_module, tmp_path
):
    out = tmp_path / "again"
    code, output = run_on(
        tiny_pair, small_jsonl_module, "--quantize", "torchao:int8_weight_only", out=str(out)
    )
    assert code == 0, output
    label = "torchao-int8_weight_only"
    np.testing.assert_array_equal(_kl(out, label), _kl(on_the_fly_run, label))


def test_fp32_weight_storage_counts_every_byte(tiny_pair):
    from lmkl.quantization import weight_storage

    model = AutoModelForCausalLM.from_pretrained(tiny_pair["reference"], dtype=torch.float32)
    storage = weight_storage(model)
    unique = {p.data_ptr(): p for p in model.parameters()}
    assert storage["weights"] == sum(p.numel() for p in unique.values())
    assert storage["bits_per_weight"] == pytest.approx(32, abs=0.05)  # + rotary buffers


@pytest.fixture(scope="module")
def bnb_checkpoint(tiny_pair, tmp_path_factory) -> Path:
    """A pre-quantized checkpoint: the reference in bitsandbytes 8-bit, saved (safetensors)."""
    pytest.importorskip("bitsandbytes")
    from transformers import BitsAndBytesConfig

    out = tmp_path_factory.mktemp("bnb") / "reference-bnb8"
    model = AutoModelForCausalLM.from_pretrained(
        tiny_pair["reference"],
        quantization_config=BitsAndBytesConfig(load_in_8bit=True),
        device_map="cpu",
    )
    model.save_pretrained(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (tiny_pair["reference"] / name).exists():
            shutil.copy(tiny_pair["reference"] / name, out)
    return out


def test_pre_quantized_checkpoint(tiny_pair, bnb_checkpoint, small_jsonl_module, tmp_path):
    config = json.loads((bnb_checkpoint / "config.json").read_text())
    assert config["quantization_config"]["load_in_8bit"]
    out = tmp_path / "run"
    code, output = run_on(tiny_pair, small_jsonl_module, str(bnb_checkpoint), out=str(out))
    assert code == 0, output
    entry = _entries(out)["reference-bnb8"]
    kl = _kl(out, "reference-bnb8")
    assert 0 < kl.mean() < 0.01
    quant = entry["model"]["quantization"]
    assert (quant["kind"], quant["method"], quant["bits"]) == ("checkpoint", "bitsandbytes", 8)
    reference_bytes = sum(p.stat().st_size for p in tiny_pair["reference"].glob("*.safetensors"))
    assert entry["model"]["bytes_on_disk"] < reference_bytes


def test_missing_backend_for_a_checkpoint_is_one_line(
    tiny_pair, bnb_checkpoint, small_jsonl_module, tmp_path, monkeypatch
):
    import lmkl.quantization

    real = lmkl.quantization.package_available
    monkeypatch.setattr(
        lmkl.quantization, "package_available", lambda m: m != "bitsandbytes" and real(m)
    )
    code, output = run_on(
        tiny_pair, small_jsonl_module, str(bnb_checkpoint), out=str(tmp_path / "r")
    )
    check_error(code, output, 1, "bitsandbytes")
    assert "fix: pip install 'lmkl[quant]'" in output
    assert not (tmp_path / "r").exists()  # refused before anything was written


@pytest.mark.parametrize(
    ("missing", "args", "fragment"),
    [
        ("torchao", ["--quantize", "torchao:int8_weight_only"], "lmkl[quant]"),
        ("gguf", ["CANDIDATE_GGUF"], "lmkl[gguf]"),
    ],
)
def test_missing_backend_on_the_fly_or_gguf_is_one_line(
    tiny_pair, gguf_files, small_jsonl_module, tmp_path, monkeypatch, missing, args, fragment
):
    import lmkl.quantization

    real = lmkl.quantization.package_available
    monkeypatch.setattr(lmkl.quantization, "package_available", lambda m: m != missing and real(m))
    args = [str(gguf_files["Q8_0"]) if a == "CANDIDATE_GGUF" else a for a in args]
    code, output = run_on(tiny_pair, small_jsonl_module, *args, out=str(tmp_path / "r"))
    check_error(code, output, 1, missing)
    assert f"fix: pip install '{fragment}'" in output


def test_gpu_only_format_on_cpu_is_one_line(tiny_pair, small_jsonl_module, tmp_path):
    checkpoint = shutil.copytree(tiny_pair["reference"], tmp_path / "fp8-model")
    config = json.loads((checkpoint / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    (checkpoint / "config.json").write_text(json.dumps(config))
    code, output = run_on(
        tiny_pair, small_jsonl_module, str(checkpoint), "--device", "cpu", out=str(tmp_path / "r")
    )
    check_error(code, output, 1, "fp8", "CUDA", "cpu")


@pytest.mark.parametrize(
    ("value", "fragment"),
    [
        ("torchao", "METHOD:SCHEME"),
        ("torchao:int3", "no scheme 'int3'"),
        ("torchao:int4_weight_only:g48", "group_size"),
        ("torchao:int8_weight_only:g32", "no group size"),
        ("nope:int8", "nope"),
    ],
)
def test_bad_quantize_option_is_a_usage_error(
    tiny_pair, small_jsonl_module, tmp_path, value, fragment
):
    code, output = run_on(
        tiny_pair, small_jsonl_module, "--quantize", value, out=str(tmp_path / "r")
    )
    check_error(code, output, 2, fragment)


def test_several_candidates_run_the_reference_once_per_batch(
    tiny_pair, small_jsonl_module, tmp_path, monkeypatch
):
    from lmkl.models import LoadedModel

    calls: dict[str, int] = {}
    original = LoadedModel.hidden_states

    def counting(self, input_ids, attention_mask):
        calls[self.label] = calls.get(self.label, 0) + 1
        return original(self, input_ids, attention_mask)

    monkeypatch.setattr(LoadedModel, "hidden_states", counting)
    out = tmp_path / "run"
    code, output = run_on(
        tiny_pair,
        small_jsonl_module,
        str(tiny_pair["candidate"]),
        str(tiny_pair["candidate"]),
        "--label",
        "small",
        "--label",
        "small-again",
        "--quantize",
        "torchao:int8_weight_only",
        out=str(out),
    )
    assert code == 0, output
    results = json.loads((out / "results.json").read_text())
    # Every model runs once per batch: the reference is not rerun for each candidate.
    assert set(calls) == {"reference", "small", "small-again", "torchao-int8_weight_only"}
    assert len(set(calls.values())) == 1, calls
    assert calls["reference"] >= results["data"]["windows"] / 4
    labels = [c["label"] for c in results["candidates"]]
    assert labels == ["small", "small-again", "torchao-int8_weight_only"]
    # The same model twice: identical numbers, side by side in one leaderboard.
    np.testing.assert_array_equal(_kl(out, "small"), _kl(out, "small-again"))
    rows = results["ranking"]["leaderboard"]
    assert len(rows) == 3
    # The leaderboard's values are the candidates' per-token mean KL (NumPy on tokens.parquet),
    # in increasing order, each inside its bootstrap CI.
    means = {label: _kl(out, label).mean() for label in labels}
    assert [r["label"] for r in rows] == sorted(labels, key=lambda label: means[label])
    for row in rows:
        assert row["value"] == pytest.approx(means[row["label"]], rel=1e-9)
        assert row["ci"][0] <= row["value"] <= row["ci"][1]


def test_a_model_against_itself_names_both_roles(tiny_pair, small_jsonl_module, tmp_path):
    out = tmp_path / "run"
    model = shutil.copytree(tiny_pair["reference"], tmp_path / "model")  # display name "model"
    code, output = compare(
        model, model, "--candidate-dtype", "bfloat16", "--data", small_jsonl_module, "--out", out
    )
    assert code == 0, output
    results = json.loads((out / "results.json").read_text())
    assert results["reference"]["label"] == "reference"
    assert [c["label"] for c in results["candidates"]] == ["candidate"]
    assert "ranking" not in results  # one candidate: no leaderboard


def test_too_many_labels_is_a_usage_error(tiny_pair, small_jsonl_module, tmp_path):
    code, output = run_on(
        tiny_pair,
        small_jsonl_module,
        str(tiny_pair["candidate"]),
        "--label",
        "a",
        "--label",
        "b",
        out=str(tmp_path / "r"),
    )
    check_error(code, output, 2, "--label")


def test_no_candidate_is_a_usage_error(tiny_pair, small_jsonl_module, tmp_path):
    code, output = compare(
        str(tiny_pair["reference"]), "--data", str(small_jsonl_module), "--out", str(tmp_path / "r")
    )
    check_error(code, output, 2, "no candidate")


def test_quantization_study_in_yaml(tiny_pair, small_jsonl_module, tmp_path):
    """An experiment: on-the-fly schemes against the float32 model, a noise floor, a Pareto set
    by bits per weight, ranked with document-bootstrap CIs."""
    config = tmp_path / "study.yaml"
    ref = tiny_pair["reference"]
    config.write_text(
        f"""
name: study
reference: {{model: {ref}, dtype: float32, device: cpu}}
candidates:
  - {{label: int8, model: {ref}, quantize: {{method: torchao, scheme: int8_weight_only}}}}
  - {{label: int4-g32, model: {ref},
      quantize: {{method: torchao, scheme: int4_weight_only, group_size: 32}}}}
  - {{label: int2, model: {ref}, quantize: {{method: quanto, scheme: int2}}}}
datasets: [{{source: {small_jsonl_module}}}]
windowing: {{context_length: 64, stride: 32}}
ranking: {{size: bits_per_weight, resamples: 200}}
noise_floor: true
"""
    )
    code, output = invoke(["run", str(config), "--out", str(tmp_path / "run"), "--quiet"])
    assert code == 0, output
    results = json.loads((tmp_path / "run" / "results.json").read_text())
    ranking = results["ranking"]
    order = [r["label"] for r in ranking["leaderboard"] if r["kind"] == "candidate"]
    assert order == ["int8", "int4-g32", "int2"]  # fewer bits, more KL
    assert ranking["pareto"]["size"] == "bits_per_weight"
    rows = {r["label"]: r for r in ranking["leaderboard"]}
    for label in order:
        low, high = rows[label]["ci"]
        assert low <= rows[label]["value"] <= high
        assert "distinguishable" in rows[label]["vs_noise_floor"]
        assert 0 < rows[label]["size"]["bits_per_weight"] < 32
    # int8 weights sit near the floor (1e-3 relative noise); 4 and 2 bits are clearly above it.
    assert rows["int4-g32"]["vs_noise_floor"]["distinguishable"]
    assert rows["int2"]["vs_noise_floor"]["distinguishable"]
    models = {c["label"]: c["model"] for c in results["candidates"]}
    assert models["int2"]["quantization"]["bits"] == 2


def test_shipped_quantization_study_validates():
    from lmkl.experiment.schema import load_config

    config = load_config(Path(__file__).parents[1] / "configs" / "quantization.yaml")
    assert config.ranking.size == "bits_per_weight"
    assert config.noise_floor.enabled
    methods = {(c.quantize.method, c.quantize.scheme) for c in config.candidates}
    assert len(methods) >= 5
    assert all(c.model == "demo:reference" for c in config.candidates)  # runs offline


def _write_compressed_tensors(reference: Path, out: Path, group: int = 32) -> Path:
    """A W4A16 (int4 weights, groups of ``group``) checkpoint in compressed-tensors'
    pack-quantized format, as llm-compressor's round-to-nearest writes it."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils import calculate_qparams

    model = AutoModelForCausalLM.from_pretrained(reference, dtype=torch.float32)
    args = QuantizationArgs(
        num_bits=4, type="int", symmetric=True, strategy="group", group_size=group
    )
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    config = QuantizationConfig(
        config_groups={"group_0": scheme},
        ignore=["lm_head"],
        quantization_status=QuantizationStatus.INITIALIZED,
    )
    apply_quantization_config(model, config)
    for module in model.modules():
        if hasattr(module, "weight_scale"):
            rows = module.weight.data.reshape(module.weight.shape[0], -1, group)
            scale, zero = calculate_qparams(rows.amin(-1), rows.amax(-1), args)
            module.weight_scale.data = scale.reshape(module.weight_scale.shape)
            module.weight_zero_point.data = zero.reshape(module.weight_zero_point.shape).to(
                module.weight_zero_point.dtype
            )
            module.quantization_status = QuantizationStatus.FROZEN
    compressor = ModelCompressor.from_pretrained_model(model, quantization_format="pack-quantized")
    compressor.compress_model(model)
    model.save_pretrained(out)
    compressor.update_config(out)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (reference / name).exists():
            shutil.copy(reference / name, out)
    return out


def test_compressed_tensors_checkpoint(tiny_pair, small_jsonl_module, tmp_path):
    pytest.importorskip("compressed_tensors")
    checkpoint = _write_compressed_tensors(tiny_pair["reference"], tmp_path / "w4a16")
    out = tmp_path / "run"
    code, output = run_on(
        tiny_pair,
        small_jsonl_module,
        checkpoint,
        "--quantize",
        "torchao:int4_weight_only:g32",
        out=out,
    )
    assert code == 0, output
    entries = _entries(out)
    model = entries["w4a16"]["model"]
    assert model["quantization"] == {
        "kind": "checkpoint",
        "method": "compressed-tensors",
        "scheme": "pack-quantized",
        "bits": 4,
        "group_size": 32,
    }
    # Decompressed on CPU: the size comes from the packed checkpoint files.
    assert model["size_source"] == "checkpoint files"
    assert model["weight_bytes"] == model["bytes_on_disk"] < 24 * model["parameters"] / 8
    kl, torchao = _kl(out, "w4a16"), _kl(out, "torchao-int4_weight_only-g32")
    assert 0 < kl.mean() < 0.05
    # The same 4-bit grid, groups of 32: close to torchao's on-the-fly int4 (rounding differs).
    assert 0.5 < kl.mean() / torchao.mean() < 2


def test_report_places_quantizations_by_bits_per_weight(gguf_run):
    """The report's size-vs-KL view: bits per weight on the x axis, the Pareto set recomputed
    here from the run's own numbers (smaller and closer wins)."""
    from lmkl.report.build import build_report

    sizes = build_report([gguf_run]).sizes()
    assert sizes["axis"] == "bits_per_weight"
    entries = _entries(gguf_run)
    bits = {k: entries[k]["model"]["bits_per_weight"] for k in sizes["keys"]}
    kls = {k: _kl(gguf_run, k).mean() for k in sizes["keys"]}
    assert sizes["size"] == [bits[k] for k in sizes["keys"]]
    np.testing.assert_allclose(sizes["kl_mean"], [kls[k] for k in sizes["keys"]], rtol=1e-6)
    expected = [
        not any(
            (bits[o] <= bits[k] and kls[o] <= kls[k]) and (bits[o] < bits[k] or kls[o] < kls[k])
            for o in sizes["keys"]
            if o != k
        )
        for k in sizes["keys"]
    ]
    assert sizes["pareto"] == expected


def test_group_size_that_does_not_divide_the_widths_is_one_line(
    tiny_pair, small_jsonl_module, tmp_path
):
    out = tmp_path / "r"
    code, output = run_on(
        tiny_pair, small_jsonl_module, "--quantize", "torchao:int4_weight_only:g128", out=out
    )
    check_error(code, output, 1, "group size 128 does not divide", "64")
    assert "fix: use a group size that divides 64, 192 (g16, g32, g64)" in output
    assert not out.exists()


# Bits per weight as shipped: each scheme's storage counted from its definition, here, not by
# lmkl. Two bias-free linear layers (out × in; never run): every group size divides them.
_SHAPES = ((64, 128), (32, 256))


def _linears(dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = [torch.nn.Linear(cols, rows, bias=False) for rows, cols in _SHAPES]
    return torch.nn.Sequential(*layers).to(dtype)


def _expected_bits(
    per_row: float = 0.0, per_group: float = 0.0, group: int = 1, value: int = 8, per_layer=0
) -> float:
    """8 × bytes / weights over :data:`_SHAPES`: ``value`` bits per weight, ``per_group`` bits
    for each group of ``group`` weights, ``per_row`` for each output row, ``per_layer`` for
    each layer."""
    weights = sum(r * c for r, c in _SHAPES)
    bits = sum(
        r * c * value + r * (c // group) * per_group + r * per_row + per_layer for r, c in _SHAPES
    )
    return bits / weights


def _torchao(scheme: str, group: int | None = None) -> torch.nn.Module:
    from torchao.quantization import quantize_

    from lmkl.quantization import on_the_fly_config
    from lmkl.specs import QuantizeSpec

    spec = QuantizeSpec(method="torchao", scheme=scheme, group_size=group)
    model = _linears()
    quantize_(model, on_the_fly_config(spec).quant_type)  # the config lmkl loads with
    return model


def _quanto(scheme: str) -> torch.nn.Module:
    from optimum.quanto import freeze, qint4, qint8, quantize

    model = _linears()
    quantize(model, weights={"int4": qint4, "int8": qint8}[scheme])
    freeze(model)
    return model


@pytest.mark.parametrize("group", [16, 32])
def test_torchao_int4_counts_4_bit_values_not_their_int8_containers(group):
    """torchao's int4 on CPU holds values and zero points in int8: stored is 4 bits per value,
    a float32 scale and a 4-bit zero point per group; as loaded, 8-bit values and zero points."""
    pytest.importorskip("torchao")
    from lmkl.quantization import weight_storage

    storage = weight_storage(_torchao("int4_weight_only", group))
    assert storage["weights"] == sum(r * c for r, c in _SHAPES)
    stored = _expected_bits(per_group=32 + 4, group=group, value=4)
    loaded = _expected_bits(per_group=32 + 8, group=group, value=8)
    assert storage["bits_per_weight"] == pytest.approx(stored, rel=1e-12)
    assert storage["loaded_bits_per_weight"] == pytest.approx(loaded, rel=1e-12)
    assert stored == pytest.approx(4 + 36 / group)


def test_int8_and_quanto_storage_is_what_they_hold():
    """Schemes already packed at their width: stored = loaded. int8 weight-only: a float32 scale
    and an int8 zero point per row; quanto int8: a float32 scale per row; quanto int4: groups of
    128, a float32 scale and a float32 shift per group (4-bit values packed two to a byte);
    quanto layers also save two float32 activation scales."""
    pytest.importorskip("torchao")
    pytest.importorskip("optimum.quanto")
    from lmkl.quantization import weight_storage

    expected = {
        "torchao int8": (_torchao("int8_weight_only"), _expected_bits(per_row=32 + 8)),
        "quanto int8": (_quanto("int8"), _expected_bits(per_row=32, per_layer=64)),
        "quanto int4": (
            _quanto("int4"),
            _expected_bits(per_group=64, group=128, value=4, per_layer=64),
        ),
    }
    for name, (model, bits) in expected.items():
        storage = weight_storage(model)
        assert storage["bits_per_weight"] == pytest.approx(bits, rel=1e-12), name
        assert storage["loaded_bits_per_weight"] == storage["bits_per_weight"], name


def test_fewer_bits_rank_smaller_as_shipped():
    """int4 < int8 < bfloat16 by stored bits per weight (as loaded on CPU, torchao's int4
    g16 would rank above int8)."""
    pytest.importorskip("torchao")
    from lmkl.quantization import weight_storage

    bits = {
        "int4-g16": weight_storage(_torchao("int4_weight_only", 16))["bits_per_weight"],
        "int4-g32": weight_storage(_torchao("int4_weight_only", 32))["bits_per_weight"],
        "int8": weight_storage(_torchao("int8_weight_only"))["bits_per_weight"],
        "bf16": weight_storage(_linears(torch.bfloat16))["bits_per_weight"],
    }
    assert bits["int4-g32"] < bits["int4-g16"] < bits["int8"] < bits["bf16"] == 16
    assert weight_storage(_torchao("int4_weight_only", 16))["loaded_bits_per_weight"] > 8.5


def test_gguf_bytes_per_module_follow_the_block_layout(tiny_pair, gguf_files):
    """Each module's bytes in a GGUF file: Q8_0 blocks of 32 weights take 34 bytes (an f16
    scale and 32 int8), Q4_0 18 (an f16 scale and 32 nibbles), F16 2 per weight; 1-D norms stay
    F32. The whole file's bits per weight is the sum over its tensors."""
    from lmkl.quantization import gguf_module_bytes, gguf_storage

    model = AutoModelForCausalLM.from_pretrained(tiny_pair["reference"], dtype=torch.float32)
    shapes = {n.removesuffix(".weight"): p.shape for n, p in model.named_parameters()}
    per_block = {"F16": 64, "Q8_0": 34, "Q4_0": 18}
    for kind, block_bytes in per_block.items():
        table = gguf_module_bytes(gguf_files[kind])
        assert set(table) == set(shapes)  # every tensor named back to its module
        for module, shape in shapes.items():
            expected = shape.numel() * (4 if len(shape) == 1 else block_bytes / 32)
            assert table[module] == expected, (kind, module)
        storage = gguf_storage(gguf_files[kind])
        assert storage["weight_bytes"] == sum(table.values())
    bits = {k: gguf_storage(gguf_files[k])["bits_per_weight"] for k in ("Q4_0", "Q8_0", "F16")}
    assert bits["Q4_0"] < bits["Q8_0"] < bits["F16"]
