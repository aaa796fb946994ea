"""Mixed-precision recipes: a LOW model with some modules from a HIGH one, as a candidate.

LOW is the tiny reference quantized to torchao int4 (groups of 32), HIGH the same model in
torchao int8; the mixed model's KL is checked against a float64 forward on weights
dequantized here from each scheme's definition, and its size against a count of what each
scheme stores.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from runtools import check_error, invoke, short_documents
from scipy import special
from transformers import AutoModelForCausalLM, AutoTokenizer

pytest.importorskip("torchao")

#: Modules of the tiny Llama taken from HIGH in the recipe tests (two layers, two kinds).
HIGH_MODULES = ["model.layers.0.mlp.down_proj", "model.layers.1.self_attn.q_proj"]
COMMON = ["--context-length", "64", "--stride", "32", "--batch-size", "4", "--quiet"]


def _spec(tiny_pair, scheme: str, group: int | None = None):
    from lmkl.specs import ModelSpec

    quantize = {"method": "torchao", "scheme": scheme, "group_size": group}
    return ModelSpec(
        model=str(tiny_pair["reference"]), dtype="float32", device="cpu", quantize=quantize
    )


def _low(tiny_pair):
    return _spec(tiny_pair, "int4_weight_only", 32)


def _high(tiny_pair):
    return _spec(tiny_pair, "int8_weight_only")


def _load(spec):
    from lmkl.models import load_model

    return load_model(spec, torch.device("cpu"))


def _write_recipe(tiny_pair, path: Path, modules: list[str]) -> Path:
    from lmkl.models.mixed import Recipe, write_recipe

    recipe = Recipe(low=_low(tiny_pair), high=_high(tiny_pair), high_modules=modules)
    return write_recipe(path, recipe)


def _logits(model: torch.nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids).logits


@pytest.fixture(scope="module")
def ids(tiny_pair) -> torch.Tensor:
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair["reference"])
    text = json.loads(tiny_pair["heldout"].read_text().splitlines()[0])["text"][:300]
    return torch.tensor([tokenizer(text)["input_ids"][:48]])


def test_all_modules_from_high_is_high_and_none_is_low(tiny_pair, ids):
    from lmkl.models.mixed import build_mixed_model, module_bytes

    high = _load(_high(tiny_pair)).model
    every = list(module_bytes(high))
    assert "model.layers.0.mlp.down_proj" in every and "lm_head" in every
    mixed = build_mixed_model(_load(_low(tiny_pair)).model, high, every)
    want_high = _logits(_load(_high(tiny_pair)).model, ids)  # loaded again, independently
    assert torch.equal(_logits(mixed, ids), want_high)

    low = _load(_low(tiny_pair)).model
    unchanged = build_mixed_model(low, _load(_high(tiny_pair)).model, [])
    want_low = _logits(_load(_low(tiny_pair)).model, ids)
    assert torch.equal(_logits(unchanged, ids), want_low)
    assert not torch.equal(want_low, want_high)


def test_module_bytes_count_what_each_scheme_stores(tiny_pair):
    """int4 g32: 4 bits per value, a float32 scale and a 4-bit zero point per group of 32;
    int8: 8 bits, a float32 scale and an int8 zero point per row; the rest float32. The
    modules add up to the model's stored bytes."""
    from lmkl.models.mixed import module_bytes
    from lmkl.quantization import weight_storage

    model = _load(_low(tiny_pair)).model
    table = module_bytes(model)
    for name, module in model.named_modules():
        if name.endswith("down_proj"):
            rows, cols = module.out_features, module.in_features
            assert table[name] == rows * cols * 4 // 8 + rows * (cols // 32) * (4 + 0.5)
    norm = model.get_submodule("model.norm").weight
    assert table["model.norm"] == norm.numel() * 4
    assert sum(table.values()) == weight_storage(model)["weight_bytes"]
    high = module_bytes(_load(_high(tiny_pair)).model)
    down = model.get_submodule("model.layers.0.mlp.down_proj")
    rows, cols = down.out_features, down.in_features
    assert high["model.layers.0.mlp.down_proj"] == rows * cols + rows * (4 + 1)


def test_mixed_storage_is_the_built_models_stored_size(tiny_pair):
    """The size predicted from the two models' module tables is what the mixed model stores."""
    from lmkl.models.mixed import build_mixed_model, mixed_storage
    from lmkl.quantization import weight_storage

    low, high = _load(_low(tiny_pair)), _load(_high(tiny_pair))
    predicted = mixed_storage(low, high, [*HIGH_MODULES, "model.layers.1.mlp"])
    built = build_mixed_model(low.model, high.model, [*HIGH_MODULES, "model.layers.1.mlp"])
    storage = weight_storage(built)
    assert predicted["weight_bytes"] == storage["weight_bytes"]
    assert predicted["bits_per_weight"] == storage["bits_per_weight"]


def test_names_and_shapes_are_checked_in_one_line(tiny_pair):
    from lmkl.errors import UsageError
    from lmkl.models.mixed import build_mixed_model

    low = AutoModelForCausalLM.from_pretrained(tiny_pair["reference"], dtype=torch.float32)
    other = AutoModelForCausalLM.from_pretrained(tiny_pair["candidate"], dtype=torch.float32)
    with pytest.raises(UsageError, match=r"module 'model\.layers\.0\.mlp\.nope' is not in the LOW"):
        build_mixed_model(low, low, ["model.layers.0.mlp.nope"])
    with pytest.raises(UsageError, match="differs between LOW and HIGH"):
        build_mixed_model(low, other, ["model.layers.0.mlp.down_proj"])


def _dequantized(weight: torch.Tensor) -> torch.Tensor:
    """A torchao weight's values from its parts: (q − zero point) × scale, per block."""
    rows, cols = weight.shape
    block = weight.block_size[-1]
    q = weight.qdata.double().reshape(rows, cols // block, block)
    zero = weight.zero_point.double().reshape(rows, cols // block, 1)
    scale = weight.scale.double().reshape(rows, cols // block, 1)
    return ((q - zero) * scale).reshape(rows, cols)


def _float64_mixed_kl(tiny_pair, data: Path, modules: list[str]) -> dict[tuple[int, int], float]:
    """KL(P‖mixed) per (document, position) in float64: the reference's forward against a copy
    of it whose linear weights are LOW's (HIGH's for ``modules``), dequantized above."""
    reference = AutoModelForCausalLM.from_pretrained(tiny_pair["reference"]).double().eval()
    mixed = AutoModelForCausalLM.from_pretrained(tiny_pair["reference"]).double().eval()
    sources = {"low": _load(_low(tiny_pair)).model, "high": _load(_high(tiny_pair)).model}
    swapped = 0
    with torch.no_grad():
        for name, module in mixed.named_modules():
            if isinstance(module, torch.nn.Linear):
                source = sources["high" if name in modules else "low"].get_submodule(name)
                if type(source.weight) is not torch.nn.Parameter:  # quantized
                    module.weight.copy_(_dequantized(source.weight))
                    swapped += 1
    assert swapped >= 14  # every decoder linear (and the output layer where quantized)
    tokenizer = AutoTokenizer.from_pretrained(tiny_pair["reference"])
    out = {}
    for doc, line in enumerate(data.read_text().splitlines()):
        ids = tokenizer(json.loads(line)["text"])["input_ids"]
        assert len(ids) <= 64  # one window per document
        window = torch.tensor([ids])
        with torch.no_grad():
            lp, lq = (
                special.log_softmax(m(window).logits[0].numpy(), -1) for m in (reference, mixed)
            )
        for pos in range(1, len(ids)):
            out[(doc, pos)] = special.rel_entr(np.exp(lp[pos - 1]), np.exp(lq[pos - 1])).sum()
    return out


def test_compare_recipe_equals_float64_on_the_mixed_weights(tiny_pair, tmp_path):
    data = short_documents(tiny_pair, tmp_path, 120)
    recipe = _write_recipe(tiny_pair, tmp_path / "mix.yaml", HIGH_MODULES)
    out = tmp_path / "run"
    code, output = invoke(
        ["compare", str(tiny_pair["reference"]), "--recipe", str(recipe), "--data", str(data),
         "--out", str(out), "--dtype", "float32", "--device", "cpu", *COMMON]
    )  # fmt: skip
    assert code == 0, output
    table = pq.read_table(out / "tokens.parquet").to_pylist()
    assert {r["candidate"] for r in table} == {"recipe:mix"}
    want = _float64_mixed_kl(tiny_pair, data, HIGH_MODULES)
    assert {(r["doc_id"], r["position"]) for r in table} == set(want)
    worst = max(abs(r["kl"] - want[(r["doc_id"], r["position"])]) for r in table)
    assert worst <= 1e-7, worst  # float32 kernels against float64: ~3e-9 measured
    # LOW alone is far from it: the two modules from HIGH are in the numbers above.
    low_only = _float64_mixed_kl(tiny_pair, data, [])
    apart = max(abs(r["kl"] - low_only[(r["doc_id"], r["position"])]) for r in table)
    assert apart > 100 * 1e-7, apart  # ~1.8e-5 measured

    # The size shown is the mixed model's stored bytes: LOW's, with the chosen modules at int8.
    results = json.loads((out / "results.json").read_text())
    model = results["candidates"][0]["model"]
    assert model["quantization"]["kind"] == "recipe"
    low, high = (_load(s).description for s in (_low(tiny_pair), _high(tiny_pair)))
    from lmkl.models.mixed import module_bytes

    low_table = module_bytes(_load(_low(tiny_pair)).model)
    high_table = module_bytes(_load(_high(tiny_pair)).model)
    extra = sum(high_table[n] - low_table[n] for n in HIGH_MODULES)
    assert model["weight_bytes"] == low["weight_bytes"] + extra
    assert low["bits_per_weight"] < model["bits_per_weight"] < high["bits_per_weight"]


def test_experiment_recipe_candidate_validates(tiny_pair, tmp_path):
    """``recipe: FILE`` in YAML: found beside the config, labelled by its file name, its model
    fields LOW's, its dtype and device the candidate's."""
    from lmkl.experiment.schema import load_config

    directory = tmp_path / "study"
    directory.mkdir()
    _write_recipe(tiny_pair, directory / "mix.yaml", HIGH_MODULES)
    config = directory / "study.yaml"
    config.write_text(
        f"""
name: recipe-study
reference: {{model: {tiny_pair["reference"]}, dtype: float32, device: cpu}}
candidates:
  - {{recipe: mix.yaml, dtype: float32, device: cpu}}
  - {{label: int8, model: {tiny_pair["reference"]},
      quantize: {{method: torchao, scheme: int8_weight_only}}}}
datasets: [{{source: {tiny_pair["heldout"]}}}]
"""
    )
    loaded = load_config(config)
    candidate = loaded.candidates[0]
    assert candidate.label == "recipe:mix"
    assert Path(candidate.recipe) == directory / "mix.yaml"
    assert candidate.model == str(tiny_pair["reference"])
    assert candidate.quantize.scheme == "int4_weight_only"
    assert candidate.quantize.group_size == 32


def test_bad_recipe_files_are_one_line_exit_2(tiny_pair, tmp_path):
    data = short_documents(tiny_pair, tmp_path, 120)
    bad_yaml = tmp_path / "broken.yaml"
    bad_yaml.write_text("low: [unclosed\n")
    no_high = tmp_path / "nohigh.yaml"
    no_high.write_text(yaml.safe_dump({"low": {"model": str(tiny_pair["reference"])}}))
    nested = tmp_path / "nested.yaml"
    nested.write_text(
        yaml.safe_dump({"low": {"model": "x", "recipe": "y.yaml"}, "high": {"model": "x"}})
    )
    itself = tmp_path / "itself.yaml"
    itself.write_text(yaml.safe_dump({"low": {"recipe": str(itself)}, "high": {"model": "x"}}))
    cases = {
        tmp_path / "missing.yaml": "not found",
        bad_yaml: "is not valid YAML",
        no_high: "high: Field required",
        nested: "low: must be a model, not a recipe",
        itself: "low: must be a model, not a recipe",
    }
    for path, message in cases.items():
        code, output = invoke(
            ["compare", str(tiny_pair["reference"]), "--recipe", str(path), "--data", str(data),
             "--out", str(tmp_path / "r"), *COMMON]
        )  # fmt: skip
        check_error(code, output, 2, message, path.name)
        assert "fix: pass a recipe.yaml" in output
    assert not (tmp_path / "r").exists()


def test_unknown_module_in_a_recipe_is_one_line(tiny_pair, tmp_path):
    data = short_documents(tiny_pair, tmp_path, 120)
    recipe = _write_recipe(tiny_pair, tmp_path / "typo.yaml", ["model.layers.0.mlp.down"])
    code, output = invoke(
        ["compare", str(tiny_pair["reference"]), "--recipe", str(recipe), "--data", str(data),
         "--out", str(tmp_path / "r"), "--device", "cpu", *COMMON]
    )  # fmt: skip
    check_error(code, output, 2, "module 'model.layers.0.mlp.down' is not in the LOW model")


def test_llama_quantize_arguments_name_tensors_of_the_file(tiny_pair, tmp_path):
    """Every module's ``--tensor-type`` pattern matches exactly one tensor of a GGUF file of
    the model (llama-quantize searches it as a regular expression); the embeddings and the
    output layer take their own options; norms take none."""
    gguf = pytest.importorskip("gguf")
    from gguf_files import write_gguf

    from lmkl.models.mixed import gguf_tensor_type_args, module_bytes

    path = write_gguf(tiny_pair["reference"], tmp_path / "model-Q8_0.gguf", "Q8_0")
    names = [t.name for t in gguf.GGUFReader(str(path)).tensors]
    model = AutoModelForCausalLM.from_pretrained(tiny_pair["reference"])
    modules = list(module_bytes(model))
    args = gguf_tensor_type_args(modules, "Q8_0")
    options = args[0::2]
    values = args[1::2]
    assert set(options) == {"--tensor-type", "--token-embedding-type", "--output-tensor-type"}
    patterns = [v for o, v in zip(options, values, strict=True) if o == "--tensor-type"]
    linears = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    assert len(patterns) == len(linears) - 1  # lm_head: --output-tensor-type
    for pattern in patterns:
        tensor, _, kind = pattern.rpartition("=")
        assert kind == "q8_0"
        assert len([n for n in names if re.search(tensor, n)]) == 1, pattern
    assert "token_embd.weight" in names and "output.weight" in names
    assert gguf_tensor_type_args(["model.layers.1.mlp.gate_proj"], "Q6_K") == [
        "--tensor-type",
        r"^blk\.1\.ffn_gate\.weight$=q6_K",  # llama.cpp spells K-quants so
    ]


def test_gguf_recipe_size_is_that_of_the_files_tensors(tiny_pair, tmp_path):
    """LOW and HIGH as GGUF files (Q4_0, Q8_0): the recipe candidate's size is LOW's file with
    the chosen modules at Q8_0 (34 bytes per block of 32 instead of 18), not the float32
    tensors they load as; its KL sits between LOW's and HIGH's."""
    pytest.importorskip("gguf")
    from gguf_files import write_gguf

    from lmkl.models.mixed import Recipe, module_bytes, write_recipe
    from lmkl.specs import ModelSpec

    files = {
        t: write_gguf(tiny_pair["reference"], tmp_path / f"m-{t}.gguf", t) for t in ("Q4_0", "Q8_0")
    }
    modules = ["model.layers.0.mlp.down_proj", "model.layers.1.mlp.down_proj", "lm_head"]
    recipe = Recipe(
        low=ModelSpec(model=str(files["Q4_0"])),
        high=ModelSpec(model=str(files["Q8_0"])),
        high_modules=modules,
    )
    path = write_recipe(tmp_path / "gguf-mix.yaml", recipe)
    data = short_documents(tiny_pair, tmp_path, 120)
    out = tmp_path / "run"
    code, output = invoke(
        ["compare", str(tiny_pair["reference"]), str(files["Q4_0"]), str(files["Q8_0"]),
         "--recipe", str(path), "--data", str(data), "--out", str(out), "--device", "cpu",
         *COMMON]
    )  # fmt: skip
    assert code == 0, output
    entries = {c["label"]: c for c in json.loads((out / "results.json").read_text())["candidates"]}
    mixed = entries["recipe:gguf-mix"]
    low = entries["m-Q4_0"]
    reference = AutoModelForCausalLM.from_pretrained(tiny_pair["reference"])
    extra = sum(reference.get_submodule(m).weight.numel() * (34 - 18) // 32 for m in modules)
    assert mixed["model"]["weight_bytes"] == low["model"]["weight_bytes"] + extra
    assert mixed["model"]["size_source"] == "GGUF tensors, mixed"
    assert mixed["model"]["loaded_bits_per_weight"] == pytest.approx(32, abs=0.1)
    kl = {k: e["metrics"]["kl"]["mean"] for k, e in entries.items()}
    assert kl["m-Q8_0"] < kl["recipe:gguf-mix"] < kl["m-Q4_0"]

    from lmkl.models import load_model

    loaded = load_model(ModelSpec(recipe=str(path), device="cpu"))
    table = module_bytes(loaded)
    assert table["lm_head"] == reference.lm_head.weight.numel() * 34 // 32
    assert (
        table["model.layers.0.mlp.up_proj"]
        == reference.get_submodule("model.layers.0.mlp.up_proj").weight.numel() * 18 // 32
    )


def test_resume_after_editing_the_recipe_is_refused(tiny_pair, tmp_path):
    """A recipe candidate's identity pins the recipe file and HIGH, not only LOW's weights:
    after recipe.yaml's high_modules change, --resume of a stopped run refuses with the
    identity message (and resumes as before with the file restored)."""
    from runtools import kill_at

    from lmkl.models import weights_identity
    from lmkl.specs import ModelSpec

    data = short_documents(tiny_pair, tmp_path, 120)
    recipe = _write_recipe(tiny_pair, tmp_path / "mix.yaml", HIGH_MODULES)
    original = recipe.read_text()
    out = tmp_path / "run"
    args = ["compare", str(tiny_pair["reference"]), "--recipe", str(recipe), "--data", str(data),
            "--out", str(out), "--dtype", "float32", "--device", "cpu", *COMMON]  # fmt: skip
    kill_at(args, "part-done:0")  # stopped with its first part scored
    assert (out / "parts" / "part-000000.parquet").exists()

    edited = yaml.safe_load(original)
    edited["high_modules"] = HIGH_MODULES[:1]
    recipe.write_text(yaml.safe_dump(edited))
    code, output = invoke([*args, "--resume"])
    check_error(code, output, 1, "cannot resume", "inputs changed", "models")
    assert (out / "parts" / "part-000000.parquet").exists()  # nothing computed is lost

    # A run that reads the candidate's identity without loading it sees the edit too.
    spec = ModelSpec(recipe=str(recipe), device="cpu")
    changed = weights_identity(spec)["recipe_identity"]
    recipe.write_text(original)
    pinned = weights_identity(spec)["recipe_identity"]
    assert pinned != changed and pinned["high_modules"] == sorted(HIGH_MODULES)
    code, output = invoke([*args, "--resume"])
    assert code == 0, output
    results = json.loads((out / "results.json").read_text())
    assert results["provenance"]["resumed_parts"] >= 1
    recorded = results["candidates"][0]["model"]["recipe_identity"]
    assert recorded == pinned  # the loaded model pins what the probe pins
    assert recorded["high"]["quantize"]["scheme"] == "int8_weight_only"


def test_mixed_model_reports_its_own_batch_dependence(tiny_pair, tmp_path, monkeypatch):
    """The mixed model is probed after it is built: its description holds the batch dependence
    measured on it (here made batch-coupled only once mixed, so LOW's own probe finds none),
    the number recomputed here from its forwards."""
    from lmkl.models import head_split, load_model
    from lmkl.specs import ModelSpec

    recipe = _write_recipe(tiny_pair, tmp_path / "mix.yaml", HIGH_MODULES)
    spec = ModelSpec(recipe=str(recipe), device="cpu", dtype="float32")
    plain = load_model(spec)
    assert plain.description["batch_dependence"] == plain.batch_dependence
    assert plain.batch_dependence["probe_tokens"] == 8

    real, seen = head_split.make_head, set()

    def make_head(model):
        if id(model) in seen:  # the second split of LOW's model object: the mixed model
            # Every token moves with the mean over the whole forward, all rows alike (the
            # way LLM.int8()'s batch-wide outlier columns couple tokens, only larger).
            model.model.norm.register_forward_hook(
                lambda _m, _i, out: out + 0.5 * out.mean(dim=(0, 1), keepdim=True)
            )
        seen.add(id(model))
        return real(model)

    monkeypatch.setattr(head_split, "make_head", make_head)
    mixed = load_model(spec)
    found = mixed.description["batch_dependence"]
    assert found == mixed.batch_dependence and found["significant"] is True

    # Recomputed: the probe row alone and next to the probe's random companions.
    ids = head_split._probe_inputs(mixed)[0]
    vocab = min(mixed.logits_width, len(mixed.tokenizer))
    gen = torch.Generator().manual_seed(2)
    alone = _logits(mixed.model, ids)[0].double()
    diffs = []
    for _ in range(found["companion_sets"]):
        companions = torch.randint(0, vocab, (2, ids.shape[1]), generator=gen)
        batched = _logits(mixed.model, torch.cat([ids, companions]))[0].double()
        diffs.append(float((alone - batched).abs().max()))
    assert max(diffs) > 0.01
    assert found["max_abs_logit_diff"] == pytest.approx(max(diffs), rel=1e-5)


def test_ggml_type_names_are_llama_cpps_spelling():
    """llama-quantize parses types by llama.cpp's ggml_type_name: K-quants keep a capital K."""
    from lmkl.models.mixed import ggml_type_name, gguf_tensor_type_args

    names = ["Q4_K", "Q6_K", "Q8_0", "F16", "BF16", "IQ4_XS", "Q2_K", "TQ1_0"]
    want = ["q4_K", "q6_K", "q8_0", "f16", "bf16", "iq4_xs", "q2_K", "tq1_0"]
    assert [ggml_type_name(n) for n in names] == want
    unmapped: list[str] = []
    table = {"blk.0.ffn_down.weight": "q6_K", "token_embd.weight": "q4_K"}
    args = gguf_tensor_type_args(
        ["model.layers.0.mlp.down_proj", "model.embed_tokens", "model.layers.0.mlp.up_proj"],
        table,
        unmapped,
    )
    assert args == [
        "--tensor-type",
        r"^blk\.0\.ffn_down\.weight$=q6_K",
        "--token-embedding-type",
        "q4_K",
    ]
    assert unmapped == ["model.layers.0.mlp.up_proj"]  # not in HIGH's table: a note, no error


def test_recipe_measurement_loads_high_after_the_mixed_model(tmp_path):
    """The attribution's measurement loads HIGH itself, once the mixed model is built (whose
    own HIGH is freed by then): the caller holds no HIGH, so at most the reference, LOW and
    one HIGH are in memory, never two HIGHs."""
    from lmkl.attribution.recipe import Choice, measure_recipe
    from lmkl.specs import ModelSpec

    events: list[str] = []

    def load(spec: ModelSpec) -> object:
        events.append("mixed" if spec.recipe else f"load {spec.model}")
        return object()

    def run(specs: list[ModelSpec], models: object, out: object) -> object:
        events.append("measure")
        entries = [
            {"label": s.display_name, "metrics": {"kl": {"mean": 0.1 * (i + 1)}},
             "model": {"bits_per_weight": 5.0}}
            for i, s in enumerate(specs)
        ]  # fmt: skip
        return type("Outcome", (), {"results": {"candidates": entries}})()

    summary, _ = measure_recipe(
        reference=object(),
        reference_spec=ModelSpec(model="ref"),
        low_spec=ModelSpec(model="low"),
        high_spec=ModelSpec(model="high"),
        choice=Choice(["m"], 60, 100, 0.2),
        uniform_low_kl=0.3,
        isolated_total=0.4,
        run_comparison=run,
        load_model=load,
    )
    assert events == ["mixed", "load high", "measure"]
    assert summary["measured_kl"] == pytest.approx(0.1)
    assert summary["uniform_high_kl"] == pytest.approx(0.2)
