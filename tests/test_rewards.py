"""Ready reward functions: same scores as the GSM8K notebook's originals (copied below as the reference),
both completion kinds, tricky strings, and property tests (no raise, scores in the documented range)."""
import math
import re
import textwrap
from fractions import Fraction

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ahazero.rewards import (
    GSM8K_NOTEBOOK_REWARDS,
    REWARD_FUNCS,
    RewardError,
    completion_text,
    correctness_reward_func,
    extract_hash_answer,
    extract_xml_answer,
    format_reward_func,
    int_reward_func,
    numeric_correctness_reward_func,
    parse_number,
    parse_rational,
    resolve_reward_func,
    soft_format_reward_func,
    strict_format_reward_func,
    xmlcount_reward_func,
)


# ---- the reference: the notebook's code, verbatim (shared/examples/seed_notebook.py) ----------------
def ref_extract_xml_answer(text: str) -> str:
    answer = text.split("<answer>")[-1]
    answer = answer.split("</answer>")[0]
    return answer.strip()


def ref_correctness_reward_func(prompts, completions, answer, **kwargs) -> list[float]:
    responses = [completion[0]["content"] for completion in completions]
    extracted_responses = [ref_extract_xml_answer(r) for r in responses]
    return [2.0 if r == a else 0.0 for r, a in zip(extracted_responses, answer)]


def ref_int_reward_func(completions, **kwargs) -> list[float]:
    responses = [completion[0]["content"] for completion in completions]
    extracted_responses = [ref_extract_xml_answer(r) for r in responses]
    return [0.5 if r.isdigit() else 0.0 for r in extracted_responses]


def ref_strict_format_reward_func(completions, **kwargs) -> list[float]:
    pattern = r"^<reasoning>\n.*?\n</reasoning>\n<answer>\n.*?\n</answer>\n$"
    responses = [completion[0]["content"] for completion in completions]
    return [0.5 if re.match(pattern, r) else 0.0 for r in responses]


def ref_soft_format_reward_func(completions, **kwargs) -> list[float]:
    pattern = r"<reasoning>.*?</reasoning>\s*<answer>.*?</answer>"
    responses = [completion[0]["content"] for completion in completions]
    return [0.5 if re.match(pattern, r) else 0.0 for r in responses]


def ref_count_xml(text) -> float:
    count = 0.0
    if text.count("<reasoning>\n") == 1: count += 0.125
    if text.count("\n</reasoning>\n") == 1: count += 0.125
    if text.count("\n<answer>\n") == 1:
        count += 0.125
        count -= len(text.split("\n</answer>\n")[-1]) * 0.001
    if text.count("\n</answer>") == 1:
        count += 0.125
        count -= (len(text.split("\n</answer>")[-1]) - 1) * 0.001
    return count


def ref_xmlcount_reward_func(completions, **kwargs) -> list[float]:
    return [ref_count_xml(c[0]["content"]) for c in completions]


PAIRS = [(xmlcount_reward_func, ref_xmlcount_reward_func), (soft_format_reward_func, ref_soft_format_reward_func),
         (strict_format_reward_func, ref_strict_format_reward_func), (int_reward_func, ref_int_reward_func),
         (correctness_reward_func, ref_correctness_reward_func)]

GOOD = "<reasoning>\n48 / 2 = 24, 48 + 24 = 72\n</reasoning>\n<answer>\n72\n</answer>\n"
TRICKY = [
    GOOD, GOOD.rstrip("\n"), GOOD + "trailing words", "", " ", "\n", "72", " 72 ",
    "<answer>72</answer>", "<answer>\n72\n</answer>", "<answer>72", "72</answer>", "</answer>72<answer>",
    "<reasoning>\nmulti\nline\n</reasoning>\n<answer>\n72\n</answer>\n",  # strict/soft miss it (no DOTALL)
    "<reasoning>r</reasoning> \n <answer>72</answer>", "<reasoning></reasoning><answer></answer>",
    "<answer><answer>72</answer></answer>", "<answer>1</answer><answer>72</answer>",
    "<reasoning>\n<reasoning>\nx\n</reasoning>\n</reasoning>\n<answer>\n72\n</answer>\n",
    "<REASONING>\nx\n</REASONING>\n<ANSWER>\n72\n</ANSWER>\n", "<answer>\n-3\n</answer>", "<answer>²</answer>",
    "<answer>\n٧٢\n</answer>", "<answer>\n７２\n</answer>", "<answer>\n72.0\n</answer>", "<answer>\n$72\n</answer>",
    "<answer>\n" + "9" * 5000 + "\n</answer>\n", "🙂<reasoning>\n🙂\n</reasoning>\n<answer>\n72\n</answer>\n",
    "<reasoning>\nx\n</reasoning>\n<answer>\n72\n</answer>\n" * 2, "\x00<answer>\x0072\x00</answer>",
    "<reasoning>\r\nx\r\n</reasoning>\r\n<answer>\r\n72\r\n</answer>\r\n",
]


def conv(texts):
    return [[{"role": "assistant", "content": t}] for t in texts]


@pytest.mark.parametrize("ours, ref", PAIRS, ids=[p[0].__name__ for p in PAIRS])
def test_same_scores_as_the_notebook_on_tricky_strings(ours, ref):
    answers = ["72"] * len(TRICKY)
    expected = ref(prompts=[None] * len(TRICKY), completions=conv(TRICKY), answer=answers)
    assert ours(prompts=[None] * len(TRICKY), completions=conv(TRICKY), answer=answers) == expected
    assert ours(prompts=[None] * len(TRICKY), completions=TRICKY, answer=answers) == expected  # plain strings


def test_scores_of_a_perfect_completion():
    c = conv([GOOD])
    scores = [f(prompts=[None], completions=c, answer=["72"])[0] for f in GSM8K_NOTEBOOK_REWARDS]
    assert scores == [0.5, 0.0, 0.5, 0.5, 2.0]  # soft: `.` stops at "<reasoning>\n" (the notebook's quirk)
    assert numeric_correctness_reward_func(None, c, answer=["72"]) == [2.0]
    assert format_reward_func(c) == [1.0]


def test_notebook_quirks_are_kept():
    multiline = "<reasoning>\na\nb\n</reasoning>\n<answer>\n72\n</answer>\n"
    assert strict_format_reward_func([multiline]) == [0.0]  # `.` without DOTALL, as in the notebook
    assert soft_format_reward_func([multiline]) == [0.0]
    assert format_reward_func([multiline]) == [1.0]  # ours allows newlines
    assert int_reward_func(["<answer>-3</answer>"]) == [0.0]  # isdigit
    assert correctness_reward_func(None, ["<answer>72.0</answer>"], ["72"]) == [0.0]  # string comparison


def test_completion_text_kinds():
    assert completion_text("a") == "a"
    assert completion_text([{"role": "assistant", "content": "a"}]) == "a"
    assert completion_text([]) == ""
    assert completion_text([{"role": "assistant", "content": None}]) == ""
    assert completion_text({"role": "assistant", "content": "a"}) == "a"
    tool_turns = [{"role": "assistant", "content": "call"}, {"role": "tool", "content": "42"},
                  {"role": "assistant", "content": "final"}]
    assert completion_text(tool_turns) == "final"
    assert completion_text([{"role": "assistant", "content": [{"type": "text", "text": "a"}, {"type": "text",
                                                                                              "text": "b"}]}]) == "ab"
    with pytest.raises(TypeError):
        completion_text(3)


def test_extractors():
    assert extract_xml_answer("x<answer>\n 5 \n</answer>y") == "5"
    assert extract_xml_answer("no tags ") == "no tags"
    assert extract_xml_answer("<answer>1</answer><answer>2</answer>") == "2"  # the last answer
    assert extract_hash_answer("a\n#### 72") == "72"
    assert extract_hash_answer("a\n#### 2,125") == "2,125"
    assert extract_hash_answer("no hashes") is None


@pytest.mark.parametrize("text, value", [
    ("18", 18), ("18.0", 18), ("$18", 18), ("18.", 18), (" 18 ", 18), ("\n18\n", 18), ("1,000", 1000),
    ("1,000,000.50", Fraction(2000001, 2)), ("-3", -3), ("-3.00", -3), ("−3", -3), ("+5", 5), ("-$5", -5),
    ("$-5", -5), ("€ 5", 5), ("1/2", Fraction(1, 2)), ("0.5", Fraction(1, 2)), (".5", Fraction(1, 2)),
    ("3 / 4", Fraction(3, 4)), ("50%", 50), ("50%.", 50), ("1.5e3", 1500), ("2E-2", Fraction(1, 50)),
    ("007", 7), ("0", 0), ("1" + "0" * 400, 10 ** 400),
])
def test_parse_rational_accepts(text, value):
    assert parse_rational(text) == value


@pytest.mark.parametrize("text", [
    "", " ", ".", "-", "$", "%", "e5", "1,00", "1,0000", ",100", "1/0", "18 apples", "x18", "18x", "1 000", "1..2",
    "--3", "+-3", "1e1234", "１８", "٧٢", "²", "inf", "nan", "NaN", "Infinity", "0x10", "1_000", "18.0.0",
    "1" * 2000, "<answer>18</answer>", "18\n19", "(18)",
])
def test_parse_rational_refuses(text):
    assert parse_rational(text) is None
    assert parse_number(text) is None


def test_parse_number_float_range():
    assert parse_number("1/2") == 0.5
    assert parse_number("-1,234.5") == -1234.5
    assert parse_number("1" + "0" * 400) is None  # exact as a rational, but no finite float
    assert parse_number(18) == 18.0  # non-strings go through str()


@pytest.mark.parametrize("got, ref, score", [
    ("18", "18", 2.0), ("18.0", "18", 2.0), ("$18", "18", 2.0), ("1,000", "1000", 2.0), ("1000", "1,000", 2.0),
    ("18.", "18", 2.0), (" 18 ", "18", 2.0), ("-3", "-3.00", 2.0), ("1/2", "0.5", 2.0), ("18", 18, 2.0),
    ("1/3", "0.333", 0.0), ("17", "18", 0.0), ("18 apples", "18", 0.0), ("", "18", 0.0), ("18", None, 0.0),
    ("18", "eighteen", 0.0), ("0.1", "1/10", 2.0),
])
def test_numeric_correctness(got, ref, score):
    text = f"<reasoning>\nr\n</reasoning>\n<answer>\n{got}\n</answer>\n"
    assert numeric_correctness_reward_func(None, conv([text]), answer=[ref]) == [score]


def test_correctness_with_non_string_reference():
    assert correctness_reward_func(None, ["<answer>18</answer>"] * 3, answer=[18, "18", None]) == [2.0, 2.0, 0.0]


@pytest.mark.parametrize("text, score", [
    (GOOD, 1.0), ("  <reasoning>a</reasoning><answer>b</answer>  ", 1.0), ("<reasoning>a</reasoning>", 0.0),
    ("<answer>b</answer>", 0.0), ("x<reasoning>a</reasoning><answer>b</answer>", 0.0),
    ("<reasoning>a</reasoning><answer>b</answer>x", 0.0), ("<reasoning>a</reasoning>x<answer>b</answer>", 0.0),
    ("<reasoning><reasoning>a</reasoning><answer>b</answer>", 0.0),
    ("<reasoning>a</reasoning><answer>b</answer><answer>c</answer>", 0.0),
    ("<answer>b</answer><reasoning>a</reasoning>", 0.0), ("", 0.0),
])
def test_format_reward(text, score):
    assert format_reward_func(conv([text])) == [score]


def test_registry_and_resolve(tmp_path):
    assert set(REWARD_FUNCS) >= {f.__name__ for f in GSM8K_NOTEBOOK_REWARDS} | {
        "numeric_correctness_reward_func", "format_reward_func"}
    assert all(REWARD_FUNCS[name].__name__ == name for name in REWARD_FUNCS)
    assert resolve_reward_func("int_reward_func") is int_reward_func
    assert resolve_reward_func(len) is len
    assert resolve_reward_func("ahazero.rewards.format:count_xml").__name__ == "count_xml"
    user_file = tmp_path / "my_rewards.py"
    user_file.write_text(textwrap.dedent("""
        def length_reward(completions, **kwargs):
            return [float(len(c)) for c in completions]
    """))
    assert resolve_reward_func(f"{user_file}:length_reward")(["ab"]) == [2.0]
    for bad in ["no_such_reward", f"{user_file}:missing", "no_such_module_xyz:f", "/missing/file.py:f", 3]:
        with pytest.raises(RewardError):
            resolve_reward_func(bad)


# ---- property tests ---------------------------------------------------------------------------------
FRAGMENTS = ["<reasoning>", "</reasoning>", "<answer>", "</answer>", "\n", " ", "72", "-3", "1,000", "1/2", ".", "$",
             "%", "e", "٧", "🙂", "\x00", "####"]
texts = st.one_of(st.text(max_size=300), st.lists(st.sampled_from(FRAGMENTS), max_size=40).map("".join))
RANGES = {
    "soft_format_reward_func": {0.0, 0.5}, "strict_format_reward_func": {0.0, 0.5}, "int_reward_func": {0.0, 0.5},
    "correctness_reward_func": {0.0, 2.0}, "numeric_correctness_reward_func": {0.0, 2.0},
    "format_reward_func": {0.0, 1.0},
}


@settings(max_examples=300, deadline=None)
@given(text=texts, ref=st.one_of(texts, st.none(), st.integers()))
def test_property_no_raise_and_scores_in_range(text, ref):
    for kind in ([text], conv([text])):
        for name, func in REWARD_FUNCS.items():
            (score,) = func(prompts=[None], completions=kind, answer=[ref], completion_ids=[[1]], trainer_state=None)
            assert isinstance(score, float) and not math.isnan(score), name
            if name == "xmlcount_reward_func":
                assert -0.002 * len(text) - 1e-12 <= score <= 0.5 + 1e-12
            else:
                assert score in RANGES[name], (name, score)
    for ours, ref_func in PAIRS:  # and still the notebook's scores
        kw = dict(prompts=[None], completions=conv([text]), answer=["72"])
        assert ours(**kw) == ref_func(**kw)


@settings(max_examples=300, deadline=None)
@given(text=texts)
def test_property_parse_number_total(text):
    value, number = parse_rational(text), parse_number(text)
    assert value is None or isinstance(value, Fraction)
    assert number is None or (math.isfinite(number) and number == float(value))


@settings(max_examples=200, deadline=None)
@given(n=st.fractions(max_denominator=10 ** 6).filter(lambda f: abs(f) < 10 ** 12),
       fmt=st.sampled_from(["{:.6f}", "{:.0f}", "{:,.2f}", "${:,.3f}", "{:.4e}"]))
def test_property_formatted_numbers_round_trip(n, fmt):
    text = fmt.format(float(n)).replace("$-", "-$")
    assert parse_number(text) == pytest.approx(float(text.replace("$", "").replace(",", "")), rel=1e-12, abs=0)
    integer = n.numerator // n.denominator
    assert parse_rational(f"{integer:,}") == integer
    assert parse_rational(f"{n.numerator}/{n.denominator}") == n
