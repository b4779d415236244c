"""A `verifiers` environment (PrimeIntellect's package, the Environments Hub's format) run unchanged by posttrain.

posttrain drives the model with its own token-exact driver (posttrain/rollout/multiturn.py); the verifiers
environment keeps all of its own logic: its dataset, `setup_state`, `env_response` (tool calls, feedback), its stop
conditions (`is_completed`), cleanup and its rubric (`score_rollout`). The bridge is a verifiers `Client`: the
environment's own `rollout()` runs as a coroutine and, when it asks its client for a model turn, the messages it
would send go to posttrain and posttrain's sampled text comes back as the model's response:

    initial_observation()  starts env.rollout(); its first client request's messages (+ tool schemas) = the prompt
    step(text)             answers the pending request with `text` (Hermes/Qwen3 <tool_call> blocks parsed into
                           tool_calls as vLLM's hermes parser would); the next request's new messages are the
                           observation, or the rollout ends: rubric.score_rollout(state) is the reward (done)

Token-exactness: posttrain renders only the messages a request ADDS after the policy's own turn (the template-suffix
rule); the policy's ids are never re-tokenised. That needs the environment to extend the conversation append-only:
each request must start with the previous request's messages and the assistant turn returned for it, unchanged.
An environment that rewrites history (overrides `get_prompt_messages`, trims or edits earlier turns) is refused at
construction when it overrides the method, and at the first such request otherwise (`VerifiersExactnessError`, the
trajectory ends with `env_error`). prime-rl meets the same constraint by bridging token ids
(renderers' bridge_to_next_turn) and silently re-renders when the prefix differs; posttrain refuses instead.

Supported: verifiers' classic API (`vf.Environment` subclasses: SingleTurnEnv, MultiTurnEnv, ToolEnv,
StatefulToolEnv, ...; verifiers 0.1.x-0.3.x, `verifiers.legacy` in 0.3). Not supported: group rubrics
(`score_group`, rewards that need the whole GRPO group), the environment's own sampling args (posttrain's recipe
sets sampling), and verifiers >= 0.4, whose v1 stack has no classic API (harness programs call the model through an
OpenAI-compatible interception server). See docs/envs.md, "verifiers environments".
"""
from __future__ import annotations

import asyncio
import json
import queue
import threading
import time
from typing import Any

from envs.base import Env, EnvSpecError, Observation, StepResult
from envs.tools import parse_tool_calls

_MODEL_NAME = "posttrain-policy"   # what the environment's state records as the model


class VerifiersExactnessError(RuntimeError):
    """The verifiers environment changed conversation history that posttrain has already turned into ids."""


# ------------------------------------------------------------------ loading verifiers and its environments

def _import_verifiers():
    try:
        import verifiers as vf
    except ImportError as err:
        raise EnvSpecError("the 'verifiers' environment needs the verifiers package, an optional dependency: "
                           "pip install --no-deps 'verifiers==0.3.1' (see docs/envs.md, 'verifiers environments', "
                           f"for its dependencies) ({err})") from err
    try:
        vf.Environment, vf.MultiTurnEnv, vf.Client   # noqa: B018 - the classic API the adapter drives
    except AttributeError as err:
        raise EnvSpecError(f"verifiers {getattr(vf, '__version__', '?')} has no classic Environment API (removed "
                           "in 0.4, whose v1 stack runs harness programs against an interception server); install "
                           f"verifiers<0.4, e.g. 0.3.1 ({err})") from err
    return vf


_ENVS: dict[str, Any] = {}
_ENVS_LOCK = threading.Lock()


def load_verifiers_env(env_id: str, env_args: dict | None = None):
    """The verifiers Environment `env_id` built with `env_args`, once per process (a dataset build is not free;
    verifiers itself shares one Environment across concurrent rollouts). `env_id`: an installed environment
    (`vf.load_environment`, e.g. a Hub environment's package) or `path/to/file.py` defining `load_environment`."""
    if not isinstance(env_id, str) or not env_id:
        raise EnvSpecError(f"the 'verifiers' environment needs kwargs.env_id (an installed verifiers environment or "
                           f"path/to/file.py with load_environment), got {env_id!r}")
    env_args = dict(env_args or {})
    key = json.dumps([env_id, env_args], sort_keys=True, default=repr)
    with _ENVS_LOCK:
        if key in _ENVS:
            return _ENVS[key]
        vf = _import_verifiers()
        if env_id.endswith(".py"):
            from rewards.base import load_user_module
            module = load_user_module(env_id, "verifiers_environment", EnvSpecError)
            if not callable(getattr(module, "load_environment", None)):
                raise EnvSpecError(f"{env_id!r} defines no load_environment(**env_args); add one returning a "
                                   "vf.Environment")
            loaded = module.load_environment(**env_args)
        else:
            try:
                loaded = vf.load_environment(env_id, **env_args)
            except ValueError as err:     # verifiers' "Could not import ... ensure the package is installed"
                raise EnvSpecError(f"verifiers environment {env_id!r}: {err} (e.g. `prime env install {env_id}` or "
                                   "pip install its package)") from err
        _check_supported(loaded, env_id, vf)
        _ENVS[key] = loaded
        return loaded


def _check_supported(env, env_id: str, vf) -> None:
    """Refuse, before any rollout, what cannot run token-exact or per trajectory."""
    if not isinstance(env, vf.Environment):
        raise EnvSpecError(f"load_environment of {env_id!r} returned {type(env).__name__}, not a vf.Environment")
    if isinstance(env, vf.MultiTurnEnv) and \
            type(env).get_prompt_messages is not vf.MultiTurnEnv.get_prompt_messages:
        raise EnvSpecError(f"verifiers environment {env_id!r} ({type(env).__name__}) overrides get_prompt_messages "
                           "(a non-linear conversation); posttrain appends each observation as token ids after the "
                           "policy's own ids and cannot rewrite earlier turns without re-tokenising them")
    if env.rubric.has_group_rewards or env.rubric.has_advantages:
        raise EnvSpecError(f"verifiers environment {env_id!r} has a group rubric (score_group: rewards or advantages "
                           "computed over the whole group); posttrain scores each trajectory on its own — use a "
                           "rubric of individual reward functions")


def verifiers_rows(env_id: str, env_args: dict | None = None, *, split: str = "train", n: int = -1,
                   seed: int | None = None) -> list[dict]:
    """The environment's dataset as posttrain (verl) rows: `prompt` (its formatted messages: system prompt and
    few-shot included), `data_source` `verifiers/<env_id>`, `reward_model.ground_truth` (its `answer`) and
    `extra_info.verifiers` (JSON text of example_id, answer, info, task: what the rollout is given back)."""
    env = load_verifiers_env(env_id, env_args)
    if split not in ("train", "eval"):
        raise ValueError(f"verifiers_rows: split must be 'train' or 'eval', got {split!r}")
    dataset = env.get_dataset(n=n, seed=seed) if split == "train" else env.get_eval_dataset(n=n, seed=seed)
    rows = []
    for index, example in enumerate(dataset):
        info = example.get("info")
        record = {"example_id": example.get("example_id", index), "answer": example.get("answer", ""),
                  "info": json.loads(info) if isinstance(info, str) else (info or {}), "task": example.get("task")}
        rows.append({"prompt": [_plain(m) for m in example["prompt"]], "data_source": f"verifiers/{env_id}",
                     "reward_model": {"ground_truth": str(record["answer"])},
                     "extra_info": {"verifiers": json.dumps(record, default=str)}})
    return rows


# ------------------------------------------------------------------ one event loop for every episode

_LOOP: asyncio.AbstractEventLoop | None = None
_LOOP_LOCK = threading.Lock()


def _loop() -> asyncio.AbstractEventLoop:
    """The asyncio loop (a daemon thread) that runs every episode's rollout coroutine, as verifiers' own
    `generate` runs many rollouts concurrently on one loop."""
    global _LOOP
    with _LOOP_LOCK:
        if _LOOP is None:
            _LOOP = asyncio.new_event_loop()
            threading.Thread(target=_LOOP.run_forever, name="posttrain-verifiers-loop", daemon=True).start()
        return _LOOP


def _plain(message) -> dict:
    """A verifiers message (pydantic model or dict) as a chat-template dict, without null fields (a Parquet row
    and pydantic's defaults fill absent keys with None)."""
    data = message.model_dump(exclude_none=True) if hasattr(message, "model_dump") else dict(message)
    return {k: v for k, v in data.items() if v is not None}


def parse_policy_turn(text: str, turn: int) -> tuple[str | None, list[dict], bool]:
    """(content, tool calls as {id, name, arguments JSON text}, malformed) of the policy's text, as vLLM's hermes
    tool parser gives them to an OpenAI client: content is the text before the first <tool_call> (None when
    empty); a malformed block means no tool calls at all and the whole text as content."""
    calls = parse_tool_calls(text)
    if not calls:
        return text, [], False
    if any(c.error for c in calls):
        return text, [], True
    content = text[:text.index("<tool_call>")]
    tool_calls = [{"id": f"call_{turn}_{i}", "name": c.name, "arguments": json.dumps(c.arguments)}
                  for i, c in enumerate(calls)]
    return (content if content.strip() else None), tool_calls, False


# ------------------------------------------------------------------ the environment

class VerifiersEnv(Env):
    """One episode of a verifiers environment. Recipe:
    `environment: {name: verifiers, kwargs: {env_id: ..., env_args: {...}}}`; rows from `verifiers_rows`.

    `step_timeout_s`: the longest posttrain waits for the environment to answer one turn (its tools, its
    rubric) before ending the trajectory with env_error; the environment's own `timeout_seconds` applies too."""

    def __init__(self, row: dict, *, env_id: str, env_args: dict | None = None, step_timeout_s: float = 600.0):
        self.vf = _import_verifiers()
        self.env = load_verifiers_env(env_id, env_args)
        self.env_id = env_id
        self.row = row
        self.step_timeout_s = float(step_timeout_s)
        self.rollout_input = self._rollout_input(row)
        self.events: queue.Queue = queue.Queue()      # ("request", messages, tools) | ("done", state) | ("error", exc)
        self.pending: asyncio.Future | None = None    # the client's request waiting for the policy's text
        self.sent: list[dict] = []                     # the last request's messages, as plain dicts
        self.tools: list[dict] = []                    # the tool schemas rendered in the prompt
        self.turn = 0
        self.task = None                                # the rollout coroutine's concurrent future
        self.state = None

    def _rollout_input(self, row: dict) -> dict:
        if not isinstance(row.get("prompt"), list):
            raise EnvSpecError(f"verifiers environment {self.env_id!r}: the row's prompt must be a list of chat "
                               f"messages, got {type(row.get('prompt')).__name__}; build rows with verifiers_rows")
        extra = row.get("extra_info") or {}
        record = extra.get("verifiers")
        record = json.loads(record) if isinstance(record, str) else dict(record or {})
        answer = record.get("answer", (row.get("reward_model") or {}).get("ground_truth", ""))
        rollout_input = {"prompt": [_plain(m) for m in row["prompt"]], "example_id": record.get("example_id", 0),
                         "answer": "" if answer is None else str(answer), "info": record.get("info") or {}}
        if record.get("task") is not None:
            rollout_input["task"] = record["task"]
        return rollout_input

    # ---- the two sides of the bridge: the rollout coroutine (loop thread) and posttrain (a worker thread)

    async def _episode(self) -> None:
        try:
            state = await self.env.rollout(self.rollout_input, _PolicyClient(self), _MODEL_NAME, {})
            await self.env.rubric.score_rollout(state)
            await self.env.rubric.cleanup(state)
            self.events.put(("done", state))
        except BaseException as err:  # noqa: BLE001 - every failure (cancellation included) must reach the waiter
            self.events.put(("error", err))
            if isinstance(err, asyncio.CancelledError):
                raise

    async def ask_policy(self, messages, tools) -> str:
        """Called by the environment's client: hand the request to posttrain and wait for the policy's text."""
        self.pending = asyncio.get_running_loop().create_future()
        self.events.put(("request", [_plain(m) for m in messages], [_tool_schema(t) for t in tools or []]))
        return await self.pending

    def _next_event(self):
        try:
            return self.events.get(timeout=self.step_timeout_s)
        except queue.Empty:
            raise TimeoutError(f"verifiers environment {self.env_id!r} did not answer within {self.step_timeout_s:g} s "
                               "(step_timeout_s)") from None

    def initial_observation(self) -> Observation:
        self.task = asyncio.run_coroutine_threadsafe(self._episode(), _loop())
        event = self._next_event()
        if event[0] != "request":
            detail = event[1] if event[0] == "error" else (event[1].get("error") or "it asked the model nothing")
            raise RuntimeError(f"verifiers environment {self.env_id!r} ended before its first model request: {detail}")
        _, messages, tools = event
        self.sent, self.tools = messages, tools
        return Observation(messages, tools)

    def step(self, action: str) -> StepResult:
        if self.pending is None:
            return StepResult([], 0.0, True, {"errors": ["after_end"]})
        content, tool_calls, malformed = parse_policy_turn(action, self.turn)
        self.turn += 1
        answered = {"role": "assistant", "content": content, "tool_calls": tool_calls}
        pending, self.pending = self.pending, None
        _loop().call_soon_threadsafe(pending.set_result, answered)
        info = {"tool_calls": len(tool_calls), "errors": ["bad_json"] if malformed else []}
        event = self._next_event()
        if event[0] == "error":
            err = event[1]
            raise err if isinstance(err, Exception) else RuntimeError(f"verifiers rollout ended: {err!r}")
        if event[0] == "done":
            self.state = event[1]
            if self.state.get("error") is not None:
                info["errors"].append(f"verifiers_{type(self.state['error']).__name__}")
            info["verifiers_metrics"] = dict(self.state.get("metrics") or {})
            return StepResult([], float(self.state.get("reward") or 0.0), True, info)
        _, messages, tools = event
        if tools != self.tools:
            raise VerifiersExactnessError(f"verifiers environment {self.env_id!r} changed its tools mid-episode "
                                          f"({[t['function']['name'] for t in tools]}); the prompt's ids render the "
                                          "first request's tools and are never re-rendered")
        observation = self._appended(messages, answered)
        self.sent = messages
        return StepResult(observation, 0.0, False, info)

    def _appended(self, messages: list[dict], answered: dict) -> list[dict]:
        """The messages this request adds after the policy's turn; refuses a request that changed history."""
        prefix = len(self.sent)
        if messages[:prefix] != self.sent:
            changed = next(i for i, (a, b) in enumerate(zip(messages, self.sent)) if a != b) \
                if len(messages) >= prefix else len(messages)
            raise VerifiersExactnessError(
                f"verifiers environment {self.env_id!r} changed message {changed} of the conversation (earlier turns "
                "are token ids already; posttrain never re-tokenises them); its requests must extend the previous one")
        mine = messages[prefix] if len(messages) > prefix else {}
        if mine.get("role") != "assistant" or mine.get("content") != answered["content"] or \
                [(c["name"], c["arguments"]) for c in (mine.get("tool_calls") or [])] != \
                [(c["name"], c["arguments"]) for c in answered["tool_calls"]]:
            raise VerifiersExactnessError(
                f"verifiers environment {self.env_id!r} did not keep the policy's turn as it was sampled (got "
                f"{json.dumps(mine)[:200]}); a parser or env that rewrites the assistant's history cannot run "
                "token-exact")
        return messages[prefix + 1:]

    def close(self) -> None:
        """A trajectory posttrain ended early (a limit) leaves the rollout waiting for a turn: cancel it (the
        environment's cleanup handlers run) and wait briefly for it to finish."""
        if self.task is not None and not self.task.done():
            self.task.cancel()
            deadline = time.monotonic() + 10.0
            while not self.task.done() and time.monotonic() < deadline:
                time.sleep(0.01)


def _tool_schema(tool) -> dict:
    """A vf.Tool as the OpenAI function schema an OpenAI client would send (and chat templates render)."""
    data = tool.model_dump(exclude_none=True) if hasattr(tool, "model_dump") else dict(tool)
    function = {"name": data["name"], "description": data.get("description", ""),
                "parameters": data.get("parameters", {})}
    return {"type": "function", "function": function}


def _client_class():
    """verifiers' Client subclass, built on first use (verifiers is an optional dependency)."""
    global _PolicyClientClass
    if _PolicyClientClass is None:
        vf = _import_verifiers()
        from verifiers.types import Response, ResponseMessage, ToolCall

        class PolicyClient(vf.Client):
            """A verifiers model client whose model is posttrain's policy, sampled by posttrain's driver."""

            def __init__(self, episode: VerifiersEnv):
                super().__init__(episode)

            def setup_client(self, config):
                raise NotImplementedError("PolicyClient is built from an episode, not a ClientConfig")

            async def to_native_tool(self, tool):
                return tool

            async def to_native_prompt(self, messages):
                return messages, {}

            async def get_native_response(self, prompt, model, sampling_args, tools=None, **kwargs):
                return await self.client.ask_policy(prompt, tools)

            async def raise_from_native_response(self, response):
                return None

            async def from_native_response(self, response):
                calls = [ToolCall(**c) for c in response["tool_calls"]] or None
                return Response(id=f"posttrain-{self.client.turn}", created=int(time.time()), model=_MODEL_NAME,
                                message=ResponseMessage(content=response["content"], tool_calls=calls,
                                                        finish_reason="tool_calls" if calls else "stop",
                                                        is_truncated=False))

            async def close(self):
                return None

        _PolicyClientClass = PolicyClient
    return _PolicyClientClass


_PolicyClientClass = None


def _PolicyClient(episode: VerifiersEnv):
    return _client_class()(episode)
