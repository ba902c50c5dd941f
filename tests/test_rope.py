"""models/rope.py's kernel (Triton's interpreter here) against transformers' eager RoPE, bit for bit."""
import sys

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM
from transformers.models.qwen2 import modeling_qwen2

import tiny
from ahazero.models import rope
from ahazero.models.rope import apply_rotary_pos_emb, fast_rope

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"  # the CPU runs the kernel in Triton's interpreter


def rotary(config_overrides, B, T, dtype, seed):
    """Real cos, sin [B, T, D] from Qwen2's rotary module (llama3 scaling where the config has it), at
    random positions."""
    config = tiny.tiny_config("llama" if "rope_scaling" in config_overrides else "qwen2", **config_overrides)
    embedding = modeling_qwen2.Qwen2RotaryEmbedding(config=config) if "rope_scaling" not in config_overrides \
        else sys.modules[AutoModelForCausalLM.from_config(config).__module__].LlamaRotaryEmbedding(config=config)
    gen = torch.Generator().manual_seed(seed)
    positions = torch.randint(0, 30000, (B, T), generator=gen)
    return embedding(torch.zeros(1, dtype=dtype), positions)


@pytest.fixture(autouse=True)
def kernel_on_the_cpu(monkeypatch):
    monkeypatch.setattr(rope, "ON_CPU_IN_INTERPRETER", True)


@pytest.mark.parametrize("head_dim,scaling", [(16, False), (128, False), (64, True)])
def test_forward_and_backward_are_transformers_bit_for_bit(head_dim, scaling):
    device, dtype = DEVICE, torch.bfloat16
    B, T, H, KV = 2, 5, 3, 1
    overrides = dict(head_dim=head_dim)
    if scaling:
        overrides["rope_scaling"] = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                         original_max_position_embeddings=8192)
    cos, sin = rotary(overrides, 1 if head_dim == 128 else B, T, dtype, seed=head_dim)  # [1, T, D]: broadcast
    cos, sin = cos.to(device), sin.to(device)
    assert cos.shape[1:] == (T, head_dim) and cos.dtype == dtype
    gen = torch.Generator().manual_seed(head_dim + 1)

    def projection(heads):  # [B, H, T, D]: a transposed view of a [B, T, H, D] output, as the attention makes
        return (torch.randn(B, T, heads, head_dim, generator=gen) * 3).to(device, dtype).transpose(1, 2)

    q, k = projection(H), projection(KV)
    grads = [torch.randn(B, heads, T, head_dim, generator=gen).to(device, dtype) for heads in (H, KV)]
    results = []
    for function in (modeling_qwen2.apply_rotary_pos_emb,
                     lambda *a: apply_rotary_pos_emb(*a, original=None)):  # no fallback allowed
        qq, kk = q.detach().requires_grad_(), k.detach().requires_grad_()
        outs = function(qq, kk, cos, sin)
        torch.autograd.backward(outs, grads)
        results.append((*outs, qq.grad, kk.grad))
    for want, got in zip(*results):
        assert got.dtype == want.dtype and got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_what_the_kernel_does_not_cover_goes_to_transformers():
    cos, sin = (t.to(DEVICE) for t in rotary(dict(head_dim=16), 1, 4, torch.float32, seed=0))
    q, k = torch.randn(1, 2, 4, 16, device=DEVICE), torch.randn(1, 1, 4, 16, device=DEVICE)
    assert not rope.covers(q, k, cos, sin, 1)  # float32
    assert not rope.covers(*(t.half() for t in (q, k, cos, sin)), 1)  # float16
    q16, k16, cos16, sin16 = (t.bfloat16() for t in (q, k, cos, sin))
    assert rope.covers(q16, k16, cos16, sin16, 1)
    assert not rope.covers(q16, k16, cos16, sin16, 2)
    assert not rope.covers(q16, k16, cos, sin, 1)  # cos, sin of another dtype
    assert not rope.covers(q16, k16, cos16.requires_grad_(), sin16, 1)
    calls = []
    got = apply_rotary_pos_emb(q, k, cos, sin, original=lambda *a: calls.append(a) or "original")
    assert got == "original" and len(calls) == 1


def test_a_model_with_it_trains_to_the_same_values_and_leaves_other_models_alone(monkeypatch):
    ids = torch.randint(0, 1000, (2, 9), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    launches = []
    rotate = rope._rotate
    monkeypatch.setattr(rope, "_rotate", lambda *a, **kw: launches.append(kw["backward"]) or rotate(*a, **kw))
    results = []
    for fast in (False, True):
        model = tiny.tiny_model("qwen2", dtype=torch.bfloat16, initializer_range=0.2).to(DEVICE).train()
        if fast:
            assert fast_rope(model) == fast_rope(model) == 2  # one per layer; a second call changes nothing
        logits = model(ids).logits
        logits.float().logsumexp(-1).mean().backward()
        results.append([logits] + [p.grad for p in model.parameters()])
        assert modeling_qwen2.apply_rotary_pos_emb is not None
        assert modeling_qwen2.apply_rotary_pos_emb.__module__ == modeling_qwen2.__name__  # restored after the call
    assert launches.count(False) == launches.count(True) == 2 * 2  # q and k of 2 layers, forward and backward
    for want, got in zip(*results):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_supported_architectures_only():
    assert fast_rope(tiny.tiny_model("qwen3")) == 2
    assert fast_rope(tiny.tiny_model("llama")) == 2
    config = AutoConfig.for_model("gemma2", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                  num_attention_heads=2, num_key_value_heads=1, head_dim=16, vocab_size=128)
    assert fast_rope(AutoModelForCausalLM.from_config(config)) == 0
