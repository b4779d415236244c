"""posttrain's reward library. Every reward is a plain function with verl's signature."""
from rewards.base import (BUILTIN_REWARDS, RewardResult, RewardSpecError, bind_reward, call_reward,
                          load_reward, normalise_result, register_builtin)

__all__ = ["BUILTIN_REWARDS", "RewardResult", "RewardSpecError", "bind_reward", "call_reward",
           "load_reward", "normalise_result", "register_builtin"]
