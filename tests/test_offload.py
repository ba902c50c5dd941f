"""Offloaded gradient checkpointing (models/offload.py) against no checkpointing and plain checkpointing:
the same loss and the same LoRA gradients on tiny models of real architectures (float32 CPU)."""
import pytest
import torch

import tiny
from ahazero.models.loader import attach_lora, enable_gradient_checkpointing
from ahazero.models.offload import _OffloadedCheckpoint


def lora_grads(arch, mode, ids, dropout=0.0):
    model = attach_lora(tiny.tiny_model(arch, initializer_range=0.2), r=4, lora_alpha=8,
                        target_modules=["q_proj", "v_proj", "down_proj"], random_state=0, lora_dropout=dropout,
                        init_lora_weights=False)
    enable_gradient_checkpointing(model, mode)
    model.train()
    torch.manual_seed(123)  # the same dropout masks in every mode
    logits = model(ids).logits  # [1, T, V]
    loss = torch.log_softmax(logits.float(), -1)[0, :-1].gather(-1, ids[0, 1:, None]).mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_offloaded_checkpointing_gives_the_gradients_of_no_checkpointing(arch, monkeypatch):
    calls = []
    original = _OffloadedCheckpoint.forward
    monkeypatch.setattr(_OffloadedCheckpoint, "forward",
                        staticmethod(lambda ctx, *a: calls.append(1) or original(ctx, *a)))
    ids = torch.tensor([tiny.tokenizer().encode("Natalia sold clips to 48 of her friends in April, and then")])
    ref_loss, ref = lora_grads(arch, False, ids)
    calls.clear()
    loss, got = lora_grads(arch, "offload", ids)
    assert len(calls) == 2  # one per decoder layer: the offloaded path ran
    assert set(got) == set(ref) and len(ref) == 12
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-6, rtol=1e-5)


def test_dropout_masks_are_replayed_in_the_recompute():
    ids = torch.tensor([tiny.tokenizer().encode("Tom has 3 apples and buys 5 more apples today")])
    _, plain = lora_grads("qwen2", True, ids, dropout=0.3)  # torch.utils.checkpoint restores RNG too
    _, offloaded = lora_grads("qwen2", "unsloth", ids, dropout=0.3)
    _, none = lora_grads("qwen2", False, ids, dropout=0.3)
    for name in none:
        torch.testing.assert_close(offloaded[name], none[name], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(plain[name], none[name], atol=1e-6, rtol=1e-5)


def test_first_layer_adapters_get_gradients_even_when_the_embeddings_output_needs_none():
    model = attach_lora(tiny.tiny_model("qwen2"), r=4, lora_alpha=8, target_modules=["q_proj"], random_state=0,
                        init_lora_weights=False)
    enable_gradient_checkpointing(model, "offload")
    model.get_base_model().disable_input_require_grads()  # as where transformers does not enable it
    model.train()
    model(torch.tensor([[11, 22, 33, 44]])).logits.float().logsumexp(-1).mean().backward()
    first = model.get_base_model().model.layers[0].self_attn.q_proj.lora_A["default"].weight
    assert first.grad is not None and first.grad.abs().sum() > 0
