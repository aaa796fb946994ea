"""``lmkl attribute``: every unit's KL against an independent float64 computation (weights
substituted by hand, full forwards, KL in NumPy), the boundary shortcut's saving, the full
candidate equal to ``compare``, other candidate formats, bad structure, resume, the terminal."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from runtools import ROOT, VOLATILE, check_error, compare_args, invoke, kill_at
from tiny_models import build_tiny_model, tiny_corpus
from transformers import AutoModelForCausalLM, AutoTokenizer

import lmkl.api

CONTEXT = 256


def fake_quantize(model_dir: Path, out: Path, *, keep: tuple[str, ...] = ()) -> Path:
    """A copy whose decoder weights and embeddings are rounded to 5 levels per row (the final
    norm and output layer kept, so the last prefix is the whole candidate); ``keep``: modules
    left identical."""
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    with torch.no_grad():
        for name, module in model.named_modules():
            weight = getattr(module, "weight", None)
            if name in keep or weight is None or weight.dim() != 2 or "lm_head" in name:
                continue
            scale = weight.abs().amax(dim=-1, keepdim=True).clamp_min(1e-8) / 2
            weight.copy_((weight / scale).round() * scale)
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(model_dir).save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def docs(tmp_path_factory) -> Path:
    """Three short held-out documents, each one window at context 256."""
    path = tmp_path_factory.mktemp("attr-data") / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t[:500]}) + "\n" for t in tiny_corpus()[1][:3]))
    return path


@pytest.fixture(scope="module", params=["llama", "gpt2", "qwen2"])
def pair(request, tmp_path_factory) -> dict[str, Path]:
    """A tiny trained 2-layer model of each family and its fake-quantized copy."""
    root = tmp_path_factory.mktemp(f"attr-{request.param}")
    reference = build_tiny_model(
        root / "reference",
        arch=request.param,
        hidden_size=32,
        num_layers=2,
        num_heads=2,
        steps=20,
        seed=5,
        tie_word_embeddings=False,
    )
    keep = {"llama": "model.layers.1.mlp.up_proj", "qwen2": "model.layers.1.mlp.up_proj"}
    kept = keep.get(request.param, "transformer.h.1.mlp.c_fc")
    # GPT-2's Conv1D weights are 2-D too; keep one module identical in every family.
    candidate = fake_quantize(reference, root / "candidate", keep=(kept,))
    return {"reference": reference, "candidate": candidate, "kept": kept, "arch": request.param}


def attribute(pair: dict, docs: Path, out: Path, **options) -> lmkl.api.Run:
    return lmkl.api.attribute(
        str(pair["reference"]),
        str(pair["candidate"]),
        str(docs),
        out=out,
        context_length=CONTEXT,
        batch_size=2,
        dtype="float32",
        compile=False,
        **options,
    )


@pytest.fixture(scope="module")
def run(pair, docs, tmp_path_factory) -> lmkl.api.Run:
    return attribute(pair, docs, tmp_path_factory.mktemp("attr-run") / "run")


def _taken(unit: dict, names: list[str], layers_name: str) -> list[str]:
    """The weight-holding modules a unit takes from the candidate, from names alone."""
    if unit["scope"] == "module":
        return [unit["name"]]
    if unit["scope"] == "layer":
        return [n for n in names if n.startswith(unit["name"] + ".")]
    in_layers = [n for n in names if n.startswith(layers_name + ".")]
    before = [n for n in names if "wte" in n or "wpe" in n or "embed_tokens" in n]
    upto = [n for n in in_layers if int(n[len(layers_name) + 1 :].split(".")[0]) <= unit["layer"]]
    return before + upto


def _float64_kl(
    ref: torch.nn.Module, cand: torch.nn.Module, modules: list[str], windows: list[list[int]]
) -> list[np.ndarray]:
    """KL(P‖hybrid) per position, hybrid = reference with ``modules``' weights from the
    candidate; float64 full forwards, log-softmax and KL in NumPy."""
    hybrid = copy.deepcopy(ref)
    with torch.no_grad():
        head, embedding = hybrid.get_output_embeddings(), hybrid.get_input_embeddings()
        if head.weight is embedding.weight:  # tied: a module unit changes only its own use
            head.weight = torch.nn.Parameter(head.weight.detach().clone())
        for name in modules:
            theirs = dict(cand.get_submodule(name).named_parameters(recurse=False))
            for pname, param in hybrid.get_submodule(name).named_parameters(recurse=False):
                param.copy_(theirs[pname])
    out = []
    for ids in windows:
        x = torch.tensor([ids[:-1]])
        with torch.no_grad():
            p = ref(input_ids=x).logits[0].numpy()
            q = hybrid(input_ids=x).logits[0].numpy()

        def log_softmax(z: np.ndarray) -> np.ndarray:
            z = z - z.max(-1, keepdims=True)
            return z - np.log(np.exp(z).sum(-1, keepdims=True))

        lp, lq = log_softmax(p), log_softmax(q)
        out.append((np.exp(lp) * (lp - lq)).sum(-1))
    return out


def test_every_unit_matches_an_independent_float64_computation(pair, docs, run):
    results = run.results
    assert results["kind"] == "attribution"
    tokens = pq.read_table(run.path / "tokens.parquet").to_pandas()
    tokenizer = AutoTokenizer.from_pretrained(pair["reference"])
    texts = [json.loads(line)["text"] for line in docs.read_text().splitlines()]
    windows = [tokenizer(t).input_ids for t in texts]
    assert tokens["doc_id"].nunique() == len(windows)
    for doc, ids in enumerate(windows):  # one window per document: check the targets
        rows = tokens[tokens["doc_id"] == doc].sort_values("window_pos")
        assert rows["token_id"].tolist() == [ids[j] for j in rows["window_pos"]]
    candidate = AutoModelForCausalLM.from_pretrained(pair["candidate"], dtype=torch.float64)
    layers_name = "model.layers" if pair["arch"] != "gpt2" else "transformer.h"
    _check_against_float64(
        run.path, results, pair["reference"], candidate, docs, layers_name, every_unit=True
    )
    by_kind = {}
    for unit in results["units"]:
        by_kind.setdefault(unit["scope"], []).append(unit)
        if not unit["identical"]:
            assert unit["kl"]["ci_low"] <= unit["kl"]["mean"] <= unit["kl"]["ci_high"], unit
            assert 0.0 <= unit["top1_agreement"] <= 1.0 and unit["reverse_kl"] >= 0.0
    assert len(by_kind["layer"]) == len(by_kind["prefix"]) == 2
    kept = next(u for u in by_kind["module"] if u["name"] == pair["kept"])
    assert kept["identical"] and kept["kl"]["mean"] == 0.0
    modules_sum = sum(u["kl"]["mean"] for u in by_kind["module"])
    assert results["sum_of_modules"]["mean"] == pytest.approx(modules_sum)
    assert len(results["hidden_state_error"]) == 2
    assert all(e > 0 for e in results["hidden_state_error"])


@pytest.mark.parametrize("pair", ["llama"], indirect=True)
def test_full_is_compare_and_the_last_prefix_is_the_full_candidate(pair, docs, run, tmp_path):
    compared = lmkl.api.compare(
        str(pair["reference"]),
        str(pair["candidate"]),
        str(docs),
        out=tmp_path / "compare",
        context_length=CONTEXT,
        batch_size=2,
        dtype="float32",
        compile=False,
    )
    assert run.results["full"] == compared.results["candidates"][0]["metrics"]
    assert (
        run.results["full_kl"]["mean"] == compared.results["candidates"][0]["metrics"]["kl"]["mean"]
    )
    units = pq.read_table(run.path / "units.parquet").to_pandas()
    last = units[units["unit"] == "prefix:model.layers.1"].sort_values(["doc_id", "window_pos"])
    full = pq.read_table(run.path / "tokens.parquet").to_pandas()
    full = full.sort_values(["doc_id", "window_pos"])
    np.testing.assert_allclose(last["kl"].to_numpy(), full["kl"].to_numpy(), rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("pair", ["llama"], indirect=True)
def test_boundaries_save_decoder_layer_calls(pair, docs, tmp_path, monkeypatch):
    """Layer calls counted on the decoder layer class: 2 full forwards per batch, then each
    unit only from its layer on; full forwards per unit would make far more."""
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    calls, scoring = [], []
    original = LlamaDecoderLayer.forward

    def counted(self, *args, **kwargs):
        if scoring:  # not the load-time probes
            calls.append(self.self_attn.layer_idx)
        return original(self, *args, **kwargs)

    def log(message: str) -> None:
        if message.startswith("attributing over"):  # the last thing prepare says
            scoring.append(True)

    monkeypatch.setattr(LlamaDecoderLayer, "forward", counted)
    result = attribute(pair, docs, tmp_path / "run", log=log).results
    batches = 2  # three documents, two per batch
    scored = [u for u in result["units"] if not u["identical"]]
    starts = []
    for u in scored:
        if u["scope"] == "prefix":
            starts.append(u["layer"] + 1)
        elif u["layer"] is not None:
            starts.append(u["layer"])
        else:
            starts.append(0 if u["name"] == "model.embed_tokens" else 2)
    expected = batches * (2 * 2 + sum(2 - s for s in starts))
    assert len(calls) == expected == result["cost"]["layer_calls"]
    assert (
        len(calls) < batches * (2 + len(scored)) * 2 == result["cost"]["full_forward_layer_calls"]
    )


def test_mismatched_structure_is_one_line_exit_2(tiny_pair, docs, tmp_path):
    out = tmp_path / "run"
    code, output = invoke(
        [
            "attribute",
            str(tiny_pair["reference"]),
            str(tiny_pair["candidate"]),
            "--data",
            str(docs),
            "--out",
            str(out),
            "--no-compile",
        ]
    )
    check_error(code, output, 2, "attribution needs matching modules")
    assert not out.exists()


def test_exactly_one_candidate(tiny_pair, docs):
    code, output = invoke(
        ["attribute", str(tiny_pair["reference"]), "--data", str(docs), "--no-compile"]
    )
    check_error(code, output, 2, "exactly one candidate")


def _cli_args(pair: dict, docs: Path, out: Path) -> list[str]:
    """compare's small-run options (~10 parts), as an attribution."""
    return ["attribute", *compare_args(pair, docs, out)[1:], "--dtype", "float32", "--no-compile"]


@pytest.mark.parametrize("pair", ["llama"], indirect=True)
def test_resume_after_a_kill_gives_identical_units(pair, docs, tmp_path):
    full, killed = tmp_path / "full", tmp_path / "killed"

    def args(out: Path) -> list[str]:
        return [*_cli_args(pair, docs, out), "--batch-size", "4"]  # 3 parts: fewer to score

    code, output = invoke(args(full))
    assert code == 0, output
    kill_at(args(killed), "part-done:1")
    assert not (killed / "results.json").exists()
    assert len(list((killed / "parts").glob("part-*.parquet"))) == 2
    code, output = invoke([*args(killed), "--resume"])
    assert code == 0, output
    a, b = (json.loads((d / "results.json").read_text()) for d in (killed, full))
    assert a["provenance"]["resumed_parts"] == 2
    for key in VOLATILE:
        a.pop(key), b.pop(key)
    assert a == b
    units_a = pq.read_table(killed / "units.parquet")
    units_b = pq.read_table(full / "units.parquet")
    assert units_a.num_rows == units_b.num_rows > 0 and units_a.equals(units_b)


@pytest.mark.parametrize("pair", ["qwen2"], indirect=True)
def test_terminal_fits_80_columns_piped(pair, docs, tmp_path):
    args = _cli_args(pair, docs, tmp_path / "run")
    args.remove("--quiet")
    env = dict(
        os.environ,
        COLUMNS="80",
        PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    )
    proc = subprocess.run(
        [sys.executable, "-m", "lmkl", *args], capture_output=True, text=True, env=env, cwd=ROOT
    )
    assert proc.returncode == 0, proc.stderr
    # (The run directory's path is printed whole, never wrapped: it may be longer.)
    lines = [line for line in proc.stdout.splitlines() if not line.startswith("run directory")]
    assert all(len(line) <= 80 for line in lines), proc.stdout
    assert "…" not in proc.stdout, proc.stdout
    assert "of the isolated KL" in proc.stdout
    assert "model.layers.0.self_attn.q_proj" in proc.stdout or "model.layers" in proc.stdout
    assert "run directory:" in proc.stdout


def _check_against_float64(
    run_path: Path,
    results: dict,
    ref_dir: Path,
    candidate: torch.nn.Module,
    docs: Path,
    layers_name: str = "model.layers",
    every_unit: bool = False,
) -> None:
    """The units of a finished run against :func:`_float64_kl` per token (``candidate``:
    loaded); unless ``every_unit``, layer 1's single modules are left out (layer 1 as a whole
    is checked). Identical units must be truly identical and absent from units.parquet."""
    units = pq.read_table(run_path / "units.parquet").to_pandas()
    tokens = pq.read_table(run_path / "tokens.parquet").to_pandas()
    tokenizer = AutoTokenizer.from_pretrained(ref_dir)
    windows = [tokenizer(json.loads(x)["text"]).input_ids for x in docs.read_text().splitlines()]
    reference = AutoModelForCausalLM.from_pretrained(ref_dir, dtype=torch.float64).eval()
    names = [n for n, m in reference.named_modules() if next(m.parameters(False), None) is not None]
    for unit in results["units"]:
        if not every_unit and unit["scope"] == "module" and unit["layer"] == 1:
            continue
        key = f"{unit['scope']}:{unit['name']}"
        expected = _float64_kl(reference, candidate, _taken(unit, names, layers_name), windows)
        want = np.concatenate(
            [
                e[tokens[tokens["doc_id"] == d].sort_values("window_pos")["window_pos"] - 1]
                for d, e in enumerate(expected)
            ]
        )
        if unit["identical"]:
            assert np.allclose(want, 0.0, atol=1e-12), key  # truly identical, never run
            assert key not in set(units["unit"]), key
            assert unit["kl"]["mean"] == 0.0
            continue
        got = units[units["unit"] == key].sort_values(["doc_id", "window_pos"])["kl"].to_numpy()
        assert got.shape == want.shape, key
        np.testing.assert_allclose(got, want, rtol=2e-3, atol=2e-6, err_msg=key)
        assert unit["kl"]["mean"] == pytest.approx(want.mean(), rel=2e-3, abs=1e-7), key


def test_gguf_candidate_matches_float64(tiny_pair, docs, tmp_path):
    """A Q4_0 GGUF file of the reference: every unit against float64 forwards of the weights
    transformers dequantizes from it (the norms stay F32: identical, KL 0)."""
    pytest.importorskip("gguf")
    from gguf_files import write_gguf

    gguf_path = write_gguf(tiny_pair["reference"], tmp_path / "model-Q4_0.gguf", "Q4_0")
    run = attribute({**tiny_pair, "candidate": gguf_path}, docs, tmp_path / "run")
    norms = [u for u in run.results["units"] if u["name"].endswith("norm")]
    assert norms and all(u["identical"] for u in norms)
    candidate = AutoModelForCausalLM.from_pretrained(
        gguf_path.parent, gguf_file=gguf_path.name, dtype=torch.float64
    )
    _check_against_float64(run.path, run.results, tiny_pair["reference"], candidate, docs)


@pytest.mark.parametrize("scheme", ["quanto:int4", "torchao:int8_weight_only"])
def test_on_the_fly_quantized_candidate(tiny_pair, docs, tmp_path, scheme):
    """Quantized while loading: the quantized Linears carry the KL, norms and embeddings are
    the reference's (KL 0), and the full candidate is what compare reports."""
    pytest.importorskip(scheme.split(":")[0].replace("quanto", "optimum.quanto"))
    args = ["--context-length", str(CONTEXT), "--batch-size", "2", "--no-compile", "--quiet"]
    out = tmp_path / "run"
    common = [str(tiny_pair["reference"]), "--quantize", scheme, "--data", str(docs), *args]
    code, output = invoke(["attribute", *common, "--out", str(out)])
    assert code == 0, output
    code, output = invoke(["compare", *common, "--out", str(tmp_path / "compare")])
    assert code == 0, output
    results = json.loads((out / "results.json").read_text())
    compared = json.loads((tmp_path / "compare" / "results.json").read_text())
    assert results["full"] == compared["candidates"][0]["metrics"]
    modules = {u["name"]: u for u in results["units"] if u["scope"] == "module"}
    assert modules["model.embed_tokens"]["identical"]
    assert modules["model.norm"]["identical"]
    linear = modules["model.layers.0.mlp.down_proj"]
    assert not linear["identical"] and linear["kl"]["mean"] > 0


@pytest.mark.parametrize("pair", ["llama"], indirect=True)
def test_report_from_the_run_directory_alone(pair, run, tmp_path):
    """HTML and Markdown reports of an attribution run: the summary, the three figures and the
    top modules, read from a copy of the run directory (no model needed)."""
    import shutil

    copied = tmp_path / "copy"
    shutil.copytree(run.path, copied)
    code, output = invoke(["report", str(copied)])
    assert code == 0, output
    html = (copied / "report.html").read_text()
    assert run.results["summary"].split(";")[0] in html
    assert html.count("data:image/png;base64,") == 3
    top = max(
        (u for u in run.results["units"] if u["scope"] == "module"), key=lambda u: u["kl"]["mean"]
    )
    assert top["name"] in html
    # Numbers never break at an exponent's minus; the reference is named, not "reference".
    assert "td, .number { white-space: nowrap; }" in html
    from lmkl.report.attribution import _model_name

    assert _model_name({"label": "reference", "path": "/m/llama-1b"}, "reference") == "llama-1b"
    assert _model_name({"label": "teacher", "path": "/m/llama-1b"}, "reference") == "teacher"
    code, output = invoke(["report", str(copied), "--format", "md"])
    assert code == 0, output
    assert sorted(p.name for p in (copied / "report_files").iterdir()) == [
        "attribution_heatmap.png",
        "attribution_layers.png",
        "attribution_prefix.png",
    ]


def test_recipe_within_budget_measured_and_reproduced_by_compare(tiny_pair, docs, tmp_path):
    """torchao int4 g32 as LOW, int8 as HIGH, a budget half-way: the recipe stays within it,
    its measured KL is what `compare --recipe recipe.yaml` reports, and it is compared with
    uniform LOW honestly."""
    pytest.importorskip("torchao")
    from lmkl.models import load_model
    from lmkl.specs import ModelSpec

    low_q, high_q = "torchao:int4_weight_only:g32", "torchao:int8_weight_only"
    bits = {}
    for scheme in (low_q, high_q):
        method, name, group = [*scheme.split(":"), None][:3]
        spec = ModelSpec(
            model=str(tiny_pair["reference"]),
            dtype="float32",
            quantize={"method": method, "scheme": name, "group_size": group and int(group[1:])},
        )
        bits[scheme] = load_model(spec).description["bits_per_weight"]
    budget = (bits[low_q] + bits[high_q]) / 2
    out = tmp_path / "run"
    common = ["--data", str(docs), "--context-length", str(CONTEXT), "--batch-size", "2"]
    code, output = invoke(
        ["attribute", str(tiny_pair["reference"]), "--quantize", low_q, "--high", high_q,
         "--budget-bits", f"{budget:.4f}", "--out", str(out), "--no-compile", *common]
    )  # fmt: skip
    assert code == 0, output
    assert "recipe:" in output
    recipe = json.loads((out / "results.json").read_text())["recipe"]
    assert 0 < len(recipe["high"]) < 14  # some modules, not every Linear
    assert bits[low_q] < recipe["bits_per_weight"] <= budget + 1e-9
    assert recipe["uniform_low_kl"] > recipe["uniform_high_kl"] > 0
    assert recipe["better_than_low"] == (recipe["measured_kl"] < recipe["uniform_low_kl"])
    assert recipe["measured_kl"] < recipe["uniform_low_kl"]  # on this pair it helps
    compared = tmp_path / "compare"
    code, output = invoke(
        ["compare", str(tiny_pair["reference"]), "--recipe", str(out / "recipe.yaml"),
         "--out", str(compared), "--no-compile", "--quiet", *common]
    )  # fmt: skip
    assert code == 0, output
    entry = json.loads((compared / "results.json").read_text())["candidates"][0]
    assert entry["metrics"]["kl"]["mean"] == pytest.approx(recipe["measured_kl"], rel=1e-9)
    assert entry["model"]["bits_per_weight"] == pytest.approx(recipe["bits_per_weight"])


def test_budget_below_low_is_refused_before_scoring(tiny_pair, docs, tmp_path):
    out = tmp_path / "run"
    code, output = invoke(
        ["attribute", str(tiny_pair["reference"]), "--quantize", "torchao:int8_weight_only",
         "--high", str(tiny_pair["reference"]), "--budget-bits", "1", "--data", str(docs),
         "--out", str(out), "--no-compile"]
    )  # fmt: skip
    check_error(code, output, 2, "--budget-bits 1 is below")
    assert not out.exists()


def test_gguf_recipe_writes_llama_quantize_arguments(tiny_pair, docs, tmp_path, monkeypatch):
    """LOW Q4_0 and HIGH Q8_0 GGUF files: the recipe holds the llama-quantize arguments that
    make the mixed file, and its bits per weight are the GGUF tensors' (within the budget).
    Each argument's type is the chosen tensor's own in HIGH, spelled as llama.cpp does: HIGH's
    tensor table is read as a K-quant mix would have it (ffn_down q6_K, the rest q4_K; the
    gguf package cannot write K-quants), whose file type (Q4_K_M) is no tensor's type."""
    pytest.importorskip("gguf")
    from gguf_files import write_gguf

    import lmkl.models.mixed

    real = lmkl.models.mixed.gguf_tensor_types

    def k_quant_mix(spec):
        table = real(spec)
        assert set(table.values()) >= {"q8_0"}  # read from the file
        return {n: ("q6_K" if "ffn_down" in n else "q4_K") for n in table}

    monkeypatch.setattr(lmkl.models.mixed, "gguf_tensor_types", k_quant_mix)

    low = write_gguf(tiny_pair["reference"], tmp_path / "model-Q4_0.gguf", "Q4_0")
    high = write_gguf(tiny_pair["reference"], tmp_path / "model-Q8_0.gguf", "Q8_0")
    out = tmp_path / "run"
    code, output = invoke(
        ["attribute", str(tiny_pair["reference"]), str(low), "--high", str(high),
         "--budget-bits", "6.5", "--data", str(docs), "--context-length", str(CONTEXT),
         "--batch-size", "2", "--no-compile", "--quiet", "--out", str(out)]
    )  # fmt: skip
    assert code == 0, output
    recipe = json.loads((out / "results.json").read_text())["recipe"]
    assert recipe["high"] and recipe["low_bits_per_weight"] < recipe["bits_per_weight"] <= 6.5
    args = recipe["tensor_type_args"]
    assert args and len(args) % 2 == 0
    for option, value in zip(args[0::2], args[1::2], strict=True):
        if option == "--tensor-type":
            tensor, _, kind = value.rpartition("=")
            assert kind == ("q6_K" if "ffn_down" in tensor else "q4_K"), value
        else:
            assert option in ("--token-embedding-type", "--output-tensor-type")
            assert value == "q4_K"
    written = (out / "recipe.yaml").read_text()
    assert "tensor_type_args" in written and "model-Q8_0.gguf" in written


@pytest.mark.parametrize("pair", ["llama"], indirect=True)
def test_a_small_memory_budget_gives_the_same_units(pair, docs, run, tmp_path, monkeypatch):
    """A budget too small for more than one unit per scoring call, with the boundaries in CPU
    memory (forced: the tiny model's fit in any budget): the same per-token values."""
    from lmkl.attribution.kind import Attribution

    sizes = []

    def one_unit(self, tokens):
        sizes.append(tokens)
        return 1

    monkeypatch.setattr(Attribution, "_group_size", one_unit)
    monkeypatch.setattr(Attribution, "_keep_on", lambda self, tokens: torch.device("cpu"))
    small = attribute(pair, docs, tmp_path / "small", memory_budget_mb=16)
    assert sizes  # the grouping was asked
    a = pq.read_table(small.path / "units.parquet").to_pandas()
    b = pq.read_table(run.path / "units.parquet").to_pandas()
    order = ["unit", "doc_id", "window_pos"]
    a, b = a.sort_values(order).reset_index(drop=True), b.sort_values(order).reset_index(drop=True)
    assert len(a) == len(b) > 0
    np.testing.assert_allclose(a["kl"], b["kl"], rtol=1e-5, atol=1e-9)


def test_greedy_choice_by_kl_saved_per_extra_byte():
    """Hand-checked: 100 weights at 4 bits (50 bytes), budget 5 bits (62.5 bytes): 'a' saves
    most per byte, 'c' is free, 'b' would overflow, 'd' saves nothing."""
    from lmkl.attribution.recipe import choose_modules, predicted_kl

    kl = {"a": 0.3, "b": 0.5, "c": 0.01, "d": 0.0}
    low = {"a": 10, "b": 10, "c": 10, "d": 10}
    high = {"a": 20, "b": 30, "c": 10, "d": 20}
    choice = choose_modules(kl, low, high, 50, 100, 5.0)
    assert choice.names == ["c", "a"]
    assert choice.stored_bytes == 60 and choice.bits_per_weight == pytest.approx(4.8)
    assert [row["name"] for row in choice.order] == ["c", "a", "b"]
    assert choice.saved_kl == pytest.approx(0.31)
    assert predicted_kl(0.8, choice.saved_kl, 0.81) == pytest.approx(0.8 * (1 - 0.31 / 0.81))
    from lmkl.errors import UsageError

    with pytest.raises(UsageError, match="below LOW"):
        choose_modules(kl, low, high, 50, 100, 3.9)


@pytest.mark.parametrize("pair", ["llama", "gpt2"], indirect=True)
def test_candidate_in_another_dtype_is_bridged(pair, docs, tmp_path):
    """A bfloat16 candidate inside a float32 reference: borrowed modules get their inputs in
    bfloat16 and give float32 back; every unit is finite and the full candidate is compare's."""
    args = [str(pair["reference"]), str(pair["candidate"]), str(docs)]
    common = {"context_length": CONTEXT, "batch_size": 2, "compile": False}
    from lmkl.specs import ModelSpec

    ref = ModelSpec(model=args[0], dtype="float32")
    cand = ModelSpec(model=args[1], dtype="bfloat16")
    run = lmkl.api.attribute(ref, cand, args[2], out=tmp_path / "run", **common)
    compared = lmkl.api.compare(ref, cand, args[2], out=tmp_path / "compare", **common)
    assert run.results["full"] == compared.results["candidates"][0]["metrics"]
    assert run.results["candidate"]["dtype"] == "bfloat16"
    scored = [u for u in run.results["units"] if not u["identical"]]
    assert scored and all(np.isfinite(u["kl"]["mean"]) and u["kl"]["mean"] > 0 for u in scored)


def test_hidden_state_error_averages_only_finite_ratios():
    """A token whose reference hidden state is zero has no finite relative error: it is left
    out of the mean (not counted as a zero error), checked against NumPy."""
    from types import SimpleNamespace

    from lmkl.attribution.kind import _hidden_error
    from lmkl.attribution.results import _hidden_errors

    gen = torch.Generator().manual_seed(0)
    hp = torch.randn(1, 6, 4, generator=gen)
    hq = hp + 0.1 * torch.randn(1, 6, 4, generator=gen)
    hp[0, 2] = 0.0  # ‖h_P‖ = 0: an infinite ratio
    batch = SimpleNamespace(rows=torch.zeros(5, dtype=torch.long), cols=torch.arange(1, 6))
    found = _hidden_error(batch, [hp], [hq])
    p, q = hp[0, 1:6].double().numpy(), hq[0, 1:6].double().numpy()
    ratios = np.linalg.norm(q - p, axis=-1) / np.linalg.norm(p, axis=-1)
    assert np.isinf(ratios).sum() == 1
    want = ratios[np.isfinite(ratios)].mean()
    assert _hidden_errors([{"hidden_error": found}], 1) == [pytest.approx(want, rel=1e-12)]


@pytest.mark.parametrize("function", ["attribute", "build_reference_cache"])
def test_missing_data_is_a_usage_error(tmp_path, function):
    from lmkl.errors import UsageError

    if function == "attribute":
        call = lambda: lmkl.api.attribute("ref", "cand", None)  # noqa: E731
    else:
        call = lambda: lmkl.api.build_reference_cache("ref", None, tmp_path / "c")  # noqa: E731
    with pytest.raises(UsageError, match="no data given") as caught:
        call()
    assert caught.value.hint == "pass data=FILE_OR_DATASET"


@pytest.mark.parametrize("pair", ["llama"], indirect=True)
def test_one_document_resamples_windows_everywhere(pair, tmp_path):
    """One long document in several windows: the full candidate's CI (as compare's) and every
    unit's resample windows, from the same draws, so full.kl's and full_kl's intervals agree
    and none collapses to zero width."""
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"text": " ".join(tiny_corpus()[1][:4])[:1500]}) + "\n")
    run = lmkl.api.attribute(
        str(pair["reference"]),
        str(pair["candidate"]),
        str(one),
        out=tmp_path / "run",
        context_length=64,
        batch_size=4,
        dtype="float32",
        compile=False,
    )
    results = run.results
    assert results["data"]["documents"] == 1 and results["data"]["windows"] >= 4
    assert results["full"]["kl"]["ci_method"] == "window bootstrap"
    assert results["bootstrap"]["unit"] == "window"
    full, full_kl = results["full"]["kl"], results["full_kl"]
    assert (full["ci_low"], full["ci_high"]) == (full_kl["ci_low"], full_kl["ci_high"])
    assert full_kl["ci_low"] < full_kl["mean"] < full_kl["ci_high"]
    scored = [u for u in results["units"] if not u["identical"]]
    assert scored and all(u["kl"]["ci_low"] < u["kl"]["ci_high"] for u in scored)


@pytest.mark.parametrize(
    ("high", "message"),
    [
        ("candidate", "attribution needs matching modules: 'HIGH"),  # another structure
        ("missing", "missing-model"),  # no such model
        ("torchao:int4_weight_only:g256", "256"),  # groups wider than the layers
    ],
)
def test_a_bad_high_is_refused_before_scoring(tiny_pair, docs, tmp_path, high, message):
    """Everything about HIGH is checked in prepare: nothing is scored, no run directory is
    left, so the corrected command runs from scratch (no --resume refused)."""
    pytest.importorskip("torchao")
    given = {
        "candidate": str(tiny_pair["candidate"]),
        "missing": str(tmp_path / "missing-model"),
    }.get(high, high)
    out = tmp_path / "run"
    code, output = invoke(
        ["attribute", str(tiny_pair["reference"]), "--quantize", "torchao:int8_weight_only",
         "--high", given, "--budget-bits", "32", "--data", str(docs), "--out", str(out),
         "--context-length", str(CONTEXT), "--no-compile"]
    )  # fmt: skip
    assert code in (1, 2), output
    assert message in output, output
    assert "Traceback" not in output
    assert not out.exists()


def test_high_is_parsed_by_the_library_for_cli_and_python(tiny_pair, docs):
    """One parser for --high / high=: METHOD:SCHEME quantizes the reference, a name is a model
    loaded like the candidate without its own fields, a ModelSpec is used as it is; errors
    name the option or keyword actually used."""
    from lmkl.errors import UsageError
    from lmkl.specs import ModelSpec, QuantizeSpec, high_model_spec

    ref = ModelSpec(model="org/ref", revision="r1", dtype="float32")
    cand = ModelSpec(
        model="org/ref",
        dtype="bfloat16",
        device="cpu",
        label="low",
        adapter="org/adapter",
        quantize=QuantizeSpec(method="torchao", scheme="int4_weight_only", group_size=32),
    )
    quantized = high_model_spec("torchao:int8_weight_only", ref, cand)
    assert quantized.model == "org/ref" and quantized.revision == "r1"
    assert quantized.quantize == QuantizeSpec(method="torchao", scheme="int8_weight_only")
    assert (quantized.dtype, quantized.device, quantized.adapter) == ("bfloat16", "cpu", None)
    named = high_model_spec("models/high-Q8_0.gguf", ref, cand, "high")
    assert named.gguf_file == "high-Q8_0.gguf" and named.model == "models"
    assert (named.quantize, named.adapter, named.label, named.dtype) == (
        None,
        None,
        None,
        "bfloat16",
    )
    given = ModelSpec(model="x", dtype="float16")
    assert high_model_spec(given, ref, cand) is given
    with pytest.raises(UsageError) as caught:
        lmkl.api.attribute("org/ref", "org/cand", str(docs), high="torchao:int9", budget_bits=8)
    assert caught.value.message.startswith("high='torchao:int9': torchao has no scheme")
    code, output = invoke(
        ["attribute", str(tiny_pair["reference"]), str(tiny_pair["reference"]), "--data",
         str(docs), "--high", "torchao:int9", "--budget-bits", "8", "--no-compile"]
    )  # fmt: skip
    check_error(code, output, 2, "--high 'torchao:int9': torchao has no scheme")


def test_python_high_as_a_model_spec_beside_model_keywords(tiny_pair, docs, tmp_path):
    """Model keywords apply to the models given by name: a HIGH ModelSpec is not refused for
    them (the run gets as far as the budget check, which needs LOW loaded)."""
    from lmkl.errors import UsageError
    from lmkl.specs import ModelSpec

    with pytest.raises(UsageError, match=r"budget.bits.1 is below"):
        lmkl.api.attribute(
            str(tiny_pair["reference"]),
            str(tiny_pair["reference"]),
            str(docs),
            out=tmp_path / "run",
            high=ModelSpec(model=str(tiny_pair["reference"])),
            budget_bits=1,
            dtype="float32",
            context_length=CONTEXT,
            compile=False,
        )
    assert not (tmp_path / "run").exists()


def test_attribution_numbers_use_the_shared_formatter():
    """Interval ends that differ never print alike, a small share is not 0%, a ratio near 1
    shows its difference, a missing figure is '–' (lmkl.formatting throughout)."""
    from io import StringIO

    from rich.console import Console

    from lmkl.attribution.results import plain_summary
    from lmkl.attribution.terminal import kl_text, print_attribution, recipe_sentence

    kl = {"mean": 1.3002e-3, "ci_low": 1.3001e-3, "ci_high": 1.3004e-3}
    low, high = kl_text(kl).split("[")[1].rstrip("]").split(", ")
    assert low != high and float(low) == pytest.approx(1.3001e-3, rel=1e-9)
    units = [
        {"scope": "module", "name": "a", "layer": 0, "type": "a", "kl": {"mean": 0.996}},
        {"scope": "module", "name": "b", "layer": 0, "type": "b", "kl": {"mean": 0.004}},
    ]
    layers = [{"layer": 0, "modules_kl": 1.0}]
    summary = plain_summary(units, layers, 1.004, 1.0)
    assert "1.0040×" in summary and "0%" not in summary.replace("100%", "")
    recipe = {
        "high": ["a"], "bits_per_weight": 4.8125, "measured_kl": 0.01, "predicted_kl": 0.02,
        "better_than_low": True, "uniform_low_kl": 0.03, "uniform_high_kl": 0.001,
        "low_bits_per_weight": None, "high_bits_per_weight": 8.5,
    }  # fmt: skip
    sentence = recipe_sentence(recipe)
    assert "?" not in sentence and "at – bits" in sentence and "4.81 bits" in sentence
    results = {
        "full_kl": kl,
        "sum_of_modules": kl,
        "summary": "s",
        "units": [],
        "layers": [],
        "cost": {"layer_calls": 4, "full_forward_layer_calls": 1000},
    }
    out = StringIO()
    print_attribution(results, Console(file=out, width=80))
    assert "0.400% of one full forward" in out.getvalue()
