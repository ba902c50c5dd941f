"""The Llama-family forward: Llama 3.x (llama3 RoPE scaling), Qwen2/2.5 (q/k/v bias), Qwen3 (q/k RMSNorm),
Mistral. transformers' LlamaDecoderLayer math, over flat token rows [N, H] and the slotted KV cache.

`LlamaWeights.bind(model, adapter)` collects references to the model's own parameters (and the PEFT
adapter's, unmerged); the forward functions read them in place, so nothing is ever copied.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

from ...models.lora import decoder_and_head
from ..attention import DecodeMetadata, PrefillMetadata, decode_attention, prefill_attention
from ..kv_cache import KVCache, KVShape
from ..layers import (Projection, apply_rope, base_output, embedding_weight, lora_rank, project, projection,
                      rms_norm)

MODEL_TYPES = ("llama", "qwen2", "qwen3", "mistral")
ROPE_TYPES = ("default", "linear", "llama3", "yarn")  # static tables; "dynamic" ones change with length


def unsupported_reason(causal_lm, max_seq_length: int) -> str | None:
    """Why our forward cannot run this model (None when it can)."""
    cfg = causal_lm.config
    if cfg.model_type not in MODEL_TYPES:
        return f"model type {cfg.model_type!r}"
    if getattr(cfg, "hidden_act", "silu") != "silu":
        return f"activation {cfg.hidden_act!r}"
    rotary = getattr(getattr(causal_lm, "model", None), "rotary_emb", None)
    if rotary is None or getattr(rotary, "rope_type", "default") not in ROPE_TYPES:
        return f"RoPE type {getattr(rotary, 'rope_type', None)!r}"
    window = getattr(cfg, "sliding_window", None)
    layer_types = getattr(cfg, "layer_types", None) or []
    if window is not None and window < max_seq_length and (cfg.model_type == "mistral" or
                                                           "sliding_attention" in layer_types):
        return f"sliding-window attention ({window} < max_seq_length {max_seq_length})"
    return None


def kv_shape(causal_lm) -> KVShape:
    cfg = causal_lm.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    return KVShape(cfg.num_hidden_layers, cfg.num_key_value_heads, head_dim)


def rope_table(causal_lm, max_seq_length: int, device, dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [max_seq_length, D] from the model's own rotary module (so any static RoPE scaling and
    its attention factor are the model's): row p is exactly what transformers computes for position p."""
    positions = torch.arange(max_seq_length, device=device)[None]  # [1, T]
    probe = torch.empty(0, device=device, dtype=dtype)
    cos, sin = causal_lm.model.rotary_emb(probe, positions)  # each [1, T, D]
    return cos[0], sin[0]


@dataclass(frozen=True, eq=False)
class LayerWeights:
    input_norm: torch.Tensor  # [H]
    post_norm: torch.Tensor  # [H]
    q: Projection
    k: Projection
    v: Projection
    o: Projection
    gate: Projection
    up: Projection
    down: Projection
    q_norm: torch.Tensor | None  # [D], Qwen3 only
    k_norm: torch.Tensor | None


@dataclass(frozen=True, eq=False)
class LlamaWeights:
    """References to one model's parameters, with one adapter (or none) chosen for every projection."""
    embed: torch.Tensor  # [V, H]
    layers: tuple[LayerWeights, ...]
    norm: torch.Tensor  # [H]
    lm_head: Projection
    eps: float
    num_heads: int
    num_kv_heads: int
    head_dim: int
    grouped_lora: Callable | None = None  # engine/lora_kernels.grouped_lora, or None: LoRA through torch
    fused_kernels: bool = False  # decode through engine/fused_kernels.py (needs the Triton attention)
    gemv_kernels: bool = False  # the fused decode's projections through engine/gemv_kernels.py

    @classmethod
    def bind(cls, model, adapter: str | None, lora_kernels: bool = False, fused_kernels: bool = False,
             gemv_kernels: bool = False) -> "LlamaWeights":
        decoder, lm_head = decoder_and_head(model)
        grouped = None
        if lora_kernels:
            from ..lora_kernels import grouped_lora as grouped
        cfg = decoder.config
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        return cls(embed=embedding_weight(decoder.embed_tokens, adapter),
                   layers=tuple(_bind_layer(layer, adapter) for layer in decoder.layers),
                   norm=decoder.norm.weight, lm_head=projection(lm_head, adapter), eps=cfg.rms_norm_eps,
                   num_heads=cfg.num_attention_heads, num_kv_heads=cfg.num_key_value_heads, head_dim=head_dim,
                   grouped_lora=grouped, fused_kernels=fused_kernels, gemv_kernels=gemv_kernels)

    def signature(self) -> tuple:
        """Identity of every tensor read (storage address) and every LoRA scale: when it changes, captured
        CUDA graphs (which hold addresses) must be captured again."""
        projections = [self.lm_head] + [p for lw in self.layers for p in
                                        (lw.q, lw.k, lw.v, lw.o, lw.gate, lw.up, lw.down)]
        tensors = [self.embed, self.norm] + [t for lw in self.layers for t in
                                             (lw.input_norm, lw.post_norm, lw.q_norm, lw.k_norm) if t is not None]
        tensors += [t for p in projections for t in p.tensors()]
        return tuple(t.data_ptr() for t in tensors) + tuple(p.scale for p in projections)


def _bind_layer(layer, adapter: str | None) -> LayerWeights:
    attn, mlp = layer.self_attn, layer.mlp
    q_norm, k_norm = getattr(attn, "q_norm", None), getattr(attn, "k_norm", None)
    return LayerWeights(input_norm=layer.input_layernorm.weight, post_norm=layer.post_attention_layernorm.weight,
                        q=projection(attn.q_proj, adapter), k=projection(attn.k_proj, adapter),
                        v=projection(attn.v_proj, adapter), o=projection(attn.o_proj, adapter),
                        gate=projection(mlp.gate_proj, adapter), up=projection(mlp.up_proj, adapter),
                        down=projection(mlp.down_proj, adapter),
                        q_norm=None if q_norm is None else q_norm.weight,
                        k_norm=None if k_norm is None else k_norm.weight)


Attend = Callable[..., torch.Tensor]


def decoder_layer(w: LlamaWeights, lw: LayerWeights, h, cos, sin, cache_k, cache_v, meta, attend: Attend):
    """h: [N, H] token rows; cos, sin: [N, 1, D]. transformers' LlamaDecoderLayer, pre-norm residual."""
    N = h.shape[0]
    x = rms_norm(h, lw.input_norm, w.eps)  # [N, H]
    q, k, v = project(x, (lw.q, lw.k, lw.v), w.grouped_lora)
    q = q.view(N, w.num_heads, w.head_dim)  # [N, Hq, D]
    k = k.view(N, w.num_kv_heads, w.head_dim)  # [N, Hkv, D]
    v = v.view(N, w.num_kv_heads, w.head_dim)  # [N, Hkv, D]
    if lw.q_norm is not None:  # Qwen3: RMSNorm over each head before RoPE
        q, k = rms_norm(q, lw.q_norm, w.eps), rms_norm(k, lw.k_norm, w.eps)
    q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
    a = attend(q, k, v, cache_k, cache_v, meta, w.head_dim ** -0.5)  # [N, Hq, D]
    h = h + project(a.reshape(N, -1), (lw.o,), w.grouped_lora)[0]  # [N, H]
    x = rms_norm(h, lw.post_norm, w.eps)  # [N, H]
    gate, up = project(x, (lw.gate, lw.up), w.grouped_lora)  # each [N, I]
    return h + project(F.silu(gate) * up, (lw.down,), w.grouped_lora)[0]  # [N, H]


def _prefill_attend(q, k, v, cache_k, cache_v, meta: PrefillMetadata, scale: float):
    """Flat rows [P*T, heads, D] -> the padded batch layout SDPA wants, and back."""
    P, T = meta.positions.shape
    q, k, v = (t.view(P, T, t.shape[1], t.shape[2]).transpose(1, 2) for t in (q, k, v))  # [P, heads, T, D]
    out = prefill_attention(q, k, v, cache_k, cache_v, meta, scale)  # [P, Hq, T, D]
    return out.transpose(1, 2).reshape(P * T, out.shape[1], out.shape[3])  # [P*T, Hq, D]


def _run_layers(w: LlamaWeights, input_ids, positions, kv: KVCache, rope, meta, attend: Attend,
                layer: Callable = decoder_layer):
    """input_ids, positions: [N]. Returns the final hidden rows before the last norm, [N, H].
    `layer`: decoder_layer, or a compiled version of it (the same function for every layer)."""
    cos, sin = rope[0][positions].unsqueeze(1), rope[1][positions].unsqueeze(1)  # [N, 1, D]
    h = F.embedding(input_ids, w.embed)  # [N, H]
    for i, lw in enumerate(w.layers):
        cache_k, cache_v = kv.layer(i)
        h = layer(w, lw, h, cos, sin, cache_k, cache_v, meta, attend)
    return h


def logits(w: LlamaWeights, h: torch.Tensor) -> torch.Tensor:
    """h: [N, H] -> logits [N, V] in the model's dtype, as transformers computes them; the sampler takes
    them to float32 (inside its fused passes, so a CUDA graph keeps half-size outputs)."""
    return w.lm_head(rms_norm(h, w.norm, w.eps))


def prefill(w: LlamaWeights, input_ids, meta: PrefillMetadata, kv: KVCache, rope) -> torch.Tensor:
    """input_ids: [P, T] right-padded prompts. Fills the slots in `meta`; returns last-token logits [P, V]."""
    P, T = input_ids.shape
    h = _run_layers(w, input_ids.reshape(-1), meta.positions.reshape(-1), kv, rope, meta, _prefill_attend)
    last = h.view(P, T, -1)[torch.arange(P, device=h.device), meta.last]  # [P, H]
    return logits(w, last)


def decode(w: LlamaWeights, input_ids, meta: DecodeMetadata, kv: KVCache, rope,
           attend: Attend = decode_attention, layer: Callable = decoder_layer) -> torch.Tensor:
    """input_ids: [B], the last token of the sequence in slot b. Returns next-token logits [B, V].
    `attend`: attention.decode_attention (SDPA) or attention.decode_attention_triton; `layer`: see
    _run_layers (not used by the fused path)."""
    if w.fused_kernels:
        return _decode_fused(w, input_ids, meta, kv, rope)
    h = _run_layers(w, input_ids, meta.positions, kv, rope, meta, attend, layer)
    return logits(w, h)


def _decode_fused(w: LlamaWeights, input_ids, meta: DecodeMetadata, kv: KVCache, rope) -> torch.Tensor:
    """`decode` through engine/fused_kernels.py, the same math in fewer launches: each residual add rides
    in the next RMSNorm, RoPE of q and k and the KV-cache write are one launch, SiLU * up one; attention
    is the Triton kernel, which reads the cache the RoPE launch wrote. Returns logits [B, V]."""
    from .. import fused_kernels as fused
    from .. import gemv_kernels, lora_kernels
    from ..attention_kernels import decode_attention_op
    B, D = input_ids.shape[0], w.head_dim

    def one_launch(x, projections):  # the group in (1 +) 1 launch, or None where gemv_kernels does not serve it
        return gemv_kernels.project(x, projections, w.grouped_lora) if w.gemv_kernels else None

    def proj(x, projections):
        ys = one_launch(x, projections)
        return ys if ys is not None else project(x, projections, w.grouped_lora)

    def swiglu(x, gate_up):  # silu(gate) * up [B, I]; where cuBLAS serves gate/up, the LoRA expand in this launch
        ys = one_launch(x, gate_up)
        if (ys is None and w.grouped_lora is not None and lora_kernels.EXPAND_IN_SILU_MUL
                and lora_rank(gate_up) is not None):
            return lora_kernels.grouped_lora_silu_mul(x, gate_up, base_output)
        return fused.silu_mul(*(ys if ys is not None else project(x, gate_up, w.grouped_lora)))

    h = F.embedding(input_ids, w.embed)  # [B, H] the residual stream
    delta = None  # what the last layer adds to h, not yet added
    for i, lw in enumerate(w.layers):
        cache_k, cache_v = kv.layer(i)
        if delta is None:
            x = fused.rms_norm(h, lw.input_norm, w.eps)  # [B, H]
        else:
            x, h = fused.add_rms_norm(h, delta, lw.input_norm, w.eps)
        q, k, v = proj(x, (lw.q, lw.k, lw.v))
        q, k, v = q.view(B, w.num_heads, D), k.view(B, w.num_kv_heads, D), v.view(B, w.num_kv_heads, D)
        if lw.q_norm is not None:  # Qwen3: RMSNorm over each head before RoPE
            q = fused.rms_norm(q.reshape(-1, D), lw.q_norm, w.eps).view(B, w.num_heads, D)
            k = fused.rms_norm(k.reshape(-1, D), lw.k_norm, w.eps).view(B, w.num_kv_heads, D)
        q = fused.rope_and_cache(q, k, v, rope[0], rope[1], meta.positions, cache_k, cache_v)  # [B, Hq, D]
        a = decode_attention_op(q, cache_k, cache_v, meta.positions, D ** -0.5)  # [B, Hq, D]
        x, h = fused.add_rms_norm(h, proj(a.reshape(B, -1), (lw.o,))[0], lw.post_norm, w.eps)
        delta = proj(swiglu(x, (lw.gate, lw.up)), (lw.down,))[0]  # [B, H]
    x, _ = fused.add_rms_norm(h, delta, w.norm, w.eps)
    return w.lm_head(x)  # [B, V]
