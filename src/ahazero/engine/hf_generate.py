"""The fallback rollout backend: transformers' `generate` with our log-prob bookkeeping.

Used for architectures the engine has no forward of its own for, and as the reference the engine is
tested against. Sampling filters are ours (the same functions the engine uses), so both backends
sample from the same distribution; HF's own warpers are set to no-ops.
"""
from __future__ import annotations

from typing import Sequence

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from ..models.lora import adapter_context
from .types import CompletionOutput, RequestOutput, SamplingParams


def filter_logits(logits: torch.Tensor, top_k: int, top_p: float, min_p: float) -> torch.Tensor:
    """Mask (to -inf) tokens outside top-k, the top-p nucleus and the min-p floor. logits: [B, V]."""
    if top_k > 0 and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if min_p > 0:
        probs = torch.softmax(logits, dim=-1)  # [B, V]
        floor = min_p * probs.max(dim=-1, keepdim=True).values  # [B, 1]
        logits = logits.masked_fill(probs < floor, float("-inf"))
    if top_p < 1:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # [B, V]
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop_sorted = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the token crossing top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


class _SampleAndRecord(LogitsProcessor):
    """Applies temperature and filters, and records the log-prob of each token that gets sampled.

    The log-prob of step t's token is known only at step t+1 (when it appears in input_ids), so the
    processor keeps one step of log-softmax [B, V] and gathers from it on the next call.
    """

    def __init__(self, params: SamplingParams, prompt_len: int):
        self.params, self.prompt_len = params, prompt_len
        self.pending: torch.Tensor | None = None  # [B, V] log-softmax of the last step
        self.logprobs: list[torch.Tensor] = []  # each [B]

    def gather_pending(self, input_ids: torch.LongTensor) -> None:
        if self.pending is not None:
            token = input_ids[:, -1:]  # [B, 1]
            self.logprobs.append(self.pending.gather(-1, token).squeeze(-1))
            self.pending = None

    def __call__(self, input_ids, scores):
        self.gather_pending(input_ids)
        scores = scores.float()
        temperature = self.params.temperature or 1.0
        scores = scores / temperature
        self.pending = torch.log_softmax(scores, dim=-1)
        if self.params.temperature == 0:
            return scores
        return filter_logits(scores, self.params.top_k, self.params.top_p, self.params.min_p)


class HFGenerator:
    """Rollouts through `model.generate`: every completion decoded in one left-padded batch."""

    def __init__(self, model, tokenizer, eos_token_ids: Sequence[int] | None = None):
        self.model, self.tokenizer = model, tokenizer
        eos = eos_token_ids if eos_token_ids is not None else _eos_ids(model, tokenizer)
        self.eos_token_ids = list(eos)
        self.pad_token_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_token_ids[0]

    @torch.no_grad()
    def generate(self, prompt_token_ids, params: SamplingParams, adapter: str | None = "default"):
        rows = [list(p) for p in prompt_token_ids for _ in range(params.n)]
        width = max(len(r) for r in rows)
        device = next(self.model.parameters()).device
        input_ids = torch.full((len(rows), width), self.pad_token_id, dtype=torch.long)  # [B*n, P]
        attention = torch.zeros_like(input_ids)
        for i, r in enumerate(rows):
            input_ids[i, width - len(r):] = torch.tensor(r)
            attention[i, width - len(r):] = 1
        recorder = _SampleAndRecord(params, width)
        # vLLM's rule: ignore_eos ignores the EOS ids only; stop_token_ids and stop strings still stop
        stop_ids = ([] if params.ignore_eos else self.eos_token_ids) + list(params.stop_token_ids or [])
        kwargs = dict(max_new_tokens=params.max_tokens, do_sample=params.temperature > 0, temperature=1.0,
                      top_k=None, top_p=1.0, logits_processor=LogitsProcessorList([recorder]),
                      eos_token_id=stop_ids or self.eos_token_ids, pad_token_id=self.pad_token_id, use_cache=True)
        if not stop_ids:
            kwargs["min_new_tokens"] = params.max_tokens  # nothing may stop it: suppress the EOS ids
        if params.stop:
            kwargs.update(stop_strings=params.stop, tokenizer=self.tokenizer)
        was_training = self.model.training
        self.model.eval()
        rng = torch.random.fork_rng(devices=[device] if device.type == "cuda" else [])
        try:
            with rng, adapter_context(self.model, adapter):
                if params.seed is not None:
                    torch.manual_seed(params.seed)
                out = self.model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                          **kwargs)
        finally:
            self.model.train(was_training)
        recorder.gather_pending(out)
        new_tokens = out[:, width:].tolist()  # [B*n, T]
        logprobs = torch.stack(recorder.logprobs, dim=1).tolist() if recorder.logprobs else [[]] * len(rows)
        return self._outputs(prompt_token_ids, params, new_tokens, logprobs, set(stop_ids))

    def _outputs(self, prompt_token_ids, params, new_tokens, logprobs, stop_ids):
        results = []
        for p_idx, prompt in enumerate(prompt_token_ids):
            req = RequestOutput(prompt=None, prompt_token_ids=list(prompt))
            for j in range(params.n):
                row = p_idx * params.n + j
                tokens, reason = _cut_at_stop(new_tokens[row], stop_ids)
                text = self.tokenizer.decode(tokens, skip_special_tokens=True)
                text, hit_string = _cut_at_stop_string(text, params.stop)
                req.outputs.append(CompletionOutput(index=j, text=text, token_ids=tokens,
                                                    logprobs=logprobs[row][:len(tokens)],
                                                    finish_reason="stop" if hit_string else reason))
            results.append(req)
        return results


def _cut_at_stop(tokens: list[int], stop_ids: set[int]) -> tuple[list[int], str]:
    """Tokens up to and including the first stop token (the rest is padding)."""
    for i, t in enumerate(tokens):
        if t in stop_ids:
            return tokens[:i + 1], "stop"
    return tokens, "length"


def _cut_at_stop_string(text: str, stop: list[str] | None) -> tuple[str, bool]:
    """vLLM's convention: the text ends before the first stop string (token ids keep it)."""
    cuts = [text.find(s) for s in (stop or []) if s in text]
    return (text[:min(cuts)], True) if cuts else (text, False)


def _eos_ids(model, tokenizer) -> list[int]:
    ids = []
    cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for e in (cfg_eos, getattr(model.config, "eos_token_id", None), tokenizer.eos_token_id):
        if e is None:
            continue
        for i in (e if isinstance(e, (list, tuple)) else [e]):
            if i not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError("the model and tokenizer define no EOS token; pass eos_token_ids")
    return ids
