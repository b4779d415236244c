"""A real `verifiers` environment (classic API: vf.ToolEnv + vf.Rubric, written below with verifiers' own classes)
run by posttrain's token-exact multi-turn driver through envs/verifiers_env.py, on the toy agent's tokenizer and
chat template with a scripted policy. Needs the optional verifiers package (docs/envs.md, "verifiers
environments"); without it every test here fails with the install line rather than skipping."""
import asyncio
import json
import re

import pytest

from envs import EnvSpecError, make_env_group
from posttrain.rollout.multiturn import ChatRenderer, MultiTurnLimits, run_multiturn, turn_seed

pytestmark = pytest.mark.integration

try:
    import verifiers as vf
    from datasets import Dataset
    from envs.verifiers_env import VerifiersExactnessError, load_verifiers_env, verifiers_rows
except ImportError as missing:   # the test module is also loaded as the environment's file below
    vf, MISSING = None, missing
else:
    MISSING = None

THIS_FILE = __file__
TOY_AGENT = "posttrain/toy/assets/toy-agent"
QUESTION = "What is 4821*617?"


# ------------------------------------------------------------------ the verifiers environment (verifiers' classes)

def mul(a: int, b: int) -> str:
    """Multiply two integers.

    Args:
        a: left factor
        b: right factor
    """
    return str(a * b)


def correct_answer(completion, answer, **kwargs) -> float:
    return float((completion[-1].content or "").strip() == f"Answer: {answer}")


def used_a_tool(completion, **kwargs) -> float:
    return float(any(getattr(m, "tool_calls", None) for m in completion))


class HistoryRewriter(vf.ToolEnv if vf else object):
    """Strips the assistant's text from history, as a think-stripping env would: not append-only."""

    async def add_trajectory_step(self, state, trajectory_step):
        for message in trajectory_step["completion"]:
            if message.role == "assistant" and message.content:
                message.content = message.content.strip().upper()
        await super().add_trajectory_step(state, trajectory_step)


class GrowingTools(vf.ToolEnv if vf else object):
    """Offers one more tool after the first call: the prompt's rendered tool list would no longer hold."""

    async def env_response(self, messages, state, **kwargs):
        state["tool_defs"] = [*state["tool_defs"], vf.Tool(name="add", description="Add.", parameters={})]
        return await super().env_response(messages, state, **kwargs)


class NonLinear(vf.MultiTurnEnv if vf else object):
    async def env_response(self, messages, state, **kwargs):
        return [vf.UserMessage(content="again")]

    async def get_prompt_messages(self, state):
        return state["prompt"]           # every turn starts over from the prompt


def python(code: str) -> str:
    """Run Python code in a persistent session; returns what it prints (a final expression's value too).

    Args:
        code: Python source to run
    """
    # The toy agent's python tool as it uses it (print(a*b)); a test environment runs no model-written code.
    match = re.fullmatch(r"\s*print\((\d+)\s*\*\s*(\d+)\)\s*", code)
    return str(int(match[1]) * int(match[2])) if match else "Error: this test tool runs only print(a*b)"


def load_environment(variant: str = "tool", system_prompt: str = "Use the tools.", **kwargs):
    """A verifiers environment, built the way Hub environments are (load_environment -> vf.Environment)."""
    if variant == "toy-python":        # the toy agent's python domain, as a verifiers ToolEnv
        from posttrain.toy.tasks import make_rows
        questions = [{"question": r["prompt"][-1]["content"], "answer": r["reward_model"]["ground_truth"]}
                     for r in make_rows(["python"], 8, 0, "test")]
        return vf.ToolEnv(dataset=Dataset.from_list(questions), tools=[python], max_turns=4,
                          rubric=vf.Rubric(funcs=[correct_answer, used_a_tool], weights=[1.0, 0.5]))
    dataset = Dataset.from_list([
        {"question": QUESTION, "answer": "2974557", "info": {"level": 1}},
        {"question": "What is 12*34?", "answer": "408", "info": {"level": 0}}])
    rubric = vf.Rubric(funcs=[correct_answer, used_a_tool], weights=[1.0, 0.5])
    if variant == "math":             # the classic single-turn shape: \boxed{} answers, verifiers' MathRubric
        return vf.SingleTurnEnv(dataset=dataset, rubric=vf.MathRubric(), system_prompt="Box the answer.")
    if variant == "tool":
        return vf.ToolEnv(dataset=dataset, tools=[mul], rubric=rubric, system_prompt=system_prompt, max_turns=4)
    if variant == "rewrite":
        return HistoryRewriter(dataset=dataset, tools=[mul], rubric=rubric, system_prompt=system_prompt)
    if variant == "growing":
        return GrowingTools(dataset=dataset, tools=[mul], rubric=rubric)
    if variant == "nonlinear":
        return NonLinear(dataset=dataset, rubric=rubric, max_turns=3)
    if variant == "group":
        def relative(completions, **kwargs) -> list[float]:
            return [0.0 for _ in completions]
        return vf.ToolEnv(dataset=dataset, tools=[mul], rubric=vf.Rubric(funcs=[relative]))
    raise ValueError(variant)


# ------------------------------------------------------------------ fixtures

@pytest.fixture(scope="module")
def tok():
    if MISSING is not None:
        pytest.fail(f"verifiers is not installed ({MISSING}); install it as docs/envs.md says "
                    "('verifiers environments')")
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(TOY_AGENT)     # its chat template renders tools, calls and tool results


def spec(variant="tool"):
    return {"env_id": THIS_FILE, "env_args": {"variant": variant}}


def rows(variant="tool"):
    return verifiers_rows(THIS_FILE, {"variant": variant})


def call(name, **arguments):
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


def scripted_generate(tok, scripts):
    """A batched generate where trajectory k (seed k) samples scripts[k][t] at its turn t, ending with <|im_end|>."""
    reply = {turn_seed(k, t): text for k, script in enumerate(scripts) for t, text in enumerate(script)}

    def generate(prompts, seeds, max_tokens):
        return [{"token_ids": sampled_ids(tok, reply[seed]), "logprobs": None, "finish_reason": "stop"}
                for seed in seeds]
    return generate


def roll(tok, envs, scripts, **limits):
    generate = scripted_generate(tok, scripts)
    renderer = ChatRenderer(tok)
    trajs = run_multiturn(envs, generate, renderer, seeds=list(range(len(envs))), limits=MultiTurnLimits(**limits))
    return trajs, renderer


def sampled_ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]


# ------------------------------------------------------------------ tests

def test_tool_env_runs_token_exact_and_is_scored_by_its_rubric(tok):
    row = rows()[0]
    (env,) = make_env_group(row, 1, default="verifiers", default_kwargs=spec())
    turns = [call("mul", a=4821, b=617), "Answer: 2974557"]
    (traj,), renderer = roll(tok, [env], [turns])
    assert traj.end_reason == "done" and traj.num_turns == 2 and traj.tool_calls == 1

    # The prompt is what verifiers sends its model: its system prompt, the question, its tool schema from mul().
    assert traj.messages[:2] == [{"role": "system", "content": "Use the tools."}, {"role": "user", "content": QUESTION}]
    assert [t["function"]["name"] for t in traj.tools] == ["mul"]
    assert "mul(a, b): Multiply two integers." in tok.decode(traj.prompt_ids)
    # ids = prompt + sampled turn 1 + the rendered observation (verifiers' own tool answer) + sampled turn 2, exactly
    tool_message = traj.messages[3]
    assert tool_message["role"] == "tool" and tool_message["content"] == "2974557" and tool_message["tool_call_id"]
    observation = renderer.observation_ids(traj.messages[:2], traj.tools, [tool_message], sampled_ids(tok, turns[0]))
    expected = sampled_ids(tok, turns[0]) + observation + sampled_ids(tok, turns[1])
    assert traj.prompt_ids == renderer.prompt_ids(traj.messages[:2], traj.tools)
    assert traj.completion_ids == expected
    n1, n2 = len(sampled_ids(tok, turns[0])), len(sampled_ids(tok, turns[1]))
    assert traj.loss_mask == [1] * n1 + [0] * len(observation) + [1] * n2
    # ... and the whole sequence is the chat template's rendering of verifiers' conversation (calls structured)
    state = env.state
    conversation = [m.model_dump(exclude_none=True) for m in [*state["prompt"], *state["completion"]]]
    full = tok.apply_chat_template(conversation, tools=traj.tools, tokenize=False)
    assert traj.prompt_ids + traj.completion_ids + tok("\n", add_special_tokens=False)["input_ids"] == \
        tok(full, add_special_tokens=False)["input_ids"]

    # The reward is the rubric's score: correct (1.0) + used a tool (0.5), with verifiers' own metrics alongside.
    assert state["reward"] == 1.5 and traj.reward == 1.5 and traj.turn_rewards == [0.0, 1.5]
    assert state["metrics"]["correct_answer"] == 1.0 and state["metrics"]["num_turns"] == 2
    assert state["metrics"]["total_tool_calls"] == 1.0 and state["answer"] == "2974557"
    assert state["info"] == {"level": 1}           # the row's info reaches the rollout


def test_group_of_episodes_each_scored_on_its_own_and_answers_without_tools(tok):
    row = rows()[1]
    envs = make_env_group(row, 3, default="verifiers", default_kwargs=spec())
    scripts = [["Answer: 408"],                                   # right, no tool: ToolEnv ends the episode
               ["Answer: 999"],                                   # wrong
               [call("mul", a=12, b=34), call("mul", a=1, b=1), "Answer: 408"]]
    trajs, _ = roll(tok, envs, scripts)
    assert [t.reward for t in trajs] == [1.0, 0.0, 1.5]
    assert [t.num_turns for t in trajs] == [1, 1, 3] and [t.tool_calls for t in trajs] == [0, 0, 2]
    assert [e.state["reward"] for e in envs] == [1.0, 0.0, 1.5]
    for t in trajs:
        assert all(t.loss_mask[a:b] == [1] * (b - a) for a, b in t.turn_spans)
        assert sum(t.loss_mask) == sum(b - a for a, b in t.turn_spans)


def test_malformed_call_is_counted_and_ends_as_vllm_hermes_parser_would(tok):
    (env,) = make_env_group(rows()[0], 1, default="verifiers", default_kwargs=spec())
    (traj,), _ = roll(tok, [env], [['<tool_call>{"name": "mul", "arguments": {"a": 1,}}</tool_call>']])
    # vLLM's hermes parser gives an unparsable call back as plain content: verifiers' ToolEnv sees no call and stops.
    assert traj.end_reason == "done" and traj.errors == {"bad_json": 1} and traj.tool_calls == 0
    assert traj.reward == env.state["reward"] == 0.0


def test_limit_reached_mid_rollout_cancels_the_verifiers_rollout(tok):
    (env,) = make_env_group(rows()[0], 1, default="verifiers", default_kwargs=spec())
    (traj,), _ = roll(tok, [env], [[call("mul", a=1, b=2), call("mul", a=3, b=4)]], max_turns=2)
    assert traj.end_reason == "max_turns" and traj.reward == 0.0 and traj.num_turns == 2
    assert env.task.done() and env.task.cancelled() and env.state is None


def test_history_rewriting_env_is_refused_at_the_rewrite(tok):
    (env,) = make_env_group(rows("rewrite")[0], 1, default="verifiers", default_kwargs=spec("rewrite"))
    (traj,), _ = roll(tok, [env], [["let me compute " + call("mul", a=4821, b=617), "Answer: 2974557"]])
    assert traj.end_reason == "env_error" and traj.errors == {"env_exception": 1}
    assert "did not keep the policy's turn" in traj.messages[-1]["content"]
    with pytest.raises(VerifiersExactnessError):
        (env,) = make_env_group(rows("rewrite")[0], 1, default="verifiers", default_kwargs=spec("rewrite"))
        env.initial_observation()
        env.step("let me compute " + call("mul", a=1, b=2))


def test_non_linear_and_group_rubric_envs_are_refused_before_any_rollout(tok):
    with pytest.raises(EnvSpecError, match="overrides get_prompt_messages"):
        load_verifiers_env(THIS_FILE, {"variant": "nonlinear"})
    with pytest.raises(EnvSpecError, match="group rubric"):
        load_verifiers_env(THIS_FILE, {"variant": "group"})
    with pytest.raises(EnvSpecError, match="no load_environment|does not exist"):
        make_env_group(rows()[0], 1, default="verifiers", default_kwargs={"env_id": "no/such/env.py"})
    with pytest.raises(EnvSpecError, match="Could not import 'no-such-verifiers-env'"):
        load_verifiers_env("no-such-verifiers-env")


def test_rows_carry_the_environment_dataset(tok):
    got = rows()
    assert [r["reward_model"]["ground_truth"] for r in got] == ["2974557", "408"]
    assert got[0]["prompt"] == [{"role": "system", "content": "Use the tools."}, {"role": "user", "content": QUESTION}]
    record = json.loads(got[1]["extra_info"]["verifiers"])
    assert record["example_id"] == 1 and record["info"] == {"level": 0} and got[0]["data_source"].startswith("verifiers/")
    assert asyncio.iscoroutinefunction(vf.ToolEnv.env_response)   # the classic API the adapter drives


def test_sampled_ids_that_do_not_round_trip_are_kept_as_sampled(tok):
    # The policy may sample a non-canonical tokenisation (here one id per character); verifiers reads its text,
    # but the trajectory keeps the sampled ids: nothing is re-tokenised from verifiers' messages.
    (env,) = make_env_group(rows()[0], 1, default="verifiers", default_kwargs=spec())
    text = call("mul", a=4821, b=617)
    odd = [i for ch in text for i in tok(ch, add_special_tokens=False)["input_ids"]] + [tok.eos_token_id]
    assert odd != sampled_ids(tok, text) and tok.decode(odd, skip_special_tokens=True) == text
    answer = sampled_ids(tok, "Answer: 2974557")
    replies = iter([odd, answer])

    def generate(prompts, seeds, max_tokens):
        return [{"token_ids": next(replies), "logprobs": None, "finish_reason": "stop"} for _ in prompts]

    renderer = ChatRenderer(tok)
    (traj,) = run_multiturn([env], generate, renderer, seeds=[0])
    observation = renderer.observation_ids(traj.messages[:2], traj.tools, [traj.messages[3]], odd)
    assert traj.completion_ids == odd + observation + answer
    assert traj.loss_mask == [1] * len(odd) + [0] * len(observation) + [1] * len(answer)
    assert env.state["completion"][1].content == "2974557" and traj.reward == 1.5


def test_toy_agent_model_samples_a_verifiers_tool_env_token_exact(tok):
    # The committed toy agent (a real model, sampling with transformers) on its python domain served by verifiers:
    # whatever it samples, the trajectory is its sampled ids plus verifiers' observations rendered, and the reward is
    # the rubric's score of verifiers' conversation.
    import torch
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(TOY_AGENT).eval()
    sampled = {}

    @torch.no_grad()
    def generate(prompts, seeds, max_tokens):
        outs = []
        for prompt, seed, budget in zip(prompts, seeds, max_tokens):
            torch.manual_seed(seed)
            out = model.generate(torch.tensor([prompt]), do_sample=True, top_k=0, max_new_tokens=budget,
                                 eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
            ids = out[0, len(prompt):].tolist()
            ids = ids[:ids.index(tok.eos_token_id) + 1] if tok.eos_token_id in ids else ids
            sampled[seed] = ids
            outs.append({"token_ids": ids, "logprobs": None,
                         "finish_reason": "stop" if ids[-1] == tok.eos_token_id else "length"})
        return outs

    vf_rows = rows("toy-python")[:4]
    envs = [make_env_group(row, 1, default="verifiers", default_kwargs=spec("toy-python"))[0] for row in vf_rows]
    renderer = ChatRenderer(tok)
    trajs = run_multiturn(envs, generate, renderer, seeds=list(range(len(envs))),
                          limits=MultiTurnLimits(max_turns=4, max_tokens_per_turn=48, max_context_tokens=1024))
    called = 0
    for k, (traj, env, row) in enumerate(zip(trajs, envs, vf_rows)):
        prompt_len = len(row["prompt"])
        expected, mask, history = [], [], traj.messages[:prompt_len]
        for t, message in enumerate(traj.messages[prompt_len:]):
            if message["role"] == "assistant":
                turn_ids = sampled[turn_seed(k, sum(m["role"] == "assistant" for m in history[prompt_len:]))]
                expected, mask = expected + turn_ids, mask + [1] * len(turn_ids)
                before_turn = list(history)
            else:
                following = traj.messages[prompt_len + t:]
                if history[-1]["role"] == "assistant":     # an observation starts: render its whole group once
                    group = following[:next((i for i, m in enumerate(following) if m["role"] == "assistant"),
                                            len(following))]
                    obs = renderer.observation_ids(before_turn, traj.tools, group, turn_ids)
                    expected, mask = expected + obs, mask + [0] * len(obs)
            history.append(message)
        assert traj.completion_ids == expected and traj.loss_mask == mask, k
        assert traj.prompt_ids == renderer.prompt_ids(row["prompt"], traj.tools)
        if traj.end_reason == "done":
            final = traj.messages[-1]["content"].strip()
            score = float(final == f"Answer: {row['reward_model']['ground_truth']}") + 0.5 * (traj.tool_calls > 0)
            assert traj.reward == env.state["reward"] == score, k
        else:
            assert traj.reward == 0.0 and env.state is None
        called += traj.tool_calls > 0
    assert called > 0                     # the toy agent does call the python tool verifiers offers
    print("toy agent on verifiers toy-python: reward", [t.reward for t in trajs],
          "ends", [t.end_reason for t in trajs])


def test_single_turn_env_with_math_rubric(tok):
    envs = [make_env_group(row, 1, default="verifiers", default_kwargs=spec("math"))[0] for row in rows("math")]
    (right, wrong), _ = roll(tok, envs, [["It is \\boxed{2974557}."], ["It is \\boxed{407}."]])
    assert right.end_reason == wrong.end_reason == "done" and right.num_turns == wrong.num_turns == 1
    assert (right.reward, wrong.reward) == (envs[0].state["reward"], envs[1].state["reward"]) == (1.0, 0.0)
    assert right.messages[0] == {"role": "system", "content": "Box the answer."} and right.tools == []


def test_env_changing_its_tools_mid_episode_is_refused(tok):
    (env,) = make_env_group(rows("growing")[0], 1, default="verifiers", default_kwargs=spec("growing"))
    (traj,), _ = roll(tok, [env], [[call("mul", a=4821, b=617), "Answer: 2974557"]])
    assert traj.end_reason == "env_error" and "changed its tools mid-episode" in traj.messages[-1]["content"]
