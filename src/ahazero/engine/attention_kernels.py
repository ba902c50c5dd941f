"""Decode attention over the slotted KV cache in Triton (flash-decoding: split-KV, then a merge).

Row b (slot b) attends with its G = Hq / Hkv query heads of KV head h over positions 0..positions[b]
of its slot, and reads nothing past them: no padding to a length bucket, no mask tensor, so one CUDA
graph per batch size serves every length. The query heads of a KV head share each K/V tile.
  partial:  program (b, h, split) -> running max m, sum l, unnormalised output acc over its chunk
  merge:    per (b, h)            -> out = sum_s exp(m_s - M) acc_s / sum_s exp(m_s - M) l_s
The merge runs in the partial launch (MERGE_IN_PARTIAL): each split stores its partial and bumps (b, h)'s
counter, and the last split to arrive merges (models/nf4_kernels.py's split-K pattern), so decode attention
is one launch; else a second launch, a program per (b, h).
Softmax in float32; q.k and p.v on tensor cores in the cache's dtype (IEEE float32 for float32 caches;
p is rounded to the cache's dtype first, as in flash attention).
kernel -> launcher -> torch.library custom op. The CPU tests run it through Triton's interpreter.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..models.nf4_kernels import last_to_arrive, pdl_options, sm_count, split_k_workspace, wait_for_inputs

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"  # the interpreter's dot is wrong for bf16: use float32
CHUNK = 256  # KV positions per split program, at most
BLOCK_T = 64  # KV positions per tile inside a program
# A few short sequences (W2: 6 rows x 2 KV heads over ~380 positions) gave 24 programs of 4 serial tiles:
# 6.6 us a layer on an H200 for 2 MB of cache (bench/RESULTS.md, 2026-11-27, sixth session). The chunk
# halves, down to one tile, until there are MIN_PROGRAMS_PER_SM programs per SM.
MIN_PROGRAMS_PER_SM = 2
NUM_WARPS = 4
MERGE_IN_PARTIAL = True  # H200, 2026-11-29: W2 0.487 -> 0.440 s (bench/rollout.py --set ...MERGE_IN_PARTIAL=False)


@triton.jit
def _dot(a, b, IS_FP32: tl.constexpr):
    if IS_FP32:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        out = tl.dot(a, b)
    return out


@triton.jit
def _partial_kernel(q_ptr, k_ptr, v_ptr, pos_ptr, acc_ptr, ml_ptr, out_ptr, count_ptr, scale,
                    stride_qb, stride_qh, stride_kb, stride_kh, stride_kt, stride_ob, stride_oh,
                    HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                    BLOCK_G: tl.constexpr, CHUNK: tl.constexpr, BLOCK_T: tl.constexpr, IS_FP32: tl.constexpr,
                    MERGE: tl.constexpr, USE_PDL: tl.constexpr):
    """Split s of (row b, KV head h): stores its (acc, m, l); with MERGE, the last of the SPLITS to arrive
    (count_ptr[b * HKV + h], reset to 0 after) merges them into out."""
    wait_for_inputs(USE_PDL)
    b, h, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    length = tl.load(pos_ptr + b) + 1
    heads = tl.arange(0, BLOCK_G)  # [BG] query heads h*G + heads
    dims = tl.arange(0, D)  # [D]
    q_at = q_ptr + b * stride_qb + (h * G + heads[:, None]) * stride_qh + dims[None, :]
    q = tl.load(q_at, mask=heads[:, None] < G, other=0.0)  # [BG, D]
    m = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    l = tl.zeros((BLOCK_G,), tl.float32)
    acc = tl.zeros((BLOCK_G, D), tl.float32)
    kv = b * stride_kb + h * stride_kh
    if s * CHUNK < length:  # a split past the sequence leaves m = -inf, l = 0: the merge weighs it 0
        for t0 in range(0, CHUNK, BLOCK_T):
            ts = s * CHUNK + t0 + tl.arange(0, BLOCK_T)  # [BT]
            valid = ts < length
            kT = tl.load(k_ptr + kv + ts[None, :] * stride_kt + dims[:, None], mask=valid[None, :], other=0.0)
            scores = _dot(q, kT, IS_FP32) * scale  # [BG, BT]
            scores = tl.where(valid[None, :], scores, float("-inf"))
            m_new = tl.maximum(m, tl.max(scores, axis=1))  # [BG]
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a tile with nothing valid yet
            p = tl.exp(scores - m_safe[:, None])  # [BG, BT]
            alpha = tl.exp(m - m_safe)  # [BG]
            v = tl.load(v_ptr + kv + ts[:, None] * stride_kt + dims[None, :], mask=valid[:, None], other=0.0)
            acc = acc * alpha[:, None] + _dot(p.to(v.dtype), v, IS_FP32)  # [BG, D]
            l = l * alpha + tl.sum(p, axis=1)
            m = m_new
    row = ((b * HKV + h) * SPLITS + s) * BLOCK_G + heads  # [BG]
    tl.store(acc_ptr + row[:, None] * D + dims[None, :], acc)
    tl.store(ml_ptr + row * 2, m)
    tl.store(ml_ptr + row * 2 + 1, l)
    if MERGE:
        if last_to_arrive(count_ptr + b * HKV + h, SPLITS):
            _merge(acc_ptr, ml_ptr, out_ptr, b, h, stride_ob, stride_oh, HKV, G, D, SPLITS, BLOCK_G)
            tl.store(count_ptr + b * HKV + h, 0)


@triton.jit
def _merge_kernel(acc_ptr, ml_ptr, out_ptr, stride_ob, stride_oh,
                  HKV: tl.constexpr, G: tl.constexpr, D: tl.constexpr, SPLITS: tl.constexpr,
                  BLOCK_G: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_inputs(USE_PDL)
    _merge(acc_ptr, ml_ptr, out_ptr, tl.program_id(0), tl.program_id(1), stride_ob, stride_oh, HKV, G, D, SPLITS,
           BLOCK_G)


@triton.jit
def _merge(acc_ptr, ml_ptr, out_ptr, b, h, stride_ob, stride_oh, HKV: tl.constexpr, G: tl.constexpr,
           D: tl.constexpr, SPLITS: tl.constexpr, BLOCK_G: tl.constexpr):
    """out[b, h's query heads] from the SPLITS partials of (b, h) (read past L1: other programs wrote them)."""
    heads = tl.arange(0, BLOCK_G)  # [BG]
    dims = tl.arange(0, D)  # [D]
    base = (b * HKV + h) * SPLITS * BLOCK_G
    top = tl.full((BLOCK_G,), float("-inf"), tl.float32)
    for s in range(SPLITS):
        top = tl.maximum(top, tl.load(ml_ptr + (base + s * BLOCK_G + heads) * 2, cache_modifier=".cg"))
    total = tl.zeros((BLOCK_G,), tl.float32)
    out = tl.zeros((BLOCK_G, D), tl.float32)
    for s in range(SPLITS):
        row = base + s * BLOCK_G + heads  # [BG]
        weight = tl.exp(tl.load(ml_ptr + row * 2, cache_modifier=".cg") - top)  # [BG]; 0 for an empty split
        total += weight * tl.load(ml_ptr + row * 2 + 1, cache_modifier=".cg")
        out += weight[:, None] * tl.load(acc_ptr + row[:, None] * D + dims[None, :], cache_modifier=".cg")
    out = out / total[:, None]
    out_at = out_ptr + b * stride_ob + (h * G + heads[:, None]) * stride_oh + dims[None, :]
    tl.store(out_at, out.to(out_ptr.dtype.element_ty), mask=heads[:, None] < G)


def chunk_for(B: int, Hkv: int, T: int, sms: int) -> int:
    """KV positions per split program: CHUNK, halved down to BLOCK_T while the grid is under
    MIN_PROGRAMS_PER_SM programs per SM."""
    chunk = CHUNK
    while chunk > BLOCK_T and B * Hkv * triton.cdiv(T, chunk) < MIN_PROGRAMS_PER_SM * sms:
        chunk //= 2
    return chunk


def _decode_attention(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, positions: torch.Tensor,
                      scale: float, chunk: int | None = None, merge: bool | None = None) -> torch.Tensor:
    """q [B, Hq, D]; cache_k, cache_v [slots, Hkv, T, D] (row b reads slot b); positions [B] -> [B, Hq, D].
    merge: in the partial launch (default MERGE_IN_PARTIAL) or a launch of its own."""
    B, Hq, D = q.shape
    Hkv, T = cache_k.shape[1], cache_k.shape[2]
    chunk = chunk or chunk_for(B, Hkv, T, sm_count(q.device))
    G, splits = Hq // Hkv, triton.cdiv(T, chunk)
    block_g = max(16, triton.next_power_of_2(G))
    acc = torch.empty(B, Hkv, splits, block_g, D, device=q.device, dtype=torch.float32)  # partial outputs
    ml = torch.empty(B, Hkv, splits, block_g, 2, device=q.device, dtype=torch.float32)  # running max, sum
    out = torch.empty_like(q)  # [B, Hq, D]
    merge = MERGE_IN_PARTIAL if merge is None else merge
    counts = split_k_workspace(q.device, B * Hkv)[0]  # [>= B * Hkv] int32, 0 between launches
    common = dict(HKV=Hkv, G=G, D=D, SPLITS=splits, BLOCK_G=block_g)
    _partial_kernel[(B, Hkv, splits)](q, cache_k, cache_v, positions, acc, ml, out, counts, scale, q.stride(0),
                                      q.stride(1), cache_k.stride(0), cache_k.stride(1), cache_k.stride(2),
                                      out.stride(0), out.stride(1), **common, CHUNK=chunk, BLOCK_T=BLOCK_T,
                                      IS_FP32=q.dtype == torch.float32 or INTERPRET, MERGE=merge,
                                      num_warps=NUM_WARPS, **pdl_options(q.device))
    if not merge:
        _merge_kernel[(B, Hkv)](acc, ml, out, out.stride(0), out.stride(1), **common, **pdl_options(q.device))
    return out


@torch.library.custom_op("ahazero::decode_attention", mutates_args=())
def decode_attention_op(q: torch.Tensor, cache_k: torch.Tensor, cache_v: torch.Tensor, positions: torch.Tensor,
                        scale: float) -> torch.Tensor:
    return _decode_attention(q.contiguous(), cache_k, cache_v, positions, scale)


@decode_attention_op.register_fake
def _(q, cache_k, cache_v, positions, scale):
    return torch.empty_like(q, memory_format=torch.contiguous_format)
