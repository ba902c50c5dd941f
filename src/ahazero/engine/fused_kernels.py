"""Fused element-wise kernels of the decode step, in Triton: fewer launches per layer.

A decode step is bound by launches, not bytes: at batch 6 on an H100 it took 7.5 ms where its weights
need 1.1 ms, about 50 kernels per layer with the Triton LoRA and attention kernels (bench/RESULTS.md,
2026-11-27). transformers' element-wise math costs 8 launches per RMSNorm, ~12 for RoPE of q and k and
3 for the KV-cache write. These kernels do each group in one launch, with the same roundings as the
torch path (each torch op on a 16-bit tensor computes in float32 and rounds its output once):
  add_rms_norm   h = h + delta (rounded); x = weight * (h * rsqrt(mean(h^2) + eps)).to(dtype)   [N, H]
  rms_norm       the same without the add (Qwen3's per-head q/k norms)
  rope_and_cache q, k rotated (x * cos + rotate_half(x) * sin, each product rounded, then the sum);
                 k and v written into each row's slot at its position; returns the rotated q      [B, Hq, D]
  silu_mul       silu(gate) (rounded) * up                                                        [N, I]
kernel -> launcher -> torch.library custom op (opaque to torch.compile, captured by CUDA graphs). The
CPU tests run them through Triton's interpreter against the torch functions of engine/layers.py.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..models.nf4_kernels import pdl_options, wait_for_inputs


@triton.jit
def _add_rms_norm_kernel(h_ptr, delta_ptr, w_ptr, out_ptr, res_ptr, H, eps,
                         HAS_DELTA: tl.constexpr, BLOCK_H: tl.constexpr, USE_PDL: tl.constexpr):
    """Program row: res[row] = h[row] + delta[row]; out[row] = w * rmsnorm(res[row]) (torch's roundings)."""
    wait_for_inputs(USE_PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    h = tl.load(h_ptr + row * H + cols, mask=mask, other=0.0)
    if HAS_DELTA:
        delta = tl.load(delta_ptr + row * H + cols, mask=mask, other=0.0)
        h = (h.to(tl.float32) + delta.to(tl.float32)).to(h_ptr.dtype.element_ty)
        tl.store(res_ptr + row * H + cols, h, mask=mask)
    hf = h.to(tl.float32)
    variance = tl.sum(hf * hf, axis=0) / H
    normed = (hf * (1.0 / tl.sqrt(variance + eps))).to(h_ptr.dtype.element_ty)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * H + cols, (w.to(tl.float32) * normed.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=mask)


def _launch_rms_norm(h: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor, eps: float):
    h = h.contiguous()
    N, H = h.shape
    out = torch.empty(N, H, device=h.device, dtype=torch.promote_types(weight.dtype, h.dtype))  # as weight * x
    res = torch.empty_like(h) if delta is not None else h
    _add_rms_norm_kernel[(N,)](h, h if delta is None else delta.contiguous(), weight, out, res, H, eps,
                               HAS_DELTA=delta is not None, BLOCK_H=triton.next_power_of_2(H), **pdl_options(h.device))
    return out, res


@torch.library.custom_op("ahazero::rms_norm", mutates_args=())
def rms_norm(h: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """layers.rms_norm over the last dim of h [N, H], in one launch."""
    return _launch_rms_norm(h, None, weight, eps)[0]


@rms_norm.register_fake
def _(h, weight, eps):
    return h.new_empty(h.shape, dtype=torch.promote_types(weight.dtype, h.dtype))


@torch.library.custom_op("ahazero::add_rms_norm", mutates_args=())
def add_rms_norm(h: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """h, delta [N, H] -> (rms_norm(h + delta) [N, H], h + delta [N, H]), in one launch."""
    return _launch_rms_norm(h, delta, weight, eps)


@add_rms_norm.register_fake
def _(h, delta, weight, eps):
    return h.new_empty(h.shape, dtype=torch.promote_types(weight.dtype, h.dtype)), torch.empty_like(h)


@triton.jit
def _rotate(x_ptr, cos_ptr, sin_ptr, half, HALF: tl.constexpr):
    """(x1 * c1 + (-x2) * s1, x2 * c2 + x1 * s2) over the two halves, each product and the sum rounded."""
    x1 = tl.load(x_ptr + half).to(tl.float32)
    x2 = tl.load(x_ptr + HALF + half).to(tl.float32)
    c1, c2 = tl.load(cos_ptr + half).to(tl.float32), tl.load(cos_ptr + HALF + half).to(tl.float32)
    s1, s2 = tl.load(sin_ptr + half).to(tl.float32), tl.load(sin_ptr + HALF + half).to(tl.float32)
    dtype = x_ptr.dtype.element_ty
    a1, b1 = (x1 * c1).to(dtype).to(tl.float32), (-x2 * s1).to(dtype).to(tl.float32)
    a2, b2 = (x2 * c2).to(dtype).to(tl.float32), (x1 * s2).to(dtype).to(tl.float32)
    return (a1 + b1).to(dtype), (a2 + b2).to(dtype)


@triton.jit
def _rope_cache_kernel(q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, pos_ptr, q_out_ptr, ck_ptr, cv_ptr,
                       stride_qb, stride_kb, stride_cs, stride_ch, stride_ct,
                       HQ: tl.constexpr, HALF: tl.constexpr, USE_PDL: tl.constexpr):
    """Program (b, head): heads < HQ rotate q into q_out; the others rotate k and write k, v to the cache."""
    wait_for_inputs(USE_PDL)
    b, head = tl.program_id(0), tl.program_id(1)
    pos = tl.load(pos_ptr + b)
    half = tl.arange(0, HALF)
    cos_row, sin_row = cos_ptr + pos * (2 * HALF), sin_ptr + pos * (2 * HALF)
    if head < HQ:
        lo, hi = _rotate(q_ptr + b * stride_qb + head * (2 * HALF), cos_row, sin_row, half, HALF)
        out = q_out_ptr + (b * HQ + head) * (2 * HALF)
        tl.store(out + half, lo)
        tl.store(out + HALF + half, hi)
    else:
        kh = head - HQ
        lo, hi = _rotate(k_ptr + b * stride_kb + kh * (2 * HALF), cos_row, sin_row, half, HALF)
        slot = b.to(tl.int64) * stride_cs + kh * stride_ch + pos.to(tl.int64) * stride_ct
        tl.store(ck_ptr + slot + half, lo)
        tl.store(ck_ptr + slot + HALF + half, hi)
        v_at = v_ptr + b * stride_kb + kh * (2 * HALF)
        tl.store(cv_ptr + slot + half, tl.load(v_at + half))
        tl.store(cv_ptr + slot + HALF + half, tl.load(v_at + HALF + half))


@torch.library.custom_op("ahazero::rope_and_cache", mutates_args=("cache_k", "cache_v"))
def rope_and_cache(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                   positions: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor) -> torch.Tensor:
    """q [B, Hq, D], k, v [B, Hkv, D] (rows may be strided views of one projection output); cos, sin
    [T, D] tables; positions [B]; cache_k, cache_v [slots, Hkv, T, D]. Row b is slot b. Returns the
    rotated q [B, Hq, D] (contiguous); writes rotated k and v at each row's position."""
    B, HQ, D = q.shape
    HKV = k.shape[1]
    assert q.stride(2) == k.stride(2) == v.stride(2) == 1 and q.stride(1) == k.stride(1) == D
    assert k.stride(0) == v.stride(0) and cache_k.stride() == cache_v.stride() and cache_k.stride(3) == 1
    q_out = torch.empty(B, HQ, D, device=q.device, dtype=q.dtype)
    _rope_cache_kernel[(B, HQ + HKV)](q, k, v, cos, sin, positions, q_out, cache_k, cache_v,
                                      q.stride(0), k.stride(0), cache_k.stride(0), cache_k.stride(1),
                                      cache_k.stride(2), HQ=HQ, HALF=D // 2, **pdl_options(q.device))
    return q_out


@rope_and_cache.register_fake
def _(q, k, v, cos, sin, positions, cache_k, cache_v):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


@triton.jit
def silu_mul_values(g, u, dtype: tl.constexpr):
    """silu(g) rounded to dtype, times u, rounded to dtype (torch's roundings of F.silu(gate) * up); g and u in
    `dtype` or float32. Shared with engine/lora_kernels.py's expand-in-SiLU launch."""
    g = g.to(tl.float32)
    silu = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
    return (silu * u.to(tl.float32)).to(dtype)


@triton.jit(do_not_specialize=["n"])  # n = rows x width: one compile for every batch
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_inputs(USE_PDL)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    g = tl.load(gate_ptr + offs, mask=mask, other=0.0)
    u = tl.load(up_ptr + offs, mask=mask, other=0.0)
    tl.store(out_ptr + offs, silu_mul_values(g, u, out_ptr.dtype.element_ty), mask=mask)


@torch.library.custom_op("ahazero::silu_mul", mutates_args=())
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """F.silu(gate) * up, gate and up [N, I]."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n, block = gate.numel(), 1024
    _silu_mul_kernel[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block, **pdl_options(gate.device))
    return out


@silu_mul.register_fake
def _(gate, up):
    return torch.empty_like(gate)
