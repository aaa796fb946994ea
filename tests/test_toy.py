"""Tests for lmkl.demo.assets: the offline tokenizer, toy models, training loop and demo cache."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import tiny_models
import torch

from lmkl.demo import assets as toy

TEXT = "Hello  world.\n\tdef f(x):  return x ** 2  # café 漢字 🙂 — ok\n"

TINY_DEMO = toy.DemoSettings(
    vocab_size=300,
    seq_len=32,
    batch_size=4,
    max_positions=128,
    num_threads=1,
    reference=toy.ModelRecipe(arch="llama", hidden_size=32, num_layers=1, num_heads=2, steps=3),
    candidate=toy.ModelRecipe(arch="gpt2", hidden_size=16, num_layers=1, num_heads=2, steps=2),
)


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_models.tiny_tokenizer()


def test_demo_corpus_split_is_deterministic_and_disjoint() -> None:
    train, heldout = toy.demo_corpus()
    assert (train, heldout) == toy.demo_corpus()
    assert len(heldout) >= 5 and len(train) > 5 * len(heldout)
    assert not set(train) & set(heldout)
    assert all(t and t == t.strip() for t in train + heldout)


def test_tokenizer_adds_exactly_one_bos(tokenizer) -> None:
    ids = tokenizer(TEXT)["input_ids"]
    assert tokenizer.bos_token_id == 0
    assert ids[0] == tokenizer.bos_token_id
    assert ids.count(tokenizer.bos_token_id) == 1
    assert tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in ids
    assert tokenizer.pad_token_id is not None
    assert tokenizer.unk_token_id not in ids  # byte level: nothing is unknown
    assert tokenizer(TEXT, add_special_tokens=False)["input_ids"] == ids[1:]


def test_tokenizer_round_trips_and_gives_offsets(tokenizer) -> None:
    enc = tokenizer(TEXT, return_offsets_mapping=True)
    assert tokenizer.decode(enc["input_ids"], skip_special_tokens=True) == TEXT
    offsets = enc["offset_mapping"]
    assert offsets[0] == (0, 0)  # BOS covers no text
    assert offsets[-1][1] == len(TEXT)
    # Spans are contiguous and cover the text; pieces of one multi-byte character share a span.
    prev_end = 0
    for start, end in offsets[1:]:
        assert start in (prev_end, prev_end - 1) and end > start
        prev_end = end


def test_tokenizer_is_deterministic() -> None:
    texts = tiny_models.tiny_corpus()[0][:10]
    a, b = toy.train_tokenizer(texts, 300), toy.train_tokenizer(texts, 300)
    assert a.get_vocab() == b.get_vocab()
    assert a(TEXT)["input_ids"] == b(TEXT)["input_ids"]


def test_tokenizer_save_load_round_trip(tokenizer, tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    tokenizer.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded(TEXT)["input_ids"] == tokenizer(TEXT)["input_ids"]
    assert loaded(TEXT)["input_ids"][0] == loaded.bos_token_id == 0
    assert (loaded.eos_token_id, loaded.pad_token_id) == (1, 2)
    assert loaded.decode(loaded(TEXT)["input_ids"], skip_special_tokens=True) == TEXT
    assert len(loaded(TEXT, return_offsets_mapping=True)["offset_mapping"]) > 1


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_build_model_all_archs(arch: str) -> None:
    model = toy.build_model(arch, 300, 32, 1, 2, max_positions=64, seed=3)
    assert next(model.parameters()).dtype == torch.float32
    assert (model.config.bos_token_id, model.config.eos_token_id) == (0, 1)
    assert model.config.pad_token_id == 2
    logits = model(input_ids=torch.tensor([[0, 5, 6, 7]])).logits
    assert logits.shape == (1, 4, 300)
    # Same seed, same weights; the caller's RNG state is untouched.
    state = torch.random.get_rng_state()
    again = toy.build_model(arch, 300, 32, 1, 2, max_positions=64, seed=3)
    assert torch.equal(torch.random.get_rng_state(), state)
    for p, q in zip(model.parameters(), again.parameters(), strict=True):
        assert torch.equal(p, q)


def test_padded_vocab_widens_the_head() -> None:
    model = toy.build_model("qwen2", 300, 32, 1, 2, padded_vocab=320)
    assert model.get_output_embeddings().weight.shape[0] == 320
    assert model(input_ids=torch.tensor([[0, 1]])).logits.shape[-1] == 320
    with pytest.raises(ValueError):
        toy.build_model("llama", 300, 32, 1, 2, padded_vocab=299)


def test_tie_word_embeddings_defaults() -> None:
    def tied(model) -> bool:
        return model.get_output_embeddings().weight is model.get_input_embeddings().weight

    assert not tied(toy.build_model("llama", 300, 32, 1, 2))
    assert tied(toy.build_model("gpt2", 300, 32, 1, 2))
    assert tied(toy.build_model("qwen2", 300, 32, 1, 2))
    assert tied(toy.build_model("llama", 300, 32, 1, 2, tie_word_embeddings=True))


def test_training_lowers_loss_and_is_deterministic(tokenizer) -> None:
    stream = toy.encode_stream(tokenizer, tiny_models.tiny_corpus()[0])
    assert stream[0] == tokenizer.bos_token_id
    runs = []
    for _ in range(2):
        model = toy.build_model("llama", len(tokenizer), 32, 1, 2, seed=0)
        losses = toy.train_model(
            model, stream, 25, seq_len=32, batch_size=4, lr=1e-2, seed=0, num_threads=1
        )
        assert not model.training
        runs.append(losses)
    losses = runs[0]
    assert len(losses) == 25
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert runs[0] == runs[1]


def test_tiny_pair_loads_and_differs(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    threads = torch.get_num_threads()
    ref_dir, cand_dir = tiny_models.build_tiny_pair(
        tmp_path, steps=10, candidate_arch="gpt2", candidate_padded_vocab=520
    )
    assert torch.get_num_threads() == threads  # the 1-thread training is undone
    assert (tmp_path / "heldout.jsonl").is_file()
    ref = AutoModelForCausalLM.from_pretrained(ref_dir)
    cand = AutoModelForCausalLM.from_pretrained(cand_dir)
    tok = AutoTokenizer.from_pretrained(cand_dir)
    ids = torch.tensor([tok("The for statement is used to iterate")["input_ids"]])
    assert ids[0, 0] == tok.bos_token_id
    with torch.no_grad():
        p = torch.log_softmax(ref(input_ids=ids).logits[0], -1)
        q_logits = cand(input_ids=ids).logits[0]
    assert q_logits.shape[-1] == 520
    q = torch.log_softmax(q_logits[:, : len(tok)], -1)
    kl = (p.exp() * (p - q)).sum(-1)
    assert torch.isfinite(kl).all() and kl.mean() > 0.01


@pytest.fixture(scope="module")
def demo_build(tmp_path_factory: pytest.TempPathFactory) -> tuple[toy.DemoAssets, float, list[str]]:
    """One tiny demo build shared by the tests below: (assets, seconds, progress messages)."""
    cache = tmp_path_factory.mktemp("demo-cache")
    messages: list[str] = []
    start = time.perf_counter()
    assets = toy.build_demo_assets(cache, settings=TINY_DEMO, progress=messages.append)
    return assets, time.perf_counter() - start, messages


def test_demo_assets_layout(demo_build) -> None:
    assets, _, messages = demo_build
    assert messages
    manifest = json.loads((assets.root / "manifest.json").read_text())
    assert manifest == assets.manifest
    assert manifest["demo_version"] == toy.DEMO_VERSION
    assert manifest["settings"]["reference"]["arch"] == "llama"
    assert list(toy.iter_heldout(assets.heldout_path)) == toy.demo_corpus()[1]
    for d in (assets.reference_dir, assets.candidate_dir):
        assert (d / "model.safetensors").is_file() and (d / "tokenizer.json").is_file()
    assert assets.tokenizer_dir in (assets.reference_dir, assets.candidate_dir)
    assert not [p for p in assets.root.parent.iterdir() if p.name.startswith(".")]  # no temp


def test_demo_assets_load_offline(demo_build) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    assets = demo_build[0]
    for d in (assets.reference_dir, assets.candidate_dir):
        model = AutoModelForCausalLM.from_pretrained(d, local_files_only=True)
        tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
        assert model.config.vocab_size == len(tok) == TINY_DEMO.vocab_size
        assert tok("x")["input_ids"][0] == tok.bos_token_id


def test_demo_assets_reuse_is_instant(demo_build) -> None:
    assets, first, _ = demo_build
    mtime = (assets.root / "manifest.json").stat().st_mtime_ns
    messages: list[str] = []
    start = time.perf_counter()
    again = toy.build_demo_assets(assets.root.parent, settings=TINY_DEMO, progress=messages.append)
    assert time.perf_counter() - start < min(1.0, first)
    assert again == assets and not messages
    assert (assets.root / "manifest.json").stat().st_mtime_ns == mtime


def test_demo_assets_rebuild(tmp_path: Path) -> None:
    assets = toy.build_demo_assets(tmp_path, settings=TINY_DEMO)
    # Without its manifest a build counts as incomplete (e.g. killed) and is redone.
    (assets.root / "manifest.json").unlink()
    rebuilt = toy.build_demo_assets(tmp_path, settings=TINY_DEMO)
    assert rebuilt.root == assets.root and (rebuilt.root / "manifest.json").is_file()
    # force rebuilds a complete one, replacing it in place.
    (assets.root / "marker").write_text("old build")
    forced = toy.build_demo_assets(tmp_path, settings=TINY_DEMO, force=True)
    assert forced.root == assets.root and not (assets.root / "marker").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == [assets.root.name]


def test_settings_change_the_cache_key() -> None:
    assert toy.DemoSettings().key() == toy.DemoSettings().key()
    assert toy.DemoSettings().key() != TINY_DEMO.key()
