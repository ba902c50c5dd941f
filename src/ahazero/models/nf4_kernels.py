"""Fused NF4 dequantise-and-multiply for small batches (the engine's decode step): y = x W^T (+ b).

Decode reads every weight once per step for a handful of rows, so its speed is the bytes read. The
plain path (`Linear4bit`: dequantise the whole weight into a 16-bit temporary, then a GEMM) reads the
4-bit weight, writes and reads a 16-bit copy: more traffic than a bf16 GEMV. This kernel instead reads
the packed bytes (0.5 byte per weight) plus the 8-bit absmax codes, dequantises each tile in registers
exactly as `nf4.dequantize_nf4` does (absmax = dyn[q] * absmax2 + offset, w = nf4[code] * absmax, in
float32, rounded to the input's dtype), and multiplies it with x in float32.

The weight is [O, K] flattened row-major into blocks of 64, two codes per byte with the even element in
the high nibble. The kernel takes K % 64 == 0 (every real model's widths), so a quantisation block never
spans two rows: a tile of BLOCK_O weight rows x BLOCK_K columns is BLOCK_O x BLOCK_K/2 contiguous bytes
(one load), whose high nibbles pair with x's even columns and low nibbles with its odd ones, and whose
absmax is BLOCK_O x BLOCK_K/64 codes (one small load, broadcast over each block's 32 bytes). A program
owns BLOCK_O output columns and a K_PER_SPLIT slice of K for up to BLOCK_N rows; the split-K partial
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
BLOCK_K = 256  # 4 quantisation blocks: 128 contiguous bytes per weight row per step
K_PER_SPLIT = 512  # K per program: a multiple of BLOCK_K
QBLOCK = 64  # the NF4 blocksize the kernel is written for
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def supports(in_features: int, blocksize: int, nested_blocksize: int) -> bool:
    """Whether the kernel can run a weight of this width and blocksizes (blocks must not span rows)."""
    return blocksize == QBLOCK and nested_blocksize == 256 and in_features % QBLOCK == 0


@triton.jit
def _nf4_gemv_kernel(x_ptr, packed_ptr, absmax_q_ptr, absmax2_ptr, offset_ptr, code_ptr, dyn_ptr, out_ptr,
                     N, O, K, row_bytes, row_blocks, stride_x, K_PER_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, DOT_F32: tl.constexpr):
    """Program (row block, column block, split): out[s, rows, cols] = x[rows, ks] @ W[cols, ks]^T.
    row_bytes = K // 2 and row_blocks = K // 64 are passed in, so Triton sees their alignment."""
    HALF: tl.constexpr = BLOCK_K // 2  # bytes per weight row per step
    NB: tl.constexpr = BLOCK_K // 64  # quantisation blocks per weight row per step
    pid_n, pid_o, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] rows of x
    cols = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)  # [BO] rows of W (output features)
    col_ok = cols < O
    pair = tl.arange(0, HALF)  # [HALF] byte within the tile's row
    blocks = tl.arange(0, NB)  # [NB]
    ks = tl.arange(0, BLOCK_K)  # [BK]
    offset = tl.load(offset_ptr)
    acc = tl.zeros((BLOCK_N, BLOCK_O), dtype=tl.float32)
    for k0 in range(0, K_PER_SPLIT, BLOCK_K):
        first = s * K_PER_SPLIT + k0  # first column of the tile (a multiple of 64)
        byte_at = packed_ptr + cols.to(tl.int64)[:, None] * row_bytes + first // 2 + pair[None, :]  # contiguous
        byte = tl.load(byte_at, mask=col_ok[:, None] & (first + 2 * pair < K)[None, :], other=0).to(tl.int32)
        b_mask = col_ok[:, None] & (first + blocks * 64 < K)[None, :]  # [BO, NB]
        block = cols.to(tl.int64)[:, None] * row_blocks + first // 64 + blocks[None, :]  # [BO, NB]
        absmax_q = tl.load(absmax_q_ptr + block, mask=b_mask, other=0).to(tl.int32)
        absmax = tl.load(dyn_ptr + absmax_q) * tl.load(absmax2_ptr + block // 256, mask=b_mask, other=0.0) + offset
        absmax = tl.reshape(tl.broadcast_to(absmax[:, :, None], (BLOCK_O, NB, 32)), (BLOCK_O, HALF))  # per byte
        hi = tl.load(code_ptr + (byte >> 4)) * absmax  # [BO, HALF] even columns, float32
        lo = tl.load(code_ptr + (byte & 15)) * absmax  # odd columns
        w = tl.reshape(tl.join(hi, lo), (BLOCK_O, BLOCK_K)).to(x_ptr.dtype.element_ty)  # [BO, BK] as the plain path
        x_mask = (rows[:, None] < N) & (first + ks < K)[None, :]
        x = tl.load(x_ptr + rows[:, None] * stride_x + first + ks[None, :], mask=x_mask, other=0.0)  # [BN, BK]
        if DOT_F32:
            acc += tl.dot(x.to(tl.float32), tl.trans(w).to(tl.float32), input_precision="ieee")
        else:
            acc += tl.dot(x, tl.trans(w))
    out = out_ptr + (s * N + rows[:, None]) * O + cols[None, :]
    tl.store(out, acc, mask=(rows[:, None] < N) & (cols[None, :] < O))


def nf4_linear_small(x: torch.Tensor, packed: torch.Tensor, absmax_q: torch.Tensor, absmax2: torch.Tensor,
                     offset: torch.Tensor, code: torch.Tensor, dyn: torch.Tensor, out_features: int,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, K] (N <= MAX_ROWS, K % 64 == 0) with the NF4 weight [out_features, K] in the bitsandbytes
    layout (blocksize 64, nested blocksize 256) -> [N, O].

    packed uint8 [ceil(O*K/2)], absmax_q uint8 [nb], absmax2 float32 [nb2], offset float32 [],
    code float32 [16], dyn float32 [256], all on x's device; bias [O] or None.
    """
    N, K = x.shape
    if K % QBLOCK:
        raise ValueError(f"the fused NF4 kernel takes K % {QBLOCK} == 0, got K = {K}")
    x = x.contiguous()
    splits = triton.cdiv(K, K_PER_SPLIT)
    partial = torch.empty(splits, N, out_features, device=x.device, dtype=torch.float32)  # [S, N, O]
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(out_features, BLOCK_O), splits)
    dot_f32 = INTERPRET or x.dtype == torch.float32
    _nf4_gemv_kernel[grid](x, packed, absmax_q, absmax2, offset, code, dyn, partial, N, out_features, K,
                           K // 2, K // QBLOCK, x.stride(0), K_PER_SPLIT, BLOCK_N=BLOCK_N, BLOCK_O=BLOCK_O,
                           BLOCK_K=BLOCK_K, DOT_F32=dot_f32,
                           num_stages=1 if dot_f32 else 2)  # float32 tiles of 3 stages overflow shared memory
    y = partial.sum(0)  # [N, O] float32
    if bias is not None:
        y += bias.float()
    return y.to(x.dtype)
