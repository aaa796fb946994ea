"""Quantized candidates: build on-the-fly quantization configs, check backends, measure sizes.

Three kinds of quantized model reach lmkl, all through ``transformers``:

* **on the fly**: a full-precision checkpoint quantized while loading
  (:class:`~lmkl.specs.QuantizeSpec` → a transformers ``quantization_config``);
* **pre-quantized checkpoints**: ``config.json`` carries a ``quantization_config``
  (compressed-tensors, GPTQ, AWQ, bitsandbytes, torchao, quanto, FP8...), loaded by the backend
  package that transformers names for it;
* **GGUF files**: llama.cpp's format, dequantized by transformers' GGUF loader.

The size axis of a quantization study is the real storage of the weights, not the parameter
count (the same for every quantization of one model): :func:`weight_storage` adds up the bytes
a saved or served model stores (packed data at the values' real bit width, scales and zero
points of tensor subclasses included; the size as loaded beside it), :func:`storage_by_module`
the same per module, and :func:`gguf_storage` / :func:`gguf_module_bytes` read a GGUF file's
tensor table (:data:`GGUF_MODULE_NAMES` maps its tensor names to Hugging Face module names).
"""

from __future__ import annotations

import importlib.util
import math
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lmkl.errors import ModelLoadError
from lmkl.specs import QUANT_SCHEMES, QuantizeSpec

#: Extra that installs every CPU backend lmkl is tested with.
QUANT_EXTRA = "pip install 'lmkl[quant]'"


@dataclass(frozen=True)
class Backend:
    """What a quantization format needs: an importable package, its pip name, a device."""

    module: str
    install: str
    needs_cuda: bool = False


#: On-the-fly methods (``quantize: {method: ...}``).
METHOD_BACKENDS: dict[str, Backend] = {
    "torchao": Backend("torchao", QUANT_EXTRA),
    "bitsandbytes": Backend("bitsandbytes", QUANT_EXTRA),
    "quanto": Backend("optimum.quanto", QUANT_EXTRA),
}

#: Pre-quantized checkpoints, by ``quantization_config.quant_method``. ``needs_cuda`` marks the
#: formats whose kernels exist only for NVIDIA GPUs in the backend's current release.
CHECKPOINT_BACKENDS: dict[str, Backend] = {
    "compressed-tensors": Backend("compressed_tensors", QUANT_EXTRA),
    "torchao": Backend("torchao", QUANT_EXTRA),
    "bitsandbytes": Backend("bitsandbytes", QUANT_EXTRA),
    "quanto": Backend("optimum.quanto", QUANT_EXTRA),
    "gptq": Backend("gptqmodel", "pip install gptqmodel"),
    "awq": Backend("gptqmodel", "pip install gptqmodel"),
    "hqq": Backend("hqq", "pip install hqq"),
    "fp8": Backend("torch", "a CUDA build of torch", needs_cuda=True),
    "fbgemm_fp8": Backend("fbgemm_gpu", "pip install fbgemm-gpu", needs_cuda=True),
    "eetq": Backend("eetq", "pip install eetq", needs_cuda=True),
    "aqlm": Backend("aqlm", "pip install aqlm", needs_cuda=True),
    "vptq": Backend("vptq", "pip install vptq", needs_cuda=True),
    "higgs": Backend("flute", "pip install flute-kernel", needs_cuda=True),
    "spqr": Backend("spqr_quant", "pip install spqr_quant", needs_cuda=True),
    "bitnet": Backend("torch", "torch"),
}
GGUF_BACKEND = Backend("gguf", "pip install 'lmkl[gguf]'")


def package_available(module: str) -> bool:
    """Whether ``module`` can be imported (without importing it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):  # a parent package missing, or a broken install
        return False


def require(backend: Backend, what: str) -> None:
    """One-line :class:`ModelLoadError` naming what to install when ``backend`` is missing."""
    if not package_available(backend.module):
        raise ModelLoadError(
            f"{what} needs the '{backend.module.split('.')[0]}' package, which is not installed",
            backend.install,
        )


def _check_device(backend: Backend, what: str, device: Any) -> None:
    if backend.needs_cuda and getattr(device, "type", str(device)) != "cuda":
        raise ModelLoadError(
            f"{what} runs only on an NVIDIA GPU (CUDA) and this run is on {device}",
            "run on a machine with a CUDA GPU (--device cuda), or compare another format",
        )


def quiet_backend_logs() -> None:
    """Silence the import-time notices of quantization backends (torchao lists every CUDA
    kernel library it cannot load on a CPU machine; torch warns about torchao's enums)."""
    import logging

    for name in ("torchao", "torch.utils._pytree", "optimum.quanto", "bitsandbytes"):
        logging.getLogger(name).setLevel(logging.ERROR)


def check_groups_fit(spec: QuantizeSpec, config: Any, name: str, device: Any) -> None:
    """Refuse (one line, before loading) a group size that does not divide the input width of
    the model's linear layers: torchao's grouped schemes, and bitsandbytes' 4-bit blocks on CPU,
    need whole groups per row. Widths are read from the config (hidden and MLP sizes)."""
    group = spec.effective_group_size
    if group is None or spec.method == "quanto":  # quanto pads a last partial group
        return
    if spec.method == "bitsandbytes" and getattr(device, "type", str(device)) == "cuda":
        return  # the CUDA kernels take any width
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    widths = sorted(
        {
            w
            for w in (getattr(text, "hidden_size", None), getattr(text, "intermediate_size", None))
            if isinstance(w, int) and w > 0
        }
    )
    bad = [w for w in widths if w % group]
    if bad:
        fits = [
            g
            for g in QUANT_SCHEMES[spec.method][spec.scheme].group_sizes
            if not any(w % g for w in widths)
        ]
        what = "block size" if spec.method == "bitsandbytes" else "group size"
        raise ModelLoadError(
            f"{name}: {spec.method} {spec.scheme} {what} {group} does not divide the "
            f"layer width{'s' if len(bad) > 1 else ''} {', '.join(map(str, bad))} of the model",
            f"use a group size that divides {', '.join(map(str, widths))}"
            + (f" ({', '.join(f'g{g}' for g in fits)})" if fits else " (or another scheme)"),
        )


def on_the_fly_config(spec: QuantizeSpec) -> Any:
    """The transformers ``quantization_config`` that applies ``spec`` while loading."""
    require(METHOD_BACKENDS[spec.method], f"quantizing with {spec.method}")
    quiet_backend_logs()
    import torch
    import transformers

    group = spec.effective_group_size
    if spec.method == "torchao":
        from torchao.quantization import (
            Float8WeightOnlyConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8DynamicActivationIntxWeightConfig,
            Int8WeightOnlyConfig,
            IntxWeightOnlyConfig,
        )
        from torchao.quantization.granularity import PerGroup

        # int4 through the Intx configs: torchao's Int4WeightOnlyConfig has packed kernels for
        # CUDA only, while Intx int4 runs everywhere and stores the same 4-bit grid per group.
        config = {
            "int8_weight_only": lambda: Int8WeightOnlyConfig(),
            "int8_dynamic": lambda: Int8DynamicActivationInt8WeightConfig(),
            "int4_weight_only": lambda: IntxWeightOnlyConfig(
                weight_dtype=torch.int4, granularity=PerGroup(group)
            ),
            "int8_dynamic_int4": lambda: Int8DynamicActivationIntxWeightConfig(
                weight_dtype=torch.int4, weight_granularity=PerGroup(group)
            ),
            "float8_weight_only": lambda: Float8WeightOnlyConfig(),
        }[spec.scheme]()
        return transformers.TorchAoConfig(config)
    if spec.method == "bitsandbytes":
        if spec.scheme == "int8":
            return transformers.BitsAndBytesConfig(load_in_8bit=True)
        return transformers.BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=spec.scheme,
            bnb_4bit_compute_dtype=torch.float32,
        )
    return transformers.QuantoConfig(weights=spec.scheme)


def check_checkpoint_backend(config: Any, device: Any, name: str) -> dict[str, Any] | None:
    """For a pre-quantized checkpoint (a ``quantization_config`` in its config): check that its
    backend is installed and its device is there, before transformers tries; return the
    quantization settings as a dict (None for a full-precision checkpoint)."""
    quant = getattr(config, "quantization_config", None)
    if quant is None:
        return None
    settings = quant if isinstance(quant, dict) else quant.to_dict()
    method = _method_name(settings)
    backend = CHECKPOINT_BACKENDS.get(method)
    what = f"{name} (a {method} checkpoint)"
    if backend is not None:
        require(backend, what)
        _check_device(backend, what, device)
    quiet_backend_logs()
    return settings


def _method_name(settings: dict[str, Any]) -> str:
    """``quant_method`` as transformers spells it (a string, or its QuantizationMethod enum)."""
    method = settings.get("quant_method", "unknown")
    return str(getattr(method, "value", method))


def checkpoint_quantization(settings: dict[str, Any]) -> dict[str, Any]:
    """Method, bits and group size from a checkpoint's ``quantization_config`` (best effort:
    each format spells them differently; unknown fields stay None)."""
    method = _method_name(settings)
    bits = settings.get("bits") or settings.get("nbits") or settings.get("w_bit")
    group = settings.get("group_size") or settings.get("q_group_size")
    if settings.get("load_in_4bit"):
        bits, group = 4, settings.get("bnb_4bit_blocksize", 64)
    elif settings.get("load_in_8bit"):
        bits = 8
    weights = settings.get("weights")  # quanto: "int4", "float8"...
    if bits is None and isinstance(weights, str):
        bits = _bits_in(weights)
    # compressed-tensors: config_groups → {group: {weights: {num_bits, group_size, strategy}}}
    for group_config in (settings.get("config_groups") or {}).values():
        weight_args = (group_config or {}).get("weights") or {}
        bits = bits or weight_args.get("num_bits")
        group = group or weight_args.get("group_size")
    scheme = settings.get("format") or settings.get("quant_type") or weights
    if isinstance(scheme, dict):  # torchao: {"default": {"_type": "Int8WeightOnlyConfig", ...}}
        scheme = next(iter(scheme.values()), {}).get("_type") if scheme else None
    return {
        "kind": "checkpoint",
        "method": method,
        "scheme": str(scheme) if scheme else None,
        "bits": int(bits) if isinstance(bits, int | float) else None,
        "group_size": int(group) if isinstance(group, int | float) and group > 0 else None,
    }


def _bits_in(name: str) -> int | None:
    digits = "".join(ch for ch in name if ch.isdigit())
    return int(digits) if digits else None


def on_the_fly_quantization(spec: QuantizeSpec) -> dict[str, Any]:
    """The provenance of an on-the-fly quantization, for the model description."""
    return {
        "kind": "on-the-fly",
        "method": spec.method,
        "scheme": spec.scheme,
        "bits": spec.bits,
        "group_size": spec.effective_group_size,
        "summary": QUANT_SCHEMES[spec.method][spec.scheme].summary,
    }


@dataclass
class StoredBytes:
    """Bytes of some tensors as a saved or served model stores them, and as they are loaded.

    ``stored`` counts quantized values at their real bit width (torchao's int4 schemes on CPU
    hold each 4-bit value, and its zero point, in an int8 container: counted at 4 bits);
    ``loaded`` is what the tensors take in memory. Scales keep their own dtype in both.
    """

    stored: int = 0
    loaded: int = 0

    def __iadd__(self, other: StoredBytes) -> StoredBytes:
        self.stored += other.stored
        self.loaded += other.loaded
        return self


def _value_bits(tensor: Any) -> int | None:
    """The bit width of a quantized tensor's values where it is narrower than their container:
    torchao's ``IntxUnpackedToInt8Tensor`` names it in ``target_dtype`` (``torch.int4``)."""
    import re

    import torch

    target = getattr(tensor, "target_dtype", None)
    if not isinstance(target, torch.dtype) or target.is_floating_point:
        return None
    match = re.fullmatch(r"torch\.u?int(\d+)", str(target))
    return int(match.group(1)) if match else None


def _tensor_bytes(tensor: Any, seen: set[int], value_bits: int | None = None) -> StoredBytes:
    """Bytes a tensor really holds: the inner tensors of a subclass (packed data, scales, zero
    points), the quantization state of a bitsandbytes parameter; shared storage counted once.
    ``value_bits``: integer inner tensors held wider than the scheme's values (int4 in int8)
    are stored at that width."""
    import torch

    flatten = getattr(type(tensor), "__tensor_flatten__", None)
    if flatten is not None and type(tensor) is not torch.Tensor:
        try:
            names, _ = tensor.__tensor_flatten__()
        except Exception:  # an odd subclass: count it as a plain tensor
            names = []
        if names:
            bits = _value_bits(tensor)
            total = StoredBytes()
            for name in names:
                total += _tensor_bytes(getattr(tensor, name), seen, bits)
            return total
    total = StoredBytes()
    if isinstance(tensor, torch.Tensor):
        try:  # a storage shared by views or tied weights is counted once, whole
            storage = tensor.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
        except (RuntimeError, NotImplementedError):
            key, size = id(tensor), tensor.numel() * tensor.element_size()
        if key not in seen:
            seen.add(key)
            width = 8 * tensor.element_size()
            narrow = value_bits is not None and not tensor.is_floating_point()
            stored = math.ceil(size * value_bits / width) if narrow and value_bits < width else size
            total += StoredBytes(stored, size)
    state = getattr(tensor, "quant_state", None)  # bitsandbytes 4-bit: absmax, code, offsets
    if state is not None:
        for value in vars(state).values():
            if isinstance(value, torch.Tensor):
                total += _tensor_bytes(value, seen)
            elif hasattr(value, "absmax"):  # nested (double-quantized) state
                for inner in vars(value).values():
                    if isinstance(inner, torch.Tensor):
                        total += _tensor_bytes(inner, seen)
    scb = getattr(tensor, "SCB", None)  # bitsandbytes 8-bit: per-row scales
    if isinstance(scb, torch.Tensor):
        total += _tensor_bytes(scb, seen)
    return total


@dataclass
class ModuleStorage:
    """One module's own tensors (not its children's): bytes stored and loaded, and weights."""

    size: StoredBytes
    weights: int


def storage_by_module(model: Any) -> dict[str, ModuleStorage]:
    """Each module's own parameters and saved buffers, by ``named_modules()`` name, for the
    modules that hold any (a storage shared by two modules, such as tied embeddings, counts
    with the first). Buffers a model does not save (rotary tables) are not its weights."""
    seen: set[int] = set()
    out: dict[str, ModuleStorage] = {}
    for module_name, module in model.named_modules():
        rows, cols = getattr(module, "out_features", None), getattr(module, "in_features", None)
        parameters = dict(module.named_parameters(recurse=False))
        transient = getattr(module, "_non_persistent_buffers_set", set())
        buffers = [(n, b) for n, b in module.named_buffers(recurse=False) if n not in transient]
        sizes, weights = StoredBytes(), 0
        for name, tensor in [*parameters.items(), *buffers]:
            if tensor is None:
                continue
            size = _tensor_bytes(tensor, seen)
            if size.loaded == 0:
                continue  # shared with a tensor already counted (tied embeddings)
            sizes += size
            if name == "weight" and isinstance(rows, int) and isinstance(cols, int):
                weights += rows * cols  # packed 4-bit weights report half their numel
            elif name in parameters:
                weights += tensor.numel()
        if sizes.loaded:
            out[module_name] = ModuleStorage(size=sizes, weights=weights)
    return out


def weight_storage(model: Any) -> dict[str, Any]:
    """Bytes of the weights as a saved or served model stores them, their logical element
    count, bits per weight, and the bytes as loaded beside them.

    Parameters and saved buffers are counted (a quantized linear keeps its scales in either);
    a linear layer's logical size is ``in × out`` whatever its packing, so bits per weight is
    ``8 · bytes / weights`` over the whole model, like llama.cpp's BPW of a file. Quantized
    values count at their real bit width (see :class:`StoredBytes`): ``weight_bytes`` and
    ``bits_per_weight`` are what rankings and budgets use; ``loaded_bytes`` and
    ``loaded_bits_per_weight`` are the memory the loaded model takes on this device.
    """
    modules = storage_by_module(model).values()
    stored = sum(m.size.stored for m in modules)
    loaded = sum(m.size.loaded for m in modules)
    weights = sum(m.weights for m in modules)
    return {
        "weight_bytes": int(stored),
        "weights": int(weights),
        "bits_per_weight": 8 * stored / weights if weights else math.nan,
        "loaded_bytes": int(loaded),
        "loaded_bits_per_weight": 8 * loaded / weights if weights else math.nan,
        "size_source": "tensors, quantized values at their bit width",
    }


#: GGUF readers (memory-mapped; metadata parsed once) by file path, inode, size and mtime.
_READERS: dict[tuple[Any, ...], Any] = {}


def read_gguf(path: Path) -> Any:
    """A ``gguf.GGUFReader`` over ``path``; a file that is not GGUF (or is cut short) is one
    line, not the reader's traceback."""
    require(GGUF_BACKEND, f"GGUF file '{path.name}'")
    from gguf import GGUFReader

    stat = path.stat()
    key = (str(path.resolve()), stat.st_ino, stat.st_size, stat.st_mtime_ns)
    if key in _READERS:  # the tokenizer check and the size both read the file's tables
        return _READERS[key]
    try:
        _READERS[key] = GGUFReader(str(path))
        return _READERS[key]
    except (ValueError, OSError, IndexError, KeyError) as exc:
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:160]
        raise ModelLoadError(
            f"'{path.name}' is not a readable GGUF file ({first})",
            "check the file (a complete download of a .gguf file)",
        ) from exc


def gguf_storage(path: Path) -> dict[str, Any]:
    """A GGUF file's weights as stored: bytes and elements of its tensors, bits per weight, and
    how many tensors of each type (e.g. ``{"Q4_0": 14, "F32": 5}``)."""
    from gguf import GGML_QUANT_SIZES

    reader = read_gguf(path)
    stored = sum(int(t.n_bytes) for t in reader.tensors)
    elements = sum(int(t.n_elements) for t in reader.tensors)
    types = Counter(t.tensor_type.name for t in reader.tensors)
    field = reader.fields.get("general.file_type")
    file_type = None
    if field is not None:
        from gguf import LlamaFileType

        try:
            file_type = LlamaFileType(int(field.parts[field.data[0]][0])).name
            file_type = file_type.removeprefix("MOSTLY_").removeprefix("ALL_")
        except ValueError:
            file_type = None
    main_type = max(
        (t for t in reader.tensors if len(t.shape) > 1),
        key=lambda t: int(t.n_elements),
        default=None,
    )
    block = GGML_QUANT_SIZES[main_type.tensor_type][0] if main_type is not None else 1
    return {
        "kind": "gguf",
        "method": "gguf",
        "scheme": file_type or (main_type.tensor_type.name if main_type else None),
        "bits": None,  # GGUF types mix bits within a block (K-quants); see bits_per_weight
        "group_size": block if block > 1 else None,
        "tensor_types": dict(sorted(types.items())),
        "weight_bytes": stored,
        "weights": elements,
        "bits_per_weight": 8 * stored / elements if elements else math.nan,
        "size_source": "GGUF tensors",
    }


#: Hugging Face module names of Llama-style decoders (Llama, Qwen2/3, Mistral...) and the GGUF
#: tensor names llama.cpp's converter gives their weights (``{i}``: the decoder layer).
GGUF_MODULE_NAMES: dict[str, str] = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "model.layers.{i}.input_layernorm": "blk.{i}.attn_norm",
    "model.layers.{i}.self_attn.q_proj": "blk.{i}.attn_q",
    "model.layers.{i}.self_attn.k_proj": "blk.{i}.attn_k",
    "model.layers.{i}.self_attn.v_proj": "blk.{i}.attn_v",
    "model.layers.{i}.self_attn.o_proj": "blk.{i}.attn_output",
    "model.layers.{i}.self_attn.q_norm": "blk.{i}.attn_q_norm",
    "model.layers.{i}.self_attn.k_norm": "blk.{i}.attn_k_norm",
    "model.layers.{i}.post_attention_layernorm": "blk.{i}.ffn_norm",
    "model.layers.{i}.mlp.gate_proj": "blk.{i}.ffn_gate",
    "model.layers.{i}.mlp.up_proj": "blk.{i}.ffn_up",
    "model.layers.{i}.mlp.down_proj": "blk.{i}.ffn_down",
}
_HF_NAMES = {gguf: hf for hf, gguf in GGUF_MODULE_NAMES.items()}


def _with_layer(name: str, marker: str) -> tuple[str, str | None]:
    """``model.layers.3.mlp.up_proj`` → (``model.layers.{i}.mlp.up_proj``, ``"3"``)."""
    parts = name.split(".")
    for at, part in enumerate(parts[:-1]):
        if part == marker and parts[at + 1].isdigit():
            return ".".join([*parts[: at + 1], "{i}", *parts[at + 2 :]]), parts[at + 1]
    return name, None


def gguf_tensor_prefix(module: str) -> str | None:
    """The GGUF name (without ``.weight``/``.bias``) of a Hugging Face module, e.g.
    ``model.layers.3.mlp.gate_proj`` → ``blk.3.ffn_gate``; None for a module it does not map."""
    template, layer = _with_layer(module, "layers")
    gguf = GGUF_MODULE_NAMES.get(template)
    return gguf.format(i=layer) if gguf is not None else None


def gguf_module_name(tensor: str) -> str | None:
    """The Hugging Face module of a GGUF tensor, e.g. ``blk.3.ffn_gate.weight`` →
    ``model.layers.3.mlp.gate_proj``; None for a tensor it does not map (``rope_freqs``)."""
    prefix = tensor.rsplit(".", 1)[0]
    template, layer = _with_layer(prefix, "blk")
    hf = _HF_NAMES.get(template)
    return hf.format(i=layer) if hf is not None else None


def gguf_module_bytes(path: Path) -> dict[str, int]:
    """Bytes each Hugging Face module's tensors take in a GGUF file (weights and biases, as
    stored), by module name; tensors no module maps to are left out."""
    out: dict[str, int] = {}
    for tensor in read_gguf(path).tensors:
        module = gguf_module_name(tensor.name)
        if module is not None:
            out[module] = out.get(module, 0) + int(tensor.n_bytes)
    return out
