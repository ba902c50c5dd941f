"""Whole GRPO steps per second on 1 GPU vs N GPUs of one host (issue 8): torchrun, NCCL, NVLink multicast off.

The workload is W1 of the engine benchmark (bench/rollout.py), as one GRPO step: 16 GSM8K prompts x 8
completions x 512 new tokens (EOS ignored, so every completion has the full length), random bf16 weights of
a real shape (tests/assets/configs, built as bench/rollout.py builds them), the real Qwen2.5 tokenizer.
Strong scaling: the global batch stays W1 whatever N, so each of N ranks generates and trains on 16/N
prompts (per_device_train_batch_size = 128/N completions). A step is what `GRPOTrainer.train` does:
rollout with the engine (CUDA graphs), rewards, advantages, forward/backward in chunks of --micro-batch
rows, gradient exchange, clip, AdamW step. Modes:
  lora  LoRA r=--lora-rank on every linear layer (as W1), adapter gradients all-reduced (DDP)
  full  full fine-tuning, sharded with FSDP2 on N > 1 (grpo/fsdp.py: the rollout all-gathers the weights)
The reward is the fraction of even token ids (random weights write random tokens; the rewards still
differ within a group, so every step has a real loss). GRPOConfig defaults otherwise (dapo, beta 0).

For each N in --gpus the script starts `torchrun --standalone --nproc_per_node N` on itself (N = 1 too, so
every run pays the same start-up), times --steps steps after --warmup unmeasured ones (CUDA-graph capture,
allocator warm-up) from rank 0's step ends, and reads each rank's peak allocated memory (the max over
ranks is reported). It prints a markdown table (GPUs, steps/s, speed-up over the first entry of --gpus,
peak memory) and appends one JSON line per N to --out.

Run on a machine with 2 GPUs, from the repository root (issue 8's target: speed-up >= 1.8 at 2 GPUs):
  python bench/scaling.py --gpus 1,2 --model qwen2.5-1.5b --out $OUT/scaling.jsonl
  python bench/scaling.py --gpus 1,2 --model qwen2.5-1.5b --mode full --out $OUT/scaling.jsonl
  python bench/scaling.py --gpus 1,2 --model qwen2.5-1.5b --mode full --no-cuda-graphs --out $OUT/scaling.jsonl
(the tokenizer, GSM8K rows and model configs are tracked files under tests/assets: nothing to carry.)
`--device cpu --tiny` runs a shrunken model and workload on the CPU with gloo (2 processes by default):
it checks the script, not the speed.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(BENCH))

TINY_WORKLOAD = dict(prompts=4, n=4, new_tokens=8)


# --- the launcher ---------------------------------------------------------------------------------

def launch(args, gpus: int, workdir: Path) -> dict:
    """One torchrun of `gpus` ranks on this script; returns rank 0's result (or the error)."""
    result = workdir / f"result-{gpus}.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={gpus}",
           str(Path(__file__).resolve()), "--worker", "--result", str(result), "--workdir", str(workdir / f"run-{gpus}"),
           *worker_argv(args)]
    env = {**os.environ, "NCCL_NVLS_ENABLE": "0", "PYTHONUNBUFFERED": "1"}
    if args.device == "cpu":
        env["OMP_NUM_THREADS"] = "1"  # one thread per rank: ranks share the cores
    start = time.perf_counter()
    try:
        proc = subprocess.run(cmd, env=env, timeout=args.timeout)
        code = proc.returncode
    except subprocess.TimeoutExpired:
        code = "timeout"
    if code == 0 and result.is_file():
        return json.loads(result.read_text())
    return dict(gpus=gpus, error=f"torchrun exited with {code} after {time.perf_counter() - start:.0f} s")


def worker_argv(args) -> list[str]:
    argv = ["--model", args.model, "--workload", args.workload, "--mode", args.mode, "--lora-rank",
            str(args.lora_rank), "--steps", str(args.steps), "--warmup", str(args.warmup), "--micro-batch",
            str(args.micro_batch), "--device", args.device, "--gpu-memory-utilization",
            str(args.gpu_memory_utilization)]
    return argv + (["--tiny"] if args.tiny else []) + (["--no-cuda-graphs"] if args.no_cuda_graphs else [])


def add_speedups(rows: list[dict]) -> None:
    base = next((r for r in rows if "steps_per_s" in r), None)
    for r in rows:
        if base is not None and "steps_per_s" in r:
            r["speedup"] = r["steps_per_s"] / base["steps_per_s"]
            r["speedup_over_gpus"] = base["gpus"]


def print_table(rows: list[dict]) -> None:
    print("\n| GPUs | steps/s | s/step | rollout s | update s | speed-up | peak GiB (max over ranks) |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "steps_per_s" not in r:
            print(f"| {r['gpus']} | {r.get('error', '')[:80]} | | | | | |")
            continue
        split = " | ".join("" if r.get(k) is None else f"{r[k]:.2f}" for k in ("rollout_s", "update_s"))
        print(f"| {r['gpus']} | {r['steps_per_s']:.3f} | {1 / r['steps_per_s']:.2f} | {split} | {r['speedup']:.2f}x | "
              f"{r['peak_gib']:.1f} |")


def main_launcher(args) -> None:
    workdir = Path(tempfile.mkdtemp(prefix="ahazero-scaling-"))
    rows = []
    try:
        for gpus in [int(g) for g in args.gpus.split(",")]:
            row = launch(args, gpus, workdir)
            rows.append(row)
            print(json.dumps(row), flush=True)
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    add_speedups(rows)
    with open(args.out, "a") as f:
        for row in rows:
            f.write(json.dumps({**row, "mode": args.mode, "model": args.model, "workload": args.workload,
                                "tiny": args.tiny}) + "\n")
    print_table(rows)


# --- one rank -------------------------------------------------------------------------------------

def even_token_reward(completion_ids, **kwargs):
    """The fraction of even token ids: cheap, and different within a group."""
    return [sum(t % 2 == 0 for t in ids) / max(len(ids), 1) for ids in completion_ids]


class IgnoreEOS:
    """The rollout backend with `ignore_eos`: every completion is max_completion_length tokens (as W1)."""

    def __init__(self, inner):
        self.inner = inner

    def generate(self, prompt_token_ids, params, adapter=None):
        return self.inner.generate(prompt_token_ids, replace(params, ignore_eos=True), adapter=adapter)


class StepClock:
    """A trainer callback: rank 0's wall time at each step end (synchronised), and the memory peak reset
    once the warm-up steps are done."""

    def __init__(self, warmup: int, meter):
        self.warmup, self.meter, self.ends = warmup, meter, []
        self.split: list[tuple[float, float]] = []  # this rank's (rollout s, update s) of each measured step

    def on_step_end(self, args, state, control, **kwargs):
        self.meter.sync()
        self.ends.append(time.perf_counter())
        if state.global_step == self.warmup:
            self.meter.reset()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if state.global_step > self.warmup and logs and "timing/rollout_s" in logs:
            self.split.append((logs["timing/rollout_s"], logs["timing/update_s"]))


def build_model(args, device):
    """bench/rollout.py's model (random weights of a real shape; LoRA r on every linear layer), or the
    same without adapters for --mode full."""
    import torch
    import rollout
    rollout.DEVICE = device  # rollout.build_model builds on its module's device
    if args.mode == "lora":
        return rollout.build_model(args.model, args.lora_rank, smoke=args.tiny)
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = json.loads((rollout.ASSETS / "configs" / f"{args.model}.json").read_text())
    cfg.pop("torch_dtype", None)
    cfg.update(rollout.SMOKE if args.tiny else {})
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg),
                                                 dtype=torch.float32 if args.tiny else torch.bfloat16)
    return model.eval()


def w1_rows(count: int) -> list[dict]:
    """GSM8K questions as bench/rollout.py's W1 prompts: its system prompt, then the question."""
    import rollout
    lines = (rollout.ASSETS / "gsm8k" / "train.jsonl").read_text().splitlines()[:count]
    return [{"prompt": [{"role": "system", "content": rollout.SYSTEM_PROMPT},
                        {"role": "user", "content": json.loads(line)["question"]}]} for line in lines]


def grpo_config(args, wl: dict, world: int):
    from ahazero import GRPOConfig
    if wl["prompts"] % world:
        raise ValueError(f"{wl['prompts']} prompts per step do not split over {world} ranks")
    return GRPOConfig(output_dir=args.workdir, max_steps=args.warmup + args.steps, num_generations=wl["n"],
                      per_device_train_batch_size=wl["prompts"] // world * wl["n"], gradient_accumulation_steps=1,
                      max_completion_length=wl["new_tokens"], max_prompt_length=256,
                      micro_batch_size=args.micro_batch or None, save_steps=10 ** 9, shuffle_dataset=False,
                      disable_tqdm=True, report_to="none", seed=0)


def main_worker(args) -> None:
    import torch
    from ahazero import GRPOTrainer
    from ahazero.engine.engine import create_generator
    from ahazero.grpo import distributed
    from memory import Meter
    import rollout
    distributed.init_from_env(backend="gloo" if args.device == "cpu" else None)
    rank, world = distributed.rank(), distributed.world_size()
    if args.device == "cpu":
        torch.set_num_threads(1)
    device = torch.device("cuda", distributed.local_rank()) if args.device == "cuda" else torch.device("cpu")
    wl = TINY_WORKLOAD if args.tiny else rollout.WORKLOADS[args.workload]
    meter = Meter(device)
    model = build_model(args, device)
    tok = rollout.tokenizer()
    config = grpo_config(args, wl, world)
    engine = create_generator(model, tok, max_seq_length=config.max_prompt_length + wl["new_tokens"],
                              gpu_memory_utilization=args.gpu_memory_utilization,
                              max_lora_rank=args.lora_rank if args.mode == "lora" else None,
                              **({"cuda_graphs": False} if args.no_cuda_graphs else {}))
    clock = StepClock(args.warmup, meter)
    trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=even_token_reward, args=config,
                          train_dataset=w1_rows(wl["prompts"] * (args.warmup + args.steps)),
                          generator=IgnoreEOS(engine), callbacks=[clock])
    trainer.train()
    peak = distributed.all_reduce_max(torch.tensor([meter.peak() or 0.0], dtype=torch.float64)).item()
    if rank == 0:
        Path(args.result).write_text(json.dumps(worker_result(args, wl, world, clock, peak, device)))
    distributed.destroy()


def worker_result(args, wl: dict, world: int, clock: StepClock, peak: float, device) -> dict:
    import torch
    seconds = clock.ends[-1] - clock.ends[args.warmup - 1] if args.warmup else None
    steps_per_s = args.steps / seconds if seconds else None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    rollout_s, update_s = (sum(x) / len(x) for x in zip(*clock.split)) if clock.split else (None, None)
    return dict(gpus=world, steps_per_s=steps_per_s, step_s=[b - a for a, b in zip(clock.ends, clock.ends[1:])],
                rollout_s=rollout_s, update_s=update_s,  # rank 0's mean over the measured steps
                completion_tokens_per_s=steps_per_s * wl["prompts"] * wl["n"] * wl["new_tokens"] if steps_per_s else None,
                peak_gib=peak, device=name, backend="nccl" if device.type == "cuda" else "gloo",
                sharding="fsdp2" if args.mode == "full" and world > 1 else ("ddp" if world > 1 else "none"),
                micro_batch_size=args.micro_batch, steps=args.steps, warmup=args.warmup,
                cuda_graphs=not args.no_cuda_graphs and device.type == "cuda",
                torch=torch.__version__)


def parse_args(argv=None):
    import torch
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpus", default=None, help="comma-separated rank counts (default 1,2; --device cpu: 2)")
    ap.add_argument("--model", default="qwen2.5-1.5b", help="a config name in tests/assets/configs")
    ap.add_argument("--workload", default="W1", help="a workload of bench/rollout.py (W1: a GRPO step's rollouts)")
    ap.add_argument("--mode", choices=("lora", "full"), default="lora")
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--steps", type=int, default=5, help="measured steps")
    ap.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (at least 1)")
    ap.add_argument("--micro-batch", type=int, default=8, help="rows per forward/backward (0: token budget; "
                                                                  "full fine-tuning on N > 1 needs rows)")
    ap.add_argument("--device", choices=("cuda", "cpu"), default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--gpu-memory-utilization", type=float, default=0.5, help="the engine's (KV cache) share")
    ap.add_argument("--no-cuda-graphs", action="store_true",
                    help="decode eagerly (with FSDP2 the gathered weights land at new addresses each rollout, so "
                         "the engine captures its graphs again every step)")
    ap.add_argument("--tiny", action="store_true", help=f"tiny model and workload {TINY_WORKLOAD}: checks the script")
    ap.add_argument("--timeout", type=float, default=280, help="seconds per torchrun (two fit a 10-minute command)")
    ap.add_argument("--out", default=str(BENCH / "scaling_results.jsonl"))
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--workdir", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.gpus = args.gpus or ("2" if args.device == "cpu" else "1,2")
    if args.warmup < 1:
        ap.error("--warmup must be >= 1 (the first step captures CUDA graphs)")
    return args


if __name__ == "__main__":
    parsed = parse_args()
    main_worker(parsed) if parsed.worker else main_launcher(parsed)
