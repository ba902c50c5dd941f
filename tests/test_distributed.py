"""Data parallel GRPO: 2 CPU processes with the gloo backend, as torchrun would start them (LoRA: DDP;
full fine-tuning: FSDP2).

Equivalence needs the same completions in both layouts. The trainer seeds each rank's rollout with its
own seed, and one seeded batch's draws depend on what else is in the batch, so the test's generator
samples each prompt's group on its own with a seed from the prompt's tokens: completions then depend on
the prompt and the weights only, whichever rank (or single process) samples them.
"""
import multiprocessing
import os
import socket
import time
import traceback
import zlib
from dataclasses import replace

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.tensor import DTensor

import tiny
from ahazero import FastLanguageModel, GRPOConfig, GRPOTrainer
from ahazero.api import get_generator
from ahazero.data import load_gsm8k
from ahazero.grpo import distributed


def odd_token_reward(completion_ids, **kwargs):
    return [sum(t % 2 for t in ids) / max(len(ids), 1) for ids in completion_ids]


def raising_on_rank_1(completion_ids, **kwargs):
    if distributed.rank() == 1:
        raise ZeroDivisionError("boom on rank 1")
    return odd_token_reward(completion_ids)


def stalling_on_rank_1(completion_ids, **kwargs):
    if distributed.rank() == 1:
        time.sleep(600)
    return odd_token_reward(completion_ids)


class PerPromptSeeded:
    """Samples each prompt's group alone, seeded by the prompt's tokens (layout-independent sampling)."""

    def __init__(self, inner):
        self.inner = inner

    def generate(self, prompt_token_ids, params, adapter=None):
        return [self.inner.generate([p], replace(params, seed=zlib.crc32(str(list(p)).encode())), adapter=adapter)[0]
                for p in prompt_token_ids]


# per-rank batch of 4 completions (1 prompt x 4), 2 accumulation steps; the single-process reference
# takes twice the batch. bnpo (per-step token normaliser), KL, row chunks and active clipping all
# depend on the global batch; SGD keeps the comparison linear in the gradients.
TRAIN = dict(max_steps=2, num_generations=4, gradient_accumulation_steps=2, max_prompt_length=96,
             max_completion_length=8, optim="sgd", learning_rate=2.0, max_grad_norm=0.11, loss_type="bnpo",
             beta=0.04, micro_batch_size=3, save_steps=2, logging_steps=1, seed=7, disable_tqdm=True)


# full fine-tuning: no reference model (beta 0); AdamW, so that checkpoints carry per-element state to
# gather and to cut into shards again (its first steps are lr * g / (|g| + eps): smooth in g, so the
# layouts' last-bit gradient differences stay far below the tolerance); two optimizer steps per rollout,
# so old-policy log-probs come from forwards without autograd; 4 steps, a checkpoint after each rollout.
FULL = dict(beta=0.0, optim="adamw_torch", learning_rate=1e-3, num_iterations=2, max_steps=4, save_steps=2)


def gsm8k(rows=range(32)):
    return load_gsm8k("train", path=str(tiny.GSM8K_DIR / "train.jsonl")).select(rows)


def train(model_dir, output_dir, reward, per_device_train_batch_size, lora=True, resume=None, rows=range(32), **kw):
    """LoRA (DDP under torchrun), or full fine-tuning (FSDP2 under torchrun) with FULL's settings, on the
    gsm8k `rows`."""
    model, tok = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=256)
    if lora:
        model = FastLanguageModel.get_peft_model(model, r=4, lora_alpha=8, random_state=0,
                                                 use_gradient_checkpointing=False)
    else:
        kw = {**FULL, **kw}
    args = GRPOConfig(output_dir=str(output_dir), per_device_train_batch_size=per_device_train_batch_size, **{**TRAIN, **kw})
    trainer = GRPOTrainer(model=model, processing_class=tok, args=args, train_dataset=gsm8k(rows), reward_funcs=reward,
                          generator=PerPromptSeeded(get_generator(model, tok)))
    state = trainer.train(resume_from_checkpoint=resume)
    weights = {n: whole(p).detach().clone() for n, p in model.named_parameters() if not lora or "lora_" in n}
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    return weights, state.log_history, sharded


def whole(p: torch.Tensor) -> torch.Tensor:
    """An FSDP2 shard's whole tensor (every rank gathers it), a plain tensor as it is."""
    return p.full_tensor() if isinstance(p, DTensor) else p


def _worker(rank, world, port, model_dir, out_dir, reward_name, timeout_s, lora=True, resume=None, train_kw=None):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    try:
        assert distributed.init_from_env(timeout_s=timeout_s) and distributed.world_size() == world
        weights, history, sharded = train(model_dir, out_dir / "run", globals()[reward_name], 4, lora=lora,
                                          ddp_timeout=timeout_s, **(train_kw or {}))
        result = {"weights": weights, "history": history, "sharded": sharded}
        if resume is not None:  # a second run, from a checkpoint that another number of ranks wrote
            result["resumed"] = train(model_dir, out_dir / "resumed", globals()[reward_name], 4, lora=lora,
                                      resume=resume, ddp_timeout=timeout_s)[0]
        torch.save(result, out_dir / f"rank{rank}.pt")
    except BaseException:
        (out_dir / f"rank{rank}.err").write_text(traceback.format_exc())
        raise
    finally:
        distributed.destroy()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(model_dir, out_dir, reward_name, timeout_s=60, world=2, wait_s=120, wait_for=None, lora=True,
           resume=None, train_kw=None):
    """Start `world` ranks and wait (at most wait_s) until the ranks `wait_for` (default all) have exited;
    the others are then killed, as torchrun would. Returns the exit codes (None: killed) and the seconds.
    train_kw: more arguments of `train` (GRPOConfig fields, rows)."""
    ctx = multiprocessing.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_worker, args=(r, world, port, model_dir, out_dir, reward_name, timeout_s, lora,
                                                     resume, train_kw))
             for r in range(world)]
    start = time.monotonic()
    for p in procs:
        p.start()
    waited = [procs[r] for r in (wait_for if wait_for is not None else range(world))]
    while any(p.is_alive() for p in waited) and time.monotonic() - start < wait_s:
        time.sleep(0.2)
    elapsed = time.monotonic() - start
    codes = [p.exitcode for p in procs]
    for p in procs:
        if p.is_alive():
            p.kill()
        p.join()
    return codes, elapsed


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return tiny.save_tiny_model(tmp_path_factory.mktemp("qwen2") / "model", "qwen2")


@pytest.mark.slow
def test_two_ranks_equal_one_process_with_twice_the_batch(model_dir, tmp_path):
    codes, _ = launch(model_dir, tmp_path, "odd_token_reward")
    errors = "\n".join(p.read_text() for p in tmp_path.glob("rank*.err"))
    assert codes == [0, 0], errors
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert not ranks[0]["sharded"]  # LoRA: replicated, adapter gradients all-reduced
    single, single_history, _ = train(model_dir, tmp_path / "single", odd_token_reward, 8)

    initial = FastLanguageModel.get_peft_model(FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=256)[0],
                                               r=4, lora_alpha=8, random_state=0, use_gradient_checkpointing=False)
    moved = max((single[n] - p).abs().max().item() for n, p in initial.named_parameters() if "lora_" in n)
    assert moved > 1e-3  # the comparison below is meaningful
    for name, w in single.items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name
        torch.testing.assert_close(ranks[0]["weights"][name], w, rtol=0, atol=1e-5, msg=name)

    # metrics are over all completions of both ranks, equal on every rank, and the single run's
    for r in range(2):
        assert [h["step"] for h in ranks[r]["history"]] == [1, 2]
    for dist_row, row in zip(ranks[0]["history"], single_history):
        for key in ("reward", "reward_std", "completions/mean_length", "completions/max_length", "loss", "kl",
                    "grad_norm", "entropy", "rewards/odd_token_reward/mean", "rewards/odd_token_reward/std"):
            assert dist_row[key] == pytest.approx(row[key], rel=1e-4, abs=1e-6), key
            assert ranks[1]["history"][dist_row["step"] - 1][key] == dist_row[key], key

    # only rank 0 wrote the shared output folder: one metrics row per step, one set of checkpoints
    run = tmp_path / "run"
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 2
    assert sorted(p.name for p in run.iterdir() if p.name.startswith("checkpoint")) == ["checkpoint-2"]


@pytest.mark.slow
def test_full_finetuning_on_two_ranks_with_fsdp2_equals_one_process_with_twice_the_batch(model_dir, tmp_path):
    single, single_history, _ = train(model_dir, tmp_path / "single", odd_token_reward, 8, lora=False)
    # the ranks train 4 steps from scratch, then steps 3 and 4 resumed from the single process's checkpoint-2
    codes, _ = launch(model_dir, tmp_path, "odd_token_reward", lora=False,
                      resume=str(tmp_path / "single" / "checkpoint-2"))
    errors = "\n".join(p.read_text() for p in tmp_path.glob("rank*.err"))
    assert codes == [0, 0], errors
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["sharded"] and ranks[1]["sharded"]  # FSDP2 trained it, not the all-reduce of whole gradients

    initial = FastLanguageModel.from_pretrained(str(model_dir), max_seq_length=256)[0]
    assert set(single) == {n for n, _ in initial.named_parameters()}  # every weight trained (embeddings tied)
    assert max((single[n] - p).abs().max().item() for n, p in initial.named_parameters()) > 1e-3
    for run in ("weights", "resumed"):
        for name, w in single.items():
            assert torch.equal(ranks[0][run][name], ranks[1][run][name]), (run, name)
            torch.testing.assert_close(ranks[0][run][name], w, rtol=0, atol=1e-5, msg=f"{run}: {name}")
    assert [h["step"] for h in ranks[0]["history"]] == [h["step"] for h in single_history] == [1, 2, 3, 4]
    for dist_row, row in zip(ranks[0]["history"], single_history):
        for key in ("reward", "completions/mean_length", "loss", "grad_norm", "entropy", "clip_ratio/region_mean"):
            assert dist_row[key] == pytest.approx(row[key], rel=1e-4, abs=1e-6), key

    # rank 0 wrote the single process's files: whole weights and AdamW moments, the same names and ids
    sharded_ckpt, single_ckpt = tmp_path / "run" / "checkpoint-4", tmp_path / "single" / "checkpoint-4"
    saved, expected = load_file(sharded_ckpt / "trainable.safetensors"), load_file(single_ckpt / "trainable.safetensors")
    assert list(saved) == list(expected)
    for name, w in expected.items():
        torch.testing.assert_close(saved[name], w, rtol=0, atol=1e-5, msg=name)
    opt, single_opt = (torch.load(c / "optimizer.pt") for c in (sharded_ckpt, single_ckpt))
    assert opt["param_groups"] == single_opt["param_groups"] and opt["state"].keys() == single_opt["state"].keys()
    for i, state in single_opt["state"].items():
        for key, value in state.items():
            torch.testing.assert_close(opt["state"][i][key], value, rtol=1e-4, atol=1e-9, msg=f"{i} {key}")


# FSDP2 with the token budget: rank 0 gets the short prompts (gsm8k rows 4 and 14: 61 and 65 tokens), rank 1
# the long ones (rows 11 and 7: 134 and 141), shuffle off. Padded rows of P + C tokens (C <= 8) in a budget
# of 300: rank 0 fits its 4 rows in 1 chunk, rank 1 needs 2 chunks of 2; rank 0 must split its chunk.
UNEVEN = dict(rows=[4, 11, 14, 7], shuffle_dataset=False, max_prompt_length=None, micro_batch_size=None,
              micro_batch_tokens=300, max_steps=2)


@pytest.mark.slow
def test_fsdp2_with_a_token_budget_splits_chunks_so_every_rank_runs_as_many(model_dir, tmp_path):
    from ahazero.grpo.packing import token_budget_chunks
    for C in range(1, 9):  # whatever the completions' padded width, the ranks' natural counts differ
        assert [len(token_budget_chunks([61 + C] * 4, 300)), len(token_budget_chunks([141 + C] * 4, 300))] == [1, 2]
    codes, elapsed = launch(model_dir, tmp_path, "odd_token_reward", timeout_s=20, wait_s=60, lora=False,
                            train_kw=UNEVEN)
    errors = "\n".join(p.read_text() for p in tmp_path.glob("rank*.err"))
    assert codes == [0, 0], (codes, elapsed, errors)  # no hang: a rank that ran fewer passes would stall the other
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    assert ranks[0]["sharded"] and ranks[1]["sharded"]
    single, single_history, _ = train(model_dir, tmp_path / "single", odd_token_reward, 8, lora=False, **UNEVEN)
    for name, w in single.items():
        assert torch.equal(ranks[0]["weights"][name], ranks[1]["weights"][name]), name
        torch.testing.assert_close(ranks[0]["weights"][name], w, rtol=0, atol=1e-5, msg=name)
    for dist_row, row in zip(ranks[0]["history"], single_history, strict=True):
        for key in ("loss", "grad_norm", "entropy", "completions/mean_length"):
            assert dist_row[key] == pytest.approx(row[key], rel=1e-4, abs=1e-6), key


@pytest.mark.slow
def test_a_reward_function_raising_on_one_rank_stops_both(model_dir, tmp_path):
    codes, elapsed = launch(model_dir, tmp_path, "raising_on_rank_1", timeout_s=30, wait_s=90)
    assert codes[0] not in (0, None) and codes[1] not in (0, None), codes
    assert "boom on rank 1" in (tmp_path / "rank1.err").read_text()
    assert "DistributedError" in (tmp_path / "rank0.err").read_text()  # failed at its next collective: no hang
    assert elapsed < 90


@pytest.mark.slow
def test_a_stuck_rank_makes_the_others_stop_after_ddp_timeout(model_dir, tmp_path):
    codes, elapsed = launch(model_dir, tmp_path, "stalling_on_rank_1", timeout_s=5, wait_s=60, wait_for=[0])
    assert codes[0] not in (0, None), codes  # rank 0 raised; rank 1, stuck in user code, is killed (torchrun does)
    err = (tmp_path / "rank0.err").read_text()
    assert "DistributedError" in err and "ddp_timeout=5 s" in err and "timed out" in err.lower()
    assert elapsed < 60
