"""LoRA through PEFT: attaching adapters and choosing which one a forward pass uses."""
from __future__ import annotations

import functools
from contextlib import contextmanager, nullcontext

import torch


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
    """y = base(x) + s * (x A^T) B^T in the base output's dtype (`_LoraAdd`).

    PEFT's forward casts x to the adapters' dtype (float32), keeps that copy for the backward, and adds the
    scaled float32 product in separate kernels; on a 16-bit model that is most of a training step's LoRA
    cost. Here the float32 adapter weights are cast to the compute dtype for the products (mixed precision,
    as TRL's bf16=True and Unsloth run LoRA; gradients still reach the float32 weights), and autograd keeps
    only x and the [.., r] product. Anything but plain LoRA with one active adapter (adapters off or
    merged, several adapters, mixed batches, DoRA and other variants, a LoRA bias) takes PEFT's forward."""
    name = plain_lora_adapter(module)
    if args or kwargs or name is None:
        return type(module).forward(module, x, *args, **kwargs)
    base = module.base_layer
    if _plain_frozen_linear(base, x) and not isinstance(module.lora_dropout[name], torch.nn.Dropout):
        return _LoraLinear.apply(x, base.weight, base.bias, module.lora_A[name].weight, module.lora_B[name].weight,
                                 module.scaling[name])
    result = base(x)  # [..., out]
    return _LoraAdd.apply(result, module.lora_dropout[name](x), module.lora_A[name].weight,
                          module.lora_B[name].weight, module.scaling[name])


def has_fused_forward(module) -> bool:
    """Whether `fuse_lora_forwards` gave this LoRA layer `_fused_lora_forward`."""
    forward = module.__dict__.get("forward")
    return isinstance(forward, functools.partial) and forward.func is _fused_lora_forward


def plain_lora_adapter(module) -> str | None:
    """The active adapter of a PEFT LoRA Linear when it computes plain LoRA, `base(x) + s * (x A^T) B^T` with
    one active adapter, no DoRA or other variant and no LoRA bias (adapters on, not merged); else None."""
    adapters = module.active_adapters
    name = adapters[0] if len(adapters) == 1 else None
    if (module.disable_adapters or module.merged or name not in module.lora_A
            or name in getattr(module, "lora_variant", {}) or module.use_dora.get(name, False)
            or module.lora_B[name].bias is not None):
        return None
    return name


class _LoraAdd(torch.autograd.Function):
    """result + (x (sA)^T) B^T as one autograd node (`lora_add_` forward, `lora_backward` backward). The
    adapters [r, in] and [out, r] (float32 parameters) are cast to result's dtype inside (`cast_adapters`,
    the scale s folded into A's cast), the product S = x (sA)^T [N, r] is kept with x for the backward, and
    the add is addmm_'s, into result itself (the base layer's fresh output, which nothing keeps: an op that
    saved it would fail its backward on the version check); s is applied to dA in its cast back to float32,
    so no operation is spent on it."""

    @staticmethod
    def forward(ctx, result, x, a, b, scaling: float):
        dtype = result.dtype
        x_2d = x.reshape(-1, x.shape[-1]).to(dtype)  # [N, in]
        a_scaled, b_cast = cast_adapters(a, b, scaling, dtype)  # [r, in], [out, r]
        if _addable_in_place(result):
            ctx.mark_dirty(result)
            out = result
        else:
            out = result.clone(memory_format=torch.contiguous_format)  # [..., out], a new tensor
        shrunk = lora_add_(out.view(-1, out.shape[-1]), x_2d, a_scaled, b_cast)  # [N, r]
        ctx.save_for_backward(x_2d, shrunk, a_scaled, b_cast)
        ctx.scaling, ctx.x_shape, ctx.x_dtype, ctx.a_dtype, ctx.b_dtype = scaling, x.shape, x.dtype, a.dtype, b.dtype
        return out

    @staticmethod
    def backward(ctx, grad):
        x_2d, shrunk, a_scaled, b_cast = ctx.saved_tensors
        grad_x, grad_a, grad_b = lora_backward(grad.reshape(-1, grad.shape[-1]), x_2d, shrunk, a_scaled, b_cast,
                                               *ctx.needs_input_grad[1:4])
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape).to(ctx.x_dtype)  # [..., in]
        return grad, grad_x, *_adapter_grads(ctx, grad_a, grad_b), None


def _plain_frozen_linear(base, x: torch.Tensor) -> bool:
    """Whether `_LoraLinear` may compute the base layer's product itself: a torch.nn.Linear with its own forward
    and no hooks, its weight and bias frozen, x in the weight's dtype and no autocast to change that."""
    return (type(base) is torch.nn.Linear and "forward" not in base.__dict__
            and not (base._forward_hooks or base._forward_pre_hooks)
            and not base.weight.requires_grad and (base.bias is None or not base.bias.requires_grad)
            and x.dtype == base.weight.dtype and not torch.is_autocast_enabled(x.device.type))


class _LoraLinear(torch.autograd.Function):
    """x W^T + bias + (x (sA)^T) B^T over a frozen torch.nn.Linear as one autograd node: `_LoraAdd` with the
    base product inside. Its backward makes dL/dx = g W and adds the LoRA part dS (sA) into it in place,
    where autograd would make the two [N, in] parts apart and add them in a third pass (read twice, written
    once more)."""

    @staticmethod
    def forward(ctx, x, weight, bias, a, b, scaling: float):
        x_2d = x.reshape(-1, x.shape[-1])  # [N, in]
        out = torch.nn.functional.linear(x_2d, weight, bias)  # [N, out]
        a_scaled, b_cast = cast_adapters(a, b, scaling, x.dtype)  # [r, in], [out, r]
        shrunk = lora_add_(out, x_2d, a_scaled, b_cast)  # [N, r]
        ctx.save_for_backward(x_2d, shrunk, a_scaled, b_cast, weight)
        ctx.scaling, ctx.x_shape, ctx.a_dtype, ctx.b_dtype = scaling, x.shape, a.dtype, b.dtype
        return out.view(*x.shape[:-1], out.shape[-1])

    @staticmethod
    def backward(ctx, grad):
        x_2d, shrunk, a_scaled, b_cast, weight = ctx.saved_tensors
        want_x, _, _, want_a, want_b, _ = ctx.needs_input_grad
        grad_2d = grad.reshape(-1, grad.shape[-1])  # [N, out]
        base_grad_x = torch.mm(grad_2d, weight) if want_x else None  # [N, in]: g W
        grad_x, grad_a, grad_b = lora_backward(grad_2d, x_2d, shrunk, a_scaled, b_cast, want_x, want_a, want_b,
                                               base_grad_x=base_grad_x)
        if grad_x is not None:
            grad_x = grad_x.view(ctx.x_shape)  # [..., in]
        return grad_x, None, None, *_adapter_grads(ctx, grad_a, grad_b), None


def _adapter_grads(ctx, grad_a, grad_b) -> tuple:
    """dL/dA [r, in] and dL/dB [out, r] in the adapters' dtypes from `lora_backward`'s dS^T x and g^T S (None
    stays None): the scale s applied in A's cast back, as `_LoraAdd` and `_LoraLinear` save it in ctx."""
    if grad_a is not None:
        grad_a = scaled_cast(grad_a, ctx.scaling, ctx.a_dtype)  # [r, in]
    if grad_b is not None:
        grad_b = grad_b.to(ctx.b_dtype)  # [out, r]
    return grad_a, grad_b


def _addable_in_place(result: torch.Tensor) -> bool:
    """Whether `_LoraAdd` may write into the base output: contiguous, and not a view made inside a custom
    autograd Function (autograd forbids modifying one in place; F.linear's own views are allowed)."""
    return result.is_contiguous() and not (
        result._is_view() and isinstance(result.grad_fn, torch.autograd.function.BackwardCFunction))


def cast_adapters(a: torch.Tensor, b: torch.Tensor, scaling: float, dtype: torch.dtype):
    """(sA [r, in], B [out, r]) in the compute dtype: the adapters as the LoRA products use them."""
    return scaled_cast(a, scaling, dtype), b.to(dtype)


def lora_add_(result: torch.Tensor, x: torch.Tensor, a_scaled: torch.Tensor, b: torch.Tensor,
              shrunk: torch.Tensor | None = None) -> torch.Tensor:
    """result [N, out] += (x (sA)^T) B^T in place for x [N, in] (the GEMM reads and writes result: an
    out-of-place addmm first copies result whole); returns the product S = x (sA)^T [N, r], made here
    unless given."""
    if shrunk is None:
        shrunk = torch.mm(x, a_scaled.t())  # [N, r]
    result.addmm_(shrunk, b.t())
    return shrunk


def lora_backward(grad: torch.Tensor, x: torch.Tensor, shrunk: torch.Tensor, a_scaled: torch.Tensor,
                  b: torch.Tensor, want_x: bool = True, want_a: bool = True, want_b: bool = True,
                  base_grad_x: torch.Tensor | None = None):
    """`lora_add_`'s gradients from dL/d(out) [N, out], in the compute dtype, None where not wanted:
    dS = g B,  dL/dx = dS (sA) [N, in] (the LoRA part only; added in place into base_grad_x where given),
    dL/dA / s = dS^T x [r, in],  dL/dB = g^T S [out, r]."""
    grad_shrunk = torch.mm(grad, b) if want_x or want_a else None  # [N, r]
    grad_x = None
    if want_x:
        grad_x = torch.mm(grad_shrunk, a_scaled) if base_grad_x is None else base_grad_x.addmm_(grad_shrunk, a_scaled)
    return grad_x, torch.mm(grad_shrunk.t(), x) if want_a else None, torch.mm(grad.t(), shrunk) if want_b else None


def scaled_cast(t: torch.Tensor, scale: float, dtype: torch.dtype) -> torch.Tensor:
    """t * scale in `dtype`, one kernel (the multiply writes the cast result)."""
    return torch.mul(t, scale, out=torch.empty(t.shape, dtype=dtype, device=t.device))
