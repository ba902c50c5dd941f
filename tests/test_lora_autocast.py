"""GRPOConfig.lora_autocast: the training forwards of a 16-bit model under torch.autocast, so PEFT's float32
adapters multiply in 16 bit. Against PEFT's default (float32 copies of each LoRA input): log-probs within
bf16 rounding, LoRA gradients as close to a float32 model's, the float32 input copies gone from what the
backward keeps, a recompute (offloaded checkpointing) under the forward's autocast state, and the trainer."""
import pytest
import torch
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer

import tiny
from ahazero.grpo.batch import build_batch
from ahazero.grpo.trainer import _autocast_dtype, lora_inputs_uncast, policy_logps
from ahazero.models.loader import attach_lora, enable_gradient_checkpointing

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def bf16_lora_model(checkpointing=False):
    """PEFT's own LoRA forward (attach_lora would give the fused one, which makes no float32 copies itself)."""
    torch.manual_seed(0)
    model = get_peft_model(tiny.tiny_model("qwen2", dtype=torch.bfloat16, initializer_range=0.2),
                           LoraConfig(r=4, lora_alpha=8, target_modules=TARGETS, init_lora_weights=False))
    enable_gradient_checkpointing(model, checkpointing)
    return model.train()


def rollouts():
    torch.manual_seed(0)
    prompts = [list(range(5, 5 + n)) for n in (7, 4, 9)]
    completions = [torch.randint(10, 5000, (n,)).tolist() for n in (12, 6, 9)]
    return build_batch(prompts, completions, [[0.0] * len(c) for c in completions], [False] * 3,
                       torch.tensor([1.0, -0.5, 0.25]), pad_id=0)


def step(model, autocast_dtype, padding_free):
    """log-probs [n, C], the LoRA gradients of sum(advantage * log-prob), and the bytes of activations (not
    weights or their casts) that autograd saved for the backward."""
    batch, saved = rollouts(), {}
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in weights:
            saved[storage.data_ptr()] = storage.nbytes()  # a tensor saved by several ops counts once
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logps, _ = policy_logps(model, batch, 1.0, padding_free=padding_free, autocast_dtype=autocast_dtype)
    with lora_inputs_uncast(model, autocast_dtype):  # as the trainer runs the backward
        (logps * batch.completion_mask * batch.advantages[:, None]).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return logps.detach(), grads, sum(saved.values())


def rel_errors(grads, truth) -> list[float]:
    return [((grads[n] - truth[n]).norm() / truth[n].norm()).item() for n in truth]


@pytest.mark.parametrize("padding_free", [False, True], ids=["padded", "packed"])
def test_autocast_is_as_accurate_as_the_float32_adapters_and_saves_less(padding_free):
    """Both bf16 runs against the same model in float32: the bf16 base weights dominate their error (~4% on
    these tiny random weights), and the 16-bit LoRA products add next to nothing to it."""
    model = bf16_lora_model()
    assert model.base_model.model.model.layers[0].self_attn.q_proj.lora_A["default"].weight.dtype == torch.float32
    ref_logps, ref_grads, ref_bytes = step(model, None, padding_free)
    logps, grads, saved_bytes = step(model, torch.bfloat16, padding_free)
    _, truth, _ = step(model.float(), None, padding_free)
    assert logps.dtype == torch.float32
    torch.testing.assert_close(logps, ref_logps, atol=0.05, rtol=0.01)  # bf16 rounding of logits ~15
    assert set(grads) == set(ref_grads) == set(truth) and len(grads) == 2 * 7 * 2
    assert all(g.dtype == torch.float32 for g in grads.values())  # float32 master weights, float32 gradients
    ours, peft = rel_errors(grads, truth), rel_errors(ref_grads, truth)
    assert sum(ours) / len(ours) < 1.25 * sum(peft) / len(peft) and max(ours) < 1.5 * max(peft), (ours, peft)
    # PEFT saves a float32 copy of each LoRA layer's input for the backward. With its cast off, autocast saves
    # the layers' own bf16 inputs (4 distinct ones a layer: q/k/v's, o's (heads x head_dim = hidden here),
    # gate/up's, down's) and bf16 casts of
    # the (small) adapter weights
    batch, cfg = rollouts(), model.config
    tokens = int(batch.prompt_mask.sum() + batch.completion_mask.sum()) if padding_free else \
        batch.prompt_ids.numel() + batch.completion_ids.numel()
    loras = [m for m in model.modules() if isinstance(m, LoraLayer)]
    casts = sum(m.lora_A["default"].weight.numel() + m.lora_B["default"].weight.numel() for m in loras) * 2
    inputs = cfg.num_hidden_layers * (3 * cfg.hidden_size
                                      + cfg.intermediate_size)
    fewer = tokens * (4 * sum(m.in_features for m in loras) - 2 * inputs) - casts
    assert ref_bytes - saved_bytes >= fewer, (ref_bytes, saved_bytes, fewer)


def test_offloaded_recompute_runs_under_the_forwards_autocast():
    """The backward (outside the autocast region) recomputes each layer as the forward ran it: the same
    gradients as no checkpointing, to the bit (without the restored state, PEFT's float32 path would run).
    Padded rows: a packed recompute would also need the trainer's varlen context around the backward."""
    _, ref, _ = step(bf16_lora_model(False), torch.bfloat16, padding_free=False)
    _, got, _ = step(bf16_lora_model("offload"), torch.bfloat16, padding_free=False)
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], atol=0, rtol=0)


def test_lora_autocast_needs_a_16bit_model():
    assert _autocast_dtype(bf16_lora_model()) == torch.bfloat16
    fp32 = attach_lora(tiny.tiny_model("qwen2"), r=4, lora_alpha=8, target_modules=TARGETS)
    with pytest.raises(ValueError, match="bf16 or fp16 model"):
        _autocast_dtype(fp32)


def test_trainer_steps_with_lora_autocast_and_refuses_it_on_a_float32_model(tmp_path):
    from ahazero import FastLanguageModel, GRPOConfig, GRPOTrainer
    from ahazero.data import load_gsm8k
    path = tiny.save_tiny_model(tmp_path / "m", "qwen2", dtype=torch.bfloat16)
    dataset = load_gsm8k("train", path=str(tiny.GSM8K_DIR / "train.jsonl")).select(range(8))
    args = GRPOConfig(output_dir=str(tmp_path / "out"), max_steps=1, num_generations=4, per_device_train_batch_size=4,
                      max_prompt_length=96, max_completion_length=8, learning_rate=5e-3, beta=0.04, seed=7,
                      lora_autocast=True, save_steps=10)

    def reward(completion_ids, **kwargs):
        return [sum(t % 2 for t in ids) / max(len(ids), 1) for ids in completion_ids]

    for dtype in (torch.bfloat16, torch.float32):
        model, tok = FastLanguageModel.from_pretrained(str(path), max_seq_length=256, dtype=dtype)
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0,
                                                 use_gradient_checkpointing="offload")
        if dtype == torch.float32:
            with pytest.raises(ValueError, match="lora_autocast=True needs a bf16 or fp16 model"):
                GRPOTrainer(model=model, processing_class=tok, args=args, train_dataset=dataset, reward_funcs=reward)
            continue
        before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        state = GRPOTrainer(model=model, processing_class=tok, args=args, train_dataset=dataset,
                            reward_funcs=reward).train()
        assert state.global_step == 1 and all(torch.isfinite(torch.tensor(v)) for v in
                                              (state.log_history[-1]["loss"], state.log_history[-1]["kl"]))
        assert any(not torch.equal(before[n], p) for n, p in model.named_parameters() if "lora_" in n)
