"""Tiny, seconds-sized models and tokenizers for the tests (built offline, deterministic)."""

from __future__ import annotations

from pathlib import Path

from transformers import PreTrainedTokenizerFast

from lmkl.demo.assets import (
    CANDIDATE,
    DEMO_VERSION,
    HELDOUT,
    REFERENCE,
    Arch,
    build_model,
    demo_corpus,
    encode_stream,
    save_model,
    train_model,
    train_tokenizer,
    write_jsonl,
)

#: Tiny builds train on the first documents only: enough text for a 512-token vocabulary and a
#: few dozen steps, and it keeps tokenizer training and encoding in the tens of milliseconds.
_TINY_CORPUS_CHARS = 120_000


def tiny_corpus() -> tuple[list[str], list[str]]:
    """A ~120 KB training subset of :func:`demo_corpus` and its full held-out documents."""
    train, heldout = demo_corpus()
    subset: list[str] = []
    total = 0
    for text in train:
        if total >= _TINY_CORPUS_CHARS:
            break
        subset.append(text)
        total += len(text)
    return subset, heldout


_TOKENIZER_MEMO: dict[tuple[int, int], PreTrainedTokenizerFast] = {}


def tiny_tokenizer(vocab_size: int = 512) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on :func:`tiny_corpus` (memoised per process)."""
    key = (vocab_size, DEMO_VERSION)
    if key not in _TOKENIZER_MEMO:
        _TOKENIZER_MEMO[key] = train_tokenizer(tiny_corpus()[0], vocab_size)
    return _TOKENIZER_MEMO[key]


def build_tiny_model(
    out_dir: Path,
    arch: Arch = "llama",
    hidden_size: int = 48,
    num_layers: int = 2,
    num_heads: int = 4,
    steps: int = 30,
    seed: int = 0,
    padded_vocab: int | None = None,
    tie_word_embeddings: bool | None = None,
    vocab_size: int = 512,
    max_positions: int = 512,
    lr: float = 1e-2,
) -> Path:
    """Build, briefly train and save one tiny model (+ tokenizer) into ``out_dir``; return it.

    Takes ~1-2 s on 2 cores with the defaults. ``steps=0`` saves the untrained model.
    """
    tokenizer = tiny_tokenizer(vocab_size)
    model = build_model(
        arch,
        len(tokenizer),
        hidden_size,
        num_layers,
        num_heads,
        max_positions=max_positions,
        seed=seed,
        padded_vocab=padded_vocab,
        tie_word_embeddings=tie_word_embeddings,
    )
    if steps > 0:
        stream = encode_stream(tokenizer, tiny_corpus()[0])
        # One thread: these matrices are too small to gain from more, and on a busy machine
        # (CI, parallel test runs) multi-threaded tiny steps can be 10x slower.
        train_model(model, stream, steps, seq_len=64, batch_size=8, lr=lr, seed=seed, num_threads=1)
    return save_model(model, tokenizer, Path(out_dir))


def build_tiny_pair(
    out_dir: Path,
    steps: int = 30,
    reference_arch: Arch = "llama",
    candidate_arch: Arch = "llama",
    candidate_steps: int | None = None,
    candidate_padded_vocab: int | None = None,
    reference_padded_vocab: int | None = None,
    vocab_size: int = 512,
) -> tuple[Path, Path]:
    """A tiny reference/candidate pair sharing one tokenizer: ``out_dir/{reference,candidate}``.

    The reference has 2 layers × 64 and trains ``steps`` steps; the candidate has 1 layer × 32
    and trains ``candidate_steps`` (default ``steps // 2``) with another seed, so the two
    distributions differ clearly. ``*_padded_vocab`` widens a model's output layer past the
    tokenizer. Also writes ``out_dir/heldout.jsonl`` (the demo's held-out documents). ~2-4 s in
    all on 2 cores with the defaults.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    reference = build_tiny_model(
        out_dir / REFERENCE,
        arch=reference_arch,
        hidden_size=64,
        num_layers=2,
        num_heads=4,
        steps=steps,
        seed=1,
        padded_vocab=reference_padded_vocab,
        vocab_size=vocab_size,
    )
    candidate = build_tiny_model(
        out_dir / CANDIDATE,
        arch=candidate_arch,
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        steps=steps // 2 if candidate_steps is None else candidate_steps,
        seed=2,
        padded_vocab=candidate_padded_vocab,
        vocab_size=vocab_size,
    )
    write_jsonl(out_dir / HELDOUT, tiny_corpus()[1])
    return reference, candidate
