"""Models and adapters given by hub id, served from a temporary hub cache (no network).

A hub id (``org/name``) resolves through huggingface_hub's cache layout
(``models--org--name/refs/main`` and ``snapshots/<commit>/``); the tests build that layout from
tiny local models, so transformers, PEFT and lmkl load them offline exactly as a downloaded
model.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch
from runtools import check_error, invoke
from safetensors.torch import load_file

from lmkl.errors import EXIT_RUNTIME, ModelLoadError
from lmkl.specs import ModelSpec

COMMIT = "0123456789abcdef0123456789abcdef01234567"


def put_in_hub_cache(cache: Path, repo_id: str, source: Path) -> Path:
    """Lay ``source``'s files out as the cached snapshot of ``repo_id`` at its ``main``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    shutil.copytree(source, snapshot)
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache that huggingface_hub (and so transformers and PEFT) reads."""
    import huggingface_hub.constants

    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


def _lora(base: Path, out: Path, safe: bool) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(1)
    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    config = LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False
    )
    get_peft_model(model, config).save_pretrained(out, safe_serialization=safe)
    return out


def test_hub_model_disk_bytes_are_its_cached_weight_files(tiny_pair, hub_cache, tmp_path):
    """A hub model's bytes_on_disk are the bytes of its weight files in the cache, not its
    in-memory size (here float16 files loaded as float32: twice the size in memory)."""
    from lmkl.analysis.ranking import candidate_sizes
    from lmkl.models import load_model

    half = tmp_path / "half"
    shutil.copytree(tiny_pair["candidate"], half)
    weights = load_file(half / "model.safetensors")
    from safetensors.torch import save_file

    save_file({k: v.half().contiguous() for k, v in weights.items()}, half / "model.safetensors")
    snapshot = put_in_hub_cache(hub_cache, "lmkl-test/half", half)

    loaded = load_model(ModelSpec(model="lmkl-test/half", dtype="float32", device="cpu"))
    info = loaded.description
    assert info["source"] == "hub"
    files = sorted(snapshot.glob("*.safetensors"))
    assert info["bytes_on_disk"] == sum(p.stat().st_size for p in files)
    in_memory = sum(p.numel() * 4 for p in loaded.model.parameters())
    assert info["bytes_in_memory"] == in_memory
    assert info["bytes_on_disk"] < 0.6 * in_memory  # float16 on disk, float32 in memory
    assert candidate_sizes(info)["disk_bytes"] == info["bytes_on_disk"]


def test_hub_model_disk_bytes_unknown_outside_the_cache(tiny_pair, hub_cache):
    """A snapshot the cache does not hold has no known file size: None, never a guess."""
    from lmkl.models import hub_weight_bytes

    spec = ModelSpec(model="lmkl-test/absent")
    assert hub_weight_bytes(spec, None) is None


@pytest.fixture
def hub_adapters(tiny_pair, hub_cache, tmp_path) -> dict[str, str]:
    """Two LoRA adapters of the tiny candidate in the hub cache: pickle-only and safetensors."""
    bin_dir = _lora(tiny_pair["candidate"], tmp_path / "lora-bin", safe=False)
    safe_dir = _lora(tiny_pair["candidate"], tmp_path / "lora-safe", safe=True)
    assert [p.name for p in bin_dir.glob("adapter_model.*")] == ["adapter_model.bin"]
    put_in_hub_cache(hub_cache, "lmkl-test/lora-bin", bin_dir)
    put_in_hub_cache(hub_cache, "lmkl-test/lora-safe", safe_dir)
    return {"bin": "lmkl-test/lora-bin", "safe": "lmkl-test/lora-safe"}


def _args(tiny_pair, adapter: str, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "compare",
        str(tiny_pair["reference"]),
        str(tiny_pair["candidate"]),
        "--adapter",
        adapter,
        "--data",
        str(data),
        "--out",
        str(out),
        "--context-length",
        "64",
        "--max-tokens",
        "40",
        "--quiet",
        *extra,
    ]


def test_pickle_only_hub_adapter_is_refused_unless_allowed(
    tiny_pair, hub_adapters, small_jsonl, tmp_path
):
    code, out = invoke(_args(tiny_pair, hub_adapters["bin"], small_jsonl, tmp_path / "no"))
    line = check_error(code, out, EXIT_RUNTIME, "pickle")
    assert "adapter_model.bin" in line and "--allow-pickle" in out
    assert not (tmp_path / "no").exists()

    args = _args(tiny_pair, hub_adapters["bin"], small_jsonl, tmp_path / "yes", "--allow-pickle")
    code, out = invoke(args)
    assert code == 0, out
    code, out = invoke(_args(tiny_pair, hub_adapters["safe"], small_jsonl, tmp_path / "safe"))
    assert code == 0, out


def test_hub_adapter_policy_is_checked_before_anything_loads(tiny_pair, hub_adapters, monkeypatch):
    """The refusal comes from the file listing alone: no tokenizer, model or adapter is read."""
    import transformers

    from lmkl import models

    def refuse(*args, **kwargs):
        raise AssertionError("loaded something before the pickle check")

    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    spec = ModelSpec(model=str(tiny_pair["candidate"]), adapter=hub_adapters["bin"], device="cpu")
    with pytest.raises(ModelLoadError, match="pickle"):
        models.load_model(spec)


def test_online_hub_adapter_listing_is_used_without_downloading(tiny_pair, monkeypatch):
    """Online, the hub's file listing decides (mocked: no network); nothing is downloaded."""
    import huggingface_hub
    import huggingface_hub.constants

    from lmkl import models

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    asked = []

    def listing(self, repo_id, revision=None, **kwargs):
        asked.append((repo_id, revision))
        return ["README.md", "adapter_config.json", "adapter_model.bin"]

    monkeypatch.setattr(huggingface_hub.HfApi, "list_repo_files", listing)
    spec = ModelSpec(
        model=str(tiny_pair["candidate"]), adapter="org/lora", adapter_revision="v1", device="cpu"
    )
    with pytest.raises(ModelLoadError, match=r"adapter_model\.bin"):
        models.check_adapter_policy(spec)
    assert asked == [("org/lora", "v1")]
    models.check_adapter_policy(spec.model_copy(update={"allow_pickle": True}))
