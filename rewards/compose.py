"""Weighted composition of named rewards: score = Σ weight_i · score_i, every component logged.

    reward = compose([
        {"name": "accuracy", "reward": "math", "weight": 1.0},
        {"name": "format", "reward": "format", "weight": 0.1, "kwargs": {"tags": ["think", "answer"]}},
        {"name": "length", "reward": "length", "weight": 0, "kwargs": {"max_length": 4000}},  # log only
    ])
    reward("math", completion, "1/2")
    # {'score': 1.1, 'accuracy': 1.0, 'format': 1.0, 'length': 1.0, 'accuracy/method': 'boxed', ...}

Weight 0 means "log only": the component runs and is reported, but cannot move the score.
A component's dict details are logged as `name/key`; its failure as `name/failure`. The first
failure of a weighted component is also reported as the composite's failure
(`component:NAME:KIND`) so that summaries count it. `ground_truth_key` lets one component read its
own reference when the row's ground truth is a dict (e.g. {"answer": "1/2", "span": [3, 9]}).
From the command line: `posttrain score --reward compose --reward-kwargs '{"components": [...]}'`.
"""
from __future__ import annotations

import json
import math
import threading
from typing import Any, Callable

from rewards.base import RewardSpecError, bind_reward, call_reward

_ALLOWED_KEYS = {"name", "reward", "weight", "kwargs", "ground_truth_key"}


def validate_components(components: Any) -> list[dict[str, Any]]:
    """Check a component list; errors name the component and field and say how to fix it."""
    if not isinstance(components, (list, tuple)) or not components:
        raise RewardSpecError("compose: components must be a non-empty list of "
                              "{'name': ..., 'reward': ..., 'weight': ...} objects")
    checked, names = [], set()
    for index, component in enumerate(components):
        where = f"compose: components[{index}]"
        if not isinstance(component, dict):
            raise RewardSpecError(f"{where} must be an object with 'name', 'reward' and 'weight', got {component!r}")
        unknown = set(component) - _ALLOWED_KEYS
        if unknown:
            raise RewardSpecError(f"{where} has unknown key(s) {sorted(unknown)}; allowed: {sorted(_ALLOWED_KEYS)}")
        name, reward = component.get("name"), component.get("reward")
        if not isinstance(reward, str) or not reward:
            raise RewardSpecError(f"{where}.reward must be a built-in name or 'module:function', got {reward!r}")
        name = reward if name is None else name
        if not isinstance(name, str) or not name or "/" in name:
            raise RewardSpecError(f"{where}.name must be a non-empty string without '/', got {name!r}")
        if name in names:
            raise RewardSpecError(f"{where}.name {name!r} is used twice; give each component its own name")
        names.add(name)
        weight = component.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)) or not math.isfinite(weight):
            raise RewardSpecError(f"{where}.weight must be a finite number (0 = log only), got {weight!r}")
        kwargs = component.get("kwargs") or {}
        if not isinstance(kwargs, dict):
            raise RewardSpecError(f"{where}.kwargs must be an object of keyword arguments, got {kwargs!r}")
        key = component.get("ground_truth_key")
        if key is not None and not isinstance(key, str):
            raise RewardSpecError(f"{where}.ground_truth_key must be a string, got {key!r}")
        checked.append({"name": name, "reward": reward, "weight": float(weight), "kwargs": kwargs,
                        "ground_truth_key": key})
    return checked


def compose(components: list[dict[str, Any]]) -> Callable[..., dict]:
    """Build a verl-signature reward from components (see the module docstring)."""
    checked = validate_components(components)
    bound = [(c, bind_reward(c["reward"], c["kwargs"])) for c in checked]

    def composite(data_source, solution_str, ground_truth, extra_info=None) -> dict:
        total = 0.0
        result: dict[str, Any] = {}
        first_failure = None
        for component, fn in bound:
            name = component["name"]
            truth = ground_truth
            if component["ground_truth_key"] is not None:
                if not isinstance(ground_truth, dict) or component["ground_truth_key"] not in ground_truth:
                    result[name] = 0.0
                    result[f"{name}/failure"] = "missing_ground_truth_key"
                    first_failure = first_failure or (f"component:{name}:missing_ground_truth_key"
                                                      if component["weight"] else None)
                    continue
                truth = ground_truth[component["ground_truth_key"]]
            outcome = call_reward(fn, data_source, solution_str, truth, extra_info)
            result[name] = outcome.score
            for key, value in outcome.details.items():
                if isinstance(value, (str, int, float, bool)) or value is None:
                    result[f"{name}/{key}"] = value
            if outcome.failure is not None:
                result[f"{name}/failure"] = outcome.failure
                if component["weight"] and first_failure is None:
                    first_failure = f"component:{name}:{outcome.failure}"
            total += component["weight"] * outcome.score
        result["score"] = total
        if first_failure is not None:
            result["failure"] = first_failure
        return result

    return composite


_cache: dict[str, Callable[..., dict]] = {}
_cache_lock = threading.Lock()


def compute_score(data_source: str | None, solution_str: str, ground_truth: Any, extra_info: dict | None = None,
                  components: list[dict[str, Any]] | None = None) -> dict:
    """`compose` as a registered reward: components come as a keyword argument (e.g. from
    `--reward-kwargs`); the composite is built once per distinct component list."""
    if components is None:
        raise RewardSpecError("compose: pass components=[{'name': ..., 'reward': ..., 'weight': ...}, ...] "
                              "(in a recipe under the reward's kwargs, or with --reward-kwargs)")
    key = json.dumps(components, sort_keys=True, default=repr)
    with _cache_lock:
        fn = _cache.get(key)
        if fn is None:
            fn = _cache[key] = compose(components)
    return fn(data_source, solution_str, ground_truth, extra_info)
