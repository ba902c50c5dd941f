"""Rollout throughput (issue 4): ahazero's engine vs transformers' generate, beside the memory roofline.

Workloads (random bf16 weights of a real shape, the real Qwen2.5 tokenizer, LoRA r=32 on all linear
layers, active; EOS ignored so every completion has the full length):
  W1  16 GSM8K prompts x 8 completions x 512 new tokens   (a GRPO step's rollouts)
  W2   1 prompt x 6 completions x 200 new tokens          (the seed notebook's sizes; target < 0.3 s)

Backends, each timed on its second call (the first compiles / captures), in one process, one after the
other, with the peak memory of each:
  ahazero          the engine as users get it: CUDA graphs over batch buckets, the Triton LoRA,
                   decode-attention and fused kernels (add+RMSNorm, RoPE+KV write, SiLU*up in one launch
                   each) on CUDA, no torch.compile
  ahazero-cublas   as `ahazero` with cuBLAS per projection + the LoRA expand kernel instead of
                   engine/gemv_kernels.py (the default before 2026-11-27, sixth session); with --load-in-4bit,
                   the NF4 kernel per projection instead of one NF4 launch per group (before the seventh)
  ahazero-pairs    as `ahazero` with the NF4 kernel looking each byte up in a [256, 2] pair table (one 8-byte
                   load) instead of the [16] code (two 4-byte loads: the default since 2026-11-27, seventh
                   session); 4-bit only
  ahazero-gemv-all as `ahazero` with engine/gemv_kernels.py serving every decode batch (MAX_ROWS 512)
  ahazero-ieee     as `ahazero` with the LoRA kernels' float32 dots as IEEE FMAs on the CUDA cores instead of
                   three TF32 products on the tensor cores (lora_kernels.DOT_PRECISION "ieee", the default
                   before 2026-11-27, sixth session)
  ahazero-torch-sampler  as `ahazero` with the torch sampler (about ten ops over [B, V]) instead of
                   engine/sample_kernels.py
  ahazero-unfused  as `ahazero` without the fused kernels (the default before 2026-11-27, second session)
  ahazero-compile  as `ahazero-unfused`, plus torch.compile of the decoder layer (compiling the whole decode
                   step took > 190 s on its first call on an H100; the layer: 15 s, 2026-11-27)
  ahazero-graphs   CUDA graphs, SDPA attention and LoRA through torch (no Triton kernels)
  ahazero-lora     as `ahazero-graphs`, LoRA through the grouped Triton kernels
  ahazero-attn     as `ahazero-graphs`, decode attention through our split-KV Triton kernel
  ahazero-eager    the engine, no graphs, no compile, no Triton kernels
  hf               transformers generate, default (dynamic) cache
  hf-static        transformers generate, cache_implementation="static" (compiled)
  profile          (not a timing) torch.profiler's table of the engine's eager decode kernels, with the
                   GPU's busy time per step against the wall time
  profile-graphs   the same for the graphs of `ahazero` (what their replays launch)
The roofline is (weight bytes + KV bytes read per decode step) / device-to-device copy bandwidth
((bytes read + bytes written) / time of a 2 GiB copy), summed over the decode steps.

Run on a GPU machine, from the repository root:
  python bench/rollout.py --workload W1 --model qwen2.5-1.5b --backends ahazero,ahazero-unfused,ahazero-graphs,hf-static,hf
  python bench/rollout.py --workload W2 --model qwen2.5-1.5b --backends ahazero,ahazero-unfused,ahazero-graphs,hf-static,hf
  python bench/rollout.py --workload W1 --model qwen2.5-1.5b --backends ahazero-lora,ahazero-attn,ahazero-graphs
  python bench/rollout.py --workload W1 --model llama-3.1-8b --backends ahazero,hf-static
  python bench/rollout.py --workload W1 --prompts 4 --load-in-4bit --backends ahazero   (issue 6: 4-bit at batch 32)
Each run prints a markdown table and appends one JSON line per backend to --out (on the device machine,
pass --out $OUT/rollout.jsonl so the lines come back). `--smoke` runs a shrunken model on the CPU with
few tokens: it checks the script, not the speed. An engine row's seconds are the median of `--repeats` calls (3)
after a warm-up call; the transformers rows time one call after theirs.
A/B of one module constant in one process (single runs of W2 moved by 5-10% between processes, more than the
effects weighed in the nineteenth session), alternating the values --rounds times:
  python bench/rollout.py --workload W2 --ab "ahazero.engine.gemv_kernels.MIN_K_PER_SPLIT=256|1024" --rounds 3
What the decode step's small launches cost (timing only, wrong tokens: bench/launch_skips.py):
  python bench/rollout.py --workload W2 --launch-skips --ab "launch_skips.SKIP=none|norm|rope|attn|silu|all" --rounds 2
The Llama shape has a smaller vocabulary than the Qwen tokenizer: prompt ids are taken modulo it.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
ASSETS = ROOT / "tests" / "assets"
sys.path.insert(0, str(ROOT / "src"))

WORKLOADS = {"W1": dict(prompts=16, n=8, new_tokens=512), "W2": dict(prompts=1, n=6, new_tokens=200)}
SMOKE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=16)
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
REPEATS = 3  # timed engine calls after the warm-up (--repeats)
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
SYSTEM_PROMPT = "\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n"


def build_model(name: str, lora_rank: int, smoke: bool = False, load_in_4bit: bool = False):
    """Random bf16 weights of the named shape on the GPU, with a PEFT LoRA adapter on every linear layer;
    with `load_in_4bit`, the linear layers quantised to NF4 first (ahazero's dynamic 4-bit)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoConfig, AutoModelForCausalLM
    cfg = json.loads((ASSETS / "configs" / f"{name}.json").read_text())
    cfg.pop("torch_dtype", None)
    cfg.update(SMOKE if smoke else {})
    config = AutoConfig.for_model(**cfg)
    torch.manual_seed(0)
    with DEVICE:
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16 if not smoke else torch.float32)
    if load_in_4bit:
        from ahazero.models.linear4bit import quantize_model
        quantize_model(model)
    lora = LoraConfig(r=lora_rank, lora_alpha=lora_rank, target_modules=TARGETS, lora_dropout=0.0,
                      init_lora_weights=False)
    return get_peft_model(model, lora).eval()


def tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(ASSETS / "qwen2.5-tokenizer")


def gsm8k_prompts(tok, count: int, vocab_size: int) -> list[list[int]]:
    rows = [json.loads(line) for line in (ASSETS / "gsm8k" / "train.jsonl").read_text().splitlines()[:count]]
    prompts = []
    for row in rows:
        messages = [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": row["question"]}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
        ids = ids["input_ids"] if isinstance(ids, dict) or hasattr(ids, "keys") else ids
        prompts.append([i % vocab_size for i in ids])
    return prompts


def copy_bandwidth(nbytes: int = 2 << 30, repeats: int = 20) -> float:
    """(bytes read + bytes written) per second of a device-to-device copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=DEVICE)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _, seconds = timed(lambda: [dst.copy_(src) for _ in range(repeats)])
    seconds /= repeats
    del src, dst
    return 2 * nbytes / seconds


def weight_bytes(model) -> int:
    """Bytes a decode step reads: every parameter (LoRA included, tied ones once) except an untied input
    embedding matrix, of which a step reads only B rows."""
    from ahazero.models.lora import decoder_and_head
    decoder, head = decoder_and_head(model)
    embed = decoder.embed_tokens.weight
    total = sum(p.numel() * p.element_size() for p in model.parameters())
    if embed is not head.weight:
        total -= embed.numel() * embed.element_size()
    return total


def roofline_tokens_per_s(model, prompts, n: int, new_tokens: int, bandwidth: float) -> float:
    cfg = model.config
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    kv_per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * head_dim * 2  # bf16
    weights, seconds = weight_bytes(model), 0.0
    for t in range(new_tokens):
        kv = sum(n * (len(p) + t) for p in prompts) * kv_per_token
        seconds += (weights + kv) / bandwidth
    return len(prompts) * n * new_tokens / seconds


def timed(fn):
    synchronize()
    start = time.perf_counter()
    result = fn()
    synchronize()
    return result, time.perf_counter() - start


def synchronize():
    if DEVICE.type == "cuda":
        torch.cuda.synchronize()


def peak_gib() -> float:
    return torch.cuda.max_memory_allocated() / 2**30 if DEVICE.type == "cuda" else 0.0


def run_engine(model, tok, prompts, wl, max_seq_length, **options) -> dict:
    from ahazero.engine.engine import create_generator
    from ahazero.engine.types import SamplingParams
    gen = create_generator(model, tok, max_seq_length=max_seq_length, **options)
    params = SamplingParams(temperature=1.0, max_tokens=wl["new_tokens"], n=wl["n"], ignore_eos=True, seed=0)
    _, first = timed(lambda: gen.generate(prompts, params))
    each = []
    for _ in range(REPEATS):  # the median of a few calls: one call of W2 moved by up to 10% from run to run
        outs, seconds = timed(lambda: gen.generate(prompts, params))
        each.append(seconds)
    assert all(len(c.token_ids) == wl["new_tokens"] for o in outs for c in o.outputs)
    from torch._dynamo.utils import counters
    result = dict(seconds=statistics.median(each), seconds_each=each, first_call_s=first,
                  slots=gen.runner.allocated_slots,
                  peak_gib=peak_gib(),
                  compiled_graphs=counters["stats"]["unique_graphs"],
                  cuda_graphs=len(gen.runner.graphs.graphs) if gen.runner.graphs else 0)
    del gen
    result["logp_diff"] = logp_diff(model, outs)
    return result


def logp_diff(model, outs, rows: int = 4) -> dict:
    """|engine log-prob - transformers forward log-prob| over a few completions (the trainer's quantity)."""
    diffs = []
    for out in outs[:rows]:
        c = out.outputs[0]
        ids = torch.tensor([out.prompt_token_ids + c.token_ids], device=DEVICE)
        with torch.no_grad():
            logits = model(ids).logits[0, len(out.prompt_token_ids) - 1:-1].float()  # [C, V]
        ref = torch.log_softmax(logits, -1).gather(-1, torch.tensor(c.token_ids, device=DEVICE)[:, None])
        diffs.append((ref.squeeze(-1).cpu() - torch.tensor(c.logprobs)).abs())
    d = torch.cat(diffs)
    return dict(mean=d.mean().item(), max=d.max().item())


def run_hf(model, tok, prompts, wl, static: bool) -> dict:
    """transformers generate on the same rows (each prompt n times, left-padded), sampling at T=1. The pad id
    is taken modulo the vocabulary as the prompt ids are (Qwen's 151,643 is past Llama's 128,256: an
    out-of-range embedding that surfaced as CUBLAS_STATUS_EXECUTION_FAILED, 2026-11-27, sixth session)."""
    pad = tok.pad_token_id % model.config.vocab_size
    width = max(len(p) for p in prompts)
    ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts], device=DEVICE)  # [P, T]
    starts = torch.tensor([width - len(p) for p in prompts], device=DEVICE)  # [P]
    mask = (torch.arange(width, device=DEVICE)[None] >= starts[:, None]).long()  # [P, T]
    kwargs = dict(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_k=0, top_p=1.0,
                  max_new_tokens=wl["new_tokens"], min_new_tokens=wl["new_tokens"],
                  num_return_sequences=wl["n"], pad_token_id=pad)
    if static:
        kwargs["cache_implementation"] = "static"
    with torch.no_grad():
        _, first = timed(lambda: model.generate(**kwargs))
        out, seconds = timed(lambda: model.generate(**kwargs))
    assert out.shape == (len(prompts) * wl["n"], width + wl["new_tokens"])
    return dict(seconds=seconds, first_call_s=first)


def run_profile(model, tok, prompts, wl, max_seq_length, steps: int = 32, **options) -> dict:
    """Not a timing: the GPU kernels of `steps` decode steps, heaviest first, and how busy the GPU was.
    Without options it profiles eager decode (each op a launch); with cuda_graphs=True, what the graphs
    replay. busy = union of kernel intervals; the rest of the wall time the GPU waited for the host."""
    from torch.profiler import ProfilerActivity, profile
    from ahazero.engine.engine import create_generator
    from ahazero.engine.types import SamplingParams
    options = dict(dict(cuda_graphs=False, compile=False), **options)  # the default kernels
    gen = create_generator(model, tok, max_seq_length=max_seq_length, **options)
    params = SamplingParams(temperature=1.0, max_tokens=steps, n=wl["n"], ignore_eos=True, seed=0)
    gen.generate(prompts, params)
    on_cuda = DEVICE.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        _, wall = timed(lambda: gen.generate(prompts, params))
    print(prof.key_averages().table(sort_by="cuda_time_total" if on_cuda else "cpu_time_total", row_limit=30))
    from memory import busy_and_gaps  # bench/memory.py, beside this script
    kernels = [(e.time_range.start, e.time_range.end) for e in prof.events()
               if e.device_type == torch.autograd.DeviceType.CUDA]
    busy = busy_and_gaps(kernels)[0]  # us: the union of the kernels' intervals
    result = dict(kernels_per_step=len(kernels) / steps, wall_ms_per_step=wall * 1e3 / steps,
                  gpu_busy_ms_per_step=busy / 1e3 / steps)
    print(json.dumps(result))
    return result


def parse_ab(spec: str) -> tuple[str, list[str]]:
    """"module.CONSTANT=A|B[|...]" -> ("module.CONSTANT", ["A", "B", ...]): the values --ab alternates."""
    target, sep, values = spec.partition("=")
    values = values.split("|")
    if not sep or len(values) < 2 or "" in values:
        raise SystemExit(f"--ab takes MODULE.CONSTANT=A|B[|...], got {spec!r}")
    return target, values


def run_ab(model, tok, prompts, wl, max_seq_length, target: str, values: list[str], rounds: int) -> list[dict]:
    """The `ahazero` backend under each value of the module constant `target` in turn (`parse_ab`), `rounds` times,
    in this one process (the same model, prompts and machine): per value its seconds each round, their median, and
    the median over rounds of its time / the first value's time in the same round (paired: a drift between rounds
    cancels). The constant is put back afterwards."""
    import importlib
    module, _, name = target.rpartition(".")
    module = importlib.import_module(module)
    original = getattr(module, name)
    each: dict[str, list[float]] = {v: [] for v in values}
    try:
        for _ in range(rounds):
            for v in values:
                set_constant(f"{target}={v}")
                each[v].append(run_engine(model, tok, prompts, wl, max_seq_length)["seconds"])
    finally:
        setattr(module, name, original)
    first = each[values[0]]
    return [dict(value=v, seconds=statistics.median(s), seconds_each_round=s,
                 paired_ratio=statistics.median(t / f for t, f in zip(s, first))) for v, s in each.items()]


def set_constant(setting: str) -> None:
    """"module.CONSTANT=value" (value a Python literal, or else a string) set before anything runs."""
    import ast
    import importlib
    target, _, text = setting.partition("=")
    module, _, name = target.rpartition(".")
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    mod = importlib.import_module(module)
    if not hasattr(mod, name):
        raise SystemExit(f"--set: {module} has no {name}")
    setattr(mod, name, value)


def patched(target: str, value, fn, *args):
    """fn(*args) with the module constant `target` (e.g. "ahazero.engine.gemv_kernels.MAX_ROWS") set to value."""
    from unittest import mock
    with mock.patch(target, value):
        return fn(*args)


TORCH_PATHS = dict(lora_kernels=False, attention="sdpa", compile=False)
BACKENDS = {
    "ahazero": lambda m, t, p, wl, L: run_engine(m, t, p, wl, L),
    "ahazero-cublas": lambda m, t, p, wl, L: run_engine(m, t, p, wl, L, gemv_kernels=False),
    "ahazero-gemv-all": lambda m, t, p, wl, L: patched("ahazero.engine.gemv_kernels.MAX_ROWS", 512, run_engine,
                                                       m, t, p, wl, L),
    "ahazero-ieee": lambda m, t, p, wl, L: patched("ahazero.engine.lora_kernels.DOT_PRECISION", "ieee", run_engine,
                                                   m, t, p, wl, L),
    "ahazero-pairs": lambda m, t, p, wl, L: patched("ahazero.models.nf4_kernels.LOOKUP", "pairs", run_engine,
                                                    m, t, p, wl, L),
    "ahazero-torch-sampler": lambda m, t, p, wl, L: run_engine(m, t, p, wl, L, sample_kernel=False),
    "ahazero-unfused": lambda m, t, p, wl, L: run_engine(m, t, p, wl, L, fused_kernels=False),
    "ahazero-compile": lambda m, t, p, wl, L: run_engine(m, t, p, wl, L, compile=True, fused_kernels=False),
    "ahazero-graphs": lambda m, t, p, wl, L: run_engine(m, t, p, wl, L, cuda_graphs=True, **TORCH_PATHS),
    "ahazero-lora": lambda m, t, p, wl, L: run_engine(m, t, p, wl, L, lora_kernels=True, attention="sdpa"),
    "ahazero-attn": lambda m, t, p, wl, L: run_engine(m, t, p, wl, L, lora_kernels=False, attention="triton",
                                                       fused_kernels=False),
    "ahazero-eager": lambda m, t, p, wl, L: run_engine(m, t, p, wl, L, cuda_graphs=False, **TORCH_PATHS),
    "hf": lambda m, t, p, wl, L: run_hf(m, t, p, wl, static=False),
    "hf-static": lambda m, t, p, wl, L: run_hf(m, t, p, wl, static=True),
    "profile": run_profile,
    "profile-graphs": lambda m, t, p, wl, L: run_profile(m, t, p, wl, L, cuda_graphs=True),
}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workload", choices=sorted(WORKLOADS), default="W1")
    ap.add_argument("--model", default="qwen2.5-1.5b", help="a config name in tests/assets/configs")
    ap.add_argument("--backends", default="ahazero,ahazero-graphs,hf-static,hf")
    ap.add_argument("--lora-rank", type=int, default=32)
    ap.add_argument("--out", default=str(ROOT / "bench" / "rollout_results.jsonl"))
    ap.add_argument("--prompts", type=int, help="override the workload's prompt count (batch = prompts x n)")
    ap.add_argument("--n", type=int, help="override the workload's completions per prompt")
    ap.add_argument("--load-in-4bit", action="store_true", help="NF4 base weights (issue 6)")
    ap.add_argument("--smoke", action="store_true", help="tiny model on the CPU, 8 new tokens")
    ap.add_argument("--repeats", type=int, default=3, help="timed calls of the engine after its warm-up call; "
                    "seconds is their median (seconds_each in the JSON)")
    ap.add_argument("--set", action="append", default=[], metavar="MODULE.CONSTANT=VALUE",
                    help="set a module constant for the whole run, e.g. ahazero.models.nf4_kernels.PREFETCH=2")
    ap.add_argument("--ab", metavar="MODULE.CONSTANT=A|B[|...]",
                    help="instead of --backends: the ahazero backend under each value of the constant in turn, "
                         "--rounds times in this process (each value's median, and its time against the first "
                         "value's in the same round)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds of --ab")
    ap.add_argument("--launch-skips", action="store_true", help="timing only, wrong tokens: the decode step without "
                    "the launches that bench/launch_skips.py's SKIP names (set it with --set or --ab)")
    args = ap.parse_args()
    ab = parse_ab(args.ab) if args.ab else None  # a malformed spec fails before the model is built
    global REPEATS
    REPEATS = max(1, args.repeats)
    for setting in args.set:
        set_constant(setting)
    if args.launch_skips:
        import launch_skips
        launch_skips.install()
    wl = dict(WORKLOADS[args.workload], **(dict(new_tokens=8) if args.smoke else {}))
    if args.prompts:
        wl["prompts"] = args.prompts
    if args.n:
        wl["n"] = args.n
    tok = tokenizer()
    model = build_model(args.model, args.lora_rank, smoke=args.smoke, load_in_4bit=args.load_in_4bit)
    prompts = gsm8k_prompts(tok, wl["prompts"], model.config.vocab_size)
    max_seq_length = -(-(max(len(p) for p in prompts) + wl["new_tokens"]) // 128) * 128
    bandwidth = copy_bandwidth(nbytes=(2 << 30) if not args.smoke else (64 << 20))
    tokens = wl["prompts"] * wl["n"] * wl["new_tokens"]
    roof = roofline_tokens_per_s(model, prompts, wl["n"], wl["new_tokens"], bandwidth)
    device = torch.cuda.get_device_name() if DEVICE.type == "cuda" else "cpu"
    print(f"{device}; {args.model} {args.workload}: {wl}; prompt lengths {min(map(len, prompts))}-"
          f"{max(map(len, prompts))}; copy bandwidth {bandwidth / 1e9:.0f} GB/s; roofline {roof:,.0f} tokens/s")
    run_info = dict(settings=args.set, workload=args.workload, model=args.model, device=device, tokens=tokens,
                    prompts=wl["prompts"], load_in_4bit=args.load_in_4bit, roofline_tokens_per_s=roof,
                    bandwidth_gbs=bandwidth / 1e9, torch=torch.__version__)  # in every JSON line
    if ab:
        target, values = ab
        rows = run_ab(model, tok, prompts, wl, max_seq_length, target, values, max(1, args.rounds))
        with open(args.out, "a") as f:
            for r in rows:
                f.write(json.dumps(dict(r, backend="ahazero", ab=target, **run_info)) + "\n")
        print(f"\n| {target} | tokens/s (median) | seconds each round | time against {rows[0]['value']}, paired |")
        print("| --- | --- | --- | --- |")
        for r in rows:
            each = ", ".join(f"{t:.3f}" for t in r["seconds_each_round"])
            print(f"| {r['value']} | {tokens / r['seconds']:,.0f} | {each} | {r['paired_ratio']:.3f} |")
        return
    rows = []
    for name in args.backends.split(","):
        gc.collect()
        if DEVICE.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        try:
            result = BACKENDS[name](model, tok, prompts, wl, max_seq_length)
        except Exception as err:  # noqa: BLE001 - report the failure, keep measuring the others
            result = dict(error=f"{type(err).__name__}: {err}")
        result.setdefault("peak_gib", peak_gib())
        result.update(backend=name, **run_info)
        if "seconds" in result:
            result["tokens_per_s"] = tokens / result["seconds"]
            result["roofline_fraction"] = result["tokens_per_s"] / roof
        rows.append(result)
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
        print(json.dumps(result), flush=True)
    print_table(rows)


def print_table(rows):
    print("\n| backend | tokens/s | seconds | first call s | % roofline | peak GiB | logp diff mean/max |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for r in rows:
        if "error" in r or "tokens_per_s" not in r:
            print(f"| {r['backend']} | {r.get('error', '')[:80]} | | | | {r['peak_gib']:.1f} | |")
            continue
        lp = r.get("logp_diff")
        lp = f"{lp['mean']:.1e} / {lp['max']:.1e}" if lp else ""
        print(f"| {r['backend']} | {r['tokens_per_s']:,.0f} | {r['seconds']:.3f} | {r['first_call_s']:.1f} | "
              f"{100 * r['roofline_fraction']:.0f}% | {r['peak_gib']:.1f} | {lp} |")


if __name__ == "__main__":
    main()
