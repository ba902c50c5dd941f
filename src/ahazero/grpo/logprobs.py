"""Per-token log-probabilities from hidden states, a chunk of tokens at a time (never [N, T, V] logits).

The memory idea of Unsloth's and Liger's fused linear + cross-entropy, and of TRL's
`ChunkedLogProbFunction`: the lm_head projection and the log-softmax are done for `chunk_tokens` rows
at a time in forward, and recomputed chunk by chunk in backward, so only hidden, weight, targets and
one logsumexp per token are kept for backward. Simplified against TRL: chunks span the whole
vocabulary (no vocab tiling, no online logsumexp), no softcapping or logit scale (the Qwen2 / Llama /
Mistral / Qwen3 heads have none), and no gradient through the entropy (it is for logging).

A frozen head (LoRA training: neither weight nor bias needs a gradient) takes Unsloth's shortcut: the
forward also finds d logp / d hidden for each token, u = (onehot(target) - softmax) W / temperature [M, H],
from the chunk's logits it already has, and keeps u instead of the hidden states; the backward only scales
its rows by dL/dlogp. Two vocabulary-sized products per chunk instead of three (the backward's recompute of
the logits is gone), and no softmax pass in the backward. At 8 x 16,384 on Qwen2.5-1.5B the three took
0.81 s of a 6.2 s training step and the two take 0.43 s (H100, 2026-11-28, bench/RESULTS.md tenth
session). A head that needs gradients keeps the recompute.

Numerics: the matmul runs in the hidden dtype (as the engine's decode does), the logits are upcast to
float32, divided by the temperature, and log-softmaxed in float32. Weight and bias gradients are
accumulated over chunks in float32.

Speed: on CUDA the element-wise work on each chunk (upcast, logsumexp, entropy in forward; softmax
gradient in backward) runs as one torch.compile'd kernel each (`fused=None` picks it where CUDA and
Triton are; the first call compiles for some seconds). A frozen head's forward instead runs
grpo/logprob_kernels.py's Triton kernel, which writes d logp / d logits over the logits: one [C, V] tensor
a chunk, so its chunks are twice as long for the same CHUNK_BYTES. The eager functions are the CPU path
and the reference the fused one is tested against. Measured on an H100 (bf16, 4096 tokens, H 1536, V 151936,
forward + backward): full logits 18.8 ms / 7.1 GiB extra; eager chunks 28.7 ms / 0.6 GiB; fused
chunks 13.0 ms / 0.4 GiB.
"""
from __future__ import annotations

import functools

import torch
from torch import Tensor

from . import logprob_kernels

# The [C, V] tensors a chunk holds at once, by default: counted as one float32 chunk of logits (4 bytes a
# logit: the logits and their gradient in bf16, or a float32 copy), or as the logits alone in their dtype
# where grpo/logprob_kernels.py writes the gradient over them (a frozen head, fused). The chunk sits at a
# training step's peak: on an H100 (2026-11-28, eleventh session, bench/RESULTS.md) 8 x 16,384 took 5.67 /
# 5.47 / 5.43 s with 64 / 128 / 256 MiB of two bf16 tensors, and 1.71 / 1.77 / 1.90 GiB above the weights
# (8 x 4,096: 1.43 / 1.40 / 1.32 s, 0.96 / 1.02 / 1.14 GiB). The lm_head products are memory-bound at 110
# tokens (each reads the whole head) and near compute-bound from a few hundred.
CHUNK_BYTES = 64 * 2**20


def default_chunk_tokens(vocab_size: int, bytes_per_logit: int = 4) -> int:
    """Tokens per chunk so that its [C, V] tensors, `bytes_per_logit` a logit, are about CHUNK_BYTES (>= 1)."""
    return max(1, CHUNK_BYTES // (bytes_per_logit * vocab_size))


# ------------------------------------------------------------------ per-chunk math (eager reference)

def chunk_forward(logits: Tensor, targets: Tensor, temperature: float, with_entropy: bool
                  ) -> tuple[Tensor, Tensor, Tensor | None]:
    """logits [C, V] (matmul dtype), targets [C] -> (logp [C], logsumexp [C], entropy [C] | None),
    all float32, of the distribution softmax(logits.float() / temperature)."""
    z = logits.float() if logits.dtype != torch.float32 else logits.clone()     # [C, V] float32
    if temperature != 1.0:
        z.div_(temperature)
    lse = torch.logsumexp(z, dim=-1)                                             # [C]
    logp = z.gather(1, targets[:, None]).squeeze(1) - lse                        # [C]
    entropy = None
    if with_entropy:  # H = lse - sum_v p_v z_v
        entropy = lse - torch.linalg.vecdot(torch.exp(z - lse[:, None]), z)      # [C]
    return logp, lse, entropy


def chunk_grad_logits(logits: Tensor, lse: Tensor, targets: Tensor, grad_logp: Tensor, temperature: float,
                      out_dtype: torch.dtype) -> Tensor:
    """d(sum_c grad_logp_c * logp_c) / d logits [C, V]: (1[v = target] - p_v) * grad_logp / temperature."""
    g = (grad_logp.float() / temperature)[:, None]                               # [C, 1]
    dz = logits.float() if logits.dtype != torch.float32 else logits.clone()    # [C, V] float32
    if temperature != 1.0:
        dz.div_(temperature)
    dz.sub_(lse[:, None]).exp_().mul_(-g).scatter_add_(1, targets[:, None], g)  # [C, V]
    return dz if out_dtype == torch.float32 else dz.to(out_dtype)


# ------------------------------------------------------------------ the same math, fused for CUDA

def _pure_forward(logits, targets, temperature: float, with_entropy: bool):
    # max, then one pass for sum(e) and sum(e * z): Inductor fuses it into one reduction over V
    z = logits.float() / temperature                                             # [C, V]
    zmax = z.amax(-1, keepdim=True)                                              # [C, 1]
    e = torch.exp(z - zmax)                                                      # [C, V]
    sum_e = e.sum(-1)                                                            # [C]
    lse = zmax.squeeze(1) + torch.log(sum_e)                                     # [C]
    logp = z.gather(1, targets[:, None]).squeeze(1) - lse
    entropy = lse - (e * z).sum(-1) / sum_e if with_entropy else None
    return logp, lse, entropy


def _pure_grad_logits(logits, lse, targets, grad_logp, temperature: float, out_dtype: torch.dtype):
    g = (grad_logp.float() / temperature)[:, None]                               # [C, 1]
    p = torch.exp(logits.float() / temperature - lse[:, None])                   # [C, V]
    onehot = torch.arange(logits.shape[1], device=logits.device)[None, :] == targets[:, None]
    return ((onehot.float() - p) * g).to(out_dtype)                              # [C, V]


def chunk_forward_and_dlogits(logits: Tensor, targets: Tensor, temperature: float, with_entropy: bool,
                              out_dtype: torch.dtype) -> tuple[Tensor, Tensor | None, Tensor]:
    """`chunk_forward`'s logp [C] and entropy [C] | None, and d logp / d logits [C, V] in `out_dtype`:
    (1[v = target] - p_v) / temperature (`chunk_grad_logits` with dL/dlogp = 1)."""
    logp, lse, entropy = chunk_forward(logits, targets, temperature, with_entropy)
    ones = torch.ones_like(logp)                                                 # [C]
    return logp, entropy, chunk_grad_logits(logits, lse, targets, ones, temperature, out_dtype)


def _pure_forward_and_dlogits(logits, targets, temperature: float, with_entropy: bool, out_dtype: torch.dtype):
    logp, lse, entropy = _pure_forward(logits, targets, temperature, with_entropy)
    p = torch.exp(logits.float() / temperature - lse[:, None])                   # [C, V]
    onehot = torch.arange(logits.shape[1], device=logits.device)[None, :] == targets[:, None]
    return logp, entropy, ((onehot.float() - p) / temperature).to(out_dtype)   # [C], [C] | None, [C, V]


@functools.cache
def _compiled():
    """Compiled once per process (the first call takes seconds); chunk sizes are dynamic."""
    return (torch.compile(_pure_forward, dynamic=True), torch.compile(_pure_grad_logits, dynamic=True),
            torch.compile(_pure_forward_and_dlogits, dynamic=True))


def _has_triton() -> bool:
    from torch.utils._triton import has_triton
    return has_triton()


def in_place_gradient(hidden: Tensor, fused: bool) -> bool:
    """Whether a frozen head's chunks take logprob_kernels' in-place kernel (the fused path where it runs)."""
    return fused and logprob_kernels.runs_here(hidden)


def _chunk_ops(fused: bool):
    """(forward, grad_logits, forward_and_dlogits): compiled kernels when fused, else the eager functions."""
    return _compiled() if fused else (chunk_forward, chunk_grad_logits, chunk_forward_and_dlogits)


# ------------------------------------------------------------------ the autograd Function

def _as_dtype(t: Tensor | None, dtype: torch.dtype) -> Tensor | None:
    return t if t is None or t.dtype == dtype else t.to(dtype)


class _ChunkedTokenLogprobs(torch.autograd.Function):
    """hidden [M, H], weight [V, H], bias [V] | None, targets [M] -> (logps [M], entropy [M] or empty)."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, temperature, chunk_tokens, with_entropy, fused):
        m, dtype = hidden.shape[0], hidden.dtype
        w, b = _as_dtype(weight, dtype), _as_dtype(bias, dtype)
        fwd, _, fwd_and_dlogits = _chunk_ops(fused)
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        # a frozen head: d logp / d hidden [M, H] is made here and kept (backward scales it), not the hidden
        dlogp_dhidden = hidden.new_empty(hidden.shape) if need_h and not (need_w or need_b) else None
        logps = hidden.new_empty(m, dtype=torch.float32)                         # [M]
        lse = hidden.new_empty(m if dlogp_dhidden is None else 0, dtype=torch.float32)  # [M] or [0]
        entropy = hidden.new_empty(m if with_entropy else 0, dtype=torch.float32)  # [M] or [0]
        in_place = in_place_gradient(hidden, fused) and dlogp_dhidden is not None
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, m, chunk_tokens):
                e = min(s + chunk_tokens, m)
                logits = torch.nn.functional.linear(hidden[s:e], w, b)           # [C, V] hidden dtype
                if dlogp_dhidden is None:
                    logps[s:e], lse[s:e], ent_c = fwd(logits, targets[s:e], temperature, with_entropy)
                elif in_place:  # the logits become d logp / d logits: one [C, V] tensor alive
                    logps[s:e], ent_c = logprob_kernels.logp_and_dlogits_(logits, targets[s:e], temperature,
                                                                          with_entropy)
                    torch.mm(logits, w, out=dlogp_dhidden[s:e])                  # [C, H]
                else:
                    logps[s:e], ent_c, dz = fwd_and_dlogits(logits, targets[s:e], temperature, with_entropy, dtype)
                    del logits  # [C, V]: two alive (logits, then dz), as in the recomputing backward
                    torch.mm(dz, w, out=dlogp_dhidden[s:e])                      # [C, H]
                    del dz
                if with_entropy:
                    entropy[s:e] = ent_c
                logits = None  # before the next chunk's are made: one chunk of logits alive, not two
        if dlogp_dhidden is None:
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
        else:
            ctx.save_for_backward(dlogp_dhidden)
        ctx.temperature, ctx.chunk_tokens, ctx.fused = temperature, chunk_tokens, fused
        ctx.grad_in_forward = dlogp_dhidden is not None
        ctx.mark_non_differentiable(entropy)
        return logps, entropy

    @staticmethod
    def backward(ctx, grad_logps, _grad_entropy):
        if ctx.grad_in_forward:  # dL/dhidden = dL/dlogp * d logp / d hidden, row by row, in the hidden dtype
            dlogp_dhidden, = ctx.saved_tensors
            grad_h = torch.mul(dlogp_dhidden, grad_logps[:, None], out=torch.empty_like(dlogp_dhidden))  # [M, H]
            return grad_h, None, None, None, None, None, None, None
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        need_h, need_w, need_b = ctx.needs_input_grad[:3]
        m, dtype = hidden.shape[0], hidden.dtype
        w, b = _as_dtype(weight, dtype), _as_dtype(bias, dtype)
        _, grad_logits, _ = _chunk_ops(ctx.fused)
        grad_logps = grad_logps.contiguous()                                     # [M]
        # the weight gradient sums over chunks: keep dlogits in float32 for it (as TRL does)
        dz_dtype = torch.float32 if need_w or need_b else dtype
        grad_h = torch.empty_like(hidden) if need_h else None                    # [M, H]
        grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if need_w else None
        grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if need_b else None
        with torch.autocast(hidden.device.type, enabled=False):
            for s in range(0, m, ctx.chunk_tokens):
                e = min(s + ctx.chunk_tokens, m)
                logits = torch.nn.functional.linear(hidden[s:e], w, b)           # [C, V]
                dz = grad_logits(logits, lse[s:e], targets[s:e], grad_logps[s:e], ctx.temperature, dz_dtype)
                if need_h:
                    grad_h[s:e] = _as_dtype(dz, dtype) @ w                       # [C, H]
                if need_w:
                    grad_w.addmm_(dz.t(), hidden[s:e].float())                   # [V, H]
                if need_b:
                    grad_b.add_(dz.sum(0))                                       # [V]
                del logits, dz  # before the next chunk's are made (at the step's peak they were: 32 MiB)
        grad_w = grad_w.to(weight.dtype) if need_w else None
        grad_b = grad_b.to(bias.dtype) if need_b else None
        return grad_h, grad_w, grad_b, None, None, None, None, None


def chunked_token_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, *, temperature: float = 1.0,
                           bias: Tensor | None = None, chunk_tokens: int | None = None,
                           with_entropy: bool = False, fused: bool | None = None
                           ) -> tuple[Tensor, Tensor | None]:
    """hidden [N, T, H] (any float dtype), weight [V, H] (the lm_head), targets [N, T] long ->
    (logps [N, T] float32, entropy [N, T] float32 detached or None).

    logits = hidden @ weight.T (+ bias), divided by temperature, log-softmax in float32; computed
    `chunk_tokens` flattened tokens at a time (default: about CHUNK_BYTES, 64 MiB, of [C, V] tensors),
    in backward too, so no [N, T, V] tensor ever exists. Gradients reach hidden, and weight / bias only
    when they require grad (a frozen head's d logp / d hidden is made in the forward). The entropy is that
    of the temperature-scaled distribution. Negative targets (padding such as -100) are scored as token 0;
    mask them out afterwards. `fused` (default: on CUDA) runs each chunk's element-wise math as compiled
    kernels (a frozen head's as logprob_kernels' Triton kernel).
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    n, t, h = hidden.shape
    vocab = weight.shape[0]
    fused = (hidden.is_cuda and _has_triton()) if fused is None else fused
    if chunk_tokens is None:  # the head's chunks in this pass and in a no-grad pass alike (same GEMM shapes)
        head_trains = weight.requires_grad or (bias is not None and bias.requires_grad)
        one_tensor = in_place_gradient(hidden, fused) and not head_trains
        chunk = default_chunk_tokens(vocab, hidden.element_size() if one_tensor else 4)
    else:
        chunk = int(chunk_tokens)
    if chunk < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    flat_h = hidden.reshape(n * t, h)                                            # [N*T, H]
    flat_targets = targets.reshape(n * t).long().clamp(min=0)                    # [N*T] (-100 pads -> 0)
    logps, entropy = _ChunkedTokenLogprobs.apply(
        flat_h, weight, bias, flat_targets, float(temperature), chunk, with_entropy, fused)
    return logps.view(n, t), (entropy.view(n, t) if with_entropy else None)      # [N, T]
