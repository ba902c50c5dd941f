"""The KV cache: one preallocated tensor of fixed-width slots, one slot per running sequence.

A slot holds `max_seq_length` positions of every layer's keys and values. Running sequences are kept
compacted in slots 0..B-1 (the scheduler moves a survivor down when a sequence ends), so the decode
step reads `cache[:B]`, a plain view: no gather, no block table.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import CPU_KV_BYTES, EngineConfig


@dataclass(frozen=True, slots=True)
class KVShape:
    """What one position of one slot holds: per layer, keys and values of every KV head."""
    num_layers: int
    num_kv_heads: int
    head_dim: int

    def slot_bytes(self, max_seq_length: int, dtype: torch.dtype) -> int:
        elem = torch.empty((), dtype=dtype).element_size()
        return self.num_layers * 2 * self.num_kv_heads * max_seq_length * self.head_dim * elem


class KVCache:
    """`data[layer, 0 or 1]` is that layer's keys or values: [slots, kv_heads, max_seq_length, head_dim]."""

    def __init__(self, shape: KVShape, num_slots: int, max_seq_length: int, device, dtype):
        self.shape, self.num_slots, self.max_seq_length = shape, num_slots, max_seq_length
        # zeros, not empty: masked positions still meet SDPA's matmul, and 0 * NaN is NaN
        self.data = torch.zeros(shape.num_layers, 2, num_slots, shape.num_kv_heads, max_seq_length,
                                shape.head_dim, device=device, dtype=dtype)  # [L, 2, S, Hkv, T, D]

    def layer(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values of layer i, each [slots, kv_heads, max_seq_length, head_dim]."""
        return self.data[i, 0], self.data[i, 1]

    def move(self, moves: list[tuple[int, int]]) -> None:
        """Copy slot src to slot dst for each (src, dst), all layers at once (the source is read first)."""
        if not moves:
            return
        src = to_device(torch.tensor([s for s, _ in moves]), self.data.device)  # [M]
        dst = to_device(torch.tensor([d for _, d in moves]), self.data.device)  # [M]
        self.data[:, :, dst] = self.data[:, :, src]


def num_slots_for(config: EngineConfig, shape: KVShape, workspace_bytes: int) -> int:
    """How many slots fit: on CUDA what `gpu_memory_utilization` leaves after what this process holds and
    a workspace for activations; on the CPU a fixed modest budget. Capped at `max_batch_size`."""
    per_slot = shape.slot_bytes(config.max_seq_length, config.dtype)
    if config.device.type == "cuda":
        free, total = torch.cuda.mem_get_info(config.device)
        budget = int(config.gpu_memory_utilization * total) - (total - free) - workspace_bytes
    else:
        budget = CPU_KV_BYTES
    slots = min(config.max_batch_size, budget // per_slot)
    if slots < 1:
        raise ValueError(f"no room for one KV slot of {per_slot / 2**20:.0f} MiB (max_seq_length="
                         f"{config.max_seq_length}); raise gpu_memory_utilization or lower max_seq_length")
    return int(slots)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """A small CPU tensor to `device` without blocking: through pinned memory on CUDA (a copy from
    pageable memory would wait for every step queued on the stream, undoing the engine's overlap)."""
    if torch.device(device).type != "cuda":
        return t.to(device)
    return t.contiguous().pin_memory().to(device, non_blocking=True)  # contiguous: pinning copies strides
