"""Adapters, chat caches, damaged inputs, infinite values and compile warnings (issue 10 defects).

Each test failed before its defect was fixed. Everything goes through the CLI
(``runtools.invoke``) and files on disk, except the statistics unit test.

A. PEFT adapters: pickle-only adapters are refused without --allow-pickle; the candidate's model
   description carries a content hash of the adapter weights.
B. ``lmkl cache`` on chat data keeps the score mask, reproduces the live run, and keys on score_on.
C. Damaged caches, runs and model directories give one ``error:`` line plus ``fix:``, never
   "internal error".
D. +inf KL is written as "inf" in worst.json; ln_ppl_ratio skips tokens both models give zero
   probability; targets beyond the output layer get probability zero instead of crashing.
E. A torch.compile fallback is one ``warning:`` line, not a raw Python warning.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from runtools import check_error, invoke
from transformers import AutoModelForCausalLM, AutoTokenizer

from lmkl.analysis.stats import summarize
from lmkl.errors import EXIT_RUNTIME, EXIT_USAGE

FAST = ["--context-length", "64", "--quiet"]

# Every turn is "<s>role\ncontent</s>" (as in tests/test_chat.py); <s>, </s> are special tokens.
TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
CONVERSATIONS = [
    [
        {"role": "system", "content": "You are a concise Python tutor."},
        {"role": "user", "content": "What does the assert statement do?"},
        {"role": "assistant", "content": "It raises AssertionError when the expression is false."},
        {"role": "user", "content": "Can I give it a message?"},
        {"role": "assistant", "content": "Yes: assert expression, message."},
    ],
    [
        {"role": "user", "content": "How do I define a function?"},
        {
            "role": "assistant",
            "content": "Use the def statement: def name(parameters): followed by an indented "
            "body. The function object is bound to the name in the current namespace.",
        },
    ],
    [
        {"role": "user", "content": "What is the difference between a list and a tuple?"},
        {"role": "assistant", "content": "A list is mutable; a tuple is immutable."},
    ],
]


def strict_json(path: Path):
    return json.loads(path.read_text(), parse_constant=lambda c: pytest.fail(f"{path}: {c}"))


def numbers(value):
    """Every number inside a JSON value."""
    if isinstance(value, bool):
        return
    if isinstance(value, int | float):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from numbers(v)
    elif isinstance(value, list):
        for v in value:
            yield from numbers(v)


def sorted_tokens(path: Path):
    table = pq.read_table(path / "tokens.parquet").drop_columns(["candidate"])
    return table.sort_by([("doc_id", "ascending"), ("position", "ascending")])


# =============================================================================================
# A. PEFT adapters


def _lora(candidate: Path, out: Path, seed: int, safe: bool) -> Path:
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(candidate, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(out, safe_serialization=safe)
    return out


@pytest.fixture(scope="module")
def adapters(tiny_pair, tmp_path_factory) -> dict[str, Path]:
    """Adapter A (safetensors and pickle-only), a byte-identical copy of A, and adapter B."""
    root = tmp_path_factory.mktemp("adapters")
    out = {
        "a": _lora(tiny_pair["candidate"], root / "a", 1, True),
        "a_bin": _lora(tiny_pair["candidate"], root / "a-bin", 1, False),
        "b": _lora(tiny_pair["candidate"], root / "b", 2, True),
    }
    assert sorted(p.name for p in out["a_bin"].glob("adapter_model.*")) == ["adapter_model.bin"]
    out["a_copy"] = root / "a-copy"
    shutil.copytree(out["a"], out["a_copy"])
    return out


def _adapter_args(tiny_pair, adapter: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "compare",
        str(tiny_pair["reference"]),
        str(tiny_pair["candidate"]),
        "--adapter",
        str(adapter),
        "--data",
        str(data),
        "--out",
        str(out),
        "--max-tokens",
        "40",
        *FAST,
        *extra,
    ]


def test_pickle_only_adapter_is_refused_unless_allowed(tiny_pair, adapters, small_jsonl, tmp_path):
    """A1: adapter_model.bin is pickle; it must be refused like pickle model weights are."""
    code, out = invoke(_adapter_args(tiny_pair, adapters["a_bin"], small_jsonl, tmp_path / "no"))
    line = check_error(code, out, EXIT_RUNTIME)
    assert "pickle" in line or "safetensors" in line, line
    assert "--allow-pickle" in out, out
    assert not (tmp_path / "no").exists()

    args = _adapter_args(tiny_pair, adapters["a_bin"], small_jsonl, tmp_path / "yes")
    code, out = invoke([*args, "--allow-pickle"])
    assert code == 0, out
    code, out = invoke(_adapter_args(tiny_pair, adapters["a"], small_jsonl, tmp_path / "safe"))
    assert code == 0, out
    assert sorted_tokens(tmp_path / "yes").equals(sorted_tokens(tmp_path / "safe"))


def test_adapter_weights_hash_is_part_of_the_model_description(
    tiny_pair, adapters, small_jsonl, tmp_path
):
    """A2: two adapters give two identities; the same bytes elsewhere give the same one."""
    described = {}
    for name in ("a", "a_copy", "b"):
        code, out = invoke(_adapter_args(tiny_pair, adapters[name], small_jsonl, tmp_path / name))
        assert code == 0, out
        model = strict_json(tmp_path / name / "results.json")["candidates"][0]["model"]
        assert "adapter_sha256" in model, sorted(model)
        described[name] = model["adapter_sha256"]
    assert isinstance(described["a"], str) and len(described["a"]) == 64
    assert described["a"] == described["a_copy"]  # a content hash, not a path
    assert described["a"] != described["b"]


# =============================================================================================
# B. Reference cache of chat data


@pytest.fixture(scope="module")
def chat(tiny_pair, tmp_path_factory) -> dict:
    """A reference with a chat template, chat data, and the result of `lmkl cache` on it."""
    root = tmp_path_factory.mktemp("chat-cache")
    reference = root / "reference"
    shutil.copytree(tiny_pair["reference"], reference)
    tok = AutoTokenizer.from_pretrained(reference)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(reference)
    data = root / "chat.jsonl"
    data.write_text("".join(json.dumps({"messages": m}) + "\n" for m in CONVERSATIONS))
    cache = root / "cache"
    code, out = invoke(
        ["cache", str(reference), "--data", str(data), "-c", "64", "--out", str(cache)]
    )
    return {"reference": reference, "data": data, "cache": cache, "code": code, "out": out}


def test_cache_of_chat_data_keeps_mask_and_matches_live(chat, tiny_pair, tmp_path):
    """B: the cache builds, stores each window's score mask and reproduces the live run."""
    assert chat["code"] == 0, chat["out"]
    windows = pq.read_table(chat["cache"] / "windows.parquet")
    assert "score_mask" in windows.column_names, windows.column_names

    cached, live = tmp_path / "cached", tmp_path / "live"
    code, out = invoke(
        ["compare", str(chat["cache"]), str(tiny_pair["candidate"]), "--out", str(cached), "-q"]
    )
    assert code == 0, out
    code, out = invoke(
        [
            "compare",
            str(chat["reference"]),
            str(tiny_pair["candidate"]),
            "--data",
            str(chat["data"]),
            "--out",
            str(live),
            *FAST,
        ]
    )
    assert code == 0, out
    a, b = sorted_tokens(cached), sorted_tokens(live)
    assert a.num_rows == b.num_rows > 0
    for name in ("doc_id", "window_id", "position", "window_pos", "token_id", "bytes"):
        assert a[name].to_pylist() == b[name].to_pylist(), name
    for name in b.column_names:
        if pa.types.is_floating(b[name].type):
            x = a[name].to_numpy(zero_copy_only=False).astype(np.float64)
            y = b[name].to_numpy(zero_copy_only=False).astype(np.float64)
            np.testing.assert_allclose(x, y, atol=1e-5, rtol=0, equal_nan=True, err_msg=name)
    ra, rb = strict_json(cached / "results.json"), strict_json(live / "results.json")
    assert ra["data"]["score_on"] == rb["data"]["score_on"] == "assistant"


def test_chat_cache_refuses_another_score_on(chat, tiny_pair, tmp_path):
    """B: score_on is part of the cache key; the cache's own setting is accepted."""
    assert chat["code"] == 0, chat["out"]
    base = ["compare", str(chat["cache"]), str(tiny_pair["candidate"]), "--data", str(chat["data"])]
    code, out = invoke([*base, "--out", str(tmp_path / "same"), "-q"])
    assert code == 0, out
    code, out = invoke([*base, "--score-on", "all", "--out", str(tmp_path / "all"), "-q"])
    check_error(code, out, EXIT_USAGE)
    assert "score" in out.lower(), out
    assert not (tmp_path / "all" / "results.json").exists()


# =============================================================================================
# C. Damaged inputs


def _documents(tiny_pair, path: Path, n: int = 2, chars: int = 800) -> Path:
    lines = tiny_pair["heldout"].read_text().splitlines()[:n]
    path.write_text(
        "".join(json.dumps({"text": json.loads(x)["text"][:chars]}) + "\n" for x in lines)
    )
    return path


@pytest.fixture(scope="module")
def text_cache(tiny_pair, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("text-cache")
    data = _documents(tiny_pair, root / "small.jsonl")
    cache = root / "cache"
    args = ["cache", str(tiny_pair["reference"]), "--data", str(data), "-c", "64"]
    code, out = invoke([*args, "--max-tokens", "80", "--out", str(cache)])
    assert code == 0, out
    return cache


def _damaged_copy(cache: Path, tmp_path: Path) -> Path:
    target = tmp_path / "damaged-cache"
    shutil.copytree(cache, target)
    return target


def _compare_cache(cache: Path, tiny_pair, out: Path) -> tuple[int, str]:
    return invoke(["compare", str(cache), str(tiny_pair["candidate"]), "--out", str(out), "-q"])


def test_cache_with_truncated_rows(text_cache, tiny_pair, tmp_path):
    """C1: rows.bin cut in half."""
    cache = _damaged_copy(text_cache, tmp_path)
    rows = cache / "rows.bin"
    rows.write_bytes(rows.read_bytes()[: rows.stat().st_size // 2])
    code, out = _compare_cache(cache, tiny_pair, tmp_path / "run")
    line = check_error(code, out, EXIT_RUNTIME)
    assert "rows.bin" in line or str(cache) in line, line


@pytest.mark.parametrize("key", ["counts", "rows", "vocab", "window_spec"])
def test_cache_manifest_missing_a_key(text_cache, tiny_pair, tmp_path, key):
    """C2: a manifest that is valid JSON, still says its format, but lacks a required key."""
    cache = _damaged_copy(text_cache, tmp_path)
    manifest = json.loads((cache / "manifest.json").read_text())
    assert manifest.get("format")
    del manifest[key]
    (cache / "manifest.json").write_text(json.dumps(manifest))
    code, out = _compare_cache(cache, tiny_pair, tmp_path / "run")
    check_error(code, out, EXIT_RUNTIME)


@pytest.mark.parametrize("damage", ["deleted", "garbage"])
def test_cache_with_broken_tokenizer(text_cache, tiny_pair, tmp_path, damage):
    """C3: the cache's tokenizer/ folder is gone, or its tokenizer.json is not JSON."""
    cache = _damaged_copy(text_cache, tmp_path)
    if damage == "deleted":
        shutil.rmtree(cache / "tokenizer")
    else:
        (cache / "tokenizer" / "tokenizer.json").write_text("{garbage")
    code, out = _compare_cache(cache, tiny_pair, tmp_path / "run")
    line = check_error(code, out, EXIT_RUNTIME)
    assert "tokenizer" in line, line


@pytest.fixture(scope="module")
def finished_run(tiny_pair, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("finished")
    data = _documents(tiny_pair, root / "small.jsonl")
    run = root / "run"
    code, out = invoke(
        [
            "compare",
            str(tiny_pair["reference"]),
            str(tiny_pair["candidate"]),
            "--data",
            str(data),
            "--out",
            str(run),
            "--max-tokens",
            "80",
            *FAST,
        ]
    )
    assert code == 0, out
    return run


def test_report_table_with_out_writes_the_file(finished_run, tmp_path):
    """C4: `--out` help says json and table print to stdout only by default: --out writes it."""
    target = tmp_path / "x.txt"
    code, out = invoke(["report", str(finished_run), "-f", "table", "--out", str(target)])
    assert code == 0, out
    assert "Traceback" not in out and "internal error" not in out
    assert target.is_file() and "Leaderboard" in target.read_text()


@pytest.mark.parametrize("command", ["report", "inspect"])
def test_run_with_damaged_tokens_parquet(finished_run, tmp_path, command):
    """C5: tokens.parquet truncated in a finished run."""
    run = tmp_path / "run"
    shutil.copytree(finished_run, run)
    tokens = run / "tokens.parquet"
    tokens.write_bytes(tokens.read_bytes()[: tokens.stat().st_size // 2])
    code, out = invoke([command, str(run)])
    line = check_error(code, out, EXIT_RUNTIME)
    assert "tokens.parquet" in line or str(run) in line, line


@pytest.mark.parametrize("content", ["{garbage", "", "[1, 2]", "null"])
def test_candidate_with_unreadable_config(tiny_pair, small_jsonl, tmp_path, content):
    """C6: a model directory whose config.json is not a JSON object."""
    model = tmp_path / "bad-model"
    shutil.copytree(tiny_pair["candidate"], model)
    (model / "config.json").write_text(content)
    code, out = invoke(
        [
            "compare",
            str(tiny_pair["reference"]),
            str(model),
            "--data",
            str(small_jsonl),
            "--out",
            str(tmp_path / "run"),
            "--max-tokens",
            "40",
            *FAST,
        ]
    )
    check_error(code, out, EXIT_RUNTIME, str(model))


# =============================================================================================
# D. Numerics


def _masking_candidate(candidate: Path, out: Path, token: int) -> Path:
    """The tiny candidate changed so that its logit for ``token`` is -inf at every position.

    Hidden dimension 0 is made a positive constant (embedding column 4, no layer writes to it,
    final-norm weight 1), and the head row of ``token`` is -inf on that dimension, 0 elsewhere:
    the logit is h_0 * -inf = -inf (never NaN, since h_0 > 0), every other logit stays finite.
    The reference gives ``token`` a positive probability everywhere, so KL(P||Q) = +inf.
    """
    model = AutoModelForCausalLM.from_pretrained(candidate, dtype=torch.float32)
    with torch.no_grad():
        model.model.embed_tokens.weight[:, 0] = 4.0
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight[0, :] = 0.0
            layer.mlp.down_proj.weight[0, :] = 0.0
        model.model.norm.weight[0] = 1.0
        model.lm_head.weight[token, :] = 0.0
        model.lm_head.weight[token, 0] = -math.inf
        logits = model(torch.tensor([[0, 5, 9, 33, 100, token]])).logits[0]
    assert torch.isneginf(logits[:, token]).all()
    assert torch.isfinite(torch.cat([logits[:, :token], logits[:, token + 1 :]], -1)).all()
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(candidate).save_pretrained(out)
    return out


def test_infinite_kl_is_written_as_inf_in_worst_json(tiny_pair, small_jsonl, tmp_path):
    """D1: worst.json says "inf", never float32's max (3.4e38), for a +inf KL."""
    masked = _masking_candidate(tiny_pair["candidate"], tmp_path / "masked", token=7)
    run = tmp_path / "run"
    code, out = invoke(
        [
            "compare",
            str(tiny_pair["reference"]),
            str(masked),
            "--data",
            str(small_jsonl),
            "--out",
            str(run),
            "--max-tokens",
            "40",
            *FAST,
        ]
    )
    assert code == 0, out
    kl = pq.read_table(run / "tokens.parquet")["kl"].to_numpy(zero_copy_only=False)
    assert np.isposinf(kl).all()  # the setup works: every scored token has +inf KL
    results = strict_json(run / "results.json")
    assert results["candidates"][0]["metrics"]["kl"]["max"] == "inf"
    worst = strict_json(run / "worst.json")
    assert worst
    assert [e["kl"] for e in worst] == ["inf"] * len(worst), [e["kl"] for e in worst][:3]
    for name, value in (("results.json", results), ("worst.json", worst)):
        big = [x for x in numbers(value) if abs(x) >= 1e38]
        assert not big, (name, big[:3])


def _columns(nll_reference: list[float], nll_candidate: list[float]) -> dict[str, np.ndarray]:
    n = len(nll_reference)
    gen = np.random.default_rng(0)
    columns = {
        name: gen.uniform(0.1, 0.9, n)
        for name in (
            "kl",
            "reverse_kl",
            "jsd",
            "entropy_reference",
            "entropy_candidate",
            "delta_p",
            "top1_agree",
            "top1_in_top5",
            "reference_top1_prob",
        )
    }
    columns["nll_reference"] = np.asarray(nll_reference)
    columns["nll_candidate"] = np.asarray(nll_candidate)
    columns["nonfinite"] = np.zeros(n, dtype=bool)
    columns["bytes"] = np.ones(n, dtype=np.int64)
    columns["doc_id"] = np.zeros(n, dtype=np.int64)
    columns["window_id"] = np.zeros(n, dtype=np.int64)
    return columns


def test_ln_ppl_ratio_skips_tokens_both_models_give_zero_probability():
    """D2: nll = +inf under both models is excluded from ln_ppl_ratio (and counted), not NaN."""
    inf = math.inf
    metrics = summarize(_columns([1.0, 2.0, inf, 3.0, inf, 0.5], [1.5, 2.5, inf, 2.0, inf, 1.0]))
    ratio = metrics["ln_ppl_ratio"]
    diffs = np.array([0.5, 0.5, -1.0, 0.5])
    assert ratio["mean"] == pytest.approx(diffs.mean()), ratio
    assert ratio["se"] == pytest.approx(diffs.std(ddof=1) / 2), ratio
    # The two excluded tokens are counted somewhere next to the ratio or in the counts.
    new = {k: v for k, v in {**ratio, **metrics["counts"]}.items() if k not in ("mean", "se")}
    assert 2 in [v for k, v in new.items() if k not in ("documents", "windows", "infinite")], new
    # Only one model at +inf is a real infinite ratio, not excluded.
    one_sided = summarize(_columns([1.0, 2.0, 3.0], [1.5, inf, 2.0]))["ln_ppl_ratio"]
    assert one_sided["mean"] == math.inf


@pytest.fixture(scope="module")
def grown_tokenizer_pair(tiny_pair, tmp_path_factory) -> dict[str, Path]:
    """Both tiny models with two tokens added to their tokenizer (514 ids, 512 output rows)."""
    root = tmp_path_factory.mktemp("grown-tokenizer")
    out = {}
    for name in ("reference", "candidate"):
        target = root / name
        shutil.copytree(tiny_pair[name], target)
        tok = AutoTokenizer.from_pretrained(target)
        tok.add_tokens(["zqxwv", "jjqkz"])
        tok.save_pretrained(target)
        out[name] = target
    lines = tiny_pair["heldout"].read_text().splitlines()[:3]
    data = root / "data.jsonl"
    # The new tokens end each document, so they are only ever predicted targets.
    data.write_text(
        "".join(json.dumps({"text": json.loads(x)["text"][:300] + " zqxwv"}) + "\n" for x in lines)
    )
    out["data"] = data
    out["new_id"] = AutoTokenizer.from_pretrained(out["reference"]).convert_tokens_to_ids("zqxwv")
    return out


def test_target_beyond_output_layer_gets_zero_probability(grown_tokenizer_pair, tmp_path):
    """D3: a target id >= the logits width is scored with probability zero (nll = +inf)."""
    pair = grown_tokenizer_pair
    assert pair["new_id"] >= 512
    run = tmp_path / "run"
    code, out = invoke(
        [
            "compare",
            str(pair["reference"]),
            str(pair["candidate"]),
            "--data",
            str(pair["data"]),
            "--out",
            str(run),
            "--stride",
            "32",
            *FAST,
        ]
    )
    assert code == 0, out
    table = pq.read_table(run / "tokens.parquet").to_pandas()
    beyond = table[table.token_id >= 512]
    assert len(beyond) == 3 and (beyond.token_id == pair["new_id"]).all()
    for column in ("nll_reference", "nll_candidate"):
        values = beyond[column].to_numpy(dtype=np.float64)
        assert (beyond.nonfinite | np.isposinf(values)).all(), (column, beyond)
    inside = table[table.token_id < 512]
    assert np.isfinite(inside.kl.to_numpy(dtype=np.float64)).all()
    results = strict_json(run / "results.json")
    counts = results["candidates"][0]["metrics"]["counts"]
    assert counts["tokens"] + counts["nonfinite"] == len(table)


# =============================================================================================
# E. torch.compile fallback


def test_compile_fallback_is_one_warning_line(tiny_pair, small_jsonl, tmp_path, monkeypatch):
    """E: a failing torch.compile falls back to eager with one `warning:` line."""

    def fail(*_args, **_kwargs):
        raise RuntimeError("no C++ compiler here")

    monkeypatch.setenv("LMKL_COMPILE_MIN_ELEMENTS", "0")  # compile even this tiny run
    monkeypatch.setenv("LMKL_NATIVE_KERNEL", "0")  # (on a CPU the native kernel comes first)
    monkeypatch.setattr(torch, "compile", fail)
    monkeypatch.setattr(torch._dynamo, "mark_dynamic", fail)  # also if a graph is cached
    run = tmp_path / "run"
    code, out = invoke(
        [
            "compare",
            str(tiny_pair["reference"]),
            str(tiny_pair["candidate"]),
            "--data",
            str(small_jsonl),
            "--out",
            str(run),
            "--max-tokens",
            "40",
            "--compile",
            "--context-length",
            "64",
        ]
    )
    assert code == 0, out
    assert strict_json(run / "results.json")["compute"]["kernel"] == "eager"
    warning_lines = [x for x in out.splitlines() if x.startswith("warning:")]
    assert len(warning_lines) == 1 and "torch.compile" in warning_lines[0], out
    assert "UserWarning" not in out and "warnings.warn" not in out, out
