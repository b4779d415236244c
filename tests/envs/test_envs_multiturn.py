"""The multi-turn driver: token-exact trajectories, loss masks on exact ids, the template-suffix rule, limits,
concurrency, metrics and dumps. The engine is a scripted batched `generate` (the real one: test_envs_vllm.py)."""
import time

import pytest
from transformers import AutoTokenizer

from envs import Env, Observation, StepResult, ToolEnv, tool
from posttrain.rollout.multiturn import (ChatRenderer, MultiTurnLimits, TemplateError, batch_metrics,
                                         render_trajectory, run_multiturn, turn_seed)
from posttrain.toy.build import CHAT_TEMPLATE

pytestmark = pytest.mark.unit

QUESTION = [{"role": "user", "content": "What is 4821*617?"}]


@pytest.fixture(scope="module")
def tok():
    tokenizer = AutoTokenizer.from_pretrained("posttrain/toy/assets/toy-base")
    tokenizer.chat_template = CHAT_TEMPLATE   # the tool-aware toy template newly built toy models get
    return tokenizer


class Calculator(ToolEnv):
    @tool
    def mul(self, a: int, b: int) -> str:
        """Multiply.

        Args:
            a: left factor
            b: right factor
        """
        return str(a * b)

    def final_reward(self, answer):
        return float(answer.strip() == "Answer: 2974557")


def call(name, **arguments):
    import json
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def scripted_generate(tok, scripts_by_seed):
    """generate() keyed by the trajectory seed: trajectory with seed s answers its turns with scripts_by_seed[s]."""
    seen = {"calls": [], "turn": {s: 0 for s in scripts_by_seed}}
    by_turn_seed = {}
    for s, script in scripts_by_seed.items():
        for t in range(len(script)):
            by_turn_seed[turn_seed(s, t)] = (s, t)

    def generate(prompts, seeds, max_tokens):
        seen["calls"].append((list(map(list, prompts)), list(seeds), list(max_tokens)))
        outs = []
        for seed, budget in zip(seeds, max_tokens):
            s, t = by_turn_seed[seed]
            entry = scripts_by_seed[s][t]
            text, reason = entry if isinstance(entry, tuple) else (entry, "stop")
            ids = tok(text, add_special_tokens=False)["input_ids"] + ([tok.eos_token_id] if reason == "stop" else [])
            ids = ids[:budget]
            outs.append({"token_ids": ids, "logprobs": [-0.001 * (i + 1) for i in range(len(ids))],
                         "finish_reason": reason if len(ids) < budget or reason == "stop" else "length"})
        return outs
    return generate, seen


def test_template_suffix_rule_matches_full_rendering(tok):
    # The appended observation ids keep the "\n" after <|im_end|>; prompt + completion equals the template's full
    # rendering of the conversation, because each policy turn re-tokenises to the ids sampled here.
    turns = [call("mul", a=4821, b=617), call("mul", a=1, b=2) + call("mul", a=3, b=4), "Answer: 2974557"]
    generate, seen = scripted_generate(tok, {7: turns})
    env = Calculator({"prompt": QUESTION})
    (traj,) = run_multiturn([env], generate, ChatRenderer(tok), seeds=[7])
    assert traj.end_reason == "done" and traj.num_turns == 3 and traj.reward == 1.0 and traj.tool_calls == 3
    full = tok.apply_chat_template(traj.messages, tools=traj.tools, tokenize=False)
    assert full.endswith("<|im_end|>\n")
    assert traj.prompt_ids + traj.completion_ids + tok("\n", add_special_tokens=False)["input_ids"] == \
        tok(full, add_special_tokens=False)["input_ids"]
    # two tool results of one turn share one user turn, as in Qwen3
    assert "<tool_response>\n2\n</tool_response>\n<tool_response>\n12\n</tool_response><|im_end|>" in traj.text
    # every engine call got exactly the trajectory's ids so far: nothing was re-tokenised
    final = traj.prompt_ids + traj.completion_ids
    for prompts, _, _ in seen["calls"]:
        assert final[:len(prompts[0])] == prompts[0]


def test_loss_mask_and_logprobs_on_exact_ids(tok):
    turns = [call("mul", a=4821, b=617), "Answer: 2974557"]
    generate, _ = scripted_generate(tok, {1: turns})
    (traj,) = run_multiturn([Calculator({"prompt": QUESTION})], generate, ChatRenderer(tok), seeds=[1])
    ids = lambda text: tok(text, add_special_tokens=False)["input_ids"]   # noqa: E731
    eos = [tok.eos_token_id]
    turn1, turn2 = ids(turns[0]) + eos, ids(turns[1]) + eos
    observation = ids("\n<|im_start|>user\n<tool_response>\n2974557\n</tool_response><|im_end|>\n"
                      "<|im_start|>assistant\n")
    assert traj.completion_ids == turn1 + observation + turn2
    assert traj.loss_mask == [1] * len(turn1) + [0] * len(observation) + [1] * len(turn2)
    lp = lambda n: [-0.001 * (i + 1) for i in range(n)]   # noqa: E731
    assert traj.logprobs == lp(len(turn1)) + [0.0] * len(observation) + lp(len(turn2))
    assert len(traj.completion_ids) == len(traj.loss_mask) == len(traj.logprobs)
    # per-turn credit: each turn's span in the completion and the reward the environment gave it
    second = len(turn1) + len(observation)
    assert traj.turn_spans == [(0, len(turn1)), (second, second + len(turn2))] and traj.turn_rewards == [0.0, 1.0]


def test_turn_without_eos_gets_the_whole_end_of_turn(tok):
    # A turn that stopped on a stop string (no <|im_end|> sampled) is closed by the template's <|im_end|>, mask 0.
    renderer = ChatRenderer(tok)
    history = QUESTION
    turn_ids = tok(call("mul", a=1, b=2), add_special_tokens=False)["input_ids"]
    obs = [{"role": "tool", "content": "2"}]
    with_eos = renderer.observation_ids(history, [], obs, turn_ids + [tok.eos_token_id])
    without = renderer.observation_ids(history, [], obs, turn_ids)
    assert without == [tok.eos_token_id] + with_eos
    assert tok.decode(with_eos).startswith("\n<|im_start|>user\n<tool_response>")


# Qwen3's way with the last assistant turn: an empty <think></think> block is rendered only while it is the last
# message, so the conversation's text before the turn's content changes once an observation follows.
QWEN3_LIKE = (
    "{% for m in messages %}{% if m['role'] == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% if loop.last %}{{ '<think>\n\n</think>\n\n' }}{% endif %}{{ m['content'] + '<|im_end|>\n' }}"
    "{% elif m['role'] == 'tool' %}{{ '<|im_start|>user\n<tool_response>\n' + m['content'] + "
    "'\n</tool_response><|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>\n' }}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")


def test_suffix_ignores_what_the_template_renders_before_the_turn(tok):
    renderer = ChatRenderer(tok, chat_template=QWEN3_LIKE)
    turn = tok(call("mul", a=1, b=2), add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    suffix = renderer.observation_ids(QUESTION, [], [{"role": "tool", "content": "2"}], turn)
    assert tok.decode(suffix) == "\n<|im_start|>user\n<tool_response>\n2\n</tool_response><|im_end|>\n<|im_start|>assistant\n"


def test_template_whose_turn_ending_depends_on_what_follows_is_refused(tok):
    # If the end of a turn changes once something follows, the ids already sampled could not be extended.
    odd = ("{% for m in messages %}{{ m['role'] + ':' + m['content'] + ('.' if loop.last else '|') }}{% endfor %}"
           "{% if add_generation_prompt %}assistant:{% endif %}")
    with pytest.raises(TemplateError, match="does not depend on what follows"):
        ChatRenderer(tok, chat_template=odd).observation_ids(QUESTION, [], [{"role": "tool", "content": "x"}], [])


@pytest.mark.parametrize("limits,script,reason,turns", [
    (MultiTurnLimits(max_turns=2), [call("mul", a=1, b=2)] * 5, "max_turns", 2),
    (MultiTurnLimits(max_tokens_per_turn=5), [("x" * 40, "length")], "turn_length", 1),
    (MultiTurnLimits(max_completion_tokens=60), [call("mul", a=1, b=2)] * 5, "max_tokens", None),
    (MultiTurnLimits(max_context_tokens=170), [call("mul", a=1, b=2)] * 5, "context", None),
])
def test_limits_end_trajectories_with_a_reason(tok, limits, script, reason, turns):
    generate, seen = scripted_generate(tok, {3: script})
    (traj,) = run_multiturn([Calculator({"prompt": QUESTION})], generate, ChatRenderer(tok), [3], limits)
    assert traj.end_reason == reason
    if turns is not None:
        assert traj.num_turns == turns
    assert len(traj.turn_rewards) == len(traj.turn_spans) == traj.num_turns
    assert len(traj.completion_ids) <= limits.max_completion_tokens
    assert len(traj.prompt_ids) + len(traj.completion_ids) <= limits.max_context_tokens
    assert all(b <= limits.max_tokens_per_turn for _, _, budgets in seen["calls"] for b in budgets)
    # a truncated trajectory never ends on an observation: its last token is the policy's
    assert traj.loss_mask[-1] == 1


class Sleepy(Env):
    def __init__(self, row, seconds=0.5, crash=False):
        self.row, self.seconds, self.crash = row, seconds, crash

    def initial_observation(self):
        return Observation(self.row["prompt"])

    def step(self, action):
        if self.crash:
            raise RuntimeError("env bug")
        time.sleep(self.seconds)
        return StepResult([], reward=1.0, done=True, info={"tool_calls": 1})


def test_env_steps_run_concurrently_and_a_crashing_env_ends_only_its_trajectory(tok):
    envs = [Sleepy({"prompt": QUESTION}) for _ in range(6)] + [Sleepy({"prompt": QUESTION}, crash=True)]
    generate, seen = scripted_generate(tok, {s: ["Answer: 1"] for s in range(7)})
    start = time.monotonic()
    trajs = run_multiturn(envs, generate, ChatRenderer(tok), seeds=list(range(7)))
    assert time.monotonic() - start < 2.0            # 6 x 0.5 s of env time, run side by side
    assert len(seen["calls"]) == 1 and len(seen["calls"][0][0]) == 7   # one batched generate for all of them
    assert [t.end_reason for t in trajs] == ["done"] * 6 + ["env_error"]
    assert trajs[-1].errors == {"env_exception": 1} and trajs[0].reward == 1.0


def test_batches_advance_together_and_metrics(tok):
    scripts = {0: [call("mul", a=4821, b=617), "Answer: 2974557"],
               1: ["Answer: 3"],
               2: ["<tool_call>{bad json}</tool_call>", call("nope"), call("mul", a="x", b=1), "Answer: 2974557"]}
    generate, seen = scripted_generate(tok, scripts)
    envs = [Calculator({"prompt": QUESTION}) for _ in range(3)]
    trajs = run_multiturn(envs, generate, ChatRenderer(tok), seeds=[0, 1, 2])
    assert [len(p) for p, _, _ in seen["calls"]] == [3, 2, 1, 1]      # each round: one call for the live ones
    assert [t.reward for t in trajs] == [1.0, 0.0, 1.0]
    assert trajs[2].errors == {"bad_json": 1, "unknown_tool": 1, "bad_arguments": 1}
    m = batch_metrics(trajs)
    assert m["env/turns_mean"] == pytest.approx((2 + 1 + 4) / 3)
    assert m["env/tool_calls_mean"] == pytest.approx((1 + 0 + 3) / 3)
    assert m["env/tool_errors/bad_json"] == pytest.approx(1 / 3)
    assert "env/tool_latency_s/mul/mean" in m and m["env/reward_mean"] == pytest.approx(2 / 3)
    dump = render_trajectory(trajs[0], tok)
    assert "⟦\n<|im_start|>user\n<tool_response>\n2974557\n</tool_response><|im_end|>\n<|im_start|>assistant\n⟧" in dump
    assert 'Answer: 2974557<|im_end|>' in dump and dump.startswith("# reward 1.000 | turns 2")


def test_truncation_metrics(tok):
    generate, _ = scripted_generate(tok, {0: [call("mul", a=1, b=2)] * 3, 1: ["Answer: 1"]})
    trajs = run_multiturn([Calculator({"prompt": QUESTION}) for _ in range(2)], generate, ChatRenderer(tok),
                          [0, 1], MultiTurnLimits(max_turns=3))
    assert batch_metrics(trajs)["env/truncated/max_turns"] == 0.5


def test_seeds_differ_per_turn_and_are_reproducible():
    assert turn_seed(5, 0) != turn_seed(5, 1) and turn_seed(5, 1) == turn_seed(5, 1) != turn_seed(6, 1)


def test_engine_generate_fn_groups_by_budget_and_keeps_order():
    from posttrain.rollout.multiturn import engine_generate_fn
    calls = []

    def engine_generate(prompts, *, seeds, n, temperature, top_p, max_tokens):   # RolloutEngine.generate's shape
        calls.append((prompts, seeds, n, max_tokens))
        return [[{"token_ids": [p[0], max_tokens], "logprobs": [-0.5, -0.5], "finish_reason": "stop"}]
                for p in prompts]
    generate = engine_generate_fn(engine_generate, temperature=0.7, top_p=0.9)
    outs = generate([[1], [2], [3]], [10, 20, 30], [8, 4, 8])
    assert [o["token_ids"] for o in outs] == [[1, 8], [2, 4], [3, 8]]
    assert sorted((c[3], c[1]) for c in calls) == [(4, [20]), (8, [10, 30])] and all(c[2] == 1 for c in calls)


def test_qwen3_family_template_shipped_with_vllm(tok):
    # vLLM ships MiniCPM-V 4.5's chat template: Qwen3's, tools and think blocks included. Its generation prompt
    # holds an empty think block (enable_thinking false), and the last assistant turn's own think block vanishes
    # once an observation follows: the suffix is still exactly the observation and the next prompt.
    import importlib.util
    import os
    path = os.path.join(importlib.util.find_spec("vllm").submodule_search_locations[0],
                        "transformers_utils", "chat_templates", "template_minicpmv45.jinja")
    if not os.path.exists(path):
        pytest.skip(f"this vLLM version does not ship {path}")
    renderer = ChatRenderer(tok, chat_template=open(path).read())
    tools = [Calculator.mul.schema()]
    turns = [call("mul", a=4821, b=617), "Answer: 2974557"]
    generate, _ = scripted_generate(tok, {4: turns})
    (traj,) = run_multiturn([Calculator({"prompt": QUESTION})], generate, renderer, seeds=[4])
    assert traj.end_reason == "done" and traj.reward == 1.0 and traj.tools == tools
    first_turn_end = traj.turn_spans[0][1]
    observation = tok.decode(traj.completion_ids[first_turn_end:traj.turn_spans[1][0]])
    assert observation == ("\n<|im_start|>user\n<tool_response>\n2974557\n</tool_response><|im_end|>\n"
                           "<|im_start|>assistant\n<think>\n\n</think>\n\n")
    assert tok.decode(traj.prompt_ids).startswith("<|im_start|>system\n# Tools\n")


def test_an_engine_failure_mid_rollout_closes_every_environment(tok):
    """A generate() that raises on the second turn (an engine crash) propagates, and every environment of the batch
    is closed first: a tool process (the python env's sandboxed interpreter) never outlives a failed rollout."""
    closed = []

    class Tracked(Calculator):
        def close(self):
            closed.append(id(self))

    envs = [Tracked({"prompt": QUESTION}) for _ in range(3)]
    first_turn, _ = scripted_generate(tok, {s: [call("mul", a=4821, b=617)] for s in range(3)})
    turns = {"n": 0}

    def generate(prompts, seeds, max_tokens):
        turns["n"] += 1
        if turns["n"] == 2:
            raise RuntimeError("engine died")
        return first_turn(prompts, seeds, max_tokens)

    with pytest.raises(RuntimeError, match="engine died"):
        run_multiturn(envs, generate, ChatRenderer(tok), seeds=[0, 1, 2])
    assert sorted(closed) == sorted(map(id, envs))
