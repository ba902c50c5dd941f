"""LoRA through PEFT: attaching adapters and choosing which one a forward pass uses."""
from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext

import torch
import torch.nn.functional as F


def is_peft_model(model) -> bool:
    from peft import PeftModel
    return isinstance(model, PeftModel)


@contextmanager
def adapter_context(model, adapter: str | None):
    """Run the block with PEFT adapter `adapter` active; None disables adapters (the base model).

    Restores the previously active adapter and every parameter's `requires_grad` afterwards, so a
    generation with another adapter never changes what the trainer trains.
    """
    if not is_peft_model(model):
        if adapter not in (None, "default"):
            raise ValueError(f"adapter {adapter!r} requested but the model has no LoRA adapters")
        yield model
        return
    if adapter is None:
        with model.disable_adapter():
            yield model
        return
    if adapter not in model.peft_config:
        raise ValueError(f"unknown adapter {adapter!r}; loaded: {sorted(model.peft_config)}")
    previous = model.active_adapter
    if adapter == previous:
        yield model
        return
    grad_flags = {name: p.requires_grad for name, p in model.named_parameters()}
    model.set_adapter(adapter)
    try:
        yield model
    finally:
        model.set_adapter(previous)
        for name, p in model.named_parameters():
            p.requires_grad_(grad_flags[name])


def base_model_context(model):
    """Adapters off when the model has any (the reference policy of the KL term)."""
    return model.disable_adapter() if is_peft_model(model) else nullcontext()


def decoder_and_head(model) -> tuple[torch.nn.Module, torch.nn.Module]:
    """The decoder stack (returns last hidden states) and the lm_head of a (PEFT-wrapped) causal LM."""
    causal_lm = model.get_base_model() if is_peft_model(model) else model
    decoder = getattr(causal_lm, causal_lm.base_model_prefix, None)
    if decoder is None or not hasattr(causal_lm, "lm_head"):
        raise TypeError(f"{type(causal_lm).__name__} is not a decoder-only causal LM with an lm_head")
    return decoder, causal_lm.lm_head


def fuse_lora_forwards(model) -> int:
    """Gives each PEFT LoRA Linear of `model` the forward `_fused_lora_forward` (in place, idempotent;
    its modules, weights and state dict stay as they are). Returns how many layers have it."""
    from peft.tuners.lora.layer import Linear as LoraLinear
    fused = 0
    for module in model.modules():
        if type(module) is LoraLinear:  # subclasses (bnb, DoRA variants...) keep PEFT's forward
            if "forward" not in module.__dict__:
                module.forward = functools.partial(_fused_lora_forward, module)
            fused += 1
    return fused


def _fused_lora_forward(module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
    """y = base(x) + s * (x A^T) B^T in the base output's dtype, the add and the scale in one addmm.

    PEFT's forward casts x to the adapters' dtype (float32), keeps that copy for the backward, and adds the
    scaled float32 product in separate kernels; on a 16-bit model that is most of a training step's LoRA
    cost. Here the float32 adapter weights are cast to the compute dtype for the products (mixed precision,
    as TRL's bf16=True and Unsloth run LoRA; gradients still reach the float32 weights), and autograd keeps
    only x and the [.., r] product. Anything but plain LoRA with one active adapter (adapters off or
    merged, several adapters, mixed batches, DoRA and other variants, a LoRA bias) takes PEFT's forward."""
    adapters = module.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    if (args or kwargs or module.disable_adapters or module.merged or name not in module.lora_A
            or name in getattr(module, "lora_variant", {}) or module.use_dora.get(name, False)
            or module.lora_B[name].bias is not None):
        return type(module).forward(module, x, *args, **kwargs)
    result = module.base_layer(x)  # [..., out]
    dtype = result.dtype
    a, b = module.lora_A[name].weight, module.lora_B[name].weight  # [r, in], [out, r]
    shrunk = F.linear(module.lora_dropout[name](x).to(dtype), a.to(dtype))  # [..., r]
    out = torch.addmm(result.reshape(-1, result.shape[-1]), shrunk.reshape(-1, shrunk.shape[-1]), b.to(dtype).t(),
                      alpha=module.scaling[name])  # [N, out]
    return out.view(result.shape)
