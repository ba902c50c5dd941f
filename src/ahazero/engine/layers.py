"""The building blocks of our forward: linear + unmerged LoRA, RMSNorm, RoPE, all reading live parameters.

The math is transformers' module math (and PEFT's for LoRA), so the engine's log-probs match the
trainer's; only the order of a few float operations differs (LoRA's scale is folded into one addmm).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class UnsupportedModule(Exception):
    """The model holds a module our forward cannot run (the engine then falls back to transformers)."""


@dataclass(frozen=True, eq=False)
class Projection:
    """A linear layer, plus one LoRA adapter applied unmerged: y = base(x) + s * (x A^T) B^T.

    `base` is the model's own module (nn.Linear, or a quantised linear that we call as a module);
    `lora_a` [r, in] and `lora_b` [out, r] are the PEFT adapter's live parameters, never copies, so an
    optimizer step is seen by the next call.
    """
    base: nn.Module
    lora_a: torch.Tensor | None = None
    lora_b: torch.Tensor | None = None
    scale: float = 1.0

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = _base_linear(self.base, x)  # [N, out]
        if self.lora_a is None:
            return y
        xa = F.linear(x.to(self.lora_a.dtype), self.lora_a)  # [N, r]
        out = torch.addmm(y.to(self.lora_b.dtype), xa, self.lora_b.t(), alpha=self.scale)  # [N, out]
        return out.to(y.dtype)

    def tensors(self) -> list[torch.Tensor]:
        """Every tensor this projection reads (to notice when a parameter is re-allocated)."""
        return [t for t in (getattr(self.base, "weight", None), getattr(self.base, "bias", None),
                            self.lora_a, self.lora_b) if t is not None]


def project(x: torch.Tensor, projections: tuple[Projection, ...], grouped_lora=None) -> list[torch.Tensor]:
    """Every projection of one input x [N, in] -> [N, out_i]. With `grouped_lora` (engine/lora_kernels.py)
    their adapters run in two launches for the whole group instead of two GEMMs and three casts each."""
    if grouped_lora is None or lora_rank(projections) is None:
        return [p(x) for p in projections]
    # each [N, out_i] = base(x) + s_i * (x A_i^T) B_i^T
    return grouped_lora(x, projections, base_output)


def lora_rank(projections: tuple[Projection, ...]) -> int | None:
    """The adapters' rank when every projection has an adapter and they share it (grouped LoRA serves them)."""
    ranks = {None if p.lora_a is None else p.lora_a.shape[0] for p in projections}
    return ranks.pop() if len(ranks) == 1 else None


def base_output(p: Projection, x: torch.Tensor) -> torch.Tensor:
    """The projection's base layer on x [N, in], without its adapter: [N, out]."""
    return _base_linear(p.base, x)


def _base_linear(base: nn.Module, x: torch.Tensor) -> torch.Tensor:
    if type(base) is nn.Linear:
        return F.linear(x, base.weight, base.bias)
    return base(x)  # a quantised linear (e.g. bitsandbytes 4-bit): its own kernel, its own weights


def unwrap_saved(module: nn.Module, adapter: str | None) -> nn.Module:
    """PEFT's `modules_to_save` wrapper holds a trained copy per adapter: the one `adapter` uses."""
    from peft.utils import ModulesToSaveWrapper
    if not isinstance(module, ModulesToSaveWrapper):
        return module
    if adapter is not None and adapter in module.modules_to_save:
        return module.modules_to_save[adapter]
    return module.original_module


def projection(module: nn.Module, adapter: str | None) -> Projection:
    """The Projection for `module` (a linear, maybe PEFT-wrapped) with `adapter` on, or off for None."""
    from peft.tuners.lora import LoraLayer
    module = unwrap_saved(module, adapter)
    if not isinstance(module, LoraLayer):
        return Projection(module)
    if getattr(module, "merged", False) or getattr(module, "merged_adapters", []):
        raise UnsupportedModule("PEFT adapters are merged into the base weights; unmerge them first")
    base = module.get_base_layer()
    if adapter is None or adapter not in module.lora_A:
        return Projection(base)
    if adapter in getattr(module, "lora_variant", {}) or getattr(module, "use_dora", {}).get(adapter, False):
        raise UnsupportedModule(f"LoRA variant (e.g. DoRA) in adapter {adapter!r}")
    lora_a, lora_b = module.lora_A[adapter], module.lora_B[adapter]
    if not isinstance(lora_a, nn.Linear) or lora_b.bias is not None:
        raise UnsupportedModule(f"LoRA adapter {adapter!r} on {type(base).__name__} with a bias or non-linear A")
    return Projection(base, lora_a.weight, lora_b.weight, float(module.scaling[adapter]))


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """transformers' LlamaRMSNorm: normalise in float32, cast back, then scale. x: [..., H]."""
    dtype = x.dtype
    x = x.float()
    variance = x.pow(2).mean(-1, keepdim=True)  # [..., 1]
    x = x * torch.rsqrt(variance + eps)
    return weight * x.to(dtype)


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [N, heads, D]; cos, sin: [N, 1, D] (the table rows of each token's position)."""
    return x * cos + rotate_half(x) * sin


def embedding_weight(module: nn.Module, adapter: str | None) -> torch.Tensor:
    """The embedding matrix [V, H]; LoRA on embeddings is not supported."""
    from peft.tuners.lora import LoraLayer
    module = unwrap_saved(module, adapter)
    if isinstance(module, LoraLayer) or type(module) is not nn.Embedding:
        raise UnsupportedModule(f"embedding module {type(module).__name__}")
    return module.weight
