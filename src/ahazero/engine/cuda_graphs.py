"""The decode step replayed from CUDA graphs, one per (adapter, batch bucket, KV-length bucket).

gpt-fast's and nano-vllm's recipe: static input buffers, a batch padded up to the smallest bucket that
holds it (padding rows are free slots, position 0), graphs captured on first use into one shared memory
pool. A graph holds the addresses of the parameters it read, so it is captured again when the engine
binds a different set of tensors (a new adapter object, re-allocated weights); in-place updates (an
optimizer step) need nothing. Without CUDA (`capture=False`) the same padded path runs eagerly, which
is how the CPU tests check it.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ..models.layer_graphs import capture_stream
from .attention import DecodeMetadata


@dataclass(eq=False)
class _Graph:
    weights: object  # what the graph was captured with (bound weights are cached, so identity suffices)
    replay: Callable[[], None]
    output: list  # [logits [bucket, V]] once run


class DecodeGraphs:

    def __init__(self, step: Callable, batch_sizes: list[int], max_len: int, device, capture: bool,
                 eager_step: Callable | None = None):
        self.step, self.eager_step = step, eager_step or step
        self.batch_sizes, self.capture = sorted(batch_sizes), capture
        self.input_ids = torch.zeros(self.batch_sizes[-1], dtype=torch.long, device=device)  # [Bmax]
        self.positions = torch.zeros(self.batch_sizes[-1], dtype=torch.long, device=device)  # [Bmax]
        self.span = torch.arange(max_len, device=device)  # [T]
        self.graphs: dict[tuple, _Graph] = {}
        self.pool = None

    def run(self, weights, key, input_ids: torch.Tensor, positions: torch.Tensor, kv_len: int) -> torch.Tensor:
        """input_ids, positions: [B] on the device. Returns logits [B, V] (valid until the next run)."""
        B = input_ids.shape[0]
        bucket = next(b for b in self.batch_sizes if b >= B)
        self.input_ids[:B].copy_(input_ids)
        self.positions[:B].copy_(positions)
        self.positions[B:bucket].zero_()  # padding rows: free slots, position 0
        graph = self.graphs.get((key, bucket, kv_len))
        if graph is None or graph.weights is not weights:
            graph = self.graphs[(key, bucket, kv_len)] = self._make(weights, bucket, kv_len)
        graph.replay()
        return graph.output[0][:B]

    def clear(self) -> None:
        self.graphs.clear()

    def _make(self, weights, bucket: int, kv_len: int) -> _Graph:
        ids = self.input_ids[:bucket]  # [bucket]
        meta = DecodeMetadata(self.positions[:bucket], self.span[:kv_len])
        output: list = []
        if not self.capture:
            def replay():  # the same padded static buffers, run eagerly
                output[:] = [self.step(weights, ids, meta)]
            return _Graph(weights, replay, output)
        self._warm_up(weights, ids, meta)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=capture_stream()):  # the warm-up's stream
            output.append(self.step(weights, ids, meta))  # [bucket, V]
        self.pool = graph.pool()
        return _Graph(weights, graph.replay, output)

    def _warm_up(self, weights, ids, meta) -> None:
        """Run once on a side stream before capture (compiles, picks kernels); falls back to eager
        if torch.compile fails. The run writes the same KV the real step will write, so it is harmless."""
        stream = capture_stream()  # one for every warm-up and capture: cuBLAS keeps a workspace per stream
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            try:
                self.step(weights, ids, meta)
            except Exception as err:  # noqa: BLE001 - any compile failure: keep going without it
                if self.step is self.eager_step:
                    raise
                warnings.warn(f"torch.compile of the decode step failed ({type(err).__name__}: {err}); "
                              "decoding with the eager step in CUDA graphs")
                self.step = self.eager_step
                self.step(weights, ids, meta)
        torch.cuda.current_stream().wait_stream(stream)
