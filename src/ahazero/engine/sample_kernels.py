"""Unfiltered sampling and its log-prob in one pass over the logits (greedy, or temperature only).

The torch path (engine/sampler.py) draws Exp(1) noise [B, V] and makes about ten passes over [B, V]
float32 (cast, scale, logsumexp, exp, divide, argmax, gather): at W1's batch of 128 over Qwen's 151,936
tokens, its logsumexp op alone took 10.6 ms of a 32-step profile on an H200; this kernel made W1 7% faster
(bench/RESULTS.md, 2026-11-27, sixth session).
This kernel reads the logits once, in their own dtype:
  scaled  = logits * (1 / temperature) in float32         (temperature 1 for greedy, as the log-prob's)
  lse     = log sum exp(scaled), online (running max and sum)
  token   = argmax(scaled - log(-log U)),  U ~ Uniform[0, 1) from Philox: one call (tl.rand4x) gives the
            4 draws of 4 adjacent columns, its counter row * ceil(V / 4) + col // 4
            Gumbel-max, the exponential race of sampler.py in log space: argmax(p / E) with E = -log U;
            greedy: argmax(scaled), the first index of the maximum as torch.argmax
  logprob = scaled[token] - lse
Program (row, split of V); each split keeps (max, sum, best score, its index, its scaled logit) and the row's
last split to arrive combines the splits in order (as models/nf4_kernels.py's split-K), so a handful of
rows still fills the GPU. The seed is a host integer drawn per step from the call's CPU generator: no
[B, V] noise tensor, no device sync. Without a GPU it runs in Triton's interpreter, as the tests do.
"""
from __future__ import annotations

import functools
import logging

import torch
import triton
import triton.language as tl

from ..models.nf4_kernels import (last_to_arrive, pdl_options, sm_count, split_k, split_k_workspace,
                                  wait_for_inputs)

logger = logging.getLogger("ahazero")

# The kernel is bound by the noise's arithmetic (Philox and two logs a column), not the logits' bytes (128 x 151,936
# bf16: 39 MB, 9 us at 4.2 TB/s), so it wants many programs. H200, twenty-first session (bench/RESULTS.md,
# `python bench/kernels.py --only sample`), us a call at 6 / 32 / 64 / 128 rows: 17.8 / 49.1 / 83.3 / 138.4 with
# a Philox call per column and (1024, 4096, 2, 4 warps); 15.0 / 38.0 / 63.4 / 106.9 with one per 4 columns; 14.6 /
# 31.3 / 51.2 / 90.5 with these.
BLOCK_V = 2048
MIN_V_PER_SPLIT = 4096
PROGRAMS_PER_SM = 16
NUM_WARPS = 8
STATS = 5  # per split: max, sum of exp(scaled - max), best score, its index, its scaled logit


@triton.jit(do_not_specialize=["seed"])  # a new seed every step: one compile for all of them
def _sample_kernel(logits_ptr, tokens_ptr, logprobs_ptr, partial_ptr, count_ptr, V, stride_row, inv_temperature,
                   seed, GREEDY: tl.constexpr, V_PER_SPLIT: tl.constexpr, BLOCK_V: tl.constexpr, USE_PDL: tl.constexpr):
    wait_for_inputs(USE_PDL)
    row = tl.program_id(0)
    s = tl.program_id(1)
    S = tl.num_programs(1)
    m = tl.full((), float("-inf"), tl.float32)
    total = tl.zeros((), tl.float32)
    best = tl.full((), float("-inf"), tl.float32)
    best_at = tl.zeros((), tl.int32)
    best_logit = tl.zeros((), tl.float32)
    lanes = tl.arange(0, BLOCK_V)
    quads = tl.arange(0, BLOCK_V // 4)
    for v0 in range(0, V_PER_SPLIT, BLOCK_V):
        start = s * V_PER_SPLIT + v0  # a multiple of BLOCK_V, so of 4
        cols = start + lanes  # [BV]
        ok = cols < V
        x = tl.load(logits_ptr + row.to(tl.int64) * stride_row + cols, mask=ok, other=float("-inf"))
        x = x.to(tl.float32) * inv_temperature  # [BV] scaled
        m_new = tl.maximum(m, tl.max(x, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # a block past V
        total = total * tl.exp(m - m_safe) + tl.sum(tl.exp(x - m_safe), axis=0)
        m = m_new
        if GREEDY:
            score = x
        else:
            counters = (row * tl.cdiv(V, 4) + start // 4 + quads).to(tl.uint32)  # [BV / 4]
            u0, u1, u2, u3 = tl.rand4x(seed, counters)  # 4 x [BV / 4] uniform [0, 1)
            u = tl.reshape(tl.join(tl.join(u0, u1), tl.join(u2, u3)), BLOCK_V)  # [BV], 4 adjacent from one call
            score = tl.where(ok, x - tl.log(-tl.log(u)), float("-inf"))
        block_best = tl.max(score, axis=0)
        block_at = tl.argmax(score, axis=0)  # the first index of the block's maximum
        if block_best > best:  # strictly: an earlier block keeps a tie, as torch.argmax
            best = block_best
            best_at = (s * V_PER_SPLIT + v0 + block_at).to(tl.int32)
            best_logit = tl.sum(tl.where(lanes == block_at, x, 0.0), axis=0)
    done = S == 1
    if S > 1:
        at = partial_ptr + (row * S + s) * 5
        tl.store(at, m)
        tl.store(at + 1, total)
        tl.store(at + 2, best)
        tl.store(at + 3, best_at.to(tl.float32))  # exact: V < 2^24
        tl.store(at + 4, best_logit)
        done = last_to_arrive(count_ptr + row, S)
        if done:  # the row's last split: combine all splits in order
            top = tl.full((), float("-inf"), tl.float32)
            t = 0
            while t < S:
                top = tl.maximum(top, tl.load(partial_ptr + (row * S + t) * 5, cache_modifier=".cg"))
                t += 1
            top_safe = tl.where(top == float("-inf"), 0.0, top)
            total = tl.zeros((), tl.float32)
            best = tl.full((), float("-inf"), tl.float32)
            t = 0
            while t < S:
                at = partial_ptr + (row * S + t) * 5
                total += tl.load(at + 1, cache_modifier=".cg") * tl.exp(tl.load(at, cache_modifier=".cg") - top_safe)
                split_best = tl.load(at + 2, cache_modifier=".cg")
                if split_best > best:
                    best = split_best
                    best_at = tl.load(at + 3, cache_modifier=".cg").to(tl.int32)
                    best_logit = tl.load(at + 4, cache_modifier=".cg")
                t += 1
            m = top
            tl.store(count_ptr + row, 0)  # ready for the next launch
    if done:
        tl.store(tokens_ptr + row, best_at.to(tl.int64))
        tl.store(logprobs_ptr + row, best_logit - (m + tl.log(total)))


def sample_unfiltered(logits: torch.Tensor, temperature: float, seed: int,
                      min_v_per_split: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """logits [B, V] (any float dtype) -> tokens [B] int64, log-probs [B] float32 (see the module docstring).
    temperature 0 is greedy (its log-probs at temperature 1)."""
    B, V = logits.shape
    if V >= 2 ** 24:
        raise ValueError(f"the sampling kernel keeps token ids in float32: V must be < 2^24, got {V}")
    if logits.stride(-1) != 1:
        logits = logits.contiguous()
    tokens = torch.empty(B, dtype=torch.int64, device=logits.device)
    logprobs = torch.empty(B, dtype=torch.float32, device=logits.device)
    if B == 0:
        return tokens, logprobs
    splits, per_split = split_k(B, V, sm_count(logits.device), PROGRAMS_PER_SM, min_v_per_split or MIN_V_PER_SPLIT,
                                BLOCK_V)
    counts, partial = split_k_workspace(logits.device, B)
    if splits > 1:
        partial = torch.empty(B, splits, STATS, dtype=torch.float32, device=logits.device)
    greedy = temperature == 0
    _sample_kernel[(B, splits)](logits, tokens, logprobs, partial, counts, V, logits.stride(0),
                                1.0 if greedy else 1.0 / temperature, seed % (2 ** 31 - 1), GREEDY=greedy,
                                V_PER_SPLIT=per_split, BLOCK_V=BLOCK_V, num_warps=NUM_WARPS,
                                **pdl_options(logits.device))
    return tokens, logprobs


@functools.cache
def checked(device: torch.device) -> bool:
    """Once per device, before the kernel samples: greedy over random logits (split over the vocabulary)
    against torch's argmax and log-softmax. A failure or mismatch turns it off for the process with a
    warning: sampling then takes the torch path."""
    gen = torch.Generator(device=device).manual_seed(0)
    logits = torch.randn(3, 5000, device=device, generator=gen).to(torch.bfloat16)  # [B, V]
    try:
        tokens, logprobs = sample_unfiltered(logits, 0.0, 0, min_v_per_split=1024)
        want = torch.log_softmax(logits.float(), -1).gather(-1, tokens[:, None]).squeeze(-1)  # [B]
        ok = torch.equal(tokens, logits.float().argmax(-1)) and bool(((logprobs - want).abs() < 1e-3).all())
    except Exception as err:  # noqa: BLE001 - e.g. the kernel does not compile for this GPU
        logger.warning("the sampling kernel failed on %s (%s: %s); sampling takes the torch path", device,
                       type(err).__name__, err)
        return False
    if not ok:
        logger.warning("the sampling kernel disagrees with torch on %s; sampling takes the torch path", device)
    return ok
