"""Fused NF4 dequantise-and-multiply for small batches (the engine's decode step): y = x W^T (+ b).

Decode reads every weight once per step for a handful of rows, so its speed is the bytes read. The
plain path (`Linear4bit`: dequantise the whole weight into a 16-bit temporary, then a GEMM) reads the
4-bit weight, writes and reads a 16-bit copy: more traffic than a bf16 GEMV. This kernel instead reads
the packed bytes (0.5 byte per weight) plus the 8-bit absmax codes, dequantises each tile in registers
exactly as `nf4.dequantize_nf4` does (absmax = dyn[q] * absmax2[block // 256] + offset,
w = nf4[code] * absmax, in float32, rounded to the input's dtype), and multiplies it with x, accumulating
in float32.

Layout: the weight is [O, K] flattened row-major into blocks of 64, two codes per byte with the even
element in the high nibble. The kernel takes K % 64 == 0 (every real model's widths), so a quantisation
block never spans two rows: block b of weight row o is the 32 contiguous bytes at (o * K/64 + b) * 32,
with one absmax code. One step of a program reads block b of BLOCK_O rows as a [32, BLOCK_O] byte tile
(a 16-byte vector load per thread), looks each byte up in a [256, 2] table of its two NF4 values
(nf4[b >> 4], nf4[b & 15]; one 8-byte L1-resident gather per byte, the table built once per `code`
tensor), scales by the rows' absmax and rounds to x's dtype. The high nibbles are the block's even
columns and the low nibbles its odd ones, so instead of interleaving them the step does two dots of
K = 32: W_even x_even^T + W_odd x_odd^T, with x's even/odd columns read as one 32-bit load per pair.
The dot is "swapped", out^T [BLOCK_O, BLOCK_N] = W [BLOCK_O, 32] @ x^T [32, BLOCK_N], so the weight tile
is the MMA's A operand, which Hopper's wgmma reads from registers (Triton moves the gathered values into
that layout through shared memory; the tile is transposed, never reshaped or joined) and x (N <= 32
rows, padded to BLOCK_N) is the small B operand. The tensor cores do the multiply-adds, the CUDA cores
only the dequantisation: about 8 SASS instructions per weight in the loop (sm_90, BLOCK_O 64, 4 warps,
80 registers, 8 KB shared memory, no spills). Each step issues the next step's loads (bytes, absmax
codes, x) before its own work, into registers: no shared-memory pipelining; occupancy hides the rest.

Grid: (column tiles of BLOCK_O output features, splits of K). K is split until there are about
PROGRAMS_PER_SM programs per SM, keeping at least MIN_BLOCKS_PER_SPLIT blocks each. A split writes
its float32 partial [BLOCK_O, N] to a workspace and bumps its tile's counter; the last split of a
tile to arrive (the counter reaches S - 1) adds the partials in split order (deterministic), adds the
bias, casts to x's dtype, stores y and resets the counter to 0. So one launch does everything
(no zero-fill, sum or cast kernels; the counters live in a per-device buffer kept between calls,
always 0 between launches on a stream; concurrent launches on two streams would race on them).

Without a GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1), as the tests do; there the
dot runs in float32 (the interpreter's bf16 dot is wrong), as it does for float32 inputs.

To tune on an H100 (the constants below): BLOCK_O / NUM_WARPS (64 / 4; 128 / 8 has 12% fewer
instructions per weight but 104 registers, 2 programs per SM), PROGRAMS_PER_SM (4; the splits of K),
MIN_BLOCKS_PER_SPLIT (4; fewer splits cut the partials' traffic, which grows with N), BLOCK_N (N
rounded up to a power of 2, at least 16; 8 would take mma.sync instead of wgmma), FMA_MAX_ROWS (the rows
up to which the products run on the CUDA cores, a [32, BO, BN] multiply summed over the block's bytes,
instead of the dot) and MAX_ROWS (the crossover with dequantise + GEMM, likely above 32 now).
`python bench/kernels.py --only nf4` times configurations per decoder layer; on an H100 (2026-11-27) the
defaults below were the fastest of those tried, at 1.7-2.0x the time of the bf16 matmuls (bench/RESULTS.md).
"""
from __future__ import annotations

import functools
import os
import weakref

import torch
import triton
import triton.language as tl

from .nf4 import byte_table

MAX_ROWS = 32  # above this the dequantise-then-GEMM path wins (its cost is amortised over the rows)
QBLOCK = 64  # the NF4 blocksize the kernel is written for
BLOCK_O = 64  # output features per program: the wgmma M (64 per warpgroup)
NUM_WARPS = 4
PROGRAMS_PER_SM = 4  # split K until about this many programs per SM
MIN_BLOCKS_PER_SPLIT = 4  # at least this many 64-blocks (32 bytes of each row) per program
FMA_MAX_ROWS = 1  # up to this many rows, multiply on the CUDA cores instead of the tensor cores. H100,
# bench/kernels.py, one Qwen2.5-1.5B layer: 94.5 against 104.7 us at N = 1; at N = 6 152 against 108 us and at
# N = 32 the [32, BO, BN] products spill (14 ms), so the tensor cores take every batch above 1
COUNTERS = 1 << 14  # per-device tile counters for the split-K reduction (grown on demand)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def supports(in_features: int, blocksize: int, nested_blocksize: int) -> bool:
    """Whether the kernel can run a weight of this width and blocksizes (blocks must not span rows)."""
    return blocksize == QBLOCK and nested_blocksize == 256 and in_features % QBLOCK == 0


@triton.jit
def split_k_sum(acc, partial_at, split_stride, mask, s, S, counter):
    """The end of split s of S of a split-K tile: stores its float32 partial `acc` at partial_at + s *
    split_stride (where `mask`) and bumps the tile's counter. Returns (done, acc): the tile's last split to
    arrive gets done and the S partials added in split order (deterministic; its own from registers), and
    resets the counter to 0 for the next launch; the others get (False, their own acc). Shared by the
    split-K kernels (this NF4 GEMV, engine/gemv_kernels.py)."""
    tl.store(partial_at + s * split_stride, acc, mask=mask)
    tl.debug_barrier()  # every thread's partial is written before the counter moves (release)
    arrived = tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu")
    done = arrived == S - 1
    if done:
        total = tl.zeros_like(acc)
        t = 0
        while t < S:  # (its own partial is masked off: a vector & a scalar bool is int32 in Triton 3.9's interpreter)
            p = tl.load(partial_at + t * split_stride, mask=tl.where(t != s, mask, False), other=0.0,
                        cache_modifier=".cg")
            total += tl.where(t == s, acc, p)
            t += 1
        acc = total
        tl.store(counter, 0)
    return done, acc


@triton.jit
def _load_step(byte_at, absmax_q_ptr, absmax2_ptr, block_of_row, col_ok, blk, valid):
    """Block blk of each row: bytes [32, BO] (uint8), absmax code [BO] (int32) and absmax2 [BO]."""
    ok = tl.where(valid, col_ok, False)  # (a vector & a scalar bool is int32 in Triton 3.9's interpreter)
    byte = tl.load(byte_at + blk * 32, mask=ok[None, :], other=0)  # uint8
    q = tl.load(absmax_q_ptr + block_of_row + blk, mask=ok, other=0).to(tl.int32)
    a2 = tl.load(absmax2_ptr + (block_of_row + blk) // 256, mask=ok, other=0.0)
    return byte, q, a2


@triton.jit
def _load_x(x_ptr, x_at, n_ok, j, blk, X_PAIRS: tl.constexpr):
    """Load x's columns of block blk, transposed: X_PAIRS (16-bit x): the [32, BN] int32 (even, odd)
    pairs, twice; else the even and odd columns, [32, BN] each. `_split_x` makes them operands."""
    if X_PAIRS:
        pair = tl.load(x_ptr.to(tl.pointer_type(tl.int32)) + x_at[None, :] + blk * 32 + j[:, None],
                       mask=n_ok[None, :], other=0)
        return pair, pair
    else:
        at = x_ptr + x_at[None, :] + blk * 64 + 2 * j[:, None]
        return tl.load(at, mask=n_ok[None, :], other=0.0), tl.load(at + 1, mask=n_ok[None, :], other=0.0)


@triton.jit
def _split_x(a, b, dtype: tl.constexpr, X_PAIRS: tl.constexpr):
    """(even, odd) [32, BN] in x's dtype from `_load_x`'s tiles; a pair's even column is its low half."""
    if X_PAIRS:
        return a.to(tl.int16).to(dtype, bitcast=True), (a >> 16).to(tl.int16).to(dtype, bitcast=True)
    else:
        return a, b


@triton.jit
def _nf4_gemv_kernel(x_ptr, packed_ptr, absmax_q_ptr, absmax2_ptr, offset_ptr, pairs_ptr, dyn_ptr, bias_ptr,
                     partial_ptr, count_ptr, out_ptr, N, O, row_blocks, x_row_stride, blocks_per_split,
                     HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr,
                     X_PAIRS: tl.constexpr, DOT_F32: tl.constexpr, FMA: tl.constexpr):
    """Program (column tile, split s): acc [BO, BN] = W[cols, blocks of s] @ x[:, blocks of s]^T, then the
    split-K reduction and the store of out [N, O]. pairs_ptr: float32 [256, 2], (nf4[b >> 4], nf4[b & 15])
    of byte b. x_row_stride is in 32-bit pairs when X_PAIRS, else in elements."""
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    tile = tl.program_id(0)
    s = tl.program_id(1)
    cols = tile * BLOCK_O + tl.arange(0, BLOCK_O)  # [BO] weight rows = output features
    col_ok = cols < O
    j = tl.arange(0, 32)  # [32] byte within a block
    n = tl.arange(0, BLOCK_N)  # [BN] rows of x
    n_ok = n < N
    first = s * blocks_per_split
    last = first + blocks_per_split
    if last > row_blocks:  # the last split may be short
        last = row_blocks
    offset = tl.load(offset_ptr)
    block_of_row = cols * row_blocks  # [BO] each row's first block (int32: the launcher checks the size)
    byte_at = packed_ptr + block_of_row[None, :] * 32 + j[:, None]  # [32, BO] byte j of block 0, contiguous in j
    x_at = n * x_row_stride  # [BN]
    table = pairs_ptr.to(tl.pointer_type(tl.int64))  # one 64-bit load per byte: both of its values
    acc = tl.zeros((BLOCK_O, BLOCK_N), dtype=tl.float32)
    byte, q, a2 = _load_step(byte_at, absmax_q_ptr, absmax2_ptr, block_of_row, col_ok, first, first < last)
    xa, xb = _load_x(x_ptr, x_at, n_ok, j, first, X_PAIRS)
    blk = first
    while blk < last:  # (a while loop: the interpreter can't take range() bounds derived from program_id)
        cur_byte, cur_q, cur_a2, cur_xa, cur_xb = byte, q, a2, xa, xb
        # the next step's loads, in flight during this one (the last step's are masked off)
        byte, q, a2 = _load_step(byte_at, absmax_q_ptr, absmax2_ptr, block_of_row, col_ok, blk + 1, blk + 1 < last)
        xa, xb = _load_x(x_ptr, x_at, tl.where(blk + 1 < last, n_ok, False), j, blk + 1, X_PAIRS)
        absmax = (tl.load(dyn_ptr + cur_q) * cur_a2 + offset)[None, :]  # [1, BO] float32
        both = tl.load(table + cur_byte)  # [32, BO] int64: nf4[byte >> 4] in the low half, nf4[byte & 15] high
        hi = (both.to(tl.int32).to(tl.float32, bitcast=True) * absmax).to(dtype)  # the block's even columns
        lo = ((both >> 32).to(tl.int32).to(tl.float32, bitcast=True) * absmax).to(dtype)  # its odd columns
        even, odd = _split_x(cur_xa, cur_xb, dtype, X_PAIRS)  # [32, BN] each
        if FMA:  # CUDA cores: [32, BO, BN] products summed over the block's bytes, mostly within a thread
            acc += tl.sum(hi.to(tl.float32)[:, :, None] * even.to(tl.float32)[:, None, :]
                          + lo.to(tl.float32)[:, :, None] * odd.to(tl.float32)[:, None, :], axis=0)
        elif DOT_F32:
            acc = tl.dot(tl.trans(hi).to(tl.float32), even.to(tl.float32), acc, input_precision="ieee")
            acc = tl.dot(tl.trans(lo).to(tl.float32), odd.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(hi), even, acc)
            acc = tl.dot(tl.trans(lo), odd, acc)
        blk += 1

    ok = col_ok[:, None] & n_ok[None, :]
    at = n[None, :] * O + cols[:, None]  # [BO, BN] into [N, O]
    S = tl.num_programs(1)
    done = S == 1
    if S > 1:  # partials [S, N, O]
        done, acc = split_k_sum(acc, partial_ptr + at, N * O, ok, s, S, count_ptr + tile)
    if done:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
        tl.store(out_ptr + at, acc.to(out_ptr.dtype.element_ty), mask=ok)


@functools.cache
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


@functools.cache
def split_k(tiles: int, K: int, sms: int, programs_per_sm: int, min_per_split: int, step: int = 1) -> tuple[int, int]:
    """(splits, K per split, a multiple of `step`): K cut so that the tiles x splits programs are about
    programs_per_sm per SM, each split at least min_per_split long (one split at least). Shared by the
    split-K kernels: this NF4 GEMV (K in blocks), engine/gemv_kernels.py and engine/sample_kernels.py."""
    want = max(1, min(triton.cdiv(programs_per_sm * sms, tiles), K // min_per_split))
    per_split = triton.cdiv(triton.cdiv(K, want), step) * step
    return triton.cdiv(K, per_split), per_split


def _splits(tiles: int, row_blocks: int, sms: int) -> tuple[int, int]:
    """(splits, blocks per split): about PROGRAMS_PER_SM programs per SM, >= MIN_BLOCKS_PER_SPLIT blocks each."""
    return split_k(tiles, row_blocks, sms, PROGRAMS_PER_SM, MIN_BLOCKS_PER_SPLIT)


_pair_tables: dict[int, tuple[weakref.ref, int, torch.Tensor]] = {}


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """float32 [256, 2]: (code[b >> 4], code[b & 15]) of byte b, cached per code tensor: rebuilt when the
    tensor is modified in place (an inference tensor has no version counter: taken as never modified),
    dropped with it."""
    key, version = id(code), -1 if code.is_inference() else code._version
    hit = _pair_tables.get(key)
    if hit is not None and hit[0]() is code and hit[1] == version:
        return hit[2]
    table = byte_table(code).float().contiguous()  # [256, 2]
    _pair_tables[key] = (weakref.ref(code, lambda _: _pair_tables.pop(key, None)), version, table)
    return table


_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_outgrown: list[torch.Tensor] = []  # counters replaced by larger ones: captured CUDA graphs may still use them


def split_k_workspace(device: torch.device, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tile counters int32 [>= tiles], all 0 between launches: each launch's last split resets its tile's;
    a float32 [1] stand-in for the partials of an unsplit launch). Shared by the split-K kernels that run
    one after another on a stream: this NF4 GEMV, engine/gemv_kernels.py and engine/lora_kernels.py's shrink."""
    ws = _workspaces.get(device)
    if ws is None or ws[0].numel() < tiles:
        if ws is not None:
            _outgrown.append(ws[0])
        ws = _workspaces[device] = (torch.zeros(max(tiles, COUNTERS), dtype=torch.int32, device=device),
                                    torch.empty(1, dtype=torch.float32, device=device))
    return ws


def nf4_linear_small(x: torch.Tensor, packed: torch.Tensor, absmax_q: torch.Tensor, absmax2: torch.Tensor,
                     offset: torch.Tensor, code: torch.Tensor, dyn: torch.Tensor, out_features: int,
                     bias: torch.Tensor | None = None) -> torch.Tensor:
    """x [N, K] (K % 64 == 0; any N, but above MAX_ROWS the module dequantises instead) with the NF4
    weight [out_features, K] in the bitsandbytes layout (blocksize 64, nested blocksize 256) -> [N, O]
    in x's dtype.

    packed uint8 [ceil(O*K/2)], absmax_q uint8 [nb], absmax2 float32 [nb2], offset float32 [],
    code float32 [16], dyn float32 [256], all on x's device; bias [O] or None.
    """
    N, K = x.shape
    if K % QBLOCK:
        raise ValueError(f"the fused NF4 kernel takes K % {QBLOCK} == 0, got K = {K}")
    if packed.numel() >= 2 ** 31:
        raise ValueError("the fused NF4 kernel indexes the weight with int32")
    if N == 0:
        return x.new_empty(0, out_features)
    pairs = x.element_size() == 2  # x's (even, odd) columns read as one 32-bit word
    if x.stride(-1) != 1 or (pairs and (x.stride(0) % 2 or x.data_ptr() % 4)):
        x = x.clone(memory_format=torch.contiguous_format)
    row_blocks = K // QBLOCK
    fma = N <= FMA_MAX_ROWS
    tiles = triton.cdiv(out_features, BLOCK_O)
    splits, per_split = _splits(tiles, row_blocks, sm_count(x.device))
    counts, partial = split_k_workspace(x.device, tiles)
    if splits > 1:
        partial = torch.empty(splits, N, out_features, device=x.device, dtype=torch.float32)  # [S, N, O]
    out = torch.empty(N, out_features, device=x.device, dtype=x.dtype)
    _nf4_gemv_kernel[(tiles, splits)](
        x, packed, absmax_q, absmax2, offset, _pair_table(code), dyn, out if bias is None else bias, partial,
        counts, out,
        N, out_features, row_blocks, x.stride(0) // 2 if pairs else x.stride(0), per_split,
        HAS_BIAS=bias is not None, BLOCK_N=max(2 if fma else 16, triton.next_power_of_2(N)), BLOCK_O=BLOCK_O,
        X_PAIRS=pairs, DOT_F32=INTERPRET or x.dtype == torch.float32, FMA=fma, num_warps=NUM_WARPS, num_stages=1,
        enable_fp_fusion=False)  # absmax = dyn[q] * absmax2 + offset rounded twice, as torch does
    return out
