"""Choosing the rollout backend: the engine for the architectures it has a forward for, else transformers."""
from __future__ import annotations

from .hf_generate import HFGenerator
from .types import Generator


def make_generator(model, tokenizer, *, max_seq_length: int | None = None, gpu_memory_utilization: float = 0.6,
                   max_lora_rank: int | None = None, use_engine: bool = True) -> Generator:
    """The engine when `use_engine` (it falls back by itself for unsupported architectures), else HF generate."""
    if use_engine:
        from .engine import create_generator
        return create_generator(model, tokenizer, max_seq_length=max_seq_length or 2048,
                                gpu_memory_utilization=gpu_memory_utilization, max_lora_rank=max_lora_rank)
    return HFGenerator(model, tokenizer)
