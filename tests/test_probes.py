"""The load-time probes: the decoder/head split is checked and the model's causality proven,
with one full forward shared between the two checks."""

from __future__ import annotations

import torch

from lmkl import models
from lmkl.models import head_split
from lmkl.specs import ModelSpec


def test_probes_share_the_first_full_forward(tiny_pair, monkeypatch):
    from transformers import LlamaForCausalLM, LlamaModel

    calls = {"full": 0, "decoder": 0}
    full, decoder = LlamaForCausalLM.forward, LlamaModel.forward

    def counted_full(self, *args, **kwargs):
        calls["full"] += 1
        return full(self, *args, **kwargs)

    def counted_decoder(self, *args, **kwargs):
        calls["decoder"] += 1
        return decoder(self, *args, **kwargs)

    monkeypatch.setattr(LlamaForCausalLM, "forward", counted_full)
    monkeypatch.setattr(LlamaModel, "forward", counted_decoder)
    loaded = models.load_model(ModelSpec(model=str(tiny_pair["reference"])), torch.device("cpu"))
    assert loaded.head is not None
    # Split check: one full forward + one decoder-only; causality: one more full forward; batch
    # dependence: two batched full forwards (each full forward's decoder call is counted too).
    assert calls == {"full": 4, "decoder": 5}
    assert not head_split._PROBE_LOGITS  # nothing held after loading


def test_a_split_that_differs_from_the_forward_is_not_used(tiny_pair, monkeypatch):
    made = head_split.make_head

    def wrong_head(model):
        head = made(model)
        head.scale = 1.5  # logits the model's own forward does not produce
        return head

    monkeypatch.setattr(head_split, "make_head", wrong_head)
    loaded = models.load_model(ModelSpec(model=str(tiny_pair["reference"])), torch.device("cpu"))
    assert loaded.head is None
    ids = torch.tensor([[1, 5, 9, 3]])
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        expected = loaded.model(input_ids=ids, attention_mask=mask, use_cache=False).logits
        got = loaded.logits(loaded.hidden_states(ids, mask))
    assert torch.equal(got, expected)
