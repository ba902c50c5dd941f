"""Calling user reward functions safely: TRL's calling convention, with errors that say what broke.

Follows TRL's `GRPOTrainer._calculate_rewards` (trl 1.x): each function is called once per batch as
`f(prompts=..., completions=..., completion_ids=..., **columns, trainer_state=...)`, None becomes NaN,
the result is a `[N, F]` float32 tensor. What we add:

- `check_columns` before the first step: a function that needs a column the dataset lacks fails at
  once, naming the function and the column, instead of a TypeError at step one.
- A function without `**kwargs` is only given the keywords it names (TRL would pass them all and fail
  on the first one it does not know), so `def f(completions, answer)` works.
- A function that raises is called again row by row to find the first failing row; the error names
  the function, the row and the head of its prompt.
- Return values are checked: a list/tuple/array/tensor of N values, each None, a bool (True = 1.0,
  False = 0.0: `[a == b for ...]` is a fine reward) or anything `float()` takes except `str`/`bytes`;
  NaN is kept (read as None), +-inf is an error (it would poison the group's advantages).
- `async def` functions are awaited (in a helper thread, so this also works under a running loop), all of
  them concurrently; sync functions run one after another.
- Optional per-function timeout, in seconds: a `reward_timeout` attribute on the function
  (`f.reward_timeout = 5.0`; read through `functools.partial` and bound methods), or the caller's
  `timeouts={name: seconds}`, which wins. A sync function then runs in a daemon worker thread that is
  abandoned at the deadline (Python cannot stop a thread: it runs on until it returns, and while
  `MAX_ABANDONED` calls of a function are still running it is not called again); an async one is
  cancelled by `asyncio.wait_for`. A timed-out call scores its whole batch NaN ("not applicable", as
  None) and adds N to the caller's `stats["rewards/<name>/timeouts"]` (present, possibly 0, for every
  function with a timeout); training goes on. A timeout is not an error, so it is never retried.
"""
from __future__ import annotations

import asyncio
import functools
import inspect
import math
import threading
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

import torch

# Keywords the runner always provides; dataset columns with these names are not passed (as in TRL).
PROVIDED = ("prompts", "completions", "completion_ids", "trainer_state")
NOT_PASSED_COLUMNS = ("prompt", "completion", "completion_ids")
_PROMPT_HEAD_CHARS = 80
_FLOAT32_MAX = torch.finfo(torch.float32).max
_warned_all_none: set[str] = set()
_warned_timeout: set[str] = set()
MAX_ABANDONED = 4  # timed-out calls of one function that may still be running before it is skipped
_CANCEL_GRACE_S = 1.0  # time an async function gets to finish after wait_for cancelled it
_abandoned: dict[str, list[threading.Thread]] = {}


class RewardError(RuntimeError):
    """A reward function cannot be called on this data, raised, or returned something unusable."""


def reward_func_name(func) -> str:
    """The name TRL logs a reward under: `__name__`, the wrapped function's for a partial, else the class."""
    while isinstance(func, functools.partial):
        func = func.func
    name = getattr(func, "__name__", None)
    return name if isinstance(name, str) else type(func).__name__


def _signature(func) -> inspect.Signature | None:
    try:
        return inspect.signature(func)
    except (TypeError, ValueError):  # some builtins and C callables have none: pass everything
        return None


def _takes_var_keyword(sig: inspect.Signature | None) -> bool:
    return sig is None or any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())


def missing_columns(func, dataset_columns) -> list[str]:
    """The required keyword parameters of `func` that neither the runner nor the dataset provides."""
    sig = _signature(func)
    if sig is None:
        return []
    available = set(PROVIDED) | (set(dataset_columns) - set(NOT_PASSED_COLUMNS))
    return [name for name, p in sig.parameters.items()
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
            and p.default is p.empty and name not in available]


def check_columns(reward_funcs, dataset_columns: list[str]) -> None:
    """Raise RewardError if a reward function cannot be called with the dataset's columns.

    A parameter without a default must be one of `prompts, completions, completion_ids, trainer_state`
    or a dataset column (other than `prompt`/`completion`/`completion_ids`, which TRL does not pass as
    columns); `**kwargs` does not excuse a named one. Positional-only parameters without a default
    cannot be passed by keyword and are refused too.
    """
    for func in reward_funcs:
        if not callable(func):
            raise RewardError(f"reward function {func!r} is not callable")
        name = reward_func_name(func)
        sig = _signature(func)
        if sig is not None:
            pos_only = [n for n, p in sig.parameters.items() if p.kind is p.POSITIONAL_ONLY and p.default is p.empty]
            if pos_only:
                raise RewardError(f"reward function {name!r} has positional-only parameter(s) {pos_only}; "
                                  f"reward functions are called with keywords only")
        missing = missing_columns(func, dataset_columns)
        if missing:
            raise RewardError(
                f"reward function {name!r} needs column(s) {missing} that the dataset lacks "
                f"(dataset columns: {sorted(dataset_columns)}; always passed: {list(PROVIDED)})")


def _call_kwargs(func, kwargs: dict) -> dict:
    """All of `kwargs` for a function with `**kwargs`, else only the names its signature lists."""
    sig = _signature(func)
    if _takes_var_keyword(sig):
        return kwargs
    return {k: v for k, v in kwargs.items() if k in sig.parameters}


def _call(func, kwargs: dict, timeout: float | None = None):
    """`func(**kwargs)`, awaited if it returns an awaitable; TimeoutError after `timeout` seconds."""
    if timeout is not None:
        return _call_with_timeout(func, kwargs, timeout)
    out = func(**_call_kwargs(func, kwargs))
    if inspect.isawaitable(out):
        with ThreadPoolExecutor(max_workers=1) as pool:
            out = pool.submit(asyncio.run, _awaited(out)).result()
    return out


async def _awaited(awaitable, timeout: float | None = None):
    return await asyncio.wait_for(awaitable, timeout)


class RewardTimeout(Exception):
    """A reward function gave no result within its timeout (not an error: its scores become NaN)."""


def _call_with_timeout(func, kwargs: dict, timeout: float):
    """Run `_call` in a daemon thread (it never blocks interpreter exit); abandon it at the deadline."""
    name = reward_func_name(func)
    running = _abandoned[name] = [t for t in _abandoned.get(name, []) if t.is_alive()]
    if len(running) >= MAX_ABANDONED:
        raise RewardTimeout(f"{len(running)} earlier timed-out calls are still running; not called again")
    deadline = time.monotonic() + timeout
    box: dict = {}

    def work():
        try:
            out = func(**_call_kwargs(func, kwargs))
            if inspect.isawaitable(out):
                box["awaiting"] = True
                try:
                    out = asyncio.run(_awaited(out, max(deadline - time.monotonic(), 0.0)))
                except TimeoutError:
                    if time.monotonic() < deadline:
                        raise  # the function's own TimeoutError: an error like any other
                    raise RewardTimeout(f"cancelled after {timeout:g} s") from None
            box["out"] = out
        except BaseException as exc:  # noqa: BLE001 - handed to the caller's thread
            box["exc"] = exc

    thread = threading.Thread(target=work, name=f"reward-{name}", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive() and box.get("awaiting"):
        thread.join(_CANCEL_GRACE_S)  # wait_for is cancelling it: let the coroutine unwind
    if thread.is_alive():
        running.append(thread)
        raise RewardTimeout(f"no result after {timeout:g} s")
    if "exc" in box:
        raise box["exc"]
    return box["out"]


def func_timeout(func, timeouts: dict[str, float] | None = None) -> float | None:
    """The timeout in seconds of a reward function: the caller's `timeouts[name]`, else its
    `reward_timeout` attribute (looked up on partials' wrapped function too), else None."""
    name = reward_func_name(func)
    if timeouts and name in timeouts:
        value = timeouts[name]
    else:
        value = getattr(func, "reward_timeout", None)
        while value is None and isinstance(func, functools.partial):
            func = func.func
            value = getattr(func, "reward_timeout", None)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0 or math.isinf(value):
        raise RewardError(f"reward function {name!r}: timeout must be a positive number of seconds, got {value!r}")
    return float(value)


def _prompt_head(prompt) -> str:
    """The start of a prompt for an error message: the string, or the last message's content."""
    if isinstance(prompt, (list, tuple)) and prompt and isinstance(prompt[-1], dict):
        prompt = prompt[-1].get("content", prompt[-1])
    text = prompt if isinstance(prompt, str) else repr(prompt)
    return text[:_PROMPT_HEAD_CHARS] + ("..." if len(text) > _PROMPT_HEAD_CHARS else "")


def _first_failing_row(func, kwargs: dict, n: int, timeout: float | None) -> tuple[int, BaseException] | None:
    """Call `func` on one row at a time; the first row that raises, or None if none does (a row that
    times out does not count as raising)."""
    for i in range(n):
        row = {k: (v if k == "trainer_state" else v[i:i + 1]) for k, v in kwargs.items()}
        try:
            _call(func, row, timeout)
        except RewardTimeout:
            continue
        except Exception as exc:  # noqa: BLE001 - we report it
            return i, exc
    return None


def _to_floats(name: str, out, n: int) -> list[float]:
    """Check a reward function's return value and turn it into N floats (None -> NaN)."""
    if isinstance(out, torch.Tensor):
        out = out.detach().to("cpu", torch.float64).reshape(-1).tolist()
    elif out is None or isinstance(out, (str, bytes, dict, set, frozenset)) or not hasattr(out, "__iter__"):
        raise RewardError(f"reward function {name!r} returned {type(out).__name__}; "
                          f"expected a list of {n} floats (or None)")
    values = list(out)
    if len(values) != n:
        raise RewardError(f"reward function {name!r} returned {len(values)} rewards for {n} completions; "
                          f"it must return one reward (float or None) per completion")
    return [_to_float(name, i, v) for i, v in enumerate(values)]


def _to_float(name: str, i: int, value) -> float:
    if value is None:
        return math.nan
    if isinstance(value, (str, bytes)):
        raise RewardError(f"reward function {name!r} returned a string {value!r:.60} at row {i}; "
                          f"rewards must be numbers or None")
    try:
        result = float(value)
    except (TypeError, ValueError, OverflowError) as exc:
        raise RewardError(f"reward function {name!r} returned {type(value).__name__} {value!r:.60} at row {i}; "
                          f"rewards must be finite numbers or None") from exc
    if math.isinf(result) or abs(result) > _FLOAT32_MAX:
        raise RewardError(f"reward function {name!r} returned {result} at row {i}; rewards must be finite "
                          f"in float32")
    return result


def _warn_if_all_none(name: str, scores: list[float]) -> None:
    if scores and all(math.isnan(s) for s in scores) and name not in _warned_all_none:
        _warned_all_none.add(name)
        warnings.warn(f"reward function {name!r} returned None for every completion of a batch; it adds "
                      f"nothing to the rewards (warned once)", RuntimeWarning, stacklevel=3)


def _warn_timeout(name: str, exc: RewardTimeout) -> None:
    if name not in _warned_timeout:
        _warned_timeout.add(name)
        warnings.warn(f"reward function {name!r} timed out ({exc}); its scores for the batch are None, counted "
                      f"as rewards/{name}/timeouts (warned once)", RuntimeWarning, stacklevel=4)


def _is_async(func) -> bool:
    """`async def` functions, callables with an `async def __call__`, and partials of either."""
    while isinstance(func, functools.partial):
        func = func.func
    return inspect.iscoroutinefunction(func) or inspect.iscoroutinefunction(getattr(func, "__call__", None))


def _run_one(func, kwargs: dict, n: int, prompts: list, timeout: float | None = None) -> list[float] | None:
    """The function's N scores, or None when it timed out."""
    name = reward_func_name(func)
    try:
        out = _call(func, kwargs, timeout)
    except RewardTimeout as exc:
        _warn_timeout(name, exc)
        return None
    except Exception as exc:  # noqa: BLE001 - re-raised with context
        failing = _first_failing_row(func, kwargs, n, timeout)
        where = (f" at row {failing[0]} (prompt: {_prompt_head(prompts[failing[0]])!r})" if failing
                 else " (on the whole batch; no single row fails alone)")
        raise RewardError(f"reward function {name!r} raised {type(exc).__name__}: {exc}{where}") from exc
    scores = _to_floats(name, out, n)
    _warn_if_all_none(name, scores)
    return scores


def run_reward_funcs(reward_funcs, *, prompts: list, completions: list, completion_ids: list[list[int]],
                     columns: dict[str, list], trainer_state=None,
                     timings: dict[str, float] | None = None, timeouts: dict[str, float] | None = None,
                     stats: dict[str, float] | None = None) -> torch.Tensor:
    """Score N completions with F reward functions: a `[N, F]` float32 tensor, NaN where a function said None.

    `prompts`, `completions`, `completion_ids` and every column hold N entries (one per completion:
    the caller repeats each prompt's row G times). Columns named `prompt`/`completion`/`completion_ids`
    are not passed (as in TRL). Raises RewardError as described in the module docstring. When a
    `timings` dict is given, it receives each function's wall time in seconds under its name.
    `timeouts` maps function names to seconds (over their `reward_timeout` attribute); a `stats` dict
    receives `rewards/<name>/timeouts` (completions scored NaN by a timeout) for each function with one,
    ready to log as metrics.
    """
    n = len(completions)
    for key, seq in [("prompts", prompts), ("completion_ids", completion_ids), *columns.items()]:
        if len(seq) != n:
            raise ValueError(f"run_reward_funcs: {key!r} has {len(seq)} entries for {n} completions")
    kwargs = {k: list(v) for k, v in columns.items() if k not in NOT_PASSED_COLUMNS}
    kwargs.update(prompts=list(prompts), completions=list(completions), completion_ids=list(completion_ids),
                  trainer_state=trainer_state)
    unknown = set(timeouts or {}) - {reward_func_name(f) for f in reward_funcs}
    if unknown:
        raise RewardError(f"timeouts name no reward function: {sorted(unknown)}")
    limits = [func_timeout(func, timeouts) for func in reward_funcs]
    rewards = torch.empty(n, len(reward_funcs), dtype=torch.float32)  # [N, F]
    if not n:
        for func, timeout in zip(reward_funcs, limits):
            if timeout is not None and stats is not None:
                stats.setdefault(f"rewards/{reward_func_name(func)}/timeouts", 0)
        return rewards

    def score(func, timeout):
        start = time.perf_counter()
        return _run_one(func, kwargs, n, prompts, timeout), time.perf_counter() - start

    # async functions run concurrently (each awaited in its own thread); sync ones one after another here
    concurrent = [j for j, f in enumerate(reward_funcs) if _is_async(f)]
    with ThreadPoolExecutor(max_workers=max(len(concurrent), 1)) as pool:
        pending = {j: pool.submit(score, reward_funcs[j], limits[j]) for j in concurrent}
        results = {j: score(f, limits[j]) for j, f in enumerate(reward_funcs) if j not in pending}
        results.update({j: future.result() for j, future in pending.items()})
    for j, (func, timeout) in enumerate(zip(reward_funcs, limits)):
        name = reward_func_name(func)
        scores, seconds = results[j]
        if timeout is not None and stats is not None:
            stats.setdefault(f"rewards/{name}/timeouts", 0)
        if scores is None:  # timed out: "not applicable" for the whole batch
            scores = [math.nan] * n
            if stats is not None:
                stats[f"rewards/{name}/timeouts"] += n
        rewards[:, j] = torch.tensor(scores, dtype=torch.float32)
        if timings is not None:
            timings[name] = seconds
    return rewards
