"""Reward functions: ready ones (the GSM8K notebook's, numeric answers) and the safe runner for any.

Every reward function follows TRL's convention
`f(prompts, completions, completion_ids=None, **dataset_columns, trainer_state=None) -> list[float | None]`.
`REWARD_FUNCS` maps the names a YAML config may use to the ready functions; `resolve_reward_func`
also takes `"package.module:function"` or `"path/to/file.py:function"` for a user's own.
"""
from __future__ import annotations

import importlib
import importlib.util
from pathlib import Path

from ahazero.rewards.format import (
    correctness_reward_func,
    count_xml,
    format_reward_func,
    int_reward_func,
    numeric_correctness_reward_func,
    soft_format_reward_func,
    strict_format_reward_func,
    xmlcount_reward_func,
)
from ahazero.rewards.parsing import (
    completion_text,
    extract_hash_answer,
    extract_xml_answer,
    parse_number,
    parse_rational,
)
from ahazero.rewards.runner import RewardError, check_columns, reward_func_name, run_reward_funcs

REWARD_FUNCS: dict[str, callable] = {
    f.__name__: f
    for f in (xmlcount_reward_func, soft_format_reward_func, strict_format_reward_func, int_reward_func,
              correctness_reward_func, numeric_correctness_reward_func, format_reward_func)
}
# The notebook's five, in its order: `reward_funcs = GSM8K_NOTEBOOK_REWARDS` reproduces it.
GSM8K_NOTEBOOK_REWARDS = [xmlcount_reward_func, soft_format_reward_func, strict_format_reward_func,
                          int_reward_func, correctness_reward_func]


def resolve_reward_func(spec):
    """A reward function from a config entry: a callable, a `REWARD_FUNCS` name, `module:attr` or `file.py:attr`."""
    if callable(spec):
        return spec
    if not isinstance(spec, str):
        raise RewardError(f"a reward function must be a name or a callable, got {spec!r}")
    if spec in REWARD_FUNCS:
        return REWARD_FUNCS[spec]
    if ":" not in spec:
        raise RewardError(f"unknown reward function {spec!r}; ready ones: {sorted(REWARD_FUNCS)}, "
                          f"or give 'package.module:function' or 'path/to/file.py:function'")
    where, _, attr = spec.rpartition(":")
    module = _load_module(where, spec)
    func = getattr(module, attr, None)
    if not callable(func):
        raise RewardError(f"{where!r} has no callable {attr!r} (from reward function spec {spec!r})")
    return func


def _load_module(where: str, spec: str):
    if where.endswith(".py"):
        path = Path(where).expanduser()
        if not path.is_file():
            raise RewardError(f"reward function file {str(path)!r} not found (from {spec!r})")
        module_spec = importlib.util.spec_from_file_location(f"ahazero_user_rewards_{path.stem}", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(where)
    except ImportError as exc:
        raise RewardError(f"cannot import module {where!r} for reward function {spec!r}: {exc}") from exc


__all__ = [
    "REWARD_FUNCS", "GSM8K_NOTEBOOK_REWARDS", "RewardError", "check_columns", "completion_text", "correctness_reward_func",
    "count_xml", "extract_hash_answer", "extract_xml_answer", "format_reward_func", "int_reward_func",
    "numeric_correctness_reward_func", "parse_number", "parse_rational", "resolve_reward_func",
    "reward_func_name", "run_reward_funcs", "soft_format_reward_func", "strict_format_reward_func",
    "xmlcount_reward_func",
]
