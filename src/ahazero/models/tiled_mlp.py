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

Tiles multiply the operations the host launches (measured on an H100 at 4,096-token rows: the step became
bound by the CPU, at ~40 us an operation). So the common case, a SwiGLU MLP with the fused plain-LoRA
forward on gate, up and down over frozen 16-bit or NF4 weights (`swiglu_lora_parts`), has its tile forward
and backward written out (`_TiledLoraSwiGLU`): the same products as autograd's without an autograd graph and
nested backward per tile, and the backward's recompute stops at the down projection's input (its output
is not needed). Any other MLP takes autograd per tile (`_TiledMLP`). For NF4 weights, counted on the CPU
(bench/host_ops.py, 2026-11-27 ninth session, 28 layers, r=32): 8 rows of 100 + 1,024 tokens launch 66,089
kernel ops a step against 73,369 through autograd per tile (10,692 autograd nodes against 15,620), and each
weight is dequantised 5 times a tile in the backward instead of 6. On a GPU in 16-bit, the gate's and up's
LoRA terms (and the down projection's in the backward) are added inside the SwiGLU's kernels
(models/swiglu_kernels.py) rather than by an `addmm_` that reads and writes a whole [t, I] product.
"""
from __future__ import annotations

import functools
import math
import threading
from contextlib import contextmanager

import torch

from . import swiglu_kernels
from .fused_math import swiglu, swiglu_backward_
from .lora import cast_adapters, lora_add_, scaled_cast

# at most this many tokens per tile: [1024, 8960] bf16 intermediates are 17.5 MiB each. On an H100 with the
# layer graphs (2026-11-27, bench/RESULTS.md eighth session) 1,024 against 2,048: 8 x 4,096 1.53 against 1.74 s
# and 0.03 GiB less; 8 x 16,384 as fast; the seed notebook's 4-bit step (one chunk of ~1,700 tokens, untiled at
# 2,048) 0.07 GiB less at its peak
TILE_TOKENS = 1024
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


def has_active_dropout(module: torch.nn.Module) -> bool:
    """Whether a dropout of nonzero rate is in `module` (a recompute or replay would draw other masks)."""
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 for m in module.modules())


def autocast_state(device_type: str) -> dict:
    """torch.autocast's arguments that reproduce the current state (a recompute runs under the forward's)."""
    return dict(device_type=device_type, enabled=torch.is_autocast_enabled(device_type),
                dtype=torch.get_autocast_dtype(device_type))


def _by_tiles(mlp_forward, x: torch.Tensor, tile_tokens: int) -> torch.Tensor:
    """mlp_forward(x) computed tile by tile over the tokens of x [..., H]."""
    flat = x.reshape(-1, x.shape[-1])  # [N, H]
    tiles = [mlp_forward(flat[start:stop]) for start, stop in tile_bounds(flat.shape[0], tile_tokens)]
    return torch.cat(tiles).view(*x.shape[:-1], tiles[0].shape[-1])  # [..., H_out]


class _TiledMLP(torch.autograd.Function):
    """Any MLP by tiles: the backward recomputes one tile through the MLP's own forward with autograd (under
    the forward's autocast state) and back-propagates it, then the next; gradients reach .grad per tile."""

    @staticmethod
    def forward(ctx, x, mlp_forward, tile_tokens):
        ctx.mlp_forward, ctx.tile_tokens = mlp_forward, tile_tokens
        ctx.autocast = autocast_state(x.device.type)
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


class _TiledLoraSwiGLU(torch.autograd.Function):
    """`_TiledMLP` for down(silu(gate(x)) * up(x)) with plain LoRA on all three projections over frozen 16-bit
    or NF4 weights (`swiglu_lora_parts`), its backward written out: no autograd graph per tile, no down
    projection in the backward's recompute. The LoRA products that a tile's [t, I] tensors do not enter (S = x
    (sA)^T of gate and up, dS = g B of down, and from them the gate's and up's dL/dx and dL/dA, the down's
    dL/dB) are one GEMM each for the whole row, not one a tile: at 8 x 16,384 on Qwen2.5-1.5B the tiles'
    small LoRA GEMMs were about 0.5 s of a 5.1 s step (H100 profile, 2026-11-28, eleventh session). The
    adapter gradients that need a tile's [t, I] tensors are summed over the tiles in float32. An NF4 weight is
    dequantised where a product needs it (`_dense`), one at a time, as its own forward and backward do.
    Inputs: x [..., H], the frozen bases of gate, up and down (16-bit W [out, in] or Linear4bit modules), then
    A [r, in] and B [out, r] of each (float32)."""

    @staticmethod
    def forward(ctx, x, tile_tokens, scalings, bases, *adapters):
        ctx.tile_tokens, ctx.scalings, ctx.bases = tile_tokens, scalings, bases  # bases: frozen, never changed
        ctx.save_for_backward(x, *adapters)
        if in_graph_only_recompute():
            return torch.empty_like(x)  # [..., H]
        return _swiglu_lora_by_tiles(x, _cast_parts(_parts_of(bases, adapters, scalings), x.dtype), tile_tokens)

    @staticmethod
    def backward(ctx, grad):
        x, *adapters = ctx.saved_tensors
        parts = _cast_parts(_parts_of(ctx.bases, adapters, ctx.scalings), x.dtype)
        (_, a_gate, _), (_, a_up, _), (_, _, b_down) = parts
        flat, flat_grad = x.reshape(-1, x.shape[-1]), grad.reshape(-1, grad.shape[-1]).to(x.dtype)  # [N, H]
        # the row's [N, r] LoRA products, made or finished here by one GEMM each rather than one per tile
        shrunk = _row_shrinks(flat, parts)  # S of gate and up, [N, r] each
        grad_down_shrunk = torch.mm(flat_grad, b_down)  # [N, r]: dS of down = g B
        down_shrunk = torch.empty_like(grad_down_shrunk)  # [N, r]: S of down, tile by tile
        grad_shrunk = (torch.empty_like(shrunk[0]), torch.empty_like(shrunk[1]))  # [N, r]: dS of gate, up
        grad_x = torch.empty_like(flat)  # [N, H]
        totals = None  # float32 sums over the tiles of dA / s of down and dB of gate and up
        for start, stop in tile_bounds(flat.shape[0], ctx.tile_tokens):
            rows = slice(start, stop)
            tile_grads = _swiglu_lora_tile_backward(
                flat[rows], flat_grad[rows], parts, grad_x[rows], [s[rows] for s in shrunk],
                grad_down_shrunk[rows], down_shrunk[rows], [g[rows] for g in grad_shrunk])
            if totals is None:
                totals = [g.to(torch.float32) for g in tile_grads]
            else:
                for total, g in zip(totals, tile_grads):
                    total.add_(g)
        grad_a_down, grad_b_gate, grad_b_up = totals
        grad_x.addmm_(grad_shrunk[0], a_gate).addmm_(grad_shrunk[1], a_up)  # gate's and up's LoRA dL/dx
        grad_a_gate, grad_a_up = torch.mm(grad_shrunk[0].t(), flat), torch.mm(grad_shrunk[1].t(), flat)
        grad_b_down = torch.mm(flat_grad.t(), down_shrunk)  # [H, r]
        grads = []
        for k, (grad_a, grad_b) in enumerate([(grad_a_gate, grad_b_gate), (grad_a_up, grad_b_up),
                                              (grad_a_down, grad_b_down)]):  # gate, up, down
            a, b = adapters[2 * k], adapters[2 * k + 1]
            grads += [scaled_cast(grad_a, ctx.scalings[k], a.dtype), grad_b.to(b.dtype)]  # dA = s dS^T x
        ctx.bases = None
        return (grad_x.view_as(x) if ctx.needs_input_grad[0] else None), None, None, None, *grads


def _swiglu_lora_by_tiles(x: torch.Tensor, parts, tile_tokens: int) -> torch.Tensor:
    """The written-out MLP forward over the tokens of x [..., H], tile by tile (each written in place)."""
    flat = x.reshape(-1, x.shape[-1])  # [N, H]
    out = torch.empty_like(flat)  # [N, H]
    shrunk = _row_shrinks(flat, parts)  # [N, r] x 2
    for start, stop in tile_bounds(flat.shape[0], tile_tokens):
        hidden = _gated_hidden(flat[start:stop], parts, [s[start:stop] for s in shrunk])[0]
        _lora_linear(hidden, parts[2], out=out[start:stop])
    return out.view_as(x)


def _row_shrinks(x: torch.Tensor, parts) -> list[torch.Tensor]:
    """The LoRA products S = x (sA)^T [N, r] of gate and up for all the tokens of x [N, H] (two GEMMs for the
    row, which the tiles slice, rather than two a tile)."""
    return [torch.mm(x, a_scaled.t()) for _, a_scaled, _ in parts[:2]]


def _parts_of(bases, adapters, scalings) -> list[tuple]:
    """[(W, A, B, s)] of gate, up, down from the Function's inputs (A, B of each in turn)."""
    return [(bases[i], adapters[2 * i], adapters[2 * i + 1], scalings[i]) for i in range(3)]


def _dense(w, dtype: torch.dtype) -> torch.Tensor:
    """The weight [out, in] as a product takes it: a 16-bit tensor as it is, an NF4 Linear4bit dequantised."""
    return w if isinstance(w, torch.Tensor) else w.dequantized_weight(dtype)


def _base_dtype(w) -> torch.dtype:
    return w.dtype if isinstance(w, torch.Tensor) else w.compute_dtype


def _cast_parts(parts, dtype) -> list[tuple]:
    """[(W, sA, B)] in the compute dtype, as `_LoraAdd` casts them (models/lora.py `cast_adapters`)."""
    return [(w, *cast_adapters(a, b, s, dtype)) for w, a, b, s in parts]


def _lora_linear(x, part, out=None, shrunk=None):
    """x W^T + (x (sA)^T) B^T as `_LoraAdd` computes it: ([t, out], the product S = x (sA)^T [t, r], made
    here unless given), written into `out` when given."""
    w, a_scaled, b = part
    y = torch.mm(x, _dense(w, x.dtype).t(), out=out)  # [t, out]
    return y, lora_add_(y, x, a_scaled, b, shrunk)


def _gated_hidden(x, parts, shrunk):
    """A tile's silu(gate) * up [t, I], with gate and up, from x [t, H] and the tile's rows of the gate and
    up LoRA products S [t, r] (`_row_shrinks`). Where swiglu_kernels covers x, gate and up come back as the
    bases' products only: the kernel adds their LoRA terms inside (and its backward again)."""
    if swiglu_kernels.covers(x):
        (w_gate, _, b_gate), (w_up, _, b_up) = parts[:2]
        gate, up = torch.mm(x, _dense(w_gate, x.dtype).t()), torch.mm(x, _dense(w_up, x.dtype).t())  # [t, I]
        return swiglu_kernels.swiglu_lora(gate, up, (shrunk[0], b_gate), (shrunk[1], b_up)), (gate, up)
    gate, up = (_lora_linear(x, part, shrunk=s)[0] for part, s in zip(parts[:2], shrunk))
    return swiglu(gate, up), (gate, up)  # [t, I] x 3


def _swiglu_lora_tile_backward(x, grad, parts, grad_x, shrunk, grad_down_shrunk, down_shrunk_out,
                               grad_shrunk_out):
    """One tile's part of the MLP's backward. In: x, grad [t, H]; the tile's rows of the row-wide [t, r]
    products S of gate and up (`shrunk`) and dS = g B of down. Out: dL/dx's base parts (gate's and up's,
    summed by the GEMMs), written into grad_x [t, H]; S of down and dS of gate and up, written into the
    row-wide products' rows (`down_shrunk_out`, `grad_shrunk_out`: the backward finishes dL/dx and the other
    adapter gradients from them, one GEMM each for the row); returned: the down projection's dL/dA / s
    [r, I] and dL/dB of gate and up [I, r], which need the tile's [t, I] tensors.
    It recomputes the tile's forward up to the down projection's input (not the output, which nothing
    needs); the SiLU and product backward are fused_math's (autograd's silu_backward and products, one
    kernel on CUDA). The [t, I] tensors set the tile's peak, so at most three are alive at once: the down
    projection's adapter gradient is taken before its input gradient is made, that gradient's LoRA part is
    added in place, and the SiLU and product backward writes its gradients over gate and up."""
    hidden, (gate, up) = _gated_hidden(x, parts, shrunk)  # [t, I] x 3
    (w_gate, _, b_gate), (w_up, _, b_up), (w_down, a_down, _) = parts
    torch.mm(hidden, a_down.t(), out=down_shrunk_out)  # [t, r]: S of down, as `_lora_linear` makes it
    grad_a_down = torch.mm(grad_down_shrunk.t(), hidden)  # [r, I]
    del hidden
    grad_hidden = torch.mm(grad, _dense(w_down, grad.dtype))  # [t, I]: g W, then + dS (sA)
    if swiglu_kernels.covers(x):  # the LoRA terms of gate, up and grad_hidden added in the kernel
        swiglu_kernels.swiglu_lora_backward_(grad_hidden, gate, up, (shrunk[0], b_gate), (shrunk[1], b_up),
                                             (grad_down_shrunk, a_down))
    else:
        swiglu_backward_(grad_hidden.addmm_(grad_down_shrunk, a_down), gate, up)
    # gate, up [t, I] := dL/dgate, dL/dup
    del grad_hidden
    torch.mm(gate, _dense(w_gate, gate.dtype), out=grad_x)  # dL/dx: the bases' parts summed by the GEMMs
    torch.mm(gate, b_gate, out=grad_shrunk_out[0])  # [t, r]: dS = g B
    grad_b_gate = torch.mm(gate.t(), shrunk[0])  # [I, r]: g^T S
    del gate
    grad_x.addmm_(up, _dense(w_up, up.dtype))
    torch.mm(up, b_up, out=grad_shrunk_out[1])
    grad_b_up = torch.mm(up.t(), shrunk[1])
    return grad_a_down, grad_b_gate, grad_b_up


def swiglu_lora_parts(mlp) -> list | None:
    """[(W, A, B, scaling)] of gate, up and down when `mlp` computes down(silu(gate(x)) * up(x)) with each
    projection plain LoRA in the fused forward's precision (models/lora.py: `has_fused_forward`,
    `plain_lora_adapter`, no dropout) over a frozen, bias-free torch.nn.Linear (W its weight) or NF4
    Linear4bit (W the module); else None (the MLP then takes autograd through `_TiledMLP`, whatever its
    layers compute)."""
    from .linear4bit import Linear4bit
    from .lora import has_fused_forward, plain_lora_adapter
    if type(getattr(mlp, "act_fn", None)).__name__ not in ("SiLU", "SiLUActivation"):
        return None
    parts = []
    for name in ("gate_proj", "up_proj", "down_proj"):
        proj = getattr(mlp, name, None)
        adapter = plain_lora_adapter(proj) if hasattr(proj, "lora_A") and has_fused_forward(proj) else None
        base = getattr(proj, "base_layer", None)
        if (adapter is None or type(base) not in (torch.nn.Linear, Linear4bit) or base.bias is not None
                or base.weight.requires_grad or isinstance(proj.lora_dropout[adapter], torch.nn.Dropout)):
            return None
        parts.append((base if type(base) is Linear4bit else base.weight, proj.lora_A[adapter].weight,
                      proj.lora_B[adapter].weight, proj.scaling[adapter]))
    return parts


def _tiled_forward(mlp, x: torch.Tensor) -> torch.Tensor:
    """The installed forward: the written-out MLP where `swiglu_lora_parts` allows it (and x and any autocast
    are in the weights' dtype), else the MLP's own forward tile by tile; through autograd Functions when
    gradients are on."""
    parts = swiglu_lora_parts(mlp)
    tile = mlp.__dict__.get("_ahazero_tile_tokens") or TILE_TOKENS
    autocast = autocast_state(x.device.type)
    if parts is not None and (any(_base_dtype(p[0]) != x.dtype for p in parts)
                              or autocast["enabled"] and autocast["dtype"] != x.dtype):
        parts = None
    grad = torch.is_grad_enabled()
    if parts is not None and not grad:
        return _swiglu_lora_by_tiles(x, _cast_parts(parts, x.dtype), tile)
    if parts is not None:
        adapters = [t for _, a, b, _ in parts for t in (a, b)]
        return _TiledLoraSwiGLU.apply(x, tile, tuple(p[3] for p in parts), tuple(p[0] for p in parts),
                                      *adapters)
    if not grad:
        return _by_tiles(mlp._ahazero_untiled_forward, x, tile)
    return _TiledMLP.apply(x, mlp._ahazero_untiled_forward, tile)


def tile_mlps(model) -> int:
    """Makes each decoder layer's `mlp` run by token tiles (in place: its modules and weights stay where
    they are). Returns how many MLPs were tiled: none for model types outside TILED_MODEL_TYPES, and an MLP
    with active dropout (e.g. LoRA dropout on its projections) is left as it is."""
    if getattr(model.config, "model_type", None) not in TILED_MODEL_TYPES:
        return 0
    tiled = 0
    for layer in _decoder_layers(model):
        mlp = getattr(layer, "mlp", None)
        if mlp is None or has_active_dropout(mlp):
            continue
        if "_ahazero_untiled_forward" not in mlp.__dict__:
            mlp._ahazero_untiled_forward = mlp.forward
            mlp.forward = functools.partial(_tiled_forward, mlp)
        tiled += 1
    return tiled


def set_tile_tokens(model, tokens: int | None) -> int:
    """Tokens per tile for each MLP of `model` that `tile_mlps` tiled (None: TILE_TOKENS); returns how many.
    A [tile, intermediate] tensor is what a tile holds: larger tiles take fewer, larger GEMMs (faster) for
    more memory (bench/RESULTS.md, 2026-11-28 thirteenth session: 2,048 instead of 1,024 on Qwen2.5-1.5B,
    8 x 4,096, 0.97 s and 1.02 GiB above the weights against 1.04 s and 0.96 GiB)."""
    if tokens is not None and (not isinstance(tokens, int) or tokens < 1):
        raise ValueError(f"tile tokens must be a positive int or None, not {tokens!r}")
    tiled = 0
    for module in model.modules():
        if "_ahazero_untiled_forward" in module.__dict__:
            module._ahazero_tile_tokens = tokens
            tiled += 1
    return tiled


def _decoder_layers(model) -> list:
    inner = getattr(model, "model", None)
    layers = getattr(inner, "layers", None)
    return list(layers) if layers is not None else []
