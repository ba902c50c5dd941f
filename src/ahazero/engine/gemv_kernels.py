"""A decode step's projections in one launch per group: y_g = x W_g^T (+ b_g) (+ s_g (x A_g^T) B_g^T).

At decode batch sizes a projection is a GEMV: its time is the bytes of W read, plus a launch. The engine
otherwise launches, per group of projections that read one input (q/k/v; o; gate/up; down), one cuBLAS
GEMM per projection, the LoRA shrink and the LoRA expand (engine/lora_kernels.py); at W2's batch of 6 on
an H100 the shrink and expand alone took 35% of a step's GPU time, each launch a few microseconds of
latency over a few KB of work (bench/RESULTS.md, 2026-11-27). Here one launch reads every weight of the
group and adds the LoRA term in its epilogue, so a group costs two launches (the shrink, then this).

Program (column tile, split of K): acc^T [BLOCK_O, BLOCK_N] = W_g[cols, ks] @ x[:, ks]^T over its K range,
the weight tile the MMA's A operand (BLOCK_O >= 64 rows fills Hopper's wgmma) and x, padded to BLOCK_N
rows, the small B operand. Tiles run over the group's projections one after another (the first
cdiv(O_0, BLOCK_O) tiles are projection 0's, and so on), so one grid covers q, k and v. K is split until
about PROGRAMS_PER_SM programs per SM (a down projection has only 24 tiles of 64 rows); each split stores
its float32 partial and bumps its tile's counter, and the last split of a tile to arrive adds the
partials in split order (deterministic) and finishes the tile (models/nf4_kernels.py's split_k_sum):
  y = (acc + bias) rounded to x's dtype                         (cuBLAS's rounding: one, after the bias)
  y = (y + s * (xa @ B^T)) rounded, xa = x A^T from the LoRA shrink, in float32
     (engine/lora_kernels.py's expand, the same math: PEFT's float32 adapter, one rounding of y)

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

from ..models.nf4_kernels import sm_count, split_k, split_k_sum, split_k_workspace
from . import lora_kernels

logger = logging.getLogger("ahazero")

MAX_ROWS = 32  # batches above this go to cuBLAS + the LoRA kernels (a GEMM, no longer a GEMV)
MAX_GROUP = lora_kernels.MAX_GROUP
BLOCK_O = 64
BLOCK_K = 128
NUM_WARPS = 4
NUM_STAGES = 4
PROGRAMS_PER_SM = 1  # split K until about this many programs per SM
# H200, bench/kernels.py --only gemv (2026-11-27, sixth session), one Qwen2.5-1.5B layer's 4 groups with their
# shrink, us at N = 1 / 6 / 32: 82.7 / 84.4 / 98.0 with these constants (2 programs per SM: 85.2 / 88.0 / 104.1);
# cuBLAS + shrink + expand: 102.1 / 102.0 / 108.1; cuBLAS alone, without LoRA: 57.5 / 56.1 / 55.8
MIN_K_PER_SPLIT = 256
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def _gemv_kernel(x_ptr, w0, w1, w2, bias0, bias1, bias2, lb0, lb1, lb2, y0, y1, y2, s0, s1, s2, o0, o1, o2,
                 end0, end1, xa_ptr, partial_ptr, count_ptr, N, K, R, x_row_stride,
                 K_PER_SPLIT: tl.constexpr,
                 HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr,
                 BLOCK_K: tl.constexpr, BLOCK_R: tl.constexpr, DOT_F32: tl.constexpr, PRECISION: tl.constexpr):
    """Program (tile, split s). Projection g owns tiles [end_{g-1}, end_g); its y_g [N, O_g] is finished
    by the tile's last split (see the module docstring). xa_ptr: the LoRA shrink's x A_g^T, [G, N, R]."""
    tile = tl.program_id(0)
    s = tl.program_id(1)
    g = tl.where(tile < end0, 0, tl.where(tile < end1, 1, 2))
    start = tl.where(g == 0, 0, tl.where(g == 1, end0, end1))
    w_ptr, bias_ptr = lora_kernels._pick(g, w0, w1, w2), lora_kernels._pick(g, bias0, bias1, bias2)
    b_ptr, y_ptr = lora_kernels._pick(g, lb0, lb1, lb2), lora_kernels._pick(g, y0, y1, y2)
    scale, O = lora_kernels._pick(g, s0, s1, s2), lora_kernels._pick(g, o0, o1, o2)
    cols = (tile - start) * BLOCK_O + tl.arange(0, BLOCK_O)  # [BO] output features of projection g
    col_ok = cols < O
    n = tl.arange(0, BLOCK_N)  # [BN] rows of x
    n_ok = n < N
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

    ok = col_ok[:, None] & n_ok[None, :]
    S = tl.num_programs(1)
    done = S == 1
    if S > 1:  # partials [S, tiles, BLOCK_O, BLOCK_N]
        tile_at = tl.arange(0, BLOCK_O)[:, None] * BLOCK_N + n[None, :]  # [BO, BN]
        tile_size = BLOCK_O * BLOCK_N
        done, acc = split_k_sum(acc, partial_ptr + tile * tile_size + tile_at, tl.num_programs(0) * tile_size, ok,
                                s, S, count_ptr + tile)
    if done:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[:, None]
        y = acc.to(y_ptr.dtype.element_ty)  # [BO, BN]
        if HAS_LORA:
            ranks = tl.arange(0, BLOCK_R)  # [BR]
            xa = tl.load(xa_ptr + (g * N + n[None, :]) * R + ranks[:, None], mask=(ranks[:, None] < R) & n_ok[None, :],
                         other=0.0)  # [BR, BN] = (x A_g^T)^T
            b = tl.load(b_ptr + cols[:, None] * R + ranks[None, :], mask=col_ok[:, None] & (ranks[None, :] < R),
                        other=0.0)  # [BO, BR]
            delta = tl.dot(b.to(tl.float32), xa, input_precision=PRECISION)  # [BO, BN]
            y = (y.to(tl.float32) + scale * delta).to(y_ptr.dtype.element_ty)
        tl.store(y_ptr + n[None, :] * O + cols[:, None], y, mask=ok)


def _launch(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor] | None,
            xa: torch.Tensor | None, lora_b: list[torch.Tensor] | None, scales: list[float],
            block_o: int = BLOCK_O, block_k: int = BLOCK_K, num_warps: int = NUM_WARPS,
            num_stages: int = NUM_STAGES, programs_per_sm: int = PROGRAMS_PER_SM,
            min_k_per_split: int = MIN_K_PER_SPLIT) -> list[torch.Tensor]:
    N, K = x.shape
    G = len(weights)
    outs = [w.shape[0] for w in weights]
    ys = [torch.empty(N, o, device=x.device, dtype=x.dtype) for o in outs]  # each [N, O_g]
    if N == 0:
        return ys
    ends = list(itertools.accumulate(triton.cdiv(o, block_o) for o in outs))  # each projection's last tile + 1
    tiles = ends[-1]
    ends = ends + [tiles] * (MAX_GROUP - len(ends))
    splits, per_split = split_k(tiles, K, sm_count(x.device), programs_per_sm, min_k_per_split, block_k)
    block_n = max(16, triton.next_power_of_2(N))
    counts, partial = split_k_workspace(x.device, tiles)
    if splits > 1:
        partial = torch.empty(splits, tiles, block_o, block_n, device=x.device, dtype=torch.float32)
    pad = MAX_GROUP - G

    def padded(ts):
        return list(ts) + [ts[0]] * pad

    has_lora = xa is not None
    R = lora_b[0].shape[1] if has_lora else 0
    _gemv_kernel[(tiles, splits)](
        x, *padded(weights), *padded(biases if biases is not None else weights),
        *padded(lora_b if has_lora else weights), *padded(ys), *(list(scales) + [0.0] * pad),
        *(outs + [0] * pad), ends[0], ends[1], xa if has_lora else partial, partial, counts,
        N, K, R, x.stride(0), K_PER_SPLIT=per_split,
        HAS_BIAS=biases is not None, HAS_LORA=has_lora, BLOCK_N=block_n, BLOCK_O=block_o, BLOCK_K=block_k,
        BLOCK_R=lora_kernels._block_r(R), DOT_F32=INTERPRET or x.dtype == torch.float32,
        PRECISION=lora_kernels.DOT_PRECISION,
        num_warps=num_warps, num_stages=num_stages)
    return ys


@torch.library.custom_op("ahazero::lora_gemv", mutates_args=())
def lora_gemv(x: torch.Tensor, weights: list[torch.Tensor], biases: list[torch.Tensor], xa: torch.Tensor | None,
              lora_b: list[torch.Tensor], scales: list[float]) -> list[torch.Tensor]:
    """x [N, K] -> [x W_g^T + b_g + s_g * xa_g B_g^T for each g], each [N, O_g] in x's dtype.
    weights: G <= 3 tensors [O_g, K]; biases: G tensors [O_g], or [] for none; xa: lora_kernels.lora_shrink's
    x A_g^T [G, N, R], or None with lora_b [] for no adapter; lora_b: G tensors [O_g, R]."""
    return _launch(x.contiguous(), list(weights), list(biases) or None, xa, list(lora_b) or None, list(scales))


@lora_gemv.register_fake
def _(x, weights, biases, xa, lora_b, scales):
    return [x.new_empty(x.shape[0], w.shape[0]) for w in weights]


def _servable(x: torch.Tensor, projections) -> bool:
    """Plain 16/32-bit linears of x's dtype with contiguous weights, biases on all or none, one LoRA rank."""
    if x.dim() != 2 or x.shape[0] > MAX_ROWS or not 1 <= len(projections) <= MAX_GROUP:
        return False
    bases = [p.base for p in projections]
    if any(type(b) is not nn.Linear or b.weight.dtype != x.dtype or not b.weight.is_contiguous() for b in bases):
        return False
    if len({b.bias is None for b in bases}) > 1 or len({b.in_features for b in bases}) > 1:
        return False
    ranks = {None if p.lora_a is None else p.lora_a.shape[0] for p in projections}
    return len(ranks) == 1 and all(p.lora_b is None or p.lora_b.is_contiguous() for p in projections)


@functools.cache
def checked(device: torch.device, dtype: torch.dtype) -> bool:
    """Once per device and dtype, before lora_gemv serves: its output on random inputs (a q/k/v-like group
    with biases, LoRA, split K) against PyTorch's math. A failure (e.g. a GPU without the shared memory
    its tiles need) or a mismatch turns it off for the process with a warning: decode then runs cuBLAS
    + the LoRA kernels, never a wrong result. (The first call runs eagerly: the CUDA graphs' warm-up.)"""
    gen = torch.Generator(device=device).manual_seed(0)
    N, K, outs, R = 6, 1024, (130, 64), 8

    def rand(*shape, dt=torch.float32):
        return torch.randn(*shape, device=device, generator=gen).to(dt)

    x = rand(N, K, dt=dtype)  # [N, K]
    weights = [rand(o, K, dt=dtype) * K ** -0.5 for o in outs]  # each [O, K]
    biases = [rand(o, dt=dtype) for o in outs]
    a, b = [rand(R, K) * K ** -0.5 for _ in outs], [rand(o, R) for o in outs]  # float32, as PEFT's adapters
    try:
        got = _launch(x, weights, biases, lora_kernels.lora_shrink(x, a), b, [0.5, 2.0])
        worst = 0.0
        for g, w in enumerate(weights):
            want = ((x.float() @ w.float().t() + biases[g].float()).to(dtype).float()
                    + (x.float() @ a[g].t()) @ b[g].t() * [0.5, 2.0][g])  # [N, O]
            worst = max(worst, ((got[g].float() - want).norm() / want.norm()).item())
    except Exception as err:  # noqa: BLE001 - e.g. the kernel does not compile for this GPU
        logger.warning("the one-launch projections (engine/gemv_kernels.py) failed on %s (%s: %s); decode uses "
                       "cuBLAS + the LoRA kernels", device, type(err).__name__, err)
        return False
    if not worst < 1e-2:  # the output's rounding gives ~3e-3 in bf16
        logger.warning("the one-launch projections disagree with PyTorch on %s (relative error %.2e); decode "
                       "uses cuBLAS + the LoRA kernels", device, worst)
        return False
    return True


def project(x: torch.Tensor, projections, grouped_lora=None) -> list[torch.Tensor] | None:
    """engine/layers.project for a decode batch x [N, in] in (1 + 1) launches: the LoRA shrink (when the
    group has adapters and `grouped_lora` is on), then lora_gemv. None where it can't serve (the caller
    falls back to layers.project)."""
    if not _servable(x, projections) or not checked(x.device, x.dtype):
        return None
    with_lora = projections[0].lora_a is not None
    if with_lora and grouped_lora is None:
        return None
    bases = [p.base for p in projections]
    biases = [] if bases[0].bias is None else [b.bias for b in bases]
    xa = lora_kernels.lora_shrink(x, [p.lora_a for p in projections]) if with_lora else None  # [G, N, R]
    return lora_gemv(x, [b.weight for b in bases], biases, xa,
                     [p.lora_b for p in projections] if with_lora else [], [p.scale for p in projections])
