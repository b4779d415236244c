"""The reward contract shared by runs, `posttrain score` and user code.

A reward is a plain function with verl's signature (so users' existing functions work unchanged):

    def compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> float | dict

A dict must carry "score"; its other keys are details that get logged. Async functions are accepted.
`load_reward` resolves a built-in name, `package.module:function` or `path/to/file.py:function`;
`call_reward` calls one and never raises: failures become a zero score with a counted reason.
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
    if target.endswith(".py"):
        path = os.path.abspath(target)
        if not os.path.isfile(path):
            raise RewardSpecError(f"reward file {target!r} does not exist (resolved to {path}); fix the path")
        mod_name = f"_posttrain_user_reward_{abs(hash(path))}"
        module = sys.modules.get(mod_name)
        if module is None:
            file_spec = importlib.util.spec_from_file_location(mod_name, path)
            module = importlib.util.module_from_spec(file_spec)
            sys.modules[mod_name] = module
            file_spec.loader.exec_module(module)
    else:
        try:
            module = importlib.import_module(target)
        except ImportError as err:
            raise RewardSpecError(f"cannot import reward module {target!r}: {err}; "
                                  "is it installed or on PYTHONPATH?") from err
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise RewardSpecError(f"{target!r} has no callable {attr!r}; check the function name after ':'")
    return fn


def bind_reward(spec: str, kwargs: dict[str, Any] | None = None) -> Callable[..., Any]:
    """load_reward + keyword arguments bound (as a recipe or `--reward-kwargs` gives them)."""
    fn = load_reward(spec)
    if kwargs:
        sig = inspect.signature(fn)
        accepts_var_kw = any(p.kind is p.VAR_KEYWORD for p in sig.parameters.values())
        unknown = [k for k in kwargs if k not in sig.parameters and not accepts_var_kw]
        if unknown:
            raise RewardSpecError(f"reward {spec!r} takes no keyword argument(s) {unknown}; "
                                  f"its parameters are {list(sig.parameters)}")
        fn = functools.partial(fn, **kwargs)
    return fn


def normalise_result(raw: Any) -> RewardResult:
    """Turn whatever a reward returned into a RewardResult; non-finite or non-numeric → 0 with a reason."""
    details: dict[str, Any] = {}
    if isinstance(raw, RewardResult):
        return raw
    if isinstance(raw, dict):
        if "score" not in raw:
            return RewardResult(0.0, {}, "bad_return:dict_without_score")
        details = {k: v for k, v in raw.items() if k != "score"}
        raw = raw["score"]
    if isinstance(raw, bool):
        raw = float(raw)
    if not isinstance(raw, (int, float)):
        try:
            raw = float(raw)  # numpy / torch scalars
        except (TypeError, ValueError):
            return RewardResult(0.0, details, f"bad_return:{type(raw).__name__}")
    score = float(raw)
    if not math.isfinite(score):
        return RewardResult(0.0, details, "bad_return:non_finite")
    return RewardResult(score, details, details.pop("failure", None) if isinstance(details.get("failure"), str) else None)


def call_reward(fn: Callable[..., Any], data_source: str, solution_str: str, ground_truth: Any,
                extra_info: dict | None = None) -> RewardResult:
    """Call a verl-signature reward (sync or async); never raises."""
    try:
        raw = fn(data_source, solution_str, ground_truth, extra_info)
        if inspect.isawaitable(raw):
            raw = _run_coroutine(raw)
    except Exception as err:  # noqa: BLE001 - user code: any failure is a zero with a reason
        return RewardResult(0.0, {"error": f"{type(err).__name__}: {err}"[:500]},
                            f"exception:{type(err).__name__}")
    return normalise_result(raw)


def _run_coroutine(coro):
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(coro)
    # Called from inside a running loop (e.g. a Ray async actor): run it on a private loop in a thread.
    import concurrent.futures
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro).result()
