"""RMSNorm for training that keeps its 16-bit input for the backward instead of a float32 copy.

transformers' RMSNorm (Llama, Mistral, Qwen2, Qwen3) computes in float32 through autograd, which keeps
the float32 copy of its input ([T, H], twice the bytes of the bf16 input) for the backward, per norm,
and records some eight autograd nodes. `_RMSNorm` computes the same forward, op for op (so the output
is bit-identical), keeps the input as it came and the [T, 1] float32 inverse RMS, and computes the
input's gradient in float32 in its backward:
    y = w * round(x * r),  r = 1 / sqrt(mean(x^2) + eps)
    dL/dx = r * (g_n - n * mean(g_n * n)),  n = x * r,  g_n = float(dL/dy * w)
(the rounding to the input dtype passes gradients through unchanged, as autograd's cast does).
Run eagerly (the CPU), the backward goes by slices of BACKWARD_ROWS tokens, so its float32 temporaries
stay small at long sequences (at 4,096 tokens and H = 1,536 a whole float32 [T, H] is 24 MiB, and it
needs several). On CUDA the forward and backward math each run as one compiled kernel (fused_math.py),
which makes no float32 [T, H] temporary, so the backward runs whole: at 16,384 tokens the slices were 17
kernels and 17 copies of their results per norm.
"""
from __future__ import annotations

import functools

import torch

from .fused_math import rms_norm_backward, rms_norm_forward, runs_compiled

BACKWARD_ROWS = 1024  # tokens per slice of the backward (its float32 temporaries are [rows, H])
LEAN_NORM_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})  # the RMSNorm written above


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        y, inv_rms = rms_norm_forward(x, weight, eps)  # [..., H], [..., 1]
        ctx.save_for_backward(x, weight, inv_rms)
        return y

    @staticmethod
    def backward(ctx, grad):
        x, weight, inv_rms = ctx.saved_tensors
        shape, H = x.shape, x.shape[-1]
        x, grad, inv_rms = x.reshape(-1, H), grad.reshape(-1, H), inv_rms.reshape(-1, 1)  # [N, H], [N, 1]
        want_weight = ctx.needs_input_grad[1]
        if runs_compiled(x):  # one compiled kernel, no float32 [N, H] temporaries
            grad_x, grad_weight = rms_norm_backward(x, weight, inv_rms, grad, want_weight)
            return grad_x.view(shape), (grad_weight.to(weight.dtype) if want_weight else None), None
        grad_x = torch.empty_like(x)  # [N, H]
        grad_weight = torch.zeros(H, dtype=torch.float32, device=x.device) if want_weight else None
        for start in range(0, x.shape[0], BACKWARD_ROWS):  # float32 temporaries of BACKWARD_ROWS rows at most
            rows = slice(start, start + BACKWARD_ROWS)
            grad_x[rows], grad_weight_rows = rms_norm_backward(x[rows], weight, inv_rms[rows], grad[rows],
                                                               grad_weight is not None)
            if grad_weight is not None:
                grad_weight += grad_weight_rows  # float32, rounded once, at the end
        grad_weight = None if grad_weight is None else grad_weight.to(weight.dtype)
        return grad_x.view(shape), grad_weight, None


def _lean_forward(norm, hidden_states: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():  # nothing kept: the same forward, without a graph
        return rms_norm_forward(hidden_states, norm.weight, norm.variance_epsilon)[0]
    return _RMSNorm.apply(hidden_states, norm.weight, norm.variance_epsilon)


def lean_rms_norms(model) -> int:
    """Gives every RMSNorm of a Llama/Mistral/Qwen2/Qwen3 model the forward of `_RMSNorm` (in place,
    idempotent). Returns how many norms have it; 0 for other model types."""
    config = getattr(model, "config", None)
    if getattr(config, "model_type", None) not in LEAN_NORM_MODEL_TYPES:
        return 0
    count = 0
    for module in model.modules():
        if type(module).__name__.endswith("RMSNorm") and hasattr(module, "variance_epsilon"):
            if "forward" not in module.__dict__:
                module.forward = functools.partial(_lean_forward, module)
            count += 1
    return count
