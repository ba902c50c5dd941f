"""Writing merged weights as one GGUF file with the `gguf` package (llama.cpp's own Python writer).

Follows llama.cpp's convert_hf_to_gguf.py for the supported families: architecture "llama" (for llama and
mistral: q/k rows permuted to llama.cpp's rotary layout, Llama-3 rope scaling as a `rope_freqs` tensor),
"qwen2" and "qwen3"; tensor names from `gguf.get_tensor_name_map`; norms and 1-D tensors in F32, the rest
in the requested type (F32, F16, BF16 or Q8_0, quantised in Python by `gguf.quants`).

Streaming: tensor infos come from the shapes alone, then each transformer block is merged, converted
and appended in turn, so memory holds the model plus one block -- never a second copy.
"""
from __future__ import annotations

import math
from itertools import groupby
from pathlib import Path

import gguf
import numpy as np
import torch

from .gguf_vocab import GGUFVocab, gguf_vocab

ARCHS = {"llama": gguf.MODEL_ARCH.LLAMA, "mistral": gguf.MODEL_ARCH.LLAMA,
         "qwen2": gguf.MODEL_ARCH.QWEN2, "qwen3": gguf.MODEL_ARCH.QWEN3}
Q = gguf.GGMLQuantizationType
FILE_TYPES = {Q.F32: gguf.LlamaFileType.ALL_F32, Q.F16: gguf.LlamaFileType.MOSTLY_F16,
              Q.BF16: gguf.LlamaFileType.MOSTLY_BF16, Q.Q8_0: gguf.LlamaFileType.MOSTLY_Q8_0}


def gguf_arch(config) -> gguf.MODEL_ARCH:
    if config.model_type not in ARCHS:
        raise NotImplementedError(f"GGUF export supports {sorted(ARCHS)}, not model_type {config.model_type!r}")
    return ARCHS[config.model_type]


def write_gguf(source, tokenizer, out_file, qtype: Q, name: str = "model") -> Path:
    """Write `source` (see weights.py) and `tokenizer` (or a prepared `GGUFVocab`) to `out_file`,
    matrices stored as `qtype`."""
    config, arch = source.config, gguf_arch(source.config)
    plan = tensor_plan(source.shapes(), config, arch, qtype)
    vocab = tokenizer if isinstance(tokenizer, GGUFVocab) else vocab_for(source, tokenizer)
    writer = gguf.GGUFWriter(out_file, gguf.MODEL_ARCH_NAMES[arch])
    add_model_metadata(writer, config, arch, name, FILE_TYPES[qtype])
    vocab.add_to(writer)
    for hf_key, gname, shape, tensor_type in plan:
        nbytes = math.prod(gguf.quant_shape_to_byte_shape(shape, tensor_type))
        writer.add_tensor_info(gname, shape, np.dtype(np.float32), nbytes, raw_dtype=tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensors in _converted(source, plan, config, arch):
        for data in tensors:
            writer.write_tensor_data(data)
    writer.close()
    return Path(out_file)


def vocab_for(source, tokenizer) -> GGUFVocab:
    """The tokenizer's GGUF data, sized to the model's embedding rows."""
    names = gguf.get_tensor_name_map(gguf_arch(source.config), source.config.num_hidden_layers)
    rows = next(shape[0] for key, (shape, _) in source.shapes().items()
                if names.get_name(key, try_suffixes=(".weight",)) == "token_embd.weight")
    return gguf_vocab(tokenizer, source.config, rows)


def tensor_plan(shapes: dict, config, arch, qtype: Q) -> list[tuple[str | None, str, tuple, Q]]:
    """(transformers key, GGUF name, shape, storage type) per tensor, in writing order.

    The key is None for tensors made here (llama3 `rope_freqs`). Raises on any weight without a GGUF
    name, so nothing trained is silently dropped.
    """
    names = gguf.get_tensor_name_map(arch, config.num_hidden_layers)
    plan = []
    if (freqs := llama3_rope_factors(config, arch)) is not None:
        plan.append((None, "rope_freqs.weight", tuple(freqs.shape), Q.F32))
    for key, (shape, _) in shapes.items():
        gname = names.get_name(key, try_suffixes=(".weight", ".bias"))
        if gname is None:
            raise ValueError(f"no GGUF name for weight {key!r} of a {config.model_type} model")
        plan.append((key, gname, shape, storage_type(gname, shape, qtype)))
    return plan


def storage_type(gname: str, shape: tuple, qtype: Q) -> Q:
    """F32 for norms, biases and vectors (llama.cpp needs them so); F16 where Q8_0's 32-blocks don't fit."""
    if len(shape) <= 1 or gname.endswith("_norm.weight") or not gname.endswith(".weight"):
        return Q.F32
    block = gguf.GGML_QUANT_SIZES[qtype][0]
    return qtype if shape[-1] % block == 0 else Q.F16


def _converted(source, plan, config, arch):
    """Per transformer block: the numpy arrays to append, in plan order."""
    for _, group in groupby(plan, key=lambda item: _block_of(item[0])):
        group = list(group)
        keys = [k for k, *_ in group if k is not None]
        tensors = source.load(keys) if keys else {}
        out = []
        for key, gname, _, tensor_type in group:
            tensor = llama3_rope_factors(config, arch) if key is None else tensors.pop(key)
            tensor = to_gguf_layout(tensor, key or "", config, arch)
            out.append(gguf.quants.quantize(tensor.float().numpy(), tensor_type))
        del tensors
        yield out


def _block_of(key: str | None):
    parts = (key or "").split(".")
    return next((p for p in parts if p.isdecimal()), None)


def to_gguf_layout(tensor: torch.Tensor, key: str, config, arch) -> torch.Tensor:
    """llama.cpp's "llama" rotary pairs dims (i, i + d/2) differently from transformers: permute q and k rows."""
    if arch != gguf.MODEL_ARCH.LLAMA:
        return tensor
    n_head, n_kv = config.num_attention_heads, config.num_key_value_heads
    if key.endswith(("q_proj.weight", "q_proj.bias")):
        return permute_rotary(tensor, n_head)
    if key.endswith(("k_proj.weight", "k_proj.bias")):
        return permute_rotary(tensor, n_kv)
    return tensor


def permute_rotary(weights: torch.Tensor, n_head: int) -> torch.Tensor:
    """Rows [h, 2, d/2] -> [h, d/2, 2] per head (llama.cpp's `LlamaModel.permute`)."""
    shape = weights.shape
    return weights.reshape(n_head, 2, shape[0] // n_head // 2, *shape[1:]).swapaxes(1, 2).reshape(shape)


def head_dim(config) -> int:
    return getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads


def rope_parameters(config) -> dict:
    """transformers 5 keeps rope settings in `rope_parameters` (older: `rope_theta` + `rope_scaling`)."""
    params = dict(getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {})
    params.setdefault("rope_theta", getattr(config, "rope_theta", 10000.0))
    params.setdefault("rope_type", params.get("type", "default"))
    return params


def llama3_rope_factors(config, arch) -> torch.Tensor | None:
    """Per-frequency divisors of Llama-3 rope scaling, which llama.cpp reads from `rope_freqs.weight`."""
    rope = rope_parameters(config)
    if arch != gguf.MODEL_ARCH.LLAMA or rope["rope_type"] != "llama3":
        return None
    dim = head_dim(config)
    freqs = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    factor, low, high = rope.get("factor", 8.0), rope.get("low_freq_factor", 1.0), rope.get("high_freq_factor", 4.0)
    old_ctx = rope.get("original_max_position_embeddings", 8192)
    wavelen = 2 * math.pi / freqs
    smooth = (old_ctx / wavelen - low) / (high - low)
    mid = 1 / ((1 - smooth) / factor + smooth)
    return torch.where(wavelen < old_ctx / high, 1.0, torch.where(wavelen > old_ctx / low, factor, mid)).float()


def add_model_metadata(writer: gguf.GGUFWriter, config, arch, name: str, file_type) -> None:
    """Hyper-parameters as llama.cpp's converter writes them (TextModel + LlamaModel.set_gguf_parameters)."""
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(name)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_key_length(head_dim(config))
    writer.add_value_length(head_dim(config))
    add_rope_metadata(writer, config, arch)
    if arch == gguf.MODEL_ARCH.LLAMA:
        writer.add_vocab_size(config.vocab_size)
    writer.add_file_type(file_type)
    writer.add_quantization_version(gguf.GGML_QUANT_VERSION)


def add_rope_metadata(writer: gguf.GGUFWriter, config, arch) -> None:
    rope = rope_parameters(config)
    writer.add_rope_freq_base(rope["rope_theta"])
    writer.add_rope_dimension_count(head_dim(config))
    kind = rope["rope_type"]
    if kind == "default" or (kind == "llama3" and arch == gguf.MODEL_ARCH.LLAMA):   # llama3: rope_freqs tensor
        return
    if kind == "linear":
        writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        writer.add_rope_scaling_factor(rope["factor"])
    elif kind == "yarn":
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rope["factor"])
        writer.add_rope_scaling_orig_ctx_len(rope["original_max_position_embeddings"])
    else:
        raise NotImplementedError(f"rope scaling {kind!r} of a {config.model_type} model has no GGUF export here")
