"""Shared fixtures: tiny tokenizer and models built offline in seconds, isolated user state."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tiny_models import build_tiny_model, build_tiny_pair


@pytest.fixture(autouse=True)
def _isolate_user_state(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """No test reads or writes the real user cache or touches the network."""
    monkeypatch.setenv("LMKL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "lmkl-cache"))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    # The variables are read when huggingface_hub/datasets are imported, which test modules do at
    # collection, before this fixture runs; set the flags they actually consult as well.
    import datasets.config
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(datasets.config, "HF_DATASETS_OFFLINE", True)
    monkeypatch.delenv("LMKL_DEBUG", raising=False)


@pytest.fixture
def native_kernel():
    """The native C kernel, built inside the isolated cache (not at collection, in the user's).

    Where it cannot be had the test is skipped, except under ``LMKL_REQUIRE_NATIVE=1`` (CI sets
    it): there a kernel that does not build or fails its self-check fails the test.
    """
    import os

    from lmkl.scoring import native

    kernel = native.load_native_kernel()
    if kernel is None:
        reason = native.native_unavailable_reason()
        if os.environ.get("LMKL_REQUIRE_NATIVE") == "1":
            pytest.fail(f"LMKL_REQUIRE_NATIVE=1 but the native kernel is unavailable: {reason}")
        pytest.skip(f"native kernel unavailable here: {reason}")
    return kernel


@pytest.fixture(scope="session")
def tiny_pair(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A trained tiny Llama reference, a smaller trained Llama candidate and held-out text."""
    root = tmp_path_factory.mktemp("tiny-pair")
    reference, candidate = build_tiny_pair(root, steps=30)
    return {"reference": reference, "candidate": candidate, "heldout": root / "heldout.jsonl"}


@pytest.fixture(scope="session")
def padded_candidate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen2-style candidate with the same tokenizer but a head padded to 640 rows."""
    root = tmp_path_factory.mktemp("padded")
    return build_tiny_model(
        root / "qwen2-padded",
        arch="qwen2",
        hidden_size=32,
        num_layers=1,
        num_heads=2,
        steps=15,
        seed=3,
        padded_vocab=640,
    )


@pytest.fixture(scope="session")
def gpt2_candidate(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A GPT-2-style candidate sharing the tiny tokenizer."""
    root = tmp_path_factory.mktemp("gpt2")
    return build_tiny_model(
        root / "gpt2", arch="gpt2", hidden_size=32, num_layers=1, num_heads=2, steps=15, seed=4
    )


@pytest.fixture(scope="session")
def other_tokenizer_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model whose tokenizer has a different vocabulary (size 384)."""
    root = tmp_path_factory.mktemp("other-tok")
    return build_tiny_model(
        root / "other", vocab_size=384, hidden_size=32, num_layers=1, num_heads=2, steps=0
    )


@pytest.fixture
def small_jsonl(tmp_path: Path, tiny_pair: dict[str, Path]) -> Path:
    """The first three held-out documents, cut to ~1500 characters each (fast runs)."""
    lines = tiny_pair["heldout"].read_text().splitlines()[:3]
    path = tmp_path / "small.jsonl"
    with path.open("w") as fh:
        for line in lines:
            fh.write(json.dumps({"text": json.loads(line)["text"][:1500]}) + "\n")
    return path
