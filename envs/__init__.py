"""Environments for multi-turn RL with tools: the contract (`Env`, `ToolEnv`), tools (`tool`), the shipped
environments (python, lookup, tau, code) and the resolver recipes use. See docs/envs.md."""
from envs.base import (BUILTIN_ENVS, Env, EnvSpecError, Observation, StepResult, ToolEnv, env_spec_of_row,
                       load_env, make_env_group)
from envs.tools import ERROR_KINDS, Tool, ToolCall, ToolError, parse_tool_calls, run_tool_call, tool

__all__ = ["BUILTIN_ENVS", "ERROR_KINDS", "Env", "EnvSpecError", "Observation", "StepResult", "Tool", "ToolCall",
           "ToolEnv", "ToolError", "env_spec_of_row", "load_env", "make_env_group", "parse_tool_calls",
           "run_tool_call", "tool"]

# The verifiers adapter (envs/verifiers_env.py): the verifiers package is optional and imported only when used.
BUILTIN_ENVS.setdefault("verifiers", "envs.verifiers_env:VerifiersEnv")
