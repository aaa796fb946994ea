"""Chat data: rendering with the reference's chat template and scoring only assistant tokens."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from transformers import AutoTokenizer
from typer.testing import CliRunner

from lmkl.cli import app
from lmkl.data.chat import encode_chat, encode_prompt
from lmkl.engine.token_compare import run_comparison
from lmkl.errors import DataError
from lmkl.specs import ComputeSpec, DataSpec, ModelSpec, OutputSpec, WindowSpec

CHAT_DATA = Path(__file__).resolve().parents[1] / "configs" / "chat.jsonl"

# Every turn is "<s>role\ncontent</s>"; <s> and </s> are special tokens of the tiny tokenizer,
# so turn boundaries are token boundaries and the assistant tokens can be counted independently.
TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)
GENERATION_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n"
    "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] }}</s>{% endgeneration %}"
    "{% else %}{{ m['content'] }}</s>{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_reference(tiny_pair, tmp_path_factory) -> Path:
    """A copy of the tiny reference whose tokenizer has a chat template."""
    target = tmp_path_factory.mktemp("chat") / "reference"
    shutil.copytree(tiny_pair["reference"], target)
    tok = AutoTokenizer.from_pretrained(target)
    tok.chat_template = TEMPLATE
    tok.save_pretrained(target)
    return target


def conversations() -> list[list[dict]]:
    return [json.loads(line)["messages"] for line in CHAT_DATA.read_text().splitlines()]


def assistant_tokens(tok, messages: list[dict]) -> list[int]:
    """Independent: the tokens of each assistant content plus its closing </s>, in order."""
    out = []
    for m in messages:
        if m["role"] == "assistant":
            out += tok(m["content"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    return out


def compare(chat_reference, tiny_pair, out: Path, *extra: str):
    return CliRunner().invoke(
        app,
        [
            "compare",
            str(chat_reference),
            str(tiny_pair["candidate"]),
            "--data",
            str(CHAT_DATA),
            "--out",
            str(out),
            *extra,
        ],
    )


def test_only_assistant_tokens_are_scored_end_to_end(chat_reference, tiny_pair, tmp_path):
    result = compare(chat_reference, tiny_pair, tmp_path / "a", "--score-on", "assistant")
    assert result.exit_code == 0, result.output
    tokens = pq.read_table(tmp_path / "a" / "tokens.parquet").to_pandas()
    tok = AutoTokenizer.from_pretrained(chat_reference)
    for doc_id, messages in enumerate(conversations()):
        got = tokens[tokens.doc_id == doc_id].sort_values("position").token_id.tolist()
        assert got == assistant_tokens(tok, messages)
    results = json.loads((tmp_path / "a" / "results.json").read_text())
    assert results["data"]["format"] == "chat" and results["data"]["score_on"] == "assistant"
    want = sum(len(assistant_tokens(tok, m)) for m in conversations())
    assert results["candidates"][0]["metrics"]["counts"]["tokens"] == want
    assert results["data"]["scored_tokens"] == want

    # The same positions scored without the mask carry the same values (the mask selects rows,
    # it does not change them), and "all" scores every token after the first.
    assert compare(chat_reference, tiny_pair, tmp_path / "b", "--score-on", "all").exit_code == 0
    every = pq.read_table(tmp_path / "b" / "tokens.parquet").to_pandas()
    rendered = [tok.apply_chat_template(m, tokenize=False) for m in conversations()]
    assert len(every) == sum(
        len(tok(r, add_special_tokens=False)["input_ids"]) - 1 for r in rendered
    )
    merged = tokens.merge(every, on=["doc_id", "position"], suffixes=("", "_all"))
    assert len(merged) == len(tokens)
    np.testing.assert_allclose(merged.kl, merged.kl_all, atol=1e-6)
    assert (merged.token_id == merged.token_id_all).all()


def test_sliding_windows_and_token_budget_keep_the_mask(chat_reference, tiny_pair, tmp_path):
    tok = AutoTokenizer.from_pretrained(chat_reference)
    want = sum(len(assistant_tokens(tok, m)) for m in conversations())

    def run(name: str, **compute) -> dict:
        return run_comparison(
            ModelSpec(model=str(chat_reference), label="ref"),
            [ModelSpec(model=str(tiny_pair["candidate"]), label="cand")],
            DataSpec(source=str(CHAT_DATA)),
            WindowSpec(context_length=24, stride=8),
            ComputeSpec(batch_size=4, **compute),
            OutputSpec(dir=str(tmp_path / name)),
        ).results

    # Short windows: long conversations are cut, yet every assistant token is scored once.
    assert run("slide")["candidates"][0]["metrics"]["counts"]["tokens"] == want
    tokens = pq.read_table(tmp_path / "slide" / "tokens.parquet").to_pandas()
    assert not tokens.duplicated(["doc_id", "position"]).any()
    assert run("budget", max_tokens=37)["candidates"][0]["metrics"]["counts"]["tokens"] == 37


def test_tokenizer_without_chat_template_is_a_one_line_error(tiny_pair, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "compare",
            str(tiny_pair["reference"]),
            str(tiny_pair["candidate"]),
            "--data",
            str(CHAT_DATA),
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert result.exit_code == 1
    assert "has no chat template" in result.output and "fix:" in result.output
    assert "Traceback" not in result.output


def test_score_on_assistant_needs_chat_data(tiny_pair, small_jsonl, tmp_path):
    result = CliRunner().invoke(
        app,
        [
            "compare",
            str(tiny_pair["reference"]),
            str(tiny_pair["candidate"]),
            "--data",
            str(small_jsonl),
            "--score-on",
            "assistant",
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert result.exit_code == 1 and "needs chat data" in result.output


def test_generation_markers_give_the_same_mask(chat_reference):
    tok = AutoTokenizer.from_pretrained(chat_reference)
    for messages in conversations():
        ids, sizes, mask = encode_chat(tok, messages, "assistant")
        tok.chat_template = GENERATION_TEMPLATE
        ids2, _, mask2 = encode_chat(tok, messages, "assistant")
        tok.chat_template = TEMPLATE
        assert ids == ids2 and mask == mask2
        assert [i for i, m in zip(ids, mask, strict=True) if m] == assistant_tokens(tok, messages)
        rendered = tok.apply_chat_template(messages, tokenize=False)
        assert sum(sizes) == len(rendered.encode())


def test_template_that_rewrites_history_is_refused(chat_reference):
    tok = AutoTokenizer.from_pretrained(chat_reference)
    # Drops every assistant turn but the last one, as reasoning templates do with their thoughts.
    tok.chat_template = (
        "{% for m in messages %}{% if m['role'] != 'assistant' or loop.last %}"
        "<s>{{ m['role'] }}\n{{ m['content'] }}</s>{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
    )
    with pytest.raises(DataError, match="rewrites earlier turns"):
        encode_chat(tok, conversations()[0], "assistant")


def test_chat_prompt_ends_with_the_generation_prompt(chat_reference):
    tok = AutoTokenizer.from_pretrained(chat_reference)
    ids = encode_prompt(tok, [{"role": "user", "content": "What is a list?"}])
    assert tok.decode(ids) == "<s>user\nWhat is a list?</s><s>assistant\n"
    with pytest.raises(DataError, match="ends with an assistant"):
        encode_prompt(tok, conversations()[1])


def test_conversations_without_assistant_turns_are_an_error(chat_reference, tiny_pair, tmp_path):
    data = tmp_path / "users.jsonl"
    data.write_text(json.dumps({"messages": [{"role": "user", "content": "Hello"}]}) + "\n")
    result = CliRunner().invoke(
        app,
        [
            "compare",
            str(chat_reference),
            str(tiny_pair["candidate"]),
            "--data",
            str(data),
            "--out",
            str(tmp_path / "x"),
        ],
    )
    assert result.exit_code == 1 and "no assistant message" in result.output


def test_shipped_chat_config_runs_end_to_end(chat_reference, tiny_pair, tmp_path):
    """configs/chat.yaml as shipped, with only the models swapped for the offline tiny pair."""
    config = CHAT_DATA.parent / "chat.yaml"
    out = tmp_path / "run"
    result = CliRunner().invoke(
        app,
        [
            "run",
            str(config),
            f"reference.model={chat_reference}",
            "reference.dtype=float32",
            f"candidates.0.model={tiny_pair['candidate']}",
            "candidates.0.dtype=float32",
            f"datasets.0.source={CHAT_DATA}",
            "windowing.context_length=256",
            "windowing.stride=128",
            "--out",
            str(out),
        ],
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    tok = AutoTokenizer.from_pretrained(chat_reference)
    want = sum(len(assistant_tokens(tok, m)) for m in conversations())
    assert results["candidates"][0]["metrics"]["counts"]["tokens"] == want
