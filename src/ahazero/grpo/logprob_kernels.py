"""A frozen head's log-probs and d logp / d logits, written over the chunk's logits (one Triton launch).

grpo/logprobs.py makes, for a chunk of C tokens, logits [C, V] = hidden @ W^T, then log p(target) and
d logp / d logits = (1[v = target] - softmax(z)_v) / T with z = logits / T, and multiplies the latter by W.
Made by a compiled function, d logp / d logits is a second [C, V] tensor alive beside the logits; this
kernel writes it over the logits instead, so a chunk holds one [C, V] tensor and can be twice as long for
the same memory. (At 110 tokens, 64 MiB of two bf16 tensors, the head's products read the 467 MB lm_head
of Qwen2.5-1.5B per chunk and ran memory-bound: H100, 2026-11-28, bench/RESULTS.md, eleventh session.)

Program = one row (token): pass 1 reads the row once for the running max, sum of e^(z - max) and, for the
entropy, sum of e^(z - max) z (per lane, rescaled as the max grows, then combined across lanes):
  lse = max + log(sum),  logp = z[target] - lse,  entropy = lse - sum(e z) / sum(e)
pass 2 reads it again, back to front (the row's last blocks are the likeliest still in L2), and stores
(1[v = target] - exp(z - lse)) / T rounded to the logits' dtype, as the compiled function does.
Division by T, not multiplication by 1/T: the same roundings as `logits.float() / temperature`.
kernel -> launcher. Without a GPU it runs in Triton's interpreter (TRITON_INTERPRET=1), as the tests do.
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
BLOCK_V = 4096  # vocabulary entries per step of a row's loop
NUM_WARPS = 8
_FLOOR = -3.0e38  # the running max's start: finite, so that exp(max_old - max_new) is never inf - inf


@triton.jit
def _logp_and_dlogits_kernel(z_ptr, targets_ptr, logp_ptr, entropy_ptr, V, row_stride, temperature,
                             WITH_ENTROPY: tl.constexpr, BLOCK_V: tl.constexpr, FLOOR: tl.constexpr):
    row = tl.program_id(0)
    row_ptr = z_ptr + row.to(tl.int64) * row_stride
    lanes = tl.arange(0, BLOCK_V)  # [BV]
    run_max = tl.full([BLOCK_V], FLOOR, tl.float32)
    run_sum = tl.zeros([BLOCK_V], tl.float32)
    run_ez = tl.zeros([BLOCK_V], tl.float32)
    for v0 in range(0, V, BLOCK_V):
        cols = v0 + lanes
        ok = cols < V
        z = tl.load(row_ptr + cols, mask=ok, other=float("-inf")).to(tl.float32) / temperature  # [BV]
        new_max = tl.maximum(run_max, z)
        rescale = tl.exp(run_max - new_max)
        e = tl.exp(z - new_max)  # 0 where masked
        run_sum = run_sum * rescale + e
        if WITH_ENTROPY:
            run_ez = run_ez * rescale + e * tl.where(ok, z, 0.0)  # (not e * z: 0 * -inf where masked)
        run_max = new_max
    row_max = tl.max(run_max, 0)
    weight = tl.exp(run_max - row_max)  # [BV] each lane's sums onto the row's max
    total = tl.sum(run_sum * weight, 0)
    lse = row_max + tl.log(total)
    target = tl.load(targets_ptr + row)
    z_target = tl.load(row_ptr + target).to(tl.float32) / temperature  # read before pass 2 overwrites it
    tl.store(logp_ptr + row, z_target - lse)
    if WITH_ENTROPY:
        tl.store(entropy_ptr + row, lse - tl.sum(run_ez * weight, 0) / total)
    blocks = tl.cdiv(V, BLOCK_V)
    for i in range(0, blocks):
        cols = (blocks - 1 - i) * BLOCK_V + lanes
        ok = cols < V
        z = tl.load(row_ptr + cols, mask=ok, other=0.0).to(tl.float32) / temperature
        dz = (tl.where(cols == target, 1.0, 0.0) - tl.exp(z - lse)) / temperature
        tl.store(row_ptr + cols, dz.to(z_ptr.dtype.element_ty), mask=ok)


def logp_and_dlogits_(logits: torch.Tensor, targets: torch.Tensor, temperature: float, with_entropy: bool,
                      block_v: int = BLOCK_V) -> tuple[torch.Tensor, torch.Tensor | None]:
    """logits [C, V] (rows contiguous), targets [C] in [0, V) -> (logp [C], entropy [C] | None), float32, of
    softmax(logits.float() / temperature); logits is overwritten with d logp / d logits in its own dtype."""
    if logits.dim() != 2 or logits.stride(1) != 1:
        raise ValueError(f"logits must be [C, V] with contiguous rows, got shape {tuple(logits.shape)} "
                         f"strides {logits.stride()}")
    C, V = logits.shape
    logp = torch.empty(C, device=logits.device, dtype=torch.float32)  # [C]
    entropy = torch.empty(C if with_entropy else 0, device=logits.device, dtype=torch.float32)  # [C] or [0]
    if C:
        _logp_and_dlogits_kernel[(C,)](logits, targets.contiguous(), logp, entropy if with_entropy else logp, V,
                                       logits.stride(0), float(temperature), WITH_ENTROPY=with_entropy,
                                       BLOCK_V=block_v, FLOOR=_FLOOR, num_warps=NUM_WARPS)
    return logp, (entropy if with_entropy else None)


def runs_here(t: torch.Tensor) -> bool:
    """The kernel runs on CUDA, and on the CPU under Triton's interpreter (the tests)."""
    return t.is_cuda or (INTERPRET and t.device.type == "cpu")
