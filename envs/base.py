"""The environment contract: what a multi-turn rollout talks to.

An environment is one episode with one prompt row. Implement two methods (a page of code):

    class Guess(Env):
        def __init__(self, row, **kwargs):
            self.row, self.answer = row, str(row["reward_model"]["ground_truth"])
        def initial_observation(self):
            return Observation(self.row["prompt"])               # chat messages (+ tool schemas, optional)
        def step(self, action):                                  # action: the assistant turn's text
            if action.strip().endswith(self.answer):
                return StepResult([], reward=1.0, done=True)
            return StepResult([{"role": "user", "content": "No, try again."}], reward=0.0, done=False)

`StepResult.messages` are the observation messages appended to the conversation (role "tool" for tool results,
"user" for feedback); the rollout renders them with the model's chat template and appends their token ids.
`reward` is this turn's reward; a trajectory's reward is the sum over its turns. `info` may carry
"tool_calls" (int), "errors" (list of kinds, counted as env/tool_errors/<kind>) and "tool_latency_s"
({tool: [seconds]}).

`ToolEnv` does the tool part for you: declare tools as methods with `@tool`, say how a final answer scores.
Recipes name an environment like a reward: a built-in name (`python`, `lookup`, `tau`, `code`),
`package.module:Class` or `path/to/file.py:Class`; a row may choose its own in `extra_info.env`
(`{"name": ..., "kwargs": {...}}`), else the recipe's default applies. `make_env_group` builds the n
environments of one GRPO/GSPO group (one per sample of the prompt).
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any

from envs.tools import Tool, ToolOutcome, parse_tool_calls, run_tool_call


@dataclasses.dataclass
class Observation:
    messages: list[dict]                                  # the prompt: chat messages
    tools: list[dict] = dataclasses.field(default_factory=list)   # OpenAI function schemas offered (Tool.schema())


@dataclasses.dataclass
class StepResult:
    messages: list[dict]                 # observation messages to append (empty when done)
    reward: float = 0.0                  # this turn's reward
    done: bool = False
    info: dict = dataclasses.field(default_factory=dict)


class Env(abc.ABC):
    """One episode. Constructed as `EnvClass(row, **kwargs)`; `step` runs in a worker thread (one env is never
    stepped by two threads at once, different envs are)."""

    @abc.abstractmethod
    def initial_observation(self) -> Observation: ...

    @abc.abstractmethod
    def step(self, action: str) -> StepResult: ...

    def close(self) -> None:
        """Release what the episode holds (a sandboxed session, a database copy). Called once at the end."""


class ToolEnv(Env):
    """An environment whose actions are tool calls: each turn's <tool_call> blocks are run and answered with
    `tool` messages; a turn without a call is the final answer, scored by `final_reward(text)`.

    Tools are methods decorated with `@tool` (bound to the episode, so they can keep state) plus `extra_tools`.
    A tool may end the episode early with `self.finish(reward)` (e.g. a judge that accepts a submission).
    `require_tool_call`: an answer before any successful call is refused with a `missing_tool_call` error
    observation instead of ending the episode.
    """

    max_calls_per_turn = 4

    def __init__(self, row: dict, *, system_prompt: str | None = None, require_tool_call: bool = False,
                 answer_reward: str | None = None, extra_tools: list[Tool] = ()):
        self.row = row
        self.answer_reward = answer_reward
        self.system_prompt = system_prompt
        self.require_tool_call = require_tool_call
        self.tools = {t.name: t for t in [*self._bound_tools(), *extra_tools]}
        self.done = False
        self.successful_calls = 0
        self._finish_reward: float | None = None

    def _bound_tools(self) -> list[Tool]:
        found = []
        for name in dir(type(self)):
            attr = getattr(type(self), name, None)
            if isinstance(attr, Tool):
                found.append(dataclasses.replace(attr, fn=attr.fn.__get__(self)))
        return found

    def initial_observation(self) -> Observation:
        messages = list(self.row["prompt"])
        if self.system_prompt and messages[0].get("role") != "system":
            messages = [{"role": "system", "content": self.system_prompt}, *messages]
        return Observation(messages, [t.schema() for t in self.tools.values()])

    def final_reward(self, answer: str) -> float:
        """The reward of a final answer (a turn without a tool call): `answer_reward` (a reward name or path, as
        in a recipe's rewards) applied to it and the row's ground truth; 0 when none is set."""
        if self.answer_reward is None:
            return 0.0
        from rewards.base import call_reward, load_reward
        row = self.row
        return call_reward(load_reward(self.answer_reward), row.get("data_source", ""), answer,
                           (row.get("reward_model") or {}).get("ground_truth"), row.get("extra_info")).score

    def finish(self, reward: float) -> None:
        """Called by a tool: the episode ends after this turn with `reward`."""
        self._finish_reward = float(reward)

    def step(self, action: str) -> StepResult:
        if self.done:
            return StepResult([], 0.0, True, {"errors": ["after_end"]})
        calls = parse_tool_calls(action)
        if not calls:
            if self.require_tool_call and self.successful_calls == 0:
                return StepResult([{"role": "user", "content": "Error: answer only after calling a tool; the "
                                    f"tools are {sorted(self.tools)}."}], 0.0, False, {"errors": ["missing_tool_call"]})
            self.done = True
            return StepResult([], self.final_reward(action), True, {"tool_calls": 0})
        outcomes: list[ToolOutcome] = [run_tool_call(call, self.tools) for call in calls[:self.max_calls_per_turn]]
        errors = [o.error for o in outcomes if o.error]
        if len(calls) > self.max_calls_per_turn:
            outcomes.append(ToolOutcome(None, f"Error: at most {self.max_calls_per_turn} tool calls per turn; "
                                        f"{len(calls) - self.max_calls_per_turn} were ignored", "too_many_calls"))
            errors.append("too_many_calls")
        self.successful_calls += sum(o.error is None for o in outcomes)
        latency: dict[str, list[float]] = {}
        for o in outcomes:
            if o.name in self.tools and o.latency_s:
                latency.setdefault(o.name, []).append(o.latency_s)
        info = {"tool_calls": len(calls), "errors": errors, "tool_latency_s": latency}
        if self._finish_reward is not None:
            self.done = True
            return StepResult([], self._finish_reward, True, info)
        return StepResult([{"role": "tool", "content": o.content} for o in outcomes], 0.0, False, info)


# ------------------------------------------------------------------ naming an environment in a recipe

BUILTIN_ENVS: dict[str, str] = {
    "python": "envs.python:PythonEnv",
    "lookup": "envs.lookup:LookupEnv",
    "tau": "envs.tau:TauEnv",
    "code": "envs.code:CodeEnv",
}


class EnvSpecError(ValueError):
    """An environment name or path that cannot be resolved; the message says how to fix it."""


def load_env(spec: str) -> type[Env]:
    """Resolve a built-in name, `package.module:Class` or `path/to/file.py:Class` to an Env subclass."""
    target_spec = BUILTIN_ENVS.get(spec, spec)
    if ":" not in target_spec:
        raise EnvSpecError(f"environment {spec!r} is neither a built-in name ({', '.join(sorted(BUILTIN_ENVS))}) "
                           "nor of the form 'package.module:Class' or 'path/to/file.py:Class'")
    target, _, attr = target_spec.rpartition(":")
    from rewards.base import load_user_module
    module = load_user_module(target, "environment", EnvSpecError)
    cls = getattr(module, attr, None)
    if not (isinstance(cls, type) and issubclass(cls, Env)):
        raise EnvSpecError(f"{target!r} has no Env subclass {attr!r}; check the class name after ':' "
                           "(it must subclass envs.Env)")
    return cls


def env_spec_of_row(row: dict, default: str | None = None, default_kwargs: dict | None = None) -> tuple[str, dict]:
    """(env spec, kwargs) for a row: its `extra_info.env` if present, else the recipe's default."""
    chosen = (row.get("extra_info") or {}).get("env")
    if chosen is None:
        if default is None:
            raise EnvSpecError("row has no extra_info.env and no default environment was given; set "
                               "extra_info.env = {'name': ..., 'kwargs': {...}} or the recipe's environment")
        return default, dict(default_kwargs or {})
    if isinstance(chosen, str):
        return chosen, dict(default_kwargs or {})
    if not isinstance(chosen, dict) or not isinstance(chosen.get("name"), str):
        raise EnvSpecError(f"extra_info.env must be a name or {{'name': ..., 'kwargs': {{...}}}}, got {chosen!r:.80}")
    # Null kwargs are dropped: Parquet / Arrow fill a key that another row has with null.
    row_kwargs = {k: v for k, v in (chosen.get("kwargs") or {}).items() if v is not None}
    return chosen["name"], {**(default_kwargs or {}), **row_kwargs}


def make_env_group(row: dict, n: int, default: str | None = None, default_kwargs: dict | None = None) -> list[Env]:
    """The n environments of one GRPO/GSPO group: n independent episodes of the same row."""
    spec, kwargs = env_spec_of_row(row, default, default_kwargs)
    cls = load_env(spec)
    try:
        return [cls(row, **kwargs) for _ in range(n)]
    except TypeError as err:
        raise EnvSpecError(f"environment {spec!r} rejected its kwargs {sorted(kwargs)}: {err}") from err


def final_answer_text(text: str) -> str:
    """The text after the last `Answer:` (the toy domains' answer convention), stripped; '' when absent."""
    head, marker, tail = text.rpartition("Answer:")
    return tail.strip() if marker else ""


def as_dict(value: Any) -> Any:
    """ground_truth given as JSON text or as the object itself."""
    import json
    return json.loads(value) if isinstance(value, str) else value
