"""The reward contract shared by runs, `posttrain score` and user code.

A reward is a plain function with verl's signature (so users' existing functions work unchanged):

    def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float | dict

It is called the way verl calls it, by keyword (`data_source=..., solution_str=..., ground_truth=...,
extra_info=...`); `bind_reward` refuses a function that cannot be called so (e.g. verl's own gsm8k
`compute_score(solution_str, ground_truth, method=...)`), naming the fix. A dict must carry "score"; its other
keys are details that get logged. Async functions are accepted. `load_reward` resolves a built-in name,
`package.module:function` or `path/to/file.py:function`; `call_reward` calls one and never raises: failures
become a zero score with a counted reason (`exception:Type`, `bad_result:...`, `non_finite`).

A reward that needs something started once before any sample is scored (a server that takes longer to start
than a reward's time limit) says so with two optional attributes on the function, called on the driver:

    compute_score.prepare = lambda kwargs: {...}   # once per (reward, kwargs); returns the kwargs to call it with
    compute_score.release = lambda: None           # once at the end of the run / `posttrain score`

(`rewards.judge` uses them to serve its judge model.)
"""
from __future__ import annotations

import asyncio
import dataclasses
import functools
import importlib
import importlib.util
import inspect
import math
import os
import sys
from typing import Any, Callable

# Built-in reward names → dotted paths, imported lazily so that `import rewards` stays cheap.
BUILTIN_REWARDS: dict[str, str] = {}


def register_builtin(name: str, dotted_path: str) -> None:
    BUILTIN_REWARDS[name] = dotted_path


@dataclasses.dataclass
class RewardResult:
    score: float
    details: dict[str, Any] = dataclasses.field(default_factory=dict)
    failure: str | None = None  # None on success, else a short kind: "exception:ValueError", "timeout", ...


class RewardSpecError(ValueError):
    """A reward name or path that cannot be resolved; the message says how to fix it."""


def load_user_module(target: str, what: str, error: type[Exception]):
    """`package.module` (imported) or `path/to/file.py` (loaded once per path under a private name) — how recipes
    name user code (rewards, environments). Raises `error` naming the module and the fix."""
    if target.endswith(".py"):
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise error(f"{what} file {target!r} does not exist (resolved to {path}); fix the path")
        mod_name = f"_posttrain_user_{what}_{abs(hash(path))}"
        module = sys.modules.get(mod_name)
        if module is None:
            file_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[mod_name] = module
            file_spec.loader.exec_module(module)
        return module
    try:
        return importlib.import_module(target)
    except ImportError as err:
        raise error(f"cannot import {what} module {target!r}: {err}; is it installed or on PYTHONPATH?") from err


def load_reward(spec: str) -> Callable[..., Any]:
    """Resolve a reward given as a built-in name, `module:function` or `path/file.py:function`."""
    if spec in BUILTIN_REWARDS:
        spec = BUILTIN_REWARDS[spec]
    if ":" not in spec:
        known = ", ".join(sorted(BUILTIN_REWARDS)) or "(none registered)"
        raise RewardSpecError(
            f"reward {spec!r} is neither a built-in name ({known}) nor of the form "
            f"'package.module:function' or 'path/to/file.py:function'")
    target, _, attr = spec.rpartition(":")
    module = load_user_module(target, "reward", RewardSpecError)
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardSpecError(f"{target!r} has no callable {attr!r}; check the function name after ':'")
    return fn


def bind_reward(spec: str, kwargs: dict[str, Any] | None = None) -> Callable[..., Any]:
    """load_reward + keyword arguments bound (as a recipe or `--reward-kwargs` gives them). Raises RewardSpecError
    when the result cannot be called with verl's keyword arguments (see `verl_call_problem`)."""
    fn = load_reward(spec)
    if kwargs:
        sig = inspect.signature(fn)
        accepts_var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        unknown = [k for k in kwargs if k not in sig.parameters and not accepts_var_kw]
        if unknown:
            raise RewardSpecError(f"reward {spec!r} takes no keyword argument(s) {unknown}; "
                                  f"its parameters are {list(sig.parameters)}")
        fn = functools.partial(fn, **kwargs)
    problem = verl_call_problem(fn)
    if problem:
        raise RewardSpecError(
            f"reward {spec!r} cannot be called the way verl and posttrain call rewards, "
            f"fn({', '.join(f'{k}=...' for k in VERL_CALL_KEYWORDS)}): {problem}. Its signature is "
            f"{_signature_text(load_reward(spec))}. Fix: rename its parameters to these names, or wrap it, e.g. "
            "`def my_reward(data_source, solution_str, ground_truth, extra_info=None): "
            "return compute_score(solution_str, ground_truth)` and name `my_file.py:my_reward` instead")
    return fn


# verl's reward managers call `compute_score(data_source=..., solution_str=..., ground_truth=..., extra_info=...)`.
VERL_CALL_KEYWORDS = ("data_source", "solution_str", "ground_truth", "extra_info")


def verl_call_problem(fn: Callable[..., Any]) -> str | None:
    """None when `fn` accepts verl's four keyword arguments, else why not (the TypeError binding them raises)."""
    try:
        sig = inspect.signature(fn)
    except (TypeError, ValueError):
        return None  # no introspectable signature (a C callable): the first call tells
    try:
        sig.bind(**{k: None for k in VERL_CALL_KEYWORDS})
    except TypeError as err:
        return str(err)
    return None


def _signature_text(fn: Callable[..., Any]) -> str:
    try:
        return f"{getattr(fn, '__name__', 'reward')}{inspect.signature(fn)}"
    except (TypeError, ValueError):
        return repr(fn)


# Largest finite float32: scores become float32 tensors (advantages), where 1e39 is already inf.
FLOAT32_MAX = 3.4028234663852886e38


def normalise_result(raw: Any) -> RewardResult:
    """Turn whatever a reward returned into a RewardResult; never raises. A number (a bool counts as 0/1; numpy
    and torch scalars too) or a dict with a numeric "score" is a score; anything else scores 0 with
    `bad_result:<what>`; a score that is not finite in float32 (nan, inf, 1e39, 10**400) scores 0 with
    `non_finite`. A dict's string "failure" detail is the reward's own counted reason for its score."""
    if isinstance(raw, RewardResult):
        return raw
    details: dict[str, Any] = {}
    try:
        if isinstance(raw, dict):
            if "score" not in raw:
                return RewardResult(0.0, {k: v for k, v in raw.items()}, "bad_result:dict_without_score")
            details = {k: v for k, v in raw.items() if k != "score"}
            raw = raw["score"]
        if isinstance(raw, (str, bytes)) or raw is None:  # float("1.5") would pass: a string is not a score
            return RewardResult(0.0, details, f"bad_result:{type(raw).__name__}")
        score = float(raw)  # bool → 0/1; numpy / torch scalars; OverflowError for 10**400
    except OverflowError:
        return RewardResult(0.0, details, "non_finite")
    except Exception:  # noqa: BLE001 - whatever the object, it is not a score
        return RewardResult(0.0, details, f"bad_result:{type(raw).__name__}")
    if not (math.isfinite(score) and abs(score) <= FLOAT32_MAX):
        return RewardResult(0.0, details, "non_finite")
    failure = details.pop("failure", None) if isinstance(details.get("failure"), str) else None
    return RewardResult(score, details, failure)


def call_reward(fn: Callable[..., Any], data_source: str, solution_str: str, ground_truth: Any,
                extra_info: dict | None = None) -> RewardResult:
    """Call a verl-signature reward (sync or async) by keyword, as verl does; never raises. (A function that does
    not take the keywords, e.g. `lambda *a: ...`, is called positionally.)"""
    try:
        if verl_call_problem(fn) is None:
            raw = fn(data_source=data_source, solution_str=solution_str, ground_truth=ground_truth,
                     extra_info=extra_info)
        else:
            raw = fn(data_source, solution_str, ground_truth, extra_info)
        if inspect.isawaitable(raw):
            raw = _run_coroutine(raw)
    except (Exception, SystemExit) as err:  # noqa: BLE001 - user code: any failure is a zero with a reason
        return RewardResult(0.0, {"error": _error_text(err)}, f"exception:{type(err).__name__}")
    return normalise_result(raw)


def _error_text(err: BaseException) -> str:
    try:
        return f"{type(err).__name__}: {err}"[:500]
    except Exception:  # noqa: BLE001 - str() of a hostile exception may itself raise
        return type(err).__name__


def _run_coroutine(coro):
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Called from inside a running loop (e.g. a Ray async actor): run it on a private loop in a thread.
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
