"""Write GGUF files of a tiny Hugging Face Llama with the ``gguf`` package (as llama.cpp's
converter would: tensor names, Q/K row order, byte-level BPE vocabulary and merges)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

#: Hugging Face parameter name → GGUF tensor name (``{i}``: the layer).
_NAMES = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "model.layers.{i}.input_layernorm.weight": "blk.{i}.attn_norm.weight",
    "model.layers.{i}.self_attn.q_proj.weight": "blk.{i}.attn_q.weight",
    "model.layers.{i}.self_attn.k_proj.weight": "blk.{i}.attn_k.weight",
    "model.layers.{i}.self_attn.v_proj.weight": "blk.{i}.attn_v.weight",
    "model.layers.{i}.self_attn.o_proj.weight": "blk.{i}.attn_output.weight",
    "model.layers.{i}.post_attention_layernorm.weight": "blk.{i}.ffn_norm.weight",
    "model.layers.{i}.mlp.gate_proj.weight": "blk.{i}.ffn_gate.weight",
    "model.layers.{i}.mlp.up_proj.weight": "blk.{i}.ffn_up.weight",
    "model.layers.{i}.mlp.down_proj.weight": "blk.{i}.ffn_down.weight",
}


def _gguf_name(name: str) -> str:
    parts = name.split(".")
    if len(parts) > 2 and parts[1] == "layers":
        layer = parts[2]
        template = ".".join([*parts[:2], "{i}", *parts[3:]])
        return _NAMES[template].format(i=layer)
    return _NAMES[name]


def _interleave_rotary(weight: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp stores Q/K rows with each head's two rotary halves interleaved (transformers'
    GGUF loader undoes this)."""
    half = weight.shape[0] // heads // 2
    return weight.reshape(heads, 2, half, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def write_gguf(model_dir: Path, out: Path, tensor_type: str = "F32") -> Path:
    """Write ``model_dir`` (a tiny Llama with its byte-level BPE tokenizer) as a GGUF file whose
    2-D weights are ``tensor_type`` (F32, F16, Q8_0, Q5_0, Q4_1, Q4_0); norms stay F32."""
    import gguf

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    config = model.config
    qtype = gguf.GGMLQuantizationType[tensor_type]
    writer = gguf.GGUFWriter(str(out), "llama")
    writer.add_name(model_dir.name)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_rope_dimension_count(config.hidden_size // config.num_attention_heads)
    writer.add_rope_freq_base(float(config.rope_parameters["rope_theta"]))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(
        {
            "F32": gguf.LlamaFileType.ALL_F32,
            "F16": gguf.LlamaFileType.MOSTLY_F16,
            "Q8_0": gguf.LlamaFileType.MOSTLY_Q8_0,
            "Q5_0": gguf.LlamaFileType.MOSTLY_Q5_0,
            "Q4_1": gguf.LlamaFileType.MOSTLY_Q4_1,
            "Q4_0": gguf.LlamaFileType.MOSTLY_Q4_0,
        }[tensor_type]
    )

    vocab = tokenizer.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda item: item[1])]
    special = set(tokenizer.all_special_ids)
    merges = json.loads(tokenizer.backend_tokenizer.to_str())["model"]["merges"]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    kinds = [gguf.TokenType.NORMAL] * len(tokens)
    for i in special:
        kinds[i] = gguf.TokenType.CONTROL
    writer.add_token_types(kinds)
    writer.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    writer.add_bos_token_id(tokenizer.bos_token_id)
    writer.add_eos_token_id(tokenizer.eos_token_id)
    writer.add_unk_token_id(tokenizer.unk_token_id)
    writer.add_pad_token_id(tokenizer.pad_token_id)
    writer.add_add_bos_token(True)

    tied = config.tie_word_embeddings
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and tied:
            continue
        data = tensor.detach().float().numpy()
        if name.endswith("q_proj.weight"):
            data = _interleave_rotary(data, config.num_attention_heads)
        elif name.endswith("k_proj.weight"):
            data = _interleave_rotary(data, config.num_key_value_heads)
        data = np.ascontiguousarray(data)
        if data.ndim == 2 and qtype not in (gguf.GGMLQuantizationType.F32,):
            if qtype == gguf.GGMLQuantizationType.F16:
                writer.add_tensor(_gguf_name(name), data.astype(np.float16))
            else:
                packed = gguf.quants.quantize(data, qtype)
                writer.add_tensor(_gguf_name(name), packed, raw_shape=packed.shape, raw_dtype=qtype)
        else:
            writer.add_tensor(_gguf_name(name), data.astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return out
