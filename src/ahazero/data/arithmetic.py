"""Synthetic arithmetic word problems: the built-in task of `ahazero train` with no arguments.

A problem is a start amount and 2-3 operations (add, subtract, multiply by a small number), each told
by one sentence from a few templates, e.g.

    Mia has 14 marbles. She buys 9 more. Her friend takes 5 of them. How many marbles does Mia have now?

and its worked solution, one line per operation, in the same `<reasoning>` / `<answer>` format as
ahazero's GSM8K prompt:

    <reasoning>
    14 + 9 = 23
    23 - 5 = 18
    </reasoning>
    <answer>
    18
    </answer>

Rows follow the GSM8K row format used elsewhere in ahazero: `{"prompt": [system, user], "answer": "18"}`.
Train and test are disjoint by construction: a problem belongs to the test split exactly when the hash
of its question text falls in one bucket out of `_TEST_BUCKETS`, whatever the seed.
"""
from __future__ import annotations

import hashlib
import random
from dataclasses import dataclass

# The GSM8K notebook's system prompt (ahazero.data.loaders.SYSTEM_PROMPT), character for character; kept
# as a copy because the shipped tiny model was trained on exactly this text.
SYSTEM_PROMPT = "\nRespond in the following format:\n<reasoning>\n...\n</reasoning>\n<answer>\n...\n</answer>\n"
SPLITS = ("train", "test")
MAX_VALUE = 99  # every intermediate amount stays in 1..MAX_VALUE (two digits)
_TEST_BUCKETS = 10  # one hash bucket in ten is the test split

_NAMES = [("Mia", "she"), ("Tom", "he"), ("Ava", "she"), ("Leo", "he"), ("Sam", "he"), ("Zoe", "she"),
          ("Ben", "he"), ("Lily", "she"), ("Max", "he"), ("Emma", "she"), ("Noah", "he"), ("Ruby", "she")]
_ITEMS = ["apples", "marbles", "stickers", "cookies", "books", "coins", "shells", "pencils", "cards", "eggs",
          "stamps", "balloons"]
_OBJ = {"she": "her", "he": "him"}
_POSS = {"she": "her", "he": "his"}

# Sentence templates, by name. {S} is the subject (name or pronoun, capitalised), {o} / {p} the object /
# possessive pronoun, {n} the operand. Multiplying templates name their own factor when it is fixed.
_INTROS = ["{name} has {n} {item}.", "{name} starts with {n} {item}.", "{name} collects {n} {item}."]
TEMPLATES: dict[str, tuple[str, str]] = {  # name -> (op, sentence)
    "add_buys": ("+", "{S} buys {n} more."),
    "add_finds": ("+", "{S} finds {n} more."),
    "add_friend_gives": ("+", "{P} friend gives {o} {n} more."),
    "add_wins": ("+", "{S} wins {n} more."),
    "sub_gives_away": ("-", "{S} gives away {n}."),
    "sub_loses": ("-", "{S} loses {n} of them."),
    "sub_friend_takes": ("-", "{P} friend takes {n} of them."),
    "sub_sells": ("-", "{S} sells {n}."),
    "mul_doubles": ("*", "{S} doubles them."),
    "mul_triples": ("*", "{S} triples them."),
    "mul_times_as_many": ("*", "{S} ends up with {n} times as many."),
}
_FIXED_FACTOR = {"mul_doubles": 2, "mul_triples": 3}
_QUESTIONS = ["How many {item} does {name} have now?", "How many {item} does {name} have in the end?"]


@dataclass(frozen=True)
class Problem:
    """One word problem: `start`, then `steps` as (template name, operand), and its question text."""

    start: int
    steps: tuple[tuple[str, int], ...]
    question: str

    @property
    def answer(self) -> int:
        return evaluate(self.start, [(TEMPLATES[name][0], n) for name, n in self.steps])

    @property
    def split(self) -> str:
        return split_of(self.question)


def apply_op(value: int, op: str, n: int) -> int:
    return value + n if op == "+" else value - n if op == "-" else value * n


def evaluate(start: int, ops) -> int:
    """The result of applying (op, operand) pairs in order to `start`."""
    value = start
    for op, n in ops:
        value = apply_op(value, op, n)
    return value


def split_of(question: str) -> str:
    """'test' for one hash bucket in `_TEST_BUCKETS`, else 'train': a fixed, seed-independent partition."""
    bucket = int.from_bytes(hashlib.sha256(question.encode()).digest()[:4], "big") % _TEST_BUCKETS
    return "test" if bucket == 0 else "train"


def _sample_step(rng: random.Random, value: int) -> tuple[str, int]:
    """A template name and operand whose result stays in 1..MAX_VALUE."""
    while True:
        name = rng.choice(list(TEMPLATES))
        op = TEMPLATES[name][0]
        if op == "+" and value <= MAX_VALUE - 2:
            return name, rng.randint(2, min(20, MAX_VALUE - value))
        if op == "-" and value >= 3:
            return name, rng.randint(1, min(20, value - 1))
        if op == "*":
            n = _FIXED_FACTOR.get(name) or rng.randint(2, 5)
            if value * n <= MAX_VALUE:
                return name, n


def _render(rng: random.Random, start: int, steps) -> str:
    name, pronoun = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    sentences = [rng.choice(_INTROS).format(name=name, n=start, item=item)]
    for template, n in steps:
        subject = name if rng.random() < 0.3 else pronoun.capitalize()
        sentences.append(TEMPLATES[template][1].format(
            S=subject, o=_OBJ[pronoun], P=_POSS[pronoun].capitalize(), n=n))
    sentences.append(rng.choice(_QUESTIONS).format(item=item, name=name))
    return " ".join(sentences)


def sample_problem(rng: random.Random) -> Problem:
    """A random problem (of either split): a start in 2..20 and 2 or 3 steps."""
    start = rng.randint(2, 20)
    steps, value = [], start
    for _ in range(rng.choice((2, 3))):
        template, n = _sample_step(rng, value)
        value = apply_op(value, TEMPLATES[template][0], n)
        steps.append((template, n))
    return Problem(start, tuple(steps), _render(rng, start, steps))


def generate_problems(n: int, seed: int = 0, split: str = "train") -> list[Problem]:
    """`n` distinct problems of `split`, the same for the same (n, seed, split)."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    rng = random.Random(f"ahazero-arithmetic:{split}:{seed}")
    problems, seen = [], set()
    while len(problems) < n:
        problem = sample_problem(rng)
        if problem.split == split and problem.question not in seen:
            seen.add(problem.question)
            problems.append(problem)
    return problems


def solution_lines(problem: Problem, ops=None) -> list[str]:
    """The reasoning lines `a op n = b`; `ops` overrides each step's operator (to write a wrong solution)."""
    ops = ops or [TEMPLATES[name][0] for name, _ in problem.steps]
    lines, value = [], problem.start
    for op, (_, n) in zip(ops, problem.steps):
        result = apply_op(value, op, n)
        lines.append(f"{value} {op} {n} = {result}")
        value = result
    return lines


def format_completion(lines: list[str], answer) -> str:
    """The assistant's reply in the `<reasoning>` / `<answer>` format of SYSTEM_PROMPT."""
    return "<reasoning>\n" + "\n".join(lines) + "\n</reasoning>\n<answer>\n" + f"{answer}\n</answer>\n"


def solution(problem: Problem) -> str:
    """The correct worked solution of `problem`."""
    return format_completion(solution_lines(problem), problem.answer)


def prompt_messages(question: str) -> list[dict]:
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": question}]


def make_dataset(n: int, seed: int = 0, split: str = "train"):
    """A `datasets.Dataset` of `n` rows {"prompt": [system, user messages], "answer": "<int>"}."""
    from datasets import Dataset

    problems = generate_problems(n, seed, split)
    return Dataset.from_list([{"prompt": prompt_messages(p.question), "answer": str(p.answer)} for p in problems])
