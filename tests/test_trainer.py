"""GRPOTrainer end to end on the CPU with tiny real-architecture models and real GSM8K rows."""
import json
import types
import warnings

import pytest
import torch
from safetensors.torch import load_file
from torch.utils._python_dispatch import TorchDispatchMode

import tiny
from ahazero import FastLanguageModel, GRPOConfig, GRPOTrainer
from ahazero.data import load_gsm8k
from ahazero.grpo.checkpoint import CheckpointError
from ahazero.rewards import RewardError

TRL_METRICS = ["reward", "reward_std", "frac_reward_zero_std", "completions/mean_length", "completions/min_length",
               "completions/max_length", "completions/clipped_ratio", "entropy", "clip_ratio/low_mean",
               "clip_ratio/high_mean", "clip_ratio/region_mean", "loss", "grad_norm", "learning_rate", "step_time",
               "sampling/logp_diff/mean", "sampling/logp_diff/max"]


def odd_token_reward(completion_ids, **kwargs):
    """Varies between completions of random models, so advantages are non-zero."""
    return [sum(t % 2 for t in ids) / max(len(ids), 1) for ids in completion_ids]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.save_tiny_model(tmp_path_factory.mktemp("qwen2") / "model", "qwen2")


@pytest.fixture(scope="module")
def gsm8k():
    return load_gsm8k("train", path=str(tiny.GSM8K_DIR / "train.jsonl")).select(range(32))


def make_model(model_dir, seed=0):
    model, tok = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=256)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=seed,
                                             use_gradient_checkpointing=False)
    return model, tok


def config(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), max_steps=3, num_generations=4, per_device_train_batch_size=4,
                gradient_accumulation_steps=2, max_prompt_length=96, max_completion_length=8, learning_rate=5e-3,
                save_steps=2, logging_steps=1, seed=7)
    base.update(kw)
    return GRPOConfig(**base)


def adapter_weights(model):
    return {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" in n}


def test_three_steps_change_adapter_and_write_metrics_and_checkpoints(model_dir, gsm8k, tmp_path):
    model, tok = make_model(model_dir)
    before = adapter_weights(model)
    args = config(tmp_path, beta=0.04, micro_batch_size=3, loss_type="grpo")
    trainer = GRPOTrainer(model=model, processing_class=tok, args=args, train_dataset=gsm8k,
                          reward_funcs=[odd_token_reward, "numeric_correctness_reward_func"])
    state = trainer.train()
    assert state.global_step == 3
    after = adapter_weights(model)
    assert any(not torch.equal(before[n], after[n]) for n in before)
    rows = [json.loads(line) for line in (tmp_path / "out" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3]
    for key in TRL_METRICS + ["kl", "rewards/odd_token_reward/mean", "rewards/odd_token_reward/std",
                              "rewards/numeric_correctness_reward_func/mean"]:
        assert key in rows[-1], key
    assert all(r["completions/max_length"] <= 8 for r in rows)
    for r in rows:  # the step's time, split into the rollout and the update
        assert r["timing/rollout_s"] > 0 and r["timing/update_s"] > 0
        assert r["timing/rollout_s"] + r["timing/update_s"] == pytest.approx(r["step_time"])
        assert ("memory/peak_after_rollout_gib" in r) == torch.cuda.is_available()  # (on a GPU only)
    # engine and trainer share the math: within 1e-3 in float32 (the CPU); a 16-bit model (a GPU loads bf16)
    # differs by a rounding of its logits (1.96e-3 on an H100, eleventh session)
    assert rows[-1]["sampling/logp_diff/max"] < (1e-3 if model.dtype == torch.float32 else 1e-2)
    assert state.log_history[-1]["step"] == 3
    ckpts = sorted(p.name for p in (tmp_path / "out").iterdir() if p.name.startswith("checkpoint-"))
    assert ckpts == ["checkpoint-2", "checkpoint-3"]
    saved = load_file(str(tmp_path / "out" / "checkpoint-3" / "adapter_model.safetensors"))
    assert saved and all(torch.isfinite(t).all() for t in saved.values())


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_run(model_dir, gsm8k, tmp_path):
    straight, tok = make_model(model_dir)
    GRPOTrainer(model=straight, processing_class=tok, args=config(tmp_path / "a", max_steps=4),
                train_dataset=gsm8k, reward_funcs=odd_token_reward).train()

    first, tok = make_model(model_dir)
    GRPOTrainer(model=first, processing_class=tok, args=config(tmp_path / "b", max_steps=4), train_dataset=gsm8k,
                reward_funcs=odd_token_reward, callbacks=[_StopAt(2)]).train()
    assert (tmp_path / "b" / "out" / "checkpoint-2").is_dir()

    resumed, tok = make_model(model_dir, seed=123)  # different init: everything must come from the checkpoint
    GRPOTrainer(model=resumed, processing_class=tok, args=config(tmp_path / "b", max_steps=4),
                train_dataset=gsm8k, reward_funcs=odd_token_reward).train(resume_from_checkpoint=True)
    a, b = adapter_weights(straight), adapter_weights(resumed)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def fails_in_step(holder: dict, step: int, reward=odd_token_reward):
    """`reward`, except that it raises once, in the rollout of step `step` (1-based) of holder["trainer"]."""
    def flaky(completion_ids, **kwargs):
        if holder["trainer"].state.global_step == step - 1 and not holder.get("raised"):
            holder["raised"] = True
            raise ZeroDivisionError("boom")
        return reward(completion_ids, **kwargs)
    return flaky


def train_until_step_3_fails(model_dir, gsm8k, out) -> GRPOTrainer:
    model, tok = make_model(model_dir)
    holder = {}
    holder["trainer"] = trainer = GRPOTrainer(model=model, processing_class=tok,
                                              args=config(out, max_steps=4, save_steps=100), train_dataset=gsm8k,
                                              reward_funcs=fails_in_step(holder, 3))
    with pytest.raises(RewardError), pytest.warns(UserWarning, match=r"step 3 failed \(RewardError\): wrote .*checkpoint-2"):
        trainer.train()
    return trainer


def test_a_failed_step_writes_the_last_completed_steps_checkpoint(model_dir, gsm8k, tmp_path):
    trainer = train_until_step_3_fails(model_dir, gsm8k, tmp_path)
    out = tmp_path / "out"
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]  # save_steps 100
    state = json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())
    prompts_per_step = trainer.args.prompts_per_step * trainer.args.gradient_accumulation_steps
    assert state["global_step"] == 2 and state["consumed_prompts"] == 2 * prompts_per_step  # the failed step's start
    assert [row["step"] for row in state["log_history"]] == [1, 2]


@pytest.mark.slow
def test_resuming_after_a_failed_step_reproduces_the_uninterrupted_run(model_dir, gsm8k, tmp_path):
    straight, tok = make_model(model_dir)
    GRPOTrainer(model=straight, processing_class=tok, args=config(tmp_path / "a", max_steps=4, save_steps=100),
                train_dataset=gsm8k, reward_funcs=odd_token_reward).train()
    train_until_step_3_fails(model_dir, gsm8k, tmp_path / "b")
    resumed, tok = make_model(model_dir, seed=123)  # different init: everything must come from the checkpoint
    GRPOTrainer(model=resumed, processing_class=tok, args=config(tmp_path / "b", max_steps=4, save_steps=100),
                train_dataset=gsm8k, reward_funcs=odd_token_reward).train(resume_from_checkpoint=True)
    a, b = adapter_weights(straight), adapter_weights(resumed)
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=0, atol=1e-6, msg=name)


def test_a_failure_inside_the_optimizer_update_writes_no_checkpoint(model_dir, gsm8k, tmp_path, monkeypatch):
    """Weights between two steps (one parameter updated, then the error) belong to no step: nothing is written."""
    import ahazero.grpo.trainer as trainer_module
    make_optimizer = trainer_module.make_optimizer

    def failing_in_step_3(params, args):
        optimizer, calls = make_optimizer(params, args), {"n": 0}
        step = optimizer.step

        def half_step(self, *a, **k):
            calls["n"] += 1
            if calls["n"] == 3:
                with torch.no_grad():
                    params[0].add_(1.0)
                raise RuntimeError("failed half-way through the update")
            return step(*a, **k)
        optimizer.step = types.MethodType(half_step, optimizer)  # a bound method, as the LR scheduler wraps it
        return optimizer

    monkeypatch.setattr(trainer_module, "make_optimizer", failing_in_step_3)
    model, tok = make_model(model_dir)
    trainer = GRPOTrainer(model=model, processing_class=tok, args=config(tmp_path, max_steps=4, save_steps=100),
                          train_dataset=gsm8k, reward_funcs=odd_token_reward)
    with warnings.catch_warnings(record=True) as caught, pytest.raises(RuntimeError, match="half-way"):
        warnings.simplefilter("always")
        trainer.train()
    assert not any("failed" in str(w.message) for w in caught)
    assert not any(p.name.startswith("checkpoint") for p in (tmp_path / "out").iterdir())


class _StopAt:
    def __init__(self, step):
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step >= self.step:
            control.should_training_stop = True


class _VocabTensorWatch(TorchDispatchMode):
    """Records the largest op output whose last dimension is the vocabulary, and its rank."""

    def __init__(self, vocab):
        super().__init__()
        self.vocab, self.largest, self.ranks = vocab, 0, set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else [out]):
            if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[-1] == self.vocab:
                self.largest = max(self.largest, t.numel())
                self.ranks.add(t.dim())
        return out


@pytest.mark.slow
def test_training_step_never_materialises_batch_by_seq_by_vocab(model_dir, gsm8k, tmp_path):
    model, tok = make_model(model_dir)
    args = config(tmp_path, max_completion_length=64, gradient_accumulation_steps=1, num_generations=8,
                  per_device_train_batch_size=8, beta=0.04)
    trainer = GRPOTrainer(model=model, processing_class=tok, args=args, train_dataset=gsm8k,
                          reward_funcs=odd_token_reward)
    trainer.optimizer = torch.optim.SGD(trainer.trainable_parameters, lr=0.0)
    trainer.scheduler = torch.optim.lr_scheduler.LambdaLR(trainer.optimizer, lambda s: 1.0)
    batches, _ = trainer.generate_and_score(trainer._next_prompts(1))
    n_tokens = batches[0].completion_ids.numel()
    vocab = model.get_base_model().lm_head.weight.shape[0]
    watch = _VocabTensorWatch(vocab)
    with watch:
        trainer.optimizer_step(batches)
    assert watch.ranks <= {2}, "a [N, T, V] tensor was made"
    assert watch.largest < n_tokens * vocab


def test_truncates_long_prompts_from_the_left_with_one_warning(model_dir, gsm8k, tmp_path):
    model, tok = make_model(model_dir)
    trainer = GRPOTrainer(model=model, processing_class=tok, args=config(tmp_path, max_prompt_length=16),
                          train_dataset=gsm8k, reward_funcs=odd_token_reward)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        batches, _ = trainer.generate_and_score(trainer._next_prompts(2))
        trainer.generate_and_score(trainer._next_prompts(2))
    assert sum("truncated from the left" in str(w.message) for w in caught) == 1
    assert batches[0].prompt_ids.shape[1] == 16


def test_failing_reward_function_stops_with_its_name_and_keeps_checkpoints(model_dir, gsm8k, tmp_path):
    calls = {"n": 0}

    def flaky_reward(completions, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise ZeroDivisionError("boom")
        return [0.0] * len(completions)

    model, tok = make_model(model_dir)
    args = config(tmp_path, save_steps=1, gradient_accumulation_steps=1)
    trainer = GRPOTrainer(model=model, processing_class=tok, args=args, train_dataset=gsm8k,
                          reward_funcs=[odd_token_reward, flaky_reward])
    with pytest.raises(RewardError, match="flaky_reward"):
        trainer.train()
    assert (tmp_path / "out" / "checkpoint-2" / "trainer_state.json").is_file()


@pytest.mark.parametrize("bad, match", [
    (lambda completions, **k: [1.0], "flaky|values|2|length|number"),
    (lambda completions, **k: ["x"] * len(completions), "str|number|float"),
])
def test_reward_function_bad_output_is_an_error(model_dir, gsm8k, tmp_path, bad, match):
    model, tok = make_model(model_dir)
    trainer = GRPOTrainer(model=model, processing_class=tok, args=config(tmp_path), train_dataset=gsm8k,
                          reward_funcs=bad)
    with pytest.raises(RewardError, match="<lambda>"):
        trainer.train()


def test_missing_dataset_column_is_an_error_before_the_first_step(model_dir, gsm8k, tmp_path):
    def needs_solution(completions, solution, **kwargs):
        return [0.0] * len(completions)

    model, tok = make_model(model_dir)
    with pytest.raises(RewardError, match="needs_solution.*solution"):
        GRPOTrainer(model=model, processing_class=tok, args=config(tmp_path), train_dataset=gsm8k,
                    reward_funcs=needs_solution)


def test_corrupt_checkpoint_is_a_clear_error(model_dir, gsm8k, tmp_path):
    model, tok = make_model(model_dir)
    args = config(tmp_path, max_steps=2)
    GRPOTrainer(model=model, processing_class=tok, args=args, train_dataset=gsm8k,
                reward_funcs=odd_token_reward).train()
    (tmp_path / "out" / "checkpoint-2" / "optimizer.pt").write_bytes(b"not a checkpoint")
    trainer = GRPOTrainer(model=model, processing_class=tok, args=config(tmp_path, max_steps=3),
                          train_dataset=gsm8k, reward_funcs=odd_token_reward)
    with pytest.raises(CheckpointError, match="optimizer.pt"):
        trainer.train(resume_from_checkpoint=True)
    with pytest.raises(CheckpointError, match="no complete checkpoint"):
        trainer.args.output_dir = str(tmp_path / "empty")
        trainer.train(resume_from_checkpoint=True)


def test_killed_checkpoint_write_leaves_the_previous_one_chosen(model_dir, gsm8k, tmp_path):
    from ahazero.grpo.checkpoint import list_checkpoints
    model, tok = make_model(model_dir)
    GRPOTrainer(model=model, processing_class=tok, args=config(tmp_path, max_steps=2), train_dataset=gsm8k,
                reward_funcs=odd_token_reward).train()
    half_written = tmp_path / "out" / "checkpoint-4.tmpabc"
    half_written.mkdir()
    (half_written / "optimizer.pt").write_bytes(b"partial")
    assert [p.name for p in list_checkpoints(tmp_path / "out")] == ["checkpoint-2"]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_other_architectures_train(arch, gsm8k, tmp_path):
    path = tiny.save_tiny_model(tmp_path / "m", arch)
    model, tok = make_model(path)
    before = adapter_weights(model)
    GRPOTrainer(model=model, processing_class=tok, args=config(tmp_path, max_steps=1, num_iterations=1,
                                                                importance_sampling_level="sequence"),
                train_dataset=gsm8k, reward_funcs=odd_token_reward).train()
    assert any(not torch.equal(before[n], p) for n, p in adapter_weights(model).items())


def test_num_iterations_reuses_rollouts_with_old_logps(model_dir, gsm8k, tmp_path):
    model, tok = make_model(model_dir)
    args = config(tmp_path, max_steps=2, num_iterations=2, learning_rate=5e-2, epsilon=0.01)
    state = GRPOTrainer(model=model, processing_class=tok, args=args, train_dataset=gsm8k,
                        reward_funcs=odd_token_reward).train()
    first, second = state.log_history
    assert first["reward"] == second["reward"]  # same rollouts, two optimizer steps
    assert "sampling/logp_diff/mean" not in second
    assert second["clip_ratio/region_mean"] > 0  # the policy moved away from the old log-probs


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="num_generations"):
        GRPOConfig(num_generations=1)
    with pytest.raises(ValueError, match="loss_type"):
        GRPOConfig(loss_type="ppo")
    with pytest.raises(ValueError, match="per_device_train_batch_size"):
        GRPOConfig(num_generations=4, per_device_train_batch_size=6)
    with pytest.warns(UserWarning, match="raised to 6"):
        assert GRPOConfig(num_generations=6, per_device_train_batch_size=1).per_device_train_batch_size == 6
    assert GRPOConfig(scale_rewards=False).scale_rewards == "none"
    assert GRPOConfig(epsilon=0.3).epsilon_high == 0.3
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match="mlp_tile_tokens"):
            GRPOConfig(mlp_tile_tokens=bad)


def test_mlp_tile_tokens_reach_the_tiled_mlps_and_warn_where_none_is_tiled(model_dir, gsm8k, tmp_path):
    model, tok = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=256)
    model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, use_gradient_checkpointing="unsloth")
    GRPOTrainer(model=model, processing_class=tok, args=config(tmp_path, mlp_tile_tokens=64), train_dataset=gsm8k,
                reward_funcs=odd_token_reward)
    tiles = [m._ahazero_tile_tokens for m in model.modules() if "_ahazero_untiled_forward" in m.__dict__]
    assert tiles and set(tiles) == {64}
    plain, tok = make_model(model_dir)  # no offloaded checkpointing: no MLP is tiled
    with pytest.warns(UserWarning, match="mlp_tile_tokens has no effect"):
        GRPOTrainer(model=plain, processing_class=tok, args=config(tmp_path, mlp_tile_tokens=64),
                    train_dataset=gsm8k, reward_funcs=odd_token_reward)


def test_reward_timeouts_reach_the_metrics(model_dir, gsm8k, tmp_path):
    import time

    def slow_reward(completions, **kwargs):
        time.sleep(2.0)
        return [1.0] * len(completions)

    slow_reward.reward_timeout = 0.1
    model, tok = make_model(model_dir)
    state = GRPOTrainer(model=model, processing_class=tok, args=config(tmp_path, max_steps=1),
                        train_dataset=gsm8k, reward_funcs=[odd_token_reward, slow_reward]).train()
    row = state.log_history[-1]
    assert row["rewards/slow_reward/timeouts"] == 8  # every completion of the step: scored NaN, not 1.0
    assert row["rewards/odd_token_reward/mean"] > 0


def test_step_statistics_summed_on_the_device_equal_the_per_chunk_sums():
    """_StatSums keeps the chunks' sums as tensors and reads them back once: the same metrics as adding
    each chunk's numbers on the host."""
    from ahazero.grpo.batch import build_batch
    from ahazero.grpo.trainer import _StatSums
    g = torch.Generator().manual_seed(4)
    batch = build_batch([[5, 6, 7], [8, 9]], [[11, 12, 13, 14], [15, 16]], [[-0.5, -1.0, -0.2, -2.0], [-0.1, -0.3]],
                        [False, True], torch.tensor([1.0, -1.0]), pad_id=0)
    sums, expected, maximum = _StatSums(), {}, 0.0
    for chunk, loss in ((batch.rows(0, 1), 0.25), (batch.rows(1, 2), -0.75)):
        logps = -torch.rand(chunk.completion_ids.shape, generator=g)  # [n, C]
        entropy = torch.rand(chunk.completion_ids.shape, generator=g)
        stats = {"tokens": chunk.completion_mask.sum(), "clip_low": torch.tensor(1.0), "clip_total": torch.tensor(3.0)}
        sums.add(torch.tensor(loss), stats, entropy, logps, chunk, first_iteration=True)
        diff = (logps - chunk.sampling_logps).abs() * chunk.completion_mask
        for k, v in {"loss": loss, **stats, "entropy": (entropy * chunk.completion_mask).sum(),
                     "logp_diff": diff.sum(), "logp_diff_tokens": chunk.completion_mask.sum()}.items():
            expected[k] = expected.get(k, 0.0) + float(v)
        maximum = max(maximum, diff.max().item())
    m = sums.metrics(with_kl=False)
    assert sums.loss == pytest.approx(expected["loss"]) and m["loss"] == pytest.approx(-0.5)
    assert m["entropy"] == pytest.approx(expected["entropy"] / expected["tokens"])
    assert m["clip_ratio/low_mean"] == pytest.approx(2.0 / 6.0)
    assert m["sampling/logp_diff/mean"] == pytest.approx(expected["logp_diff"] / expected["logp_diff_tokens"])
    assert m["sampling/logp_diff/max"] == pytest.approx(maximum)
