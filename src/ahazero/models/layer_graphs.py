"""CUDA graphs for a decoder layer's two passes under offloaded checkpointing.

At long completions, one row per micro-batch, a GRPO step on a GPU is bound by the host: each layer pass
launches some 400 kernels (the LoRA products, norms, RoPE, the MLP's tiles and the backward of each) at
~8 us of launch plus the Python and dispatch around each, while the GPU runs them in less (bench/RESULTS.md,
2026-11-27 fourth session: 5.3 s of host time under the profiler for 1.7 s of GPU time). Under offloaded
checkpointing (offload.py) a layer runs two programs per micro-batch that are fixed for given input shapes:
  forward:  its forward without autograd (the output goes on to the next layer);
  backward: its recompute with autograd and the back-propagation to its input and its trainable weights.
Each is captured once per (layer, pass, shapes) as a CUDA graph and then replayed with one launch.

- The first time a key is met the pass runs eagerly; the second time it runs once more eagerly on the
  capture stream (which warms up cuBLAS, FlashAttention and any Triton autotuning), is captured, and is
  replayed; after that it is replayed. A padded row's key (below) is captured at its first meeting. The
  warm-up runs once per pass and shapes (`_warm_key`: the key and the layer's parameters), not again for
  every layer of the same shapes: a warm-up's working memory is allocated outside the graphs' pool, and
  so is held beside it.
- A graph reads its inputs from static tensors shared by the layers of one shape (the hidden states, the
  incoming gradient, the layer's tensor keyword arguments such as RoPE's cos/sin and the position ids, and
  the packed sequences' cu_seqlens), into which each replay's inputs are copied (a keyword argument only
  when it is not the tensor copied last time: the layers of one forward share them).
- It writes its results into static tensors shared likewise: the layer output (forward) or the input's
  gradient (backward, over the incoming gradient, which is used up by then), copied out after the
  replay, and the trainable weights' gradients, added into their `.grad` with one foreach add (as
  autograd's accumulation would).
- All graphs share one memory pool. What a graph allocates is dead when it ends (its results are in the
  static tensors), so the pool holds one layer pass's working memory. That memory stays reserved by the
  pool, beside what the rest of the step allocates (0.26 GiB at 4,170 tokens on Qwen2.5-1.5B, tiles of
  2,048, bench/RESULTS.md 2026-11-27 fifth session; bench/memory.py counts it).
- A graph replays only where a micro-batch's shapes repeat: the packed length, the number of packed
  sequences and the bound on the longest. Completions that stop at EOS seldom repeat one, so the trainer
  pads each packed row of two or more sequences to the shape of the longest rows met so far
  (`padded_row_shape`: tokens a multiple of ROW_QUANTUM, the bound a multiple of BOUND_QUANTUM, with
  sequences of its own appended, grpo/packing.py `padded_to_shape`). That shape only grows, so after the
  first rows the graphs replay, and a shape's graphs are captured at its first meeting (it will be met
  again); when it grows, the older shape's graphs are dropped, and, where no graph is left, their pool is
  given back to the device before the new shape's captures (`_release_pool`). A row is not padded by more than
  MAX_PADDING of its own tokens beyond its own rounding (a short row after long ones runs as it is), nor
  to more than MAX_TOKENS (padding does not make a row longer than the micro-batches whose memory the
  trainer plans for by default). The padding is GPU work on idle time: on an H200 the seed notebook's
  4-bit update (one row of 6 x ~290 tokens) took 0.12-0.29 s replayed against 0.49-0.62 s eagerly, its
  step's peak 1.71 GiB with the graphs' pool (0.19) against 1.63 eagerly (bench/RESULTS.md, twenty-third
  and twenty-fourth sessions). The step whose row outgrew the shape peaked at 1.82 GiB before the warm-ups
  and the old pool were trimmed: every layer's warm-up beside the full pool (twenty-fifth session).
  Where a row's shape comes and goes anyway (graphs of more than MAX_SHAPES shapes dropped MAX_EVICTIONS
  times), a shape met once runs eagerly and is captured the next time, and after that no new shapes are
  captured: a capture costs about two eager passes. Rows of one sequence (a long completion's chunks)
  are not padded: they repeat their length, and take the one-sequence attention.

Eager, as without graphs, where a graph could not be right or is not worth it: off CUDA; a layer with an
active dropout (a replay would repeat its mask); FSDP2's sharded parameters; keyword arguments that are
not tensors or plain values (a KV cache); a layer output that is not one tensor; `LAYER_GRAPHS = False`
(env `AHAZERO_LAYER_GRAPHS=0`), or `allow(model, False)` (GRPOConfig(layer_graphs=False)). A capture
that fails (an out-of-memory error included) switches graphs off for the process, with a warning.
"""
from __future__ import annotations

import functools
import os
import warnings
import weakref
from collections import OrderedDict
from typing import NamedTuple

import torch

from .tiled_mlp import has_active_dropout

LAYER_GRAPHS = os.environ.get("AHAZERO_LAYER_GRAPHS", "1") != "0"
# packed rows padded to the shape of the longest so far, so that the graphs replay (env AHAZERO_GROW_ROWS=0: not)
GROW_ROWS = os.environ.get("AHAZERO_GROW_ROWS", "1") != "0"
ROW_QUANTUM = 256  # a padded row's tokens are a multiple of this
BOUND_QUANTUM = 128  # and the bound on its longest sequence (the varlen attention's) a multiple of this
MAX_PADDING = 0.5  # a row is padded to a grown shape by at most this fraction of its tokens (else as it is)
# nor to a shape of more tokens than the trainer's default micro_batch_tokens: the padding's activations are memory
# a user's micro-batch budget did not plan for. (It was set for a W1 step measured slower padded in the twenty-third
# session; bench/scaling.py runs without checkpointing, so neither graphs nor padding were on there: noise,
# bench/RESULTS.md twenty-fourth session.)
MAX_TOKENS = 4096
MAX_SHAPES = 4  # static inputs/outputs kept for this many shapes (least recently used dropped with their graphs)
MAX_EVICTIONS = 8  # shapes dropped before no new graphs are captured (the shapes vary too much to pay back)
_evictions = 0

_failed = False
_pool = None
_capture_stream: torch.cuda.Stream | None = None
_statics: OrderedDict = OrderedDict()  # shape key -> _Statics, least recently used first
# (shape, dtype) of a layer's trainable weights -> the static gradients its backward graphs write: one set for every
# shape key, as each replay's gradients are added into `.grad` before the next replay (in stream order)
_param_grads: dict = {}
_row_shape = None  # the RowShape rows are padded to now (padded_row_shape; it only grows)
_warmed: set = set()  # `_warm_key`s warmed up on the capture stream
_per_layer: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> its graphs (they go with it)
_graphable: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()  # layer -> whether it may be graphed


def layer_of(function):
    """The module whose forward `function` is: transformers' checkpoint hook passes
    `partial(forward, layer, **kwargs)` (or `partial(layer.__call__, **kwargs)`); None otherwise."""
    if not isinstance(function, functools.partial):
        return None
    if function.args and isinstance(function.args[0], torch.nn.Module):
        return function.args[0]
    owner = getattr(function.func, "__self__", None)
    return owner if isinstance(owner, torch.nn.Module) else None


def _plain(value) -> bool:
    return value is None or isinstance(value, (bool, int, float, str, torch.dtype))


def signature(value):
    """A hashable description of a keyword argument's structure: tensors by shape, dtype and device, plain
    values as they are; raises TypeError for anything else (a cache object: no graph)."""
    if torch.is_tensor(value):
        return ("T", tuple(value.shape), value.dtype, value.device, value.requires_grad)
    if isinstance(value, (tuple, list)):
        return (type(value).__name__,) + tuple(signature(v) for v in value)
    if _plain(value):
        return value
    raise TypeError(type(value).__name__)


def tensors_of(value) -> list[torch.Tensor]:
    """The tensors in a keyword argument, in `signature`'s order."""
    if torch.is_tensor(value):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in tensors_of(v)]
    return []


def with_tensors(value, tensors):
    """`value` with its tensors (in `tensors_of` order) replaced by the next ones of the iterator `tensors`."""
    if torch.is_tensor(value):
        return next(tensors)
    if isinstance(value, (tuple, list)):
        return type(value)(with_tensors(v, tensors) for v in value)
    return value


def may_graph(decoder: torch.nn.Module) -> bool:
    """Whether the decoder's layers may be replayed from graphs: on CUDA, in training mode, under offloaded
    checkpointing, with graphs allowed."""
    from .offload import offloaded_checkpoint
    layers = getattr(decoder, "layers", None)
    if _failed or not LAYER_GRAPHS or not layers:
        return False
    first = layers[0]
    weight = next(first.parameters(), None)
    offloaded = getattr(first, "_gradient_checkpointing_func", None) is offloaded_checkpoint and getattr(
        first, "gradient_checkpointing", False)
    return (weight is not None and weight.is_cuda and first.training and offloaded
            and _graphable.get(first) is not False)


class RowShape(NamedTuple):
    """The shape a packed row is padded to: its tokens, its sequences (its own, then padding ones) and the
    bound on the longest sequence given to the varlen attention."""
    tokens: int
    sequences: int
    bound: int


def _round_up(n: int, quantum: int) -> int:
    return -(-n // quantum) * quantum


def grown_row_shape(shape: RowShape | None, lengths: list[int], quantum: int = ROW_QUANTUM,
                    bound_quantum: int = BOUND_QUANTUM) -> RowShape:
    """The least shape (fewest tokens, then fewest sequences), at least `shape` (None: none yet) in each
    field, that takes a row of sequences of these lengths with at least one padding sequence, each padding
    sequence at least one token long and none longer than the bound; and whose padding sequences could take
    the padding of any row it would be given (MAX_PADDING: a third of its tokens), so that shorter rows do
    not make it grow."""
    own, real = sum(lengths), len(lengths)
    tokens = max(shape.tokens if shape else 0, _round_up(own + 1, quantum))
    sequences = max(shape.sequences if shape else 0, real + 1)
    bound = max(shape.bound if shape else 0, _round_up(max(lengths), bound_quantum))
    while True:
        pad, pieces = tokens - own, sequences - real
        room = max(pad, int(tokens * MAX_PADDING / (1 + MAX_PADDING)))  # the most padding a row of it may need
        if pad < pieces:  # a token for each padding sequence
            tokens += quantum
        elif room > pieces * bound:  # padding sequences within the bound
            sequences = real + -(-room // bound)
        else:
            return RowShape(tokens, sequences, bound)


def padded_row_shape(decoder: torch.nn.Module, lengths: list[int]) -> RowShape | None:
    """The shape to pad a packed row of sequences of these lengths to (see the module docstring): the shape
    of the longest rows so far, grown to fit this one; None (the row as it is) where the layers may not be
    graphed, for a row of one sequence, where the padding would exceed MAX_PADDING of the row beyond the
    row's own rounding, or the shape MAX_TOKENS."""
    global _row_shape
    if len(lengths) < 2 or not GROW_ROWS or not may_graph(decoder):
        return None
    shape = grown_row_shape(_row_shape, lengths)
    if shape.tokens > MAX_TOKENS or shape.tokens > max(grown_row_shape(None, lengths).tokens,
                                                       (1 + MAX_PADDING) * sum(lengths)):
        return None
    if shape != _row_shape:
        if _row_shape is not None:
            old = _row_shape
            _forget(lambda key: _grown_key(key, old))  # never met again: the rows only grow
            _release_pool()
        _row_shape = shape
    return shape


def _release_pool() -> None:
    """Where no graph is left, the graphs' pool goes back to the device (the next capture starts a new one):
    its blocks are all free, but the caching allocator keeps a private pool's memory for that pool, beside what
    the next warm-ups allocate. No-op while any graph remains (they share the pool)."""
    global _pool
    if _pool is None or any(g is not None for graphs in _per_layer.values() for g in graphs.values()):
        return
    _pool = None
    torch.cuda.empty_cache()  # frees the pool's segments, now that no graph holds it


def _grown_key(shape_key, shape: RowShape | None) -> bool:
    """Whether a shape key is that of rows padded to `shape`."""
    return (shape is not None and shape_key[0][-2] == shape.tokens
            and shape_key[4] == (shape.sequences, shape.bound))  # (hidden [1, T, H], ..., (N, bound))


def allow(model: torch.nn.Module, enabled: bool) -> None:
    """Lets the layers of `model` be graphed (the default) or not (GRPOConfig.layer_graphs)."""
    for module in model.modules():
        if enabled:
            _graphable.pop(module, None)  # decided again at the next use
        else:
            _graphable[module] = False
            _per_layer.pop(module, None)


def eligible(layer: torch.nn.Module, hidden: torch.Tensor) -> bool:
    """Whether this layer's passes may be graphed (see the module docstring)."""
    if _failed or not LAYER_GRAPHS or not hidden.is_cuda or torch.cuda.is_current_stream_capturing():
        return False
    graphable = _graphable.get(layer)
    if graphable is None:
        dropout = has_active_dropout(layer) or any(getattr(m, "attention_dropout", 0.0) for m in layer.modules())
        sharded = any(hasattr(p, "placements") for p in layer.parameters())
        graphable = _graphable[layer] = not dropout and not sharded
    return graphable and layer.training


class _Statics:
    """The static inputs and outputs that the graphs of one shape key share."""

    def __init__(self, hidden: torch.Tensor, kw_tensors: list[torch.Tensor]):
        self.hidden = torch.empty_like(hidden).requires_grad_(True)  # a leaf: the backward's input
        # the output side: the forward writes the layer output here; the backward reads the output's
        # gradient from here and, once back-propagated, writes the input's gradient over it
        self.output_side = torch.empty_like(hidden)
        self.kw = [torch.empty_like(t) for t in kw_tensors]
        self.kw_sources: list = [None] * len(kw_tensors)  # (tensor, version) copied last into each
        self.cu: torch.Tensor | None = None  # the packed sequences' cu_seqlens (varlen attention)
        self.cu_source = None

    def load_kwargs(self, kw_tensors: list[torch.Tensor]) -> None:
        for i, (static, t) in enumerate(zip(self.kw, kw_tensors)):
            last = self.kw_sources[i]
            if last is None or last[0] is not t or last[1] != t._version:
                static.copy_(t)
                self.kw_sources[i] = (t, t._version)

    def load_cu(self, cu: torch.Tensor) -> None:
        if self.cu_source is None or self.cu_source is not cu:
            self.cu.copy_(cu)
            self.cu_source = cu


class _Graph:
    def __init__(self, graph: torch.cuda.CUDAGraph, used: list[bool], grad_buffers: list[torch.Tensor]):
        self.graph = graph
        self.used = used  # used[i]: the i-th trainable weight gets a gradient
        self.grad_buffers = grad_buffers  # where the replay writes those gradients (a backward's)


def _graphs_of(layer) -> dict:
    """(pass, shape key) -> _Graph, or None for a key met once (it ran eagerly)."""
    return _per_layer.setdefault(layer, {})


def _shape_key(hidden, kw_sig, sequences):
    return (tuple(hidden.shape), hidden.dtype, hidden.device, kw_sig, sequences)


def _forget(drop) -> None:
    """Forget the statics of every shape key for which drop(key) is true, and every graph of those keys."""
    for shape_key in [k for k in _statics if drop(k)]:
        del _statics[shape_key]
    for graphs in list(_per_layer.values()):
        for key in [k for k in graphs if drop(k[1])]:
            del graphs[key]


def _get_statics(shape_key, hidden, kw_tensors, cu) -> _Statics:
    global _evictions
    statics = _statics.get(shape_key)
    if statics is None:
        while len(_statics) >= MAX_SHAPES:  # forget the oldest shape and every graph that reads its statics
            old = next(iter(_statics))
            _evictions += 1
            _forget(lambda key: key == old)
        statics = _statics[shape_key] = _Statics(hidden, kw_tensors)
        if cu is not None:
            statics.cu = torch.empty_like(cu)  # [N + 1]
    _statics.move_to_end(shape_key)
    return statics


def capture_stream() -> torch.cuda.Stream:
    """The one side stream on which every CUDA graph of this process is warmed up and captured (these layer
    graphs and the engine's decode graphs). cuBLAS keeps a workspace (32 MiB on Hopper) for each stream it
    ever ran on, for the life of the process: a new stream per capture would leave one behind each time."""
    global _capture_stream
    if _capture_stream is None:
        _capture_stream = torch.cuda.Stream()
    return _capture_stream


def _streams():
    global _pool
    if _pool is None:
        _pool = torch.cuda.graph_pool_handle()
    return capture_stream()


def _packed(function, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, int] | None:
    """(position_ids, cu_seqlens, a bound on the longest sequence) when the layer runs on the packed varlen
    attention; the bound is the row shape's for a row padded to it (padded_row_shape)."""
    from . import varlen
    position_ids = function.keywords.get("position_ids")
    if not varlen._known or not torch.is_tensor(position_ids):
        return None
    cu, longest = varlen.packed_sequences(position_ids)
    shape = _row_shape
    if shape is not None and (hidden.shape[-2], cu.numel() - 1) == (shape.tokens, shape.sequences):
        longest = max(longest, shape.bound)  # the same for every row padded to the shape
    return position_ids, cu, longest


class _Pass:
    """One pass (forward or backward) of one layer call, graphed or not."""

    def __init__(self, phase: str, function, hidden: torch.Tensor):
        self.function, self.layer = function, layer_of(function)
        self.ok = self.layer is not None and eligible(self.layer, hidden)
        if not self.ok:
            return
        try:
            kw_sig = tuple((k, signature(v)) for k, v in sorted(function.keywords.items()))
        except TypeError:
            self.ok = False
            return
        self.names = [k for k, _ in sorted(function.keywords.items())]
        self.kw_tensors = [t for k in self.names for t in tensors_of(function.keywords[k])]
        self.packed = _packed(function, hidden)
        sequences = None if self.packed is None else (self.packed[1].numel() - 1, self.packed[2])
        self.shape_key = _shape_key(hidden, kw_sig, sequences)
        self.grown = _grown_key(self.shape_key, _row_shape)  # a padded row's: it will be met again
        self.key = (phase, self.shape_key)
        self.graphs = _graphs_of(self.layer)

    def first_time(self) -> bool:
        """True the first time this key is met (it runs eagerly then) unless it is a padded row's (captured
        at once), and where no new graph may be captured for it (the shapes came and went too often: it runs
        eagerly too)."""
        if self.graphs.get(self.key) is not None:
            return False
        if self.key not in self.graphs:
            if len(self.graphs) > 8 * MAX_SHAPES:  # forget the keys met once and never again
                for key in [k for k, g in self.graphs.items() if g is None]:
                    del self.graphs[key]
            self.graphs[self.key] = None
            return not self.grown
        return _evictions >= MAX_EVICTIONS and self.shape_key not in _statics

    def static_function(self, statics: _Statics):
        """The layer's function reading the static keyword tensors (and, packed, the static cu_seqlens)."""
        from . import varlen
        tensors = iter(statics.kw)
        keywords = {k: with_tensors(self.function.keywords[k], tensors) for k in self.names}
        if self.packed is not None:
            varlen.bind_sequences(keywords["position_ids"], statics.cu, self.packed[2])
        return functools.partial(self.function.func, *self.function.args, **keywords)

    def statics(self, hidden: torch.Tensor) -> _Statics:
        statics = _get_statics(self.shape_key, hidden, self.kw_tensors, None if self.packed is None else self.packed[1])
        statics.load_kwargs(self.kw_tensors)
        if self.packed is not None:
            statics.load_cu(self.packed[1])
        return statics


def _trainable(layer) -> list[torch.nn.Parameter]:
    return [p for p in layer.parameters() if p.requires_grad]


def _warm_key(p: _Pass) -> tuple:
    """What a warm-up depends on: the pass, its shapes and the layer's parameters' shapes and dtypes (the
    kernels a capture records, their autotuning and workspaces)."""
    return (p.key, type(p.layer), tuple((tuple(q.shape), q.dtype, q.requires_grad) for q in p.layer.parameters()))


def _capture(build, warm_key=None) -> torch.cuda.CUDAGraph | None:
    """Warms `build` up once on the capture stream (unless `warm_key` was warmed up already), then captures
    it; None (graphs off) if that fails."""
    global _failed
    stream = _streams()
    stream.wait_stream(torch.cuda.current_stream())
    try:
        if warm_key is None or warm_key not in _warmed:
            with torch.cuda.stream(stream):
                build()  # warm-up: first use of this stream by cuBLAS and the attention kernels
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=_pool, stream=stream):
            build()
        if warm_key is not None:
            _warmed.add(warm_key)
    except Exception as e:  # noqa: BLE001 - any capture failure means: run eagerly from now on
        reset()
        _failed = True
        warnings.warn(f"ahazero: CUDA graphs for the decoder layers are off ({type(e).__name__}: {e}); "
                      "the layers run eagerly", stacklevel=3)
        return None
    finally:
        torch.cuda.current_stream().wait_stream(stream)
    return graph


def graphed_forward(function, hidden: torch.Tensor, args: tuple, autocast: dict):
    """The layer's forward without autograd, from a graph; None where it runs eagerly (the caller's job)."""
    p = _Pass("forward", function, hidden)
    if not p.ok or args or p.first_time():
        return None
    graph = p.graphs[p.key]
    statics = p.statics(hidden)
    statics.hidden.detach().copy_(hidden)
    if graph is None:
        static_function = p.static_function(statics)

        def build():
            with torch.no_grad(), torch.autocast(**{**autocast, "cache_enabled": False}):
                out = static_function(statics.hidden)
            if not torch.is_tensor(out):
                raise TypeError(f"the layer returned {type(out).__name__}, not a tensor")
            statics.output_side.copy_(out)

        captured = _capture(build, _warm_key(p))
        if captured is None:
            return None
        graph = p.graphs[p.key] = _Graph(captured, [], [])
    graph.graph.replay()
    return statics.output_side.clone()


def graphed_backward(function, hidden: torch.Tensor, grad_out: torch.Tensor, args: tuple, autocast: dict,
                     recompute_context):
    """The layer's recompute and back-propagation from a graph: adds the trainable weights' gradients into
    their `.grad` and returns the input's gradient; None where it runs eagerly (the caller's job)."""
    p = _Pass("backward", function, hidden)
    if not p.ok or args or grad_out is None or p.first_time():
        return None
    params = _trainable(p.layer)
    graph = p.graphs[p.key]
    statics = p.statics(hidden)
    statics.hidden.detach().copy_(hidden)
    statics.output_side.copy_(grad_out)
    if graph is None:
        static_function = p.static_function(statics)
        shapes = tuple((tuple(q.shape), q.dtype) for q in params)
        if shapes not in _param_grads:
            _param_grads[shapes] = [torch.empty_like(q) for q in params]
        grad_buffers = _param_grads[shapes]
        used: list[bool] = []

        def build():
            with torch.enable_grad(), torch.autocast(**{**autocast, "cache_enabled": False}), recompute_context():
                out = static_function(statics.hidden)
            if not torch.is_tensor(out) or not out.requires_grad:
                raise TypeError("the layer's recompute gave no tensor with a graph")
            grads = torch.autograd.grad(out, [statics.hidden] + params, statics.output_side, allow_unused=True)
            statics.output_side.copy_(grads[0])  # the incoming gradient is used up: its place is free
            used[:] = [g is not None for g in grads[1:]]
            for buffer, g in zip(grad_buffers, grads[1:]):
                if g is not None:
                    buffer.copy_(g)

        captured = _capture(build, _warm_key(p))
        if captured is None:
            return None
        graph = p.graphs[p.key] = _Graph(captured, used, grad_buffers)
        statics.output_side.copy_(grad_out)  # the capture's warm-up wrote the input's gradient over it
    graph.graph.replay()
    accumulate_grads([q for q, u in zip(params, graph.used) if u],
                     [b for b, u in zip(graph.grad_buffers, graph.used) if u])
    return statics.output_side.clone()


def accumulate_grads(params: list[torch.Tensor], grads: list[torch.Tensor]) -> None:
    """`.grad += grad` for each (a copy where `.grad` is None), as autograd's accumulation does."""
    have = [(p.grad, g) for p, g in zip(params, grads) if p.grad is not None]
    for p, g in zip(params, grads):
        if p.grad is None:
            p.grad = g.clone()
    if have:
        torch._foreach_add_([a for a, _ in have], [g for _, g in have])


def reset() -> None:
    """Forget every graph and static tensor (tests; a model replaced in the same process)."""
    global _failed, _evictions, _row_shape
    _failed, _evictions, _row_shape = False, 0, None
    _per_layer.clear()
    _warmed.clear()
    _graphable.clear()
    _statics.clear()
    _param_grads.clear()
