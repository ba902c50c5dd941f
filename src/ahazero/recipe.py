"""The `ahazero train` recipe: a YAML file -> model, LoRA, data, rewards, GRPO, evaluation before and after.

Top to bottom, over the public API (torchtune's recipe style). The YAML has the sections

    model:   FastLanguageModel.from_pretrained arguments; `name` is a hub id, a folder, or builtin:<name>
    lora:    FastLanguageModel.get_peft_model arguments (omit for full fine-tuning)
    data:    {name: gsm8k | arithmetic | <file or hub id>, split, path, limit}
    eval:    {name/path/split like data, n, samples, max_tokens, before, after}
    rewards: names of ready reward functions, or "module:function" / "file.py:function"
    train:   GRPOConfig fields

and `--set section.key=value` overrides any of it (values parsed as YAML).

Under torchrun (`torchrun --nproc_per_node N -m ahazero train CONFIG`) every rank runs the recipe: the
process group is joined first (so each rank loads the model on its own GPU), every rank evaluates (the
same problems, so no rank waits on another), and rank 0 alone prints, saves and plots.
"""
from __future__ import annotations

import copy
import json
import time
from importlib import resources
from pathlib import Path

import yaml

SECTIONS = ("model", "lora", "data", "eval", "rewards", "train")


def builtin_path(name: str) -> Path:
    """Files shipped in the package: builtin:tiny-reasoner, builtin:demo.yaml."""
    path = Path(str(resources.files("ahazero") / "assets" / name))
    if not path.exists():
        raise FileNotFoundError(f"no built-in {name!r} in this ahazero install ({path})")
    return path


def load_run_config(path: str | None, overrides: list[str] = ()) -> dict:
    """The YAML config (the built-in demo when path is None) with `section.key=value` overrides applied."""
    source = builtin_path("demo.yaml") if path is None else Path(path)
    if not source.is_file():
        raise FileNotFoundError(f"config file not found: {source}")
    try:
        cfg = yaml.safe_load(source.read_text()) or {}
    except yaml.YAMLError as e:
        raise ValueError(f"config {source} is not valid YAML: {e}") from e
    if not isinstance(cfg, dict):
        raise ValueError(f"config {source} must be a mapping with sections {SECTIONS}")
    unknown = set(cfg) - set(SECTIONS)
    if unknown:
        raise ValueError(f"config {source}: unknown section(s) {sorted(unknown)}; known: {SECTIONS}")
    for item in overrides:
        apply_override(cfg, item)
    return cfg


def apply_override(cfg: dict, item: str) -> None:
    """`train.learning_rate=1e-5` -> cfg["train"]["learning_rate"] = 1e-5 (value parsed as YAML)."""
    key, sep, value = item.partition("=")
    if not sep or not key:
        raise ValueError(f"--set expects key=value, got {item!r}")
    parts = key.split(".")
    if parts[0] not in SECTIONS:
        raise ValueError(f"--set {item!r}: the key must start with one of {SECTIONS}")
    node = cfg
    for p in parts[:-1]:
        node = node.setdefault(p, {})
        if node is None or not isinstance(node, dict):
            raise ValueError(f"--set {item!r}: {p} is not a section")
    node[parts[-1]] = yaml.safe_load(value)


def resolve_model_name(name: str) -> str:
    return str(builtin_path(name.split(":", 1)[1])) if name.startswith("builtin:") else name


def load_rows(spec: dict, default_split: str):
    """A dataset section -> datasets.Dataset of {"prompt", "answer", ...} rows."""
    from .data import gsm8k_row, load_any, load_gsm8k
    from .data.arithmetic import make_dataset
    spec = dict(spec or {})
    name, split, limit = spec.get("name", "gsm8k"), spec.get("split", default_split), spec.get("limit")
    if name == "gsm8k":
        ds = load_gsm8k(split, path=spec.get("path"))
    elif name == "arithmetic":
        ds = make_dataset(int(spec.get("size", limit or 2000)), seed=int(spec.get("seed", 0)), split=split)
    else:
        ds = load_any(spec.get("path") or name, split=split)
        if "prompt" not in ds.column_names and "question" in ds.column_names:  # GSM8K-style rows
            ds = ds.map(gsm8k_row, remove_columns=ds.column_names)
    if limit is not None:
        ds = ds.select(range(min(int(limit), len(ds))))
    if len(ds) == 0:
        raise ValueError(f"dataset {name!r} (split {split!r}) is empty")
    return ds


def train_from_config(cfg: dict) -> dict:
    """Run the recipe; returns the summary (also written to <output_dir>/summary.json)."""
    from .grpo import distributed

    cfg = copy.deepcopy(cfg)
    joined = not distributed.is_distributed() and distributed.init_from_env(
        timeout_s=(cfg.get("train") or {}).get("ddp_timeout"))
    try:
        return _train_from_config(cfg, main=distributed.is_main_process())
    finally:
        if joined:
            distributed.destroy()


def _train_from_config(cfg: dict, main: bool) -> dict:
    from . import FastLanguageModel, GRPOConfig, GRPOTrainer
    from .api import get_generator
    from .evaluate import evaluate
    from .plots import plot_training

    started = time.time()
    model_cfg = dict(cfg.get("model") or {})
    if "name" not in model_cfg:
        raise ValueError("config: model.name is required")
    model_cfg["model_name"] = resolve_model_name(model_cfg.pop("name"))
    model, tokenizer = FastLanguageModel.from_pretrained(**model_cfg)
    if cfg.get("lora"):
        model = FastLanguageModel.get_peft_model(model, **cfg["lora"])
    train_cfg = dict(cfg.get("train") or {})
    resume = train_cfg.pop("resume_from_checkpoint", None)  # a train() argument (`ahazero train --resume`)
    args = GRPOConfig(**train_cfg)
    train_rows = load_rows(cfg.get("data"), "train")
    eval_cfg = dict(cfg.get("eval") or {})
    eval_rows = load_rows(eval_cfg, "test") if eval_cfg.get("n", 0) else None
    if eval_rows is not None:
        eval_rows = eval_rows.select(range(min(int(eval_cfg["n"]), len(eval_rows))))
    rewards = cfg.get("rewards") or ["format_reward_func", "numeric_correctness_reward_func"]

    def run_eval():
        generator = get_generator(model, tokenizer)
        return evaluate(generator, tokenizer, eval_rows, samples=int(eval_cfg.get("samples", 1)),
                        max_tokens=int(eval_cfg.get("max_tokens", args.max_completion_length)),
                        max_prompt_length=args.max_prompt_length,
                        adapter="default" if cfg.get("lora") else None)

    before = run_eval() if eval_rows is not None and eval_cfg.get("before", True) else None
    if before is not None and main:
        print(f"eval before: accuracy {before.accuracy:.1%}, format {before.format_rate:.1%}, "
              f"length {before.mean_length:.1f} tokens (n={before.n})", flush=True)
    trainer = GRPOTrainer(model=model, processing_class=tokenizer, reward_funcs=rewards, args=args,
                          train_dataset=train_rows)
    state = trainer.train(resume_from_checkpoint=resume)
    after = run_eval() if eval_rows is not None and eval_cfg.get("after", True) else None
    out = Path(args.output_dir)
    summary = {"steps": state.global_step, "wall_seconds": round(time.time() - started, 1),
               "eval_accuracy_before": before.accuracy if before else None,
               "eval_accuracy_after": after.accuracy if after else None,
               "eval_before": before.to_dict() if before else None, "eval_after": after.to_dict() if after else None,
               "final_reward": _last(state.log_history, "reward"), "config": cfg}
    if not main:
        return summary
    if cfg.get("lora") and hasattr(model, "save_lora"):
        model.save_lora(str(out / "final_lora"))
    (out / "summary.json").write_text(json.dumps(summary, indent=1, default=str))
    if (out / "metrics.jsonl").is_file():
        plot_training(out / "metrics.jsonl", out / "training.png")
    if before is not None and after is not None:
        print(f"eval accuracy: before {before.accuracy:.1%} -> after {after.accuracy:.1%}", flush=True)
    print(f"wrote {out / 'summary.json'} and {out / 'training.png'}", flush=True)
    return summary


def _last(history: list[dict], key: str):
    for row in reversed(history):
        if key in row:
            return row[key]
    return None
