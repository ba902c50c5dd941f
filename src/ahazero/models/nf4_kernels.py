"""Fused NF4 dequantise-and-multiply for small batches (the engine's decode step): y = x W^T (+ b).

Decode reads every weight once per step for a handful of rows, so its speed is the bytes read. The
plain path (`Linear4bit`: dequantise the whole weight into a 16-bit temporary, then a GEMM) reads the
4-bit weight, writes and reads a 16-bit copy: more traffic than a bf16 GEMV. This kernel instead reads
the packed bytes (0.5 byte per weight) plus the 8-bit absmax codes, dequantises each tile in registers
exactly as `nf4.dequantize_nf4` does (absmax = dyn[q] * absmax2 + offset, w = nf4[code] * absmax, in
float32, rounded to the input's dtype), and multiplies it with x in float32.

The weight is [O, K] flattened row-major into blocks of 64 (a block may span two rows when K is not a
multiple of 64), two codes per byte with the even element in the high nibble. A program owns BLOCK_O
output columns and a K_PER_SPLIT slice of K for all (at most 16 per tile) rows; the split-K partial
sums [S, N, O] are added by the launcher, so a small batch still fills the GPU.
Without a GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1), as the tests do; there the
dot runs in float32 (the interpreter's bf16 dot is wrong).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

MAX_ROWS = 32  # above this the dequantise-then-GEMM path wins (its cost is amortised over the rows)
BLOCK_N = 16  # rows per tile (tl.dot's minimum)
BLOCK_O = 64
BLOCK_K = 64
K_PER_SPLIT = 512  # K per program: a multiple of BLOCK_K
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _nf4_gemv_kernel(x_ptr, packed_ptr, absmax_q_ptr, absmax2_ptr, offset_ptr, code_ptr, dyn_ptr, out_ptr,
                     N, O, K, stride_x, K_PER_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr,
                     BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr):
    """Program (row block, column block, split): out[s, rows, cols] = x[rows, ks] @ W[cols, ks]^T."""
    pid_n, pid_o, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    cols = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)  # [BO]
    offset = tl.load(offset_ptr)
    acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        ks = s * K_PER_SPLIT + k0 + tl.arange(0, BLOCK_K)  # [BK]
        x_mask = (rows[:, None] < N) & (ks[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_x + ks[None, :], mask=x_mask, other=0.0)  # [BN, BK]
        w_mask = (ks[:, None] < K) & (cols[None, :] < O)
        flat = cols[None, :].to(tl.int64) * K + ks[:, None]  # [BK, BO] element index in W.view(-1)
        byte = tl.load(packed_ptr + flat // 2, mask=w_mask, other=0).to(tl.int32)
        nibble = tl.where(flat % 2 == 0, byte >> 4, byte & 15)  # [BK, BO]
        block = flat // 64
        absmax_q = tl.load(absmax_q_ptr + block, mask=w_mask, other=0).to(tl.int32)
        absmax = tl.load(dyn_ptr + absmax_q) * tl.load(absmax2_ptr + block // 256, mask=w_mask, other=0.0) + offset
        w = tl.load(code_ptr + nibble) * absmax  # [BK, BO] float32, = dequantize_nf4 before its cast
        w = w.to(x_ptr.dtype.element_ty)  # the weight as the plain path holds it
        if DOT_F32:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, w)
    out = out_ptr + (s * N + rows[:, None]) * O + cols[None, :]
    tl.store(out, acc, mask=(rows[:, None] < N) & (cols[None, :] < O))


def nf4_linear_small(x: torch.Tensor, packed: torch.Tensor, absmax_q: torch.Tensor, absmax2: torch.Tensor,
                     offset: torch.Tensor, code: torch.Tensor, dyn: torch.Tensor, out_features: int,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, K] (N <= MAX_ROWS) with the NF4 weight [out_features, K] in the bitsandbytes layout -> [N, O].

    packed uint8 [ceil(O*K/2)], absmax_q uint8 [nb], absmax2 float32 [nb2], offset float32 [],
    code float32 [16], dyn float32 [256], all on x's device; bias [O] or None.
    """
    N, K = x.shape
    x = x.contiguous()
    splits = triton.cdiv(K, K_PER_SPLIT)
    partial = torch.empty(splits, N, out_features, device=x.device, dtype=torch.float32)  # [S, N, O]
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(out_features, BLOCK_O), splits)
    _nf4_gemv_kernel[grid](x, packed, absmax_q, absmax2, offset, code, dyn, partial, N, out_features, K,
                           x.stride(0), K_PER_SPLIT, BLOCK_N=BLOCK_N, BLOCK_O=BLOCK_O, BLOCK_K=BLOCK_K,
                           DOT_F32=INTERPRET or x.dtype == torch.float32)
    y = partial.sum(0)  # [N, O] float32
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)
