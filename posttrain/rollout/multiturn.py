"""Multi-turn rollouts with environments, token-exact: what the trainer sees is what the policy sampled.

One trajectory is a growing list of token ids. Each round, every live trajectory's ids go to the engine in ONE
batched `generate` call; the sampled ids are appended as they came (loss mask 1, with their sampling
log-probs); the environments answer concurrently in a thread pool (a slow tool holds only its own trajectory);
each observation is rendered as the chat template would render it and its ids are APPENDED (mask 0). Earlier
turns are never re-tokenised: re-tokenising "<tool_call>{...}</tool_call>" need not give back the ids the
policy sampled (BPE merges differ), and the trainer would then score tokens the policy never produced.

The observation's ids (the template-suffix rule). With the assistant's content replaced by a sentinel S,
    before = render([*history, assistant(S)])                               # ends "S<|im_end|>\\n" (Qwen)
    after  = render([*history, assistant(S), *observation], add_generation_prompt=True)
the text appended is what `after` has after S: the end of the turn ("<|im_end|>\\n", checked to be the same as
in `before`, i.e. not dependent on what follows), the observation and the next generation prompt. The policy's
turn already ends with the stop token (<|im_end|>) when it finished normally, so that token's text is dropped
from the front — the turn separator "\\n" is kept. A turn that stopped without it (a stop string) gets the whole
end of turn. Whatever the template renders BEFORE S is ignored (Qwen3 renders an empty think block only in the
last assistant turn). The concatenation then equals the template's full rendering whenever the policy's text
re-tokenises to its ids and the template does not rewrite history (tests/envs/test_envs_multiturn.py checks both).

`generate(prompts_token_ids, seeds, max_tokens_per_prompt) -> [{token_ids, logprobs, finish_reason}]` is any
batched engine call (`engine_generate_fn` adapts RolloutEngine.generate / RolloutGroup.generate). Limits:
turns, tokens per turn, completion tokens, context (prompt + completion) and each tool's own time limit; a
trajectory that hits one ends with a reason (END_REASONS).
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
from typing import Any, Callable, Sequence

import numpy as np

END_REASONS = ("done", "max_turns", "turn_length", "max_tokens", "context", "env_error")
_SENTINEL = "\u2063POSTTRAIN-TURN\u2063"   # invisible separator: never produced by a template itself

GenerateFn = Callable[[list[list[int]], list[int], list[int]], list[dict]]


class TemplateError(ValueError):
    """The chat template cannot render observations as an append-only suffix."""


class ChatRenderer:
    """The tokenizer's chat template (or `chat_template`), with tools, as prompt ids and observation suffixes."""

    def __init__(self, tokenizer, chat_template: str | None = None, stop_token_ids: Sequence[int] = ()):
        self.tokenizer = tokenizer
        self.chat_template = chat_template
        eos = tokenizer.eos_token_id
        self.stop_token_ids = set(stop_token_ids) | ({eos} if eos is not None else set())

    def render(self, messages: list[dict], tools: list[dict] | None, add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, tools=tools or None, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt,
                                                  chat_template=self.chat_template)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def prompt_ids(self, messages: list[dict], tools: list[dict] | None = None) -> list[int]:
        return self.encode(self.render(messages, tools, add_generation_prompt=True))

    def observation_text(self, history: list[dict], tools: list[dict] | None, observation: list[dict],
                         turn_ended_with: str | None) -> str:
        """The text to append after an assistant turn: the rest of the template's end of turn, the observation
        messages and the next generation prompt. `turn_ended_with`: the text of the stop token the policy
        sampled last (it is already in the ids), or None."""
        assistant = {"role": "assistant", "content": _SENTINEL}
        before = self.render([*history, assistant], tools, add_generation_prompt=False)
        after = self.render([*history, assistant, *observation], tools, add_generation_prompt=True)
        if _SENTINEL not in before or _SENTINEL not in after:
            raise TemplateError("the chat template does not render an assistant message's content verbatim")
        # Only what follows the turn's content matters: templates may render earlier parts differently once more
        # follows (Qwen3 drops the empty <think></think> of a turn that is no longer the last), and those ids are
        # already sampled and never re-rendered.
        end_of_turn = before[before.rindex(_SENTINEL) + len(_SENTINEL):]
        rest = after[after.rindex(_SENTINEL) + len(_SENTINEL):]
        if not rest.startswith(end_of_turn):
            raise TemplateError(f"the chat template ends an assistant turn with {end_of_turn!r} when it is last but "
                                f"not when an observation follows ({rest[:len(end_of_turn) + 20]!r}); multi-turn "
                                "rollouts need a turn's ending that does not depend on what follows")
        if turn_ended_with and rest.startswith(turn_ended_with):
            rest = rest[len(turn_ended_with):]
        return rest

    def observation_ids(self, history: list[dict], tools: list[dict] | None, observation: list[dict],
                        turn_ids: Sequence[int]) -> list[int]:
        last = turn_ids[-1] if turn_ids else None
        ended_with = self.tokenizer.decode([last]) if last in self.stop_token_ids else None
        return self.encode(self.observation_text(history, tools, observation, ended_with))


@dataclasses.dataclass(frozen=True)
class MultiTurnLimits:
    max_turns: int = 8                   # assistant turns per trajectory
    max_tokens_per_turn: int = 256       # sampled tokens per assistant turn
    max_completion_tokens: int = 2048    # everything after the prompt: turns and observations
    max_context_tokens: int = 4096       # prompt + completion (at most the engine's max_model_len)
    env_workers: int = 32                # threads stepping environments concurrently

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"MultiTurnLimits.{field.name} must be a positive integer, got {value!r}")


@dataclasses.dataclass
class Trajectory:
    prompt_ids: list[int]
    completion_ids: list[int] = dataclasses.field(default_factory=list)  # all turns after the prompt  [T]
    loss_mask: list[int] = dataclasses.field(default_factory=list)       # 1 = policy-sampled           [T]
    logprobs: list[float] = dataclasses.field(default_factory=list)      # sampling log-prob, 0 where mask 0 [T]
    turn_rewards: list[float] = dataclasses.field(default_factory=list)  # one per assistant turn (0 if not stepped)
    turn_spans: list[tuple[int, int]] = dataclasses.field(default_factory=list)  # each turn's [start, end) in completion_ids
    num_turns: int = 0                    # assistant turns sampled
    tool_calls: int = 0
    errors: dict[str, int] = dataclasses.field(default_factory=dict)     # kind -> count
    tool_latency_s: dict[str, list[float]] = dataclasses.field(default_factory=dict)
    end_reason: str | None = None         # one of END_REASONS once finished
    messages: list[dict] = dataclasses.field(default_factory=list)      # the conversation, as text
    tools: list[dict] = dataclasses.field(default_factory=list)
    text: str = ""                        # prompt + completion decoded (what the trainer's ids say)

    @property
    def reward(self) -> float:
        return float(sum(self.turn_rewards))

    @property
    def done(self) -> bool:
        return self.end_reason is not None

    def _append(self, ids: Sequence[int], mask: int, logprobs: Sequence[float] | None = None) -> None:
        self.completion_ids += list(ids)
        self.loss_mask += [mask] * len(ids)
        self.logprobs += list(logprobs) if logprobs is not None else [0.0] * len(ids)


def turn_seed(seed: int, turn: int) -> int:
    """The sampling seed of a trajectory's turn: distinct per turn, reproducible from the trajectory's seed."""
    return int(np.random.SeedSequence([int(seed), int(turn)]).generate_state(1)[0] & 0x7FFFFFFF)


def engine_generate_fn(engine_generate: Callable[..., list[list[dict]]], *, temperature: float = 1.0,
                       top_p: float = 1.0) -> GenerateFn:
    """Adapt `RolloutEngine.generate` / `RolloutGroup.generate` (n samples per prompt, one max_tokens) to the
    batched per-prompt form: prompts sharing a max_tokens value go in one call, n=1 each."""
    def generate(prompts: list[list[int]], seeds: list[int], max_tokens: list[int]) -> list[dict]:
        out: list[dict | None] = [None] * len(prompts)
        for budget in sorted(set(max_tokens)):
            idx = [i for i, m in enumerate(max_tokens) if m == budget]
            groups = engine_generate([prompts[i] for i in idx], seeds=[seeds[i] for i in idx], n=1,
                                     temperature=temperature, top_p=top_p, max_tokens=budget)
            for i, group in zip(idx, groups):
                out[i] = group[0]
        return out
    return generate


def run_multiturn(envs: Sequence, generate: GenerateFn, renderer: ChatRenderer, seeds: Sequence[int],
                  limits: MultiTurnLimits = MultiTurnLimits()) -> list[Trajectory]:
    """Roll out one trajectory per environment (see the module docstring); closes the environments."""
    if len(seeds) != len(envs):
        raise ValueError(f"run_multiturn: {len(envs)} environments but {len(seeds)} seeds; give one seed each")
    try:
        trajectories = []
        for k, env in enumerate(envs):
            try:
                obs = env.initial_observation()
            except Exception as err:
                raise RuntimeError(f"environment {k} ({type(env).__name__}) failed in initial_observation: "
                                   f"{type(err).__name__}: {err}") from err
            prompt = renderer.prompt_ids(obs.messages, obs.tools)
            trajectories.append(Trajectory(prompt_ids=prompt, messages=list(obs.messages), tools=list(obs.tools)))
            if len(prompt) >= limits.max_context_tokens:
                trajectories[-1].end_reason = "context"
        with concurrent.futures.ThreadPoolExecutor(max_workers=limits.env_workers,
                                                   thread_name_prefix="posttrain-env") as pool:
            while True:
                live = [i for i, t in enumerate(trajectories) if not t.done]
                if not live:
                    break
                budgets = {i: _turn_budget(trajectories[i], limits) for i in live}
                prompts = [trajectories[i].prompt_ids + trajectories[i].completion_ids for i in live]
                outputs = generate(prompts, [turn_seed(seeds[i], trajectories[i].num_turns) for i in live],
                                   [budgets[i][0] for i in live])
                stepping = {}
                for i, out in zip(live, outputs):
                    traj = trajectories[i]
                    ids = list(out["token_ids"])
                    traj.turn_spans.append((len(traj.completion_ids), len(traj.completion_ids) + len(ids)))
                    traj._append(ids, 1, out.get("logprobs") or [0.0] * len(ids))
                    traj.num_turns += 1
                    traj.turn_rewards.append(0.0)   # the environment's answer to this turn replaces it
                    text = renderer.tokenizer.decode(ids, skip_special_tokens=True)
                    traj.messages.append({"role": "assistant", "content": text})
                    if out.get("finish_reason") == "length":
                        traj.end_reason = budgets[i][1]
                        continue
                    stepping[i] = (pool.submit(_step, envs[i], text), ids)
                for i, (future, ids) in stepping.items():
                    _absorb(trajectories[i], future.result(), ids_of_turn=ids, renderer=renderer, limits=limits)
    except BaseException:   # the engine or an environment failed mid-rollout: no tool process may outlive it
        for env in envs:
            try:
                env.close()
            except Exception:   # noqa: BLE001 - the original error is the one to report
                pass
        raise
    for env, traj in zip(envs, trajectories):
        try:
            env.close()
        except Exception:   # noqa: BLE001 - a failing close must not lose the batch
            traj.errors["env_close"] = traj.errors.get("env_close", 0) + 1
        traj.text = renderer.tokenizer.decode(traj.prompt_ids + traj.completion_ids, skip_special_tokens=False)
    return trajectories


def _turn_budget(traj: Trajectory, limits: MultiTurnLimits) -> tuple[int, str]:
    """(tokens the next turn may sample, the end reason if it uses them all). Always ≥ 1: a trajectory with no
    room left has already ended (observations are appended only when room remains after them)."""
    options = [(limits.max_tokens_per_turn, "turn_length"),
               (limits.max_completion_tokens - len(traj.completion_ids), "max_tokens"),
               (limits.max_context_tokens - len(traj.prompt_ids) - len(traj.completion_ids), "context")]
    return min(options, key=lambda o: o[0])


def _step(env, text: str):
    try:
        return env.step(text), None
    except Exception as err:  # noqa: BLE001 - a broken environment ends its trajectory, not the batch
        return None, f"{type(err).__name__}: {err}"


def _absorb(traj: Trajectory, stepped, *, ids_of_turn: Sequence[int], renderer: ChatRenderer,
            limits: MultiTurnLimits) -> None:
    result, crash = stepped
    if crash is not None:
        traj.errors["env_exception"] = traj.errors.get("env_exception", 0) + 1
        traj.end_reason = "env_error"
        traj.messages.append({"role": "system", "content": f"(environment error: {crash[:300]})"})
        return
    info = result.info or {}
    traj.turn_rewards[-1] = float(result.reward)
    traj.tool_calls += int(info.get("tool_calls", 0))
    for kind in info.get("errors", ()):
        traj.errors[kind] = traj.errors.get(kind, 0) + 1
    for tool_name, seconds in (info.get("tool_latency_s") or {}).items():
        traj.tool_latency_s.setdefault(tool_name, []).extend(seconds)
    if result.done:
        traj.end_reason = "done"
        return
    if traj.num_turns >= limits.max_turns:
        traj.end_reason = "max_turns"
        return
    # traj.messages ends with this turn's assistant message; the renderer puts its sentinel in that place.
    suffix = renderer.observation_ids(traj.messages[:-1], traj.tools, result.messages, ids_of_turn)
    total = len(traj.prompt_ids) + len(traj.completion_ids) + len(suffix)
    if total >= limits.max_context_tokens:
        traj.end_reason = "context"
    elif len(traj.completion_ids) + len(suffix) >= limits.max_completion_tokens:
        traj.end_reason = "max_tokens"
    else:
        traj._append(suffix, 0)
        traj.messages += result.messages


# ------------------------------------------------------------------ metrics and dumps

def batch_metrics(trajectories: Sequence[Trajectory]) -> dict[str, float]:
    """Per-batch environment metrics: env/turns_mean, env/tool_calls_mean, env/tool_errors/<kind> (count per
    trajectory, mean), env/truncated/<reason> (fraction of trajectories), env/tool_latency_s/<tool> (mean and
    max), env/reward_mean, env/completion_tokens_mean, env/policy_token_frac."""
    n = max(1, len(trajectories))
    metrics = {"env/turns_mean": sum(t.num_turns for t in trajectories) / n,
               "env/tool_calls_mean": sum(t.tool_calls for t in trajectories) / n,
               "env/reward_mean": sum(t.reward for t in trajectories) / n,
               "env/completion_tokens_mean": sum(len(t.completion_ids) for t in trajectories) / n}
    tokens = sum(len(t.loss_mask) for t in trajectories)
    metrics["env/policy_token_frac"] = sum(sum(t.loss_mask) for t in trajectories) / max(1, tokens)
    errors: collections.Counter = collections.Counter()
    for t in trajectories:
        errors.update(t.errors)
    metrics.update({f"env/tool_errors/{kind}": count / n for kind, count in sorted(errors.items())})
    reasons = collections.Counter(t.end_reason for t in trajectories if t.end_reason != "done")
    metrics.update({f"env/truncated/{reason}": count / n for reason, count in sorted(reasons.items())})
    latency: dict[str, list[float]] = collections.defaultdict(list)
    for t in trajectories:
        for tool_name, seconds in t.tool_latency_s.items():
            latency[tool_name] += seconds
    for tool_name, seconds in sorted(latency.items()):
        metrics[f"env/tool_latency_s/{tool_name}/mean"] = sum(seconds) / len(seconds)
        metrics[f"env/tool_latency_s/{tool_name}/max"] = max(seconds)
    return metrics


MASKED_OPEN, MASKED_CLOSE = "\u27e6", "\u27e7"   # ⟦ ⟧ around tokens that carry no loss


def render_trajectory(traj: Trajectory, tokenizer) -> str:
    """The trajectory as text for a dump: the prompt, then the completion with every loss-free span (template,
    observation, tool output) inside ⟦ ⟧; the policy's own tokens are unmarked. A header gives the reward,
    turns, tool calls, errors and the end reason."""
    parts = [f"# reward {traj.reward:.3f} | turns {traj.num_turns} | tool calls {traj.tool_calls} | "
             f"errors {dict(traj.errors) or '{}'} | end {traj.end_reason}\n",
             MASKED_OPEN + tokenizer.decode(traj.prompt_ids, skip_special_tokens=False) + MASKED_CLOSE]
    start = 0
    for end in range(1, len(traj.completion_ids) + 1):
        if end == len(traj.completion_ids) or traj.loss_mask[end] != traj.loss_mask[start]:
            text = tokenizer.decode(traj.completion_ids[start:end], skip_special_tokens=False)
            parts.append(text if traj.loss_mask[start] else MASKED_OPEN + text + MASKED_CLOSE)
            start = end
    return "".join(parts)


def trajectory_record(traj: Trajectory) -> dict[str, Any]:
    """A JSON-ready summary of one trajectory (for rollout dumps)."""
    return {"reward": traj.reward, "turn_rewards": traj.turn_rewards, "turn_spans": traj.turn_spans,
            "num_turns": traj.num_turns,
            "tool_calls": traj.tool_calls, "errors": traj.errors, "end_reason": traj.end_reason,
            "messages": traj.messages, "prompt_tokens": len(traj.prompt_ids),
            "completion_tokens": len(traj.completion_ids), "policy_tokens": sum(traj.loss_mask)}
