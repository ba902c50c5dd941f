"""QLoRA on the CPU: Linear4bit against F.linear on the dequantised weight, load_in_4bit from 16-bit and from
4-bit checkpoints, LoRA training and the engine on 4-bit bases, and the exports of a 4-bit model.

The dequantisation itself is tested against a reference in test_nf4.py; here the reference for every
4-bit computation is the same computation on a 16-bit model whose weights are the dequantised ones.
"""
import json
import logging

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

import tiny
from ahazero import FastLanguageModel, GRPOConfig, GRPOTrainer, SamplingParams
from ahazero.export.checkpoint import export_checkpoint
from ahazero.models.linear4bit import Linear4bit, outlier_layers, quantize_model
from ahazero.models.loader import bnb_4bit_settings
from ahazero.models.nf4 import dequantize_nf4, quantize_nf4


def dequantized_copy(model):
    """A 16-bit twin of a 4-bit model: every Linear4bit replaced by nn.Linear with the dequantised weight."""
    import copy
    twin = copy.deepcopy(model)
    for name, m in list(twin.named_modules()):
        if isinstance(m, Linear4bit):
            lin = torch.nn.Linear(m.in_features, m.out_features, bias=m.bias is not None)
            lin.weight.data = m.dequantized_weight().clone()
            if m.bias is not None:
                lin.bias.data = m.bias.data.clone()
            parent, _, child = name.rpartition(".")
            setattr(twin.get_submodule(parent), child, lin)
    return twin


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.save_tiny_model(tmp_path_factory.mktemp("q") / "model", "qwen2", initializer_range=0.3)


def load4(path, **kw):
    return FastLanguageModel.from_pretrained(str(path), max_seq_length=128, load_in_4bit=True, **kw)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bias", [False, True])
def test_linear4bit_forward_and_input_grad_equal_dequantised_linear(dtype, bias):
    torch.manual_seed(0)
    lin = torch.nn.Linear(200, 72, bias=bias).to(dtype)
    q = Linear4bit.from_linear(lin)
    w = dequantize_nf4(q.weight, q.quant_state)  # [72, 200], checked against a reference in test_nf4.py
    x = torch.randn(3, 5, 200, dtype=dtype, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    y, y_ref = q(x), F.linear(x_ref, w, None if lin.bias is None else lin.bias.detach())
    assert torch.equal(y, y_ref)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    assert torch.equal(x.grad, x_ref.grad)
    assert not q.weight.requires_grad and q.weight.dtype == torch.uint8 and q.weight.numel() == 72 * 100


def test_linear4bit_saves_no_dequantised_weight_for_backward():
    q = Linear4bit.from_linear(torch.nn.Linear(256, 128))
    saved = []

    def pack(t):
        saved.append(t)
        return t

    x = torch.randn(4, 256, requires_grad=True)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        q(x).sum().backward()
    assert all(t.numel() < 128 * 256 or not t.is_floating_point() for t in saved), [t.shape for t in saved]


def test_linear4bit_state_dict_has_bitsandbytes_names_and_survives_casts():
    q = Linear4bit.from_linear(torch.nn.Linear(64, 48))
    sd = q.state_dict()
    assert list(sd) == ["weight", "bias", "weight.absmax", "weight.quant_map", "weight.nested_absmax",
                        "weight.nested_quant_map", "weight.quant_state.bitsandbytes__nf4"]
    before = q.dequantized_weight()
    q.to(torch.bfloat16)  # casts the bias only: the float32 tables are part of the format
    assert q.code.dtype == q.nested_absmax.dtype == torch.float32 and q.bias.dtype == torch.bfloat16
    assert torch.equal(q.dequantized_weight(), before)
    other = Linear4bit.from_linear(torch.nn.Linear(64, 48))
    other.load_state_dict(sd)
    assert torch.equal(other.dequantized_weight(), before) and torch.equal(other.weight, q.weight)
    with pytest.raises(RuntimeError, match="4-bit shape"):
        Linear4bit.from_linear(torch.nn.Linear(64, 32)).load_state_dict(sd)


def test_outlier_rule():
    kept, threshold = outlier_layers({"a": 0.10, "b": 0.11, "c": 0.09, "d": 0.40})
    assert kept == ["d"] and threshold == pytest.approx(0.15)
    assert outlier_layers({}) == ([], pytest.approx(float("nan"), nan_ok=True))


def test_dynamic_4bit_keeps_an_outlier_layer_in_16bit(caplog):
    model = tiny.tiny_model("llama")
    with torch.no_grad():  # a 16-sigma value in every 64-block flattens the rest of the block towards 0
        w = model.model.layers[1].mlp.down_proj.weight
        w.view(-1)[::64] = 16 * w.std()
    with caplog.at_level(logging.WARNING, logger="ahazero"):
        report = quantize_model(model)
    assert report.kept_16bit == ["model.layers.1.mlp.down_proj"]
    assert "stay in 16 bit" in caplog.text and "model.layers.1.mlp.down_proj" in caplog.text
    assert type(model.model.layers[1].mlp.down_proj) is torch.nn.Linear
    assert isinstance(model.model.layers[0].mlp.down_proj, Linear4bit)
    assert type(model.lm_head) is torch.nn.Linear and len(report.quantized) == 13
    assert all(0.05 < e < 0.15 for n, e in report.errors.items() if n not in report.kept_16bit)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_load_in_4bit_quantises_linears_and_stays_close_to_16bit(arch, tmp_path):
    path = tiny.save_tiny_model(tmp_path / arch, arch)
    m16, tok = FastLanguageModel.from_pretrained(str(path))
    m4, _ = load4(path)
    linears = [m for m in m4.modules() if isinstance(m, Linear4bit)]
    assert len(linears) == 14 and type(m4.lm_head) is torch.nn.Linear
    ids = torch.tensor([tok.encode("Natalia sold clips to 48 of her friends in April")], device=m4.device)
    with torch.no_grad():
        l16, l4, l_twin = m16(ids).logits, m4(ids).logits, dequantized_copy(m4)(ids).logits
    rel = (l4 - l16).norm() / l16.norm()
    assert 0.005 < rel < 0.2  # NF4 error, neither zero (not quantised) nor broken
    if l4.device.type == "cpu":  # the 4-bit model is its dequantised twin: the same dequantise-then-matmul
        torch.testing.assert_close(l4, l_twin, atol=1e-5, rtol=1e-5)
    else:  # a GPU's fused NF4 kernel adds in another order than cuBLAS (and rounds in the model's dtype): the
        # 4-bit model is still far closer to its twin than to the 16-bit model
        assert (l4 - l_twin).norm() < 0.1 * (l4 - l16).norm()
    weight_bytes = sum(m.weight.numel() for m in linears)
    assert weight_bytes == sum(m.in_features * m.out_features for m in linears) // 2


def test_qlora_step_trains_only_the_adapter_and_engine_decodes_the_4bit_weights(model_dir, tmp_path):
    # float32 on every device (a GPU's default is bf16, whose roundings differ between the engine's fused NF4
    # kernel and the trainer's dequantised matmul by ~1e-1 in a log-prob: bench/RESULTS.md's logp diff)
    model, tok = load4(model_dir, fast_inference=True, dtype=torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing=True)
    packed_before = {n: p.clone() for n, p in model.named_parameters() if p.dtype == torch.uint8}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    data = [{"prompt": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(8)]
    args = GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=2, num_generations=4,
                      per_device_train_batch_size=4, max_prompt_length=64, max_completion_length=8,
                      learning_rate=1e-2, logging_steps=1, save_steps=100, seed=1, report_to="none")
    trainer = GRPOTrainer(model=model, processing_class=tok, args=args, train_dataset=data,
                          reward_funcs=[lambda completion_ids, **kw: [sum(t % 2 for t in c) / len(c) for c in completion_ids]])
    trainer.train()
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["sampling/logp_diff/max"] < 1e-3  # engine (4-bit) and trainer (4-bit) agree
    assert all(torch.equal(p, packed_before[n]) for n, p in model.named_parameters() if p.dtype == torch.uint8)
    assert any(not torch.equal(p, lora_before[n]) for n, p in model.named_parameters() if "lora_" in n)
    # engine greedy decode == transformers greedy decode of the same 4-bit PEFT model
    prompt = tok.encode("Once upon a time")
    out = model.fast_generate([prompt], SamplingParams(temperature=0, max_tokens=10, ignore_eos=True),
                              lora_request=model.load_lora(model.save_lora(tmp_path / "lora")))
    with torch.no_grad():
        ref = model.generate(torch.tensor([prompt], device=model.device), do_sample=False, max_new_tokens=10,
                             min_new_tokens=10, pad_token_id=tiny.QWEN_PAD)[0, len(prompt):].tolist()
    assert out[0].outputs[0].token_ids == ref


@pytest.mark.slow
def test_exports_of_a_4bit_model(model_dir, tmp_path):
    model, tok = load4(model_dir, dtype=torch.float32)  # on a GPU too: the merged model is compared at 1e-4
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"],
                                             init_lora_weights=False, use_gradient_checkpointing=False)
    ids = torch.tensor([tok.encode("Tom has 3 apples and buys 5 more. How many apples?")])  # transformers' (CPU)
    with torch.no_grad():
        ref = model(ids.to(model.device)).logits.cpu()
    model.save_pretrained_merged(tmp_path / "m16", tok, save_method="merged_16bit")
    model.save_pretrained_merged(tmp_path / "m4", tok, save_method="merged_4bit")
    m16 = AutoModelForCausalLM.from_pretrained(tmp_path / "m16")
    assert not hasattr(m16.config, "quantization_config")
    with torch.no_grad():
        torch.testing.assert_close(m16(ids).logits, ref, atol=1e-4, rtol=1e-4)  # dequantised base + LoRA, merged

    q = json.loads((tmp_path / "m4" / "config.json").read_text())["quantization_config"]
    assert bnb_4bit_settings(m16.config.__class__.from_dict({"quantization_config": q})) is not None
    assert q["llm_int8_skip_modules"] == ["lm_head", "model.embed_tokens"]
    m4, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m4"), dtype=torch.float32)  # a bnb-4bit folder: 4 bit
    layer, base_layer = m4.model.layers[0].self_attn, model.base_model.model.model.layers[0].self_attn
    assert torch.equal(layer.k_proj.weight, base_layer.k_proj.weight)  # untouched: the same codes
    assert not torch.equal(layer.q_proj.weight, base_layer.q_proj.base_layer.weight)  # merged, requantised
    merged_q = m16.model.layers[0].self_attn.q_proj.weight.detach()  # dequantised base + LoRA
    assert torch.equal(layer.q_proj.dequantized_weight().cpu(), dequantize_nf4(*quantize_nf4(merged_q)))

    # from files: the 4-bit folder to merged_16bit is exactly its dequantised weights
    export_checkpoint(tmp_path / "m4", tmp_path / "back16", to="merged_16bit")
    back = AutoModelForCausalLM.from_pretrained(tmp_path / "back16")
    tol = 1e-6 if m4.device.type == "cpu" else 1e-4  # a GPU's float32 kernels (ours, cuBLAS) against the CPU's
    with torch.no_grad():
        torch.testing.assert_close(back(ids).logits, dequantized_copy(m4)(ids.to(m4.device)).logits.cpu(),
                                   atol=tol, rtol=tol)


def test_transformers_with_bitsandbytes_loads_our_merged_4bit(model_dir, tmp_path):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes not installed")
    model, tok = load4(model_dir)
    model.save_pretrained_merged(tmp_path / "m4", tok, save_method="merged_4bit")
    theirs = AutoModelForCausalLM.from_pretrained(tmp_path / "m4", device_map="cpu")
    assert type(theirs.model.layers[0].mlp.up_proj).__name__ == "Linear4bit"
    ids = torch.tensor([tok.encode("Tom has 3 apples and buys 5 more.")])  # theirs is on the CPU
    with torch.no_grad():
        ours, bnb = model(ids.to(model.device)).logits.cpu(), theirs(ids).logits.float()
    # bnb's CPU backend keeps the absmax in bfloat16 (2^-9 relative), so not bit-exact here
    assert (bnb - ours).norm() / ours.norm() < 2e-2


def test_unsupported_quantised_checkpoints_are_clear_errors(model_dir, tmp_path):
    cfg = tiny.tiny_config("qwen2")
    for q, match in [({"quant_method": "gptq", "bits": 4}, "only bitsandbytes 4-bit"),
                     ({"quant_method": "bitsandbytes", "load_in_8bit": True}, "only bitsandbytes 4-bit"),
                     ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "fp4"}, "nf4"),
                     ({"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4",
                       "bnb_4bit_use_double_quant": False}, "double-quantised")]:
        cfg.quantization_config = q
        with pytest.raises(NotImplementedError, match=match):
            bnb_4bit_settings(cfg)
    with pytest.raises(NotImplementedError, match="load_in_8bit"):
        FastLanguageModel.from_pretrained(str(model_dir), load_in_8bit=True)
    with pytest.raises(ValueError, match="full_finetuning"):
        FastLanguageModel.from_pretrained(str(model_dir), load_in_4bit=True, full_finetuning=True)


def test_merged_4bit_of_a_16bit_model_quantises_every_linear_once(model_dir, tmp_path):
    model, tok = FastLanguageModel.from_pretrained(str(model_dir))
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, init_lora_weights=False,
                                             use_gradient_checkpointing=False)
    model.save_pretrained_merged(tmp_path / "m16", tok, save_method="merged_16bit")
    model.save_pretrained_merged(tmp_path / "m4", tok, save_method="merged_4bit")
    m16 = AutoModelForCausalLM.from_pretrained(tmp_path / "m16")
    m4, _ = FastLanguageModel.from_pretrained(str(tmp_path / "m4"))
    pairs = [(n, m, m16.get_submodule(n)) for n, m in m4.named_modules() if isinstance(m, Linear4bit)]
    assert len(pairs) == 14
    for name, q, full in pairs:
        assert torch.equal(q.dequantized_weight().cpu(), dequantize_nf4(*quantize_nf4(full.weight.detach()))), name
