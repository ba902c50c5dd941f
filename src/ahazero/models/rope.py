"""Rotary position embedding for training in one Triton launch per tensor and pass, rounded as eager is.

transformers' `apply_rotary_pos_emb` (Llama, Mistral, Qwen2, Qwen3) computes q * cos + rotate_half(q) * sin
in eight kernels per tensor (the halves' slices, a negation, a cat, two products, a sum) and its backward in
as many; at 8 x 16,384 tokens of Qwen2.5-1.5B they took about 0.28 s of a 5.7 s training step (H100,
2026-11-28, bench/RESULTS.md tenth session). Here each pass is one kernel that reads the tensor once and
writes it once. It rounds where eager rounds, so its bf16 output is bit-identical to transformers':
  forward,  x = (x1, x2) its halves:  out1 = r(r(x1 c1) - r(x2 s1)),  out2 = r(r(x2 c2) + r(x1 s2))
  backward, g = (g1, g2):             dx1 = r(r(g1 c1) + r(g2 s2)),   dx2 = r(r(g2 c2) - r(g1 s1))
r() the rounding to bf16, each product computed in float32 (as PyTorch's bf16 multiply does). The backward
is autograd's through eager (the products by cos and sin, the cat's and the negation's backward, the two
paths' sum) written out. Other dtypes keep transformers' function: float32 (the compiler may contract a
product and a sum into one FMA, and little is gained), and float16, whose roundings through `.to(tl.float16)`
differed from eager's by one unit in about a quarter of the elements on an H100 (2026-11-28, not chased).

`fast_rope(model)` installs it on the attention modules of one model: each one's forward runs with its
modeling module's `apply_rotary_pos_emb` pointing at `apply_rotary_pos_emb` below for the duration of the
call, so other models of the process are untouched. Cases it does not cover (cos/sin that need a
gradient or of another dtype or shape, a CPU tensor outside the tests' interpreter) go to the original.
kernel -> launcher -> autograd Function. Without a GPU the kernel runs in Triton's interpreter
(TRITON_INTERPRET=1), as the tests do.
"""
from __future__ import annotations

import functools
import os
import sys

import torch
import triton
import triton.language as tl

# The CPU runs the kernel only where a test turns this on (under Triton's interpreter, slow): elsewhere on
# the CPU transformers' function is the fast one.
ON_CPU_IN_INTERPRETER = False
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
ROPE_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})  # q * cos + rotate_half(q) * sin
BLOCK_ROWS = 16  # (position, head) rows per program


@triton.jit
def _round(v):
    """float32 v rounded to bf16 (to nearest, ties to even), as float32, by its bits: Triton's interpreter
    truncates in `.to(tl.bfloat16)`, and the tests compare with eager bit for bit."""
    bits = v.to(tl.uint32, bitcast=True)
    bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
    return tl.where(v != v, v, bits.to(tl.float32, bitcast=True))  # a NaN stays NaN


@triton.jit(do_not_specialize=["rows", "T"])  # a batch's length changes every step: one compile
def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, rows, H, T, sx_b, sx_h, sx_t, so_b, so_h, so_t, sc_b, sc_t,
                 HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_ROWS: tl.constexpr, BACKWARD: tl.constexpr):
    """Rows in (batch, position, head) order, head fastest; x, out [B, H, T, D] strided (D contiguous);
    cos, sin [B, T, D] (sc_b 0: one row for all). BACKWARD: x is the output's gradient and out the input's."""
    r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)  # [BR]
    h = r % H
    t = (r // H) % T
    b = r // (H * T)
    row_ok = r < rows
    d = tl.arange(0, BLOCK_HALF)  # [BD]
    ok = row_ok[:, None] & (d[None, :] < HALF)  # [BR, BD]
    x_at = x_ptr + (b * sx_b + h * sx_h + t * sx_t).to(tl.int64)[:, None] + d[None, :]
    c_at = (b * sc_b + t * sc_t).to(tl.int64)[:, None] + d[None, :]
    dtype = x_ptr.dtype.element_ty
    x1 = tl.load(x_at, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(x_at + HALF, mask=ok, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + c_at, mask=ok, other=0.0).to(tl.float32)
    c2 = tl.load(cos_ptr + c_at + HALF, mask=ok, other=0.0).to(tl.float32)
    s1 = tl.load(sin_ptr + c_at, mask=ok, other=0.0).to(tl.float32)
    s2 = tl.load(sin_ptr + c_at + HALF, mask=ok, other=0.0).to(tl.float32)
    a1 = _round(x1 * c1)
    a2 = _round(x2 * c2)
    if BACKWARD:
        y1 = a1 + _round(x2 * s2)
        y2 = a2 - _round(x1 * s1)
    else:
        y1 = a1 - _round(x2 * s1)
        y2 = a2 + _round(x1 * s2)
    out_at = out_ptr + (b * so_b + h * so_h + t * so_t).to(tl.int64)[:, None] + d[None, :]
    tl.store(out_at, _round(y1).to(dtype), mask=ok)  # (the float32 sum rounded, as eager's add; the cast exact)
    tl.store(out_at + HALF, _round(y2).to(dtype), mask=ok)


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backward: bool) -> torch.Tensor:
    """x [B, H, T, D] (D contiguous), cos and sin [B or 1, T, D] -> the rotated x (backward: its gradient's),
    laid out as x."""
    B, H, T, D = x.shape
    out = torch.empty_like(x)  # [B, H, T, D], x's strides
    rows = B * H * T
    if rows:
        _rope_kernel[(triton.cdiv(rows, BLOCK_ROWS),)](
            x, cos, sin, out, rows, H, T, *(x.stride()[:3]), *(out.stride()[:3]),
            cos.stride(0) if cos.shape[0] == B else 0, cos.stride(1),  # (one batch row of positions for all)
            HALF=D // 2, BLOCK_HALF=triton.next_power_of_2(D // 2), BLOCK_ROWS=BLOCK_ROWS, BACKWARD=backward,
            num_warps=4)
    return out


class _Rope(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, cos, sin):
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin, backward=False)

    @staticmethod
    def backward(ctx, grad):
        cos, sin = ctx.saved_tensors
        return _rotate(grad if grad.stride(-1) == 1 else grad.contiguous(), cos, sin, backward=True), None, None


def covers(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, unsqueeze_dim: int) -> bool:
    """Whether the kernel computes this call: bf16 q and k [B, H, T, D] and cos, sin [B or 1, T, D] of their
    dtype, no gradient for cos and sin, D even and contiguous, on CUDA (or the CPU under the interpreter,
    where a test asks)."""
    tensors = (q, k, cos, sin)
    if unsqueeze_dim != 1 or q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or cos.shape != sin.shape \
            or cos.stride() != sin.stride():
        return False
    if q.dtype != torch.bfloat16 or any(t.dtype != q.dtype for t in tensors):
        return False
    on_cpu = INTERPRET and ON_CPU_IN_INTERPRETER and q.device.type == "cpu"
    if not (q.is_cuda or on_cpu) or any(t.device != q.device for t in tensors):
        return False
    B, _, T, D = q.shape
    if D % 2 or cos.shape[1:] != (T, D) or cos.shape[0] not in (1, B) or k.shape[0] != B or k.shape[2:] != (T, D):
        return False
    return not (cos.requires_grad or sin.requires_grad) and all(t.stride(-1) == 1 for t in tensors)


def apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim=1, *, original=None):
    """transformers' `apply_rotary_pos_emb(q, k, cos, sin, unsqueeze_dim)`, through the kernel where it
    covers the call, else through `original`."""
    if not covers(q, k, cos, sin, unsqueeze_dim):
        return original(q, k, cos, sin, unsqueeze_dim)
    if torch.is_grad_enabled() and (q.requires_grad or k.requires_grad):
        return _Rope.apply(q, cos, sin), _Rope.apply(k, cos, sin)
    return _rotate(q, cos, sin, backward=False), _rotate(k, cos, sin, backward=False)


def _forward_with_fast_rope(attention, *args, **kwargs):
    modeling = sys.modules[type(attention).__module__]
    original = modeling.apply_rotary_pos_emb
    modeling.apply_rotary_pos_emb = functools.partial(apply_rotary_pos_emb, original=original)
    try:
        return type(attention).forward(attention, *args, **kwargs)
    finally:
        modeling.apply_rotary_pos_emb = original


def fast_rope(model) -> int:
    """Gives the attention modules of a Llama/Mistral/Qwen2/Qwen3 model (transformers' classes, whose
    modeling module calls its `apply_rotary_pos_emb`) the kernel, in place and idempotent. Returns how many
    modules have it; 0 for other model types."""
    if getattr(getattr(model, "config", None), "model_type", None) not in ROPE_MODEL_TYPES:
        return 0
    count = 0
    for module in model.modules():
        modeling = sys.modules.get(type(module).__module__)
        if not type(module).__name__.endswith("Attention") or not hasattr(modeling, "apply_rotary_pos_emb"):
            continue
        if "forward" not in module.__dict__:
            module.forward = functools.partial(_forward_with_fast_rope, module)
        count += 1
    return count
