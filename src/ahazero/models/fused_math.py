"""The elementwise math of the training step's norms and SwiGLU, each compiled to one fused kernel on CUDA.

Written in plain PyTorch, op for op as transformers computes it (the CPU runs these functions as they
are, and the CPU tests compare them with transformers). On CUDA each goes through torch.compile
(dynamic shapes, one compilation per dtype): Inductor fuses the float32 upcast, the reductions and the
products into one or two kernels, which read the 16-bit inputs once instead of writing and reading a
float32 [T, H] copy per op. At 4,170 tokens per layer pass, RMSNorm's eight kernels move about 230 MB
and SwiGLU's backward five more [T, I] tensors than it needs. A compilation that fails falls back to
these functions as they are, with one warning.
"""
from __future__ import annotations

import functools
import os
import warnings

import torch
import torch.nn.functional as F

COMPILE = os.environ.get("AHAZERO_COMPILE_FUSED", "1") != "0"


def runs_compiled(t: torch.Tensor) -> bool:
    """Whether a `cuda_compiled` function given `t` first runs its compiled kernel (unless compiling failed)."""
    return COMPILE and t.is_cuda


def cuda_compiled(fn):
    """`fn` compiled with torch.compile where its first argument is on CUDA; as it is elsewhere."""
    compiled = None

    @functools.wraps(fn)
    def run(*args):
        nonlocal compiled
        if not runs_compiled(args[0]):
            return fn(*args)
        if compiled is None:
            compiled = torch.compile(fn, dynamic=True, fullgraph=True)
        try:
            return compiled(*args)
        except Exception as err:  # noqa: BLE001 - any compile failure: the plain function from now on
            if torch.cuda.is_current_stream_capturing():
                raise
            compiled = fn
            warnings.warn(f"ahazero: torch.compile of {fn.__name__} failed ({type(err).__name__}: {err}); "
                          "it runs unfused", stacklevel=2)
            return fn(*args)

    return run


@cuda_compiled
def rms_norm_forward(x: torch.Tensor, weight: torch.Tensor, eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' RMSNorm: y = w * round(x r), r = 1 / sqrt(mean(x^2) + eps). x [..., H] ->
    (y [..., H] in x's dtype times w's, r [..., 1] float32)."""
    x32 = x.to(torch.float32)  # [..., H]
    inv_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
    return weight * (x32 * inv_rms).to(x.dtype), inv_rms


@cuda_compiled
def rms_norm_backward(x: torch.Tensor, weight: torch.Tensor, inv_rms: torch.Tensor, grad: torch.Tensor,
                      with_weight: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """dL/dx [n, H] (x's dtype) and, with_weight, dL/dw summed over the n rows [H] (float32) of
    `rms_norm_forward`: dL/dx = r (g_n - n mean(g_n n)), n = x r, g_n = float(dL/dy w);
    dL/dw = sum(dL/dy round(n))."""
    normed = x.to(torch.float32) * inv_rms  # [n, H]
    grad_normed = (grad * weight).to(torch.float32)  # [n, H]
    grad_x = inv_rms * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
    if not with_weight:  # a frozen norm (LoRA): no [n, H] product and column sum for nothing
        return grad_x.to(x.dtype), None
    grad_weight = (grad * normed.to(x.dtype)).to(torch.float32).sum(0)  # [H], products rounded as autograd's
    return grad_x.to(x.dtype), grad_weight


@cuda_compiled
def swiglu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up [t, I]."""
    return F.silu(gate) * up


@cuda_compiled
def swiglu_backward_(grad: torch.Tensor, gate: torch.Tensor, up: torch.Tensor) -> None:
    """`swiglu`'s backward from dL/d(silu(gate) up) [t, I], written over its inputs: gate becomes dL/dgate
    and up dL/dup; silu(gate) is recomputed, not kept. Compiled, it is one kernel that reads each element
    of grad, gate and up and writes gate's and up's back (no [t, I] tensor is made)."""
    grad_gate, grad_up = torch.ops.aten.silu_backward(grad * up, gate), grad * F.silu(gate)
    gate.copy_(grad_gate)
    up.copy_(grad_up)
