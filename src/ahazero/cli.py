"""The `ahazero` command: train, eval, generate, export."""
from __future__ import annotations

import argparse
import json
import sys


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args) or 0
    except (FileNotFoundError, ValueError, TypeError, OSError, NotImplementedError, ImportError) as e:
        print(f"ahazero {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"ahazero {args.command}: interrupted", file=sys.stderr)
        return 130


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ahazero", description="GRPO that teaches an LLM to reason for your rewards.")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="GRPO training from a YAML config (no config: the built-in demo)")
    t.add_argument("config", nargs="?", help="YAML config (default: the built-in tiny-model demo)")
    t.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value, e.g. --set train.max_steps=10 (repeatable)")
    t.add_argument("--output-dir", help="shortcut for --set train.output_dir=...")
    t.add_argument("--resume", nargs="?", const=True, default=None,
                   help="resume from the last checkpoint in output_dir, or from the given folder")
    t.set_defaults(func=_train)

    e = sub.add_parser("eval", help="accuracy, format rate and length on problems with numeric answers")
    _model_args(e)
    e.add_argument("--dataset", default="gsm8k", help="gsm8k | demo | a JSONL/Parquet file (prompt/question + answer)")
    e.add_argument("--split", default="test")
    e.add_argument("--n", type=int, default=200, help="number of problems")
    e.add_argument("--samples", type=int, default=1, help="K samples per problem (1 = greedy)")
    e.add_argument("--temperature", type=float, default=0.8)
    e.add_argument("--max-tokens", type=int, default=256)
    e.add_argument("--json", action="store_true", help="print the result as JSON")
    e.add_argument("--load-in-4bit", action="store_true", help="NF4 base weights (QLoRA), as the model trained")
    e.set_defaults(func=_eval)

    g = sub.add_parser("generate", help="complete one question (interactive when none is given)")
    _model_args(g)
    g.add_argument("question", nargs="?")
    g.add_argument("--system", default=None, help="system prompt (default: the <reasoning>/<answer> one)")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--max-tokens", type=int, default=256)
    g.add_argument("--load-in-4bit", action="store_true", help="NF4 base weights (QLoRA), as the model trained")
    g.set_defaults(func=_generate)

    x = sub.add_parser("export", help="merged 16-bit / 4-bit checkpoints, LoRA, or GGUF")
    _model_args(x)
    x.add_argument("--to", required=True, choices=["merged_16bit", "merged_4bit", "gguf"])
    x.add_argument("--quant", action="append", default=None, help="GGUF quantization method(s), e.g. q4_k_m")
    x.add_argument("--out", required=True, help="output folder")
    x.add_argument("--overwrite", action="store_true")
    x.set_defaults(func=_export)
    return p


def _model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="model folder or hub id (builtin:tiny-reasoner for the demo)")
    p.add_argument("--adapter", default=None, help="a saved LoRA adapter folder")
    p.add_argument("--max-seq-length", type=int, default=2048)


def _train(args) -> int:
    from .recipe import load_run_config, train_from_config
    overrides = list(args.overrides)
    if args.output_dir:
        overrides.append(f"train.output_dir={args.output_dir}")
    cfg = load_run_config(args.config, overrides)
    if args.resume is not None:
        cfg.setdefault("train", {})["resume_from_checkpoint"] = args.resume
    train_from_config(cfg)
    return 0


def _load(args):
    """(model, tokenizer, adapter name or None) for eval/generate/export."""
    from . import FastLanguageModel
    from .recipe import resolve_model_name
    model, tokenizer = FastLanguageModel.from_pretrained(resolve_model_name(args.model),
                                                         max_seq_length=args.max_seq_length, fast_inference=True,
                                                         load_in_4bit=getattr(args, "load_in_4bit", False))
    if args.adapter is None:
        return model, tokenizer, None
    from .api import attach_saved_adapter
    model = attach_saved_adapter(model, args.adapter)
    return model, tokenizer, "default"


def _eval(args) -> int:
    from .api import get_generator
    from .evaluate import evaluate
    from .recipe import load_rows
    model, tokenizer, adapter = _load(args)
    name = {"demo": "arithmetic"}.get(args.dataset, args.dataset)
    rows = load_rows({"name": name, "split": args.split, "size": max(args.n, 1)}, args.split)
    rows = rows.select(range(min(args.n, len(rows))))
    result = evaluate(get_generator(model, tokenizer), tokenizer, rows, samples=args.samples,
                      max_tokens=args.max_tokens, temperature=args.temperature, adapter=adapter)
    if args.json:
        print(json.dumps(result.to_dict()))
        return 0
    print(f"{'problems':<12}{result.n}")
    print(f"{'pass@1':<12}{result.accuracy:.1%}")
    if result.maj_at_k is not None:
        print(f"{f'maj@{args.samples}':<12}{result.maj_at_k:.1%}")
        print(f"{f'pass@{args.samples}':<12}{result.pass_at_k:.1%}")
    print(f"{'format':<12}{result.format_rate:.1%}")
    print(f"{'length':<12}{result.mean_length:.1f} tokens")
    return 0


def _generate(args) -> int:
    from .api import get_generator
    from .data import SYSTEM_PROMPT
    from .data.prompts import tokenize_prompts
    from .engine.types import SamplingParams
    model, tokenizer, adapter = _load(args)
    generator = get_generator(model, tokenizer)
    params = SamplingParams(temperature=args.temperature, max_tokens=args.max_tokens)
    system = args.system if args.system is not None else SYSTEM_PROMPT

    def answer(question: str) -> str:
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": question}]
        ids, _ = tokenize_prompts(tokenizer, [messages], None)
        return generator.generate(ids, params, adapter=adapter)[0].outputs[0].text

    if args.question is not None:
        print(answer(args.question))
        return 0
    while True:
        try:
            question = input("question> ").strip()
        except EOFError:
            return 0
        if question in ("", "exit", "quit"):
            return 0
        print(answer(question), flush=True)


def _export(args) -> int:
    """Straight from the checkpoint files, shard by shard (the model is never loaded whole)."""
    from .export import export_checkpoint
    from .recipe import resolve_model_name
    result = export_checkpoint(resolve_model_name(args.model), args.out, to=args.to, adapter=args.adapter,
                               quantization_method=args.quant or ["q8_0"], overwrite=args.overwrite)
    for path in result if isinstance(result, (list, tuple)) else [result]:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
