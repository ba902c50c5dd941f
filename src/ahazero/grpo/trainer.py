"""GRPOTrainer: the loop of DeepSeekMath's GRPO (and the R1-Zero recipe), with TRL's API.

One optimizer step: take prompts -> the rollout backend samples `num_generations` completions per prompt
-> reward functions score them -> group-relative advantages -> the clipped policy loss (plus a k3 KL to
the base model, which is the same weights with the adapters off) computed from hidden states a chunk of
rows at a time -> backward -> clip -> optimizer step. The backend reads the same parameter tensors, so
the next rollout sees the update with no copy.

Under torchrun (see grpo/distributed.py) each of W ranks takes its own prompts of a step (rank r: prompts
r, r+W, ... of the global list, all num_generations completions of a prompt on one rank), per_device_train_batch_size
stays per rank (TRL's meaning), and the update is the single-process update over the W-times-larger batch:
loss normalisers from the global counts, trainable gradients summed over ranks before clipping, metrics
over all completions. Rank 0 alone writes metrics, the live table and checkpoints; every rank resumes
from the same checkpoint, on the same or another number of ranks (the data position is global). Full
fine-tuning (no adapters) is sharded with FSDP2 there (grpo/fsdp.py): gradients are reduce-scattered in the
backward instead, and each rollout generates from the weights all-gathered for it.
"""
from __future__ import annotations

import contextlib
import functools
import math
import random
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from transformers import TrainerControl, TrainerState, get_scheduler

from ..data.prompts import is_conversational, tokenize_prompts
from ..engine.select import make_generator
from ..engine.types import SamplingParams
from ..models import layer_graphs, tiled_mlp
from ..models.lora import base_model_context, decoder_and_head, fuse_lora_forwards, is_peft_model
from ..models.lean_norm import lean_rms_norms
from ..models.loader import offload_context
from ..models.rope import fast_rope
from ..rewards import check_columns, resolve_reward_func, reward_func_name, run_reward_funcs
from . import checkpoint as ckpt
from . import distributed as dist
from . import fsdp
from .advantages import group_advantages
from .batch import RolloutBatch, build_batch
from .config import GRPOConfig
from .logprobs import chunked_token_logprobs
from .loss import aggregate_loss, loss_normalizers, normalizers_from_counts, per_token_loss
from .packing import (capped_chunks, pack_rollouts, packing_fallback_reason, padded_to_shape,
                      split_chunks_to_count, token_budget_chunks, unpack_to_rows, varlen_context)
from .optimizers import AdamW8bit, PagedAdamW32bit
from .progress import MetricsLogger, NullLogger


class GRPOTrainer:
    def __init__(self, model, processing_class=None, reward_funcs=None, args: GRPOConfig | None = None,
                 train_dataset=None, eval_dataset=None, callbacks=None, peft_config=None, tokenizer=None,
                 generator=None):
        self.args = args if args is not None else GRPOConfig()
        self.model = model
        self.tokenizer = processing_class or tokenizer or getattr(getattr(model, "ahazero", None), "tokenizer", None)
        if self.tokenizer is None:
            raise ValueError("GRPOTrainer needs processing_class (the tokenizer)")
        if peft_config is not None:
            raise ValueError("pass a model from FastLanguageModel.get_peft_model instead of peft_config")
        self.reward_funcs = _resolve_reward_funcs(reward_funcs)
        self.reward_names = [reward_func_name(f) for f in self.reward_funcs]
        self.reward_weights = _reward_weights(self.args.reward_weights, len(self.reward_funcs))
        self.train_dataset = _check_dataset(train_dataset)
        check_columns(self.reward_funcs, list(self.train_dataset.column_names))
        if self.args.beta > 0 and not is_peft_model(model):
            raise ValueError("beta > 0 needs LoRA adapters: the reference policy is the base model with the "
                             "adapters off (ahazero keeps no second copy of the weights)")
        _check_lengths(model, self.args)
        dist.init_from_env(timeout_s=self.args.ddp_timeout)  # under torchrun; a no-op otherwise
        self.rank, self.world_size = dist.rank(), dist.world_size()
        self.callbacks = list(callbacks or [])
        self.generator = generator or _default_generator(model, self.tokenizer)
        self.adapter = "default" if is_peft_model(model) else None
        if self.adapter is not None:
            fuse_lora_forwards(model)  # LoRA products in the model's dtype, scale and add in one addmm
        lean_rms_norms(decoder_and_head(model)[0])  # norms keep their 16-bit input, not a float32 copy
        fast_rope(decoder_and_head(model)[0])  # RoPE in one kernel a tensor and pass, rounded as transformers'
        layer_graphs.allow(model, self.args.layer_graphs)  # offloaded layers replayed from CUDA graphs
        if tiled_mlp.set_tile_tokens(model, self.args.mlp_tile_tokens) == 0 and self.args.mlp_tile_tokens:
            warnings.warn("GRPOConfig.mlp_tile_tokens has no effect: no MLP of this model runs by tiles (they do "
                          "under offloaded checkpointing, use_gradient_checkpointing='unsloth', for Llama, Mistral, "
                          "Qwen2 and Qwen3 MLPs without LoRA dropout)", stacklevel=2)
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.device = next(model.parameters()).device
        self.state = TrainerState()
        self.control = TrainerControl()
        self.optimizer = self.scheduler = None
        self._warned_truncation = False
        self.micro_batch_tokens = self.args.micro_batch_tokens  # halved after an out-of-memory split
        self.max_chunk_rows: int | None = None  # rows per chunk at most, once a chunk ran out of memory
        self.split_on_oom = self.device.type == "cuda"  # out-of-memory chunks are split and retried
        self.autocast_dtype = _autocast_dtype(model) if self.args.lora_autocast else None
        self.padding_free_reason: str | None = None  # why the padded forward is used (set at the first forward)
        self._padding_free: bool | None = None
        self.consumed_prompts = 0
        self.nonfinite_in_a_row = 0
        # what a checkpoint written after a failed step holds (_checkpoint_after_failure): the step, data position
        # and random states at the start of the last rollout; the step of the last checkpoint written or resumed;
        # whether the optimizer has changed the weights of a step that is not counted yet
        self._resume_point: tuple[int, int, dict] | None = None
        self._saved_step = 0
        self._mid_update = False
        if self.world_size > 1 and not is_peft_model(model):
            self._shard_for_full_finetuning()

    def _shard_for_full_finetuning(self) -> None:
        """FSDP2 (grpo/fsdp.py) instead of all-reducing whole gradients. Its forwards and backwards are
        collectives, so every rank must run as many as the others: `_chunks` makes the counts equal, and
        a chunk that runs out of memory is not split (one rank cannot change its count alone): it raises."""
        fsdp.check_supported(self.model, self.args.optim)
        fsdp.shard_model(self.model)
        self.generator = fsdp.gather_for_rollouts(self.model, self.generator)
        self.split_on_oom = False

    # ---------------------------------------------------------------------------------------------
    @property
    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.model.parameters() if p.requires_grad]

    def total_steps(self) -> int:
        a = self.args
        if a.max_steps > 0:
            return a.max_steps
        prompts_per_rollout = a.prompts_per_step * a.gradient_accumulation_steps * self.world_size
        rollouts = math.ceil(a.num_train_epochs * len(self.train_dataset) / prompts_per_rollout)
        return rollouts * a.num_iterations

    def train(self, resume_from_checkpoint=None):
        a = self.args
        _seed_everything(a.seed)
        total = self.total_steps()
        self.optimizer = make_optimizer(self.trainable_parameters, a)
        self.scheduler = get_scheduler(a.lr_scheduler_type, self.optimizer,
                                       num_warmup_steps=a.warmup_steps or math.ceil(a.warmup_ratio * total),
                                       num_training_steps=total)
        self.state = TrainerState(max_steps=total, logging_steps=a.logging_steps, save_steps=a.save_steps,
                                  is_world_process_zero=self.rank == 0, is_local_process_zero=dist.local_rank() == 0)
        resume = ckpt.resolve_checkpoint(resume_from_checkpoint, a.output_dir)
        if resume is None and self.rank == 0 and (archived := ckpt.archive_previous_run(a.output_dir)) is not None:
            warnings.warn(f"{a.output_dir} held an earlier run: moved it to {archived} (pass "
                          "resume_from_checkpoint=True to continue it instead)", stacklevel=2)
        if resume is not None:
            saved = ckpt.load_checkpoint(resume, self.model, self.optimizer, self.scheduler)
            self.state.global_step = saved["global_step"]
            self.state.log_history = saved["log_history"]
            self.consumed_prompts = saved["consumed_prompts"]
            self._saved_step = self.state.global_step
        if self.rank == 0:
            logger = MetricsLogger(a.output_dir, total, self.reward_names, with_kl=a.beta > 0, report_to=a.report_to,
                                   logging_dir=a.logging_dir, live=None if not a.disable_tqdm else False)
        else:
            logger = NullLogger()
        self._callback("on_train_begin")
        logger.start(self.state.global_step)
        try:
            with _StopOnSignal(self.control) as stop:
                while self.state.global_step < total and not self.control.should_training_stop:
                    self._rollout_and_update(total, logger)
                    if self.world_size > 1:  # a signal or callback on any rank stops every rank at the same step
                        stop_flag = torch.tensor([float(self.control.should_training_stop)])
                        self.control.should_training_stop = bool(dist.all_reduce_max(stop_flag).item())
        except Exception as e:
            self._checkpoint_after_failure(e)
            if isinstance(e, torch.cuda.OutOfMemoryError):
                raise torch.cuda.OutOfMemoryError(self._oom_advice()) from e
            raise
        finally:
            logger.close()
        if stop.signal_name:
            logger.print(f"{stop.signal_name} received: saving a final checkpoint and stopping")
        if self.state.global_step % a.save_steps != 0 or stop.signal_name:
            self.save_checkpoint()
        self._callback("on_train_end")
        return self.state

    def _checkpoint_after_failure(self, error: Exception) -> None:
        """A step failed with an exception (not a signal: those stop at the step's end and save): write the
        last completed step's checkpoint if none holds it yet, so that the steps since the last save are not
        lost. Only where that state is whole: one process (under torchrun the other ranks may be inside a
        collective), no optimizer update applied to a step not yet counted, and none of the failed rollout's
        iterations done. The data position and random states are those at the failed step's start, so a
        resumed run takes that step as the uninterrupted run would have."""
        if self.world_size > 1 or self._resume_point is None or self._mid_update:
            return
        step, consumed, rng = self._resume_point
        if step != self.state.global_step or step <= self._saved_step:
            return
        self.consumed_prompts = consumed
        try:
            path = self.save_checkpoint(rng=rng)
        except Exception as e:  # noqa: BLE001 - the step's own error is raised next; say why nothing was written
            warnings.warn(f"could not write a checkpoint after step {step + 1} failed ({type(e).__name__}: {e})",
                          stacklevel=3)
            return
        warnings.warn(f"step {step + 1} failed ({type(error).__name__}): wrote {path}, the last completed step "
                      "(resume_from_checkpoint=True continues from it)", stacklevel=3)

    def _oom_advice(self) -> str:
        a = self.args
        advice = _OOM_ADVICE.format(g=a.num_generations, c=a.max_completion_length, b=a.per_device_train_batch_size)
        if fsdp.is_sharded(self.model):
            advice += (" Under FSDP2 a chunk that runs out of memory is not split and retried (every rank must "
                       f"run as many chunks): lower micro_batch_tokens ({self.micro_batch_tokens}) or set "
                       "micro_batch_size.")
        return advice

    # ---------------------------------------------------------------------------------------------
    def _rollout_and_update(self, total: int, logger: MetricsLogger) -> None:
        a = self.args
        if self.world_size == 1:
            self._resume_point = (self.state.global_step, self.consumed_prompts, ckpt.rng_state())
        t0 = time.perf_counter()
        rows = self._next_prompts(a.prompts_per_step * a.gradient_accumulation_steps)
        batches, metrics = self.generate_and_score(rows)
        generation_time = time.perf_counter() - t0
        rollout_peak = self._peak_gib()  # the most allocated so far, once the rollout is done
        for iteration in range(a.num_iterations):
            t1 = time.perf_counter()
            step_metrics = self.optimizer_step(batches, first_iteration=iteration == 0)
            self.state.global_step += 1
            self._mid_update = False
            self.state.epoch = self.consumed_prompts / len(self.train_dataset)
            step_metrics.update(metrics)
            update_time = time.perf_counter() - t1  # forward, backward and optimizer step (synchronised by .item())
            step_metrics["step_time"] = update_time + (generation_time if iteration == 0 else 0.0)
            step_metrics["timing/update_s"] = update_time
            if iteration == 0:
                step_metrics["timing/rollout_s"] = generation_time  # generation, rewards and the batch
            if rollout_peak is not None:  # where the run's peak memory was reached: rollout or update
                step_metrics["memory/peak_after_rollout_gib"] = rollout_peak
                step_metrics["memory/peak_after_update_gib"] = self._peak_gib()
            step_metrics["epoch"] = self.state.epoch
            self._callback("on_step_end")
            step = self.state.global_step
            if step % a.logging_steps == 0 or step == total:
                self.state.log_history.append({"step": step, **step_metrics})
                logger.log(step, step_metrics)
                self._callback("on_log", logs=step_metrics)
            logger.advance(step)
            last_iteration = iteration == a.num_iterations - 1
            if step % a.save_steps == 0 and last_iteration:
                self.save_checkpoint()
            if step >= total:
                break

    def _peak_gib(self) -> float | None:
        """torch.cuda.max_memory_allocated of the trainer's device in GiB (never reset here), None off CUDA."""
        if self.device.type != "cuda":
            return None
        return torch.cuda.max_memory_allocated(self.device) / 2 ** 30

    def _next_prompts(self, k: int) -> list[dict]:
        """The next k dataset rows in the seeded per-epoch shuffle; the position is saved in checkpoints.
        With W ranks the next k * W rows are taken, and this rank keeps rows rank, rank + W, ..."""
        n, W = len(self.train_dataset), self.world_size
        rows = []
        for i in range(k * W):
            if i % W == self.rank:
                epoch, index = divmod(self.consumed_prompts, n)
                rows.append(self.train_dataset[int(_epoch_order(n, self.args.seed, epoch, self.args.shuffle_dataset)[index])])
            self.consumed_prompts += 1
        return rows

    # ---------------------------------------------------------------------------------------------
    def generate_and_score(self, rows: list[dict]) -> tuple[list[RolloutBatch], dict]:
        """Sample num_generations completions per row, score them, and pad one batch per accumulation step."""
        a, G = self.args, self.args.num_generations
        prompts = [r["prompt"] for r in rows]
        prompt_ids, n_truncated = tokenize_prompts(self.tokenizer, prompts, a.max_prompt_length)
        if n_truncated and not self._warned_truncation:
            warnings.warn(f"{n_truncated} prompt(s) longer than max_prompt_length={a.max_prompt_length} tokens "
                          "were truncated from the left (this warning is shown once)", stacklevel=2)
            self._warned_truncation = True
        params = SamplingParams(n=G, temperature=a.temperature, top_p=a.top_p, top_k=a.top_k, min_p=a.min_p,
                                max_tokens=a.max_completion_length,
                                seed=a.seed * 1_000_003 + self.consumed_prompts + self.rank)
        outputs = self.generator.generate(prompt_ids, params, adapter=self.adapter)
        completions = [c for out in outputs for c in out.outputs]  # N = len(rows) * G, groups contiguous
        texts = [c.text for c in completions]
        conversational = is_conversational(prompts[0])
        columns = {k: [r[k] for r in rows for _ in range(G)] for k in rows[0] if k != "prompt"}
        reward_stats: dict = {}  # rewards/<name>/timeouts for functions with a reward_timeout
        rewards_per_func = run_reward_funcs(
            self.reward_funcs, prompts=[p for p in prompts for _ in range(G)],
            completions=[[{"role": "assistant", "content": t}] for t in texts] if conversational else texts,
            completion_ids=[c.token_ids for c in completions], columns=columns, trainer_state=self.state,
            stats=reward_stats)  # [N, F]
        rewards = (rewards_per_func * self.reward_weights).nansum(dim=1)  # [N]
        truncated = [c.finish_reason == "length" for c in completions]
        lengths = [len(c.token_ids) for c in completions]
        everyone = (rewards, rewards_per_func, lengths, truncated)
        if self.world_size > 1:  # metrics over every rank's completions; "batch" std over the global batch
            everyone = _gather_rollouts(*everyone)
            advantages, group_std = group_advantages(everyone[0], G, a.scale_rewards)
            advantages = advantages[self.rank * len(completions):(self.rank + 1) * len(completions)]
        else:
            advantages, group_std = group_advantages(rewards, G, a.scale_rewards)
        per_step = a.prompts_per_step * G
        batches = []
        for s in range(a.gradient_accumulation_steps):
            sl = slice(s * per_step, (s + 1) * per_step)
            b = build_batch([p for p in prompt_ids[s * a.prompts_per_step:(s + 1) * a.prompts_per_step] for _ in range(G)],
                            [c.token_ids for c in completions[sl]], [c.logprobs for c in completions[sl]],
                            truncated[sl], advantages[sl], self.pad_id, a.mask_truncated_completions)
            batches.append(self._with_reference_logps(b))
        metrics = rollout_metrics(everyone[0], everyone[1], group_std, self.reward_names, everyone[2], everyone[3])
        metrics.update(reward_stats)
        for func, name in zip(self.reward_funcs, self.reward_names):  # e.g. the code sandbox's timeouts (this rank's)
            for key, value in (getattr(func, "last_stats", None) or {}).items():
                metrics[f"rewards/{name}/{key}"] = value
        if a.log_completions:
            metrics["completions/sample"] = texts[0]
        return batches, metrics

    @torch.no_grad()
    def _with_reference_logps(self, b: RolloutBatch) -> RolloutBatch:
        """old log-probs (when rollouts are reused) and reference log-probs (when beta > 0), chunk by chunk."""
        a = self.args
        if a.num_iterations > 1:
            b.old_logps = self._logps_in_chunks(b)
        if a.beta > 0:
            with base_model_context(self.model):
                b.ref_logps = self._logps_in_chunks(b)
        return b

    def _logps_in_chunks(self, b: RolloutBatch) -> torch.Tensor:
        out = torch.zeros_like(b.sampling_logps)  # [N, C]

        def run(start: int, stop: int) -> None:
            chunk = b.rows(start, stop).to(self.device)
            logps, _ = policy_logps(self.model, chunk, self.args.temperature, padding_free=self.use_padding_free(),
                                    autocast_dtype=self.autocast_dtype)
            out[start:stop, :logps.shape[1]] = logps.float().cpu()

        self._for_each_chunk(b, run)
        return out

    def use_padding_free(self) -> bool:
        """Whether training forwards pack each micro-batch into one row (GRPOConfig.padding_free): decided at
        the first forward, by measuring that the model keeps packed sequences apart; else padded, and
        `padding_free_reason` says why (warned once)."""
        if self._padding_free is None:
            if not self.args.padding_free:
                self.padding_free_reason = "GRPOConfig.padding_free is False"
            elif fsdp.is_sharded(self.model):  # no warning: a design choice, not a fallback
                self.padding_free_reason = ("FSDP2: every rank must run every forward, and a packed chunk whose "
                                            "completions are all masked runs none")
                self._padding_free = False
                return False
            else:
                self.padding_free_reason = packing_fallback_reason(self.model)
                if self.padding_free_reason is not None:
                    warnings.warn(f"padding-free training is off, the padded forward is used: "
                                  f"{self.padding_free_reason}", stacklevel=2)
            self._padding_free = self.padding_free_reason is None
        return self._padding_free

    def _chunks(self, b: RolloutBatch) -> list[tuple[int, int]]:
        """Row ranges of one forward/backward each: `micro_batch_size` rows, else a token budget. Under
        FSDP2 every rank then splits its largest chunks until it has as many as the rank with the most
        (each chunk's loss is its rows' share of the step's loss, so the split leaves the sum unchanged)."""
        n = len(b)
        if self.use_padding_free():
            row_tokens = (b.prompt_mask.sum(1) + b.completion_mask.sum(1)).tolist()  # [n] packed lengths
        else:
            row_tokens = [b.prompt_ids.shape[1] + b.completion_ids.shape[1]] * n  # padded width
        row_tokens = [int(t) for t in row_tokens]
        if self.args.micro_batch_size:
            size = self.args.micro_batch_size
            chunks = [(i, min(i + size, n)) for i in range(0, n, size)]
        else:
            chunks = token_budget_chunks(row_tokens, self.micro_batch_tokens)
        if fsdp.is_sharded(self.model):
            count = int(dist.all_reduce_max(torch.tensor([len(chunks)])).item())  # the most of any rank
            chunks = split_chunks_to_count(chunks, row_tokens, count)
        return capped_chunks(chunks, self.max_chunk_rows)

    def _for_each_chunk(self, b: RolloutBatch, run, with_grads: bool = False) -> None:
        """`run(start, stop)` over `_chunks(b)`. Where `split_on_oom` (CUDA), a chunk of several rows that
        runs out of memory makes every later chunk at most half its rows (and halves the token budget).
        Without gradients the chunk is retried in halves. With gradients (`with_grads`) its backward may
        have added to some of them, so `_RestartStep` asks the caller to zero them and run the step's
        chunks again: nothing is copied to undo a chunk, so no second set of gradients is ever held.
        Never under FSDP2: the other ranks would wait for collectives of chunks they do not have."""
        pending = self._chunks(b)
        while pending:
            start, stop = pending.pop(0)
            can_split = self.split_on_oom and not fsdp.is_sharded(self.model) and stop - start > 1
            try:
                run(start, stop)
                continue
            except torch.OutOfMemoryError:
                if not can_split:
                    raise
            # out of the except block, so the traceback's frames (and their tensors) are gone
            _free_cuda_memory()
            rows = max(1, (stop - start) // 2)
            self.max_chunk_rows = min(rows, self.max_chunk_rows or rows)
            self.micro_batch_tokens = max(1, self.micro_batch_tokens // 2)
            warnings.warn(f"out of memory on a chunk of {stop - start} rows: chunks of at most {self.max_chunk_rows} "
                          f"rows and micro_batch_tokens={self.micro_batch_tokens} from now on"
                          + ("; the step's chunks run again" if with_grads else ""), stacklevel=2)
            if with_grads:
                raise _RestartStep
            pending = capped_chunks([(start, stop)] + pending, self.max_chunk_rows)

    # ---------------------------------------------------------------------------------------------
    def optimizer_step(self, batches: list[RolloutBatch], first_iteration: bool = True) -> dict:
        a = self.args
        self.model.train()
        if self.world_size > 1:  # divide by the global batch's counts, so summed gradients are the global ones
            counts = dist.all_reduce_sum(torch.tensor([[len(b), float(b.completion_mask.sum())] for b in batches],
                                                      dtype=torch.float64))  # [S, 2]
            normalizers = normalizers_from_counts(a.loss_type, counts[:, 0].tolist(), counts[:, 1].tolist(),
                                                  a.max_completion_length)
        else:
            normalizers = loss_normalizers(a.loss_type, [b.completion_mask for b in batches], a.max_completion_length)
        while True:
            sums = _StatSums()
            try:
                self._accumulate_gradients(batches, normalizers, sums, first_iteration)
                break
            except _RestartStep:  # a chunk ran out of memory: drop its partial gradients, run in smaller chunks
                self.optimizer.zero_grad(set_to_none=True)
                _free_cuda_memory()
        if self.world_size > 1:
            dist.all_reduce_grads_(self.trainable_parameters)
            sums.reduce_over_ranks()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.trainable_parameters,
                                                         a.max_grad_norm if a.max_grad_norm else float("inf")))
        lr = self.optimizer.param_groups[0]["lr"]
        finite = math.isfinite(grad_norm) and math.isfinite(sums.loss)
        if finite:
            self._mid_update = True  # the weights are past global_step until _rollout_and_update counts the step
            self.optimizer.step()
            self.scheduler.step()
            self.nonfinite_in_a_row = 0
        else:
            self.nonfinite_in_a_row += 1
        self.optimizer.zero_grad(set_to_none=True)
        metrics = {**sums.metrics(with_kl=a.beta > 0), "grad_norm": grad_norm, "learning_rate": lr,
                   "nonfinite_skipped": 0 if finite else 1}
        if self.nonfinite_in_a_row >= a.max_nonfinite_steps:
            raise FloatingPointError(f"{self.nonfinite_in_a_row} steps in a row had a non-finite loss or gradient "
                                     f"(loss={sums.loss}, grad_norm={grad_norm}); each was skipped, so the weights "
                                     "are those of the last finite step. Lower learning_rate or max_grad_norm, or "
                                     "check the reward functions for inf values.")
        return metrics

    def _accumulate_gradients(self, batches: list[RolloutBatch], normalizers: list, sums: "_StatSums",
                              first_iteration: bool) -> None:
        """Forward and backward of every chunk of every accumulation step: the step's gradients, summed."""
        a = self.args
        for s, batch in enumerate(batches):
            def run(start: int, stop: int, s=s, batch=batch) -> None:
                chunk = batch.rows(start, stop).to(self.device)
                with offload_context(self.model):
                    logps, entropy = policy_logps(self.model, chunk, a.temperature, with_entropy=True,
                                                  padding_free=self.use_padding_free(),
                                                  autocast_dtype=self.autocast_dtype)
                old = chunk.old_logps if chunk.old_logps is not None else logps.detach()
                loss_tokens, stats = per_token_loss(logps, old, chunk.advantages, chunk.completion_mask,
                                                    epsilon_low=a.epsilon, epsilon_high=a.epsilon_high,
                                                    importance_sampling_level=a.importance_sampling_level,
                                                    ref_logps=chunk.ref_logps, beta=a.beta)
                loss = aggregate_loss(loss_tokens, chunk.completion_mask, a.loss_type, normalizers[s])
                if loss.requires_grad:  # not when a packed chunk has no counted token (all masked)
                    with lora_inputs_uncast(self.model, self.autocast_dtype):
                        loss.backward()
                sums.add(loss, stats, entropy, logps.detach(), chunk, first_iteration)

            def run_packed_or_padded(start: int, stop: int, run=run) -> None:
                # the backward's recompute (gradient checkpointing) must see the forward's attention
                packed = self.use_padding_free()
                with varlen_context(decoder_and_head(self.model)[0]) if packed else contextlib.nullcontext():
                    run(start, stop)

            self._for_each_chunk(batch, run_packed_or_padded, with_grads=True)

    def save_checkpoint(self, rng: dict | None = None) -> Path:
        """Rank 0 writes (every rank holds the same weights and optimizer state, or, with FSDP2, every rank
        first takes part in gathering them to rank 0); all return the path. rng: the random states to store
        (checkpoint.rng_state() taken earlier), else the current ones."""
        state = {"global_step": self.state.global_step, "consumed_prompts": self.consumed_prompts,
                 "log_history": self.state.log_history, "config": self.args.to_dict()}
        weights = optimizer_state = None
        if fsdp.is_sharded(self.model):
            weights, optimizer_state = fsdp.full_trainable_state(self.model), fsdp.full_optimizer_state(self.optimizer)
        if self.rank == 0:
            path = ckpt.save_checkpoint(self.args.output_dir, self.state.global_step, self.model, self.optimizer,
                                        self.scheduler, state, self.args.save_total_limit, weights=weights,
                                        optimizer_state=optimizer_state, rng=rng)
        else:
            path = Path(self.args.output_dir) / f"checkpoint-{self.state.global_step}"
        self._saved_step = self.state.global_step
        self._callback("on_save")
        return path

    def _callback(self, event: str, **kwargs) -> None:
        for cb in self.callbacks:
            fn = getattr(cb, event, None)
            if fn is not None:
                fn(self.args, self.state, self.control, model=self.model, **kwargs)


_OOM_ADVICE = ("out of GPU memory. The knobs, from most to least effective: max_completion_length ({c}), "
               "num_generations ({g}), per_device_train_batch_size ({b}; raise gradient_accumulation_steps to keep "
               "the batch), micro_batch_size, use_gradient_checkpointing='offload' in get_peft_model, and a lower "
               "gpu_memory_utilization in from_pretrained (less for the rollout KV cache).")


class _RestartStep(Exception):
    """A chunk ran out of memory after its backward may have added to the gradients: run the step again."""


class _StopOnSignal:
    """SIGINT/SIGTERM ask the loop to stop after the current step (then a final checkpoint is written);
    a second signal interrupts at once."""

    def __init__(self, control):
        self.control, self.signal_name, self.previous = control, None, {}

    def __enter__(self):
        import signal
        import threading
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self.previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame):
        import signal
        if self.signal_name is not None:
            raise KeyboardInterrupt
        self.signal_name = signal.Signals(signum).name
        self.control.should_training_stop = True

    def __exit__(self, *exc):
        import signal
        for sig, handler in self.previous.items():
            signal.signal(sig, handler)
        return False


# --- the pieces of the step, as functions ----------------------------------------------------------

def policy_logps(model, batch: RolloutBatch, temperature: float, with_entropy: bool = False,
                 padding_free: bool = False, autocast_dtype: torch.dtype | None = None):
    """Per-token log-probs [n, C] (float32) of the completion tokens, from the last hidden states in
    chunks (no [n, T, V] logits), and their entropy when asked.

    padding_free: run the rows packed into one row (grpo/packing.py) instead of padded [n, P+C]; only
    for a model where `packing_fallback_reason` is None. Then the log-probs (and entropy) are 0 at
    completion positions outside completion_mask, which the loss masks out anyway.
    autocast_dtype: run the decoder (not the log-prob head) under torch.autocast in this dtype
    (GRPOConfig.lora_autocast)."""
    if padding_free:
        return _packed_policy_logps(model, batch, temperature, with_entropy, autocast_dtype)
    decoder, head = decoder_and_head(model)
    P = batch.prompt_ids.shape[1]
    input_ids = torch.cat([batch.prompt_ids, batch.completion_ids], dim=1)  # [n, P+C]
    attention = torch.cat([batch.prompt_mask, torch.ones_like(batch.completion_ids)], dim=1)  # [n, P+C]
    positions = (attention.cumsum(dim=1) - 1).clamp(min=0)  # [n, P+C]
    hidden = _run_decoder(decoder, autocast_dtype, input_ids=input_ids, attention_mask=attention,
                          position_ids=positions)  # [n, P+C, H]
    hidden = hidden[:, P - 1:-1]  # [n, C, H]: position P-1+t predicts completion token t
    return chunked_token_logprobs(hidden, head.weight, batch.completion_ids, temperature=temperature,
                                  bias=head.bias, with_entropy=with_entropy)


def _autocast_dtype(model) -> torch.dtype:
    """GRPOConfig.lora_autocast: the dtype of the model's embeddings (its compute dtype), which must be 16-bit."""
    dtype = decoder_and_head(model)[0].get_input_embeddings().weight.dtype
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"lora_autocast=True needs a bf16 or fp16 model (its LoRA products run in that dtype); "
                         f"this one computes in {dtype}: load it with dtype=torch.bfloat16 or leave lora_autocast off")
    return dtype


def _run_decoder(decoder, autocast_dtype: torch.dtype | None, **inputs) -> torch.Tensor:
    """The decoder's last hidden states; under torch.autocast in `autocast_dtype` when given (the backward's
    recompute restores it: torch.utils.checkpoint and the offloaded checkpoint record the state)."""
    device_type = decoder.get_input_embeddings().weight.device.type
    with torch.autocast(device_type, dtype=autocast_dtype, enabled=autocast_dtype is not None), \
            lora_inputs_uncast(decoder, autocast_dtype):
        return decoder(**inputs, use_cache=False).last_hidden_state


def lora_inputs_uncast(model, autocast_dtype: torch.dtype | None):
    """PEFT casts each LoRA layer's input to the adapter's dtype (float32), a copy that the backward keeps;
    under autocast the products run in 16 bit all the same, so the cast is turned off (peft.helpers), in the
    forward and around the backward (whose recompute runs the forward again)."""
    from peft.helpers import disable_input_dtype_casting
    return disable_input_dtype_casting(model, active=autocast_dtype is not None)


def _packed_policy_logps(model, batch: RolloutBatch, temperature: float, with_entropy: bool,
                         autocast_dtype: torch.dtype | None = None):
    """policy_logps on one packed row [1, S]: no attention mask, position_ids restarting per sequence,
    and only the M rows of hidden states that predict a counted completion token reach the lm_head."""
    decoder, head = decoder_and_head(model)
    shape = tuple(batch.completion_ids.shape)  # (n, C)
    packed = pack_rollouts(batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask)
    if packed.targets.numel() == 0:  # every row masked out: nothing to run
        zeros = torch.zeros(shape, dtype=torch.float32, device=batch.completion_ids.device)  # [n, C]
        return zeros, (zeros.clone() if with_entropy else None)
    input_ids, position_ids = packed.input_ids, packed.position_ids  # [S] each
    row_shape = layer_graphs.padded_row_shape(decoder, packed.lengths.tolist())
    if row_shape is not None:  # the shape of earlier rows, so that the layers replay their graphs
        input_ids, position_ids = padded_to_shape(input_ids, position_ids, row_shape.tokens,
                                                  row_shape.sequences - packed.lengths.numel())  # [S'] each, S' > S
    with varlen_context(decoder):
        hidden = _run_decoder(decoder, autocast_dtype, input_ids=input_ids[None],
                              position_ids=position_ids[None])  # [1, S', H]
    hidden = hidden[:, packed.predict_at]  # [1, M, H]
    logps, entropy = chunked_token_logprobs(hidden, head.weight, packed.targets[None], temperature=temperature,
                                            bias=head.bias, with_entropy=with_entropy)  # [1, M]
    return (unpack_to_rows(logps[0], packed, shape),
            unpack_to_rows(entropy[0], packed, shape) if with_entropy else None)  # [n, C]


def rollout_metrics(rewards, rewards_per_func, group_std, reward_names, lengths, truncated) -> dict:
    """TRL's reward and completion metrics of one rollout batch."""
    lengths_t = torch.tensor(lengths, dtype=torch.float32)
    m = {"reward": rewards.mean().item(), "reward_std": group_std.mean().item(),
         "frac_reward_zero_std": (group_std.abs() < 1e-6).float().mean().item()}
    for i, name in enumerate(reward_names):
        col = rewards_per_func[:, i]
        m[f"rewards/{name}/mean"] = torch.nanmean(col).item()
        m[f"rewards/{name}/std"] = _nanstd(col)
    m.update({"completions/mean_length": lengths_t.mean().item(), "completions/min_length": lengths_t.min().item(),
              "completions/max_length": lengths_t.max().item(),
              "completions/clipped_ratio": sum(truncated) / len(truncated)})
    return m


class _StatSums:
    """Adds the loss statistics over chunks; masked means come out at the end. The sums stay tensors on the
    training device until the step ends, then come back to the host in one copy (`loss`, `sums` and
    `logp_diff_max` read them): no wait for the GPU after each chunk."""

    def __init__(self):
        self._pending: dict[str, list[torch.Tensor]] = {}  # key -> one 0-dim tensor per chunk
        self._maxima: list[torch.Tensor] = []  # the largest |logp - sampling logp| of each chunk
        self._values: tuple[float, dict[str, float], float] | None = None

    def add(self, loss, stats, entropy, logps, chunk: RolloutBatch, first_iteration: bool):
        mask = chunk.completion_mask
        parts = {"loss": loss.detach(), **stats, "entropy": (entropy * mask).sum()}
        if first_iteration:
            diff = (logps - chunk.sampling_logps).abs() * mask  # [n, C]
            parts["logp_diff"], parts["logp_diff_tokens"] = diff.sum(), mask.sum()
            if diff.numel():
                self._maxima.append(diff.max())
        for k, v in parts.items():
            self._pending.setdefault(k, []).append(torch.as_tensor(v).detach().to(torch.float64).reshape(()))
        self._values = None

    def _read(self) -> tuple[float, dict[str, float], float]:
        if self._values is None:
            keys = sorted(self._pending)
            columns = [torch.stack(self._pending[k]).sum() for k in keys]
            if self._maxima:
                columns.append(torch.stack(self._maxima).max().to(torch.float64))
            values = torch.stack([c.to(columns[0].device) for c in columns]).tolist() if columns else []  # one wait
            sums = dict(zip(keys, values))
            maximum = values[len(keys)] if self._maxima else 0.0
            self._values = (sums.pop("loss", 0.0), sums, maximum)
        return self._values

    @property
    def loss(self) -> float:
        return self._read()[0]

    @property
    def sums(self) -> dict[str, float]:
        return self._read()[1]

    @property
    def logp_diff_max(self) -> float:
        return self._read()[2]

    def reduce_over_ranks(self) -> None:
        """Sums over every rank's chunks (each rank's loss is its share of the global loss)."""
        loss, sums, maximum = self._read()
        keys = sorted(sums)
        summed = dist.all_reduce_sum(torch.tensor([loss] + [sums[k] for k in keys], dtype=torch.float64))
        maximum = dist.all_reduce_max(torch.tensor([maximum], dtype=torch.float64)).item()
        self._values = (summed[0].item(), dict(zip(keys, summed[1:].tolist())), maximum)

    def metrics(self, with_kl: bool) -> dict:
        tokens = max(self.sums.get("tokens", 0.0), 1.0)
        clips = max(self.sums.get("clip_total", 0.0), 1.0)  # tokens, or sequences at sequence-level IS
        m = {"loss": self.loss, "entropy": self.sums.get("entropy", 0.0) / tokens,
             "clip_ratio/low_mean": self.sums.get("clip_low", 0.0) / clips,
             "clip_ratio/high_mean": self.sums.get("clip_high", 0.0) / clips,
             "clip_ratio/region_mean": self.sums.get("clip_region", 0.0) / clips}
        if with_kl:
            m["kl"] = self.sums.get("kl", 0.0) / tokens
        if "logp_diff" in self.sums:
            m["sampling/logp_diff/mean"] = self.sums["logp_diff"] / max(self.sums["logp_diff_tokens"], 1.0)
            m["sampling/logp_diff/max"] = self.logp_diff_max
        return m


def make_optimizer(params, args: GRPOConfig) -> torch.optim.Optimizer:
    """Optimizers by TRL's `optim` names. The 8-bit ones are our `AdamW8bit` (no bitsandbytes); the paged
    ones keep their state in pinned CPU memory between steps: `paged_adamw_8bit` (AdamW8bit's `paged`) and
    `paged_adamw_32bit` (`PagedAdamW32bit`: torch AdamW's float32 moments and update)."""
    if not params:
        raise ValueError("the model has no trainable parameters (call FastLanguageModel.get_peft_model?)")
    kw = dict(lr=args.learning_rate, weight_decay=args.weight_decay)
    betas = (args.adam_beta1, args.adam_beta2)
    if args.optim == "paged_adamw_32bit":
        return PagedAdamW32bit(params, betas=betas, eps=args.adam_epsilon, **kw)
    if args.optim in ("adamw_torch", "adamw_torch_fused"):
        fused = args.optim == "adamw_torch_fused" or params[0].is_cuda
        return torch.optim.AdamW(params, betas=betas, eps=args.adam_epsilon, fused=fused or None, **kw)
    if args.optim in ("adamw_8bit", "paged_adamw_8bit"):
        return AdamW8bit(params, betas=betas, eps=args.adam_epsilon, paged=args.optim == "paged_adamw_8bit", **kw)
    if args.optim == "sgd":
        return torch.optim.SGD(params, **kw)
    raise ValueError(f"unknown optim {args.optim!r}")


# --- small helpers ---------------------------------------------------------------------------------

@functools.lru_cache(maxsize=2)  # called once per prompt: one permutation per epoch
def _epoch_order(n: int, seed: int, epoch: int, shuffle: bool) -> torch.Tensor:
    if not shuffle:
        return torch.arange(n)
    g = torch.Generator().manual_seed(seed * 7919 + epoch)
    return torch.randperm(n, generator=g)


def _free_cuda_memory() -> None:
    import gc
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _gather_rollouts(rewards, rewards_per_func, lengths, truncated):
    """Every rank's rewards [N], per-function rewards [N, F], lengths and truncation flags, rank 0's rows
    first (each rank holds whole groups, so groups stay contiguous): [W*N], [W*N, F], lists of W*N."""
    local = torch.cat([rewards[:, None].double(), rewards_per_func.double(),
                       torch.tensor(lengths, dtype=torch.float64)[:, None],
                       torch.tensor(truncated, dtype=torch.float64)[:, None]], dim=1)  # [N, F+3]
    every = dist.all_gather_cat(local)  # [W*N, F+3]
    return (every[:, 0].to(rewards.dtype), every[:, 1:-2].to(rewards_per_func.dtype), every[:, -2].long().tolist(),
            every[:, -1].bool().tolist())


def _nanstd(x: torch.Tensor) -> float:
    x = x[~torch.isnan(x)]
    return x.std().item() if x.numel() > 1 else 0.0


def _resolve_reward_funcs(reward_funcs) -> list:
    """Callables, ready-function names, or 'module:function' / 'file.py:function' specs."""
    if reward_funcs is None:
        raise ValueError("GRPOTrainer needs reward_funcs: one function or a list")
    if callable(reward_funcs) or isinstance(reward_funcs, str):
        reward_funcs = [reward_funcs]
    out = [resolve_reward_func(f) for f in reward_funcs]
    if not out:
        raise ValueError("GRPOTrainer needs at least one reward function")
    return out


def _reward_weights(weights, n: int) -> torch.Tensor:
    if weights is None:
        return torch.ones(n)
    if len(weights) != n:
        raise ValueError(f"reward_weights has {len(weights)} entries but there are {n} reward functions")
    return torch.tensor([float(w) for w in weights])


def _check_dataset(dataset):
    """A `datasets.Dataset` with a prompt column; a list of dicts is turned into one."""
    if dataset is None:
        raise ValueError("GRPOTrainer needs train_dataset")
    if isinstance(dataset, (list, tuple)):
        if not all(isinstance(row, dict) for row in dataset):
            raise ValueError("train_dataset given as a list must hold dicts (rows with a 'prompt' key)")
        from datasets import Dataset
        dataset = Dataset.from_list(list(dataset))
    if len(dataset) == 0:
        raise ValueError("train_dataset is empty")
    if "prompt" not in dataset.column_names:
        raise ValueError(f"train_dataset has no 'prompt' column (columns: {dataset.column_names})")
    return dataset


def _check_lengths(model, args: GRPOConfig) -> None:
    settings = getattr(model, "ahazero", None)
    if settings is None or args.max_prompt_length is None:
        return
    need = args.max_prompt_length + args.max_completion_length
    if need > settings.max_seq_length:
        raise ValueError(f"max_prompt_length + max_completion_length = {need} exceeds max_seq_length="
                         f"{settings.max_seq_length} given to FastLanguageModel.from_pretrained")


def _default_generator(model, tokenizer):
    if getattr(model, "ahazero", None) is not None:
        from ..api import get_generator
        return get_generator(model, tokenizer)
    return make_generator(model, tokenizer, use_engine=False)
