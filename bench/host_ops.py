"""What the host launches in one GRPO training step (issue 5), counted on the CPU, and the memory it adds.

On the GPU the long-completion step is bound by the host: at 8 x 4,096 tokens it launches over 100,000
operations at ~40 us each (bench/RESULTS.md, 2026-11-27 third session). This counts them where no GPU is
needed: a model of Qwen2.5-1.5B's depth (28 layers) at tiny widths in bf16, LoRA on all seven projections,
offloaded checkpointing, micro-batch 1, one `GRPOTrainer.optimizer_step` under torch.profiler. With
`--tokens 512 --tile-tokens 256` each row has as many MLP tiles (3) as a 4,170-token row with the default
tiles of 2,048. Prints aten ops, "kernel ops" (aten ops other than views, dtype-cast wrappers and
allocations: what launches work on a GPU) and autograd nodes, and the peak RSS one step adds (Linux: VmHWM,
reset through /proc/self/clear_refs before the step, large allocations mmap'd so that RSS follows the live
tensors); the CPU time it prints is not the GPU's.

  python bench/host_ops.py --tokens 512 --tile-tokens 256
  python bench/host_ops.py --tokens 512 --tile-tokens 256 --without tiled-mlp
  python bench/host_ops.py --tokens 512 --tile-tokens 256 --without fused-lora,lean-norm,tiled-mlp
Memory at Qwen2.5-1.5B's widths (2 of its layers, LoRA r=32), one row of 74 + 4,096 tokens a micro-batch:
  python bench/host_ops.py --widths qwen2.5-1.5b --layers 2 --rank 32 --prompt-tokens 74 --tokens 4096 [--tile-tokens N]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_KERNELS = {  # aten ops that launch no work of their own on a GPU (views, wrappers, allocations, scalars)
    "view", "as_strided", "t", "transpose", "reshape", "resolve_conj", "resolve_neg", "slice", "select", "unsqueeze",
    "expand", "detach", "alias", "_reshape_alias", "permute", "squeeze", "split", "narrow", "contiguous", "to",
    "_to_copy", "linear", "matmul", "empty", "empty_strided", "empty_like", "_unsafe_view", "item",
    "_local_scalar_dense", "lift_fresh", "view_as", "chunk", "unbind", "flatten", "dropout", "zeros_like", "zeros",
    "new_empty", "new_zeros", "clone", "repeat", "result_type"}


def count_ops(events) -> dict:
    aten = {e.key[len("aten::"):]: e.count for e in events if e.key.startswith("aten::")}
    return {"aten ops": sum(aten.values()),
            "kernel ops": sum(n for name, n in aten.items() if name not in NOT_KERNELS),
            "autograd nodes": sum(e.count for e in events if "Backward" in e.key and not e.key.startswith("aten::"))}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--tokens", type=int, default=512, help="completion tokens per row")
    p.add_argument("--prompt-tokens", type=int, default=64)
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--tile-tokens", type=int, default=0, help="models/tiled_mlp.py TILE_TOKENS (0: its default)")
    p.add_argument("--without", default="", help="comma-separated, of fused-lora, lean-norm, tiled-mlp")
    p.add_argument("--widths", default="tiny", choices=["tiny", "qwen2.5-1.5b"],
                   help="hidden 32 / intermediate 64, or Qwen2.5-1.5B's 1536 / 8960 (12 heads, 2 KV heads)")
    p.add_argument("--layers", type=int, default=28)
    p.add_argument("--rank", type=int, default=8, help="LoRA r (= alpha)")
    p.add_argument("--table", type=int, default=0, help="also print the N most frequent aten ops")
    args = p.parse_args(argv)
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench"), str(ROOT / "tests")]
    _mmap_large_allocations()
    import torch
    from torch.profiler import ProfilerActivity, profile
    from transformers import AutoModelForCausalLM, get_scheduler

    import memory
    import tiny
    from ahazero import GRPOConfig, GRPOTrainer
    from ahazero.grpo.batch import build_batch
    from ahazero.grpo.trainer import make_optimizer
    from ahazero.models import tiled_mlp
    from ahazero.models.loader import attach_lora, enable_gradient_checkpointing

    torch.set_num_threads(1)
    memory.switch_off(args.without)
    if args.tile_tokens:
        tiled_mlp.TILE_TOKENS = args.tile_tokens
    widths = dict(hidden_size=32, intermediate_size=64, num_attention_heads=2, num_key_value_heads=1) \
        if args.widths == "tiny" else dict(hidden_size=1536, intermediate_size=8960, num_attention_heads=12,
                                           num_key_value_heads=2)
    config = tiny.tiny_config("qwen2", num_hidden_layers=args.layers, vocab_size=1000, pad_token_id=0,
                              bos_token_id=1, eos_token_id=2, **widths)
    torch.manual_seed(0)
    model = attach_lora(AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16), r=args.rank,
                        lora_alpha=args.rank, target_modules=memory.TARGETS, random_state=0)
    enable_gradient_checkpointing(model, "offload")
    G, C = args.rows, args.tokens
    grpo = GRPOConfig(output_dir=str(ROOT / "outputs" / "host_ops"), num_generations=G, per_device_train_batch_size=G,
                      micro_batch_size=1, max_completion_length=C, max_prompt_length=args.prompt_tokens, beta=0.0,
                      loss_type="dapo", report_to=[])
    trainer = GRPOTrainer(model=model, processing_class=tiny.tokenizer(), args=grpo, generator=object(),
                          reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          train_dataset=[{"prompt": "x"}])
    trainer.optimizer = make_optimizer(trainer.trainable_parameters, grpo)
    trainer.scheduler = get_scheduler("constant", trainer.optimizer)
    g = torch.Generator().manual_seed(0)
    completions = [torch.randint(3, 1000, (C,), generator=g).tolist() for _ in range(G)]
    batch = build_batch([list(range(10, 10 + args.prompt_tokens))] * G, completions, [[0.0] * C] * G, [True] * G,
                        torch.tensor([1.0, -1.0] * (G // 2) + [0.0] * (G % 2)), 0, mask_truncated_completions=False)
    trainer.optimizer_step([batch])  # warm-up (AdamW's state is made here)
    rss_start = _reset_peak_rss()
    t0 = time.perf_counter()
    trainer.optimizer_step([batch])
    seconds = time.perf_counter() - t0
    rss_added = _status_mib("VmHWM") - rss_start if rss_start is not None else float("nan")
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.optimizer_step([batch])
    counts = count_ops(prof.key_averages())
    if args.table:
        print(prof.key_averages().table(sort_by="count", row_limit=args.table))
    print(f"| {args.without or '-'} | {tiled_mlp.TILE_TOKENS} | " + " | ".join(f"{v:,}" for v in counts.values())
          + f" | {rss_added:.0f} | {seconds:.2f} |")
    print("(columns: without | TILE_TOKENS | " + " | ".join(counts) + " | peak RSS added MiB | CPU step s)")


def _status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            return next(int(line.split()[1]) / 1024 for line in f if line.startswith(key))
    except (OSError, StopIteration):
        return None


def _mmap_large_allocations() -> None:
    """glibc: serve every allocation of 128 KiB or more by mmap and give it back on free (M_MMAP_THRESHOLD,
    which also stops glibc raising that threshold as it goes), so that RSS follows the live tensors instead
    of what the allocator keeps for reuse: without it, one run's figure changed by half between runs."""
    import ctypes
    try:
        ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def _reset_peak_rss() -> float | None:
    """Resets VmHWM to the current RSS and returns that RSS (MiB), or None where /proc does not allow it."""
    import gc
    gc.collect()
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _status_mib("VmRSS")


if __name__ == "__main__":
    main()
