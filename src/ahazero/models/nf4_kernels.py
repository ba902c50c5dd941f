"""Fused NF4 dequantise-and-multiply for small batches (the engine's decode step): y = x W^T (+ b), for up
to three weights of one input in one launch (q/k/v; gate/up), with the LoRA term in the epilogue.

Decode reads every weight once per step for a handful of rows, so its speed is the bytes read. The
plain path (`Linear4bit`: dequantise the whole weight into a 16-bit temporary, then a GEMM) reads the
4-bit weight, writes and reads a 16-bit copy: more traffic than a bf16 GEMV. This kernel instead reads
the packed bytes (0.5 byte per weight) plus the 8-bit absmax codes, dequantises each tile in registers and
multiplies it with x, accumulating in float32.

Layout: the weight is [O, K] flattened row-major into blocks of 64, two codes per byte with the even
element in the high nibble. The kernel takes K % 64 == 0 (every real model's widths), so a quantisation
block never spans two rows: block b of weight row o is the 32 contiguous bytes at (o * K/64 + b) * 32,
with one absmax code.

The default lookup (LOOKUP "permute", on a GPU for 16-bit x): one step of a program reads block b of
BLOCK_O rows as [8, BO] 32-bit words (a 16-byte vector load per thread) and turns each word's 8 codes
into their NF4 values in x's dtype with 21 register instructions and no memory access
(`permute_lookup_ptx`: `prmt` byte permutes from the table's bytes held as immediates). The values are not
scaled: the block's two dots (W_even x_even^T + W_odd x_odd^T, K = 32 each, x's even/odd columns read as
one 32-bit load per pair) give its product, and the block's rows' absmax scales it into the accumulator
(acc += absmax * part, one FMA per output per block instead of a multiply per weight). So each weight is
rounded as bf16(nf4[code]) rather than bf16(nf4[code] * absmax), a difference of the same size as the
rounding itself (the engine's log-probs against the transformers forward: mean |diff| 2.4e-2 on 16-bit
weights, 2.3e-2 with the old lookup, 2.9e-2 with this one, bench/RESULTS.md sixteenth session); bitsandbytes'
own 4-bit inference kernel rounds both factors to 16 bits. sm_90, Triton 3.6 (scripts/nf4_sass.py): 263 SASS
instructions a block in the loop at 32 rows (356 with "nibbles"), 234 at 16 (338); 166 registers at 32 rows, 111 at
16, set by the LoRA epilogue's TF32 dots more than by the loop. The other lookups scale each
value, exactly as `nf4.dequantize_nf4` does (absmax = dyn[q] * absmax2[block // 256] + offset, w =
nf4[code] * absmax, in float32, rounded to x's dtype), from the block's bytes read as a [32, BO] tile
(a 16-byte vector load per thread): "nibbles" two 4-byte loads from the [16] code within one 64-byte
line, "pairs" one 8-byte load from a [256, 2] table of each byte's two values (2 KB: more L1 wavefronts
per gather). "permute" takes the table's loads in Triton's interpreter (the CPU tests; the PTX itself is
checked there by an interpreter of its instructions), for float32 x, and wherever a weight's code is not
the NF4 table; "nibbles" serves the CUDA-core products (N <= FMA_MAX_ROWS, none by default).

The dot is "swapped", out^T [BLOCK_O, BLOCK_N] = W [BLOCK_O, K] @ x^T [K, BLOCK_N], so the weight tile
is the MMA's A operand, which Hopper's wgmma reads from registers (Triton moves the values into that layout
through shared memory) and x (N <= MAX_ROWS rows, padded to BLOCK_N) is the small B operand. The tensor
cores do the multiply-adds, the CUDA cores only the dequantisation. Each step issues the loads of the
block PREFETCH steps ahead (bytes, absmax codes, x) before its own work, into registers: no shared-memory
pipelining (a `for` loop that Triton software-pipelines was 3x slower, bench/RESULTS.md seventh session);
occupancy hides the rest.

Grid (1-D): the producers of the LoRA shrink when it runs in the launch (`publish_shrink`, as
engine/gemv_kernels.py's docstring describes), then (column tiles of BLOCK_O output features) x (splits of
K), tile index fastest. The tiles run over the group's weights one after another (the first
cdiv(O_0, BLOCK_O) are weight 0's, and so on). K is split until there are about PROGRAMS_PER_SM programs
per SM, keeping at least MIN_BLOCKS_PER_SPLIT blocks each. A split writes its float32 partial
[BLOCK_O, BLOCK_N] to a workspace and bumps its tile's counter; the last split of a tile to arrive (the
counter reaches S - 1) adds the partials in split order (deterministic), adds the bias, casts to x's dtype,
adds the LoRA term s * (x A^T) B^T in float32 (x A^T from the producers' partials, or from
engine/lora_kernels.py's shrink launch), stores y and resets the counter to 0 (`end_tile`). So one launch
does everything (no shrink, zero-fill, sum, cast or expand kernels; the counters live in a per-device buffer
kept between calls, always 0 between launches on a stream; concurrent launches on two streams would race on
them). engine/gemv_kernels.py runs the same epilogue over 16-bit weights.

Without a GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1), as the tests do; there the
dot runs in float32 (the interpreter's bf16 dot is wrong), as it does for float32 inputs.

To tune (the constants below): BLOCK_O / NUM_WARPS (64 / 4; 128 / 8 was slower), PROGRAMS_PER_SM and
MIN_BLOCKS_PER_SPLIT (the splits of K: fewer cut the partials' traffic, which grows with N), BLOCK_N (N
rounded up to a power of 2, at least 16; 8 would take mma.sync instead of wgmma), FMA_MAX_ROWS (the rows
up to which the products run on the CUDA cores, a [32, BO, BN] multiply summed over the block's bytes,
instead of the dot) and MAX_ROWS (the crossover with dequantise + GEMM). `python bench/kernels.py --only
nf4` times configurations per decoder layer (4 group launches with LoRA); on an H200 (2026-11-29, sixteenth
session) the defaults took 60.9 / 60.8 / 77.9 / 92.4 us at N = 1 / 6 / 32 / 64, against 52.6 / 54.9 / 60.1 /
78.0 for the same launches over bf16 weights, which read 3.9x the bytes (bench/RESULTS.md). The kernel is
bound by its own latency and instructions, not by memory: ncu on the gate/up launch at 32 rows (280 tiles,
unsplit, about 2 programs an SM) found 41% of the issue slots used, 2.2 warps per scheduler, and the stalls
per issued instruction led by global loads (1.26 cycles), shared-memory barriers (0.97: the values' staging
for the MMA) and fixed-latency waits (0.70).

Also here: `dequantize`, the whole weight in one launch (the training step's forward and backward), and
the pieces the engine's other kernels share with this one: the split rule and the split-K reduction
(`split_k`, `split_k_sum`, `split_k_workspace`), a group's tile epilogue (`end_tile`, `pick`) and
programmatic dependent launch (`pdl_options`, `wait_for_inputs`).
"""
from __future__ import annotations

import functools
import itertools
import os
import weakref
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from .nf4 import byte_table, nf4_code

MAX_ROWS = 64  # above this the dequantise-then-GEMM path serves. H200, sixteenth session: W1 at 64 rows, 4-bit, 17,179
# tokens/s with 64 against 11,461 with 32 (BLOCK_N 64: 235 registers, no spills)
QBLOCK = 64  # the NF4 blocksize the kernel is written for
BLOCK_O = 64  # output features per program: the wgmma M (64 per warpgroup)
NUM_WARPS = 4
PROGRAMS_PER_SM = 2  # split K until about this many programs per SM
MIN_BLOCKS_PER_SPLIT = 8  # at least this many 64-blocks (32 bytes of each row) per program. H200, sixteenth session
# (bench/kernels.py, one layer's 4 groups with LoRA, LOOKUP "permute"): 2 / 8 took 61.6 / 78.3 us at N = 6 / 32
# against 4 / 4's 67.3 / 90.9
FMA_PROGRAMS_PER_SM, FMA_MIN_BLOCKS_PER_SPLIT = 4, 4  # the same for the CUDA-core products (N <= FMA_MAX_ROWS):
# at N = 1, 4 / 4 took 83.6 us against 2 / 8's 103.6 there
PREFETCH = 2  # blocks whose loads are in flight while one is dequantised (1 to 3). H100, seventh session: W1 at
# batch 32, 4-bit, 7,786 / 7,998 / 7,314 tokens/s with 1 / 2 / 3; W2 0.865 / - / 0.799 s (as noisy as the table)
LOOKUP = "permute"  # NF4 values per byte: "permute" (byte permutes in registers, `permute_lookup_ptx`; each block's
# product scaled by its absmax after the MMA), "nibbles" (two 4-byte loads from the [16] code, one 64-byte line) or
# "pairs" (one 8-byte load from a [256, 2] table over 2 KB: more L1 wavefronts per gather); the last two scale each
# value. H100, seventh session (bench/kernels.py, one layer's 4 groups with LoRA): nibbles 90.4 / 99.1 / 108.3 us
# against pairs 100.5 / 115.8 / 121.0 at N = 1 / 6 / 32; W1 at batch 32, 4-bit: 7,671 against 7,186 tokens/s
FMA_MAX_ROWS = 0  # up to this many rows, multiply on the CUDA cores (with "nibbles" values) instead of the tensor
# cores. H200, sixteenth session (bench/kernels.py, one layer's 4 groups with LoRA): at N = 1 the permute lookup's
# dot took 60.9 us against the CUDA cores' 83.4 (W2 with one completion, 4-bit: 0.556 against 0.686 s), so the tensor
# cores take every batch. (H100, seventh session, with the [16] code's lookup: 94.5 against 104.7 us at N = 1 for the
# CUDA cores; 152 against 108 at N = 6; at N = 32 their [32, BO, BN] products spill.)
SHRINK_K = 256  # a LoRA shrink fused into a GEMV launch (`publish_shrink`): columns of K per producer program
SHRINK_BLOCK_K = 64  # and its K block
COUNTERS = 1 << 14  # per-device tile counters for the split-K reduction (grown on demand)
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# Programmatic dependent launch (Hopper and later): the decode step's kernels launch while the kernel before
# them runs, do what needs none of its output (the prologue; here the first blocks' weight loads) and wait
# for it (griddepcontrol.wait) before reading their inputs: the launch latency and the first loads overlap the
# previous kernel's tail instead of following it. AHAZERO_PDL=0 turns it off.
PDL = os.environ.get("AHAZERO_PDL", "1") != "0"


@functools.cache
def _pdl(device: torch.device) -> bool:
    return PDL and not INTERPRET and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] >= 9


def pdl_options(device: torch.device) -> dict:
    """A kernel launch's options for `wait_for_inputs`: USE_PDL, and launch_pdl where it is on."""
    return dict(USE_PDL=True, launch_pdl=True) if _pdl(device) else dict(USE_PDL=False)


@triton.jit
def wait_for_inputs(USE_PDL: tl.constexpr):
    """Under programmatic dependent launch: wait until the previous kernel on the stream has finished and
    its writes are visible, then let the next kernel launch. Nothing before this may read what an earlier
    kernel writes, or write anything (only immutable weights may be read before it)."""
    if USE_PDL:
        tl.extra.cuda.gdc_wait()
        tl.extra.cuda.gdc_launch_dependents()


def supports(in_features: int, blocksize: int, nested_blocksize: int) -> bool:
    """Whether the kernel can run a weight of this width and blocksizes (blocks must not span rows)."""
    return blocksize == QBLOCK and nested_blocksize == 256 and in_features % QBLOCK == 0


@triton.jit
def last_to_arrive(counter, S):
    """After a program has stored its part of a job of S parts: bump the job's counter and return whether this
    was the last of the S to arrive (then every part is visible to it; it resets the counter to 0 when it is
    done with them). Shared by the kernels that finish a job in its last program: the split-K reduction
    (`split_k_sum`), engine/attention_kernels.py's merge, engine/lora_kernels.py's shrink and
    engine/sample_kernels.py's splits."""
    tl.debug_barrier()  # every thread's part is written before the counter moves (release)
    return tl.atomic_add(counter, 1, sem="acq_rel", scope="gpu") == S - 1


@triton.jit
def split_k_sum(acc, partial_at, split_stride, mask, s, counter, S: tl.constexpr):
    """The end of split s of S of a split-K tile: stores its float32 partial `acc` at partial_at + s *
    split_stride (where `mask`) and bumps the tile's counter. Returns (done, acc): the tile's last split to
    arrive gets done and the S partials added in split order (deterministic; its own from registers), and
    resets the counter to 0 for the next launch; the others get (False, their own acc). Shared by the
    split-K kernels (this NF4 GEMV, engine/gemv_kernels.py)."""
    tl.store(partial_at + s * split_stride, acc, mask=mask)
    done = last_to_arrive(counter, S)
    if done:
        total = tl.zeros_like(acc)
        for t in tl.static_range(S):  # unrolled: the S - 1 loads are in flight together (a loop over a
            # runtime S waited for each load in turn: an L2 round trip a split). Its own partial is masked off
            # (a where: a vector & a scalar bool is int32 in Triton 3.9's interpreter).
            p = tl.load(partial_at + t * split_stride, mask=tl.where(t != s, mask, False), other=0.0,
                        cache_modifier=".cg")
            total += tl.where(t == s, acc, p)
        acc = total
        tl.store(counter, 0)
    return done, acc


@triton.jit
def _load_weights(byte_at, absmax_q_ptr, absmax2_ptr, block_of_row, col_ok, blk, last, STRIDE: tl.constexpr):
    """Block blk of each row (masked off from `last` on): its bytes (from byte_at, block 0's: [32, BO] uint8, or
    [8, BO] int32 words; STRIDE of them a block), absmax code [BO] (int32) and absmax2 [BO]."""
    ok = tl.where(blk < last, col_ok, False)  # (a vector & a scalar bool is int32 in Triton 3.9's interpreter)
    byte = tl.load(byte_at + blk * STRIDE, mask=ok[None, :], other=0)
    q = tl.load(absmax_q_ptr + block_of_row + blk, mask=ok, other=0).to(tl.int32)
    a2 = tl.load(absmax2_ptr + (block_of_row + blk) // 256, mask=ok, other=0.0)
    return byte, q, a2


@triton.jit
def _load_block(byte_at, absmax_q_ptr, absmax2_ptr, block_of_row, col_ok, x_ptr, x_at, n_ok, j, blk, last,
                X_PAIRS: tl.constexpr, STRIDE: tl.constexpr):
    """`_load_weights` and `_load_x` of block blk."""
    byte, q, a2 = _load_weights(byte_at, absmax_q_ptr, absmax2_ptr, block_of_row, col_ok, blk, last, STRIDE)
    xa, xb = _load_x(x_ptr, x_at, n_ok, j, blk, last, X_PAIRS)
    return byte, q, a2, xa, xb


@triton.jit
def _load_x(x_ptr, x_at, n_ok, j, blk, last, X_PAIRS: tl.constexpr):
    """Load x's columns of block blk (masked off from `last` on), transposed: X_PAIRS (16-bit x): the
    [32, BN] int32 (even, odd) pairs, twice; else the even and odd columns, [32, BN] each. `_split_x` makes
    them operands."""
    n_ok = tl.where(blk < last, n_ok, False)
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


MAX_GROUP = 3  # projections of one input per launch (q, k, v): `pick`'s three arguments


def as_group(values) -> list:
    """A group's per-projection kernel arguments as `pick`'s MAX_GROUP: a smaller group repeats its first
    (never read: the kernels pick g < G)."""
    values = list(values)
    return values + [values[0]] * (MAX_GROUP - len(values))


def block_r(R: int) -> int:
    """The LoRA rank's block in the kernels' dots: R rounded up to a power of 2, at least 16 (tl.dot's least)."""
    return max(16, triton.next_power_of_2(R))


@triton.jit
def pick(g, p0, p1, p2):
    """The g-th of three kernel arguments (a group of projections in one launch: q/k/v)."""
    if g == 0:
        p = p0
    elif g == 1:
        p = p1
    else:
        p = p2
    return p


@triton.jit
def shrink_sum(x_ptr, stride_x, a_ptr, rows, ranks, k_first, N, K, R, K_SPAN: tl.constexpr, BLOCK_K: tl.constexpr,
               PRECISION: tl.constexpr):
    """x[rows, k_first : k_first + K_SPAN] @ A[ranks, same columns]^T -> [BN, BR] float32, masked to N, K, R.
    x [N, K] (row stride stride_x), A [R, K] contiguous. Shared by engine/lora_kernels.py's shrink kernel and the
    shrink fused into the one-launch projections (`publish_shrink`)."""
    acc = tl.zeros((rows.shape[0], ranks.shape[0]), dtype=tl.float32)
    for k0 in range(0, K_SPAN, BLOCK_K):
        cols = k_first + k0 + tl.arange(0, BLOCK_K)  # [BK]
        x_mask = (rows[:, None] < N) & (cols[None, :] < K)
        x = tl.load(x_ptr + rows[:, None] * stride_x + cols[None, :], mask=x_mask, other=0.0)  # [BN, BK]
        a_mask = (ranks[None, :] < R) & (cols[:, None] < K)
        a = tl.load(a_ptr + ranks[None, :] * K + cols[:, None], mask=a_mask, other=0.0)  # [BK, BR] = A^T tile
        acc += tl.dot(x.to(tl.float32), a.to(tl.float32), input_precision=PRECISION)
    return acc


@triton.jit
def publish_shrink(p, x_ptr, stride_x, a0, a1, a2, partial_ptr, ready_ptr, G, N, K, R,
                   SPLITS: tl.constexpr, K_PER_SPLIT: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    """Producer p of a LoRA shrink fused into a GEMV launch (this NF4 GEMV, engine/gemv_kernels.py): adapter
    g = p // SPLITS, columns [s K_PER_SPLIT, (s + 1) K_PER_SPLIT) of K for s = p % SPLITS. Stores
    x[:, those] @ A_g[:, those]^T, [N, R], at partial_ptr[s, g] of [SPLITS, G, N, R] float32, then bumps
    ready_ptr[g] (release); the consumers wait for SPLITS and add the partials in split order
    (`gather_shrink`). N <= BLOCK_N: one row block."""
    g = p // SPLITS
    s = p % SPLITS
    rows = tl.arange(0, BLOCK_N)  # [BN]
    ranks = tl.arange(0, BLOCK_R)  # [BR]
    acc = shrink_sum(x_ptr, stride_x, pick(g, a0, a1, a2), rows, ranks, s * K_PER_SPLIT, N, K, R, K_PER_SPLIT,
                     BLOCK_K, PRECISION)  # [BN, BR]
    at = ((s * G + g) * N + rows[:, None]) * R + ranks[None, :]  # [BN, BR] into [SPLITS, G, N, R]
    tl.store(partial_ptr + at, acc, mask=(rows[:, None] < N) & (ranks[None, :] < R))
    tl.debug_barrier()  # every thread's partial is written before the counter moves (release)
    tl.atomic_add(ready_ptr + g, 1, sem="acq_rel", scope="gpu")


@triton.jit
def gather_shrink(xa_ptr, ready_ptr, g, G, N, R, n, n_ok, tiles_g, SPLITS: tl.constexpr, BLOCK_R: tl.constexpr):
    """(x A_g^T)^T [BR, BN] float32 from a shrink fused into this launch (`publish_shrink`): waits until its
    SPLITS producers have bumped ready_ptr[g], bumps it once more itself (acquire: the partials are then visible),
    and adds the partials [SPLITS, G, N, R] in split order (deterministic). The last of projection g's tiles_g
    readers (one per tile) finds SPLITS + tiles_g - 1 there and sets it back to 0 for the next launch: every reader
    has passed its wait by then. The producers are the launch's first programs, started before any consumer, so
    the wait ends. (Until the twenty-sixth session the readers counted themselves on a second counter, one more
    atomic round trip before a tile's program could end.)"""
    seen = tl.load(ready_ptr + g, volatile=True)  # polled by plain loads (every tile's finishing program
    while seen < SPLITS:  # polls: atomics on the one address would queue behind each other in the L2)
        seen = tl.load(ready_ptr + g, volatile=True)
    before = tl.atomic_add(ready_ptr + g, 1, sem="acquire", scope="gpu")  # once, counting this reader
    ranks = tl.arange(0, BLOCK_R)  # [BR]
    at = xa_ptr + (g * N + n[None, :]) * R + ranks[:, None]  # [BR, BN] in split 0
    mask = (ranks[:, None] < R) & n_ok[None, :]
    xa = tl.zeros((BLOCK_R, n.shape[0]), dtype=tl.float32)
    for t in tl.static_range(SPLITS):  # unrolled: the loads are in flight together
        xa += tl.load(at + t * G * N * R, mask=mask, other=0.0, cache_modifier=".cg")
    if before == SPLITS + tiles_g - 1:
        tl.store(ready_ptr + g, 0)
    return xa


@triton.jit
def end_tile(acc, tile, s, tiles, partial_ptr, count_ptr, y_ptr, bias_ptr, xa_ptr, b_ptr, scale, g, N, O, R,
             cols, col_ok, n, n_ok, ready_ptr, G, tiles_g, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
             BLOCK_R: tl.constexpr, PRECISION: tl.constexpr, SHRINK_SPLITS: tl.constexpr, S: tl.constexpr):
    """The end of program (tile, split s of S) of a split-K GEMV over projection g: acc^T [BO, BN]
    float32, its sums for rows `cols` of W_g and rows `n` of x (BN of them, from any first row). With several
    splits, `split_k_sum` over the partials [S, tiles, BO, BN] (`tile` indexes the launch's split-K jobs); the
    tile's last split then stores y_g [N, O] = (acc + bias) rounded to y's dtype (cuBLAS's rounding: one, after
    the bias), and with LoRA y = (y + scale * (xa_g B_g^T)) rounded once, in float32 (PEFT's float32 adapter; the
    grouped expand's math, engine/lora_kernels.py). xa_ptr: the LoRA shrink's x A_g^T [G, N, R] float32
    (SHRINK_SPLITS 0), or with SHRINK_SPLITS > 0 the partials of a shrink fused into this launch, [SHRINK_SPLITS,
    G, N, R], which `gather_shrink` waits for (ready_ptr, G and tiles_g, how many programs finish projection g's
    tiles, serve it); b_ptr: B_g [O, R]. Shared by this NF4 GEMV and engine/gemv_kernels.py."""
    BLOCK_O: tl.constexpr = acc.shape[0]
    BLOCK_N: tl.constexpr = acc.shape[1]
    # the bias and B first: in flight during the split-K round trips (a load after them would add one)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)  # [BO]
    if HAS_LORA:
        ranks = tl.arange(0, BLOCK_R)  # [BR]
        b = tl.load(b_ptr + cols[:, None] * R + ranks[None, :], mask=col_ok[:, None] & (ranks[None, :] < R),
                    other=0.0)  # [BO, BR]
    done = S == 1
    if S > 1:
        tile_at = tl.arange(0, BLOCK_O)[:, None] * BLOCK_N + tl.arange(0, BLOCK_N)[None, :]  # [BO, BN]
        tile_size = BLOCK_O * BLOCK_N
        done, acc = split_k_sum(acc, partial_ptr + tile * tile_size + tile_at, tiles * tile_size,
                                col_ok[:, None] & n_ok[None, :], s, count_ptr + tile, S)
    if done:
        if HAS_BIAS:
            acc += bias[:, None]
        y = acc.to(y_ptr.dtype.element_ty)  # [BO, BN]
        if HAS_LORA:
            if SHRINK_SPLITS > 0:
                xa = gather_shrink(xa_ptr, ready_ptr, g, G, N, R, n, n_ok, tiles_g, SHRINK_SPLITS, BLOCK_R)
            else:
                xa = tl.load(xa_ptr + (g * N + n[None, :]) * R + ranks[:, None],
                             mask=(ranks[:, None] < R) & n_ok[None, :], other=0.0)  # [BR, BN] = (x A_g^T)^T
            delta = tl.dot(b.to(tl.float32), xa, input_precision=PRECISION)  # [BO, BN]
            y = (y.to(tl.float32) + scale * delta).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + n[None, :] * O + cols[:, None], y, mask=col_ok[:, None] & n_ok[None, :])


@triton.jit
def _table_values(table_ptr, byte):
    """The values of a byte's high and low nibbles from the [16] table."""
    return tl.load(table_ptr + (byte >> 4)), tl.load(table_ptr + (byte & 15))


@triton.jit
def _words_to_columns(v0, v1, v2, v3):
    """[BO, 32] from the values of bytes 4w + i of the block's words, v_i [8, BO] each: column 4w + i."""
    t = tl.join(tl.join(v0, v1), tl.join(v2, v3))  # [8, BO, 2, 2]: [w, o, i % 2, i // 2]
    return tl.reshape(tl.permute(t, (1, 0, 3, 2)), (t.shape[1], 32))


@triton.jit
def _nf4_step(acc, byte, q, a2, xa, xb, dyn_ptr, offset, table_ptr, dtype: tl.constexpr, X_PAIRS: tl.constexpr,
              DOT_F32: tl.constexpr, FMA: tl.constexpr, LOOKUP: tl.constexpr, PERMUTE_PTX: tl.constexpr):
    """acc [BO, BN] + one block: its bytes [32, BO] dequantised (absmax from the codes q and absmax2 a2)
    times x's columns of the block (`_load_x`'s xa, xb)."""
    even, odd = _split_x(xa, xb, dtype, X_PAIRS)  # [32, BN] each
    if LOOKUP == "permute":  # the NF4 values unscaled, the block's product scaled by the rows' absmax
        if PERMUTE_PTX != "":  # byte permutes in registers: each [8, BO] in x's dtype
            e0, e1, e2, e3, o0, o1, o2, o3 = tl.inline_asm_elementwise(
                PERMUTE_PTX, "=h,=h,=h,=h,=h,=h,=h,=h,r", [byte],
                dtype=(tl.bfloat16 if dtype == tl.bfloat16 else tl.float16,) * 8, is_pure=True, pack=1)
        else:  # the table in x's dtype: two loads per byte
            e0, o0 = _table_values(table_ptr, byte & 0xFF)
            e1, o1 = _table_values(table_ptr, (byte >> 8) & 0xFF)
            e2, o2 = _table_values(table_ptr, (byte >> 16) & 0xFF)
            e3, o3 = _table_values(table_ptr, (byte >> 24) & 0xFF)
        hi, lo = _words_to_columns(e0, e1, e2, e3), _words_to_columns(o0, o1, o2, o3)  # [BO, 32] each
        if DOT_F32:
            part = tl.dot(hi.to(tl.float32), even.to(tl.float32), input_precision="ieee")
            part = tl.dot(lo.to(tl.float32), odd.to(tl.float32), part, input_precision="ieee")
        else:
            part = tl.dot(hi, even)  # [BO, BN] float32
            part = tl.dot(lo, odd, part)
        absmax = tl.load(dyn_ptr + q) * a2 + offset  # [BO] float32
        acc = tl.fma(part, absmax[:, None], acc)
    else:  # each value scaled by its row's absmax
        absmax = (tl.load(dyn_ptr + q) * a2 + offset)[None, :]  # [1, BO] float32
        if LOOKUP == "nibbles":
            code = byte.to(tl.int32)  # [32, BO]
            hi = (tl.load(table_ptr + (code >> 4)) * absmax).to(dtype)  # the block's even columns
            lo = (tl.load(table_ptr + (code & 15)) * absmax).to(dtype)  # its odd columns
        else:
            pairs = table_ptr.to(tl.pointer_type(tl.int64))  # one 64-bit load per byte: both of its values
            both = tl.load(pairs + byte)  # [32, BO] int64: nf4[byte >> 4] in the low half, nf4[byte & 15] high
            hi = (both.to(tl.int32).to(tl.float32, bitcast=True) * absmax).to(dtype)
            lo = ((both >> 32).to(tl.int32).to(tl.float32, bitcast=True) * absmax).to(dtype)
        if FMA:  # CUDA cores: [32, BO, BN] products summed over the block's bytes, mostly within a thread
            acc += tl.sum(hi.to(tl.float32)[:, :, None] * even.to(tl.float32)[:, None, :]
                          + lo.to(tl.float32)[:, :, None] * odd.to(tl.float32)[:, None, :], axis=0)
        elif DOT_F32:
            acc = tl.dot(tl.trans(hi).to(tl.float32), even.to(tl.float32), acc, input_precision="ieee")
            acc = tl.dot(tl.trans(lo).to(tl.float32), odd.to(tl.float32), acc, input_precision="ieee")
        else:
            acc = tl.dot(tl.trans(hi), even, acc)
            acc = tl.dot(tl.trans(lo), odd, acc)
    return acc


# The rows N are not specialised on: Triton compiles a new variant of a kernel for an integer argument equal to 1 (a
# constant) or divisible by 16, and N only bounds masks here. Decode's batch buckets (1, 2, 4, 8, 16, ...) would
# otherwise compile every group's kernel again at 1 and 16 rows: seconds in the middle of a rollout, the first time a
# batch shrinks that far (engine/gemv_kernels.py's kernel likewise).
@triton.jit(do_not_specialize=["N"])
def _nf4_gemv_kernel(x_ptr, packed0, packed1, packed2, absq0, absq1, absq2, abs2_0, abs2_1, abs2_2,
                     offset0, offset1, offset2, table0, table1, table2, dyn0, dyn1, dyn2, bias0, bias1, bias2,
                     la0, la1, la2, lb0, lb1, lb2, y0, y1, y2, s0, s1, s2, o0, o1, o2, end0, end1, xa_ptr,
                     partial_ptr, count_ptr, N, K, R, G, row_blocks, x_stride, x_row_stride, blocks_per_split, tiles,
                     producers,
                     HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr,
                     BLOCK_R: tl.constexpr, X_PAIRS: tl.constexpr, DOT_F32: tl.constexpr, FMA: tl.constexpr,
                     LOOKUP: tl.constexpr, PERMUTE_PTX: tl.constexpr, PREFETCH: tl.constexpr,
                     PRECISION: tl.constexpr,
                     SHRINK_SPLITS: tl.constexpr, SHRINK_K: tl.constexpr, SHRINK_BLOCK_K: tl.constexpr,
                     SHRINK_ROWS: tl.constexpr, SPLITS: tl.constexpr, USE_PDL: tl.constexpr):
    """Program pid of a 1-D grid, laid out as engine/gemv_kernels.py's: the first `producers` publish the
    splits of a LoRA shrink fused into this launch (SHRINK_SPLITS > 0); program producers + tile + s * tiles
    computes column tile `tile`, split s: acc [BO, BN] = W_g[cols, blocks of s] @ x[:, blocks of s]^T, then
    the split-K reduction and `end_tile` into y_g [N, O_g]. Projection g owns tiles [end_{g-1}, end_g).
    table_g: NIBBLES: the float32 [16] NF4 code (two loads per byte, within one 64-byte line); else float32
    [256, 2], (nf4[b >> 4], nf4[b & 15]) of byte b (one 8-byte load per byte, over 2 KB). x's row stride:
    x_stride in elements, x_row_stride in 32-bit pairs when X_PAIRS (else the same)."""
    pid = tl.program_id(0)
    if pid < producers:
        if SHRINK_SPLITS > 0:
            wait_for_inputs(USE_PDL)
            publish_shrink(pid, x_ptr, x_stride, la0, la1, la2, xa_ptr, count_ptr + tiles, G, N, K, R,
                           SHRINK_SPLITS, SHRINK_K, SHRINK_ROWS, BLOCK_R, SHRINK_BLOCK_K, PRECISION)
    else:
        _nf4_tile(pid - producers, x_ptr, packed0, packed1, packed2, absq0, absq1, absq2, abs2_0, abs2_1, abs2_2,
                  offset0, offset1, offset2, table0, table1, table2, dyn0, dyn1, dyn2, bias0, bias1, bias2,
                  lb0, lb1, lb2, y0, y1, y2, s0, s1, s2, o0, o1, o2, end0, end1, xa_ptr, partial_ptr, count_ptr,
                  N, R, G, row_blocks, x_row_stride, blocks_per_split, tiles,
                  HAS_BIAS, HAS_LORA, BLOCK_N, BLOCK_O, BLOCK_R, X_PAIRS, DOT_F32, FMA, LOOKUP, PERMUTE_PTX, PREFETCH,
                  PRECISION, SHRINK_SPLITS, SPLITS, USE_PDL)


@triton.jit
def _nf4_tile(q_pid, x_ptr, packed0, packed1, packed2, absq0, absq1, absq2, abs2_0, abs2_1, abs2_2,
              offset0, offset1, offset2, table0, table1, table2, dyn0, dyn1, dyn2, bias0, bias1, bias2,
              lb0, lb1, lb2, y0, y1, y2, s0, s1, s2, o0, o1, o2, end0, end1, xa_ptr, partial_ptr, count_ptr,
              N, R, G, row_blocks, x_row_stride, blocks_per_split, tiles,
              HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr,
              BLOCK_R: tl.constexpr, X_PAIRS: tl.constexpr, DOT_F32: tl.constexpr, FMA: tl.constexpr,
              LOOKUP: tl.constexpr, PERMUTE_PTX: tl.constexpr, PREFETCH: tl.constexpr, PRECISION: tl.constexpr,
              SHRINK_SPLITS: tl.constexpr, SPLITS: tl.constexpr, USE_PDL: tl.constexpr):
    """Tile program q_pid of `_nf4_gemv_kernel` (x_row_stride in 32-bit pairs when X_PAIRS)."""
    dtype: tl.constexpr = x_ptr.dtype.element_ty
    tile = q_pid % tiles
    s = q_pid // tiles
    g = tl.where(tile < end0, 0, tl.where(tile < end1, 1, 2))
    start = tl.where(g == 0, 0, tl.where(g == 1, end0, end1))
    packed_ptr, absmax_q_ptr = pick(g, packed0, packed1, packed2), pick(g, absq0, absq1, absq2)
    absmax2_ptr, offset_ptr = pick(g, abs2_0, abs2_1, abs2_2), pick(g, offset0, offset1, offset2)
    table_ptr, dyn_ptr = pick(g, table0, table1, table2), pick(g, dyn0, dyn1, dyn2)
    O = pick(g, o0, o1, o2)
    cols = (tile - start) * BLOCK_O + tl.arange(0, BLOCK_O)  # [BO] weight rows = output features of projection g
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
    if LOOKUP == "permute":  # [8, BO] 32-bit word w of block 0 (bytes 4w to 4w + 3), contiguous in w
        STRIDE: tl.constexpr = 8
        byte_at = packed_ptr.to(tl.pointer_type(tl.int32)) + block_of_row[None, :] * 8 + tl.arange(0, 8)[:, None]
    else:  # [32, BO] byte j of block 0, contiguous in j
        STRIDE: tl.constexpr = 32
        byte_at = packed_ptr + block_of_row[None, :] * 32 + j[:, None]
    x_at = n * x_row_stride  # [BN]
    acc = tl.zeros((BLOCK_O, BLOCK_N), dtype=tl.float32)
    # the loads of the next PREFETCH blocks are in flight while a block is dequantised and multiplied; the
    # first ones' weights before the wait for x (the previous kernel's output)
    byte, q, a2 = _load_weights(byte_at, absmax_q_ptr, absmax2_ptr, block_of_row, col_ok, first, last, STRIDE)
    if PREFETCH >= 2:
        byte2, q2, a2_2 = _load_weights(byte_at, absmax_q_ptr, absmax2_ptr, block_of_row, col_ok, first + 1, last,
                                        STRIDE)
    if PREFETCH >= 3:
        byte3, q3, a2_3 = _load_weights(byte_at, absmax_q_ptr, absmax2_ptr, block_of_row, col_ok, first + 2, last,
                                        STRIDE)
    wait_for_inputs(USE_PDL)
    xa, xb = _load_x(x_ptr, x_at, n_ok, j, first, last, X_PAIRS)
    if PREFETCH >= 2:
        xa2, xb2 = _load_x(x_ptr, x_at, n_ok, j, first + 1, last, X_PAIRS)
    if PREFETCH >= 3:
        xa3, xb3 = _load_x(x_ptr, x_at, n_ok, j, first + 2, last, X_PAIRS)
    blk = first
    while blk < last:  # (a while loop: the interpreter can't take range() bounds derived from program_id)
        cur_byte, cur_q, cur_a2, cur_xa, cur_xb = byte, q, a2, xa, xb
        if PREFETCH == 1:
            byte, q, a2, xa, xb = _load_block(byte_at, absmax_q_ptr, absmax2_ptr, block_of_row, col_ok, x_ptr, x_at,
                                              n_ok, j, blk + 1, last, X_PAIRS, STRIDE)
        elif PREFETCH == 2:
            byte, q, a2, xa, xb = byte2, q2, a2_2, xa2, xb2
            byte2, q2, a2_2, xa2, xb2 = _load_block(byte_at, absmax_q_ptr, absmax2_ptr, block_of_row, col_ok, x_ptr,
                                                    x_at, n_ok, j, blk + 2, last, X_PAIRS, STRIDE)
        else:
            byte, q, a2, xa, xb = byte2, q2, a2_2, xa2, xb2
            byte2, q2, a2_2, xa2, xb2 = byte3, q3, a2_3, xa3, xb3
            byte3, q3, a2_3, xa3, xb3 = _load_block(byte_at, absmax_q_ptr, absmax2_ptr, block_of_row, col_ok, x_ptr,
                                                    x_at, n_ok, j, blk + 3, last, X_PAIRS, STRIDE)
        acc = _nf4_step(acc, cur_byte, cur_q, cur_a2, cur_xa, cur_xb, dyn_ptr, offset, table_ptr, dtype, X_PAIRS,
                        DOT_F32, FMA, LOOKUP, PERMUTE_PTX)
        blk += 1

    tiles_g = tl.where(g == 0, end0, tl.where(g == 1, end1 - end0, tiles - end1))
    end_tile(acc, tile, s, tiles, partial_ptr, count_ptr, pick(g, y0, y1, y2), pick(g, bias0, bias1, bias2),
             xa_ptr, pick(g, lb0, lb1, lb2), pick(g, s0, s1, s2), g, N, O, R, cols, col_ok, n, n_ok,
             count_ptr + tiles, G, tiles_g, HAS_BIAS, HAS_LORA, BLOCK_R, PRECISION, SHRINK_SPLITS, SPLITS)


@functools.cache
def sm_count(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 132


def per_sm_work(programs: int, splits: int, sms: int) -> float:
    """The most work one SM gets, in whole tiles, when `programs` programs of 1 / splits of a tile each are spread
    evenly over sms SMs: the time of a launch whose programs are each bound by their SM's share of the memory
    bandwidth (engine/gemv_kernels.py's BALANCED_SPLITS)."""
    return triton.cdiv(programs, sms) / splits


@functools.cache
def split_k(tiles: int, K: int, sms: int, programs_per_sm: int, min_per_split: int, step: int = 1,
            balanced: bool = False, beside: int = 0) -> tuple[int, int]:
    """(splits, K per split, a multiple of `step`): K cut so that the tiles x splits programs are about
    programs_per_sm per SM, each split at least min_per_split long (one split at least). `balanced`: of the
    split counts up to that one, the one that gives the busiest SM the least work (`per_sm_work` of the tiles x
    splits programs and the `beside` others of the launch, counted as tiles; the fewest splits among equals), so
    that a few SMs do not run a second program while the rest idle. Shared by the split-K kernels: this NF4 GEMV
    (K in blocks), engine/gemv_kernels.py and engine/sample_kernels.py."""
    want = max(1, min(triton.cdiv(programs_per_sm * sms, tiles), K // min_per_split))
    if balanced:
        want = min(range(1, want + 1), key=lambda s: (per_sm_work(tiles * s + beside, s, sms), s))
    per_split = triton.cdiv(triton.cdiv(K, want), step) * step
    return triton.cdiv(K, per_split), per_split


def _splits(tiles: int, row_blocks: int, sms: int, fma: bool) -> tuple[int, int]:
    """(splits, blocks per split): about PROGRAMS_PER_SM programs per SM, >= MIN_BLOCKS_PER_SPLIT blocks each
    (FMA_ ones for the CUDA-core products)."""
    if fma:
        return split_k(tiles, row_blocks, sms, FMA_PROGRAMS_PER_SM, FMA_MIN_BLOCKS_PER_SPLIT)
    return split_k(tiles, row_blocks, sms, PROGRAMS_PER_SM, MIN_BLOCKS_PER_SPLIT)


_per_code: dict[tuple[int, object], tuple[weakref.ref, int, object]] = {}


def _per_code_tensor(code: torch.Tensor, kind: object, build):
    """build(code), cached per code tensor and kind: rebuilt when the tensor is modified in place (an inference
    tensor has no version counter: taken as never modified), dropped with it."""
    key, version = (id(code), kind), -1 if code.is_inference() else code._version
    hit = _per_code.get(key)
    if hit is not None and hit[0]() is code and hit[1] == version:
        return hit[2]
    value = build(code)
    _per_code[key] = (weakref.ref(code, lambda _: _per_code.pop(key, None)), version, value)
    return value


def _pair_table(code: torch.Tensor) -> torch.Tensor:
    """float32 [256, 2]: (code[b >> 4], code[b & 15]) of byte b (LOOKUP "pairs")."""
    return _per_code_tensor(code, "pairs", lambda c: byte_table(c).float().contiguous())


def _holds_nf4(code: torch.Tensor) -> bool:
    """Whether code holds the NF4 values, which `permute_lookup_ptx` has built in (one host sync per tensor;
    False while a CUDA graph is being captured and the answer is not yet cached: the table path serves)."""
    if code.is_cuda and torch.cuda.is_current_stream_capturing():
        hit = _per_code.get((id(code), "nf4"))
        return bool(hit is not None and hit[0]() is code and hit[2])
    return _per_code_tensor(code, "nf4", lambda c: torch.equal(c.detach().cpu().float(), nf4_code()))


def permute_words(dtype: torch.dtype) -> tuple[int, ...]:
    """The NF4 values in `dtype` (16-bit) as 8 words of bytes for byte permutes: the high bytes of values 0-3,
    4-7, 8-11, 12-15, then their low bytes (value i's in byte i % 4 of word i // 4)."""
    bits = [v & 0xFFFF for v in nf4_code().to(dtype).view(torch.int16).tolist()]  # [16]
    high, low = [b >> 8 for b in bits], [b & 0xFF for b in bits]
    return tuple(sum(table[4 * w + i] << (8 * i) for i in range(4)) for table in (high, low) for w in range(4))


@functools.cache
def permute_lookup_ptx(dtype: torch.dtype) -> str:
    """PTX for `tl.inline_asm_elementwise(..., pack=1)`: a 32-bit word of 4 packed bytes ($8) -> the NF4 values
    of their high nibbles ($0 to $3, bytes 0 to 3) and of their low nibbles ($4 to $7), 16-bit, in `dtype`
    (bf16 or fp16), unscaled. A nibble n picks its value's high byte and low byte with `prmt` (a byte of 8 by a
    3-bit selector) from the tables of values 0-7 and 8-15 and keeps the one that n's bit 3 selects (`lop3`,
    with a mask from `prmt`'s sign mode: the bit moved to its byte's sign), then `prmt` interleaves the two
    bytes. A selector half is 4 nibbles in order (byte 0's low, high, byte 1's low, high); 21 instructions for
    8 values, no memory access."""
    h0, h1, h2, h3, l0, l1, l2, l3 = (f"0x{w:08X}" for w in permute_words(dtype))
    half = (  # selector {sel} (4 nibbles' low 3 bits), mask selector {mask} -> {hi_out}, {lo_out}
        "prmt.b32 t3, t2, $8, {mask};"  # 0xff in byte k where nibble k >= 8
        "prmt.b32 t4, h0, h1, {sel}; prmt.b32 t5, h2, h3, {sel}; lop3.b32 t4, t4, t5, t3, 0xD8;"  # high bytes
        "prmt.b32 t5, l0, l1, {sel}; prmt.b32 t6, l2, l3, {sel}; lop3.b32 t5, t5, t6, t3, 0xD8;"  # low bytes
        "prmt.b32 {hi_out}, t5, t4, 0x7351; prmt.b32 {lo_out}, t5, t4, 0x6240;")  # (low, high) of nibbles 1, 3; 0, 2
    return ("{.reg .b32 t0, t1, t2, t3, t4, t5, t6, h0, h1, h2, h3, l0, l1, l2, l3, e01, e23, o01, o23;"
            f"mov.b32 h0, {h0}; mov.b32 h1, {h1}; mov.b32 h2, {h2}; mov.b32 h3, {h3};"
            f"mov.b32 l0, {l0}; mov.b32 l1, {l1}; mov.b32 l2, {l2}; mov.b32 l3, {l3};"
            "and.b32 t0, $8, 0x77777777; shr.b32 t1, t0, 16; shl.b32 t2, $8, 4;"
            + half.format(sel="t0", mask="0xD9C8", hi_out="e01", lo_out="o01")
            + half.format(sel="t1", mask="0xFBEA", hi_out="e23", lo_out="o23")
            + "mov.b32 {$0, $1}, e01; mov.b32 {$2, $3}, e23; mov.b32 {$4, $5}, o01; mov.b32 {$6, $7}, o23;}")


_workspaces: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}
_outgrown: list[torch.Tensor] = []  # counters replaced by larger ones: captured CUDA graphs may still use them


def split_k_workspace(device: torch.device, tiles: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(tile counters int32 [>= tiles], all 0 between launches: each launch's last split resets its tile's;
    a float32 [1] stand-in for the partials of an unsplit launch). Shared by the split-K kernels that run
    one after another on a stream: this NF4 GEMV, engine/gemv_kernels.py, engine/lora_kernels.py's shrink and
    engine/attention_kernels.py's merge (a counter per row and KV head)."""
    ws = _workspaces.get(device)
    if ws is None or ws[0].numel() < tiles:
        if ws is not None:
            _outgrown.append(ws[0])
        ws = _workspaces[device] = (torch.zeros(max(tiles, COUNTERS), dtype=torch.int32, device=device),
                                    torch.empty(1, dtype=torch.float32, device=device))
    return ws


@dataclass(frozen=True)
class NF4Weight:
    """One NF4 weight [out_features, K] in the bitsandbytes layout (blocksize 64, nested blocksize 256), on
    the input's device: packed uint8 [ceil(O*K/2)], absmax_q uint8 [nb], absmax2 float32 [nb2], offset
    float32 [], code float32 [16], dyn float32 [256]; bias [O] or None."""
    packed: torch.Tensor
    absmax_q: torch.Tensor
    absmax2: torch.Tensor
    offset: torch.Tensor
    code: torch.Tensor
    dyn: torch.Tensor
    out_features: int
    bias: torch.Tensor | None = None


def shrink_splits(K: int, shrink_k: int) -> tuple[int, int]:
    """(producers a projection, columns each) of a LoRA shrink fused into a GEMV launch: shrink_k rounded up to
    SHRINK_BLOCK_K, at most K's."""
    span = triton.cdiv(min(shrink_k, K), SHRINK_BLOCK_K) * SHRINK_BLOCK_K
    return triton.cdiv(K, span), span


def lora_input(x: torch.Tensor, G: int, R: int, xa: torch.Tensor | None, lora_a: list[torch.Tensor] | None,
               shrink_k: int) -> tuple[torch.Tensor | None, int, int]:
    """A GEMV launch's LoRA input: (xa, 0, 0) for the shrink's output x A_g^T [G, N, R] (or no adapter); for
    the shrink fused into the launch (lora_a given), (its partials [S, G, N, R] float32, S producer splits of
    K, their width: `shrink_splits`)."""
    if xa is not None and lora_a is not None:
        raise ValueError("give the LoRA shrink's output xa or the adapters' A (lora_a), not both")
    if lora_a is None:
        return xa, 0, 0
    N, K = x.shape
    splits, span = shrink_splits(K, shrink_k)
    return torch.empty(splits, G, N, R, device=x.device, dtype=torch.float32), splits, span


def nf4_gemv(x: torch.Tensor, weights: list[NF4Weight], xa: torch.Tensor | None = None,
             lora_b: list[torch.Tensor] | None = None, scales: list[float] | None = None,
             precision: str = "ieee", lora_a: list[torch.Tensor] | None = None,
             shrink_k: int = SHRINK_K) -> list[torch.Tensor]:
    """x [N, K] (K % 64 == 0; N <= MAX_ROWS is the point) times G <= 3 NF4 weights of width K in one launch
    -> [y_g [N, O_g] in x's dtype]: y_g = x W_g^T (+ b_g) (+ s_g (x A_g^T) B_g^T). The biases are on all
    weights or none. With LoRA: either xa [G, N, R] float32, x A_g^T (engine/lora_kernels.py's shrink), or
    lora_a, G tensors [R, K] (float32, as PEFT's), for the shrink in this launch (`publish_shrink`, shrink_k
    columns of K per producer); lora_b: G tensors [O_g, R]; scales: G floats; `precision` the float32 dots'
    ("ieee", "tf32x3")."""
    N, K = x.shape
    if K % QBLOCK:
        raise ValueError(f"the fused NF4 kernel takes K % {QBLOCK} == 0, got K = {K}")
    if any(w.packed.numel() >= 2 ** 31 for w in weights):
        raise ValueError("the fused NF4 kernel indexes the weight with int32")
    if len({w.bias is None for w in weights}) > 1:
        raise ValueError("the fused NF4 kernel takes biases on all weights of a group or on none")
    outs = [w.out_features for w in weights]
    if N == 0:
        return [x.new_empty(0, o) for o in outs]
    pairs = x.element_size() == 2  # x's (even, odd) columns read as one 32-bit word
    if x.stride(-1) != 1 or (pairs and (x.stride(0) % 2 or x.data_ptr() % 4)):
        x = x.clone(memory_format=torch.contiguous_format)
    G, row_blocks = len(weights), K // QBLOCK
    fma = N <= FMA_MAX_ROWS
    block_n = max(2 if fma else 16, triton.next_power_of_2(N))
    ends = list(itertools.accumulate(triton.cdiv(o, BLOCK_O) for o in outs))  # each weight's last tile + 1
    tiles = ends[-1]
    splits, per_split = _splits(tiles, row_blocks, sm_count(x.device), fma)
    counts, partial = split_k_workspace(x.device, tiles + G)  # tile counters, then the shrink's (1 a weight)
    if splits > 1:
        partial = torch.empty(splits, tiles, BLOCK_O, block_n, device=x.device, dtype=torch.float32)
    ys = [torch.empty(N, o, device=x.device, dtype=x.dtype) for o in outs]  # each [N, O_g]
    has_bias, has_lora = weights[0].bias is not None, xa is not None or lora_a is not None
    R = lora_b[0].shape[1] if has_lora else 0
    xa, shrink_splits, shrink_span = lora_input(x, G, R, xa, lora_a, shrink_k)
    producers = G * shrink_splits

    lookup, ptx = LOOKUP, ""
    if lookup == "permute" and (fma or not all(_holds_nf4(w.code) and w.packed.data_ptr() % 4 == 0
                                               for w in weights)):
        lookup = "nibbles"  # the CUDA-core products take scaled values; another table has no permute words; the
        # words' 32-bit loads need 4-byte aligned bytes
    if lookup == "permute" and x.dtype != torch.float32:  # the values in x's dtype: permuted, or a table's
        if INTERPRET:
            tables = [_per_code_tensor(w.code, x.dtype, lambda c: c.to(x.dtype)) for w in weights]
        else:
            tables, ptx = [w.code for w in weights], permute_lookup_ptx(x.dtype)
    else:
        tables = [_pair_table(w.code) if lookup == "pairs" else w.code for w in weights]
    _nf4_gemv_kernel[(producers + tiles * splits,)](
        x, *as_group(w.packed for w in weights), *as_group(w.absmax_q for w in weights),
        *as_group(w.absmax2 for w in weights), *as_group(w.offset for w in weights), *as_group(tables),
        *as_group(w.dyn for w in weights), *as_group(w.bias if has_bias else y for w, y in zip(weights, ys)),
        *as_group(lora_a if lora_a is not None else ys), *as_group(lora_b if has_lora else ys), *as_group(ys),
        *as_group(scales if has_lora else [0.0]), *as_group(outs), *as_group(ends)[:2],
        xa if has_lora else partial, partial, counts, N, K, R, G, row_blocks, x.stride(0),
        x.stride(0) // 2 if pairs else x.stride(0), per_split, tiles, producers,
        HAS_BIAS=has_bias, HAS_LORA=has_lora, BLOCK_N=block_n, BLOCK_O=BLOCK_O,
        BLOCK_R=block_r(R), X_PAIRS=pairs, DOT_F32=INTERPRET or x.dtype == torch.float32,
        FMA=fma, LOOKUP=lookup, PERMUTE_PTX=ptx, PREFETCH=PREFETCH, PRECISION=precision,
        SHRINK_SPLITS=shrink_splits, SHRINK_K=shrink_span, SHRINK_BLOCK_K=SHRINK_BLOCK_K,
        SHRINK_ROWS=max(16, block_n), SPLITS=splits, num_warps=NUM_WARPS, num_stages=1, **pdl_options(x.device),
        enable_fp_fusion=False)  # absmax = dyn[q] * absmax2 + offset rounded twice, as torch does
    return ys


DEQUANT_BYTES = 2048  # packed bytes per program of the dequantise kernel


@triton.jit
def _dequantize_kernel(packed_ptr, absmax_q_ptr, absmax2_ptr, offset_ptr, code_ptr, dyn_ptr, out_ptr, n,
                       BLOCKSIZE: tl.constexpr, NESTED: tl.constexpr, BYTES: tl.constexpr):
    """Program: BYTES packed bytes -> their 2 * BYTES weights, each (code[nibble] * absmax) in float32 rounded
    once to out's dtype, absmax = dyn[q] * absmax2 + offset (`nf4.dequantize_nf4`'s math and roundings)."""
    i = tl.program_id(0).to(tl.int64) * BYTES + tl.arange(0, BYTES)  # [BYTES] byte index
    even = 2 * i  # [BYTES] index of the byte's high-nibble weight (the low nibble is the next one)
    ok = even < n
    byte = tl.load(packed_ptr + i, mask=ok, other=0).to(tl.int32)
    block = even // BLOCKSIZE  # both weights of a byte are in one block (BLOCKSIZE is even)
    q = tl.load(absmax_q_ptr + block, mask=ok, other=0).to(tl.int32)
    absmax = tl.load(dyn_ptr + q) * tl.load(absmax2_ptr + block // NESTED, mask=ok, other=0.0) + tl.load(offset_ptr)
    tl.store(out_ptr + even, (tl.load(code_ptr + (byte >> 4)) * absmax).to(out_ptr.dtype.element_ty), mask=ok)
    tl.store(out_ptr + even + 1, (tl.load(code_ptr + (byte & 15)) * absmax).to(out_ptr.dtype.element_ty),
             mask=even + 1 < n)


def dequantize(packed: torch.Tensor, absmax_q: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor,
               code: torch.Tensor, dyn: torch.Tensor, shape: torch.Size, dtype: torch.dtype, blocksize: int,
               nested_blocksize: int) -> torch.Tensor:
    """`nf4.dequantize_nf4` in one launch, bit-identical: the weight [shape] in `dtype` from its packed bytes
    (uint8, ceil(n / 2)) and double-quantised absmax (the fields of `NF4Weight`). Its only full-size tensor
    is the output, where the torch path also makes int32 codes, float32 values and float32 products."""
    shape = torch.Size(shape)
    n = shape.numel()
    out = torch.empty(n, device=packed.device, dtype=dtype)  # [n]
    if n:
        _dequantize_kernel[(triton.cdiv(triton.cdiv(n, 2), DEQUANT_BYTES),)](
            packed.reshape(-1), absmax_q, absmax2, offset, code, dyn, out, n, BLOCKSIZE=blocksize,
            NESTED=nested_blocksize, BYTES=DEQUANT_BYTES, num_warps=4,
            enable_fp_fusion=False)  # absmax = dyn[q] * absmax2 + offset rounded twice, as torch does
    return out.view(shape)

