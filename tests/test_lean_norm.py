"""The training RMSNorm (models/lean_norm.py) against transformers' RMSNorm on fresh random inputs: the
same output to the bit, the same gradients (to the bit in bf16, float32 rounding in float32), and no
float32 copy of the input kept for the backward."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.qwen2.modeling_qwen2 import Qwen2RMSNorm

import tiny
from ahazero.models import lean_norm
from ahazero.models.lean_norm import _RMSNorm, lean_rms_norms


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("trained_weight", [False, True])
@pytest.mark.parametrize("backward_rows", [1024, 5])
def test_output_and_gradients_equal_transformers_rmsnorm(dtype, trained_weight, backward_rows, monkeypatch):
    """backward_rows 5: the 18 tokens' backward in 4 slices (the last one short)."""
    monkeypatch.setattr(lean_norm, "BACKWARD_ROWS", backward_rows)
    g = torch.Generator().manual_seed(11)
    norm = Qwen2RMSNorm(48, eps=1e-6).to(dtype)
    norm.weight.data = torch.randn(48, generator=g).to(dtype)
    norm.weight.requires_grad_(trained_weight)
    x = torch.randn(2, 9, 48, generator=g).mul(3).to(dtype).requires_grad_(True)
    grad = torch.randn(2, 9, 48, generator=g).to(dtype)
    results = []
    for forward in (norm, lambda t: _RMSNorm.apply(t, norm.weight, norm.variance_epsilon)):
        x.grad = norm.weight.grad = None
        y = forward(x)
        y.backward(grad)
        results.append((y.detach(), x.grad, norm.weight.grad))
    (ref_y, ref_gx, ref_gw), (y, gx, gw) = results
    assert y.dtype == ref_y.dtype and torch.equal(y, ref_y)
    exact = dtype == torch.bfloat16
    torch.testing.assert_close(gx, ref_gx, atol=0 if exact else 1e-6, rtol=0 if exact else 1e-5)
    if trained_weight:  # summed over the tokens in float32, rounded once (by slices: in another order)
        exact_weight = exact and backward_rows >= 18
        torch.testing.assert_close(gw, ref_gw, atol=0 if exact_weight else 1e-5,
                                   rtol=0 if exact_weight else (1e-5 if dtype == torch.float32 else 8e-3))
    else:
        assert gw is None


def test_the_backward_keeps_the_16bit_input_not_a_float32_copy():
    norm = Qwen2RMSNorm(64).to(torch.bfloat16)
    x = torch.randn(5, 64, dtype=torch.bfloat16, requires_grad=True)
    for forward, float32_kept in ((norm, True), (lambda t: _RMSNorm.apply(t, norm.weight, 1e-6), False)):
        kept = []
        with torch.autograd.graph.saved_tensors_hooks(lambda t: kept.append(t) or t, lambda t: t):
            forward(x)
        assert any(t.dtype == torch.float32 and t.shape == (5, 64) for t in kept) == float32_kept


def test_every_norm_of_the_supported_architectures_and_none_of_others():
    assert lean_rms_norms(tiny.tiny_model("qwen2")) == 2 * 2 + 1
    assert lean_rms_norms(tiny.tiny_model("qwen3")) == 2 * 4 + 1  # q_norm and k_norm too
    model = tiny.tiny_model("llama")
    assert lean_rms_norms(model) == lean_rms_norms(model) == 5  # a second call changes nothing
    config = AutoConfig.for_model("gemma2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=128)
    assert lean_rms_norms(AutoModelForCausalLM.from_config(config)) == 0  # (1 + w) norms: not this formula


def test_a_model_with_lean_norms_trains_to_the_same_gradients():
    ids = torch.randint(0, 151000, (2, 13), generator=torch.Generator().manual_seed(3))
    grads = []
    for lean in (False, True):
        model = tiny.tiny_model("qwen3", initializer_range=0.2).train()
        if lean:
            lean_rms_norms(model)
        model(ids).logits.float().logsumexp(-1).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters()})
    for name, ref in grads[0].items():
        torch.testing.assert_close(grads[1][name], ref, atol=1e-6, rtol=1e-5)
