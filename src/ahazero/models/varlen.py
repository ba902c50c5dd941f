"""Varlen attention for packed training forwards: each packed sequence attends within itself only.

A padding-free forward (grpo/packing.py) runs a micro-batch as one row [1, S] whose `position_ids`
restart at 0 for each sequence. transformers' sdpa and eager attention would turn that into one dense
block-diagonal [S, S] mask: attention work S^2 instead of sum of L_i^2 (the built-in CPU demo took 228 s
packed that way against 100 s padded). This attention, registered with transformers'
`AttentionInterface` as "ahazero_varlen" and switched on only around packed forwards
(`packed_attention`), finds the sequences from the position_ids and computes

  on CUDA: PyTorch's own varlen FlashAttention (`torch.nn.attention.varlen.varlen_attn`, cu_seqlens,
           causal), with its autograd; no flash-attn package;
  elsewhere: one SDPA call over the sequences laid out as a padded batch (`batched_attention`);
  a row of one sequence (a chunk of one completion, as every long completion is): SDPA with is_causal
           (`one_sequence_attention`), where PyTorch picks its fastest causal kernel (cuDNN's on Hopper).
           On an H100 (torch 2.11, 2026-11-27) a training step at 8 x 16,384 took 7.45 s through
           varlen_attn (FlashAttention 2) and 5.97 s through this path (bench/RESULTS.md, eighth session).

The sequences are found once per packed forward, not once per layer: `packed_attention` keeps them
for the position_ids tensor every layer (and the backward's recompute) receives, so the host waits
for the GPU once per forward, not three times per layer (`torch.nonzero`, the first-position check and
the longest length each read a device value). Grouped-query K/V heads go to the kernel as they are where
it takes them (`enable_gqa`), not repeated to the query heads' count.

Its mask function returns None (no [S, S] mask is ever built). Simplified against transformers' flash
path: no dropout, no sliding window, no softcap, no attention sinks (the Llama / Qwen2 / Qwen3 / Mistral
configs we support use none of them in training); a model that needs one gets a clear error.
"""
from __future__ import annotations

import contextlib
import functools
import inspect

import torch
import torch.nn.functional as F

NAME = "ahazero_varlen"


def cu_seqlens_from_positions(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """position_ids [1, S] restarting at 0 per sequence -> (cu_seqlens int32 [N + 1], longest length)."""
    pos = position_ids.reshape(-1)  # [S]
    starts = torch.nonzero(pos == 0).reshape(-1)  # [N]
    if starts.numel() == 0 or starts[0] != 0:
        raise ValueError("packed position_ids must start at 0 and restart at 0 for each sequence")
    cu = torch.cat([starts, torch.tensor([pos.numel()], device=pos.device)]).to(torch.int32)  # [N + 1]
    return cu, int((cu[1:] - cu[:-1]).max())


_known: list[dict[int, tuple[torch.Tensor, torch.Tensor, int]]] = []  # per open packed_attention:
# id(position_ids) -> (position_ids, cu_seqlens, longest); the tensor is kept so that its id stays its own


def packed_sequences(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """`cu_seqlens_from_positions`, computed once per position_ids tensor inside `packed_attention`."""
    if not _known:
        return cu_seqlens_from_positions(position_ids)
    entry = _known[-1].get(id(position_ids))
    if entry is None or entry[0] is not position_ids:
        entry = (position_ids, *cu_seqlens_from_positions(position_ids))
        _known[-1][id(position_ids)] = entry
    return entry[1], entry[2]


def bind_sequences(position_ids: torch.Tensor, cu: torch.Tensor, longest: int) -> None:
    """Inside `packed_attention`: `position_ids` (e.g. a CUDA graph's static copy) has these sequences;
    the caller keeps `cu` holding them (a graph reads it from its address)."""
    if not _known:
        raise RuntimeError("bind_sequences runs inside packed_attention")
    _known[-1][id(position_ids)] = (position_ids, cu, longest)


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             sliding_window=None, softcap=None, s_aux=None, position_ids=None, **kwargs):
    """transformers' attention-function signature. query [1, Hq, S, D], key/value [1, Hkv, S, D] ->
    (output [1, S, Hq, D], None)."""
    if query.shape[0] != 1 or position_ids is None:
        raise ValueError("ahazero_varlen attention runs packed rows only: batch 1 with position_ids")
    if dropout or softcap or s_aux is not None:
        raise NotImplementedError("ahazero_varlen attention: dropout, softcap and attention sinks are not supported")
    cu, longest = packed_sequences(position_ids)
    if sliding_window is not None and longest > sliding_window:
        raise NotImplementedError(f"a packed sequence of {longest} tokens is longer than the sliding window "
                                  f"({sliding_window}); train with padding_free=False")
    if cu.numel() == 2:  # one sequence: plain causal attention
        return one_sequence_attention(query, key, value, scaling), None
    q, k, v = (t[0].transpose(0, 1) for t in (query, key, value))  # [S, H, D] (K/V: H_kv heads)
    flash = q.is_cuda and q.dtype in (torch.float16, torch.bfloat16) and q.shape[-1] <= 256  # its range
    if k.shape[1] != q.shape[1] and not (flash and "enable_gqa" in _varlen_params()):
        # grouped-query attention: each KV head serves H_q / H_kv query heads
        k, v = (t.repeat_interleave(q.shape[1] // t.shape[1], dim=1) for t in (k, v))
    if flash:
        out = _cuda_varlen(q, k, v, cu, longest, scaling)
    else:
        out = batched_attention(q, k, v, cu, longest, scaling)
    return out[None], None  # [1, S, Hq, D]


def one_sequence_attention(query, key, value, scaling: float | None) -> torch.Tensor:
    """Causal attention of a row that is one sequence: query [1, Hq, S, D], key/value [1, Hkv, S, D] ->
    [1, S, Hq, D]. Grouped-query K/V heads go to SDPA as they are (`enable_gqa`, torch >= 2.5)."""
    kw = {}
    if key.shape[1] != query.shape[1]:
        if torch.__version__ >= "2.5":
            kw["enable_gqa"] = True
        else:
            key, value = (t.repeat_interleave(query.shape[1] // t.shape[1], dim=1) for t in (key, value))
    out = F.scaled_dot_product_attention(query, key, value, is_causal=True, scale=scaling, **kw)  # [1, Hq, S, D]
    return out.transpose(1, 2)


def batched_attention(q, k, v, cu: torch.Tensor, longest: int, scaling: float | None) -> torch.Tensor:
    """Causal attention within each packed sequence, as one SDPA call over the sequences laid out as a
    padded batch [N, H, longest, D] (keys past a sequence's end masked). q, k, v: [S, H, D] -> [S, H, D].

    The CPU path: attention work N * longest^2 as in a padded batch (not S^2), in one call instead of
    one per sequence; the projections and MLP around it still run on the S packed tokens only."""
    S, H, D = q.shape
    n = cu.numel() - 1
    lengths = (cu[1:] - cu[:-1]).long()  # [N]
    seq = torch.repeat_interleave(torch.arange(n, device=q.device), lengths, output_size=S)  # [S] its sequence
    offset = torch.arange(S, device=q.device) - cu[:-1].long()[seq]  # [S] position within it
    slot = seq * longest + offset  # [S] row in the padded layout

    def to_batch(t):  # [S, H, D] -> [N, H, longest, D]
        padded = t.new_zeros(n * longest, H, D).index_copy_(0, slot, t)
        return padded.view(n, longest, H, D).transpose(1, 2)

    steps = torch.arange(longest, device=q.device)  # [L]
    causal = steps[None, :] <= steps[:, None]  # [L, L]
    valid_key = steps[None, :] < lengths[:, None]  # [N, L]
    mask = causal[None] & valid_key[:, None, :]  # [N, L, L]
    out = F.scaled_dot_product_attention(to_batch(q), to_batch(k), to_batch(v), attn_mask=mask[:, None],
                                         scale=scaling)  # [N, H, L, D]
    return out.transpose(1, 2).reshape(n * longest, H, D).index_select(0, slot)  # [S, H, D]


def _cuda_varlen(q, k, v, cu, longest: int, scaling):
    """`varlen_attn`, whose keyword arguments changed across PyTorch releases (is_causal in 2.10; scale and
    window_size=(-1, 0) for causal later): called with what this PyTorch has."""
    from torch.nn.attention.varlen import varlen_attn
    params = _varlen_params()
    kw = {"enable_gqa": True} if k.shape[1] != q.shape[1] else {}  # (only where params has it: the caller)
    if "is_causal" in params:
        kw["is_causal"] = True
    elif "window_size" in params:
        kw["window_size"] = (-1, 0)
    else:
        raise RuntimeError("torch.nn.attention.varlen.varlen_attn has no causal option in this PyTorch")
    if scaling is not None:
        if "scale" in params:
            kw["scale"] = scaling
        elif abs(scaling - q.shape[-1] ** -0.5) > 1e-6:
            raise RuntimeError("this PyTorch's varlen_attn has no `scale`; the model's is not 1/sqrt(head_dim)")
    return varlen_attn(q, k, v, cu, cu, longest, longest, **kw)


@functools.cache
def _varlen_params() -> frozenset:
    from torch.nn.attention.varlen import varlen_attn
    return frozenset(inspect.signature(varlen_attn).parameters)


def _no_mask(*args, **kwargs):
    return None


@functools.cache
def register() -> str:
    """Register the attention (and its no-op mask) with transformers once; returns its name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface
    AttentionInterface.register(NAME, varlen_attention_forward)
    AttentionMaskInterface.register(NAME, _no_mask)
    return NAME


@contextlib.contextmanager
def packed_attention(decoder):
    """Run the block with `decoder` (a transformers model) on the varlen attention; restores its own."""
    register()
    configs = {id(c): c for c in _configs(decoder)}.values()
    previous = [(c, c._attn_implementation) for c in configs]
    _known.append({})
    try:
        for c in configs:
            c._attn_implementation = NAME
        yield decoder
    finally:
        _known.pop()
        for c, impl in previous:
            c._attn_implementation = impl


def _configs(module):
    """Every config object the module's submodules read their attention implementation from."""
    for m in module.modules():
        config = getattr(m, "config", None)
        if config is not None and hasattr(config, "_attn_implementation"):
            yield config
