"""The rollout engine: scheduler + model runner + sampler, driven by a short `step()` (nano-vllm's shape).

`create_generator` returns it for the Llama family (plain or PEFT-wrapped) and `HFGenerator` (with one
warning) for anything else. The engine reads the model's live parameters on every call: an optimizer
step, or any in-place change of the LoRA weights, is seen by the next `generate` with no copy.
"""
from __future__ import annotations

import warnings
from collections import deque
from dataclasses import dataclass
from typing import Sequence as Seq

import torch

from ..models.lora import decoder_and_head, is_peft_model
from .config import EngineConfig
from .hf_generate import HFGenerator, _cut_at_stop_string, _eos_ids
from .kv_cache import to_device
from .layers import UnsupportedModule
from .models import llama
from .runner import ModelRunner
from .sampler import Sampler
from .scheduler import Scheduler
from .sequence import Sequence, StopChecker
from .types import CompletionOutput, RequestOutput, SamplingParams


def create_generator(model, tokenizer, *, max_seq_length: int, gpu_memory_utilization: float = 0.6,
                     max_lora_rank: int | None = None, max_batch_size: int | None = None, **engine_options):
    """Our engine for Llama-family models, else transformers' `generate` with one warning.

    `engine_options` are further EngineConfig fields (cuda_graphs, compile, kv_len_bucket, ...).
    """
    _, _ = decoder_and_head(model)  # fails early on something that is not a causal LM
    causal_lm = model.get_base_model() if is_peft_model(model) else model
    reason = llama.unsupported_reason(causal_lm, max_seq_length)
    if reason is not None:
        warnings.warn(f"ahazero's engine does not support {type(causal_lm).__name__} ({reason}); "
                      "generating with transformers' generate instead (slow)")
        return HFGenerator(model, tokenizer)
    embed = causal_lm.get_input_embeddings().weight
    config = EngineConfig(max_seq_length=max_seq_length, device=embed.device, dtype=_compute_dtype(causal_lm),
                          gpu_memory_utilization=gpu_memory_utilization, max_batch_size=max_batch_size,
                          max_lora_rank=max_lora_rank, **engine_options)
    return LLMEngine(model, tokenizer, config)


def _compute_dtype(causal_lm) -> torch.dtype:
    """The dtype activations run in: the embeddings' (4-bit layers keep a float compute dtype)."""
    dtype = causal_lm.get_input_embeddings().weight.dtype
    return dtype if dtype.is_floating_point else torch.float32


@dataclass(eq=False)
class _Call:
    """What one `generate` call samples with."""
    weights: llama.LlamaWeights
    key: str | None  # the adapter: graphs are kept per adapter
    params: SamplingParams
    stop: StopChecker
    generator: torch.Generator | None


@dataclass(eq=False)
class _Step:
    """A launched step: its sequences (row i = seqs[i]) and sampled tokens [S] / log-probs [S] on the
    device, with copies on their way to the host (pinned, non-blocking) and the event that says they
    have arrived. The copies are queued before the next step, so reading them waits for this step only."""
    seqs: list[Sequence]
    tokens: torch.Tensor
    logprobs: torch.Tensor
    host: tuple[torch.Tensor, torch.Tensor]
    ready: torch.cuda.Event | None

    @classmethod
    def launch(cls, seqs: list[Sequence], tokens: torch.Tensor, logprobs: torch.Tensor) -> "_Step":
        host = (tokens.to("cpu", non_blocking=True), logprobs.to("cpu", non_blocking=True))
        ready = None
        if tokens.is_cuda:
            ready = torch.cuda.Event()
            ready.record()
        return cls(seqs, tokens, logprobs, host, ready)

    def read(self) -> tuple[list[int], list[float]]:
        if self.ready is not None:
            self.ready.synchronize()
        return self.host[0].tolist(), self.host[1].tolist()


class LLMEngine:
    """`generate(prompt_token_ids, params, adapter)`: the Generator protocol of engine/types.py."""

    def __init__(self, model, tokenizer, config: EngineConfig):
        self.model, self.tokenizer, self.config = model, tokenizer, config
        self.eos_token_ids = _eos_ids(model, tokenizer)
        self.runner = ModelRunner(model, config)
        self.sampler = Sampler(compile=config.compile and config.device.type == "cuda", kernel=config.sample_kernel)
        self.scheduler = Scheduler(self.runner.num_slots, config.max_prefill_tokens)
        self._bound: dict[str | None, llama.LlamaWeights] = {}
        self._fallback: HFGenerator | None = None
        self.inflight: deque[_Step] = deque()  # steps queued on the device, tokens not yet read, oldest first

    @torch.no_grad()
    def generate(self, prompt_token_ids: Seq[Seq[int]], params: SamplingParams,
                 adapter: str | None = "default") -> list[RequestOutput]:
        try:
            weights = self._bind(adapter)
        except UnsupportedModule as err:
            return self._generate_fallback(err, prompt_token_ids, params, adapter)
        call = _Call(weights, adapter, params, self._stop_checker(params), self._generator(params))
        try:
            groups = self._add_requests(prompt_token_ids, params)
            self.runner.ensure_slots(sum(len(group) for group in groups))
            while not self.scheduler.done:
                self.step(call)
        finally:
            self.inflight.clear()  # only finished sequences are left in them (or an error stopped us)
            self.scheduler.clear()
            if self.config.release_kv:
                self.runner.release()  # its memory goes to what runs until the next call (a GRPO update)
        return [self._output(group, params) for group in groups]

    def step(self, call: _Call) -> None:
        """One forward: schedule, run, sample; then record the steps older than `decode_ahead`.

        Decode runs ahead (vLLM's async scheduling): step t+1 is queued on the GPU, fed from step t's
        sampled tokens still on the device, before the tokens of step t + 1 - decode_ahead are read back
        and checked for stops, so the CPU's bookkeeping overlaps the GPU's work (and, two steps ahead, a
        slow bookkeeping step does not leave the GPU idle). A sequence that stopped at step t gets up to
        decode_ahead discarded tokens from the steps queued after it; no step is queued once every running
        sequence reaches its length limit (max_tokens, max_seq_length) within the queued ones. Prefill
        steps are synchronous.
        """
        if self.scheduler.waiting:
            self._finish(call)  # may free the slots a waiting group needs
        seqs, is_prefill = self.scheduler.schedule()
        ahead = len(self.inflight)  # tokens of each running sequence not yet recorded (every one ran in all)
        if is_prefill:
            logits = self.runner.prefill(call.weights, seqs)  # [S, V]
        elif ahead and all(call.stop.reaches_length(seq, ahead) for seq in seqs):
            self._finish(call)  # the queued steps end every sequence: nothing to run
            return
        else:
            logits = self.runner.decode(call.weights, call.key, seqs, self._pending_tokens(seqs), ahead)  # [B, V]
        launched = _Step.launch(seqs, *self.sampler(logits, call.params, call.generator))
        self._finish(call, keep=0 if is_prefill else self.config.decode_ahead - 1)
        self.inflight.append(launched)
        if is_prefill:
            self._finish(call)

    def _finish(self, call: _Call, keep: int = 0) -> None:
        """Read back the oldest in-flight steps' tokens until `keep` steps are left in flight: append them, free
        and compact the finished sequences' slots (the slot moves queue behind the steps still in flight)."""
        while len(self.inflight) > keep:
            step = self.inflight.popleft()
            self.scheduler.postprocess(step.seqs, *step.read(), call.stop)
            self.runner.move_slots(self.scheduler.compact())

    def _pending_tokens(self, seqs: list[Sequence]) -> torch.Tensor | None:
        """The newest in-flight step's tokens [B] (on the device) for `seqs`, which all ran in it; None when
        nothing is in flight."""
        if not self.inflight:
            return None
        newest = self.inflight[-1]
        row = {id(seq): i for i, seq in enumerate(newest.seqs)}
        rows = to_device(torch.tensor([row[id(seq)] for seq in seqs]), self.config.device)  # [B]
        return newest.tokens[rows]

    def _bind(self, adapter: str | None) -> llama.LlamaWeights:
        """References to the live parameters with `adapter` on; the cached binding is kept while it reads
        the same tensors (so CUDA graphs and compiled code stay valid)."""
        _check_adapter(self.model, adapter)
        fresh = llama.LlamaWeights.bind(self.model, adapter, lora_kernels=self.config.lora_kernels,
                                        fused_kernels=self.config.fused_kernels,
                                        gemv_kernels=self.config.gemv_kernels)
        cached = self._bound.get(adapter)
        if cached is not None and cached.signature() == fresh.signature():
            return cached
        self._bound[adapter] = fresh
        return fresh

    def _add_requests(self, prompt_token_ids, params: SamplingParams) -> list[list[Sequence]]:
        groups = []
        for g, prompt in enumerate(prompt_token_ids):
            prompt = [int(t) for t in prompt]
            if not 0 < len(prompt) < self.config.max_seq_length:
                raise ValueError(f"prompt {g} has {len(prompt)} tokens; the engine takes 1 to "
                                 f"max_seq_length - 1 = {self.config.max_seq_length - 1}")
            groups.append([Sequence(group=g, index=j, prompt_ids=prompt) for j in range(params.n)])
        for group in groups:
            self.scheduler.add(group)
        return groups

    def _stop_checker(self, params: SamplingParams) -> StopChecker:
        return StopChecker(params, self.eos_token_ids, self.tokenizer, self.config.max_seq_length)

    def _generator(self, params: SamplingParams) -> torch.Generator | None:
        """The call's seeded generator: on the CPU for the sampling kernel (a host seed per step, no sync)."""
        if params.seed is None:
            return None
        device = "cpu" if self.sampler.kernel else self.config.device
        return torch.Generator(device=device).manual_seed(params.seed)

    def _output(self, group: list[Sequence], params: SamplingParams) -> RequestOutput:
        out = RequestOutput(prompt=None, prompt_token_ids=list(group[0].prompt_ids))
        for seq in group:
            text = self.tokenizer.decode(seq.completion_ids, skip_special_tokens=True)
            text, hit = _cut_at_stop_string(text, params.stop)
            out.outputs.append(CompletionOutput(index=seq.index, text=text, token_ids=list(seq.completion_ids),
                                                logprobs=list(seq.logprobs),
                                                finish_reason="stop" if hit else seq.finish_reason))
        return out

    def _generate_fallback(self, err, prompt_token_ids, params, adapter):
        if self._fallback is None:
            warnings.warn(f"ahazero's engine cannot run this model ({err}); using transformers' generate")
            self._fallback = HFGenerator(self.model, self.tokenizer, self.eos_token_ids)
        return self._fallback.generate(prompt_token_ids, params, adapter)


def _check_adapter(model, adapter: str | None) -> None:
    """adapter_context's rule: a named adapter must exist; "default" on a model without LoRA is the base.
    (The engine may hold the causal LM that PEFT wrapped later: its LoRA layers are found in place.)"""
    if adapter is None:
        return
    from peft.tuners.lora import LoraLayer
    names = {name for m in model.modules() if isinstance(m, LoraLayer) for name in m.lora_A}
    if is_peft_model(model):
        names |= set(model.peft_config)
    if adapter not in names and (adapter != "default" or names):
        raise ValueError(f"unknown adapter {adapter!r}; loaded: {sorted(names)}")
