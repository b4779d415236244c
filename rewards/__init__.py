"""posttrain's reward library. Every reward is a plain function with verl's signature.

    from rewards import math_reward, iou_reward, tiou_reward
    math_reward("math", "... so the answer is \\boxed{1/2}", "0.5")   # {'score': 1.0, ...}

Built-in names (for recipes and `posttrain score --reward NAME`) resolve lazily, so `import rewards`
stays cheap and a missing optional dependency only matters when that reward is used.
"""
from rewards.base import (BUILTIN_REWARDS, RewardResult, RewardSpecError, bind_reward, call_reward,
                          load_reward, normalise_result, register_builtin)

register_builtin("math", "rewards.matheq:compute_score")
register_builtin("iou", "rewards.iou:compute_score")
register_builtin("tiou", "rewards.tiou:compute_score")
register_builtin("format", "rewards.fmt:format_reward")
register_builtin("length", "rewards.fmt:length_reward")
register_builtin("boxed_format", "rewards.fmt:boxed_format_reward")
register_builtin("compose", "rewards.compose:compute_score")
register_builtin("code", "rewards.code:compute_score")
register_builtin("judge", "rewards.judge:compute_score")
register_builtin("verl", "rewards.verl_reward:compute_score")  # verl's data_source dispatcher

_LAZY_FUNCTIONS = {
    "math_reward": "rewards.matheq:compute_score",
    "iou_reward": "rewards.iou:compute_score",
    "tiou_reward": "rewards.tiou:compute_score",
    "format_reward": "rewards.fmt:format_reward",
    "length_reward": "rewards.fmt:length_reward",
    "boxed_format_reward": "rewards.fmt:boxed_format_reward",
    "compose": "rewards.compose:compose",
}


def __getattr__(name: str):
    # `from rewards import math_reward` without importing sympy at `import rewards` time.
    if name in _LAZY_FUNCTIONS:
        return load_reward(_LAZY_FUNCTIONS[name])
    raise AttributeError(f"module 'rewards' has no attribute {name!r}")


__all__ = ["BUILTIN_REWARDS", "RewardResult", "RewardSpecError", "bind_reward", "call_reward",
           "load_reward", "normalise_result", "register_builtin", *_LAZY_FUNCTIONS]
