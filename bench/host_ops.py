"""What the host launches in one GRPO training step (issue 5), counted on the CPU.

On the GPU the long-completion step is bound by the host: at 8 x 4,096 tokens it launches over 100,000
operations at ~40 us each (bench/RESULTS.md, 2026-11-27 third session). This counts them where no GPU is
needed: a model of Qwen2.5-1.5B's depth (28 layers) at tiny widths in bf16, LoRA on all seven projections,
offloaded checkpointing, micro-batch 1, one `GRPOTrainer.optimizer_step` under torch.profiler. With
`--tokens 512 --tile-tokens 256` each row has as many MLP tiles (3) as a 4,170-token row with the default
tiles of 2,048. Prints aten ops, "kernel ops" (aten ops other than views, dtype-cast wrappers and
allocations: what launches work on a GPU) and autograd nodes; the CPU time it prints is not the GPU's.

  python bench/host_ops.py --tokens 512 --tile-tokens 256
  python bench/host_ops.py --tokens 512 --tile-tokens 256 --without tiled-mlp
  python bench/host_ops.py --tokens 512 --tile-tokens 256 --without fused-lora,lean-norm,tiled-mlp
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
    p.add_argument("--tokens", type=int, default=512, help="completion tokens per row (after a 64-token prompt)")
    p.add_argument("--rows", type=int, default=2)
    p.add_argument("--tile-tokens", type=int, default=0, help="models/tiled_mlp.py TILE_TOKENS (0: its default)")
    p.add_argument("--without", default="", help="comma-separated, of fused-lora, lean-norm, tiled-mlp")
    args = p.parse_args(argv)
    sys.path[:0] = [str(ROOT / "src"), str(ROOT / "bench"), str(ROOT / "tests")]
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
    config = tiny.tiny_config("qwen2", num_hidden_layers=28, hidden_size=32, intermediate_size=64,
                              num_attention_heads=2, num_key_value_heads=1, vocab_size=1000, pad_token_id=0,
                              bos_token_id=1, eos_token_id=2)
    torch.manual_seed(0)
    model = attach_lora(AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16), r=8, lora_alpha=8,
                        target_modules=memory.TARGETS, random_state=0)
    enable_gradient_checkpointing(model, "offload")
    G, C = args.rows, args.tokens
    grpo = GRPOConfig(output_dir=str(ROOT / "outputs" / "host_ops"), num_generations=G, per_device_train_batch_size=G,
                      micro_batch_size=1, max_completion_length=C, max_prompt_length=64, beta=0.0, loss_type="dapo",
                      report_to=[])
    trainer = GRPOTrainer(model=model, processing_class=tiny.tokenizer(), args=grpo, generator=object(),
                          reward_funcs=lambda completions, **kw: [0.0] * len(completions),
                          train_dataset=[{"prompt": "x"}])
    trainer.optimizer = make_optimizer(trainer.trainable_parameters, grpo)
    trainer.scheduler = get_scheduler("constant", trainer.optimizer)
    g = torch.Generator().manual_seed(0)
    completions = [torch.randint(3, 1000, (C,), generator=g).tolist() for _ in range(G)]
    batch = build_batch([list(range(10, 74))] * G, completions, [[0.0] * C] * G, [True] * G,
                        torch.tensor([1.0, -1.0] * (G // 2) + [0.0] * (G % 2)), 0, mask_truncated_completions=False)
    trainer.optimizer_step([batch])  # warm-up
    t0 = time.perf_counter()
    trainer.optimizer_step([batch])
    seconds = time.perf_counter() - t0
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        trainer.optimizer_step([batch])
    counts = count_ops(prof.key_averages())
    print(f"| {args.without or '-'} | {tiled_mlp.TILE_TOKENS} | " + " | ".join(f"{v:,}" for v in counts.values())
          + f" | {seconds:.2f} |")
    print("(columns: without | TILE_TOKENS | " + " | ".join(counts) + " | CPU step s)")


if __name__ == "__main__":
    main()
