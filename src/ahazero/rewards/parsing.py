"""Pure string helpers for reward functions: completion text, `<answer>` / `####` extraction, numbers.

`extract_xml_answer` and `extract_hash_answer` are the willccbb/Unsloth GSM8K notebook's helpers, kept
byte-for-byte in behaviour so that the ready reward functions score exactly as the notebook does.
`parse_number` is ours (the notebook compares strings); its accepted forms are listed in its docstring.
"""
from __future__ import annotations

import math
import re
from fractions import Fraction

_MAX_NUMBER_CHARS = 1000  # longer strings are not numbers we grade (and would make int() slow)
_CURRENCY = ("$", "€", "£", "¥")
# ASCII digits only: "１８" (full-width) or "١٨" (Arabic-Indic) are not parsed.
_DECIMAL = re.compile(r"(?P<int>[0-9]{1,3}(?:,[0-9]{3})+|[0-9]+)?(?:\.(?P<frac>[0-9]*))?"
                      r"(?:[eE](?P<exp>[+-]?[0-9]{1,3}))?")
_FRACTION = re.compile(r"(?P<num>[0-9]+)\s*/\s*(?P<den>[0-9]+)")


def completion_text(completion) -> str:
    """The text of one completion, standard (`str`) or conversational (`[{"role", "content"}, ...]`).

    For a message list this is the content of the last assistant message (the notebook reads
    `completion[0]["content"]`, the same thing for GRPO's one-message completions; the last one is the
    final answer when tool turns come first). Content given as a list of parts (`[{"type": "text",
    "text": ...}]`) is joined; `None` content is "".
    """
    if isinstance(completion, str):
        return completion
    if isinstance(completion, dict):
        return _content_text(completion.get("content"))
    if isinstance(completion, (list, tuple)):
        if not completion:
            return ""
        messages = [m for m in completion if isinstance(m, dict)]
        assistant = [m for m in messages if m.get("role") == "assistant"]
        last = (assistant or messages or [{}])[-1]
        return _content_text(last.get("content"))
    raise TypeError(f"a completion must be a str or a list of messages, got {type(completion).__name__}")


def _content_text(content) -> str:
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, (list, tuple)):  # multimodal content parts
        return "".join(p.get("text") or "" if isinstance(p, dict) else str(p) for p in content)
    return str(content)


def extract_xml_answer(text: str) -> str:
    """What follows the last `<answer>` up to the next `</answer>`, stripped (the notebook's helper).

    Without tags the whole text comes back stripped, as in the notebook.
    """
    answer = text.split("<answer>")[-1]
    answer = answer.split("</answer>")[0]
    return answer.strip()


def extract_hash_answer(text: str) -> str | None:
    """GSM8K's final answer: what follows `####`, stripped; None without `####` (the notebook's helper)."""
    if "####" not in text:
        return None
    return text.split("####")[1].strip()


def parse_rational(text) -> Fraction | None:
    """The exact value of a number written as a GSM8K answer might be, or None.

    The whole string must be one number. Accepted, around an ASCII-digit body:
    surrounding whitespace; a sign `+`/`-`/`−` (U+2212) before or after one currency sign `$ € £ ¥`;
    thousands commas in groups of three (`1,000`, not `1,00`); a decimal part (`18.0`, `.5`, `18.`);
    an exponent of at most three digits (`1.5e6`); a simple fraction of integers (`1/2`, not `1/0`);
    then an optional `%` (read as the number itself: `50%` -> 50, GSM8K writes percent answers bare)
    and one sentence-ending `.`. Anything else (words, units, two numbers, "18 apples") -> None.
    """
    if not isinstance(text, str):
        text = str(text)
    s = text.strip().replace("\u2212", "-")
    if not s or len(s) > _MAX_NUMBER_CHARS:
        return None
    s = _strip_suffixes(s)
    negative, s = _strip_sign_and_currency(s)
    value = _parse_body(s)
    if value is None:
        return None
    return -value if negative else value


def parse_number(text) -> float | None:
    """`parse_rational(text)` as a float; None when not a number or outside the float range."""
    value = parse_rational(text)
    if value is None:
        return None
    try:
        result = float(value)
    except OverflowError:
        return None
    return result if math.isfinite(result) else None


def _strip_suffixes(s: str) -> str:
    if s.endswith(".") and s[:-1].rstrip("%")[-1:].isdigit():
        s = s[:-1]  # "18." or "50%." at the end of a sentence
    if s.endswith("%"):
        s = s[:-1].rstrip()
    return s


def _strip_sign_and_currency(s: str) -> tuple[bool, str]:
    negative = False
    if s.startswith(("+", "-")):
        negative, s = s[0] == "-", s[1:].lstrip()
        if s.startswith(_CURRENCY):
            s = s[1:].lstrip()
    elif s.startswith(_CURRENCY):
        s = s[1:].lstrip()
        if s.startswith(("+", "-")):
            negative, s = s[0] == "-", s[1:].lstrip()
    return negative, s


def _parse_body(s: str) -> Fraction | None:
    if not s:
        return None
    m = _FRACTION.fullmatch(s)
    if m:
        den = int(m["den"])
        return Fraction(int(m["num"]), den) if den else None
    m = _DECIMAL.fullmatch(s)
    if not m or not (m["int"] or m["frac"]):  # "." or "e5" alone is not a number
        return None
    whole = int(m["int"].replace(",", "")) if m["int"] else 0
    frac = m["frac"] or ""
    value = whole + (Fraction(int(frac), 10 ** len(frac)) if frac else 0)
    if m["exp"]:
        value *= Fraction(10) ** int(m["exp"])
    return Fraction(value)
