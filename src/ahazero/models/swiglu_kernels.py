"""The MLP tiles' SwiGLU with the gate's and up's LoRA terms added inside it, forward and backward (Triton).

models/tiled_mlp.py computes a tile's gate = x W_g^T + S_g B_g^T with S_g = x (sA_g)^T [t, r], the same for
up, then silu(gate) * up. Each LoRA term added by `addmm_` into its [t, I] product is a GEMM of inner size r
that reads and writes the whole [t, I] tensor: memory-bound, about as long as the SwiGLU itself (H100,
8 x 16,384 tokens on Qwen2.5-1.5B: 0.20 s of a 5.0 s step for these adds and the backward's down-projection
one, bench/RESULTS.md twelfth session). Here the kernel that reads gate and up anyway makes the [BM, BN]
block of S B^T with one `tl.dot` of inner size r and adds it before the SwiGLU (a 1,024-token tile on an
H200: 24.5 + 41.9 us forward + backward against 51.0 + 43.4 through `addmm_`, bench/swiglu.py):

  forward:  hidden = silu(g') u',  g' = round(gate + S_g B_g^T),  u' = round(up + S_u B_u^T)
  backward: gh = round(grad_hidden + dS_d (sA_d)),  then over gate and up (their base products):
            gate := gh u' sigma(g') (1 + g' (1 - sigma(g'))),  up := gh silu(g')

`round` is the cast to the tensors' 16-bit dtype that the `addmm_` path makes, so the results are those of
`lora_add_` + fused_math's `swiglu` / `swiglu_backward_` up to the order of the r-term sums (float32). The
backward recomputes g' and u' from the base products, so the forward writes only hidden. 16-bit tensors on
CUDA; the CPU runs them in Triton's interpreter where a test asks (`ON_CPU_IN_INTERPRETER`).
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

ON_CPU_IN_INTERPRETER = False
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
# (BLOCK_M tokens, BLOCK_N intermediate features per program, warps) of each kernel: bench/swiglu.py times
# them (H200, thirteenth session, 1,024-token tiles: 24.5 / 41.9 us forward / backward, against 29.8 / 47.1
# at 64/128/8 and 51.0 / 43.4 through addmm_ + the compiled SwiGLU; bench/RESULTS.md)
FORWARD_CONFIG = (64, 64, 4)
BACKWARD_CONFIG = (64, 64, 4)


@triton.jit
def _with_lora(base_ptr, s_ptr, s_stride, b_ptr, b_stride_r, b_stride_n, rows, row_ok, cols, col_ok, I, R,
               BLOCK_R: tl.constexpr, DOT_F32: tl.constexpr):
    """round(base + S B^T) for the block [BM, BN], in float32: the base [M, I] contiguous in its 16-bit dtype,
    S [M, R] (row stride s_stride), B^T's element (r, n) at b_ptr + r * b_stride_r + n * b_stride_n; rows and
    cols are the block's offsets from the pointers (int32)."""
    ok = row_ok[:, None] & col_ok[None, :]
    base = tl.load(base_ptr + rows[:, None] * I + cols[None, :], mask=ok, other=0.0).to(tl.float32)  # [BM, BN]
    rr = tl.arange(0, BLOCK_R)  # [BR]
    r_ok = rr < R
    s = tl.load(s_ptr + rows[:, None] * s_stride + rr[None, :], mask=row_ok[:, None] & r_ok[None, :],
                other=0.0)  # [BM, BR]
    b = tl.load(b_ptr + rr[:, None] * b_stride_r + cols[None, :] * b_stride_n,
                mask=r_ok[:, None] & col_ok[None, :], other=0.0)  # [BR, BN]
    if DOT_F32:  # the interpreter's dot is wrong for 16-bit inputs
        total = base + tl.dot(s.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    else:
        total = base + tl.dot(s, b)
    return total.to(base_ptr.dtype.element_ty).to(tl.float32)


@triton.jit(do_not_specialize=["M"])  # M, a batch's tokens, changes every step: one compile
def _swiglu_lora_kernel(gate_ptr, up_ptr, hidden_ptr, sg_ptr, sg_stride, bg_ptr, bg_stride_r, bg_stride_n,
                        su_ptr, su_stride, bu_ptr, bu_stride_r, bu_stride_n, M, I, R,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                        DOT_F32: tl.constexpr):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M  # the block's first row: the pointers start there
    gate_ptr, up_ptr, hidden_ptr = gate_ptr + row0 * I, up_ptr + row0 * I, hidden_ptr + row0 * I
    sg_ptr, su_ptr = sg_ptr + row0 * sg_stride, su_ptr + row0 * su_stride
    rows = tl.arange(0, BLOCK_M)  # [BM]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_ok, col_ok = rows < M - row0, cols < I
    g = _with_lora(gate_ptr, sg_ptr, sg_stride, bg_ptr, bg_stride_r, bg_stride_n, rows, row_ok, cols, col_ok,
                   I, R, BLOCK_R, DOT_F32)
    u = _with_lora(up_ptr, su_ptr, su_stride, bu_ptr, bu_stride_r, bu_stride_n, rows, row_ok, cols, col_ok,
                   I, R, BLOCK_R, DOT_F32)
    hidden = g / (1.0 + tl.exp(-g)) * u
    tl.store(hidden_ptr + rows[:, None] * I + cols[None, :], hidden.to(hidden_ptr.dtype.element_ty),
             mask=row_ok[:, None] & col_ok[None, :])


@triton.jit(do_not_specialize=["M"])
def _swiglu_lora_backward_kernel(grad_ptr, gate_ptr, up_ptr, sg_ptr, sg_stride, bg_ptr, bg_stride_r, bg_stride_n,
                                 su_ptr, su_stride, bu_ptr, bu_stride_r, bu_stride_n,
                                 gsd_ptr, gsd_stride, ad_ptr, ad_stride_r, ad_stride_n, M, I, R,
                                 BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                                 DOT_F32: tl.constexpr):
    row0 = tl.program_id(0).to(tl.int64) * BLOCK_M  # the block's first row: the pointers start there
    grad_ptr, gate_ptr, up_ptr = grad_ptr + row0 * I, gate_ptr + row0 * I, up_ptr + row0 * I
    sg_ptr, su_ptr, gsd_ptr = sg_ptr + row0 * sg_stride, su_ptr + row0 * su_stride, gsd_ptr + row0 * gsd_stride
    rows = tl.arange(0, BLOCK_M)  # [BM]
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # [BN]
    row_ok, col_ok = rows < M - row0, cols < I
    gh = _with_lora(grad_ptr, gsd_ptr, gsd_stride, ad_ptr, ad_stride_r, ad_stride_n, rows, row_ok, cols, col_ok,
                    I, R, BLOCK_R, DOT_F32)
    g = _with_lora(gate_ptr, sg_ptr, sg_stride, bg_ptr, bg_stride_r, bg_stride_n, rows, row_ok, cols, col_ok,
                   I, R, BLOCK_R, DOT_F32)
    u = _with_lora(up_ptr, su_ptr, su_stride, bu_ptr, bu_stride_r, bu_stride_n, rows, row_ok, cols, col_ok,
                   I, R, BLOCK_R, DOT_F32)
    sig = 1.0 / (1.0 + tl.exp(-g))
    grad_gate = gh * u * sig * (1.0 + g * (1.0 - sig))
    grad_up = gh * g * sig
    where = rows[:, None] * I + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    tl.store(gate_ptr + where, grad_gate.to(gate_ptr.dtype.element_ty), mask=ok)
    tl.store(up_ptr + where, grad_up.to(up_ptr.dtype.element_ty), mask=ok)


def covers(x: torch.Tensor) -> bool:
    """Whether the kernels compute the SwiGLU of a tile whose input is x: a 16-bit tensor on CUDA (or on the
    CPU under the interpreter, where a test asks)."""
    on_cpu = INTERPRET and ON_CPU_IN_INTERPRETER and x.device.type == "cpu"
    return (x.is_cuda or on_cpu) and x.dtype in (torch.bfloat16, torch.float16)


def _lora_args(shrunk: torch.Tensor, b_t: torch.Tensor) -> tuple:
    """S [M, R] (rows contiguous) and B^T [R, I] (any strides) as the kernels take them."""
    assert shrunk.stride(1) == 1
    return shrunk, shrunk.stride(0), b_t, b_t.stride(0), b_t.stride(1)


def _launch(kernel, config: tuple[int, int, int], M: int, I: int, R: int, *args) -> None:
    block_m, block_n, num_warps = config
    kernel[triton.cdiv(M, block_m), triton.cdiv(I, block_n)](
        *args, M, I, R, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_R=_block_r(R), DOT_F32=INTERPRET,
        num_warps=num_warps)


def _block_r(R: int) -> int:
    return max(16, triton.next_power_of_2(R))


def swiglu_lora(gate: torch.Tensor, up: torch.Tensor, gate_lora: tuple, up_lora: tuple) -> torch.Tensor:
    """silu(gate + S_g B_g^T) * (up + S_u B_u^T) [M, I], each sum rounded to the 16-bit dtype. gate, up [M, I]
    contiguous (the bases' products); gate_lora, up_lora = (S [M, R], B [I, R]) in gate's dtype."""
    M, I = gate.shape
    hidden = torch.empty_like(gate)  # [M, I]
    (s_gate, b_gate), (s_up, b_up) = gate_lora, up_lora
    R = s_gate.shape[1]
    if M:
        _launch(_swiglu_lora_kernel, FORWARD_CONFIG, M, I, R, gate, up, hidden, *_lora_args(s_gate, b_gate.t()),
                *_lora_args(s_up, b_up.t()))
    return hidden


def swiglu_lora_backward_(grad_hidden: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, gate_lora: tuple,
                          up_lora: tuple, down_lora_grad: tuple) -> None:
    """`swiglu_lora`'s backward, written over gate and up (they become dL/dgate, dL/dup [M, I]). grad_hidden
    [M, I] is the down projection's base part, g W_d; down_lora_grad = (dS_d [M, R], sA_d [R, I]) adds its
    LoRA part dS_d (sA_d) inside (rounded as `addmm_` would)."""
    M, I = gate.shape
    (s_gate, b_gate), (s_up, b_up), (grad_shrunk_down, a_down) = gate_lora, up_lora, down_lora_grad
    R = s_gate.shape[1]
    assert grad_hidden.is_contiguous() and gate.is_contiguous() and up.is_contiguous()
    if M:
        _launch(_swiglu_lora_backward_kernel, BACKWARD_CONFIG, M, I, R, grad_hidden, gate, up,
                *_lora_args(s_gate, b_gate.t()), *_lora_args(s_up, b_up.t()), *_lora_args(grad_shrunk_down, a_down))
