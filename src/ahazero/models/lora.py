"""LoRA through PEFT: attaching adapters and choosing which one a forward pass uses."""
from __future__ import annotations

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
