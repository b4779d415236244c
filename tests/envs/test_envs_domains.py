"""The shipped environments and their toy agent domains: the tau reward, the code judge's feedback loop, the
lookup store, demonstrations that are exactly what the environments answer and what a rollout produces, the
tool-aware toy template, and the existing toy domains left untouched."""
import hashlib
import json

import pytest
from transformers import AutoTokenizer

from envs import make_env_group
from envs.tau import OrdersAPI, TauEnv, tau_reward
from posttrain.toy.build import CHAT_TEMPLATE, PLAIN_CHAT_TEMPLATE, encode_demonstration
from posttrain.toy.tasks import AGENT_DOMAINS, DOMAINS, make_rows

AGENT = sorted(AGENT_DOMAINS)


@pytest.fixture(scope="module")
def tok():
    tokenizer = AutoTokenizer.from_pretrained("posttrain/toy/assets/toy-base")
    tokenizer.chat_template = CHAT_TEMPLATE
    return tokenizer


def call(name, **arguments):
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


DB = {"orders": {"o1": {"user": "ana", "item": "lamp", "status": "pending", "address": "1 Elm St"},
                 "o2": {"user": "ana", "item": "mug", "status": "shipped", "address": "1 Elm St"},
                 "o3": {"user": "ben", "item": "lamp", "status": "pending", "address": "2 Oak St"}}}
GOLD = [{"name": "cancel_order", "arguments": {"order_id": "o1"}}]


@pytest.mark.unit
def test_tau_reward_compares_final_state_with_gold_replay():
    assert tau_reward(DB, GOLD, OrdersAPI(DB).db) == 0.0                     # nothing done
    right = OrdersAPI(DB)
    right.find_orders("ana"), right.get_order("o2"), right.cancel_order("o1")   # reads change nothing
    assert tau_reward(DB, GOLD, right.db) == 1.0
    wrong = OrdersAPI(DB)
    wrong.cancel_order("o3")
    assert tau_reward(DB, GOLD, wrong.db) == 0.0                             # the wrong order
    extra = OrdersAPI(DB)
    extra.cancel_order("o1"), extra.change_address("o3", "9 Ash St")
    assert tau_reward(DB, GOLD, extra.db) == 0.0                             # an extra change
    assert OrdersAPI(DB).cancel_order("o2") == "Order o2 is shipped and cannot be cancelled."
    assert DB["orders"]["o1"]["status"] == "pending"                         # the row's database is never touched


@pytest.mark.unit
def test_tau_env_episode():
    row = {"prompt": [{"role": "user", "content": "I am ana. Cancel my lamp order."}],
           "reward_model": {"ground_truth": json.dumps(GOLD)}}
    env = TauEnv(row, db=json.dumps(DB))
    listed = env.step(call("find_orders", user="ana")).messages[0]["content"]
    assert listed == "o1 lamp pending\no2 mug shipped"
    assert env.step(call("cancel_order", order_id="o1")).messages[0]["content"] == "Order o1 cancelled."
    assert env.step("Done.").reward == 1.0
    guesser = TauEnv(row, db=DB)
    guesser.step(call("cancel_order", order_id="o3"))
    assert guesser.step("Done.").reward == 0.0


@pytest.mark.integration
def test_code_env_submit_read_failure_fix():
    row = {"prompt": [{"role": "user", "content": "Write f(x) returning x*7."}],
           "reward_model": {"ground_truth": json.dumps({"fn_name": "f", "inputs": [[1], [4]], "outputs": [7, 28]})}}
    env = make_env_group(row, 1, default="code", default_kwargs={"max_submissions": 2})[0]
    failed = env.step(call("submit", code="def f(x): return x*8"))
    assert failed.messages[0]["content"] == \
        "Failed wrong_answer on f(1): expected 7; returned 8. 1 submission(s) left."
    fixed = env.step(call("submit", code="def f(x): return x*7"))
    assert fixed.done and fixed.reward == 1.0
    quitter = make_env_group(row, 1, default="code", default_kwargs={"max_submissions": 1})[0]
    quitter.step(call("submit", code="def f(x): return x"))
    over = quitter.step(call("submit", code="def f(x): return x*7"))
    assert over.info["errors"] == ["after_end"] and "no submissions left" in over.messages[0]["content"]
    assert quitter.step("Done.").reward == 0.0


@pytest.mark.unit
def test_lookup_answers_only_in_the_store():
    from envs.lookup import toy_facts
    row = make_rows(["lookup"], 1, 0, "train")[0]
    env = make_env_group(row, 1)[0]
    answer = row["reward_model"]["ground_truth"]
    found = env.step(row["extra_info"]["answer"][0]["content"]).messages[0]["content"]
    assert answer in found and len(found.splitlines()) == 2
    assert env.step(f"Answer: {answer}").reward == 1.0
    names = [name for fact in toy_facts(0) for name in fact]
    assert len(set(names)) == len(names) == 900                # made-up names, all distinct


@pytest.mark.integration
@pytest.mark.parametrize("domain", AGENT)
def test_demonstrations_are_what_the_environment_answers(domain):
    # A demonstration's tool messages come from the environment's own tool code (the python one from a stand-in
    # for speed): replaying its assistant turns in a real environment gives back the same messages and reward 1;
    # the bad habit scores 0.
    rows = make_rows([domain], 6, 0, "sft", with_habits=True)
    for row in rows[:3]:
        for demo, reward in ((row["extra_info"]["answer"], 1.0), (row["extra_info"]["habit"], 0.0)):
            if demo is None:
                continue
            env = make_env_group(row, 1)[0]
            turns = [m for m in demo if m["role"] == "assistant"]
            replayed, total = [], 0.0
            for turn in turns:
                result = env.step(turn["content"])
                replayed += [{"role": "assistant", "content": turn["content"]}, *result.messages]
                total += result.reward
            env.close()
            assert replayed == demo, (domain, row["prompt"])
            assert result.done and total == reward, (domain, demo)


@pytest.mark.integration
@pytest.mark.parametrize("domain", AGENT)
def test_demonstration_ids_are_what_a_rollout_produces(tok, domain):
    # The warm-up trains on exactly the token layout (and loss mask) that the multi-turn rollout builds.
    from posttrain.rollout.multiturn import ChatRenderer, run_multiturn, turn_seed
    row = next(r for r in make_rows([domain], 20, 0, "sft")
               if sum(m["role"] == "assistant" for m in r["extra_info"]["answer"]) > 1)   # a multi-turn one
    if domain == "python":
        row["extra_info"]["answer"][2]["content"] = "Answer: 1"    # no sandbox here: the tool below is stubbed
    turns = [m["content"] for m in row["extra_info"]["answer"] if m["role"] == "assistant"]

    def generate(prompts, seeds, max_tokens):
        t = [turn_seed(0, i) for i in range(len(turns))].index(seeds[0])
        ids = tok(turns[t], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
        return [{"token_ids": ids, "logprobs": [-1.0] * len(ids), "finish_reason": "stop"}]

    env = make_env_group(row, 1)[0]
    if domain == "python":
        env.session.run = lambda code: row["extra_info"]["answer"][1]["content"]
    (traj,) = run_multiturn([env], generate, ChatRenderer(tok), seeds=[0])
    prompt, completion, mask = encode_demonstration(tok, row)
    assert (prompt, completion, mask) == (traj.prompt_ids, traj.completion_ids, traj.loss_mask)
    assert 0 < sum(mask) < len(mask) and len(prompt) + len(completion) < 1024     # fits the toy model


@pytest.mark.unit
def test_tool_template_renders_plain_prompts_exactly_as_before(tok):
    plain = AutoTokenizer.from_pretrained("posttrain/toy/assets/toy-base")
    assert plain.chat_template == PLAIN_CHAT_TEMPLATE             # the committed assets' template
    conversations = [r["prompt"] for r in make_rows(sorted(DOMAINS), 26, 0, "train")]
    conversations.append([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                          {"role": "assistant", "content": "Hello"}, {"role": "user", "content": "2+2?"}])
    for messages in conversations:
        for gen in (True, False):
            assert tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen) == \
                plain.apply_chat_template(messages, tokenize=False, add_generation_prompt=gen)


@pytest.mark.unit
def test_tool_template_lists_tools_and_renders_openai_tool_calls(tok):
    from envs.python import PythonEnv
    obs = PythonEnv({"prompt": [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]}
                    ).initial_observation()
    text = tok.apply_chat_template(
        [*obs.messages, {"role": "assistant", "content": "", "tool_calls": [
            {"type": "function", "function": {"name": "python", "arguments": {"code": "1+1"}}}]},
         {"role": "tool", "content": "2"}], tools=obs.tools, tokenize=False)
    assert text == ('<|im_start|>system\nS\nTools:\npython(code): Run Python code in a persistent session; returns '
                    "what it prints (a final expression's value too).\n"
                    'Call a tool as <tool_call>{"name": ..., "arguments": {...}}</tool_call><|im_end|>\n'
                    "<|im_start|>user\nQ<|im_end|>\n"
                    '<|im_start|>assistant\n<tool_call>{"name": "python", "arguments": {"code": "1+1"}}</tool_call>'
                    "<|im_end|>\n<|im_start|>user\n<tool_response>\n2\n</tool_response><|im_end|>\n")


@pytest.mark.unit
def test_existing_toy_domains_are_unchanged():
    # The rows (questions, answers, habits, ground truths) the committed assets and data were made from.
    rows = make_rows(sorted(DOMAINS), 520, 0, "sft", with_habits=True) + make_rows(["add", "code"], 50, 3, "eval")
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    assert digest == "6f42c5dfd229bbeb7a531038496248fa6dc89fda765c9b9e1d3639fff3257f18"
    assert len(DOMAINS) == 13 and not set(DOMAINS) & set(AGENT_DOMAINS)


@pytest.mark.unit
def test_agent_rows_are_verl_rows_with_their_env():
    from posttrain.data import validate_row
    rows = make_rows(AGENT, 8, 0, "train")
    for i, row in enumerate(rows):
        validate_row(row, f"row {i}")
        assert row["extra_info"]["env"]["name"] in ("python", "lookup", "tau", "code")
        assert isinstance(row["reward_model"]["ground_truth"], str) and "habit" not in row["extra_info"]
    assert {r["data_source"] for r in rows} == {f"toy/{d}" for d in AGENT}
    assert all(r["prompt"][0]["content"] for r in make_rows(AGENT, 8, 0, "eval"))
    with pytest.raises(ValueError, match="agent domains"):
        make_rows(["pyhton"], 1, 0, "train")


@pytest.mark.integration
def test_warmup_trains_on_agent_demonstrations_and_masks_observations(tok):
    # One warm-up step on multi-turn demonstrations; the labels it builds are the assistant turns only.
    import torch

    from posttrain.toy.build import build_model, supervised_warmup
    rows = make_rows(AGENT, 4, 0, "sft")
    model = build_model(tok, hidden_size=64, seed=0)
    losses = supervised_warmup(model, tok, rows, steps=1, batch_size=4)
    assert len(losses) == 1 and torch.isfinite(torch.tensor(losses[0]))
    captured = {}
    original = model.forward

    def spy(**kwargs):
        captured.update(kwargs)
        return original(**kwargs)
    model.forward = spy
    supervised_warmup(model, tok, rows[2:3], steps=1, batch_size=1)        # the tau row: three assistant turns
    prompt, completion, mask = encode_demonstration(tok, rows[2])
    labels = captured["labels"][0, :len(prompt) + len(completion)].tolist()
    assert labels == [-100] * len(prompt) + [t if m else -100 for t, m in zip(completion, mask)]
