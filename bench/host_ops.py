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
The seed notebook's update (6 rows of 100 + 200 tokens in one packed chunk, LoRA r=32, 16-bit or NF4 bases), with the
kernel ops by the Python lines they come from (a TorchDispatchMode; the backward's included):
  python bench/host_ops.py --rows 6 --tokens 200 --prompt-tokens 100 --micro-batch 0 --rank 32 [--load-in-4bit] --stacks 2 --table 40
The optimizer is the fused AdamW, as make_optimizer picks on a GPU (before 2026-11-27's ninth session, the CPU's
per-tensor AdamW: about 3,900 more ops a step at 28 layers, r=32). fused_math's functions, compiled into one or two
kernels each on a GPU, run eagerly here (about ten ops a RMSNorm backward): the CPU counts overstate them.
Memory at Qwen2.5-1.5B's widths (2 of its layers, LoRA r=32), one row of 74 + 4,096 tokens a micro-batch:
  python bench/host_ops.py --widths qwen2.5-1.5b --layers 2 --rank 32 --prompt-tokens 74 --tokens 4096 [--tile-tokens N]
"""
from __future__ import annotations

import argparse
import sys
from collections import Counter
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
NOT_KERNELS = {  # aten ops that launch no work of their own on a GPU (views, wrappers, allocations, scalars)
    "view", "as_strided", "t", "transpose", "reshape", "resolve_conj", "resolve_neg", "slice", "select", "unsqueeze",
    "expand", "detach", "alias", "_reshape_alias", "permute", "squeeze", "split", "narrow", "contiguous", "to",
    "_to_copy", "linear", "matmul", "empty", "empty_strided", "empty_like", "_unsafe_view", "item",
    "_local_scalar_dense", "lift_fresh", "view_as", "chunk", "unbind", "flatten", "dropout", "zeros_like", "zeros",
    "new_empty", "new_zeros", "clone", "repeat", "result_type"}


# seen whole by a TorchDispatchMode (the copy_ or fill_ inside them, which the profiler counts, is not)
DISPATCHED_KERNELS = {"_to_copy", "clone", "zeros", "zeros_like", "repeat"}


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
    p.add_argument("--stacks", type=int, default=0,
                   help="also print the most frequent kernel ops by their N innermost Python frames")
    p.add_argument("--micro-batch", type=int, default=1, help="rows per forward/backward (0: all in one chunk)")
    p.add_argument("--load-in-4bit", action="store_true",
                   help="NF4 base weights (models/linear4bit.py); each dequantisation counted as one op, as the "
                        "GPU's one-launch kernel (on the CPU it runs the torch path)")
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
    model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    if args.load_in_4bit:
        from ahazero.models import linear4bit
        linear4bit.quantize_model(model, dynamic=False)
        _dequantize_as_one_op(linear4bit.Linear4bit)
    model = attach_lora(model, r=args.rank, lora_alpha=args.rank, target_modules=memory.TARGETS, random_state=0)
    enable_gradient_checkpointing(model, "offload")
    G, C = args.rows, args.tokens
    grpo = GRPOConfig(output_dir=str(ROOT / "outputs" / "host_ops"), num_generations=G, per_device_train_batch_size=G,
                      micro_batch_size=args.micro_batch or None, max_completion_length=C,
                      max_prompt_length=args.prompt_tokens, beta=0.0,
                      loss_type="dapo", report_to=[], optim="adamw_torch_fused")  # as on a GPU (make_optimizer)
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
    if args.stacks:
        sites = op_sites(lambda: trainer.optimizer_step([batch]), args.stacks)
        for (name, where), n in sites.most_common(args.table or 30):
            print(f"{n:7,}  {name:22} {where}")
    if args.table and not args.stacks:
        print(prof.key_averages().table(sort_by="count", row_limit=args.table))
    label = (args.without or "-") + (" nf4" if args.load_in_4bit else "")
    print(f"| {label} | {tiled_mlp.TILE_TOKENS} | " + " | ".join(f"{v:,}" for v in counts.values())
          + f" | {rss_added:.0f} | {seconds:.2f} |")
    print("(columns: without | TILE_TOKENS | " + " | ".join(counts) + " | peak RSS added MiB | CPU step s)")


def op_sites(step, frames: int) -> Counter:
    """Runs `step` once and counts its kernel ops (count_ops' sense) by op name and their `frames` innermost
    Python frames outside torch's own files (a TorchDispatchMode sees every op, the backward's included)."""
    import traceback
    from torch.utils._python_dispatch import TorchDispatchMode
    sites = Counter()

    class Sites(TorchDispatchMode):
        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            name = func.overloadpacket.__name__
            if name not in NOT_KERNELS or name in DISPATCHED_KERNELS:
                own = [f for f in reversed(traceback.extract_stack())
                       if "/torch/" not in f.filename and f.filename != __file__][:frames]
                sites[(name, " < ".join(f"{Path(f.filename).name}:{f.lineno} {f.name}" for f in own))] += 1
            return func(*args, **(kwargs or {}))

    with Sites():
        step()
    return sites


def _dequantize_as_one_op(linear4bit_cls) -> None:
    """Linear4bit.dequantized_weight as one aten op (a copy of the weight dequantised once, per module), as on a
    GPU where one Triton launch writes it: the torch path the CPU runs launches about eight."""
    import torch
    original, cache = linear4bit_cls.dequantized_weight, {}

    def one_op(self, dtype=None):
        key = (id(self), dtype)
        if key not in cache:
            with torch.profiler.record_function("dequantize (once, uncounted)"):
                cache[key] = original(self, dtype)
        return torch.empty_like(cache[key]).copy_(cache[key])  # one counted op (copy_), for the kernel's launch
    linear4bit_cls.dequantized_weight = one_op


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
