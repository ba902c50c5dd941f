"""merge_lora_state_dict: the pure merge, checked against PEFT's own merge_and_unload and a naive loop."""
import copy
import math

import pytest
import torch
from peft import get_peft_model_state_dict

import tiny
from ahazero.export.merge import merge_lora_state_dict
from test_export_common import lora_model

CASES = {
    "plain": ("qwen2", {}),
    "rslora": ("llama", {"use_rslora": True, "lora_alpha": 16}),
    "patterns": ("qwen2", {"rank_pattern": {"q_proj": 8}, "alpha_pattern": {"down_proj": 32}}),
    "lora_bias": ("qwen2", {"lora_bias": True, "target_modules": ["q_proj", "k_proj", "v_proj"]}),
    "embedding+modules_to_save": ("mistral", {"target_modules": ["embed_tokens", "q_proj"],
                                              "modules_to_save": ["lm_head"]}),
}


def _randomize_everything_trainable(peft_model):
    """Also move modules_to_save copies and LoRA biases away from the base, so each must be merged."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "modules_to_save" in name or ("lora_B" in name and name.endswith("bias")):
                p.add_(torch.randn(p.shape, generator=gen) * 0.05)


@pytest.mark.parametrize("case", list(CASES))
def test_merge_equals_peft_merge_and_unload(case):
    arch, kwargs = CASES[case]
    peft_model = lora_model(arch, **kwargs)
    _randomize_everything_trainable(peft_model)
    base_sd = tiny.tiny_model(arch).state_dict()              # same seed: the untouched base weights
    lora_sd = get_peft_model_state_dict(peft_model, save_embedding_layers=False)
    merged = merge_lora_state_dict(base_sd, lora_sd, peft_model.peft_config["default"])
    reference = copy.deepcopy(peft_model).merge_and_unload().state_dict()
    assert set(reference) <= set(merged)
    changed = 0
    for key, want in reference.items():
        torch.testing.assert_close(merged[key], want, rtol=0, atol=2e-6, msg=key)
        changed += not torch.equal(want, base_sd[key])
    assert changed >= 4                                         # the adapter really changed weights


def test_adapter_config_dict_works_like_the_config_object():
    peft_model = lora_model("qwen2", use_rslora=True)
    lora_sd = get_peft_model_state_dict(peft_model)
    base_sd = tiny.tiny_model("qwen2").state_dict()
    config = peft_model.peft_config["default"]
    a = merge_lora_state_dict(base_sd, lora_sd, config)
    b = merge_lora_state_dict(base_sd, lora_sd, config.to_dict())
    assert all(torch.equal(a[k], b[k]) for k in a)


def _naive_merge(W, A, B, scale, fan_in_fan_out):
    """W + scale * B @ A by explicit sums, in float64."""
    out = W.double().clone()
    r = A.shape[0]
    for i in range(B.shape[0]):
        for j in range(A.shape[1]):
            value = scale * sum(B[i, k].item() * A[k, j].item() for k in range(r))
            if fan_in_fan_out:
                out[j, i] += value
            else:
                out[i, j] += value
    return out


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
@pytest.mark.parametrize("rslora", [False, True])
def test_merge_matches_a_naive_loop(fan_in_fan_out, rslora):
    torch.manual_seed(0)
    out_f, in_f, r, alpha = 5, 7, 3, 6
    A, B = torch.randn(r, in_f), torch.randn(out_f, r)
    W = torch.randn(in_f, out_f) if fan_in_fan_out else torch.randn(out_f, in_f)
    base = {"model.proj.weight": W, "model.other.weight": torch.randn(2, 2)}
    lora = {"base_model.model.model.proj.lora_A.weight": A, "base_model.model.model.proj.lora_B.weight": B}
    config = {"r": r, "lora_alpha": alpha, "use_rslora": rslora, "fan_in_fan_out": fan_in_fan_out}
    merged = merge_lora_state_dict(base, lora, config)
    scale = alpha / math.sqrt(r) if rslora else alpha / r
    torch.testing.assert_close(merged["model.proj.weight"].double(), _naive_merge(W, A, B, scale, fan_in_fan_out),
                               rtol=1e-5, atol=1e-5)
    assert merged["model.other.weight"] is base["model.other.weight"]     # untouched: not copied


def test_bf16_weights_stay_bf16_and_merge_in_float32():
    torch.manual_seed(0)
    W = torch.randn(64, 32).to(torch.bfloat16)
    A, B = torch.randn(4, 32) * 0.01, torch.randn(64, 4) * 0.01        # a delta far below bf16's step near 1
    lora = {"base_model.model.p.lora_A.weight": A.to(torch.bfloat16),
            "base_model.model.p.lora_B.weight": B.to(torch.bfloat16)}
    merged = merge_lora_state_dict({"p.weight": W}, lora, {"r": 4, "lora_alpha": 4})["p.weight"]
    assert merged.dtype == torch.bfloat16
    want = (W.float() + B.to(torch.bfloat16).float() @ A.to(torch.bfloat16).float()).to(torch.bfloat16)
    assert torch.equal(merged, want)


def test_shard_by_shard_equals_all_at_once():
    peft_model = lora_model("llama")
    lora_sd = get_peft_model_state_dict(peft_model)
    config = peft_model.peft_config["default"]
    base_sd = tiny.tiny_model("llama").state_dict()
    whole = merge_lora_state_dict(base_sd, lora_sd, config)
    keys = list(base_sd)
    parts = [merge_lora_state_dict({k: base_sd[k] for k in keys[i::3]}, lora_sd, config) for i in range(3)]
    pieced = {k: v for part in parts for k, v in part.items()}
    assert pieced.keys() == whole.keys() and all(torch.equal(pieced[k], whole[k]) for k in keys)


def test_dora_and_broken_adapters_are_refused():
    base = {"p.weight": torch.zeros(2, 2)}
    dora = {"base_model.model.p.lora_A.weight": torch.zeros(1, 2), "base_model.model.p.lora_B.weight": torch.zeros(2, 1),
            "base_model.model.p.lora_magnitude_vector": torch.ones(2)}
    with pytest.raises(NotImplementedError, match="DoRA"):
        merge_lora_state_dict(base, dora, {"r": 1, "lora_alpha": 1})
    with pytest.raises(ValueError, match="only one of"):
        lone_a = {"base_model.model.p.lora_A.weight": torch.zeros(1, 2)}
        merge_lora_state_dict(base, lone_a, {"r": 1, "lora_alpha": 1})
