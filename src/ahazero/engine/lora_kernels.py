"""Grouped unmerged LoRA in two Triton launches (punica's shrink/expand, as vLLM does it).

The projections that read one input (q/k/v; gate/up) apply their adapters together:
  shrink:  xa[g] = x @ A_g^T                  x [N, K], A_g [r, K]        -> xa [G, N, r] float32
  expand:  y_g = y_g + s_g * xa[g] @ B_g^T    B_g [out_g, r], y_g [N, out_g], updated in place
instead of 2 GEMMs and 3 casts per projection. PEFT's math: the adapter runs in float32 (dots to float32
accuracy, DOT_PRECISION below), y is read, added to and rounded back to its dtype once. The shrink splits
K over S programs so a small batch still fills the GPU: each split stores its partial sums and bumps its
row block's counter, and the last split to arrive adds the S partials in split order (deterministic) into
xa, as models/nf4_kernels.py does. (Until 2026-11-27, sixth session, the expand added the S partials
itself, in every one of its programs: at W1's batch of 128 on an H200 it took 16.4 us a call, 28% of the
step's GPU time, bench/RESULTS.md.) In a decode batch on a GPU the shrink and the group's base GEMMs after
its first run on side streams beside that first GEMM, and the gate/up group's expand runs inside SiLU * up
(`lora_expand_silu_mul`): SHRINK_BESIDE_BASES, BASES_BESIDE and EXPAND_IN_SILU_MUL below.
kernel -> launcher -> torch.library custom op (one opaque op for torch.compile and CUDA graphs).
Without a GPU the same kernels run in Triton's interpreter (TRITON_INTERPRET=1), as the tests do.
"""
from __future__ import annotations

from typing import Callable

import torch
import triton
import triton.language as tl

from ..models.nf4_kernels import (as_group, block_r, last_to_arrive, pdl_options, pick, shrink_sum,
                                  split_k_workspace, wait_for_inputs)
from .fused_kernels import silu_mul_values

BLOCK_N = 16  # rows per program: small batches are the point, and a row block re-reads A and B from L2
# The shrink is latency-bound at decode sizes (A is 32 x 1536 to 32 x 8960, x a few rows): its time is
# the serial K loop of one program, so K is split finely and each program does one tile. H100, 2026-11-27,
# bench/kernels.py, one Qwen2.5-1.5B layer's 4 groups at N = 6: 99.7 us with SPLIT_K 512 and 4 warps
# (then 44% of a W2 decode step), 42.1 us as below; torch's F.linear + addmm: 149.3 us.
SPLIT_K = 64  # the shrink's K per program at decode sizes (a multiple of SHRINK_BLOCK_K)
# Above DECODE_ROWS rows (a prefill) the row blocks fill the GPU and the partial sums [S, G, N, R] grow with N
# (16,384 prompt tokens at K = 8960: 293 MiB with SPLIT_K, 38 MiB with PREFILL_SPLIT_K), so K splits coarsely.
DECODE_ROWS = 256
PREFILL_SPLIT_K = 512
# The float32 dots: "tf32x3" (three TF32 products on the tensor cores: bf16 x is exact in TF32, A and B keep
# ~21 of their 24 mantissa bits) or "ieee" (FMAs on the CUDA cores). PEFT's float32 matmul on cuBLAS is
# bit-equal to neither (another summation order). H200, 2026-11-27, sixth session (bench/RESULTS.md): x A^T
# within 3.5e-7 (relative) of cuBLAS's float32 with tf32x3, 3.3e-7 with ieee; shrink + expand of a layer 34.2
# against 44.5 us at N = 6 and 48.7 against 92.0 at N = 128; W1 29,205 against 22,854 tokens/s, W2 0.577
# against 0.647 s. (The interpreter ignores the precision: float32 either way.)
DOT_PRECISION = "tf32x3"
SHRINK_BLOCK_K = 64
SHRINK_WARPS = 2
EXPAND_BLOCK_O = 128
EXPAND_WARPS = 4
# The shrink reads only x, so on a GPU it runs on a side stream beside the group's base GEMMs (cuBLAS, where the
# one-launch projections of engine/gemv_kernels.py do not serve: above its MAX_ROWS rows, SMALL_GROUP_MAX_ROWS for
# groups of few weights), and the expand waits for both. Decode batches only (up to DECODE_ROWS rows): a prefill's
# GEMMs fill the GPU, and the memory the side stream's allocations leave cached (a long prefill's partial sums: tens
# of MiB) serves no other stream.
# H200, twentieth session (bench/RESULTS.md): W1 at 64 rows through cuBLAS 18,199 -> 18,933 tokens/s (paired), at
# 128 rows unchanged (29,544 -> 29,637), where the shrink took 7.8 us and the expand 10.1 us a group.
SHRINK_BESIDE_BASES = True
# And the group's other base GEMMs (k and v; up) run on a second side stream beside its first (q; gate) where there
# are several 16-bit ones (BASES_BESIDE; a 4-bit base dequantises its weight into a temporary, which would be made
# twice at once): cuBLAS then keeps a workspace for that stream too (32 MiB on Hopper). H200, twentieth session,
# paired: W1 30,231 -> 32,321 tokens/s at 128 rows, 18,554 -> 20,296 at 64.
BASES_BESIDE = True
# Where cuBLAS runs the gate/up group, its expand is done in the SiLU * up launch (`grouped_lora_silu_mul`): one
# launch a layer fewer, and gate and up are not written out and read back. H200, twentieth session, paired: W1
# 30,795 -> 31,406 tokens/s at 128 rows, 19,193 -> 19,440 at 64.
EXPAND_IN_SILU_MUL = True
_side_streams: dict[torch.device, tuple[torch.cuda.Stream, torch.cuda.Stream]] = {}


@triton.jit(do_not_specialize=["N"])  # N, the tokens of a prefill or the rows of a batch: one compile
def _shrink_kernel(x_ptr, a0, a1, a2, partial_ptr, count_ptr, out_ptr, N, K, R, stride_x,
                   K_PER_SPLIT: tl.constexpr, SPLITS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                   BLOCK_K: tl.constexpr, PRECISION: tl.constexpr, USE_PDL: tl.constexpr):
    """Program (row block, adapter g, split s): the partial x[rows, ks] @ A_g[:, ks]^T; the row block's last
    split to arrive writes out[g, rows, :], the sum of the SPLITS partials in split order."""
    wait_for_inputs(USE_PDL)
    pid_n, g, s = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    G = tl.num_programs(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    ranks = tl.arange(0, BLOCK_R)  # [BR]
    acc = shrink_sum(x_ptr, stride_x, pick(g, a0, a1, a2), rows, ranks, s * K_PER_SPLIT, N, K, R, K_PER_SPLIT,
                     BLOCK_K, PRECISION)
    at = (g * N + rows[:, None]) * R + ranks[None, :]  # [BN, BR] into [G, N, R]
    mask = (rows[:, None] < N) & (ranks[None, :] < R)
    if SPLITS == 1:
        tl.store(out_ptr + at, acc, mask=mask)
    else:
        tl.store(partial_ptr + s * G * N * R + at, acc, mask=mask)
        counter = count_ptr + pid_n * G + g
        if last_to_arrive(counter, SPLITS):  # the row block's last split: add the partials in split order
            total = tl.zeros((BLOCK_N, BLOCK_R), dtype=tl.float32)
            for t in tl.static_range(SPLITS):  # unrolled: the loads are in flight together
                total += tl.load(partial_ptr + t * G * N * R + at, mask=mask, other=0.0, cache_modifier=".cg")
            tl.store(out_ptr + at, total, mask=mask)
            tl.store(counter, 0)  # ready for the next launch


@triton.jit
def _expanded_tile(xa_ptr, b_ptr, y_ptr, scale, rows, cols, ranks, N, O, R, PRECISION: tl.constexpr):
    """(y[rows, cols] + scale * xa[rows] @ B[cols]^T rounded to y's dtype [BN, BO], its offsets, its mask): the
    expand's math for one tile, xa [N, R] float32, B [O, R], y [N, O]. Shared by both expand kernels."""
    xa_mask = (rows[:, None] < N) & (ranks[None, :] < R)
    xa = tl.load(xa_ptr + rows[:, None] * R + ranks[None, :], mask=xa_mask, other=0.0)  # [BN, BR]
    b_mask = (cols[None, :] < O) & (ranks[:, None] < R)
    b = tl.load(b_ptr + cols[None, :] * R + ranks[:, None], mask=b_mask, other=0.0)  # [BR, BO] = B^T tile
    delta = tl.dot(xa, b.to(tl.float32), input_precision=PRECISION)  # [BN, BO]
    y_mask = (rows[:, None] < N) & (cols[None, :] < O)
    y_at = rows[:, None] * O + cols[None, :]  # [BN, BO]
    y = tl.load(y_ptr + y_at, mask=y_mask, other=0.0).to(tl.float32)
    return (y + scale * delta).to(y_ptr.dtype.element_ty), y_at, y_mask


@triton.jit(do_not_specialize=["N"])
def _expand_kernel(xa_ptr, b0, b1, b2, y0, y1, y2, s0, s1, s2, o0, o1, o2, N, R,
                   BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr, PRECISION: tl.constexpr,
                   USE_PDL: tl.constexpr):
    """Program (row block, column block, adapter g): y_g[rows, cols] += s_g * xa[g, rows] @ B_g[cols]^T."""
    wait_for_inputs(USE_PDL)
    pid_n, pid_o, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    y_ptr = pick(g, y0, y1, y2)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    cols = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)  # [BO]
    y, y_at, y_mask = _expanded_tile(xa_ptr + g * N * R, pick(g, b0, b1, b2), y_ptr, pick(g, s0, s1, s2), rows,
                                     cols, tl.arange(0, BLOCK_R), N, pick(g, o0, o1, o2), R, PRECISION)
    tl.store(y_ptr + y_at, y, mask=y_mask)


@triton.jit(do_not_specialize=["N"])
def _expand_silu_mul_kernel(xa_ptr, bg_ptr, bu_ptr, gate_ptr, up_ptr, out_ptr, sg, su, N, I, R,
                            BLOCK_N: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
                            PRECISION: tl.constexpr, USE_PDL: tl.constexpr):
    """Program (row block, column block): out = silu(g) * u over its tile, g = gate + sg * xa[0] Bg^T and
    u = up + su * xa[1] Bu^T: `_expand_kernel`'s tiles of the gate/up group, then engine/fused_kernels.py's
    silu_mul, without writing g and u out in between."""
    wait_for_inputs(USE_PDL)
    pid_n, pid_o = tl.program_id(0), tl.program_id(1)
    rows = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    cols = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)  # [BO]
    ranks = tl.arange(0, BLOCK_R)  # [BR]
    g, y_at, y_mask = _expanded_tile(xa_ptr, bg_ptr, gate_ptr, sg, rows, cols, ranks, N, I, R, PRECISION)
    u, _, _ = _expanded_tile(xa_ptr + N * R, bu_ptr, up_ptr, su, rows, cols, ranks, N, I, R, PRECISION)
    tl.store(out_ptr + y_at, silu_mul_values(g, u, out_ptr.dtype.element_ty), mask=y_mask)


def split_k_for(N: int) -> int:
    return SPLIT_K if N <= DECODE_ROWS else PREFILL_SPLIT_K


def num_splits(K: int, N: int) -> int:
    return triton.cdiv(K, split_k_for(N))


def _shrink(x: torch.Tensor, a: list[torch.Tensor], split_k: int | None = None, block_k: int = SHRINK_BLOCK_K,
            num_warps: int = SHRINK_WARPS, precision: str | None = None, block_n: int = BLOCK_N) -> torch.Tensor:
    """x [N, K], a: G tensors [R, K] -> xa [G, N, R] float32, xa[g] = x @ A_g^T."""
    N, K = x.shape
    split_k = split_k or split_k_for(N)
    if split_k % block_k:
        raise ValueError(f"split_k ({split_k}) must be a multiple of block_k ({block_k})")
    G, R = len(a), a[0].shape[0]
    splits = triton.cdiv(K, split_k)
    row_blocks = triton.cdiv(N, block_n)
    out = torch.empty(G, N, R, device=x.device, dtype=torch.float32)  # [G, N, R]
    counts, partial = split_k_workspace(x.device, row_blocks * G)
    if splits > 1:
        partial = torch.empty(splits, G, N, R, device=x.device, dtype=torch.float32)  # [S, G, N, R]
    _shrink_kernel[(row_blocks, G, splits)](x, *as_group(a), partial, counts, out, N, K, R, x.stride(0), split_k,
                                            splits,
                                            BLOCK_N=block_n, BLOCK_R=block_r(R), BLOCK_K=block_k,
                                            PRECISION=precision or DOT_PRECISION, num_warps=num_warps,
                                            **pdl_options(x.device))
    return out


def _expand_add(xa: torch.Tensor, b: list[torch.Tensor], y: list[torch.Tensor], scales: list[float],
                block_o: int = EXPAND_BLOCK_O, num_warps: int = EXPAND_WARPS, precision: str | None = None,
                block_n: int = BLOCK_N) -> None:
    """xa [G, N, R]; b: G tensors [O_g, R]; y: G tensors [N, O_g], updated in place."""
    G, N, R = xa.shape
    outs = [t.shape[1] for t in y]
    grid = (triton.cdiv(N, block_n), triton.cdiv(max(outs), block_o), G)
    _expand_kernel[grid](xa, *as_group(b), *as_group(y), *as_group(scales), *as_group(outs), N, R,
                         BLOCK_N=block_n, BLOCK_O=block_o, BLOCK_R=block_r(R),
                         PRECISION=precision or DOT_PRECISION, num_warps=num_warps, **pdl_options(xa.device))


@torch.library.custom_op("ahazero::lora_shrink", mutates_args=())
def lora_shrink(x: torch.Tensor, a: list[torch.Tensor]) -> torch.Tensor:
    return _shrink(x, list(a))


@lora_shrink.register_fake
def _(x, a):
    return x.new_empty((len(a), x.shape[0], a[0].shape[0]), dtype=torch.float32)


@torch.library.custom_op("ahazero::lora_expand_add", mutates_args=("y",))
def lora_expand_add(xa: torch.Tensor, b: list[torch.Tensor], y: list[torch.Tensor], scales: list[float]) -> None:
    _expand_add(xa, list(b), list(y), list(scales))


@torch.library.custom_op("ahazero::lora_expand_silu_mul", mutates_args=())
def lora_expand_silu_mul(xa: torch.Tensor, b: list[torch.Tensor], gate: torch.Tensor, up: torch.Tensor,
                         scales: list[float]) -> torch.Tensor:
    """silu(gate + s_0 xa[0] B_0^T) * (up + s_1 xa[1] B_1^T) [N, I], each sum rounded to gate's dtype: the gate/up
    group's expand and engine/fused_kernels.silu_mul in one launch. xa [2, N, R]; b: 2 tensors [I, R]; gate, up
    [N, I], the base outputs."""
    N, I = gate.shape
    R = xa.shape[2]
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    grid = (triton.cdiv(N, BLOCK_N), triton.cdiv(I, EXPAND_BLOCK_O))
    _expand_silu_mul_kernel[grid](xa, b[0], b[1], gate, up, out, scales[0], scales[1], N, I, R,
                                  BLOCK_N=BLOCK_N, BLOCK_O=EXPAND_BLOCK_O, BLOCK_R=block_r(R),
                                  PRECISION=DOT_PRECISION, num_warps=EXPAND_WARPS, **pdl_options(xa.device))
    return out


@lora_expand_silu_mul.register_fake
def _(xa, b, gate, up, scales):
    return torch.empty_like(gate)


def side_streams(device: torch.device) -> tuple[torch.cuda.Stream, torch.cuda.Stream]:
    """(the shrinks' side stream, the other bases' side stream) of `device`, made once: a stream cuBLAS has run on
    keeps its workspace for the life of the process."""
    if device not in _side_streams:
        _side_streams[device] = (torch.cuda.Stream(device), torch.cuda.Stream(device))
    return _side_streams[device]


def grouped_lora(x: torch.Tensor, projections, base: Callable) -> list[torch.Tensor]:
    """The group's outputs: each projection p's base output `base(p, x)` [N, out_i] plus its LoRA term
    s_i * (x A_i^T) B_i^T, added in place. x: [N, in]."""
    xa, ys = _shrink_beside(x, projections, base)
    lora_expand_add(xa, [p.lora_b for p in projections], ys, [p.scale for p in projections])
    return ys


def grouped_lora_silu_mul(x: torch.Tensor, gate_up, base: Callable) -> torch.Tensor:
    """silu(gate) * up [N, I] for the (gate, up) projections `gate_up` of x [N, in], `base(p, x)` their base
    outputs: `grouped_lora` then fused_kernels.silu_mul, with the expand and SiLU * up in one launch
    (EXPAND_IN_SILU_MUL)."""
    xa, (gate, up) = _shrink_beside(x, gate_up, base)
    return lora_expand_silu_mul(xa, [p.lora_b for p in gate_up], gate, up, [p.scale for p in gate_up])


def _shrink_beside(x: torch.Tensor, projections, base: Callable):
    """(the shrink x A_i^T [G, N, r], [base(p, x) for each projection p]). In a decode batch on a GPU the shrink
    runs on a side stream (SHRINK_BESIDE_BASES) and the bases after the first on another (BASES_BESIDE) while
    the first base runs, each forked from and joined back to the current stream, so the order of everything
    else, and a CUDA graph captured from it, stays as before. Memory a side stream allocates (xa, the other
    bases' outputs) is freed on the current stream; its next use on that side stream waits for the current
    stream again, so it is never overwritten while read."""
    a = [p.lora_a for p in projections]
    beside = (SHRINK_BESIDE_BASES and x.is_cuda and x.shape[0] <= DECODE_ROWS
              and not torch.compiler.is_compiling())
    if not beside:
        return lora_shrink(x, a), [base(p, x) for p in projections]
    main = torch.cuda.current_stream(x.device)
    shrink_side, bases_side = side_streams(x.device)
    shrink_side.wait_stream(main)
    with torch.cuda.stream(shrink_side):
        xa = lora_shrink(x, a)  # [G, N, r]
    others_beside = (BASES_BESIDE and len(projections) > 1
                     and all(type(p.base) is torch.nn.Linear for p in projections))
    if others_beside:
        bases_side.wait_stream(main)
        with torch.cuda.stream(bases_side):
            others = [base(p, x) for p in projections[1:]]
        ys = [base(projections[0], x)] + others
        main.wait_stream(bases_side)
    else:
        ys = [base(p, x) for p in projections]
    main.wait_stream(shrink_side)
    return xa, ys
