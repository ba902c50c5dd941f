"""Whole GRPO steps, generation included (issue 6, QLoRA): ahazero vs Unsloth (vs plain TRL), seed notebook settings.

Every backend runs the seed notebook's GRPO through its public API for --steps optimizer steps:
  - model: the Qwen2.5-1.5B shape (tests/assets/configs), random bf16 weights (seed 0) saved once as a local
    checkpoint folder with the real Qwen2.5 tokenizer (in --workdir, by a subprocess of its own), loaded
    with load_in_4bit=True (NF4; `--no-4bit` for 16 bit);
  - LoRA r=32, alpha 32, on q,k,v,o,gate,up,down; use_gradient_checkpointing="unsloth" (TRL: its default
    gradient checkpointing);
  - GRPOConfig: per_device_train_batch_size = num_generations = 6 (`--generations`), so one prompt per step,
    gradient_accumulation_steps 1, max_completion_length 200 (`--completion-len`), max_prompt_length 256,
    lr 5e-6, adam betas (0.9, 0.99), weight decay 0.1, warm-up 10%, cosine schedule,
    optim "paged_adamw_8bit" (`--optim`), max_grad_norm 0.1, beta 0 (TRL's default; `--beta`), temperature 1,
    loss "dapo" (both defaults), seed 3407, no dataset shuffling (every backend sees the same prompts in order);
  - prompts: GSM8K questions (tests/assets/gsm8k/train.jsonl) after the notebook's system prompt, as chat
    messages; only questions whose templated prompt fits max_prompt_length are used (TRL 1.15 has no
    max_prompt_length: then no backend truncates);
  - one cheap reward: the completion's length in characters / 1000. Random weights write random tokens, so
    these differ within a group and the advantages are non-zero.
Random weights almost never sample EOS (2 of 151,936 ids), so nearly every completion runs to
max_completion_length: the steps are the worst case for length. The mean completion length each backend
actually generated is measured (from the completion ids its reward function receives) and reported.

Measured per backend, each in its own subprocess (peaks do not mix; --timeout bounds each one):
  weights GiB   torch.cuda.memory_allocated once the model and its LoRA adapters are loaded
  peak GiB      torch.cuda.max_memory_allocated from then on to the end of training (trainer set-up,
                every rollout, reward, forward/backward and optimizer step) plus what CUDA graphs' private
                pools hold (graph_pool_gib in the JSON line; memory.py's Meter: a capture's allocations are
                the pool's, counted once, and so are the pools' live blocks, graph_pool_live_gib, which
                PyTorch's allocated count includes). The peak counter is reset right
                after the weights are measured; should a backend reset it itself during the run, the peak it
                had reached is kept (torch.cuda.reset_peak_memory_stats is wrapped, not changed).
  first step s  from the trainer's on_train_begin to the first on_step_end (compilation, CUDA-graph capture
                and allocator warm-up land here), synchronised
  steady s      the median of the later steps' times (on_step_end to on_step_end, synchronised)
ahazero's JSON line also names its rollout backend (LLMEngine: its engine; HFGenerator: the fallback), the
engine's KV-cache size (kv_cache_gib, kv_slots: sized by --gpu-memory-utilization, counted in the peak) and
how many linear layers load_in_4bit kept in 16 bit (nf4_kept_16bit), and from its trainer's logs each step's
rollout_s / update_s (generation with rewards; forward, backward and optimizer) and peak_after_rollout_gib /
peak_after_update_gib (the most allocated at each point: which phase sets the peak; the trainer's numbers,
without the graph pools, and since the last CUDA-graph capture ended, where the meter restarts the counters).
The times come from a transformers TrainerCallback (on_train_begin / on_step_end / on_log), which TRL's,
Unsloth's and ahazero's trainers all call. A worker writes its record after every step, so a backend
stopped by --timeout still reports the steps it finished. Memory outside PyTorch's allocator is not counted
(bitsandbytes' *paged* optimizer state lives in CUDA managed memory: 2 bytes for each of the 37M LoRA
parameters at r=32, about 75 MB).

Backends:
  ahazero   FastLanguageModel.from_pretrained(load_in_4bit=True, fast_inference=True: its engine does the
            rollouts) + get_peft_model(use_gradient_checkpointing="unsloth") + ahazero's GRPOTrainer
  unsloth   `from unsloth import FastLanguageModel, PatchFastRL` first; from_pretrained(load_in_4bit=True,
            fast_inference=False) + get_peft_model(use_gradient_checkpointing="unsloth") + the GRPOTrainer /
            GRPOConfig that `trl` exports after Unsloth patched it, use_vllm=False: Unsloth generates with
            transformers' generate (how it runs without vLLM). Its GPU path is UNTESTED where this was written
            (no GPU); only Unsloth's CPU fallback ran here (16 bit, TRL's trainer left unpatched).
  trl       plain TRL GRPOTrainer (optional): transformers from_pretrained with BitsAndBytesConfig (NF4, double
            quantisation, bf16 compute), PEFT LoRA, use_vllm=False. UNTESTED with 4 bit (no bitsandbytes here).
Peers are imported from --peer-path (a folder of unpacked wheels, put first on the peer worker's PYTHONPATH);
the ahazero worker appends it to the end of sys.path instead, so it takes from it only what its environment
lacks (the GPU image has no `datasets`, which ahazero needs: pass --peer-path for ahazero too) and none of
the peers' packages shadow its own. Workers run with HF_HUB_OFFLINE=1 and UNSLOTH_DISABLE_STATISTICS=1, in
--workdir (Unsloth writes its compiled cache into the working directory; the checkpoint there takes 3 GiB).

Run on the GPU machine from the repository root (one command per call; each backend's subprocess must end
within --timeout, the default 240 s, so two backends stay within a 10-minute command):
  python bench/grpo_step.py --backends ahazero,unsloth --peer-path .whl/site --out $OUT/grpo_step.jsonl
  python bench/grpo_step.py --backends ahazero,unsloth --peer-path .whl/site --no-4bit --out $OUT/grpo_step.jsonl   # optional: 16 bit
The 8 x 1024 variant (Unsloth measured 88 s for one such step: give it its own command, fewer steps):
  python bench/grpo_step.py --backends ahazero --generations 8 --completion-len 1024 --peer-path .whl/site --out $OUT/grpo_step.jsonl
  python bench/grpo_step.py --backends unsloth --generations 8 --completion-len 1024 --steps 3 --timeout 500 --peer-path .whl/site --out $OUT/grpo_step.jsonl
Plain TRL with bitsandbytes 4-bit (optional):
  python bench/grpo_step.py --backends trl --peer-path .whl/site --out $OUT/grpo_step.jsonl
A markdown table comes last on stdout; one JSON line per backend is appended to --out. A backend that is not
importable, runs out of memory, fails or times out is a row with its error, never a crash.
`--smoke` runs a shrunken model (2 layers, hidden 64, the real vocabulary) on the CPU with few tokens for every
importable backend, peak RSS instead of GPU memory: it checks the script, not the numbers. On this CPU
machine: `python bench/grpo_step.py --smoke` (add `--backends ahazero,trl --no-4bit --optim adamw_torch` for
TRL's path without bitsandbytes).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from memory import (ASSETS, GIB, ROOT, SYSTEM_PROMPT, TARGETS, TOKENIZER, Meter,  # noqa: E402
                    append_jsonl, importable, peak_composition, save_random_model)

BACKENDS = ("ahazero", "unsloth", "trl")
PEERS = ("unsloth", "trl")
SMOKE_DEFAULTS = dict(generations=4, completion_len=16, steps=3)
LORA_SEED = 3407  # Unsloth's get_peft_model default, the notebook's random_state
TRAIN_SEED = 3407  # Unsloth's GRPOConfig default; passed to every backend


# --- the workload, the same for every backend ------------------------------------------------------

def prompt_rows(args) -> tuple[list[dict], int]:
    """GSM8K questions as the notebook's chat prompts, those whose templated prompt fits max_prompt_length
    (so no backend truncates), one per step plus spare; and the longest prompt's token count."""
    from transformers import AutoTokenizer
    tok = AutoTokenizer.from_pretrained(TOKENIZER)
    rows, longest = [], 0
    for line in (ASSETS / "gsm8k" / "train.jsonl").read_text().splitlines():
        messages = [{"role": "system", "content": SYSTEM_PROMPT},
                    {"role": "user", "content": json.loads(line)["question"]}]
        text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        n = len(tok(text, add_special_tokens=False)["input_ids"])
        if n <= args.max_prompt_length:
            rows.append({"prompt": messages})
            longest = max(longest, n)
        if len(rows) >= args.steps + 4:
            break
    if not rows:
        raise ValueError(f"no GSM8K prompt fits max_prompt_length={args.max_prompt_length}")
    return rows, longest


def notebook_config(args, output_dir: str) -> dict:
    """The seed notebook's GRPOConfig values (tests/assets/seed_notebook.py, --gpu sizes), by TRL's names."""
    G = args.generations
    return dict(output_dir=output_dir, learning_rate=5e-6, adam_beta1=0.9, adam_beta2=0.99, weight_decay=0.1,
                lr_scheduler_type="cosine", optim=args.optim, logging_steps=1, per_device_train_batch_size=G,
                gradient_accumulation_steps=1, num_generations=G, max_completion_length=args.completion_len,
                max_steps=args.steps, max_grad_norm=0.1, report_to="none", beta=args.beta, temperature=1.0,
                seed=TRAIN_SEED, shuffle_dataset=False, disable_tqdm=True)


def length_reward(lengths: list[int]):
    """The reward: characters / 1000 (differs within a group of random completions). It also records the
    completions' token counts, from the completion ids the trainers pass to reward functions."""
    def text_length_reward(completions, completion_ids=None, **kwargs):
        if completion_ids is not None:
            lengths.extend(len(ids) for ids in completion_ids)
        texts = [c[0]["content"] if isinstance(c, list) else c for c in completions]
        return [len(t) / 1000.0 for t in texts]
    return text_length_reward


# --- measuring ---------------------------------------------------------------------------------------

class Run:
    """One backend's measurement: the record it writes (after every step, so a timeout keeps the steps
    done), the memory meter, and the step clock the trainer calls."""

    def __init__(self, args, device):
        import torch
        self.args, self.device, self.torch = args, device, torch
        self.cuda = device.type == "cuda"
        self.meter = Meter(device)
        self.lengths: list[int] = []
        self.reward = length_reward(self.lengths)
        self.carried_peak = 0.0  # the peak reached before a backend's own reset_peak_memory_stats
        self.peak_resets = 0
        self.record = dict(backend=args.worker, model=args.model + ("-smoke" if args.smoke else ""),
                           generations=args.generations, completion_len=args.completion_len,
                           max_prompt_length=args.max_prompt_length, lora_rank=args.lora_rank,
                           load_in_4bit=args.load_in_4bit, optim=args.optim, beta=args.beta, steps=args.steps,
                           device=torch.cuda.get_device_name() if self.cuda else "cpu",
                           memory="max_memory_allocated" if self.cuda else "peak RSS (VmHWM)",
                           torch=torch.__version__, status="loading")
        self.clock = None  # made once the model is loaded: it imports transformers, which must come after unsloth
        self.t_load = time.perf_counter()

    def loaded(self) -> None:
        """The model and its adapters are in place: weights measured, the peak counter reset for the run."""
        self.meter.sync()
        self.record.update(load_s=time.perf_counter() - self.t_load, weights_gib=self.meter.current(),
                           load_peak_gib=self.meter.peak(), status="training")
        self.meter.reset()
        if self.cuda:
            self._keep_peak_across_resets()
        self.clock = make_step_clock(self)
        self.write()

    def _keep_peak_across_resets(self) -> None:
        torch, run = self.torch, self
        original = torch.cuda.reset_peak_memory_stats

        def reset_peak_memory_stats(device=None):
            run.carried_peak = max(run.carried_peak, torch.cuda.max_memory_allocated(device) / GIB)
            run.peak_resets += 1
            return original(device)

        torch.cuda.reset_peak_memory_stats = reset_peak_memory_stats

    def train(self, trainer) -> None:
        recording = self.args.snapshot is not None and self.cuda
        if recording:  # the whole run's allocation history (slows it: its times are not comparable)
            self.torch.cuda.memory._record_memory_history(max_entries=2_000_000)
        t0 = time.perf_counter()
        trainer.train()
        self.meter.sync()
        self.record["train_s"] = time.perf_counter() - t0
        if recording:
            path = Path(self.args.snapshot) / f"{self.args.worker}.peak.txt"
            path.write_text(peak_composition(self.torch.cuda.memory._snapshot()))
            self.torch.cuda.memory._record_memory_history(enabled=None)
            self.record["snapshot"] = str(path)
        self.update()
        self.record["status"] = "ok"

    def update(self) -> None:
        """Step times, memory and completion lengths so far."""
        c, r = self.clock, self.record
        if c is None:  # still loading
            r["load_peak_gib"] = self.meter.peak()
            return
        peak = self.meter.peak()
        if peak is not None:
            r["peak_gib"] = max(peak, self.carried_peak)
            if r.get("weights_gib") is not None:
                r["above_weights_gib"] = r["peak_gib"] - r["weights_gib"]
        if self.cuda:
            r["graph_pool_gib"] = self.meter.pool_gib  # counted in peak_gib, not in the trainer's peak_after_*
            r["graph_pool_live_gib"] = self.meter.pool_live_gib  # of which live: counted once in peak_gib
            r["peak_phase"] = self.meter.peak_phase  # the steps between the captures around the peak
            r["peak_reserved_gib"] = self.meter.peak_reserved()
            r["peak_resets_by_backend"] = self.peak_resets
        ends = c.ends
        if ends and c.begin is not None:
            steps = [ends[0] - c.begin] + [b - a for a, b in zip(ends, ends[1:])]
            r.update(steps_done=len(steps), step_s=steps, first_step_s=steps[0],
                     steady_step_s=statistics.median(steps[1:]) if len(steps) > 1 else None)
        if self.lengths:
            r.update(mean_completion_tokens=sum(self.lengths) / len(self.lengths),
                     min_completion_tokens=min(self.lengths), max_completion_tokens=max(self.lengths),
                     completions=len(self.lengths))
        for key in ("timing/rollout_s", "timing/update_s", "memory/peak_after_rollout_gib",
                    "memory/peak_after_update_gib"):  # ahazero's split of each step
            split = [log[key] for log in c.logs if key in log]
            if split:
                r[key.split("/")[1]] = split
        logged = [log["completions/mean_length"] for log in c.logs if "completions/mean_length" in log]
        if logged:
            r["logged_mean_length"] = sum(logged) / len(logged)

    def write(self) -> None:
        tmp = Path(self.args.result + ".tmp")
        tmp.write_text(json.dumps(self.record))
        tmp.replace(self.args.result)


def make_step_clock(run: Run):
    """A transformers TrainerCallback (the class TRL's trainer needs; ahazero's calls the same methods)."""
    from transformers import TrainerCallback

    class StepClock(TrainerCallback):
        def __init__(self):
            self.begin, self.ends, self.logs = None, [], []

        def on_train_begin(self, args, state, control, **kwargs):
            run.meter.phase = "step 1"
            run.meter.sync()
            self.begin = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            run.meter.sync()
            self.ends.append(time.perf_counter())
            run.meter.phase = f"step {len(self.ends) + 1}"
            run.update()
            run.write()

        def on_log(self, args, state, control, logs=None, **kwargs):
            if logs:
                self.logs.append({k: v for k, v in logs.items() if isinstance(v, (int, float))})

        def on_save(self, args, state, control, **kwargs):  # does writing a checkpoint raise the peak?
            run.record.setdefault("peak_after_save_gib", []).append(run.meter.peak())

    return StepClock()


# --- backends ----------------------------------------------------------------------------------------

def max_seq_length(args) -> int:
    return args.max_seq_length or max(512, args.max_prompt_length + args.completion_len)


def run_ahazero(args, run: Run, folder: Path) -> None:
    sys.path.insert(0, str(ROOT / "src"))
    from ahazero import FastLanguageModel, GRPOConfig, GRPOTrainer
    if args.tile_tokens:
        from ahazero.models import tiled_mlp
        tiled_mlp.TILE_TOKENS = args.tile_tokens
        run.record["tile_tokens"] = args.tile_tokens
    model, tok = FastLanguageModel.from_pretrained(
        model_name=str(folder), max_seq_length=max_seq_length(args), load_in_4bit=args.load_in_4bit,
        fast_inference=True, max_lora_rank=args.lora_rank, gpu_memory_utilization=args.gpu_memory_utilization,
        device_map="cpu" if args.smoke else None)
    model = FastLanguageModel.get_peft_model(model, r=args.lora_rank, target_modules=TARGETS, lora_alpha=args.lora_rank,
                                             use_gradient_checkpointing="unsloth", random_state=LORA_SEED)
    run.loaded()
    rows, longest = prompt_rows(args)
    config = GRPOConfig(**notebook_config(args, fresh_output_dir("ahazero-out")), use_vllm=True, warmup_ratio=0.1,
                        max_prompt_length=args.max_prompt_length, bf16=run.cuda, save_steps=args.steps,
                        lora_autocast=args.lora_autocast)
    trainer = GRPOTrainer(model=model, processing_class=tok, reward_funcs=[run.reward], args=config,
                          train_dataset=rows, callbacks=[run.clock])
    run.record.update(prompt_tokens_max=longest, **ahazero_details(model, trainer))
    run.train(trainer)
    run.record.update(ahazero_details(model, trainer))  # the KV cache exists once a rollout ran


def ahazero_details(model, trainer) -> dict:
    """Which rollout backend the trainer got (the engine, or transformers' generate as a fallback), the
    engine's KV-cache size, and how many linear layers load_in_4bit kept in 16 bit."""
    gen = trainer.generator
    out = dict(rollout_backend=type(gen).__name__, version=f"ahazero {_version('ahazero')}")
    runner = getattr(gen, "runner", None)
    if runner is not None:  # the cache may be released between calls (EngineConfig.release_kv): its size
        slots = runner.allocated_slots
        out["kv_cache_gib"] = slots * runner.kv_shape.slot_bytes(runner.config.max_seq_length, runner.config.dtype) / GIB
        out["kv_slots"] = slots
        out["kv_moves"] = runner.kv_moves
    report = getattr(model, "ahazero_quantization", None)
    if report is not None:
        out["nf4_kept_16bit"] = len(report.kept_16bit)
    return out


def run_unsloth(args, run: Run, folder: Path) -> None:
    """Unsloth as its GRPO notebooks run it, without vLLM. UNTESTED on a GPU (see the module docstring)."""
    import torch
    import unsloth  # before trl / transformers / peft
    from unsloth import FastLanguageModel
    try:  # the notebook's call; recent Unsloth patches TRL on import already (then this only says so)
        from unsloth import PatchFastRL
        PatchFastRL("GRPO", FastLanguageModel)
    except ImportError:  # Unsloth's CPU build does not export it
        pass
    model, tok = FastLanguageModel.from_pretrained(
        model_name=str(folder), max_seq_length=max_seq_length(args), load_in_4bit=args.load_in_4bit,
        fast_inference=False, max_lora_rank=args.lora_rank, dtype=None if run.cuda else torch.float32)
    model = FastLanguageModel.get_peft_model(model, r=args.lora_rank, target_modules=TARGETS, lora_alpha=args.lora_rank,
                                             use_gradient_checkpointing="unsloth", random_state=LORA_SEED)
    run.loaded()
    from trl import GRPOConfig, GRPOTrainer  # Unsloth's patched classes once unsloth is imported
    run.record.update(version=f"unsloth {getattr(unsloth, '__version__', '?')}, trl {_version('trl')}",
                      trainer_class=GRPOTrainer.__name__)
    train_with_trl(args, run, model, tok, GRPOConfig, GRPOTrainer)


def run_trl(args, run: Run, folder: Path) -> None:
    """Plain TRL: transformers + bitsandbytes NF4 (double quantisation, bf16 compute) + PEFT LoRA."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer
    dtype = torch.bfloat16 if run.cuda else torch.float32
    kwargs = dict(dtype=dtype, device_map={"": run.device.index or 0} if run.cuda else {"": "cpu"})
    if args.load_in_4bit:
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                                           bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(str(folder), **kwargs)
    tok = AutoTokenizer.from_pretrained(str(folder))
    torch.manual_seed(LORA_SEED)
    model = get_peft_model(model, LoraConfig(r=args.lora_rank, lora_alpha=args.lora_rank, target_modules=TARGETS,
                                             lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
    run.loaded()
    import trl
    run.record.update(version=f"trl {trl.__version__}, bitsandbytes {_version('bitsandbytes')}")
    train_with_trl(args, run, model, tok, trl.GRPOConfig, trl.GRPOTrainer, gradient_checkpointing=True)


def train_with_trl(args, run: Run, model, tok, config_cls, trainer_cls, **extra) -> None:
    """TRL's GRPOTrainer (or Unsloth's patched one) on the notebook's config, generating with transformers."""
    from datasets import Dataset
    rows, longest = prompt_rows(args)
    config = config_cls(**trl_config_values(args, run, config_cls), **extra)
    trainer = trainer_cls(model=model, processing_class=tok, reward_funcs=[run.reward], args=config,
                          train_dataset=Dataset.from_list(rows), callbacks=[run.clock])
    a = trainer.args  # as the trainer (or Unsloth's patches) left it
    run.record.update(prompt_tokens_max=longest, settings=(
        f"per_device_train_batch_size={a.per_device_train_batch_size}, gradient_accumulation_steps="
        f"{a.gradient_accumulation_steps}, steps_per_generation={getattr(a, 'steps_per_generation', None)}, "
        f"gradient_checkpointing={a.gradient_checkpointing}, optim={getattr(a.optim, 'value', a.optim)}, "
        f"use_vllm={a.use_vllm}"))
    run.train(trainer)


def trl_config_values(args, run: Run, config_cls) -> dict:
    """The notebook's values by the names this TRL (and transformers) version has: max_prompt_length went
    in TRL 0.28 (the prompts fit anyway), warmup_ratio in transformers 5 (warmup_steps < 1 is a ratio)."""
    names = {f.name for f in dataclasses.fields(config_cls)}
    values = dict(notebook_config(args, fresh_output_dir(f"{args.worker}-out")), use_vllm=False, save_strategy="no",
                  bf16=run.cuda)
    if not run.cuda:
        values["use_cpu"] = True
    if "max_prompt_length" in names:
        values["max_prompt_length"] = args.max_prompt_length
    values["warmup_ratio" if "warmup_ratio" in names else "warmup_steps"] = 0.1
    return values


def fresh_output_dir(name: str) -> str:
    """The trainer's output_dir in the working directory (--workdir), emptied of an earlier run's files."""
    import shutil
    shutil.rmtree(name, ignore_errors=True)
    return name


def _version(package: str) -> str:
    from importlib.metadata import PackageNotFoundError, version
    try:
        return version(package)
    except PackageNotFoundError:
        return "?"


RUNNERS = {"ahazero": run_ahazero, "unsloth": run_unsloth, "trl": run_trl}


# --- worker --------------------------------------------------------------------------------------------

def worker(args) -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never wait on the network
    os.environ.setdefault("UNSLOTH_DISABLE_STATISTICS", "1")
    if args.worker not in PEERS and args.peer_path:  # last on sys.path: only what this environment lacks
        sys.path.append(str(Path(args.peer_path).resolve()))  # (the GPU image has no `datasets`, which ahazero needs)
    import torch
    device = torch.device("cpu" if args.smoke or not torch.cuda.is_available() else "cuda")
    if args.log_compiles:
        import compile_log  # bench/ is this script's folder
        compile_log.install()
    if device.type == "cpu":
        torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    run = Run(args, device)
    try:
        RUNNERS[args.worker](args, run, checkpoint_folder(args))
    except torch.cuda.OutOfMemoryError as e:
        run.update()
        run.record.update(status="oom", error=str(e).splitlines()[0][:300])
    except Exception as e:  # noqa: BLE001  (a failing backend is a row of the table)
        traceback.print_exc()
        run.update()
        run.record.update(status="error", error=f"{type(e).__name__}: {e}".splitlines()[0][:300])
    run.write()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # do not wait on a peer's background threads at exit


def checkpoint_folder(args) -> Path:
    """Where --prepare wrote the random-weight checkpoint (memory.py's writer and folder name)."""
    return Path(args.workdir).resolve() / f"random-{args.model}{'-smoke' if args.smoke else ''}"


def prepare(args) -> None:
    """Writes the checkpoint once (reused by later runs); a folder left half-written is written again."""
    folder = checkpoint_folder(args)
    if (folder / "config.json").is_file() and not any(folder.glob("*.safetensors")):
        import shutil
        shutil.rmtree(folder)
    save_random_model(args)
    print(f"[prepare] checkpoint at {folder}", flush=True)


# --- parent --------------------------------------------------------------------------------------------

def worker_argv(args) -> list[str]:
    argv = ["--model", args.model, "--generations", str(args.generations), "--completion-len", str(args.completion_len),
            "--max-prompt-length", str(args.max_prompt_length), "--max-seq-length", str(args.max_seq_length or 0),
            "--steps", str(args.steps), "--lora-rank", str(args.lora_rank), "--beta", str(args.beta),
            "--optim", args.optim, "--gpu-memory-utilization", str(args.gpu_memory_utilization),
            "--workdir", args.workdir]
    return (argv + (["--no-4bit"] if not args.load_in_4bit else []) + (["--smoke"] if args.smoke else [])
            + (["--lora-autocast"] if args.lora_autocast else [])
            + (["--snapshot", str(Path(args.snapshot).resolve())] if args.snapshot else [])
            + (["--tile-tokens", str(args.tile_tokens)] if args.tile_tokens else [])
            + (["--log-compiles"] if args.log_compiles else [])
            + (["--peer-path", str(Path(args.peer_path).resolve())] if args.peer_path else []))


def backend_env(backend: str, args) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", UNSLOTH_DISABLE_STATISTICS="1", PYTHONUNBUFFERED="1")
    if backend in PEERS and args.peer_path:
        env["PYTHONPATH"] = os.pathsep.join([str(Path(args.peer_path).resolve())]
                                            + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def run_subprocess(cmd: list[str], env: dict, cwd: str, timeout: float) -> str | None:
    """None if it finished in time, else why not; the whole process group is killed on timeout."""
    proc = subprocess.Popen(cmd, env=env, cwd=cwd, start_new_session=True)
    try:
        rc = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return f"timeout after {timeout:.0f} s"
    return None if rc == 0 else f"exit status {rc}"


def run_backend(backend: str, args) -> dict:
    base = dict(backend=backend, model=args.model + ("-smoke" if args.smoke else ""), generations=args.generations,
                completion_len=args.completion_len, load_in_4bit=args.load_in_4bit, optim=args.optim, beta=args.beta,
                steps=args.steps, lora_rank=args.lora_rank)
    env = backend_env(backend, args)
    reason = importable(backend, env)
    if reason:
        print(f"[{backend}] skipped: {reason}", flush=True)
        return dict(base, status="skipped", error=reason + (" (pass --peer-path)" if not args.peer_path else ""))
    result = Path(tempfile.mkstemp(suffix=f"-{backend}.json", dir=args.workdir)[1])
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", backend, "--result", str(result),
           *worker_argv(args)]
    print(f"[{backend}] running: {' '.join(cmd[2:])}", flush=True)
    t0 = time.perf_counter()
    failure = run_subprocess(cmd, env, args.workdir, args.timeout)
    text = result.read_text() if result.is_file() else ""
    result.unlink(missing_ok=True)
    record = json.loads(text) if text else dict(base)
    if failure and record.get("status") in (None, "loading", "training"):  # killed or crashed mid-run
        done = record.get("steps_done", 0)
        record.update(status="timeout" if failure.startswith("timeout") else "crashed",
                      error=f"{failure} ({done} of {args.steps} steps done)")
    record["process_s"] = time.perf_counter() - t0
    print(f"[{backend}] {json.dumps(record)}", flush=True)
    return record


def parent(args) -> None:
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    unknown = [b for b in backends if b not in BACKENDS]
    if unknown:
        raise SystemExit(f"unknown backend(s) {unknown}; choose from {', '.join(BACKENDS)}")
    Path(args.workdir).mkdir(parents=True, exist_ok=True)
    if args.snapshot:
        Path(args.snapshot).mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, str(Path(__file__).resolve()), "--prepare"] + worker_argv(args)
    failure = run_subprocess(cmd, backend_env("ahazero", args), args.workdir, args.timeout)
    if failure:
        raise SystemExit(f"writing the random-weight checkpoint failed: {failure}")
    records = [run_backend(b, args) for b in backends]
    if args.out:
        append_jsonl(args.out, records)
    print()
    print(table(records, args))


def table(records: list[dict], args) -> str:
    def num(v, fmt="{:.2f}"):
        return "n/a" if v is None else fmt.format(v)
    device = next((r["device"] for r in records if "device" in r), "?")
    unit = "GiB (peak RSS)" if device == "cpu" else "GiB"
    lines = [f"{args.model}{'-smoke' if args.smoke else ''}, {'4-bit NF4' if args.load_in_4bit else '16-bit'}, "
             f"{args.generations} x {args.completion_len} completion tokens (at most), LoRA r={args.lora_rank}, "
             f"optim {args.optim}, beta {args.beta}, {args.steps} steps, on {device}",
             "",
             f"| backend | weights {unit} | peak {unit} (whole run) | first step s | steady step s (median) "
             "| mean completion tokens | status |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in records:
        status = r.get("status", "?") + (f": {r['error']}" if r.get("error") else "")
        steady = num(r.get("steady_step_s"))
        if r.get("steps_done", 0) > 1:
            steady += f" (of {r['steps_done'] - 1})"
        lines.append(f"| {r['backend']} | {num(r.get('weights_gib'))} | {num(r.get('peak_gib'))} "
                     f"| {num(r.get('first_step_s'))} | {steady} | {num(r.get('mean_completion_tokens'), '{:.1f}')} "
                     f"| {status.replace('|', '/')} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--backends", default="ahazero,unsloth", help=f"comma-separated, of {', '.join(BACKENDS)}")
    p.add_argument("--model", default="qwen2.5-1.5b", help="a config name in tests/assets/configs")
    p.add_argument("--generations", type=int, default=6, help="num_generations = per_device_train_batch_size")
    p.add_argument("--completion-len", type=int, default=200, help="max_completion_length")
    p.add_argument("--max-prompt-length", type=int, default=256)
    p.add_argument("--max-seq-length", type=int, default=0,
                   help="from_pretrained's max_seq_length (0: max(512, max prompt + completion length))")
    p.add_argument("--steps", type=int, default=5, help="optimizer steps (the first is reported apart)")
    p.add_argument("--lora-rank", type=int, default=32)
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (TRL's default 0)")
    p.add_argument("--optim", default="paged_adamw_8bit")
    p.add_argument("--lora-autocast", action="store_true", help="GRPOConfig.lora_autocast for ahazero")
    p.add_argument("--no-4bit", dest="load_in_4bit", action="store_false", help="16-bit base weights")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.6,
                   help="ahazero's from_pretrained (the notebook's 0.6): bounds its engine's KV cache")
    p.add_argument("--peer-path", default=None, help="folder of unpacked peer wheels, first on the peers' PYTHONPATH")
    p.add_argument("--timeout", type=float, default=240, help="seconds per backend subprocess")
    p.add_argument("--out", default=None, help="JSONL file to append one line per backend to")
    p.add_argument("--tile-tokens", type=int, default=0, help="ahazero's MLP token tile (models/tiled_mlp.py "
                   "TILE_TOKENS; 0: its default)")
    p.add_argument("--snapshot", default=None, help="folder for each backend's <backend>.peak.txt: what is "
                   "allocated at the run's peak, by allocation site (records the whole run, which slows it)")
    p.add_argument("--workdir", default=str(Path(tempfile.gettempdir()) / "ahazero-bench-grpo-step"))
    p.add_argument("--log-compiles", action="store_true", help="each Triton compile of a backend's process on its "
                   "stderr: kernel, seconds, the frames that launched it (bench/compile_log.py)")
    p.add_argument("--smoke", action="store_true", help="tiny model on the CPU: checks the script")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    p.add_argument("--result", default=None, help=argparse.SUPPRESS)
    p.add_argument("--prepare", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    given = argv if argv is not None else sys.argv[1:]
    if args.smoke:
        for key, value in SMOKE_DEFAULTS.items():
            if "--" + key.replace("_", "-") not in given:
                setattr(args, key, value)
    if args.steps < 1:
        p.error("--steps must be >= 1")
    args.workdir = str(Path(args.workdir).resolve())  # workers run inside it
    if args.prepare:
        prepare(args)
    elif args.worker:
        worker(args)
    else:
        parent(args)


if __name__ == "__main__":
    main()
