"""The engine's one config: sizes of the KV cache, batches and CUDA graphs, validated where built."""
from __future__ import annotations

import importlib.util
from dataclasses import dataclass, field

import torch

CPU_KV_BYTES = 1 << 30  # on the CPU the KV cache gets a modest fixed budget (1 GiB)
DECODE_AHEAD = 2  # EngineConfig.decode_ahead's default


@dataclass(slots=True)
class EngineConfig:
    """How big the engine's buffers are and which fast paths it uses.

    `max_seq_length` bounds prompt + completion per sequence (the width of one KV slot).
    `gpu_memory_utilization` is vLLM's knob: the fraction of the GPU's memory that this process (weights,
    training state and the KV cache together) may hold once the cache is allocated.
    `max_batch_size` caps the number of KV slots (sequences decoded at once).
    `max_prefill_tokens` caps the padded tokens (prompts x longest prompt) of one prefill forward.
    `cuda_graphs` replays the decode step from CUDA graphs over batch-size and KV-length buckets.
    `compile` runs the decoder layer through torch.compile (fuses norms, RoPE and adds) before capture. Off by
    default: on an H100 (2026-11-27, W1) it reached 14,853 tokens/s after an 18 s first call, below the fused
    Triton kernels' 15,703 with no compile time (the whole step, compiled, took over 190 s to its first call).
    `compile_backend` is torch.compile's backend ("eager" in the CPU tests: tracing only).
    `attention`: "sdpa" (PyTorch's kernels over a length bucket, masked) or "triton" (our split-KV kernel,
    engine/attention_kernels.py, which reads each sequence's own length; needs triton).
    `lora_kernels` applies LoRA with engine/lora_kernels.py's grouped Triton kernels (needs triton).
    `fused_kernels` runs the decode step's RMSNorms, RoPE + KV-cache write and SiLU * up through
    engine/fused_kernels.py (needs the Triton attention).
    `gemv_kernels` runs each decode group of projections (q/k/v, o, gate/up, down) as one launch of
    engine/gemv_kernels.py, the LoRA shrink and expand in it, instead of cuBLAS per projection plus the LoRA
    kernels (needs fused_kernels; batches above gemv_kernels.MAX_ROWS rows keep cuBLAS, except a group of few
    weights, as q/k/v and o, up to gemv_kernels.SMALL_GROUP_MAX_ROWS).
    `sample_kernel` samples unfiltered params (temperature only, or greedy) in one Triton launch
    (engine/sample_kernels.py) instead of about ten torch ops over [B, V] (needs triton).
    Both check themselves once per device against PyTorch before they serve, and turn themselves off with
    a warning where they fail (gemv_kernels.checked, sample_kernels.checked).
    `lora_kernels`, `attention`, `fused_kernels`, `gemv_kernels` and `sample_kernel` default to the Triton
    kernels on CUDA where triton is installed, else to sdpa, torch LoRA and the torch ops (H100,
    bench/RESULTS.md: the LoRA and attention kernels 14-21% more tokens/s than sdpa + torch LoRA on W1 and
    W2; the fused kernels 39% more on W2 and 29% more in 4-bit at batch 32; H200: the gemv kernels 11% more
    on W2).
    `kv_len_bucket`: decode attends over the first multiple of this many cache positions that covers
    the longest running sequence (one graph per bucket), not over the whole slot.
    `graph_batch_sizes`: the batch-size buckets; a batch runs in the smallest bucket that holds it.
    `decode_ahead`: decode steps queued on the device before the oldest one's tokens are read back (the
    engine's step; 1 is vLLM's async scheduling). Each extra step costs a discarded token per stopped sequence.
    `release_kv` frees the KV cache when a `generate` call returns (on CUDA by default), so that what runs
    between calls (a GRPO update) has its memory; the next call allocates it again. The decode graphs hold
    the cache's address: they are kept when the new cache lands at the old address (the caching allocator
    gives the freed block back when nothing kept part of it) and captured again when it does not; after
    `MAX_KV_MOVES` such moves the cache is kept for good.
    """
    max_seq_length: int
    device: torch.device
    dtype: torch.dtype
    gpu_memory_utilization: float = 0.6
    max_batch_size: int | None = None
    max_lora_rank: int | None = None
    max_prefill_tokens: int | None = None
    cuda_graphs: bool | None = None
    compile: bool | None = None
    compile_backend: str = "inductor"
    lora_kernels: bool | None = None
    attention: str | None = None
    fused_kernels: bool | None = None
    gemv_kernels: bool | None = None
    sample_kernel: bool | None = None
    kv_len_bucket: int = 128
    release_kv: bool | None = None
    decode_ahead: int | None = None
    graph_batch_sizes: tuple[int, ...] = field(default=(1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192,
                                                        224, 256, 320, 384, 448, 512))

    def __post_init__(self):
        on_cuda = self.device.type == "cuda"
        if self.max_seq_length < 2:
            raise ValueError(f"max_seq_length must be >= 2, got {self.max_seq_length}")
        if not 0 < self.gpu_memory_utilization <= 1:
            raise ValueError(f"gpu_memory_utilization must be in (0, 1], got {self.gpu_memory_utilization}")
        if self.max_batch_size is None:
            self.max_batch_size = 256 if on_cuda else 64
        if self.max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {self.max_batch_size}")
        if self.max_prefill_tokens is None:
            self.max_prefill_tokens = 16384 if on_cuda else 4096
        self.max_prefill_tokens = max(self.max_prefill_tokens, self.max_seq_length)
        if self.cuda_graphs is None:
            self.cuda_graphs = on_cuda
        if self.release_kv is None:
            self.release_kv = on_cuda
        if self.compile is None:
            self.compile = False  # slower than the fused kernels on an H100, and 15-18 s to compile
        triton_kernels = on_cuda and importlib.util.find_spec("triton") is not None
        if self.lora_kernels is None:
            self.lora_kernels = triton_kernels
        if self.attention is None:
            self.attention = "triton" if triton_kernels else "sdpa"
        if self.attention not in ("sdpa", "triton"):
            raise ValueError(f"attention must be 'sdpa' or 'triton', got {self.attention!r}")
        if self.fused_kernels is None:
            self.fused_kernels = triton_kernels and self.attention == "triton"
        if self.fused_kernels and self.attention != "triton":
            raise ValueError("fused_kernels needs attention='triton' (its attention reads the cache the fused "
                             "RoPE kernel writes)")
        if self.sample_kernel is None:
            self.sample_kernel = triton_kernels
        if self.gemv_kernels is None:
            self.gemv_kernels = self.fused_kernels
        if self.gemv_kernels and not self.fused_kernels:
            raise ValueError("gemv_kernels needs fused_kernels (it runs inside the fused decode step)")
        if self.decode_ahead is None:
            self.decode_ahead = DECODE_AHEAD
        if self.decode_ahead < 1:
            raise ValueError(f"decode_ahead must be >= 1, got {self.decode_ahead}")
        if self.attention == "triton":
            self.kv_len_bucket = self.max_seq_length  # the kernel reads lengths itself: one bucket
        if self.kv_len_bucket < 1:
            raise ValueError(f"kv_len_bucket must be >= 1, got {self.kv_len_bucket}")
