"""Reward functions for GRPO (train.grpo.reward_funcs), in TRL's convention, and the built-ins.

A reward function is `fn(prompts, completions, **columns) -> list[float | None]`, one value per
completion, exactly as TRL's GRPOTrainer calls it: `prompts` as the records wrote them (chat
messages or strings), `completions` in the same form (a chat prompt gets
`[{"role": "assistant", "content": text}]`, a string prompt a string), `completion_ids` the
sampled token ids, and every other column of the prompt records by name (e.g. `answer`). None
means "not applicable": the weighted sum skips it (TRL's nansum); a completion every function
skips has no reward and no advantage. So a user's TRL reward file works unchanged.

Functions are named `module:function` and imported from the working directory (then sys.path);
`reward_modules` lists the user's files so the driver ships them to every worker through the
runtime env (py_modules), `ray job submit` included. A function that raises, returns the wrong
number of values or a non-number is a `RewardError` naming the function and the sample, never a
silent 0.

Built-ins: `raylm.rewards:exact_match`, `raylm.rewards:format_regex`, `raylm.rewards:length`,
`raylm.rewards:gsm8k` (and `gsm8k_flexible`) for GSM8K's "#### 42" answers.
"""

from __future__ import annotations

import importlib
import math
import os
import re
import sys
from typing import Any, Callable, Optional, Sequence

import numpy as np

from raylm.errors import InputError

RewardFn = Callable[..., list]


class RewardError(InputError):
    """A reward function that cannot be imported, raised, or returned something unusable."""


# ------------------------------------------------------------------ naming and importing


def load_reward(name: str) -> RewardFn:
    """`module:function` -> the function, importing the module from the working directory first."""
    module_name, _, fn_name = name.partition(":")
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # ImportError, or the user's module failing at import
        raise RewardError(f"train.grpo.reward_funcs: cannot import {module_name!r} for {name!r} "
                          f"({type(exc).__name__}: {exc}); it must be importable from the working directory") from exc
    fn = getattr(module, fn_name, None)
    if not callable(fn):
        raise RewardError(f"train.grpo.reward_funcs: {module_name!r} has no function {fn_name!r} (for {name!r})")
    return fn


def load_rewards(names: Sequence[str]) -> list[RewardFn]:
    return [load_reward(n) for n in names]


def reward_modules(names: Sequence[str]) -> list[str]:
    """The user's reward files or packages (not raylm's, not installed ones), for the runtime env's
    py_modules: each top-level module's .py file or package folder."""
    out: list[str] = []
    for name in names:
        top = name.partition(":")[0].split(".")[0]
        if top == "raylm":
            continue
        load_reward(name)
        origin = getattr(sys.modules[top], "__file__", None)
        if not origin or "site-packages" in origin or "dist-packages" in origin:
            continue
        path = os.path.dirname(origin) if os.path.basename(origin) == "__init__.py" else origin
        if path not in out:
            out.append(path)
    return out


def reward_name(name: str) -> str:
    """The metric name of a reward function: its function name, as TRL logs rewards/<name>/mean."""
    return name.partition(":")[2]


# ------------------------------------------------------------------ scoring


def _describe(i: int, prompts: Sequence[Any], completions: Sequence[Any]) -> str:
    return f"sample {i} (prompt {_text(prompts[i])!r:.200}, completion {_text(completions[i])!r:.200})"


def _call(name: str, fn: RewardFn, prompts: list, completions: list, completion_ids: list, columns: dict) -> list:
    """fn over the batch; when it raises, it is called sample by sample to name the one that fails."""
    try:
        return fn(prompts=prompts, completions=completions, completion_ids=completion_ids, **columns)
    except Exception as batch_exc:
        for i in range(len(prompts)):
            try:
                fn(prompts=prompts[i:i + 1], completions=completions[i:i + 1], completion_ids=completion_ids[i:i + 1],
                   **{k: v[i:i + 1] for k, v in columns.items()})
            except Exception as exc:
                raise RewardError(f"reward function {name} raised on {_describe(i, prompts, completions)}: "
                                  f"{type(exc).__name__}: {exc}") from exc
        raise RewardError(f"reward function {name} raised on the batch of {len(prompts)} completions (on none "
                          f"alone): {type(batch_exc).__name__}: {batch_exc}") from batch_exc


def score(names: Sequence[str], funcs: Sequence[RewardFn], prompts: list, completions: list,
          completion_ids: list, columns: dict[str, list]) -> np.ndarray:
    """Rewards per function, shape (completions, functions), NaN where a function returned None."""
    n = len(prompts)
    out = np.full((n, len(funcs)), np.nan, dtype=np.float32)
    for j, (name, fn) in enumerate(zip(names, funcs)):
        values = _call(name, fn, prompts, completions, completion_ids, columns)
        if not isinstance(values, (list, tuple, np.ndarray)) or len(values) != n:
            got = len(values) if hasattr(values, "__len__") else type(values).__name__
            raise RewardError(f"reward function {name} returned {got} rewards for {n} completions "
                              f"(one per completion)")
        for i, v in enumerate(values):
            if v is None:
                continue
            if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
                raise RewardError(f"reward function {name} returned {v!r} for {_describe(i, prompts, completions)}; "
                                  f"a reward is a number or None")
            out[i, j] = float(v)
    return out


def combine(per_func: np.ndarray, weights: Sequence[float]) -> np.ndarray:
    """The weighted sum over functions, skipping None (nansum, as TRL); NaN where every one was None."""
    total = np.nansum(per_func * np.asarray(weights, dtype=np.float32)[None, :], axis=1)
    total[np.isnan(per_func).all(axis=1)] = np.nan
    return total


# ------------------------------------------------------------------ built-ins

_NUMBER = re.compile(r"-?\d+(?:\.\d+)?")
FORMAT_PATTERN = r"\s*-?\d+(?:\.\d+)?\s*"  # format_regex's default: the completion is a lone number


def _text(x: Any) -> str:
    """A completion (or prompt) as text: a string, or the last message's content."""
    if isinstance(x, str):
        return x
    if isinstance(x, list) and x and isinstance(x[-1], dict):
        return str(x[-1].get("content", ""))
    return str(x)


def _first_number(text: str) -> Optional[float]:
    m = _NUMBER.search(text)
    return float(m.group()) if m else None


def _column(kwargs: dict, name: str, fn: str) -> list:
    if name not in kwargs:
        raise KeyError(f"{fn} needs a column {name!r} in the prompt records (columns here: "
                       f"{sorted(k for k in kwargs if k != 'completion_ids')})")
    return kwargs[name]


def exact_match(prompts: list, completions: list, **kwargs: Any) -> list[Optional[float]]:
    """1.0 when the completion answers the record's `answer` column, else 0.0; None without one.

    A numeric answer is matched by the first number in the completion (so " 72" and "72." both
    count; "7 2" does not); any other answer by the completion's stripped text."""
    out: list[Optional[float]] = []
    for c, answer in zip(completions, _column(kwargs, "answer", "exact_match")):
        if answer is None:
            out.append(None)
            continue
        text, want = _text(c), str(answer).strip()
        if _NUMBER.fullmatch(want):
            got = _first_number(text)
            out.append(float(got is not None and math.isclose(got, float(want))))
        else:
            out.append(float(text.strip() == want))
    return out


_GSM8K_FINAL = re.compile(r"####\s*\$?\s*(-?[\d,]*\.?\d+)")
_ANY_NUMBER = re.compile(r"-?[\d,]*\.?\d+")


def _plain_number(text: str) -> Optional[float]:
    try:
        return float(text.replace(",", ""))
    except ValueError:
        return None


def gsm8k_answer(text: str, strict: bool = True) -> Optional[float]:
    """The final answer of a GSM8K solution or completion: the number after its last "####"
    (GSM8K's answer column ends with "#### 72"; thousands separators and a "$" are allowed). Not
    strict: without a "####", the text's last number. None when there is none."""
    found = _GSM8K_FINAL.findall(text)
    if not found and not strict:
        found = [m for m in _ANY_NUMBER.findall(text) if any(ch.isdigit() for ch in m)]
    for candidate in reversed(found):
        value = _plain_number(candidate)
        if value is not None:
            return value
    return None


def _gsm8k(completions: list, kwargs: dict, strict: bool, fn: str) -> list[Optional[float]]:
    out: list[Optional[float]] = []
    for c, answer in zip(completions, _column(kwargs, "answer", fn)):
        want = None if answer is None else gsm8k_answer(str(answer), strict=False)  # "#### 72", or a bare "72"
        if want is None:
            out.append(None)
            continue
        got = gsm8k_answer(_text(c), strict=strict)
        out.append(float(got is not None and math.isclose(got, want, rel_tol=0, abs_tol=1e-6)))
    return out


def gsm8k(prompts: list, completions: list, **kwargs: Any) -> list[Optional[float]]:
    """GSM8K: 1.0 when the number after the completion's last "####" equals the one after the
    `answer` column's "####" (GSM8K's own answer text, or a bare number), else 0.0 (no "####":
    0.0, as verl's strict GSM8K score, so the format is learned too); None without an answer."""
    return _gsm8k(completions, kwargs, True, "gsm8k")


def gsm8k_flexible(prompts: list, completions: list, **kwargs: Any) -> list[Optional[float]]:
    """gsm8k, but a completion without "####" is judged by its last number."""
    return _gsm8k(completions, kwargs, False, "gsm8k_flexible")


def format_regex(prompts: list, completions: list, **kwargs: Any) -> list[float]:
    """1.0 when the whole completion matches the record's `format_pattern` column (re.fullmatch,
    DOTALL), or FORMAT_PATTERN (a lone number) without one, else 0.0. For a fixed pattern of your
    own, `my_rewards.py: my_format = raylm.rewards.regex_reward(r"...")`."""
    patterns = kwargs.get("format_pattern") or [None] * len(completions)
    return [float(re.fullmatch(p or FORMAT_PATTERN, _text(c), re.DOTALL) is not None)
            for c, p in zip(completions, patterns)]


def regex_reward(pattern: str) -> RewardFn:
    """A reward function giving 1.0 to completions that fully match `pattern`, else 0.0."""
    compiled = re.compile(pattern, re.DOTALL)

    def reward(prompts: list, completions: list, **kwargs: Any) -> list[float]:
        return [float(compiled.fullmatch(_text(c)) is not None) for c in completions]

    return reward


def length(prompts: list, completions: list, completion_ids: Optional[list] = None, **kwargs: Any) -> list[float]:
    """The completion's length in tokens (in characters without completion_ids). Weigh it with a
    negative train.grpo.reward_weights entry to penalise long answers, a positive one to reward them."""
    if completion_ids is not None:
        return [float(len(ids)) for ids in completion_ids]
    return [float(len(_text(c))) for c in completions]
