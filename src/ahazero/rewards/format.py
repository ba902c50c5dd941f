"""Ready reward functions for `<reasoning>...</reasoning><answer>...</answer>` completions.

The first five are the classic willccbb / Unsloth GSM8K GRPO notebook's functions, with the same names
and the same scores (their regexes included: without `re.DOTALL`, so `strict_format_reward_func` only matches a
one-line reasoning and `soft_format_reward_func` only blocks with no newline inside, as in the notebook).
They differ only in reading both completion kinds, `str` and `[{"role": "assistant", "content": ...}]`.
`format_reward_func` and `numeric_correctness_reward_func` are ours: the format check without that
single-line quirk, and answer checking by value instead of by string.

All follow TRL's convention `f(prompts, completions, completion_ids=None, **columns, trainer_state=None)
-> list[float]`, one score per completion, and never return None. Score ranges (checked by property
tests on arbitrary text):

| function | scores |
| --- | --- |
| xmlcount_reward_func | [-0.002 * len(text), 0.5] (0.125 per well-placed tag, -0.001 per trailing char) |
| soft_format_reward_func, strict_format_reward_func, int_reward_func | {0.0, 0.5} |
| correctness_reward_func, numeric_correctness_reward_func | {0.0, 2.0} |
| format_reward_func | {0.0, 1.0} |
"""
from __future__ import annotations

import re

from ahazero.rewards.parsing import completion_text, extract_xml_answer, parse_rational

_STRICT = re.compile(r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$")
_SOFT = re.compile(r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>")
_WHOLE = re.compile(r"\s*<reasoning>(?P<reasoning>.*?)</reasoning>\s*<answer>(?P<answer>.*?)</answer>\s*",
                    re.DOTALL)
_TAGS = ("<reasoning>", "</reasoning>", "<answer>", "</answer>")


def _texts(completions) -> list[str]:
    return [completion_text(c) for c in completions]


def count_xml(text: str) -> float:
    """The notebook's `count_xml`: 0.125 per tag on its own line, minus 0.001 per char after `</answer>`."""
    count = 0.0
    if text.count("<reasoning>\n") == 1:
        count += 0.125
    if text.count("\n</reasoning>\n") == 1:
        count += 0.125
    if text.count("\n<answer>\n") == 1:
        count += 0.125
        count -= len(text.split("\n</answer>\n")[-1]) * 0.001
    if text.count("\n</answer>") == 1:
        count += 0.125
        count -= (len(text.split("\n</answer>")[-1]) - 1) * 0.001
    return count


def xmlcount_reward_func(completions, **kwargs) -> list[float]:
    """Partial credit for each of the four tags on its own line (the notebook's function)."""
    return [count_xml(t) for t in _texts(completions)]


def soft_format_reward_func(completions, **kwargs) -> list[float]:
    """0.5 when the text starts with `<reasoning>..</reasoning>` then `<answer>..</answer>` (notebook's regex).

    Without `re.DOTALL` a newline inside either block fails the match, so the strict format itself
    ("<reasoning>\\n...") scores 0.0 here, as in the notebook.
    """
    return [0.5 if _SOFT.match(t) else 0.0 for t in _texts(completions)]


def strict_format_reward_func(completions, **kwargs) -> list[float]:
    """0.5 for exactly "<reasoning>\\n...\\n</reasoning>\\n<answer>\\n...\\n</answer>\\n" (notebook's regex)."""
    return [0.5 if _STRICT.match(t) else 0.0 for t in _texts(completions)]


def int_reward_func(completions, **kwargs) -> list[float]:
    """0.5 when the extracted answer is all digits (`str.isdigit`, as in the notebook: "-3" gets 0.0)."""
    return [0.5 if extract_xml_answer(t).isdigit() else 0.0 for t in _texts(completions)]


def correctness_reward_func(prompts, completions, answer, **kwargs) -> list[float]:
    """2.0 when the extracted answer equals the `answer` column as a string (the notebook's function).

    A non-string reference (an int column) is compared as `str(answer)`; None never matches.
    """
    return [2.0 if a is not None and r == (a if isinstance(a, str) else str(a)) else 0.0
            for r, a in zip((extract_xml_answer(t) for t in _texts(completions)), answer)]


def numeric_correctness_reward_func(prompts, completions, answer, **kwargs) -> list[float]:
    """2.0 when the `<answer>` holds the same number as the `answer` column, else 0.0.

    Both sides go through `parse_rational` and compare exactly as rationals: "18" == "18.0" == "$18"
    == "18." == " 18 ", "1,000" == "1000", "-3" == "-3.00", "1/2" == "0.5"; "1/3" != "0.333". An
    answer with words around the number ("18 apples") or an unparseable reference scores 0.0.
    """
    scores = []
    for text, ref in zip(_texts(completions), answer):
        got, want = parse_rational(extract_xml_answer(text)), parse_rational(ref)
        scores.append(2.0 if got is not None and want is not None and got == want else 0.0)
    return scores


def has_reasoning_answer_format(text: str) -> bool:
    """True for a whole text of one `<reasoning>` block then one `<answer>` block, whitespace around."""
    m = _WHOLE.fullmatch(text)
    if not m:
        return False
    inner = m["reasoning"] + m["answer"]
    return not any(tag in inner for tag in _TAGS)


def format_reward_func(completions, **kwargs) -> list[float]:
    """1.0 when the completion is exactly one reasoning block then one answer block, else 0.0.

    What the notebook's strict/soft regexes mean to check, with newlines allowed inside the blocks
    (`re.DOTALL`), any whitespace between and around them, and no nested or repeated tags.
    """
    return [1.0 if has_reasoning_answer_format(t) else 0.0 for t in _texts(completions)]
