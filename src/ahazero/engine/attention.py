"""Attention over the slotted KV cache, through PyTorch's SDPA. The metadata is passed explicitly.

Prefill: P distinct prompts, right-padded to T tokens, causal (padding sits after every real token, so
it needs no mask); each prompt's keys/values are written into the slots of all its completions.
Decode: one token per running sequence b, which lives in slot b; it attends over the first L positions
of its slot (L a bucket above the longest sequence), masked past its own length. GQA is folded into the
query length ([B, Hkv, G, D]), so the cache is read once per KV head and never repeated.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True, eq=False)
class PrefillMetadata:
    """`positions` [P, T]: 0..T-1 for every prompt. `last` [P]: index of each prompt's last real token.
    `slots` [S]: the KV slot of each new sequence; `rows` [S]: the prompt (row) it continues."""
    positions: torch.Tensor
    last: torch.Tensor
    slots: torch.Tensor
    rows: torch.Tensor


@dataclass(frozen=True, eq=False)
class DecodeMetadata:
    """`positions` [B]: the position of row b's input token (its sequence length - 1); row b is slot b.
    `span` [L]: 0..L-1, the cache positions attention reads (a tensor, so L is a shape: one compiled
    graph serves every length bucket)."""
    positions: torch.Tensor
    span: torch.Tensor


def prefill_attention(q, k, v, cache_k, cache_v, meta: PrefillMetadata, scale: float) -> torch.Tensor:
    """q: [P, H, T, D]; k, v: [P, Hkv, T, D]; returns [P, H, T, D]. Writes k, v into the slots."""
    T = q.shape[2]
    cache_k[meta.slots, :, :T] = k[meta.rows]  # [S, Hkv, T, D]
    cache_v[meta.slots, :, :T] = v[meta.rows]
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale,
                                          enable_gqa=q.shape[1] != k.shape[1])


def decode_attention(q, k, v, cache_k, cache_v, meta: DecodeMetadata, scale: float) -> torch.Tensor:
    """q: [B, H, D]; k, v: [B, Hkv, D] (this step's token); returns [B, H, D]."""
    B, H, D = q.shape
    kv_heads, L = k.shape[1], meta.span.shape[0]
    rows = torch.arange(B, device=q.device)  # [B]
    cache_k[rows, :, meta.positions] = k  # slot b, position positions[b]
    cache_v[rows, :, meta.positions] = v
    keys = cache_k[:B, :, :L]  # [B, Hkv, L, D]
    values = cache_v[:B, :, :L]  # [B, Hkv, L, D]
    mask = (meta.span[None, :] <= meta.positions[:, None])[:, None, None, :]  # [B, 1, 1, L]
    q = q.view(B, kv_heads, H // kv_heads, D)  # [B, Hkv, G, D]: query head h uses KV head h // G
    out = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask, scale=scale)  # [B, Hkv, G, D]
    return out.reshape(B, H, D)


def decode_attention_triton(q, k, v, cache_k, cache_v, meta: DecodeMetadata, scale: float) -> torch.Tensor:
    """decode_attention through engine/attention_kernels.py: reads each row's own length only, so
    `meta.span` is not used (one CUDA graph per batch size serves every length)."""
    from .attention_kernels import decode_attention_op
    B = q.shape[0]
    rows = torch.arange(B, device=q.device)  # [B]
    cache_k[rows, :, meta.positions] = k  # slot b, position positions[b]
    cache_v[rows, :, meta.positions] = v
    return decode_attention_op(q, cache_k, cache_v, meta.positions, scale)  # [B, H, D]
