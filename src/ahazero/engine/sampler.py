"""Sampling a token per row of logits, and its log-prob (the HF backend's convention, same filters).

log-prob = log_softmax(logits / temperature) in float32, before top-k/top-p/min-p (what the GRPO
trainer computes for the same token); greedy (temperature 0) uses temperature 1. Sampling is the
exponential-race form of Gumbel-max: argmax(p / E) with E ~ Exp(1) picks token i with probability p_i.
The noise is drawn eagerly (so a seeded generator gives the same draws compiled or not); with
`compile` the rest of the unfiltered paths is compiled into two fused passes over [B, V], instead of ten.
With `kernel` (the engine's default on CUDA) the unfiltered paths are one Triton launch instead
(engine/sample_kernels.py: Gumbel-max with Philox draws, one pass over the logits), seeded per step by an
integer drawn from the call's generator, which may then live on the CPU (no device sync).
"""
from __future__ import annotations

import warnings

import torch

from .hf_generate import filter_logits
from .types import SamplingParams

TINY = 1e-30  # floor of the noise: Exp(1) may draw 0, and 0 / 0 would be NaN


def needs_filter(params: SamplingParams) -> bool:
    return params.top_k > 0 or params.top_p < 1 or params.min_p > 0


def _greedy(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] -> argmax tokens [B], their log-probs at temperature 1 [B]."""
    logits = logits.float()
    tokens = logits.argmax(dim=-1)  # [B]
    return tokens, logits.gather(-1, tokens[:, None]).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _race(logits: torch.Tensor, temperature: float, noise: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Unfiltered sampling: logits [B, V], noise [B, V] ~ Exp(1) -> tokens [B], log-probs [B]."""
    scaled = logits.float() / temperature  # [B, V]
    lse = torch.logsumexp(scaled, dim=-1, keepdim=True)  # [B, 1]
    tokens = ((scaled - lse).exp() / noise.clamp_min(TINY)).argmax(dim=-1)  # [B]
    return tokens, (scaled.gather(-1, tokens[:, None]) - lse).squeeze(-1)


def _filtered_race(logits, params: SamplingParams, noise) -> tuple[torch.Tensor, torch.Tensor]:
    """top-k / top-p / min-p sampling; the log-prob is still the unfiltered one."""
    scaled = logits.float() / params.temperature  # [B, V]
    logprobs = torch.log_softmax(scaled, dim=-1)  # [B, V]
    probs = torch.softmax(filter_logits(scaled, params.top_k, params.top_p, params.min_p), dim=-1)  # [B, V]
    tokens = (probs / noise.clamp_min(TINY)).argmax(dim=-1)  # [B]
    return tokens, logprobs.gather(-1, tokens[:, None]).squeeze(-1)


def host_seed(generator: torch.Generator | None) -> int:
    """An integer seed drawn from `generator` (torch's default CPU generator for None)."""
    device = "cpu" if generator is None else generator.device
    return int(torch.randint(2 ** 31 - 1, (1,), generator=generator, device=device).item())


class Sampler:
    """`sampler(logits [B, V], params, generator) -> (tokens [B] int64, log-probs [B] float32)`."""

    def __init__(self, compile: bool = False, kernel: bool = False):
        self.kernel = kernel
        self.compiled = compile
        self.greedy, self.race = _greedy, _race
        if compile:
            self.greedy = torch.compile(_greedy, dynamic=True)
            self.race = torch.compile(_race, dynamic=True)

    def __call__(self, logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None = None):
        try:
            return self._sample(logits, params, generator)
        except Exception as err:  # noqa: BLE001 - a torch.compile failure: sample eagerly from now on
            if not self.compiled:
                raise
            warnings.warn(f"torch.compile of the sampler failed ({type(err).__name__}: {err}); sampling eagerly")
            self.compiled, self.greedy, self.race = False, _greedy, _race
            return self._sample(logits, params, generator)

    def _sample(self, logits, params: SamplingParams, generator):
        if self.kernel and not needs_filter(params):
            from . import sample_kernels
            if sample_kernels.checked(logits.device):
                seed = 0 if params.temperature == 0 else host_seed(generator)
                return sample_kernels.sample_unfiltered(logits, params.temperature, seed)
        if params.temperature == 0:
            return self.greedy(logits)
        if generator is not None and generator.device != logits.device:  # a CPU generator seeds the device's
            generator = torch.Generator(logits.device).manual_seed(host_seed(generator))
        noise = torch.empty(logits.shape, device=logits.device).exponential_(generator=generator)  # [B, V]
        if needs_filter(params):
            return _filtered_race(logits, params, noise)
        return self.race(logits, params.temperature, noise)


sample = Sampler(compile=False)
