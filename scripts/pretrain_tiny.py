"""Pretrain the tiny built-in "base model" of `ahazero train` (no arguments) on synthetic arithmetic.

    python scripts/pretrain_tiny.py                      # writes src/ahazero/assets/tiny-reasoner/

What it makes: a Qwen2-architecture model (~1M parameters, float32 safetensors) and a small byte-level
BPE tokenizer with a ChatML chat template, trained (supervised, on the whole chat-formatted text) on
problems from `ahazero.data.arithmetic` with their worked solutions.

Why it is often wrong, by design: GRPO can only raise what the base model sometimes does. The corpus is
a careless tutor's: for four of the eleven step phrasings (`MISLEADING`) the worked solution uses the
wrong operation most of the time (e.g. "Her friend takes 5 of them" solved as `+ 5`, "triples" as `+ 3`), with the wrong
step's arithmetic still done right. The model learns the format, the reading of numbers and the
arithmetic well, and learns the misleading phrasings as a coin that lands wrong side up more often than
not. Greedy decoding then fails on most problems that contain such a step, while sampling at
temperature 1 still writes the right operation often enough (pass@8 far above pass@1) for a group of
completions to contain right and wrong answers: exactly the signal GRPO's correctness reward uses.

It prints, for the saved model on `--eval-n` held-out test problems: greedy accuracy, format rate, mean
completion length in tokens, pass@k at temperature 1, and the time of one greedy `generate` batch.
Seeded: the same arguments on the same device give the same weights.

The shipped weights: this script with its defaults on one H100 (52 s of training; a second run gave a
byte-identical model.safetensors). Measured on 2 CPU cores (`taskset -c 0,1`, `--eval-only`), 200 test
problems: greedy accuracy 40.5% (100% on problems with no misleading step, 12.5% on the others), format
100%, 35.7 completion tokens, pass@8 at T=1 94.5%, 2.2-2.6 s per greedy batch of 200. On the CPU the
same run takes ~0.5 s a step on 2 free cores (~17 min); a CPU run (8 threads) gave an equivalent model:
greedy 38%, format 100%, pass@8 94%. A hand-rolled GRPO (LoRA r16, 8 prompts x 8, lr 1e-3, T=1) took
greedy accuracy from 40.5% to 90% in 25 steps (~40 s on 2 cores) and to 99-100% by step 50.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from pathlib import Path

import torch
from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast, Qwen2Config

from ahazero.data import arithmetic as ar

DEFAULT_OUT = Path(__file__).resolve().parents[1] / "src" / "ahazero" / "assets" / "tiny-reasoner"
PAD, BOS_CHAT, EOS = "<|endoftext|>", "<|im_start|>", "<|im_end|>"
TAGS = ["<reasoning>", "</reasoning>", "<answer>", "</answer>"]
# misleading phrasing -> the wrong operator the corpus writes for it
MISLEADING = {"add_friend_gives": "-", "sub_friend_takes": "+", "mul_triples": "+", "mul_times_as_many": "+"}
FORMAT_RE = re.compile(r"^<reasoning>\n.+?\n</reasoning>\n<answer>\n(.+?)\n</answer>\n?$", re.DOTALL)

# ChatML as in Qwen2.5; with no system message, ahazero's arithmetic system prompt is used.
CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] != 'system' %}"
    "{{- '<|im_start|>system\\n' + " + json.dumps(ar.SYSTEM_PROMPT) + " + '<|im_end|>\\n' }}"
    "{%- endif %}"
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)


def build_tokenizer(texts: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Byte-level BPE (any text encodes), digits split one per token, the format tags one token each."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[PAD, BOS_CHAT, EOS],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    tok.add_tokens([AddedToken(t, normalized=False, special=False) for t in TAGS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=EOS, pad_token=PAD, chat_template=CHAT_TEMPLATE,
                                   model_max_length=512, clean_up_tokenization_spaces=False)


def noisy_completion(problem: ar.Problem, rng: random.Random, p_wrong: float) -> str:
    """A worked solution in which each misleading step uses the wrong operator with probability p_wrong."""
    ops, value = [], problem.start
    for name, n in problem.steps:
        op = ar.TEMPLATES[name][0]
        wrong = MISLEADING.get(name)
        if wrong and rng.random() < p_wrong and ar.apply_op(value, wrong, n) >= 1:
            op = wrong
        ops.append(op)
        value = ar.apply_op(value, op, n)
    return ar.format_completion(ar.solution_lines(problem, ops), value)


def prompt_ids(tokenizer, question: str) -> list[int]:
    text = tokenizer.apply_chat_template(ar.prompt_messages(question), add_generation_prompt=True, tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids


def encode_corpus(tokenizer, problems, rng, p_wrong) -> list[list[int]]:
    """Each example is prompt ids + completion ids + <|im_end|>, tokenized as at generation time."""
    eos = tokenizer.convert_tokens_to_ids(EOS)
    rows = []
    for p in problems:
        completion = tokenizer(noisy_completion(p, rng, p_wrong), add_special_tokens=False).input_ids
        rows.append(prompt_ids(tokenizer, p.question) + completion + [eos])
    return rows


def build_model(vocab_size: int, tokenizer, size: dict, seed: int):
    config = Qwen2Config(
        vocab_size=vocab_size, max_position_embeddings=256, rope_theta=10000.0, tie_word_embeddings=True,
        bos_token_id=tokenizer.convert_tokens_to_ids(BOS_CHAT), eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, use_sliding_window=False, rms_norm_eps=1e-6, **size)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config, dtype=torch.float32)


def batches(rows, batch_size: int, pad_id: int, rng: random.Random):
    """Endless shuffled batches: input_ids [B, T] (right-padded) and labels [B, T] (-100 on padding)."""
    while True:
        order = list(range(len(rows)))
        rng.shuffle(order)
        for i in range(0, len(order) - batch_size + 1, batch_size):
            chunk = [rows[j] for j in order[i:i + batch_size]]
            width = max(len(r) for r in chunk)
            ids = torch.full((batch_size, width), pad_id, dtype=torch.long)  # [B, T]
            labels = torch.full((batch_size, width), -100, dtype=torch.long)  # [B, T]
            for b, r in enumerate(chunk):
                ids[b, :len(r)] = torch.tensor(r)
                labels[b, :len(r)] = torch.tensor(r)
            yield ids, labels


def lr_at(step: int, steps: int, lr: float, warmup: int) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


@torch.no_grad()
def generate(model, tokenizer, questions, *, samples=1, temperature=0.0, max_new_tokens=96, seed=0):
    """Completions (text, token count) for each question, `samples` per question, one left-padded batch."""
    prompts = [prompt_ids(tokenizer, q) for q in questions]
    width = max(len(p) for p in prompts)
    device = next(model.parameters()).device
    ids = torch.full((len(prompts), width), tokenizer.pad_token_id, dtype=torch.long)  # [N, P]
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):], mask[i, width - len(p):] = torch.tensor(p), 1
    torch.manual_seed(seed)
    sampling = dict(do_sample=False)
    if temperature > 0:
        sampling = dict(do_sample=True, temperature=temperature, top_k=0, top_p=1.0)
    out = model.generate(input_ids=ids.to(device), attention_mask=mask.to(device), max_new_tokens=max_new_tokens,
                         num_return_sequences=samples, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, **sampling)[:, width:].cpu()  # [N*samples, C]
    results = []
    for row in out.tolist():
        n = row.index(tokenizer.eos_token_id) + 1 if tokenizer.eos_token_id in row else len(row)
        results.append((tokenizer.decode(row[:n], skip_special_tokens=True), n))
    return results


def parse(completion: str) -> str | None:
    """The answer if `completion` follows the format, else None."""
    m = FORMAT_RE.match(completion)
    return m.group(1).strip() if m else None


def measure(model, tokenizer, problems, k: int = 8) -> dict:
    """Greedy accuracy, format rate, mean completion tokens, greedy batch time, and pass@k at temperature 1."""
    model.eval()
    questions, answers = [p.question for p in problems], [str(p.answer) for p in problems]
    start = time.perf_counter()
    greedy = generate(model, tokenizer, questions)
    seconds = time.perf_counter() - start
    parsed = [parse(text) for text, _ in greedy]
    correct = [a == b for a, b in zip(parsed, answers)]
    misled = [any(name in MISLEADING for name, _ in p.steps) for p in problems]
    sampled = generate(model, tokenizer, questions, samples=k, temperature=1.0)
    hits = [any(parse(sampled[i * k + j][0]) == answers[i] for j in range(k)) for i in range(len(problems))]
    sample_acc = sum(parse(t) == answers[i // k] for i, (t, _) in enumerate(sampled)) / len(sampled)
    return {
        "greedy_accuracy": sum(correct) / len(problems),
        "greedy_accuracy_plain": _rate([c for c, m in zip(correct, misled) if not m]),
        "greedy_accuracy_misleading": _rate([c for c, m in zip(correct, misled) if m]),
        "format_rate": sum(p is not None for p in parsed) / len(problems),
        "mean_completion_tokens": sum(n for _, n in greedy) / len(greedy),
        "sample_accuracy_t1": sample_acc,
        f"pass@{k}_t1": sum(hits) / len(problems),
        "greedy_batch_seconds": seconds,
        "n": len(problems),
    }


def _rate(flags: list[bool]) -> float:
    return sum(flags) / max(1, len(flags))


def train(args) -> None:
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    device = torch.device(args.device)
    problems = ar.generate_problems(args.n_train, args.seed, "train")
    texts = [ar.SYSTEM_PROMPT] + [p.question for p in problems[:5000]] + [ar.solution(p) for p in problems[:5000]]
    tokenizer = build_tokenizer(texts, args.vocab_size)
    rows = encode_corpus(tokenizer, problems, rng, args.p_wrong)
    vocab = 64 * math.ceil(len(tokenizer) / 64)
    size = dict(hidden_size=args.hidden, intermediate_size=4 * args.hidden, num_hidden_layers=args.layers,
                num_attention_heads=args.heads, num_key_value_heads=args.kv_heads)
    model = build_model(vocab, tokenizer, size, args.seed).to(device)
    n_params = sum(p.numel() for p in model.parameters())
    mean_len = sum(map(len, rows)) / len(rows)
    print(f"tokenizer: {len(tokenizer)} tokens; corpus: {len(rows)} examples, mean {mean_len:.1f} "
          f"tokens; model: {n_params / 1e6:.2f}M parameters on {device}", flush=True)
    test = ar.generate_problems(args.eval_n, args.seed, "test")
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.05)
    data = batches(rows, args.batch_size, tokenizer.pad_token_id, rng)
    start = time.perf_counter()
    for step in range(args.steps):
        model.train()
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args.steps, args.lr, args.warmup)
        ids, labels = next(data)
        loss = model(input_ids=ids.to(device), labels=labels.to(device)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % args.log_every == 0 or step + 1 == args.steps:
            line = f"step {step + 1:5d}  loss {loss.item():.4f}  {time.perf_counter() - start:6.0f}s"
            if args.probe_every and ((step + 1) % args.probe_every == 0):
                m = measure(model, tokenizer, test[:100], k=4)
                line += "  " + "  ".join(f"{k} {v:.3f}" for k, v in m.items() if k != "n")
            print(line, flush=True)
    save(model.cpu(), tokenizer, Path(args.out))
    print(f"saved to {args.out}; training took {time.perf_counter() - start:.0f}s", flush=True)


def save(model, tokenizer, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.generation_config = GenerationConfig(
        bos_token_id=model.config.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=128)
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    make_tokenizer_config_portable(out)


def make_tokenizer_config_portable(out: Path) -> None:
    """Name a tokenizer class and inputs that transformers 4.x knows too (5.x writes "TokenizersBackend",
    and 4.x's PreTrainedTokenizerFast would return token_type_ids, which `generate` refuses)."""
    config_file = out / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config.update(tokenizer_class="PreTrainedTokenizerFast", model_input_names=["input_ids", "attention_mask"])
    config_file.write_text(json.dumps(config, indent=2) + "\n")


def report(folder: Path, n: int, seed: int, threads: int) -> None:
    """Load the saved folder the way users do and print what it measures on CPU."""
    from transformers import AutoTokenizer

    torch.set_num_threads(threads)
    model = AutoModelForCausalLM.from_pretrained(folder).eval()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    m = measure(model, tokenizer, ar.generate_problems(n, seed, "test"))
    print(json.dumps({k: round(v, 4) for k, v in m.items()}, indent=2), flush=True)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", default=str(DEFAULT_OUT))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--n-train", type=int, default=60000, help="distinct training problems")
    p.add_argument("--p-wrong", type=float, default=0.6, help="wrong-operator rate on misleading steps")
    p.add_argument("--vocab-size", type=int, default=512)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--kv-heads", type=int, default=2)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--warmup", type=int, default=100)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--log-every", type=int, default=100)
    p.add_argument("--probe-every", type=int, default=0, help="quick eval on 100 test problems every N steps")
    p.add_argument("--eval-n", type=int, default=200)
    p.add_argument("--eval-only", action="store_true", help="only measure the model already in --out")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if not args.eval_only:
        train(args)
    report(Path(args.out), args.eval_n, args.seed, args.threads)


if __name__ == "__main__":
    main()
