"""Each decoder layer's MLP run over tiles of tokens, so its [T, intermediate] activations never exist whole.

At long completions the largest tensors of a training step are the MLP's intermediates: for one row of
4,170 tokens on Qwen2.5-1.5B, gate, up, SiLU(gate) and their product are four [4170, 8960] tensors (75 MiB
each in bf16) that autograd keeps from the layer's recompute until its backward. The MLP is token-wise,
so it can run a tile of tokens at a time: the forward computes the output tile by tile and keeps only
the MLP's input; the backward recomputes one tile's MLP with autograd and back-propagates it, then the
next (the idea of Arctic's and Unsloth's TiledMLP).

With offloaded checkpointing (models/offload.py) that costs no extra compute: the layer's recompute in
the backward is run for its graph only (`graph_only_recompute`), and the MLP's output there is only added
to the residual stream, whose value nothing reads. So in that recompute the tiled MLP returns an
uninitialised tensor of the output's shape and does its one forward per tile in its own backward: the
MLP's forward still runs twice per step, as with plain recompute. That holds only for architectures whose
layer adds the MLP's output to the residual and returns it (`TILED_MODEL_TYPES`); Gemma's post-MLP norm,
for one, would read it. MLPs with dropout are not tiled (their masks would be drawn in another order).
"""
from __future__ import annotations

import functools
import math
import threading
from contextlib import contextmanager

import torch

TILE_TOKENS = 2048  # at most this many tokens per tile: [2048, 8960] bf16 intermediates are 35 MiB each
TILED_MODEL_TYPES = frozenset({"llama", "mistral", "qwen2", "qwen3"})  # layer output = residual + mlp(norm(h))

_local = threading.local()


@contextmanager
def graph_only_recompute():
    """Marks a checkpoint's recompute whose output values are not read (only its autograd graph is)."""
    previous = getattr(_local, "graph_only", False)
    _local.graph_only = True
    try:
        yield
    finally:
        _local.graph_only = previous


def in_graph_only_recompute() -> bool:
    return getattr(_local, "graph_only", False)


def tile_bounds(n_tokens: int, tile_tokens: int) -> list[tuple[int, int]]:
    """[start, stop) of ceil(n / tile_tokens) tiles of near-equal size covering n tokens."""
    n_tiles = max(1, math.ceil(n_tokens / tile_tokens))
    size = math.ceil(n_tokens / n_tiles)
    return [(start, min(start + size, n_tokens)) for start in range(0, n_tokens, size)] or [(0, 0)]


def _autocast_state(device_type: str) -> dict:
    return dict(device_type=device_type, enabled=torch.is_autocast_enabled(device_type),
                dtype=torch.get_autocast_dtype(device_type))


def _by_tiles(mlp_forward, x: torch.Tensor, tile_tokens: int) -> torch.Tensor:
    """mlp_forward(x) computed tile by tile over the tokens of x [..., H]."""
    flat = x.reshape(-1, x.shape[-1])  # [N, H]
    tiles = [mlp_forward(flat[start:stop]) for start, stop in tile_bounds(flat.shape[0], tile_tokens)]
    return torch.cat(tiles).view(*x.shape[:-1], tiles[0].shape[-1])  # [..., H_out]


class _TiledMLP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, mlp_forward, tile_tokens):
        ctx.mlp_forward, ctx.tile_tokens = mlp_forward, tile_tokens
        ctx.autocast = _autocast_state(x.device.type)
        ctx.save_for_backward(x)
        if in_graph_only_recompute():  # nothing reads the value: the tiles' forwards run in the backward
            return torch.empty_like(x)  # [..., H]: an MLP maps the hidden size back to itself
        with torch.no_grad():
            return _by_tiles(mlp_forward, x, tile_tokens)

    @staticmethod
    def backward(ctx, grad):
        x, = ctx.saved_tensors
        flat_x, flat_grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1])  # [N, H], [N, H]
        grad_x = torch.zeros_like(flat_x) if ctx.needs_input_grad[0] else None  # [N, H]
        for start, stop in tile_bounds(flat_x.shape[0], ctx.tile_tokens):
            tile = flat_x[start:stop].detach().requires_grad_(grad_x is not None)
            with torch.enable_grad(), torch.autocast(**ctx.autocast):
                out = ctx.mlp_forward(tile)  # [t, H]
            if out.requires_grad:  # the tile's LoRA gradients accumulate into .grad here
                torch.autograd.backward(out, flat_grad[start:stop].to(out.dtype))
            if grad_x is not None and tile.grad is not None:
                grad_x[start:stop] = tile.grad
        ctx.mlp_forward = None
        return (grad_x.view_as(x) if grad_x is not None else None), None, None


def _tiled_forward(mlp_forward, x: torch.Tensor) -> torch.Tensor:
    if not torch.is_grad_enabled():
        return _by_tiles(mlp_forward, x, TILE_TOKENS)
    return _TiledMLP.apply(x, mlp_forward, TILE_TOKENS)


def tile_mlps(model) -> int:
    """Makes each decoder layer's `mlp` run by token tiles (in place: its modules and weights stay where
    they are). Returns how many MLPs were tiled: none for model types outside TILED_MODEL_TYPES, and an MLP
    with active dropout (e.g. LoRA dropout on its projections) is left as it is."""
    if getattr(model.config, "model_type", None) not in TILED_MODEL_TYPES:
        return 0
    tiled = 0
    for layer in _decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in mlp.modules()):
            continue
        if "_ahazero_untiled_forward" not in mlp.__dict__:
            mlp._ahazero_untiled_forward = mlp.forward
            mlp.forward = functools.partial(_tiled_forward, mlp._ahazero_untiled_forward)
        tiled += 1
    return tiled


def _decoder_layers(model) -> list:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return list(layers) if layers is not None else []
