"""Evaluation of a model on problems with numeric answers: pass@1, maj@K, pass@K, format rate, length.

Greedy when `samples == 1` (pass@1 is then greedy accuracy); with K > 1 samples at `temperature`:
pass@1 is the mean correctness of the samples, maj@K the correctness of the most common parsed answer,
pass@K whether any sample is correct.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass

from .data.prompts import tokenize_prompts
from .engine.types import SamplingParams
from .rewards import extract_xml_answer, parse_rational
from .rewards.format import has_reasoning_answer_format


@dataclass
class EvalResult:
    n: int
    samples: int
    accuracy: float  # pass@1
    format_rate: float
    mean_length: float  # completion tokens
    maj_at_k: float | None = None
    pass_at_k: float | None = None

    def to_dict(self) -> dict:
        return asdict(self)


def is_correct(text: str, reference) -> bool:
    got, want = parse_rational(extract_xml_answer(text)), parse_rational(str(reference))
    return got is not None and want is not None and got == want


def majority_correct(texts: list[str], reference) -> bool:
    answers = [parse_rational(extract_xml_answer(t)) for t in texts]
    answers = [a for a in answers if a is not None]
    if not answers:
        return False
    top, _ = Counter(answers).most_common(1)[0]
    want = parse_rational(str(reference))
    return want is not None and top == want


def evaluate(generator, tokenizer, rows, *, samples: int = 1, max_tokens: int = 256, temperature: float = 0.8,
             adapter: str | None = "default", max_prompt_length: int | None = None, batch_size: int = 64,
             seed: int = 0) -> EvalResult:
    """Score `rows` ({"prompt", "answer"}) with a rollout backend (`Generator`)."""
    rows = list(rows)
    if not rows:
        raise ValueError("evaluation dataset is empty")
    params = SamplingParams(n=samples, temperature=0.0 if samples == 1 else temperature, max_tokens=max_tokens,
                            seed=seed)
    correct = fmt = length = maj = any_ok = 0.0
    for start in range(0, len(rows), batch_size):
        chunk = rows[start:start + batch_size]
        ids, _ = tokenize_prompts(tokenizer, [r["prompt"] for r in chunk], max_prompt_length)
        for row, out in zip(chunk, generator.generate(ids, params, adapter=adapter)):
            texts = [c.text for c in out.outputs]
            ok = [is_correct(t, row["answer"]) for t in texts]
            correct += sum(ok) / samples
            fmt += sum(has_reasoning_answer_format(t) for t in texts) / samples
            length += sum(len(c.token_ids) for c in out.outputs) / samples
            maj += majority_correct(texts, row["answer"])
            any_ok += any(ok)
    n = len(rows)
    return EvalResult(n=n, samples=samples, accuracy=correct / n, format_rate=fmt / n, mean_length=length / n,
                      maj_at_k=maj / n if samples > 1 else None, pass_at_k=any_ok / n if samples > 1 else None)
