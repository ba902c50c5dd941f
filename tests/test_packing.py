"""Padding-free training forward (grpo/packing.py): the packed layout against a plain loop, packed
log-probs / entropies / LoRA gradients against the padded forward on tiny real-architecture models
(float32 CPU, sdpa and eager attention), the probe that decides packing, and one training step that
ends at the same adapter either way."""
import pytest
import torch
from datasets import Dataset
from peft import LoraConfig, get_peft_model
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward

import tiny
from ahazero import FastLanguageModel, GRPOConfig, GRPOTrainer
from ahazero.data import load_gsm8k
from ahazero.grpo.batch import build_batch
from ahazero.grpo.loss import aggregate_loss, per_token_loss
from ahazero.grpo.packing import (measure_packing, pack_rollouts, packing_fallback_reason, processed_tokens,
                                  unpack_to_rows, varlen_context)
from ahazero.grpo import trainer as trainer_module
from ahazero.grpo.trainer import _run_decoder as run_decoder
from ahazero.grpo.trainer import policy_logps
from ahazero.models.lora import decoder_and_head

PAD = tiny.QWEN_PAD
# very different lengths: one-token prompts and completions next to long ones
PROMPT_LENS = [3, 17, 1, 9, 5, 12]
COMPLETION_LENS = [1, 25, 6, 1, 30, 4]


def rollout_batch(prompt_lens, completion_lens, seed=0, truncated=None, mask_truncated=False):
    gen = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(0, 150_000, (n,), generator=gen).tolist()  # noqa: E731
    prompts, completions = [ids(p) for p in prompt_lens], [ids(c) for c in completion_lens]
    logps = [[-1.0] * c for c in completion_lens]
    truncated = truncated or [False] * len(prompts)
    advantages = torch.randn(len(prompts), generator=gen)                    # [n]
    return build_batch(prompts, completions, logps, truncated, advantages, PAD, mask_truncated)


# ------------------------------------------------------------------ the layout, pure

def loop_pack(prompt_ids, prompt_mask, completion_ids, completion_mask):
    """The packed row, one sequence at a time: (ids, positions, predict_at, targets, rows, cols)."""
    ids, pos, at, tgt, rows, cols = [], [], [], [], [], []
    for i in range(prompt_ids.shape[0]):
        prompt = [int(t) for t, m in zip(prompt_ids[i], prompt_mask[i]) if m]
        completion = [int(t) for t, m in zip(completion_ids[i], completion_mask[i]) if m > 0]
        if not completion:
            continue
        start = len(ids)
        for t, tok in enumerate(completion):
            at.append(start + len(prompt) - 1 + t)
            tgt.append(tok)
            rows.append(i)
            cols.append(t)
        ids += prompt + completion
        pos += list(range(len(prompt) + len(completion)))
    return ids, pos, at, tgt, rows, cols


def test_pack_rollouts_matches_a_loop_and_unpacks_to_rows():
    b = rollout_batch(PROMPT_LENS, COMPLETION_LENS, truncated=[False, True, False, False, True, False],
                      mask_truncated=True)
    p = pack_rollouts(b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)
    want = loop_pack(b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)
    got = [p.input_ids, p.position_ids, p.predict_at, p.targets, p.rows, p.cols]
    for name, g, w in zip(["input_ids", "position_ids", "predict_at", "targets", "rows", "cols"], got, want):
        assert g.tolist() == w, name
    assert 1 not in p.rows.tolist() and 4 not in p.rows.tolist()  # masked truncated rows are left out
    values = torch.arange(1, len(p.targets) + 1, dtype=torch.float32)        # [M]
    grid = unpack_to_rows(values, p, tuple(b.completion_ids.shape))          # [n, C]
    assert torch.equal(grid != 0, b.completion_mask > 0)
    assert grid[b.completion_mask > 0].tolist() == values.tolist()


def test_pack_rejects_a_completion_without_prompt():
    b = rollout_batch([0, 3], [2, 2])
    with pytest.raises(ValueError, match="empty prompt"):
        pack_rollouts(b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)


def test_packing_processes_fewer_token_positions():
    # a group of 8 completions of one 40-token prompt, lengths as GRPO gives them: a few long, most short
    prompts, completions = [40] * 8, [512, 37, 1, 260, 90, 512, 12, 150]
    padded = processed_tokens(prompts, completions, padding_free=False)
    packed = processed_tokens(prompts, completions, padding_free=True)
    assert padded == 8 * (40 + 512) == 4416
    assert packed == 8 * 40 + sum(completions) == 1894                       # 43% of the padded positions
    assert processed_tokens([5, 9], [3, 3], True) == processed_tokens([5, 9], [3, 3], False) - 4
    # the same counts as the tensors the two forwards really take
    b = rollout_batch(PROMPT_LENS, COMPLETION_LENS)
    p = pack_rollouts(b.prompt_ids, b.prompt_mask, b.completion_ids, b.completion_mask)
    assert len(p.input_ids) == processed_tokens(PROMPT_LENS, COMPLETION_LENS, True) == 114
    assert b.prompt_ids.numel() + b.completion_ids.numel() == processed_tokens(PROMPT_LENS, COMPLETION_LENS, False)
    assert processed_tokens(PROMPT_LENS, COMPLETION_LENS, False) == 6 * (17 + 30)


# ------------------------------------------------------------------ packed == padded on real architectures

def lora_model(arch, attn):
    model = tiny.tiny_model(arch)
    model.set_attn_implementation(attn)
    # random B as well as A, so that the adapters change the forward and both get gradients
    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, init_lora_weights=False, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))


def logps_and_lora_grads(model, batch, padding_free):
    model.zero_grad(set_to_none=True)
    logps, entropy = policy_logps(model, batch, temperature=0.9, with_entropy=True, padding_free=padding_free)
    loss_tokens, _ = per_token_loss(logps, None, batch.advantages, batch.completion_mask,
                                    epsilon_low=0.2, epsilon_high=0.2)
    aggregate_loss(loss_tokens, batch.completion_mask, "grpo", len(batch)).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if "lora_" in n}
    return logps.detach(), entropy, grads


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_packed_equals_padded_logps_entropy_and_lora_grads(arch, attn):
    model = lora_model(arch, attn)
    assert packing_fallback_reason(model) is None
    batch = rollout_batch(PROMPT_LENS, COMPLETION_LENS, seed=1)
    padded, padded_entropy, padded_grads = logps_and_lora_grads(model, batch, padding_free=False)
    packed, packed_entropy, packed_grads = logps_and_lora_grads(model, batch, padding_free=True)
    mask = batch.completion_mask > 0
    assert packed.shape == padded.shape == batch.completion_ids.shape
    torch.testing.assert_close(packed[mask], padded[mask], rtol=0, atol=1e-5)
    torch.testing.assert_close(packed_entropy[mask], padded_entropy[mask], rtol=0, atol=1e-5)
    assert (packed[~mask] == 0).all()
    assert len(packed_grads) > 0 and all(g.abs().sum() > 0 for g in packed_grads.values())
    for name, g in packed_grads.items():
        torch.testing.assert_close(g, padded_grads[name], rtol=1e-4, atol=1e-6, msg=name)


def test_fully_masked_rows_give_zero_logps_without_a_forward():
    model = lora_model("qwen2", "sdpa")
    batch = rollout_batch([4, 6], [3, 5], truncated=[True, True], mask_truncated=True)
    logps, entropy = policy_logps(model, batch, 1.0, with_entropy=True, padding_free=True)
    assert logps.shape == (2, 5) and not logps.any() and not entropy.any() and not logps.requires_grad


# ------------------------------------------------------------------ the probe

def _causal_ignoring_mask(module, query, key, value, attention_mask, **kwargs):
    """An attention that ignores the mask transformers builds (plain causal): packed sequences leak."""
    kwargs.pop("is_causal", None)
    return sdpa_attention_forward(module, query, key, value, None, is_causal=True, **kwargs)


AttentionInterface.register("test_causal_ignoring_mask", _causal_ignoring_mask)


@pytest.mark.parametrize("arch", tiny.ARCHS)
def test_probe_accepts_sdpa_and_eager_in_float32_and_bfloat16(arch):
    """Packed forwards as the trainer runs them (under varlen_context: our varlen attention for sdpa and eager)
    equal each sequence alone to float32 rounding, and the probe accepts. (transformers' own packed sdpa
    path, without our context, differs by bf16 rounding with transformers 5.24: 5e-4 against a 0.6 leak.)"""
    for attn in ("sdpa", "eager"):
        for dtype in (torch.float32, torch.bfloat16):
            model = tiny.tiny_model(arch, dtype=dtype)
            model.set_attn_implementation(attn)
            decoder = decoder_and_head(model)[0]
            with varlen_context(decoder):
                diff, leak = measure_packing(decoder)
            assert diff <= 1e-6 < 0.1 < leak, (attn, dtype, diff, leak)
            assert packing_fallback_reason(model) is None


def test_probe_rejects_an_attention_that_ignores_packing_and_the_trainer_falls_back(tmp_path, monkeypatch):
    """A packed forward that does not run on our varlen attention (here: made not to) is measured."""
    import contextlib
    import ahazero.grpo.packing as packing
    monkeypatch.setattr(packing, "varlen_context", lambda decoder: contextlib.nullcontext())
    model = tiny.tiny_model("llama")
    model.set_attn_implementation("test_causal_ignoring_mask")
    reason = packing_fallback_reason(model)
    assert reason is not None and "test_causal_ignoring_mask" in reason and "apart" in reason
    rows = Dataset.from_list([{"prompt": "1 + 1 ="}])
    trainer = GRPOTrainer(model=model, processing_class=tiny.tokenizer(), reward_funcs=lambda completions, **k: [0.0],
                          args=GRPOConfig(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=2,
                                          padding_free=True),
                          train_dataset=rows)
    with pytest.warns(UserWarning, match="padded forward is used"):
        assert trainer.use_padding_free() is False
    assert trainer.padding_free_reason == reason
    off = GRPOTrainer(model=tiny.tiny_model("llama"), processing_class=tiny.tokenizer(), train_dataset=rows,
                      reward_funcs=lambda completions, **k: [0.0],
                      args=GRPOConfig(output_dir=str(tmp_path), num_generations=2, per_device_train_batch_size=2,
                                      padding_free=False))
    assert off.use_padding_free() is False and "padding_free is False" in off.padding_free_reason


def test_packed_forwards_use_varlen_attention_unless_the_model_has_it():
    from ahazero.grpo.packing import packs_sparsely, varlen_context
    from ahazero.models.varlen import NAME
    assert packs_sparsely("flash_attention_2") and packs_sparsely("flash_attention_3")
    assert packs_sparsely("kernels-community/flash-attn3") and packs_sparsely("flex_attention")
    assert not packs_sparsely("sdpa") and not packs_sparsely("eager")
    model = tiny.tiny_model("qwen2")
    with varlen_context(model.model):
        assert {m.config._attn_implementation for m in model.modules() if hasattr(m, "config")} == {NAME}
    assert model.config._attn_implementation == "sdpa"  # restored


# ------------------------------------------------------------------ one training step, packed or padded

def odd_token_reward(completion_ids, **kwargs):
    return [sum(t % 2 for t in ids) / max(len(ids), 1) for ids in completion_ids]


class VariedLengths:
    """The model's own rollouts, cut to very different lengths (a random tiny model seldom stops by
    itself): completion i keeps LENGTHS[i % 8] tokens, "stop" if cut, else "length"."""
    LENGTHS = [1, 12, 4, 9, 2, 12, 7, 1]

    def __init__(self, model, tokenizer):
        from ahazero.api import get_generator
        self.inner = get_generator(model, tokenizer)

    def generate(self, prompt_token_ids, params, adapter="default"):
        outputs = self.inner.generate(prompt_token_ids, params, adapter=adapter)
        for i, c in enumerate(c for out in outputs for c in out.outputs):
            keep = self.LENGTHS[i % len(self.LENGTHS)]
            if keep < len(c.token_ids):
                c.token_ids, c.logprobs, c.finish_reason = c.token_ids[:keep], c.logprobs[:keep], "stop"
        return outputs


class AllTruncated(VariedLengths):
    LENGTHS = [100]  # nothing is cut: every completion ends by length


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.save_tiny_model(tmp_path_factory.mktemp("qwen2") / "model", "qwen2")


@pytest.mark.parametrize("kw", [dict(beta=0.04, micro_batch_size=3, loss_type="grpo"),
                                dict(num_iterations=2, max_steps=2, mask_truncated_completions=True,
                                     use_gradient_checkpointing=True)])
@pytest.mark.slow
def test_training_gives_the_same_adapter_packed_or_padded(model_dir, tmp_path, kw):
    """SGD, so that the adapters differ by the learning rate times the gradients' difference (Adam's first
    step is about lr * sign(g), which turns a 1e-10 difference on a 1e-8 gradient into 1e-5)."""
    kw = dict(kw)
    checkpointing = kw.pop("use_gradient_checkpointing", False)
    data = load_gsm8k("train", path=str(tiny.GSM8K_DIR / "train.jsonl")).select(range(8))
    adapters, lengths = {}, {}
    for padding_free in (False, True):
        model, tok = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=512,
                                                       dtype=torch.float32)  # (bf16 by default on a GPU)
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0,
                                                 use_gradient_checkpointing=checkpointing)
        before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        args = GRPOConfig(**{**dict(output_dir=str(tmp_path / str(padding_free)), max_steps=1, num_generations=4,
                                    per_device_train_batch_size=8, gradient_accumulation_steps=1,
                                    max_prompt_length=None, max_completion_length=12, optim="sgd",
                                    learning_rate=1.0, seed=7, disable_tqdm=True, padding_free=padding_free), **kw})
        trainer = GRPOTrainer(model=model, processing_class=tok, args=args, train_dataset=data,
                              reward_funcs=odd_token_reward, generator=VariedLengths(model, tok))
        batches, _ = trainer.generate_and_score(trainer._next_prompts(2))  # what the run will see
        lengths[padding_free] = (batches[0].prompt_mask.sum(1).tolist(), batches[0].completion_mask.sum(1).tolist())
        trainer.consumed_prompts = 0
        trainer.train()
        assert trainer.use_padding_free() is padding_free
        adapters[padding_free] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
        assert max((adapters[padding_free][n] - before[n]).abs().max() for n in before) > 1e-3
    prompt_lens, completion_lens = lengths[True]
    assert len(set(prompt_lens)) > 1 and len(set(completion_lens)) > 1  # padding to save
    for name, w in adapters[True].items():
        torch.testing.assert_close(w, adapters[False][name], rtol=0, atol=1e-6, msg=lambda m: f"{name}: {m}")


def test_a_step_whose_completions_are_all_masked_leaves_the_adapter(model_dir, tmp_path):
    """mask_truncated_completions with every completion truncated: the packed forward has nothing to run,
    the loss is 0 without a graph, and the step changes nothing (as the padded step's zero gradients)."""
    data = load_gsm8k("train", path=str(tiny.GSM8K_DIR / "train.jsonl")).select(range(4))
    model, tok = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=512)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0, use_gradient_checkpointing=False)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=1, num_generations=2, per_device_train_batch_size=2,
                      max_prompt_length=None, max_completion_length=3, mask_truncated_completions=True, seed=7,
                      disable_tqdm=True, padding_free=True)
    trainer = GRPOTrainer(model=model, processing_class=tok, args=args, train_dataset=data,
                          reward_funcs=odd_token_reward, generator=AllTruncated(model, tok))
    trainer.train()
    assert trainer.use_padding_free() and trainer.state.log_history[-1]["loss"] == 0.0
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if "lora_" in n)


# ---------------------------------------------------------------- token-budget chunks and OOM splits

def test_token_budget_chunks():
    from ahazero.grpo.packing import token_budget_chunks
    assert token_budget_chunks([3, 3, 3, 3], 6) == [(0, 2), (2, 4)]
    assert token_budget_chunks([3, 10, 2, 2, 2], 6) == [(0, 1), (1, 2), (2, 5)]  # a long row alone
    assert token_budget_chunks([5], 1) == [(0, 1)]
    assert token_budget_chunks([], 4) == []
    for budget in (1, 7, 50):
        lengths = [int(x) for x in torch.randint(1, 20, (30,))]
        chunks = token_budget_chunks(lengths, budget)
        assert [i for a, b in chunks for i in range(a, b)] == list(range(30))  # every row once, in order
        assert all(b - a == 1 or sum(lengths[a:b]) <= budget for a, b in chunks)


def test_split_chunks_to_count_splits_the_chunk_of_most_tokens():
    from ahazero.grpo.packing import split_chunks_to_count, token_budget_chunks
    assert split_chunks_to_count([(0, 4)], [5] * 4, 2) == [(0, 2), (2, 4)]
    assert split_chunks_to_count([(0, 1), (1, 4)], [9, 2, 2, 2], 3) == [(0, 1), (1, 2), (2, 4)]  # [9] is one row
    assert split_chunks_to_count([(0, 3), (3, 5)], [1, 1, 1, 4, 4], 3) == [(0, 3), (3, 4), (4, 5)]  # 8 tokens > 3
    assert split_chunks_to_count([(0, 2), (2, 4)], [1] * 4, 2) == [(0, 2), (2, 4)]  # already there
    with pytest.raises(ValueError, match="cannot cut 2 rows into 3 chunks"):
        split_chunks_to_count([(0, 2)], [1, 1], 3)
    for count in range(1, 31):
        lengths = [int(x) for x in torch.randint(1, 20, (30,))]
        chunks = split_chunks_to_count(token_budget_chunks(lengths, 50), lengths, count)
        assert len(chunks) == max(count, len(token_budget_chunks(lengths, 50)))
        assert [i for a, b in chunks for i in range(a, b)] == list(range(30))  # every row once, in order


def test_capped_chunks_cuts_long_chunks_into_pieces_of_at_most_max_rows():
    from ahazero.grpo.packing import capped_chunks
    assert capped_chunks([(0, 5), (5, 6), (6, 9)], 2) == [(0, 2), (2, 4), (4, 5), (5, 6), (6, 8), (8, 9)]
    assert capped_chunks([(0, 5), (5, 6)], None) == [(0, 5), (5, 6)]
    for max_rows in range(1, 8):
        chunks = [(0, 3), (3, 10), (10, 11)]
        capped = capped_chunks(chunks, max_rows)
        assert [i for a, b in capped for i in range(a, b)] == list(range(11))  # every row once, in order
        assert all(0 < b - a <= max_rows for a, b in capped)
        assert all(any(a >= c and b <= d for c, d in chunks) for a, b in capped)  # no piece spans two chunks


@pytest.mark.slow
@pytest.mark.parametrize("failing_pass", ["policy", "reference"])
def test_an_out_of_memory_chunk_runs_again_in_smaller_chunks(model_dir, tmp_path, monkeypatch, failing_pass):
    """A chunk of more than 2 rows 'runs out of memory'. In the policy pass it does so halfway through its
    backward (a LoRA gradient already polluted): the step's gradients are dropped and its chunks run again,
    at most half as many rows each, until they fit (no gradient copy is kept to undo one chunk). In the
    reference pass (no gradients) the chunk is retried in halves. Either way the step equals one run in
    chunks of 2 rows."""
    import ahazero.grpo.trainer as trainer_module
    real, attempts = trainer_module.policy_logps, []

    def flaky(model, batch, *args, **kwargs):
        if torch.is_grad_enabled() != (failing_pass == "policy"):
            return real(model, batch, *args, **kwargs)
        attempts.append(len(batch))
        if len(batch) > 2:
            if torch.is_grad_enabled():
                lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
                (lora_b * 1000.0).sum().backward()  # a backward that got halfway
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (simulated)")
        return real(model, batch, *args, **kwargs)

    data = load_gsm8k("train", path=str(tiny.GSM8K_DIR / "train.jsonl")).select(range(8))
    adapters = {}
    for mode in ("split", "reference"):
        model, tok = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=512)
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0,
                                                 use_gradient_checkpointing=False)
        args = GRPOConfig(output_dir=str(tmp_path / mode), max_steps=1, num_generations=4,
                          per_device_train_batch_size=8, max_prompt_length=None, max_completion_length=12,
                          optim="sgd", learning_rate=1.0, seed=7, disable_tqdm=True, micro_batch_tokens=10**6,
                          micro_batch_size=None if mode == "split" else 2,
                          beta=0.04 if failing_pass == "reference" else 0.0)
        trainer = GRPOTrainer(model=model, processing_class=tok, args=args, train_dataset=data,
                              reward_funcs=odd_token_reward, generator=VariedLengths(model, tok))
        if mode == "split":
            trainer.split_on_oom = True  # as on CUDA
            monkeypatch.setattr(trainer_module, "policy_logps", flaky)
            with pytest.warns(UserWarning, match="out of memory on a chunk of 8 rows: chunks of at most 4 rows"):
                trainer.train()
            monkeypatch.undo()
            assert attempts == [8, 4, 2, 2, 2, 2]
            assert trainer.max_chunk_rows == 2 and trainer.micro_batch_tokens == 10**6 // 4
        else:
            trainer.train()
        adapters[mode] = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}
    for name, w in adapters["split"].items():
        torch.testing.assert_close(w, adapters["reference"][name], rtol=0, atol=1e-6, msg=name)


def test_under_fsdp2_an_out_of_memory_chunk_is_not_split(model_dir, tmp_path, monkeypatch):
    """One rank cannot split its chunk alone (the others would wait for passes they do not run): under
    FSDP2 the out-of-memory error stops the run at once, with the advice to lower micro_batch_tokens."""
    import ahazero.grpo.trainer as trainer_module
    attempts = []

    def out_of_memory(model, batch, *args, **kwargs):
        attempts.append(len(batch))
        raise torch.OutOfMemoryError("CUDA out of memory (simulated)")

    model, tok = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=512)
    args = GRPOConfig(output_dir=str(tmp_path), max_steps=1, num_generations=4, per_device_train_batch_size=4,
                      max_prompt_length=None, max_completion_length=4, beta=0.0, optim="sgd", disable_tqdm=True)
    trainer = GRPOTrainer(model=model, processing_class=tok, args=args, reward_funcs=odd_token_reward,
                          train_dataset=load_gsm8k("train", path=str(tiny.GSM8K_DIR / "train.jsonl")).select(range(2)))
    trainer.split_on_oom = True  # as on CUDA
    model.ahazero_fsdp = object()  # marked as grpo/fsdp.py's shard_model marks it (one process: no collective)
    monkeypatch.setattr(trainer_module, "policy_logps", out_of_memory)
    with pytest.raises(torch.OutOfMemoryError, match="Under FSDP2 a chunk that runs out of memory is not split"):
        trainer.train()
    assert attempts == [4]


def test_padded_to_shape_appends_sequences_of_their_own():
    from ahazero.grpo.packing import padded_to_shape
    ids, pos = torch.tensor([5, 6, 7, 8, 9]), torch.tensor([0, 1, 2, 0, 1])
    got_ids, got_pos = padded_to_shape(ids, pos, 12, 3)  # 7 tokens in 3 sequences: 3, 2, 2
    assert got_ids.tolist() == [5, 6, 7, 8, 9] + [5] * 7
    assert got_pos.tolist() == [0, 1, 2, 0, 1, 0, 1, 2, 0, 1, 0, 1]
    assert padded_to_shape(ids, pos, 6, 1)[1].tolist() == [0, 1, 2, 0, 1, 0]
    for tokens, pieces in [(5, 1), (7, 3), (9, 0)]:  # nothing to pad, fewer tokens than sequences, none
        with pytest.raises(ValueError, match="cannot pad"):
            padded_to_shape(ids, pos, tokens, pieces)


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_a_row_padded_for_the_graphs_gives_the_same_logps_and_grads(arch, monkeypatch):
    """Where the layers are graphed the packed row is padded to a grown shape with sequences of its own: the
    log-probs, entropy and LoRA gradients are those of the unpadded row."""
    from ahazero.models import layer_graphs
    model = lora_model(arch, "sdpa")
    batch = rollout_batch(PROMPT_LENS, COMPLETION_LENS, seed=2)
    want = logps_and_lora_grads(model, batch, padding_free=True)
    rows = []
    decoder = model.get_base_model().model
    assert layer_graphs.padded_row_shape(decoder, [4, 5]) is None  # on the CPU: rows as they are
    shape = layer_graphs.RowShape(tokens=256, sequences=9, bound=64)  # 3 more sequences than the row's 6
    monkeypatch.setattr(layer_graphs, "padded_row_shape", lambda decoder, lengths: layer_graphs.grown_row_shape(
        shape, lengths, quantum=64, bound_quantum=16))
    monkeypatch.setattr(trainer_module, "_run_decoder", lambda decoder, dtype, **inputs: rows.append(
        inputs["position_ids"][0].tolist()) or run_decoder(decoder, dtype, **inputs))
    got = logps_and_lora_grads(model, batch, padding_free=True)
    assert rows and all(len(r) == 256 and r.count(0) == 9 for r in rows)
    for g, w in zip(got[:2], want[:2]):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    for name, g in got[2].items():
        torch.testing.assert_close(g, want[2][name], rtol=1e-4, atol=1e-6, msg=name)
