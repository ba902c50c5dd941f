"""A decode step's projections in one launch per group: y_g = x W_g^T (+ b_g) (+ s_g (x A_g^T) B_g^T).

At decode batch sizes a projection is a GEMV: its time is the bytes of W read, plus a launch. The engine
otherwise launches, per group of projections that read one input (q/k/v; o; gate/up; down), one cuBLAS
GEMM per projection, the LoRA shrink and the LoRA expand (engine/lora_kernels.py); at W2's batch of 6 on
an H100 the shrink and expand alone took 35% of a step's GPU time, each launch a few microseconds of
latency over a few KB of work (bench/RESULTS.md, 2026-11-27). Here one launch reads every weight of the
group, computes the LoRA shrink x A_g^T and adds the LoRA term in its epilogue: a group costs one launch.

The shrink's producers (FUSED_SHRINK): the grid is 1-D, and its first G * cdiv(K, SHRINK_K) programs each
compute x[:, ks] A_g[:, ks]^T over SHRINK_K columns, store it and bump projection g's ready counter
(models/nf4_kernels.py's publish_shrink). A tile's finishing program waits for that counter and adds the
partials in split order (gather_shrink). A GPU starts a grid's programs in order of their index, as Triton's
interpreter runs them, so the producers are running (or done) before any program waits for them. Until
2026-11-28 the shrink was its own launch before each group, a fifth of a W2 decode step's GPU time on an H200.

Tile program (column tile, split of K): acc^T [BLOCK_O, BLOCK_N] = W_g[cols, ks] @ x[:, ks]^T over its K range,
the weight tile the MMA's A operand (BLOCK_O >= 64 rows fills Hopper's wgmma) and x, padded to BLOCK_N
rows, the small B operand. Tiles run over the group's projections one after another (the first
cdiv(O_0, BLOCK_O) tiles are projection 0's, and so on), so one grid covers q, k and v. K is split until
about PROGRAMS_PER_SM programs per SM (a down projection has only 24 tiles of 64 rows), in parts of at least
MIN_K_PER_SPLIT columns (a 1.5B model's q/k/v and o run unsplit: for their few MB the split-K round trip
cost more than spreading them over more SMs saved), into the count whose busiest SM has the least to read,
the LoRA shrink's producers counted (BALANCED_SPLITS: a program's speed is its SM's share of the bandwidth);
each split stores
its float32 partial and bumps its tile's counter, and the last split of a tile to arrive adds the
partials in split order (deterministic) and finishes the tile (models/nf4_kernels.py's end_tile):
  y = (acc + bias) rounded to x's dtype                         (cuBLAS's rounding: one, after the bias)
  y = (y + s * (xa @ B^T)) rounded, xa = x A^T from the LoRA shrink's partials, in float32
     (engine/lora_kernels.py's expand, the same math: PEFT's float32 adapter, one rounding of y)

4-bit weights (models/linear4bit.py's Linear4bit) take models/nf4_kernels.py's NF4 GEMV instead, launched
the same way: one launch per group, the same epilogue (`nf4_lora_gemv`).

kernel -> launcher -> torch.library custom op (opaque to torch.compile, captured by CUDA graphs). Without a
GPU the kernel runs in Triton's interpreter (TRITON_INTERPRET=1), as the tests do; there the dot runs
in float32 (the interpreter's bf16 dot is wrong), as it does for float32 inputs.

To tune on a GPU: `python bench/kernels.py --only gemv` times (BLOCK_O, BLOCK_K, NUM_WARPS, NUM_STAGES,
PROGRAMS_PER_SM) per decoder layer against cuBLAS + the LoRA kernels, at several batch sizes (MAX_ROWS).
"""
from __future__ import annotations

import functools
import itertools
import logging
import os

import torch
import triton
import triton.language as tl
from torch import nn

from ..models import nf4_kernels
from ..models.linear4bit import Linear4bit, random_linear
from ..models.nf4_kernels import (MAX_GROUP, as_group, block_r, end_tile, lora_input, pdl_options, pick,
                                  publish_shrink, sm_count, split_k, split_k_workspace, wait_for_inputs)
from . import lora_kernels

logger = logging.getLogger("ahazero")

MAX_ROWS = 32  # 16-bit batches above this go to cuBLAS + the LoRA kernels; 4-bit ones above nf4_kernels.MAX_ROWS
# to the NF4 module's path. H200, twentieth session (bench/RESULTS.md), paired in one process (`bench/rollout.py
# --ab`): W1 at 64 rows 16,694 tokens/s through this launch against 19,018 through cuBLAS + the LoRA kernels (the
# shrink beside the GEMMs, lora_kernels.SHRINK_BESIDE_BASES; 20,296 since, BASES_BESIDE); at 32 rows 12,387 against
# 10,365, W2 (6 rows) 0.457 against 0.581 s. (2026-11-28, unpaired: 64 rows 20,163 this way against 18,350;
# nineteenth session: W1 at 128 rows 24,163 against 30,168.)
# A group of at most SMALL_GROUP_WEIGHTS weight elements (Qwen2.5-1.5B's q/k/v 3.1 M, o 2.4 M; its gate/up 27.5 M,
# down 13.8 M) keeps the one launch up to SMALL_GROUP_MAX_ROWS rows: through cuBLAS its GEMMs are a launch's latency
# each (H200, twentieth session, 64 rows: k and v 6.2 us apiece for 0.8 MB, o 6.6 us), and its LoRA shrink and expand
# two more launches, where the one launch took 10.0 us for q/k/v and 9.7 for o with LoRA (eighteenth session).
# H200, twenty-first session, paired (`bench/rollout.py --ab`): W1 at 64 rows 20,397 -> 22,129 tokens/s, at 128 rows
# 32,744 -> 33,759.
SMALL_GROUP_WEIGHTS = 4 * 2 ** 20
SMALL_GROUP_MAX_ROWS = 128
BLOCK_O = 64
BLOCK_K = 128
NUM_WARPS = 4
NUM_STAGES = 4
WIDE_STAGES = 3  # up to 32 rows with at least one tile per SM (gate/up: 280 tiles, unsplit): 3 programs of 60 KB
# fit an SM where 2 of 80 KB did, so every tile runs at once. H200, 2026-11-28: gate/up 21.8 -> 19.5 us at 6 rows,
# 22.6 -> 20.3 at 32 (bench/kernels.py --only gemv --fused-configs; 64/128/4/3 against 64/128/4/4)
PROGRAMS_PER_SM = 1  # split K until about this many programs per SM
# H200, bench/kernels.py --only gemv (2026-11-27, sixth session), one Qwen2.5-1.5B layer's 4 groups with their
# shrink, us at N = 1 / 6 / 32: 82.7 / 84.4 / 98.0 with these constants (2 programs per SM: 85.2 / 88.0 / 104.1);
# cuBLAS + shrink + expand: 102.1 / 102.0 / 108.1; cuBLAS alone, without LoRA: 57.5 / 56.1 / 55.8
BALANCED_SPLITS = True  # K split so that no SM runs a second program while others idle (nf4_kernels.split_k's
# `balanced`, the shrink's producers counted): a program's speed is its SM's share of the bandwidth, so a launch of
# 144 programs on 132 SMs takes about two programs' time. A 1.5B layer's down projection (24 tiles, K 8960, 35
# producers): 6 -> 4 splits. H200, twenty-sixth session (bench/RESULTS.md, `bench/gemv_latency.py --variants L,-`):
# down with LoRA 15.9 -> 13.7 us at 6 rows, 20.8 -> 15.7 at 32 (without LoRA 15.1 -> 10.5, 17.0 -> 11.3); paired
# (`bench/rollout.py --ab`), W2 bf16 0.991 of the time, W1 at 32 rows 0.981. Without the producers counted (5 splits,
# 155 programs) 14.8 / 19.2 us; the producers widened to fit beside 5 splits 13.1 / 18.9. NF4 launches keep their
# split (two programs an SM, bound by the dequantisation: fewer down splits were slower there).
MIN_K_PER_SPLIT = 1024  # a split reads at least this many columns of K: a Qwen2.5-1.5B layer's q/k/v and o (K 1536)
# run unsplit, its down projection (K 8960) split (BALANCED_SPLITS). The split-K partials' round trip and the wait of a
# tile's last split cost more than the spread over more SMs buys for a few MB of weights. H200, eighteenth session
# (bench/RESULTS.md), per launch with LoRA, 256 -> unsplit: q/k/v 8.2 -> 7.2 us at 6 rows, 10.1 -> 8.4 at 32, 16.8 ->
# 10.0 at 64; o 8.5 -> 6.9, 10.7 -> 8.1, 20.5 -> 9.7 (bench/gemv_latency.py); W1 at 64 rows 16,649-16,778 ->
# 18,811-19,019 tokens/s, W2 unchanged within its noise (0.480-0.489 against 0.477-0.482 s); W1 at 32 rows 12,325 ->
# 12,892 (nineteenth session)
# (BLOCK_O, BLOCK_K, NUM_WARPS, NUM_STAGES) above 32 rows, where x^T is 64 or 128 wide (with MAX_ROWS raised). H200,
# 64 rows (bench/kernels.py --only gemv --fused-configs): 76.0 us a layer; 64/64/4/4 78.2, 64/64/4/3 at 2 programs per
# SM 82.1, 128/128/8/3 83.3, 64/64/8/4 90.7, 128/64/8/3 95.8, 128/64/4/4 107.4
LARGE_CONFIG = (64, 128, 4, 3)
ROWS_PER_PROGRAM = 128  # x's rows a tile program takes (a power of 2, at least 16); more rows than this are spread
# over programs of as many rows each (row tiles), which read the same weights (from the L2 after the first). At 128
# rows a 1.5B layer's q/k/v and o (the one launch up to SMALL_GROUP_MAX_ROWS) are 32 and 24 programs, each reading
# its weights and all of x and doing 128 rows of products: 13.2 and 13.0 us with LoRA (H200, twenty-sixth session).
# Not measured below 128 yet (bench/RESULTS.md's waiting table).
# The LoRA shrink in the group's launch (16-bit and NF4 weights; the module docstring), its producers over
# nf4_kernels.SHRINK_K columns each. H200, 2026-11-28 (bench/RESULTS.md): a Qwen2.5-1.5B layer's 4 groups 69.3 ->
# 55.3 us at N = 6 and 74.1 -> 61.8 at N = 32 (SHRINK_K 256; 128: 57.2 / 63.2; 512: 55.9 / 71.0); W2 0.570 -> 0.487 s.
FUSED_SHRINK = True
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit(do_not_specialize=["N"])  # one compile for every batch (models/nf4_kernels.py's _nf4_gemv_kernel says why)
def _gemv_kernel(x_ptr, w0, w1, w2, bias0, bias1, bias2, la0, la1, la2, lb0, lb1, lb2, y0, y1, y2, s0, s1, s2,
                 o0, o1, o2, end0, end1, xa_ptr, partial_ptr, count_ptr, N, K, R, G, x_row_stride, tiles, producers,
                 row_tiles, K_PER_SPLIT: tl.constexpr, SHRINK_SPLITS: tl.constexpr, SHRINK_K: tl.constexpr,
                 SHRINK_BLOCK_K: tl.constexpr, SHRINK_ROWS: tl.constexpr, HAS_BIAS: tl.constexpr,
                 HAS_LORA: tl.constexpr,
                 BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr,
                 DOT_F32: tl.constexpr, PRECISION: tl.constexpr, SPLITS: tl.constexpr, USE_PDL: tl.constexpr):
    """Program pid of a 1-D grid. The first `producers` programs (G * SHRINK_SPLITS with the shrink fused,
    else none) each publish one split of the LoRA shrink (nf4_kernels.publish_shrink: adapter g's x A_g^T
    over SHRINK_K columns of K for all N <= SHRINK_ROWS rows, into xa_ptr [SHRINK_SPLITS, G, N, R]); program
    producers + r + row_tiles * (tile + s * tiles) computes tile `tile`, split s of K, for rows [r BLOCK_N,
    (r + 1) BLOCK_N) of x (row tile r; one unless the rows are more than a program takes, ROWS_PER_PROGRAM), the
    row tiles of a tile's weights next to each other in the grid. Projection g owns tiles [end_{g-1}, end_g); its
    y_g [N, O_g] is finished by the tile's last split, per row tile (see the module docstring). Without the fused
    shrink, xa_ptr is the shrink's x A_g^T, [G, N, R]. (Producers first: a GPU starts a grid's programs in order,
    Triton's interpreter runs them in order, so a consumer waits only for programs already running.)"""
    wait_for_inputs(USE_PDL)
    pid = tl.program_id(0)
    jobs = tiles * row_tiles  # (tile, row tile) pairs, each finished by its last split
    if pid < producers:
        if SHRINK_SPLITS > 0:
            publish_shrink(pid, x_ptr, x_row_stride, la0, la1, la2, xa_ptr, count_ptr + jobs, G, N, K, R,
                           SHRINK_SPLITS, SHRINK_K, SHRINK_ROWS, BLOCK_R, SHRINK_BLOCK_K, PRECISION)
    else:
        job = (pid - producers) % jobs  # tile * row_tiles + r
        s = (pid - producers) // jobs
        tile = job // row_tiles
        n = (job % row_tiles) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN] rows of x
        n_ok = n < N
        g = tl.where(tile < end0, 0, tl.where(tile < end1, 1, 2))
        start = tl.where(g == 0, 0, tl.where(g == 1, end0, end1))
        w_ptr, O = pick(g, w0, w1, w2), pick(g, o0, o1, o2)
        cols = (tile - start) * BLOCK_O + tl.arange(0, BLOCK_O)  # [BO] output features of projection g
        col_ok = cols < O
        kk = tl.arange(0, BLOCK_K)  # [BK]
        w_rows = w_ptr + cols.to(tl.int64)[:, None] * K  # [BO, 1]
        acc = tl.zeros((BLOCK_O, BLOCK_N), dtype=tl.float32)
        for k0 in range(0, K_PER_SPLIT, BLOCK_K):
            ks = s * K_PER_SPLIT + k0 + kk  # [BK]
            k_ok = ks < K
            w = tl.load(w_rows + ks[None, :], mask=col_ok[:, None] & k_ok[None, :], other=0.0)  # [BO, BK]
            xt = tl.load(x_ptr + n[None, :] * x_row_stride + ks[:, None], mask=n_ok[None, :] & k_ok[:, None],
                         other=0.0)  # [BK, BN] = x^T tile
            if DOT_F32:
                acc = tl.dot(w.to(tl.float32), xt.to(tl.float32), acc, input_precision="ieee")
            else:
                acc = tl.dot(w, xt, acc)
        # the programs that finish projection g's tiles: the readers of its shrink
        jobs_g = row_tiles * tl.where(g == 0, end0, tl.where(g == 1, end1 - end0, tiles - end1))
        end_tile(acc, job, s, jobs, partial_ptr, count_ptr, pick(g, y0, y1, y2),
                 pick(g, bias0, bias1, bias2), xa_ptr, pick(g, lb0, lb1, lb2), pick(g, s0, s1, s2), g, N, O, R,
                 cols, col_ok, n, n_ok, count_ptr + jobs, G, jobs_g, HAS_BIAS, HAS_LORA, BLOCK_R, PRECISION,
                 SHRINK_SPLITS, SPLITS)


def _launch(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor] | None,
            xa: torch.Tensor | None, lora_b: list[torch.Tensor] | None, scales: list[float],
            block_o: int | None = None, block_k: int | None = None, num_warps: int | None = None,
            num_stages: int | None = None, programs_per_sm: int | None = None,
            min_k_per_split: int | None = None, lora_a: list[torch.Tensor] | None = None,
            shrink_k: int | None = None, rows_per_program: int | None = None) -> list[torch.Tensor]:
    """The group's outputs [y_g [N, O_g]]. LoRA: either xa, the shrink's x A_g^T [G, N, R], or lora_a (G
    tensors [R, K], float32 as PEFT's) for the shrink in this launch, shrink_k columns of K per producer.
    The tile options left None are the module's, read at the call: (BLOCK_O, BLOCK_K, NUM_WARPS,
    NUM_STAGES or WIDE_STAGES) up to 32 rows, LARGE_CONFIG above; PROGRAMS_PER_SM, MIN_K_PER_SPLIT,
    ROWS_PER_PROGRAM (a power of 2, at least 16)."""
    N, K = x.shape
    config = (BLOCK_O, BLOCK_K, NUM_WARPS, None) if N <= 32 else LARGE_CONFIG
    block_o, block_k, num_warps, num_stages = (given if given is not None else default for given, default
                                               in zip((block_o, block_k, num_warps, num_stages), config))
    G = len(weights)
    outs = [w.shape[0] for w in weights]
    ys = [torch.empty(N, o, device=x.device, dtype=x.dtype) for o in outs]  # each [N, O_g]
    if N == 0:
        return ys
    ends = list(itertools.accumulate(triton.cdiv(o, block_o) for o in outs))  # each projection's last tile + 1
    tiles = ends[-1]
    all_rows = max(16, triton.next_power_of_2(N))
    block_n = min(all_rows, rows_per_program or ROWS_PER_PROGRAM)  # x's rows a program takes
    row_tiles = triton.cdiv(N, block_n)
    jobs = tiles * row_tiles  # (tile, row tile) pairs
    if num_stages is None:  # up to 32 rows
        num_stages = WIDE_STAGES if jobs >= sm_count(x.device) else NUM_STAGES
    has_lora = xa is not None or lora_a is not None
    R = lora_b[0].shape[1] if has_lora else 0
    xa, shrink_splits, shrink_span = lora_input(x, G, R, xa, lora_a, shrink_k or nf4_kernels.SHRINK_K)
    producers = G * shrink_splits
    splits, per_split = split_k(jobs, K, sm_count(x.device), programs_per_sm or PROGRAMS_PER_SM,
                                min_k_per_split or MIN_K_PER_SPLIT, block_k, BALANCED_SPLITS, producers)
    counts, partial = split_k_workspace(x.device, jobs + G)  # job counters, then the shrink's (1 a projection)
    if splits > 1:
        partial = torch.empty(splits, jobs, block_o, block_n, device=x.device, dtype=torch.float32)
    _gemv_kernel[(producers + jobs * splits,)](
        x, *as_group(weights), *as_group(biases if biases is not None else weights),
        *as_group(lora_a if lora_a is not None else weights), *as_group(lora_b if has_lora else weights),
        *as_group(ys), *as_group(scales), *as_group(outs), *as_group(ends)[:2], xa if has_lora else partial,
        partial, counts, N, K, R, G, x.stride(0), tiles, producers, row_tiles, K_PER_SPLIT=per_split,
        SHRINK_SPLITS=shrink_splits, SHRINK_K=shrink_span, SHRINK_BLOCK_K=nf4_kernels.SHRINK_BLOCK_K,
        SHRINK_ROWS=all_rows,
        HAS_BIAS=biases is not None, HAS_LORA=has_lora, BLOCK_N=block_n, BLOCK_O=block_o, BLOCK_K=block_k,
        BLOCK_R=block_r(R), DOT_F32=INTERPRET or x.dtype == torch.float32,
        PRECISION=lora_kernels.DOT_PRECISION, SPLITS=splits,
        num_warps=num_warps, num_stages=num_stages, **pdl_options(x.device))
    return ys


@torch.library.custom_op("ahazero::lora_gemv", mutates_args=())
def lora_gemv(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], xa: torch.Tensor | None,
              lora_a: list[torch.Tensor], lora_b: list[torch.Tensor], scales: list[float]) -> list[torch.Tensor]:
    """x [N, K] -> [x W_g^T + b_g + s_g * (x A_g^T) B_g^T for each g], each [N, O_g] in x's dtype.
    weights: G <= 3 tensors [O_g, K]; biases: G tensors [O_g], or [] for none; the adapters: lora_a (G
    tensors [R, K], the shrink then runs in this launch) or xa (lora_kernels.lora_shrink's x A_g^T
    [G, N, R], with lora_a []), and lora_b, G tensors [O_g, R]; no adapter: xa None, lora_a and lora_b []."""
    return _launch(x.contiguous(), list(weights), list(biases) or None, xa, list(lora_b) or None, list(scales),
                   lora_a=list(lora_a) or None)


@lora_gemv.register_fake
def _(x, weights, biases, xa, lora_a, lora_b, scales):
    return [x.new_empty(x.shape[0], w.shape[0]) for w in weights]


@torch.library.custom_op("ahazero::nf4_lora_gemv", mutates_args=())
def nf4_lora_gemv(x: torch.Tensor, packed: list[torch.Tensor], absmax_q: list[torch.Tensor],
                  absmax2: list[torch.Tensor], offset: list[torch.Tensor], code: list[torch.Tensor],
                  dyn: list[torch.Tensor], outs: list[int], biases: list[torch.Tensor], xa: torch.Tensor | None,
                  lora_a: list[torch.Tensor], lora_b: list[torch.Tensor], scales: list[float]) -> list[torch.Tensor]:
    """lora_gemv for G <= 3 NF4 weights (models/nf4_kernels.py's NF4Weight fields, one list per field)."""
    fields = zip(packed, absmax_q, absmax2, offset, code, dyn, outs, list(biases) or [None] * len(outs))
    weights = [nf4_kernels.NF4Weight(*f) for f in fields]
    return nf4_kernels.nf4_gemv(x, weights, xa, list(lora_b) or None, list(scales), lora_kernels.DOT_PRECISION,
                                lora_a=list(lora_a) or None)


@nf4_lora_gemv.register_fake
def _(x, packed, absmax_q, absmax2, offset, code, dyn, outs, biases, xa, lora_a, lora_b, scales):
    return [x.new_empty(x.shape[0], o) for o in outs]


def _weight_kind(x: torch.Tensor, projections) -> str | None:
    """"dense" (16/32-bit linears of x's dtype with contiguous weights), "nf4" (4-bit linears that take the
    fused NF4 kernel) or None (not servable): one kind and width, biases on all or none, one LoRA rank."""
    if x.dim() != 2 or not 1 <= len(projections) <= MAX_GROUP:
        return None
    bases = [p.base for p in projections]
    if all(type(b) is nn.Linear and b.weight.dtype == x.dtype and b.weight.is_contiguous() for b in bases):
        kind, max_rows = "dense", MAX_ROWS
        if sum(b.weight.numel() for b in bases) <= SMALL_GROUP_WEIGHTS:
            max_rows = max(max_rows, SMALL_GROUP_MAX_ROWS)
    elif all(type(b) is Linear4bit and b.use_fused_kernel(x.device) for b in bases):
        kind, max_rows = "nf4", nf4_kernels.MAX_ROWS
    else:
        return None
    if x.shape[0] > max_rows:
        return None
    if len({b.bias is None for b in bases}) > 1 or len({b.in_features for b in bases}) > 1:
        return None
    ranks = {None if p.lora_a is None else p.lora_a.shape[0] for p in projections}
    if len(ranks) > 1 or not all(p.lora_b is None or p.lora_b.is_contiguous() for p in projections):
        return None
    return kind


def _run(x: torch.Tensor, kind: str, bases: list[nn.Module], lora_a: list[torch.Tensor], lora_b: list[torch.Tensor],
         scales: list[float]) -> list[torch.Tensor]:
    """The one launch of `kind` over the group's bases, with adapters (lora_a non-empty) the LoRA shrink in
    it (FUSED_SHRINK) or in a launch before it."""
    biases = [] if bases[0].bias is None else [b.bias for b in bases]
    xa = None
    if lora_a and not FUSED_SHRINK:
        xa, lora_a = lora_kernels.lora_shrink(x, lora_a), []  # [G, N, R]
    if kind == "dense":
        return lora_gemv(x, [b.weight for b in bases], biases, xa, lora_a, lora_b, scales)
    ws = [b.nf4_weight() for b in bases]
    return nf4_lora_gemv(x, [w.packed for w in ws], [w.absmax_q for w in ws], [w.absmax2 for w in ws],
                         [w.offset for w in ws], [w.code for w in ws], [w.dyn for w in ws],
                         [b.out_features for b in bases], biases, xa, lora_a, lora_b, scales)


@functools.cache
def checked(device: torch.device, dtype: torch.dtype, kind: str = "dense") -> bool:
    """Once per device, dtype and kind, before the one-launch projections serve: their output on random
    inputs (a q/k/v-like group with biases, LoRA, split K) against PyTorch's math (on the dequantised weights
    for "nf4"). A failure (e.g. a GPU without the shared memory its tiles need) or a mismatch turns that kind
    off for the process with a warning: decode then runs the per-projection path (cuBLAS or the NF4 module's
    kernel) + the LoRA kernels, never a wrong result. (The first call runs eagerly: the CUDA graphs' warm-up.)"""
    gen = torch.Generator(device=device).manual_seed(0)
    N, K, outs, R, scales = 6, 2048, (130, 64), 8, [0.5, 2.0]  # K split in 2 or more (MIN_K_PER_SPLIT)

    def rand(*shape, dt=torch.float32):
        return torch.randn(*shape, device=device, generator=gen).to(dt)

    x = rand(N, K, dt=dtype)  # [N, K]
    bases = [random_linear(K, o, dtype, device, gen) for o in outs]  # (the caller's random state untouched)
    if kind == "nf4":
        bases = [Linear4bit.from_linear(b) for b in bases]
    a, b = [rand(R, K) * K ** -0.5 for _ in outs], [rand(o, R) for o in outs]  # float32, as PEFT's adapters
    try:
        got = _run(x, kind, bases, a, b, scales)
        worst = 0.0
        for g, base in enumerate(bases):
            w = base.dequantized_weight() if kind == "nf4" else base.weight  # [O, K]
            want = ((x.float() @ w.float().t() + base.bias.float()).to(dtype).float()
                    + (x.float() @ a[g].t()) @ b[g].t() * scales[g])  # [N, O]
            worst = max(worst, ((got[g].float() - want).norm() / want.norm()).item())
    except Exception as err:  # noqa: BLE001 - e.g. the kernel does not compile for this GPU
        logger.warning("the one-launch %s projections (engine/gemv_kernels.py) failed on %s (%s: %s); decode "
                       "runs each projection + the LoRA kernels", kind, device, type(err).__name__, err)
        return False
    if not worst < 1e-2:  # the output's rounding gives ~3e-3 in bf16
        logger.warning("the one-launch %s projections disagree with PyTorch on %s (relative error %.2e); decode "
                       "runs each projection + the LoRA kernels", kind, device, worst)
        return False
    return True


def project(x: torch.Tensor, projections, grouped_lora=None) -> list[torch.Tensor] | None:
    """engine/layers.project for a decode batch x [N, in] in (1 + 1) launches: the LoRA shrink (when the
    group has adapters and `grouped_lora` is on), then lora_gemv (16-bit weights) or nf4_lora_gemv (4-bit).
    None where it can't serve (the caller falls back to layers.project)."""
    kind = _weight_kind(x, projections)
    if kind is None or not checked(x.device, x.dtype, kind):
        return None
    with_lora = projections[0].lora_a is not None
    if with_lora and grouped_lora is None:
        return None
    return _run(x, kind, [p.base for p in projections], [p.lora_a for p in projections] if with_lora else [],
                [p.lora_b for p in projections] if with_lora else [], [p.scale for p in projections])
