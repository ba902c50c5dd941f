"""Gradient checkpointing with each decoder layer's input kept in (pinned) CPU memory.

`use_gradient_checkpointing="offload"` (Unsloth's "unsloth"): plain checkpointing keeps one activation
per layer on the GPU, the layer's input [B, T, H]; at long completions those inputs are what is left
(28 layers x 8 x 4096 x 1536 x 2 bytes = 2.6 GiB for Qwen2.5-1.5B). Here the forward of each layer runs
without autograd, its input is copied to pinned CPU memory on a side CUDA stream (overlapping the next
layers' compute), and the backward copies it back, recomputes the layer with autograd and back-propagates
through it. While layer i recomputes, layer i-1's input is already coming back on the side stream. On CUDA
both passes of a layer are replayed from CUDA graphs once their shapes have been met (layer_graphs.py).

This is transformers' checkpoint hook (`GradientCheckpointingLayer` calls
`_gradient_checkpointing_func(layer_forward, *args)`), so only which function does the checkpointing
changes. The RNG and autocast states are restored for the recompute (dropout masks match, autocast
regions compute alike), as torch.utils.checkpoint does. On the CPU there is nothing to offload to: the
input is kept as is (the math is the same).
Simplified against torch.utils.checkpoint: one tensor input (the hidden states) may require a gradient;
other positional inputs are passed through as constants.
"""
from __future__ import annotations

import collections
import weakref

import torch

from . import layer_graphs
from .tiled_mlp import autocast_state, graph_only_recompute


class _Offloaded:
    """One layer input in CPU memory (or as is, off CUDA), with a copy back that can start early."""

    _last: weakref.ref | None = None  # the previous entry made, whose input backward needs next

    def __init__(self, hidden: torch.Tensor):
        self.device, self.previous = hidden.device, _Offloaded._last
        _Offloaded._last = weakref.ref(self)
        self.back: torch.Tensor | None = None
        if hidden.device.type != "cuda":
            self.cpu, self.back = None, hidden.detach()
            return
        stream = _side_stream(hidden.device)
        stream.wait_stream(torch.cuda.current_stream(hidden.device))  # the input is written
        self.cpu = torch.empty(hidden.shape, dtype=hidden.dtype, pin_memory=True)  # like hidden, on the host
        with torch.cuda.stream(stream):
            self.cpu.copy_(hidden.detach(), non_blocking=True)
        _keep_host_near(stream, hidden)  # holds hidden until its copy is done (rather than record_stream)

    def prefetch(self) -> None:
        """Start the copy back to the GPU on the side stream (after the copy out, which is on it too)."""
        if self.back is not None:
            return
        stream = _side_stream(self.device)
        with torch.cuda.stream(stream):
            self.back = self.cpu.to(self.device, non_blocking=True)

    def get(self) -> torch.Tensor:
        self.prefetch()
        if self.device.type == "cuda":
            torch.cuda.current_stream(self.device).wait_stream(_side_stream(self.device))
            self.back.record_stream(torch.cuda.current_stream(self.device))
            _keep_host_near(torch.cuda.current_stream(self.device))
        back, self.back, self.cpu = self.back, None, None
        previous = self.previous() if self.previous is not None else None
        if previous is not None and previous.cpu is not None:
            previous.prefetch()  # the next layer backward needs: its copy overlaps this recompute
        return back


_streams: dict[torch.device, torch.cuda.Stream] = {}
MAX_LAYERS_AHEAD = 2  # how many layers the host may enqueue beyond what the GPU has reached
_marks: collections.deque = collections.deque()  # (event, tensor held until the event has happened)


def _keep_host_near(stream: torch.cuda.Stream, hold: torch.Tensor | None = None) -> None:
    """Keeps the host at most MAX_LAYERS_AHEAD layers ahead of the GPU, and `hold` (a layer input being
    copied out on `stream`) alive until its copy has run. Marks the layer on `stream` and waits for the
    mark MAX_LAYERS_AHEAD layers back, then lets go of what that mark held.

    A layer input's GPU memory must not be reused before the GPU has copied it out (forward) or run the
    layer's backward (the copy back in). With `record_stream` for that, the caching allocator keeps an
    input freed by the host until the GPU reaches the free; when the host runs far ahead of the GPU, as with
    the layers replayed from CUDA graphs, 25 of 28 layers' inputs (305 MiB at 4,170 tokens, Qwen2.5-1.5B)
    were allocated at the step's peak on an H100. Holding them here, at most MAX_LAYERS_AHEAD at a time,
    bounds that."""
    mark = torch.cuda.Event()
    mark.record(stream)
    _marks.append((mark, hold))
    while len(_marks) > MAX_LAYERS_AHEAD:
        mark, _ = _marks.popleft()
        mark.synchronize()


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    if device not in _streams:
        _streams[device] = torch.cuda.Stream(device)
    return _streams[device]


class _OffloadedCheckpoint(torch.autograd.Function):
    @staticmethod
    def forward(ctx, function, hidden, *args):
        ctx.function, ctx.args, ctx.n_args = function, args, len(args)
        ctx.cpu_rng = torch.get_rng_state()
        ctx.cuda_rng = torch.cuda.get_rng_state(hidden.device) if hidden.is_cuda else None
        ctx.autocast = autocast_state(hidden.device.type)
        ctx.saved = _Offloaded(hidden)
        out = layer_graphs.graphed_forward(function, hidden, args, ctx.autocast)  # None: run it eagerly
        if out is not None:
            return out
        with torch.no_grad():
            return function(hidden, *args)

    @staticmethod
    def backward(ctx, *grads):
        hidden = ctx.saved.get().detach()
        grad_hidden = layer_graphs.graphed_backward(ctx.function, hidden, grads[0], ctx.args, ctx.autocast,
                                                    graph_only_recompute) if len(grads) == 1 else None
        if grad_hidden is not None:  # the recompute and back-propagation replayed from a CUDA graph
            ctx.function = ctx.args = ctx.saved = None
            return (None, grad_hidden) + (None,) * ctx.n_args
        hidden.requires_grad_(True)
        devices = [hidden.device] if hidden.is_cuda else []
        with torch.random.fork_rng(devices=devices), torch.enable_grad(), torch.autocast(**ctx.autocast):
            torch.set_rng_state(ctx.cpu_rng)
            if ctx.cuda_rng is not None:
                torch.cuda.set_rng_state(ctx.cuda_rng, hidden.device)
            with graph_only_recompute():  # only the graph is used: a tiled MLP runs its forward in its backward
                out = ctx.function(hidden, *ctx.args)
        outs = out if isinstance(out, tuple) else (out,)
        pairs = [(o, g) for o, g in zip(outs, grads) if torch.is_tensor(o) and o.requires_grad and g is not None]
        if pairs:
            torch.autograd.backward([o for o, _ in pairs], [g for _, g in pairs])
        ctx.function = ctx.args = ctx.saved = None
        return (None, hidden.grad) + (None,) * ctx.n_args


def offloaded_checkpoint(function, *args):
    """transformers' `_gradient_checkpointing_func` signature: `function(*args)` is the layer's forward."""
    hidden, rest = args[0], args[1:]
    if not torch.is_tensor(hidden):
        raise TypeError(f"offloaded checkpointing expects the hidden states first, got {type(hidden).__name__}")
    for a in rest:
        if torch.is_tensor(a) and a.requires_grad:
            raise NotImplementedError("offloaded checkpointing: only the first input may require a gradient")
    if not hidden.requires_grad:  # e.g. the first layer's input (frozen embeddings): the Function's output
        hidden = hidden.detach().requires_grad_(True)  # must still carry a graph to the layer's LoRA weights
    return _OffloadedCheckpoint.apply(function, hidden, *rest)
