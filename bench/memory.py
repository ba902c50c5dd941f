"""Memory and time of ONE GRPO training step (issue 5): ahazero vs TRL's GRPOTrainer vs Unsloth.

Every backend trains on identical tokens: one GSM8K prompt (chat template, real Qwen2.5 tokenizer) and
G fixed random completions of exactly --completion-len tokens (no EOS, so none is shorter), the same
rewards (hence the same group advantages), the same random bf16 weights of a real shape (seed 0) with
LoRA r=32 on every linear layer, loss_type "dapo", beta 0, one iteration, AdamW, clip 1.0. Generation
is not part of the step: ahazero gets a RolloutBatch from `build_batch`; TRL and Unsloth get the
completions through TRL's `rollout_func` hook, are made to score and buffer them first (their
`_prepare_inputs`), and only then is the step measured: `training_step` (loss + backward) for each
micro-batch, clip, `optimizer.step`, `zero_grad`, which is what `Trainer.train` does for one update.

Measured per backend, each in its own subprocess (so peaks do not mix), after `--warmup` unmeasured
steps: peak allocated memory (torch.cuda.max_memory_allocated, reset right before the step), memory
allocated by the model alone ("weights": base weights + LoRA, measured after loading), and the step's
wall time (synchronised). `--micro-batch M` is the rows per forward/backward for every backend
(ahazero micro_batch_size=M; TRL/Unsloth per_device_train_batch_size=M, gradient_accumulation_steps=G/M).

Backends:
  ahazero   our GRPOTrainer.optimizer_step, use_gradient_checkpointing=--ahazero-checkpointing ("offload")
  trl       trl.GRPOTrainer (gradient_checkpointing=True, TRL's default, turned on as Trainer.train() does),
            LoRA through PEFT
  unsloth   Unsloth's FastLanguageModel (16-bit LoRA, use_gradient_checkpointing="unsloth",
            fast_inference=False) + its patched GRPOTrainer; only when `import unsloth` works.
            UNTESTED here (unsloth cannot be installed without a GPU); it loads the random weights
            from a folder this script writes first (--workdir).

Run on a GPU machine, from the repository root (one workload per command; --timeout bounds each backend's
subprocess, so three backends stay under 10 minutes):
  python bench/memory.py --model qwen2.5-1.5b --completion-len 1024  --timeout 180 --out $OUT/memory.jsonl
  python bench/memory.py --model qwen2.5-1.5b --completion-len 4096  --timeout 180 --out $OUT/memory.jsonl
  python bench/memory.py --model qwen2.5-1.5b --completion-len 16384 --timeout 180 --out $OUT/memory.jsonl
  python bench/memory.py --model llama-3.1-8b --completion-len 4096  --timeout 280 --backends ahazero,trl --out $OUT/memory.jsonl
  python bench/memory.py --model llama-3.1-8b --completion-len 4096  --timeout 560 --backends unsloth --out $OUT/memory.jsonl
QLoRA (issue 6; the training step only, generation not included):
  python bench/memory.py --model qwen2.5-1.5b --generations 6 --completion-len 200 --load-in-4bit --backends ahazero,unsloth --out $OUT/memory.jsonl
  python bench/memory.py --model qwen2.5-1.5b --completion-len 1024 --load-in-4bit --optim adamw_8bit --backends ahazero,unsloth --out $OUT/memory.jsonl
ahazero with GRPOConfig.lora_autocast (LoRA products in bf16 under torch.autocast, as Unsloth's):
  python bench/memory.py --model qwen2.5-1.5b --completion-len 4096 --lora-autocast --backends ahazero --out $OUT/memory.jsonl
Which tensors make each peak (allocation histories for pytorch.org/memory_viz; the step times are then slower):
  python bench/memory.py --model qwen2.5-1.5b --completion-len 4096 --backends ahazero,unsloth --snapshot $OUT/snapshots
Completions of several lengths (EOS-terminated, 4,096 down to 1,024 tokens; the same lengths every step, so
ahazero's graphs would replay where real training's never repeat: --without layer-graphs is that case):
  python bench/memory.py --model qwen2.5-1.5b --completion-len 4096 --length-spread 0.75 --out $OUT/memory.jsonl
Where each step's time goes (torch.profiler's operator table of one more step, after the measured one):
  python bench/memory.py --model qwen2.5-1.5b --completion-len 4096 --backends ahazero,unsloth --profile $OUT/profiles
(--backends defaults to ahazero,trl,unsloth; --micro-batch defaults to 1 row per forward/backward, 0 means all
G rows at once. --optim, --load-in-4bit and --lora-autocast reach the workers; before 2026-11-27 the first two
did not, so earlier 4-bit rows of this script, none of which are in RESULTS.md, were 16-bit. --optim is every
backend's optimizer; before the fifth session of 2026-11-27 it was ahazero's only, so TRL ran its default
(torch's AdamW) and Unsloth its GRPOConfig's default, adamw_8bit: 8-bit Adam state, a quarter of the 0.27 GiB
that ahazero's float32 state took in those rows.) Where a peer is not installed, point --trl-path /
--unsloth-path at a folder of its unpacked wheels (`pip install --no-index --no-deps --target DIR *.whl`);
Unsloth pins trl 1.15, so its folder must hold its own trl. The unsloth worker first writes the random weights
to --workdir (3 GiB for Qwen2.5-1.5B, 15 GiB for Llama-3.1-8B) for its from_pretrained to load.
A markdown table comes last on stdout; one JSON line per backend is appended to --out. A backend that
runs out of memory or fails is a row with its error, not a crash. `--smoke` runs a shrunken model on the
CPU with few tokens for every importable backend (peak RSS instead of GPU memory): it checks the
script, not the numbers. The Llama shape has a smaller vocabulary than the Qwen tokenizer: token ids are
taken modulo it.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "tests" / "assets"
TOKENIZER = ASSETS / "qwen2.5-tokenizer"
BACKENDS = ("ahazero", "trl", "unsloth")
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16)
SYSTEM_PROMPT = "\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n"
GIB = 1024 ** 3
FIRST_SPECIAL_QWEN = 151643  # ids from here on are Qwen's special tokens (<|endoftext|>, <|im_end|>, ...)


# --- the workload, identical for every backend ---------------------------------------------------

def model_config(name: str, smoke: bool) -> dict:
    cfg = json.loads((ASSETS / "configs" / f"{name}.json").read_text())
    cfg.pop("torch_dtype", None)
    cfg.pop("dtype", None)
    if smoke:
        cfg.update(SMOKE)
    return cfg


def workload(args, vocab_size: int):
    """(prompt text, prompt ids, G completion id lists, G rewards): fixed by the seed."""
    import torch
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    row = json.loads((ASSETS / "gsm8k" / "train.jsonl").read_text().splitlines()[0])
    messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": row["question"]}]
    text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    prompt_ids = [i % vocab_size for i in tok(text, add_special_tokens=False)["input_ids"]]
    g = torch.Generator().manual_seed(1234)
    high = min(vocab_size, FIRST_SPECIAL_QWEN)
    completions = torch.randint(0, high, (args.generations, args.completion_len), generator=g).tolist()
    rewards = torch.rand(args.generations, generator=g).tolist()
    if args.length_spread:  # completions that end: each shorter one closes with the tokenizer's EOS
        if tok.eos_token_id is None or tok.eos_token_id >= vocab_size:
            raise SystemExit(f"--length-spread needs the tokenizer's EOS id inside the vocabulary ({vocab_size})")
        for i, n in enumerate(completion_lengths(args)):
            if n < args.completion_len:
                completions[i] = completions[i][:n - 1] + [tok.eos_token_id]
    return tok, text, prompt_ids, completions, rewards


def completion_lengths(args) -> list[int]:
    """--length-spread F: the G completions' lengths, evenly from --completion-len down to (1 - F) of it
    (the longest is truncated, the others end with EOS); F = 0: all of --completion-len."""
    G, n = args.generations, args.completion_len
    return [max(1, n - round(args.length_spread * n * i / max(G - 1, 1))) for i in range(G)]


def build_peft_model(args, device):
    """Random weights of the named shape (seed 0) with PEFT LoRA r on every linear layer."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM
    config = AutoConfig.for_model(**model_config(args.model, args.smoke))
    torch.manual_seed(0)
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype(args))
    if args.load_in_4bit:  # ahazero's QLoRA: NF4 linears (dynamic: outlier layers stay 16-bit)
        from ahazero.models.linear4bit import quantize_model
        quantize_model(model, device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    from ahazero.models.loader import attach_lora
    return attach_lora(model, r=args.lora_rank, lora_alpha=args.lora_rank, target_modules=TARGETS,
                       random_state=3407)


def dtype(args):
    import torch
    return torch.float32 if args.smoke else torch.bfloat16


def checksum(parts) -> dict:
    """What the step trains on, to check that every backend got identical tokens and advantages."""
    tokens = ids = 0
    advantages = []
    for p_ids, p_mask, c_ids, c_mask, adv in parts:
        tokens += int(p_mask.sum()) + int(c_mask.sum())
        ids += int((p_ids * p_mask).sum()) + int((c_ids * c_mask.long()).sum())
        advantages += adv.flatten().tolist()
    return dict(train_tokens=tokens, token_id_sum=ids, advantages_abs_sum=round(sum(abs(a) for a in advantages), 4))


# --- measuring --------------------------------------------------------------------------------

class Meter:
    """Peak allocated GPU memory, or peak RSS on the CPU (VmHWM, reset through /proc/self/clear_refs)."""

    def __init__(self, device):
        import torch
        self.torch, self.cuda = torch, device.type == "cuda"
        self.pool_gib = self.pool_live_gib = 0.0
        # GiB at most, up to the last capture's start: allocated outside CUDA-graph captures plus what the graphs'
        # pools held then (a pool grows only in a capture, so the pools at a capture's start held as much since
        # the previous capture's end)
        self.outside_peak = 0.0
        self.reserved_peak = 0.0  # GiB reserved at most up to the last capture's end
        # where the peak is: the caller's label of what runs now (e.g. "step 3"); the peak's interval between
        # captures as the labels at its two ends
        self.phase, self.interval_from, self.peak_phase = "start", "start", None
        if self.cuda:
            self._reset_peaks = torch.cuda.reset_peak_memory_stats  # PyTorch's own (grpo_step.py wraps it later)
            _watch_captures(self)

    def current(self) -> float | None:
        if self.cuda:
            return self.torch.cuda.memory_allocated() / GIB
        return _proc_status("VmRSS")

    def reset(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.empty_cache()
            self._reset_peaks()
            self.outside_peak = self.reserved_peak = 0.0
            self.interval_from, self.peak_phase = self.phase, None
        else:
            try:
                Path("/proc/self/clear_refs").write_text("5")
            except OSError:
                pass

    def interval(self) -> str:
        """The labels at the two ends of the interval between captures that runs now ("step 3 .. step 5")."""
        return f"{self.interval_from} .. {self.phase}"

    def peak(self) -> float | None:
        """CUDA: the most allocated outside the CUDA graphs' private pools plus what the pools held at the time
        (a replay uses its pool without allocating, so a graphed step is not measured below what it uses; a
        capture allocates from the pool, so its allocations are counted as the pool only, not twice). PyTorch's
        allocated count includes the pools' live blocks (the graphs' static tensors), which the pools' size
        already holds: `outside_pools` takes them out."""
        if self.cuda:
            reserved, live = graph_pool_bytes()
            self.pool_gib, self.pool_live_gib = reserved / GIB, live / GIB  # the pools now, for the record
            last = outside_pools(self.torch.cuda.max_memory_allocated(), reserved, live) / GIB
            if last > self.outside_peak:
                self.peak_phase = self.interval()
            return max(self.outside_peak, last)
        return _proc_status("VmHWM")

    def peak_reserved(self) -> float:
        """CUDA: the most the caching allocator held from the device (its pools and its free cache)."""
        return max(self.reserved_peak, self.torch.cuda.max_memory_reserved() / GIB)

    def sync(self) -> None:
        if self.cuda:
            self.torch.cuda.synchronize()


def _watch_captures(meter: Meter) -> None:
    """Sets the peak counters aside around every CUDA-graph capture (torch.cuda.graph) of the process: at the
    start the peak since the last capture plus the pools then is kept, and what is allocated outside the pools
    then stands for the capture's time (its allocations go to the graph's pool, which `Meter.peak` adds once);
    at the end the counters restart."""
    torch = meter.torch
    graph = torch.cuda.graphs.graph
    if getattr(graph, "_bench_meters", None) is None:
        graph._bench_meters = []
        enter, leave = graph.__enter__, graph.__exit__

        def __enter__(self):
            peak = outside_pools(torch.cuda.max_memory_allocated(), *graph_pool_bytes()) / GIB
            for m in graph._bench_meters:
                if peak > m.outside_peak:
                    m.outside_peak, m.peak_phase = peak, m.interval() + " (a capture)"
            return enter(self)

        def __exit__(self, *exc):
            out = leave(self, *exc)
            for m in graph._bench_meters:
                m.reserved_peak = max(m.reserved_peak, torch.cuda.max_memory_reserved() / GIB)
                m.interval_from = m.phase
            if graph._bench_meters:
                graph._bench_meters[0]._reset_peaks()
            return out

        graph.__enter__, graph.__exit__ = __enter__, __exit__
    graph._bench_meters.append(meter)


def graph_pool_bytes() -> tuple[int, int]:
    """(reserved, allocated) bytes of the CUDA caching allocator's segments that belong to private pools (CUDA
    graphs'): their size, and the blocks in them that are live (the graphs' static tensors)."""
    import torch
    pools = [seg for seg in torch.cuda.memory_snapshot() if tuple(seg.get("segment_pool_id", (0, 0))) != (0, 0)]
    return sum(seg["total_size"] for seg in pools), sum(seg["allocated_size"] for seg in pools)


def outside_pools(peak_allocated: int, pool_reserved: int, pool_live: int) -> int:
    """Bytes the device held at most since the allocator's peak counter restarted: its peak allocated count less
    the private pools' live blocks (counted in it, and held by the pools' size), plus the pools' size. Between
    captures a pool only frees blocks, so its live bytes now are the fewest of the interval: an upper bound."""
    return peak_allocated - pool_live + pool_reserved


def _proc_status(key: str) -> float | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024 / GIB
    except OSError:
        pass
    return None


def measure(step, meter: Meter, warmup: int, snapshot: str | None = None, profile: str | None = None) -> dict:
    """Runs `step` warmup times, then once measured. `snapshot` (CUDA): a file for the measured step's
    allocation history (torch.cuda.memory._dump_snapshot; open it in pytorch.org/memory_viz): which tensors
    make the peak, with their stacks. Recording slows the step: its time is then not comparable.
    `profile`: a file for torch.profiler's table of one more step (after the measured one, which it
    does not slow), operators by their own GPU time (CPU time off CUDA): where the step's time goes."""
    import torch
    for _ in range(warmup):
        step()
    meter.reset()
    start = meter.current()
    recording = snapshot is not None and meter.cuda
    if recording:
        torch.cuda.memory._record_memory_history(max_entries=200_000)
    t0 = time.perf_counter()
    loss = step()
    meter.sync()
    seconds = time.perf_counter() - t0
    if recording:
        torch.cuda.memory._dump_snapshot(snapshot)
        Path(snapshot).with_suffix(".peak.txt").write_text(peak_composition(torch.cuda.memory._snapshot()))
        torch.cuda.memory._record_memory_history(enabled=None)
    if profile is not None:
        profile_step(step, meter, profile)
    peak = meter.peak()
    return dict(step_s=seconds, peak_gib=peak, start_gib=start, loss=loss, graph_pool_gib=meter.pool_gib,
                **({"snapshot": snapshot} if recording else {}), **({"profile": profile} if profile else {}))


def peak_composition(snapshot: dict, rows: int = 25) -> str:
    """What is allocated at the recorded history's peak: the live blocks at that moment, summed by the
    innermost three frames of ahazero, transformers or peft code (else the innermost Python frame), largest first;
    blocks already freed by Python but waiting for another stream to reach the free (record_stream) are
    counted apart. `snapshot`: torch.cuda.memory._snapshot() (events alloc / free_requested /
    free_completed, with sizes and frames)."""
    events = [e for trace in snapshot.get("device_traces", []) for e in trace
              if e["action"] in ("alloc", "free_requested", "free_completed")]
    total, peak, peak_at = 0, 0, -1
    for i, e in enumerate(events):  # pass 1: when the peak is
        if e["action"] != "free_requested":
            total += e["size"] if e["action"] == "alloc" else -e["size"]
        if total > peak:
            peak, peak_at = total, i
    live, waiting = {}, set()
    for e in events[:peak_at + 1]:  # pass 2: what is live then
        if e["action"] == "alloc":
            live[e["addr"]] = e
            waiting.discard(e["addr"])
        elif e["action"] == "free_requested":
            waiting.add(e["addr"])
        else:
            live.pop(e["addr"], None)
            waiting.discard(e["addr"])
    sites: dict[str, list[int]] = {}
    for addr, e in live.items():
        site = _site(e.get("frames", [])) + (" (freed, waiting for a stream)" if addr in waiting else "")
        sites.setdefault(site, [0, 0])
        sites[site][0] += e["size"]
        sites[site][1] += 1
    lines = [f"peak of the recorded history: {peak / 2**20:.1f} MiB more than at its start, "
             f"{len(live)} blocks allocated during it live then (event {peak_at} of {len(events)})",
             "| MiB | blocks | where allocated |", "| --- | --- | --- |"]
    for site, (size, count) in sorted(sites.items(), key=lambda kv: -kv[1][0])[:rows]:
        lines.append(f"| {size / 2**20:.1f} | {count} | {site} |")
    return "\n".join(lines) + "\n"


def _site(frames: list[dict], depth: int = 3) -> str:
    """The innermost `depth` frames in ahazero, transformers or peft (file:line function, innermost first,
    joined by " < "), else the innermost Python frame."""
    def name(f):
        return f"{'/'.join(f['filename'].split('/')[-2:])}:{f['line']} {f['name']}"
    ours = [name(f) for f in frames if any(k in f["filename"] for k in ("ahazero", "transformers", "peft"))]
    if ours:
        return " < ".join(ours[:depth])
    python = [f for f in frames if f["filename"].endswith(".py")]
    return name(python[0]) if python else "?"


def profile_step(step, meter: Meter, path: str, rows: int = 40) -> None:
    """One step under torch.profiler; its operator tables (sorted by own GPU time, then by own CPU time) go
    to `path`, and the first rows to stderr."""
    from torch.profiler import ProfilerActivity, profile
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if meter.cuda else [])
    with profile(activities=activities) as prof:
        step()
        meter.sync()
    keys = (["self_device_time_total"] if meter.cuda else []) + ["self_cpu_time_total"]
    text = "\n\n".join(f"sorted by {key}:\n" + prof.key_averages().table(sort_by=key, row_limit=rows,
                                                                        max_name_column_width=60) for key in keys)
    if meter.cuda:
        text = device_timeline(prof) + "\n\n" + text
    Path(path).write_text(text)
    print("\n".join(text.splitlines()[:22]), file=sys.stderr, flush=True)


KERNEL_KINDS = (("attention", ("sdpa", "flash", "fmha", "attn")), ("gemm", ("nvjet", "gemm", "cutlass", "splitk")),
                ("triton", ("triton",)), ("elementwise", ("elementwise", "reduce", "vectorized", "catarray", "index")),
                ("copy", ("memcpy", "memset", "copy")))


def kernel_kind(name: str) -> str:
    """A device activity's coarse kind, from its name (first match in KERNEL_KINDS)."""
    low = name.lower()
    return next((kind for kind, marks in KERNEL_KINDS if any(m in low for m in marks)), "other")


def busy_and_gaps(intervals: list[tuple[float, float]]) -> tuple[float, float, list[float]]:
    """(busy time of the union, span, the idle gaps) of [start, end) intervals, in their unit; zeros for none."""
    if not intervals:
        return 0, 0, []
    intervals = sorted(intervals)
    busy, gaps, end = 0, [], intervals[0][0]
    for s, e in intervals:
        if s > end:
            gaps.append(s - end)
        busy += max(0, e - max(s, end))
        end = max(end, e)
    return busy, end - intervals[0][0], gaps


def device_timeline(prof) -> str:
    """Per CUDA stream: busy time (the union of its activities), span, idle gaps, and time by kernel kind;
    the union over all streams against the step's span (what overlaps, what waits)."""
    from torch.autograd import DeviceType
    by_stream: dict[int, list] = {}
    for e in prof.profiler.kineto_results.events():
        if e.device_type() == DeviceType.CUDA and e.duration_ns() > 0:
            by_stream.setdefault(e.device_resource_id(), []).append((e.start_ns(), e.end_ns(), e.name()))
    if not by_stream:
        return "device timeline: no CUDA activity recorded"
    lines = ["device timeline (ms):"]
    for stream, evs in sorted(by_stream.items(), key=lambda kv: -len(kv[1])):
        busy, span, gaps = busy_and_gaps([(s, e) for s, e, _ in evs])
        kinds: dict[str, int] = {}
        for s, e, name in evs:
            kind = kernel_kind(name)
            kinds[kind] = kinds.get(kind, 0) + e - s
        largest = ", ".join(f"{g / 1e6:.2f}" for g in sorted(gaps, reverse=True)[:5])
        by_kind = ", ".join(f"{k} {v / 1e6:.1f}" for k, v in sorted(kinds.items(), key=lambda kv: -kv[1]))
        lines.append(f"  stream {stream}: {len(evs)} activities, busy {busy / 1e6:.1f} of span {span / 1e6:.1f}, "
                     f"idle {sum(gaps) / 1e6:.1f} in {len(gaps)} gaps (largest {largest}); {by_kind}")
    busy, span, gaps = busy_and_gaps([(s, e) for evs in by_stream.values() for s, e, _ in evs])
    lines.append(f"  all streams: busy {busy / 1e6:.1f} of span {span / 1e6:.1f}, idle {sum(gaps) / 1e6:.1f}")
    return "\n".join(lines)


# --- ahazero ----------------------------------------------------------------------------------

def snapshot_path(args) -> str | None:
    """--snapshot DIR: this worker's allocation history goes to DIR/<backend>-<completion_len>.pickle."""
    return _worker_file(args.snapshot, args, "pickle")


def profile_path(args) -> str | None:
    """--profile DIR: this worker's operator table goes to DIR/<backend>-<completion_len>.txt."""
    return _worker_file(args.profile, args, "txt")


def _worker_file(folder: str | None, args, suffix: str) -> str | None:
    if not folder:
        return None
    Path(folder).mkdir(parents=True, exist_ok=True)
    return str(Path(folder) / f"{args.worker}-{args.completion_len}.{suffix}")


def run_ahazero(args, device, meter: Meter) -> dict:
    import torch
    from transformers import get_scheduler
    from ahazero import GRPOConfig, GRPOTrainer
    from ahazero.grpo.advantages import group_advantages
    from ahazero.grpo.batch import build_batch
    from ahazero.grpo.trainer import make_optimizer
    from ahazero.models.loader import enable_gradient_checkpointing

    switch_off(args.without)
    model = build_peft_model(args, device)
    if args.tile_tokens:
        from ahazero.models import tiled_mlp
        tiled_mlp.TILE_TOKENS = args.tile_tokens
    if args.bucket_tokens:
        from ahazero.models import layer_graphs
        layer_graphs.BUCKET_TOKENS = args.bucket_tokens
    if args.logprob_chunk_mib:
        from ahazero.grpo import logprobs
        logprobs.CHUNK_BYTES = args.logprob_chunk_mib * 2**20
    mode = {"offload": "offload", "true": True, "false": False}[args.ahazero_checkpointing]
    enable_gradient_checkpointing(model, mode)
    weights = meter.current()
    vocab = model.config.vocab_size
    tok, text, prompt_ids, completions, rewards = workload(args, vocab)

    def fixed_reward(completions, **kwargs):
        return rewards[:len(completions)]

    G = args.generations
    config = GRPOConfig(output_dir=str(Path(args.workdir) / "ahazero-out"), num_generations=G,
                        per_device_train_batch_size=G, gradient_accumulation_steps=1,
                        micro_batch_size=args.micro_batch, max_completion_length=args.completion_len,
                        max_prompt_length=len(prompt_ids), beta=0.0, loss_type="dapo", learning_rate=1e-6,
                        max_grad_norm=1.0, num_iterations=1, temperature=1.0, report_to=[], optim=args.optim,
                        lora_autocast=args.lora_autocast, padding_free="padding-free" not in args.without.split(","))
    trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=fixed_reward, args=config,
                          train_dataset=_Rows([{"prompt": text}]), generator=object())
    trainer.optimizer = make_optimizer(trainer.trainable_parameters, config)
    trainer.scheduler = get_scheduler("constant", trainer.optimizer)
    advantages, _ = group_advantages(torch.tensor(rewards), G, config.scale_rewards)
    truncated = [len(c) == args.completion_len for c in completions]
    batch = build_batch([prompt_ids] * G, completions, [[0.0] * len(c) for c in completions], truncated,
                        advantages, trainer.pad_id, mask_truncated_completions=False)

    def step():
        return trainer.optimizer_step([batch])["loss"]

    check = checksum([(batch.prompt_ids, batch.prompt_mask, batch.completion_ids, batch.completion_mask,
                       batch.advantages)])
    return dict(weights_gib=weights, **check, **measure(step, meter, args.warmup, snapshot_path(args), profile_path(args)),
                settings=f"micro_batch_size={args.micro_batch}, checkpointing={mode}, optim={args.optim}"
                         + (f", tile_tokens={args.tile_tokens}" if args.tile_tokens else "")
                         + (f", BUCKET_TOKENS={args.bucket_tokens}" if args.bucket_tokens else "")
                         + (f", CHUNK_BYTES={args.logprob_chunk_mib} MiB" if args.logprob_chunk_mib else "")
                         + (f", without {args.without}" if args.without else "")
                         + (", nf4" if args.load_in_4bit else "") + (", lora_autocast" if args.lora_autocast else ""))


WITHOUT = ("fused-lora", "lean-norm", "tiled-mlp", "layer-graphs", "padding-free", "fast-rope",
           "in-place-logprobs")  # padding-free: the padded forward through the model's own attention (SDPA)
# instead of the packed varlen one (GRPOConfig.padding_free); in-place-logprobs: the frozen head's chunks
# through the compiled function (two [C, V] tensors, chunks half as long)


def switch_off(parts: str) -> None:
    """--without: turn off some of ahazero's training-step pieces, to measure what each brings."""
    import ahazero.grpo.logprobs as logprobs
    import ahazero.grpo.trainer as trainer
    import ahazero.models.layer_graphs as layer_graphs
    import ahazero.models.lora as lora
    import ahazero.models.tiled_mlp as tiled_mlp
    for part in filter(None, parts.split(",")):
        if part not in WITHOUT:
            raise SystemExit(f"--without {part!r}: choose from {', '.join(WITHOUT)}")
        if part == "fused-lora":
            trainer.fuse_lora_forwards = lora.fuse_lora_forwards = lambda model: 0
        elif part == "lean-norm":
            trainer.lean_rms_norms = lambda model: 0
        elif part == "layer-graphs":
            layer_graphs.LAYER_GRAPHS = False
        elif part == "padding-free":
            pass  # a GRPOConfig field: run_ahazero reads it from args.without
        elif part == "fast-rope":
            trainer.fast_rope = lambda model: 0
        elif part == "in-place-logprobs":
            logprobs.in_place_gradient = lambda hidden, fused: False
        else:
            tiled_mlp.TILED_MODEL_TYPES = frozenset()


class _Rows(list):
    """The little of a datasets.Dataset that GRPOTrainer reads (so this path needs no `datasets`)."""

    @property
    def column_names(self) -> list[str]:
        return list(self[0])


# --- TRL and Unsloth (Unsloth's trainer is TRL's, patched) -------------------------------------------

def trl_step_runner(trainer_cls, config_cls, model, tok, args, device, text, prompt_ids, completions, rewards,
                    extra_config: dict, checkpointing_as_train: bool = False):
    """A callable doing one TRL optimizer step on the fixed completions (scored and buffered first).
    `checkpointing_as_train`: turn the model's gradient checkpointing on as `Trainer.train()` does before its
    loop, which the direct `training_step` calls here skip (`enable_checkpointing_as_train_does`)."""
    from datasets import Dataset
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    G, M = args.generations, args.micro_batch or args.generations
    if G % M:
        raise ValueError(f"--micro-batch {M} must divide --generations {G}")
    accumulation = G // M
    rows = [{"prompt": text}]  # with rollout_func TRL never tokenises it: rollout_func returns the ids

    def rollout_func(prompts, trainer):
        # prompts: the generation batch, each prompt repeated num_generations times (G rows here, more only
        # if a patched trainer enlarged the batch: then the completions repeat, and the checksum shows it)
        return {"prompt_ids": [list(prompt_ids) for _ in prompts],
                "completion_ids": [list(completions[i % G]) for i in range(len(prompts))],
                "logprobs": [[0.0] * len(completions[i % G]) for i in range(len(prompts))]}

    def fixed_reward(completions, **kwargs):
        return [rewards[i % G] for i in range(len(completions))]

    config = config_cls(output_dir=str(Path(args.workdir) / "trl-out"), num_generations=G,
                        per_device_train_batch_size=M, gradient_accumulation_steps=accumulation,
                        steps_per_generation=accumulation, max_completion_length=args.completion_len,
                        beta=0.0, loss_type="dapo", learning_rate=1e-6, max_grad_norm=1.0, num_iterations=1,
                        # explicit, as ahazero's step has them: with loss_type "dapo" Unsloth would otherwise
                        # mask every truncated completion (here all of them: no EOS), training on no tokens
                        mask_truncated_completions=False, epsilon=0.2, epsilon_high=0.2,
                        temperature=1.0, gradient_checkpointing=True, report_to=[], logging_steps=1,
                        bf16=not args.smoke, use_cpu=args.smoke, max_steps=10, save_strategy="no",
                        shuffle_dataset=False, optim=args.optim, **extra_config)
    kwargs = dict(model=model, reward_funcs=fixed_reward, args=config, processing_class=tok,
                  train_dataset=Dataset.from_list(rows * G))
    try:
        trainer = trainer_cls(rollout_func=rollout_func, **kwargs)
    except TypeError as e:  # a patched trainer without TRL's rollout_func hook (seen only as a possibility)
        if "rollout_func" not in str(e):
            raise
        trainer = fixed_generation(trainer_cls, completions)(**kwargs)
    if checkpointing_as_train:
        enable_checkpointing_as_train_does(trainer)
    a = trainer.args  # as the trainer (or Unsloth's patches) left it
    M, accumulation, per_generation = a.per_device_train_batch_size, a.gradient_accumulation_steps, a.steps_per_generation
    trainer.create_optimizer()
    model = trainer.model
    model.train()
    generation_batch = rows * (M * per_generation)  # what TRL's RepeatSampler dataloader yields for one prompt

    # Generation and scoring, outside the measured step: fills trainer._buffered_inputs (one per micro-step)
    trainer._prepare_inputs(generation_batch)
    buffered = list(trainer._buffered_inputs)[:accumulation]  # one optimizer step's micro-batches
    lengths = sorted(len(c) for c in completions)  # TRL shuffles the rows before it splits them
    assert all(b["completion_ids"].shape[0] == M and b["completion_ids"].shape[1] in lengths for b in buffered), \
        [b["completion_ids"].shape for b in buffered]
    trainer._prepare_inputs = lambda inputs: inputs  # Trainer.training_step calls it: no second generation
    # what Trainer._inner_training_loop sets before its training_step calls (the batches have no labels,
    # so num_items_in_batch is None there as well)
    trainer.current_gradient_accumulation_steps = accumulation

    check = checksum([(b["prompt_ids"], b["prompt_mask"], b["completion_ids"], b["completion_mask"],
                       b["advantages"]) for b in buffered])

    def step():
        loss = 0.0
        for inputs in buffered:
            out = trainer.training_step(model, inputs, None)
            loss += float(out.detach())
        if config.max_grad_norm:
            trainer.accelerator.clip_grad_norm_(model.parameters(), config.max_grad_norm)
        trainer.optimizer.step()
        model.zero_grad(set_to_none=True)
        return loss

    return step, check, (f"per_device_train_batch_size={M}, gradient_accumulation_steps={accumulation}, "
                         f"optim={getattr(trainer.args.optim, 'value', trainer.args.optim)}")


def enable_checkpointing_as_train_does(trainer) -> None:
    """What `Trainer.train()` does before its loop: the model's gradient checkpointing on where the config
    asks for it (TRL's GRPOTrainer leaves that to `train()`). Before the fifth session of 2026-11-27 this
    script did not, so its TRL rows ran without checkpointing: more memory, and one forward less a step."""
    a = trainer.args
    wanted = getattr(a, "activation_checkpointing", None) or getattr(a, "gradient_checkpointing", False)
    if wanted and not trainer.model.is_gradient_checkpointing:
        kwargs = getattr(a, "activation_checkpointing_kwargs", None) or getattr(a, "gradient_checkpointing_kwargs", None)
        trainer.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs or None)
    if wanted and not trainer.model.is_gradient_checkpointing:
        raise RuntimeError("TRL's model did not turn gradient checkpointing on")


def fixed_generation(trainer_cls, completions):
    """trainer_cls whose generation returns the fixed completions; the prompt is then tokenised by the
    trainer itself (the checksum in the record tells whether the tokens still match ahazero's)."""
    G = len(completions)

    class FixedGeneration(trainer_cls):
        def _generate_single_turn(self, prompt_ids, *args, **kwargs):
            ids = [list(completions[i % G]) for i in range(len(prompt_ids))]
            return ids, [[0.0] * len(c) for c in ids]

    return FixedGeneration


def run_trl(args, device, meter: Meter) -> dict:
    import trl
    model = build_peft_model(args, device)
    weights = meter.current()
    tok, text, prompt_ids, completions, rewards = workload(args, model.config.vocab_size)
    step, check, settings = trl_step_runner(trl.GRPOTrainer, trl.GRPOConfig, model, tok, args, device, text,
                                           prompt_ids, completions, rewards, {}, checkpointing_as_train=True)
    return dict(weights_gib=weights, **check, **measure(step, meter, args.warmup, snapshot_path(args), profile_path(args)),
                settings=f"{settings}, gradient_checkpointing={model.is_gradient_checkpointing}",
                version=f"trl {trl.__version__}")


def save_random_model(args) -> Path:
    """The same random weights, as a folder Unsloth's from_pretrained can load (written by the unsloth worker, reused if present)."""
    import torch
    folder = Path(args.workdir) / f"random-{args.model}{'-smoke' if args.smoke else ''}"
    if (folder / "config.json").is_file():
        return folder
    sys.path.insert(0, str(ROOT / "src"))
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
    config = AutoConfig.for_model(**model_config(args.model, args.smoke))
    torch.manual_seed(0)
    device = torch.device("cuda" if torch.cuda.is_available() and not args.smoke else "cpu")
    with device:
        model = AutoModelForCausalLM.from_config(config, dtype=dtype(args))
    model.save_pretrained(folder, safe_serialization=True)
    AutoTokenizer.from_pretrained(TOKENIZER).save_pretrained(folder)
    del model
    if device.type == "cuda":
        torch.cuda.empty_cache()
    return folder


def run_unsloth(args, device, meter: Meter) -> dict:
    """Unsloth's documented GRPO recipe (FastLanguageModel + PatchFastRL'd TRL), generation replaced by
    the fixed completions. UNTESTED: unsloth was not installable where this was written."""
    import unsloth  # noqa: F401  (must come before trl / transformers / peft)
    from unsloth import FastLanguageModel
    import torch
    try:  # older Unsloth needs this call to patch TRL's GRPOTrainer; newer patches on import (harmless)
        from unsloth import PatchFastRL
        PatchFastRL("GRPO", FastLanguageModel)
    except ImportError:
        pass
    folder = save_random_model(args)
    model, tok = FastLanguageModel.from_pretrained(
        str(folder), max_seq_length=args.completion_len + 512, load_in_4bit=args.load_in_4bit, fast_inference=False,
        max_lora_rank=args.lora_rank, dtype=torch.bfloat16)
    model = FastLanguageModel.get_peft_model(model, r=args.lora_rank, lora_alpha=args.lora_rank,
                                             target_modules=TARGETS, use_gradient_checkpointing="unsloth",
                                             random_state=3407)
    weights = meter.current()
    from trl import GRPOConfig, GRPOTrainer  # Unsloth's patched classes after `import unsloth`
    _, text, prompt_ids, completions, rewards = workload(args, model.config.vocab_size)
    step, check, settings = trl_step_runner(GRPOTrainer, GRPOConfig, model, tok, args, device, text,
                                           prompt_ids, completions, rewards, {})
    return dict(weights_gib=weights, **check, **measure(step, meter, args.warmup, snapshot_path(args), profile_path(args)),
                settings=f'{settings}, use_gradient_checkpointing="unsloth"',
                version=f"unsloth {getattr(unsloth, '__version__', '?')}")


RUNNERS = {"ahazero": run_ahazero, "trl": run_trl, "unsloth": run_unsloth}


def backend_env(backend: str, args) -> dict:
    """The worker's environment: --trl-path / --unsloth-path (folders of unpacked wheels, e.g. made with
    `pip install --no-index --no-deps --target DIR *.whl`) go first on its PYTHONPATH, for it alone."""
    env = dict(os.environ)
    current = [p for p in [env.get("PYTHONPATH")] if p]
    extra = {"trl": args.trl_path, "unsloth": args.unsloth_path}.get(backend)
    if extra:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(extra).resolve())] + current)
    elif backend == "ahazero" and (args.trl_path or args.unsloth_path):
        # last, so only what this environment lacks comes from it (the GPU image has no `datasets`)
        env["PYTHONPATH"] = os.pathsep.join(current + [str(Path(args.trl_path or args.unsloth_path).resolve())])
    return env


def importable(backend: str, env: dict) -> str | None:
    """None if the backend's module can be found by the worker, else why not."""
    module = {"ahazero": None, "trl": "trl", "unsloth": "unsloth"}[backend]
    if module is None:
        return None
    code = f"import importlib.util, sys; sys.exit(importlib.util.find_spec({module!r}) is None)"
    if subprocess.run([sys.executable, "-c", code], env=env).returncode:
        return f"{module} is not importable"
    return None


# --- worker and parent ------------------------------------------------------------------------

def worker(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on the network
    import torch
    sys.path.insert(0, str(ROOT / "src"))
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    meter = Meter(device)
    record = dict(backend=args.worker, model=args.model + ("-smoke" if args.smoke else ""),
                  completion_len=args.completion_len, generations=args.generations, micro_batch=args.micro_batch,
                  length_spread=args.length_spread,
                  lora_rank=args.lora_rank, device=torch.cuda.get_device_name() if device.type == "cuda" else "cpu",
                  memory="max_memory_allocated" if device.type == "cuda" else "peak RSS (VmHWM)",
                  torch=torch.__version__)
    try:
        record.update(RUNNERS[args.worker](args, device, meter))
        if record.get("peak_gib") is not None and record.get("weights_gib") is not None:
            record["above_weights_gib"] = record["peak_gib"] - record["weights_gib"]
        record["status"] = "ok"
    except torch.cuda.OutOfMemoryError as e:
        record.update(status="oom", error=str(e).splitlines()[0][:300])
        if device.type == "cuda":
            record["peak_gib"] = torch.cuda.max_memory_allocated() / GIB
    except Exception as e:  # noqa: BLE001  (a failing backend is a row of the table)
        traceback.print_exc()
        record.update(status="error", error=f"{type(e).__name__}: {e}".splitlines()[0][:300])
    Path(args.result).write_text(json.dumps(record))


def parent(args) -> None:
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        if b not in BACKENDS:
            raise SystemExit(f"unknown backend {b!r}; choose from {', '.join(BACKENDS)}")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    records = []
    for b in backends:
        env = backend_env(b, args)
        reason = importable(b, env)
        if b == "trl" and args.load_in_4bit:
            reason = "--load-in-4bit: TRL's 4-bit path is bitsandbytes through PEFT, not compared here"
        if reason:
            print(f"[{b}] skipped: {reason}", flush=True)
            records.append(dict(backend=b, model=args.model, completion_len=args.completion_len,
                                generations=args.generations, status="skipped", error=reason))
            continue
        with tempfile.NamedTemporaryFile("r", suffix=".json", dir=args.workdir, delete=False) as f:
            result = f.name
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", b, "--result", result] + args.passthrough
        print(f"[{b}] running: {' '.join(cmd[2:])}", flush=True)
        t0 = time.perf_counter()
        try:
            proc = subprocess.run(cmd, env=env, timeout=args.timeout)
        except subprocess.TimeoutExpired:
            proc = subprocess.CompletedProcess(cmd, f"timeout after {args.timeout} s")
        text = Path(result).read_text() if Path(result).is_file() else ""
        Path(result).unlink(missing_ok=True)
        record = json.loads(text) if text else dict(backend=b, model=args.model, completion_len=args.completion_len,
                                                    generations=args.generations, status="crashed",
                                                    error=f"worker: {proc.returncode}")
        record["process_s"] = time.perf_counter() - t0
        records.append(record)
        print(f"[{b}] {json.dumps(record)}", flush=True)
    if args.out:
        append_jsonl(args.out, records)
    print()
    print(table(records))


def append_jsonl(path: str, records: list[dict]) -> None:
    """One JSON line per record, appended to `path` (made if missing)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")


def table(records: list[dict]) -> str:
    def gib(v):
        return "n/a" if v is None else f"{v:.2f}"
    r0 = next((r for r in records if "device" in r), records[0] if records else {})
    unit = "GiB" if r0.get("device", "cuda") != "cpu" else "GiB (peak RSS)"
    spread = f" (lengths spread {r0['length_spread']})" if r0.get("length_spread") else ""
    lines = [f"{r0.get('model')}, {r0.get('generations')} x {r0.get('completion_len')} completion tokens{spread}, "
             f"LoRA r={r0.get('lora_rank', '?')}, micro-batch {r0.get('micro_batch') or 'all'}, on {r0.get('device', '?')}",
             "",
             f"| backend | peak {unit} | {unit} above weights | of which CUDA graph pools | step seconds | status |",
             "| --- | --- | --- | --- | --- | --- |"]
    for r in records:
        status = r.get("status", "?") + (f": {r['error']}" if r.get("error") else "")
        step = f"{r['step_s']:.2f}" if r.get("step_s") is not None else "n/a"
        lines.append(f"| {r['backend']} | {gib(r.get('peak_gib'))} | {gib(r.get('above_weights_gib'))} "
                     f"| {gib(r.get('graph_pool_gib'))} | {step} | {status.replace('|', '/')} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="qwen2.5-1.5b", help="a config name in tests/assets/configs")
    p.add_argument("--completion-len", type=int, default=1024)
    p.add_argument("--generations", type=int, default=8)
    p.add_argument("--micro-batch", type=int, default=1,
                   help="rows per forward/backward for every backend (0: all G rows at once)")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--backends", default="ahazero,trl,unsloth")
    p.add_argument("--ahazero-checkpointing", default="offload", choices=["offload", "true", "false"])
    p.add_argument("--warmup", type=int, default=1, help="unmeasured steps before the measured one")
    p.add_argument("--load-in-4bit", action="store_true",
                   help="QLoRA: NF4 base weights (ahazero's own; Unsloth's through bitsandbytes; TRL is skipped)")
    p.add_argument("--optim", default="adamw_torch",
                   help="GRPOConfig.optim for every backend (e.g. adamw_8bit, Unsloth's GRPOConfig default)")
    p.add_argument("--lora-autocast", action="store_true", help="GRPOConfig.lora_autocast for ahazero")
    p.add_argument("--without", default="", help=f"ahazero without some of {', '.join(WITHOUT)} (comma-separated)")
    p.add_argument("--length-spread", type=float, default=0.0,
                   help="completion lengths evenly from --completion-len down to (1 - F) of it, the shorter ones "
                        "ending with EOS (0: every completion full length)")
    p.add_argument("--bucket-tokens", type=int, default=0,
                   help="ahazero's models/layer_graphs.py BUCKET_TOKENS (0: its default, off)")
    p.add_argument("--tile-tokens", type=int, default=0, help="ahazero's MLP token tile (models/tiled_mlp.py "
                                                             "TILE_TOKENS; 0: its default)")
    p.add_argument("--logprob-chunk-mib", type=int, default=0, help="ahazero's grpo/logprobs.py CHUNK_BYTES in MiB "
                                                                    "(0: its default)")
    p.add_argument("--snapshot", default=None, help="folder for each worker's CUDA allocation history of the "
                                                    "measured step (slows that step)")
    p.add_argument("--profile", default=None, help="folder for each worker's torch.profiler table of one more "
                                                   "step (operators by own GPU time)")
    p.add_argument("--out", default=None, help="JSONL file to append one line per backend to")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "ahazero-bench-memory"))
    p.add_argument("--timeout", type=float, default=None, help="seconds per backend subprocess")
    p.add_argument("--trl-path", default=None, help="folder put first on PYTHONPATH for the trl worker")
    p.add_argument("--unsloth-path", default=None, help="folder put first on PYTHONPATH for the unsloth worker")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.smoke and "--completion-len" not in (argv or sys.argv):
        args.completion_len = 32
    if args.smoke and "--generations" not in (argv or sys.argv):
        args.generations = 4
    args.micro_batch = args.micro_batch or None
    if args.worker:
        worker(args)
        return
    args.passthrough = ["--model", args.model, "--completion-len", str(args.completion_len), "--generations",
                        str(args.generations), "--micro-batch", str(args.micro_batch or 0), "--lora-rank",
                        str(args.lora_rank), "--ahazero-checkpointing", args.ahazero_checkpointing, "--warmup",
                        str(args.warmup), "--workdir", args.workdir, "--optim", args.optim] \
        + (["--smoke"] if args.smoke else []) + (["--load-in-4bit"] if args.load_in_4bit else []) \
        + (["--lora-autocast"] if args.lora_autocast else []) \
        + (["--tile-tokens", str(args.tile_tokens)] if args.tile_tokens else []) \
        + (["--length-spread", str(args.length_spread)] if args.length_spread else []) \
        + (["--bucket-tokens", str(args.bucket_tokens)] if args.bucket_tokens else []) \
        + (["--logprob-chunk-mib", str(args.logprob_chunk_mib)] if args.logprob_chunk_mib else []) \
        + (["--without", args.without] if args.without else []) \
        + (["--snapshot", str(Path(args.snapshot).resolve())] if args.snapshot else [])\
        + (["--profile", str(Path(args.profile).resolve())] if args.profile else [])
    parent(args)


if __name__ == "__main__":
    main()
