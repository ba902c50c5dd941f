"""The fused LoRA forward (models/lora.py `fuse_lora_forwards`) against PEFT's own forward: the same
outputs and gradients in float32, bf16 products without PEFT's float32 input copies, and PEFT's forward
wherever the case is not plain single-adapter LoRA."""
import pytest
import torch
from peft import LoraConfig, get_peft_model

import tiny
from ahazero.models.lora import fuse_lora_forwards

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def peft_model(dtype=torch.float32, dropout=0.0, use_dora=False, seed=0):
    model = tiny.tiny_model("qwen2", initializer_range=0.2, seed=seed).to(dtype)
    config = LoraConfig(r=4, lora_alpha=12, target_modules=TARGETS, lora_dropout=dropout, use_dora=use_dora,
                        init_lora_weights=False)
    return get_peft_model(model, config)


def unfused_and_fused(**kwargs):
    """Two identical PEFT models; the second with the fused forward."""
    unfused, fused = peft_model(**kwargs), peft_model(**kwargs)
    assert fuse_lora_forwards(fused) == 2 * len(TARGETS)
    return unfused, fused


def run(model, ids, seed=7):
    torch.manual_seed(seed)  # the same dropout masks for both
    model.train()
    logits = model(ids).logits.float()  # [B, T, V]
    loss = logits.logsumexp(-1).mean() - logits[..., 0].mean()
    loss.backward()
    return logits.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}


def random_ids(seed, shape=(2, 11)):
    return torch.randint(0, 151000, shape, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("dropout", [0.0, 0.3])
def test_float32_outputs_and_gradients_equal_pefts(dropout):
    unfused, fused = unfused_and_fused(dropout=dropout)
    ids = random_ids(1)
    ref_logits, ref = run(unfused, ids)
    logits, got = run(fused, ids)
    # float32 rounding of the same sums in another order, through two layers: ~2e-6 of the logits' scale (with
    # dropout as without); a wrong scale, mask or product would be off by 1e-2 or more
    scale = ref_logits.abs().max().item()
    torch.testing.assert_close(logits, ref_logits, atol=5e-6 * scale, rtol=0)
    assert set(got) == set(ref) and len(ref) == 2 * 2 * len(TARGETS)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=1e-4)


def float32_down_proj_inputs_kept(model, ids) -> int:
    """Float32 [.., T, intermediate] tensors the backward keeps: only a LoRA input copy has that shape (the
    RMSNorms' float32 copies are hidden-sized)."""
    intermediate, kept = tiny.tiny_config("qwen2").intermediate_size, []

    def pack(t):
        kept.append(t.dtype == torch.float32 and t.shape[-1] == intermediate
                    and t.numel() == ids.numel() * intermediate)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(ids)
    return sum(kept)


def test_bf16_products_stay_close_to_the_float32_ones_and_keep_no_float32_input_copy():
    ids = random_ids(2)
    reference, _ = run(peft_model(torch.float32), ids)
    unfused, fused = unfused_and_fused(dtype=torch.bfloat16)
    for model in (unfused, fused):  # adapters in float32 on a 16-bit model, as get_peft_model leaves them
        for p in model.parameters():
            if p.requires_grad:
                p.data = p.data.float()
    logits, grads = run(fused, ids)
    pefts_logits, _ = run(unfused, ids)
    error = (logits - reference).norm() / reference.norm()  # ~2%: the bf16 weights' rounding
    assert error < 1.25 * (pefts_logits - reference).norm() / reference.norm()  # as close as PEFT's bf16 path
    assert len(grads) == 2 * 2 * len(TARGETS)
    assert all(p.grad.dtype == torch.float32 for p in fused.parameters() if p.requires_grad)
    assert float32_down_proj_inputs_kept(unfused, ids) == 2  # PEFT's float32 copy, in each layer
    assert float32_down_proj_inputs_kept(fused, ids) == 0


def test_adapters_off_merged_and_dora_take_pefts_forward():
    unfused, fused = unfused_and_fused()
    ids = random_ids(3)
    with torch.no_grad():
        base = tiny.tiny_model("qwen2", initializer_range=0.2)(ids).logits
        with fused.disable_adapter():
            torch.testing.assert_close(fused(ids).logits, base)
        assert not torch.allclose(fused(ids).logits, base)  # the adapters are back on
    dora_unfused, dora_fused = unfused_and_fused(use_dora=True)
    with torch.no_grad():
        torch.testing.assert_close(dora_fused(ids).logits, dora_unfused(ids).logits)
    fused.merge_adapter()
    with torch.no_grad():
        torch.testing.assert_close(fused(ids).logits, unfused(ids).logits, atol=1e-4, rtol=1e-4)


class _ViewingBase(torch.autograd.Function):
    """A base layer's product returned as a view made inside a custom Function (as a quantised base's could
    be): autograd forbids modifying it in place."""

    @staticmethod
    def forward(ctx, x, weight):
        ctx.save_for_backward(weight)
        return (x.reshape(-1, x.shape[-1]) @ weight.t()).view(*x.shape[:-1], weight.shape[0])

    @staticmethod
    def backward(ctx, grad):
        weight, = ctx.saved_tensors
        return grad @ weight, None


class _OpNames(torch.utils._python_dispatch.TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def test_the_lora_term_is_added_into_the_base_output_in_place():
    """No copy of the base output (an out-of-place addmm writes one first); its value and gradients are
    PEFT's. A base output that is a custom Function's view is added to out of place, with the same values."""
    ids = random_ids(3)
    for viewing in (False, True):
        unfused, fused = unfused_and_fused()
        if viewing:  # every base Linear's product through _ViewingBase
            for model in (unfused, fused):
                for module in model.modules():
                    if type(module) is torch.nn.Linear and module.weight.shape[0] != 151936 and \
                            not module.weight.requires_grad:
                        module.forward = lambda x, m=module: (_ViewingBase.apply(x, m.weight) if m.bias is None
                                                              else _ViewingBase.apply(x, m.weight) + m.bias)
        layer = fused.get_base_model().model.layers[0].mlp.down_proj
        x = torch.randn(1, 5, layer.in_features, requires_grad=True)
        with _OpNames() as ops:
            layer(x)
        assert "addmm_" in ops.names and "addmm" not in ops.names and "copy_" not in ops.names, ops.names
        assert ("clone" in ops.names) == viewing, ops.names  # a copy of the base output only for the view
        ref_logits, ref = run(unfused, ids)
        logits, got = run(fused, ids)
        torch.testing.assert_close(logits, ref_logits, atol=5e-6 * ref_logits.abs().max().item(), rtol=0)
        for name in ref:
            torch.testing.assert_close(got[name], ref[name], atol=1e-5, rtol=1e-4)


def test_a_frozen_linears_input_gradient_takes_the_lora_part_in_place():
    """Over a plain frozen torch.nn.Linear the base product and the LoRA term are one node (`_LoraLinear`):
    dL/dx = g W with dS (sA) added into it by addmm_, no third pass adding two [N, in] parts (which the
    `_LoraAdd` path, taken when the base Linear has a hook, makes). Same input gradient either way."""
    _, fused = unfused_and_fused()
    layer = fused.get_base_model().model.layers[0].self_attn.q_proj  # with a bias (qwen2)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 5, layer.in_features, generator=g, requires_grad=True)
    grad = torch.randn(2, 5, layer.out_features, generator=g)
    grads = []
    for hooked in (False, True):
        handle = layer.base_layer.register_forward_pre_hook(lambda m, args: None) if hooked else None
        x.grad = None
        y = layer(x)
        assert (type(y.grad_fn).__name__ == "_LoraLinearBackward") != hooked
        with _OpNames() as ops:
            y.backward(grad)
        assert ("add" in ops.names) == hooked and ("addmm_" in ops.names) != hooked, ops.names
        grads.append(x.grad.clone())
        if handle:
            handle.remove()
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)
