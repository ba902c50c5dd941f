"""The reward runner: TRL's calling convention, its [N, F] result, and an error for every way a user
function can go wrong (raise, wrong length, strings, inf, missing columns)."""
import asyncio
import functools
import math
import threading
import time
import warnings

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
import torch

from ahazero.rewards import GSM8K_NOTEBOOK_REWARDS, REWARD_FUNCS
from ahazero.rewards import runner
from ahazero.rewards.runner import RewardError, check_columns, reward_func_name, run_reward_funcs

PROMPTS = [[{"role": "user", "content": f"question {i}: how many apples?"}] for i in range(4)]
COMPLETIONS = [[{"role": "assistant", "content": f"<answer>{i}</answer>"}] for i in range(4)]
IDS = [[1, 2], [3], [4, 5, 6], []]
COLUMNS = {"answer": ["0", "1", "7", "3"], "prompt": PROMPTS, "level": [1, 2, 3, 4]}


def run(funcs, columns=COLUMNS, n=4, **kw):
    return run_reward_funcs(funcs, prompts=PROMPTS[:n], completions=COMPLETIONS[:n], completion_ids=IDS[:n],
                            columns={k: v[:n] for k, v in columns.items()}, **kw)


def reference(funcs, **kwargs):
    """The obvious loop: call each function, None -> NaN, stack as columns."""
    cols = [[math.nan if v is None else float(v) for v in f(**kwargs)] for f in funcs]
    return torch.tensor(cols, dtype=torch.float32).T


def test_matches_the_plain_loop_on_ready_functions():
    funcs = list(REWARD_FUNCS.values())
    got = run(funcs, trainer_state="S")
    want = reference(funcs, prompts=PROMPTS, completions=COMPLETIONS, completion_ids=IDS,
                     answer=COLUMNS["answer"], level=COLUMNS["level"], trainer_state="S")
    assert got.shape == (4, len(funcs)) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, equal_nan=True)


def test_keywords_are_passed_as_trl_does():
    seen = {}

    def spy(**kwargs):
        seen.update(kwargs)
        return [0.0] * len(kwargs["completions"])

    run([spy], trainer_state="STATE")
    assert set(seen) == {"prompts", "completions", "completion_ids", "answer", "level", "trainer_state"}  # no "prompt"
    assert seen["prompts"] == PROMPTS and seen["completions"] == COMPLETIONS and seen["completion_ids"] == IDS
    assert seen["answer"] == COLUMNS["answer"] and seen["trainer_state"] == "STATE"


def test_function_without_var_keywords_gets_only_its_names():
    def narrow(completions, answer):
        return [float(a) for a in answer]

    assert run([narrow])[:, 0].tolist() == [0.0, 1.0, 7.0, 3.0]


def test_none_becomes_nan_and_return_kinds():
    def some_none(completions, **kw):
        return [None, 1.0, None, 2]

    def bools(completions, answer, **kw):
        return [a == "1" for a in answer]

    def as_numpy(completions, **kw):
        return np.arange(4, dtype=np.float64)

    def as_tensor(completions, **kw):
        return torch.arange(4, dtype=torch.bfloat16)

    def as_tuple_with_nan(completions, **kw):
        return (math.nan, np.float32(0.5), np.int64(3), np.bool_(True))

    got = run([some_none, bools, as_numpy, as_tensor, as_tuple_with_nan])
    want = torch.tensor([[math.nan, 1.0, math.nan, 2.0], [0.0, 1.0, 0.0, 0.0], [0.0, 1.0, 2.0, 3.0],
                         [0.0, 1.0, 2.0, 3.0], [math.nan, 0.5, 3.0, 1.0]]).T
    torch.testing.assert_close(got, want, equal_nan=True)


def test_async_function_is_awaited():
    async def slow(completions, **kw):
        await asyncio.sleep(0)
        return [1.0] * len(completions)

    assert run([slow]).tolist() == [[1.0]] * 4


def test_raise_names_function_first_failing_row_and_prompt():
    def picky(completions, level, **kw):
        return [1.0 / (3 - lv) for lv in level]  # row 2 has level 3

    with pytest.raises(RewardError) as info:
        run([picky])
    msg = str(info.value)
    assert "'picky'" in msg and "ZeroDivisionError" in msg and "row 2" in msg and "question 2" in msg
    assert isinstance(info.value.__cause__, ZeroDivisionError)


def test_raise_only_on_the_whole_batch():
    def batch_only(completions, **kw):
        if len(completions) > 1:
            raise ValueError("batch too big")
        return [0.0]

    with pytest.raises(RewardError, match=r"'batch_only' raised ValueError: batch too big \(on the whole batch"):
        run([batch_only])


@pytest.mark.parametrize("out, match", [
    ([1.0, 2.0], "returned 2 rewards for 4 completions"),
    ([1.0] * 5, "returned 5 rewards for 4 completions"),
    (None, "returned NoneType"),
    ("1234", "returned str"),
    (1.0, "returned float"),
    ({"a": 1}, "returned dict"),
    ([1.0, "2", 3.0, 4.0], "a string '2' at row 1"),
    ([1.0, [2.0], 3.0, 4.0], "returned list"),
    ([1.0, 2.0, math.inf, 4.0], "returned inf at row 2"),
    ([1.0, 2.0, 1e300, 4.0], "finite in float32"),
    ([10 ** 400, 0, 0, 0], "returned int"),
    ([1j, 0, 0, 0], "returned complex"),
])
def test_bad_return_values(out, match):
    def bad(completions, **kw):
        return out

    with pytest.raises(RewardError, match=match) as info:
        run([bad])
    assert "'bad'" in str(info.value)


def test_all_none_warns_once():
    runner._warned_all_none.discard("abstain")

    def abstain(completions, **kw):
        return [None] * len(completions)

    with pytest.warns(RuntimeWarning, match="'abstain' returned None for every completion"):
        got = run([abstain])
    assert torch.isnan(got).all()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        run([abstain])  # the second time is silent


def test_empty_batch_and_length_mismatch():
    assert run(GSM8K_NOTEBOOK_REWARDS, n=0).shape == (0, 5)
    with pytest.raises(ValueError, match="'answer' has 3 entries for 4 completions"):
        run_reward_funcs([], prompts=PROMPTS, completions=COMPLETIONS, completion_ids=IDS,
                         columns={"answer": ["1", "2", "3"]})


# ---- check_columns and names ------------------------------------------------------------------------
def test_check_columns_accepts_what_will_be_passed():
    def uses_all(prompts, completions, completion_ids, trainer_state, answer, **kwargs):
        return []

    def with_default(completions, difficulty=1, **kwargs):
        return []

    check_columns([uses_all, with_default, *REWARD_FUNCS.values()], ["prompt", "answer"])


def test_check_columns_names_function_and_missing_columns():
    def needs_more(completions, answer, solution, **kwargs):  # **kwargs does not excuse named parameters
        return []

    with pytest.raises(RewardError, match=r"'needs_more' needs column\(s\) \['answer', 'solution'\]"):
        check_columns([needs_more], ["prompt", "question"])
    with pytest.raises(RewardError, match="'correctness_reward_func' needs column"):
        check_columns(GSM8K_NOTEBOOK_REWARDS, ["prompt", "question"])


def test_check_columns_prompt_column_is_not_passed():
    def singular(prompt, completions, **kwargs):  # TRL passes `prompts`, never the `prompt` column
        return []

    with pytest.raises(RewardError, match=r"\['prompt'\]"):
        check_columns([singular], ["prompt", "answer"])


def test_check_columns_refuses_positional_only_and_non_callables():
    def pos_only(completions, /, **kwargs):
        return []

    with pytest.raises(RewardError, match="positional-only"):
        check_columns([pos_only], ["prompt"])
    with pytest.raises(RewardError, match="not callable"):
        check_columns(["int_reward_func"], ["prompt"])


class Scorer:
    def __call__(self, completions, answer, **kwargs):
        return [0.0] * len(completions)

    def method(self, completions, **kwargs):
        return [0.0] * len(completions)


def test_reward_func_name_and_callables():
    def base(completions, scale, **kwargs):
        return [scale] * len(completions)

    half = functools.partial(base, scale=0.5)
    assert reward_func_name(base) == "base"
    assert reward_func_name(half) == "base"
    assert reward_func_name(functools.partial(half)) == "base"
    assert reward_func_name(Scorer()) == "Scorer"
    assert reward_func_name(Scorer().method) == "method"
    assert reward_func_name(lambda completions, **kw: []) == "<lambda>"
    check_columns([half, Scorer(), Scorer().method], ["answer"])
    with pytest.raises(RewardError, match="'base' needs column\\(s\\) \\['scale'\\]"):
        check_columns([base], ["answer"])
    assert run([half, Scorer()]).tolist() == [[0.5, 0.0]] * 4


def test_timings_are_recorded_per_function():
    timings = {}
    run(GSM8K_NOTEBOOK_REWARDS, timings=timings)
    assert set(timings) == {f.__name__ for f in GSM8K_NOTEBOOK_REWARDS} and all(t >= 0 for t in timings.values())


# ---- property test: any return value is either converted exactly as the plain loop would, or refused ---
values = st.one_of(st.none(), st.booleans(), st.integers(-10 ** 6, 10 ** 6), st.floats(width=32),
                   st.text(max_size=3), st.lists(st.floats(), max_size=1))


@settings(max_examples=100, deadline=None)
@given(out=st.lists(values, min_size=0, max_size=6))
def test_property_any_return_is_converted_or_refused(out):
    def user(completions, **kw):
        return out

    ok = len(out) == 4 and all(v is None or (isinstance(v, (bool, int, float)) and not math.isinf(v)) for v in out)
    if not ok:
        with pytest.raises(RewardError, match="'user'"):
            run([user])
        return
    want = torch.tensor([[math.nan if v is None else float(v)] for v in out], dtype=torch.float32)
    torch.testing.assert_close(run([user]), want, equal_nan=True)


# ---- per-function timeouts --------------------------------------------------------------------------
def test_sync_function_past_its_timeout_is_abandoned_nan_and_counted():
    release = threading.Event()

    def hangs(completions, **kw):
        release.wait(30)
        return [1.0] * len(completions)

    def quick(completions, **kw):
        return [2.0] * len(completions)

    hangs.reward_timeout = 0.2
    quick.reward_timeout = 5
    runner._warned_timeout.discard("hangs")
    stats, start = {}, time.monotonic()
    with pytest.warns(RuntimeWarning, match="'hangs' timed out .*rewards/hangs/timeouts"):
        got = run([hangs, quick], stats=stats)
    assert time.monotonic() - start < 5  # abandoned, not waited for
    assert torch.isnan(got[:, 0]).all() and got[:, 1].tolist() == [2.0] * 4
    assert stats == {"rewards/hangs/timeouts": 4, "rewards/quick/timeouts": 0}
    run([hangs], stats=stats)  # counts add up over calls; warned once
    assert stats["rewards/hangs/timeouts"] == 8
    release.set()


def test_async_function_past_its_timeout_is_cancelled():
    cancelled = threading.Event()

    async def slow(completions, **kw):
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            cancelled.set()
            raise
        return [1.0] * len(completions)

    stats, start = {}, time.monotonic()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        got = run([slow], timeouts={"slow": 0.2}, stats=stats)
    assert time.monotonic() - start < 5 and cancelled.wait(5)
    assert torch.isnan(got).all() and stats == {"rewards/slow/timeouts": 4}


def test_functions_within_their_timeout_are_unchanged():
    async def fast_async(completions, **kw):
        await asyncio.sleep(0)
        return [0.5] * len(completions)

    def base(completions, scale, **kw):
        return [scale] * len(completions)

    half = functools.partial(base, scale=0.25)
    base.reward_timeout = 5.0  # read through the partial
    stats = {}
    got = run([fast_async, half, Scorer().method], timeouts={"fast_async": 5, "method": 5}, stats=stats)
    assert got.tolist() == [[0.5, 0.25, 0.0]] * 4
    assert stats == {"rewards/fast_async/timeouts": 0, "rewards/base/timeouts": 0, "rewards/method/timeouts": 0}


def test_errors_inside_a_timeout_are_still_errors():
    def picky(completions, level, **kw):
        return [1.0 / (3 - lv) for lv in level]

    async def own_timeout(completions, **kw):
        raise TimeoutError("the grader's HTTP call timed out")  # the function's, not the runner's

    picky.reward_timeout = 5
    with pytest.raises(RewardError, match=r"'picky' raised ZeroDivisionError.*row 2"):
        run([picky])
    with pytest.raises(RewardError, match="'own_timeout' raised TimeoutError: the grader's"):
        run([own_timeout], timeouts={"own_timeout": 5})


def test_a_function_whose_timed_out_calls_pile_up_is_not_called_again():
    release, calls = threading.Event(), []

    def stuck(completions, **kw):
        calls.append(1)
        release.wait(30)
        return [0.0] * len(completions)

    stats = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        for _ in range(runner.MAX_ABANDONED + 2):
            run([stuck], timeouts={"stuck": 0.05}, stats=stats)
    assert len(calls) == runner.MAX_ABANDONED  # the threads still running cap the calls
    assert stats == {"rewards/stuck/timeouts": 4 * (runner.MAX_ABANDONED + 2)}
    release.set()


@pytest.mark.parametrize("bad", [0, -1.0, math.inf, "5", True])
def test_bad_timeouts_are_refused(bad):
    def f(completions, **kw):
        return [0.0] * len(completions)

    with pytest.raises(RewardError, match="'f': timeout must be a positive number"):
        run([f], timeouts={"f": bad})
    with pytest.raises(RewardError, match="timeouts name no reward function"):
        run([f], timeouts={"g": 1.0})


def test_async_reward_functions_run_concurrently():
    import asyncio
    import time

    async def slow_a(completions, **kwargs):
        await asyncio.sleep(0.6)
        return [1.0] * len(completions)

    async def slow_b(completions, **kwargs):
        await asyncio.sleep(0.6)
        return [2.0] * len(completions)

    def plain(completions, **kwargs):
        return [3.0] * len(completions)

    start = time.perf_counter()
    out = run_reward_funcs([slow_a, plain, slow_b], prompts=["p"] * 2, completions=["a", "b"],
                           completion_ids=[[1], [2]], columns={})
    assert time.perf_counter() - start < 1.1  # one after another would take 1.2 s
    assert out.tolist() == [[1.0, 3.0, 2.0], [1.0, 3.0, 2.0]]
