"""RMSNorm for training that keeps its 16-bit input for the backward instead of a float32 copy.

transformers' RMSNorm (Llama, Mistral, Qwen2, Qwen3) computes in float32 through autograd, which keeps
the float32 copy of its input ([T, H], twice the bytes of the bf16 input) for the backward, per norm,
and records some eight autograd nodes. `_RMSNorm` computes the same forward, op for op (so the output
is bit-identical), keeps the input as it came and the [T, 1] float32 inverse RMS, and computes the
input's gradient in float32 in its backward:
    y = w * round(x * r),  r = 1 / sqrt(mean(x^2) + eps)
    dL/dx = r * (g_n - n * mean(g_n * n)),  n = x * r,  g_n = float(dL/dy * w)
(the rounding to the input dtype passes gradients through unchanged, as autograd's cast does).
"""
from __future__ import annotations

import functools

import torch

LEAN_NORM_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})  # the RMSNorm written above


class _RMSNorm(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, eps: float):
        x32 = x.to(torch.float32)  # [..., H]
        inv_rms = torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)  # [..., 1]
        ctx.save_for_backward(x, weight, inv_rms)
        return weight * (x32 * inv_rms).to(x.dtype)

    @staticmethod
    def backward(ctx, grad):
        x, weight, inv_rms = ctx.saved_tensors
        normed = x.to(torch.float32) * inv_rms  # [..., H]
        grad_normed = (grad * weight).to(torch.float32)  # [..., H]
        grad_x = inv_rms * (grad_normed - normed * (grad_normed * normed).mean(-1, keepdim=True))
        grad_weight = None
        if ctx.needs_input_grad[1]:
            grad_weight = (grad * normed.to(x.dtype)).reshape(-1, grad.shape[-1]).sum(0).to(weight.dtype)
        return grad_x.to(x.dtype), grad_weight, None


def _lean_forward(norm, hidden_states: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():  # nothing kept: transformers' own forward
        return type(norm).forward(norm, hidden_states)
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
