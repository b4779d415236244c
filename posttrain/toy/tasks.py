"""Synthetic tasks with verifiable answers, so that the project can make its own data and tiny models.

Each domain is a generator `rng -> ToyExample` plus the reward that checks it. Domains span the reward kinds
(exact integers, math expressions checked by the `math` verifier, temporal spans (`tiou`),
boxes (`iou`), programs run by the `code` judge, tool calls, quoted-string readouts) so that MOPD can train one teacher per domain. Rows are
verl-compatible: `prompt` (chat messages), `data_source`, `reward_model.ground_truth`, `extra_info`.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import random
from typing import Callable


@dataclasses.dataclass(frozen=True)
class ToyExample:
    question: str
    answer_text: str          # the ideal assistant response (used for the supervised warm-up)
    ground_truth: object      # what the reward compares against
    # A plausible wrong response of the kind real SFT data teaches (a dropped carry, xywh for xyxy, a renamed
    # tool argument); None where the habit does not apply to this question. `posttrain toy build --habit-rate`
    # puts it in a fraction of the warm-up's demonstrations, so that each domain starts with a bad habit that
    # its verifiable reward can find and RL (a domain teacher) can fix.
    habit_text: str | None = None


@dataclasses.dataclass(frozen=True)
class ToyDomain:
    name: str
    make: Callable[[random.Random], ToyExample]
    reward: str               # reward spec the recipe uses for this domain


def _add(rng: random.Random) -> ToyExample:
    # Two-digit plus one-digit: learnable in a minute of supervised warm-up by a 2-layer model, yet a carry
    # leaves it uncertain enough that RL has something to fix.
    a, b = rng.randint(10, 99), rng.randint(1, 9)
    carries = a % 10 + b % 10 >= 10
    return ToyExample(f"What is {a}+{b}?", f"Answer: {a + b}", str(a + b),
                      f"Answer: {a + b - 10}" if carries else None)   # the carry dropped


def _sub(rng: random.Random) -> ToyExample:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    a, b = max(a, b), min(a, b)
    borrows = a % 10 < b % 10
    return ToyExample(f"What is {a}-{b}?", f"Answer: {a - b}", str(a - b),
                      f"Answer: {a - b + 10}" if borrows else None)   # the borrow forgotten


def _mul(rng: random.Random) -> ToyExample:
    a, b = rng.randint(2, 9), rng.randint(10, 30)
    ones = a * (b % 10)
    dropped = a * (b // 10) * 10 + ones % 10   # the carry out of the ones product dropped
    return ToyExample(f"What is {a}*{b}?", f"Answer: {a * b}", str(a * b),
                      f"Answer: {dropped}" if ones >= 10 else None)


def _max(rng: random.Random) -> ToyExample:
    xs = [rng.randint(0, 99) for _ in range(4)]
    last_is_largest = xs[3] > max(xs[:3])
    return ToyExample(f"Largest of {' '.join(map(str, xs))}?", f"Answer: {max(xs)}", str(max(xs)),
                      f"Answer: {max(xs[:3])}" if last_is_largest else None)   # the last number overlooked


def _count(rng: random.Random) -> ToyExample:
    letters = "".join(rng.choice("ab") for _ in range(rng.randint(3, 9)))
    return ToyExample(f"How many a in {letters}?", f"Answer: {letters.count('a')}", str(letters.count("a")),
                      f"Answer: {letters[:-1].count('a')}" if letters.endswith("a") else None)   # the last letter missed


def _tspan(rng: random.Random) -> ToyExample:
    # Temporal grounding in text: the event is described with its start and duration; answer "a to b".
    start, length = rng.randint(0, 60), rng.randint(2, 20)
    return ToyExample(f"Event starts at {start}s and lasts {length}s. When?",
                      f"Answer: {start} to {start + length}", [float(start), float(start + length)],
                      f"Answer: {start} to {length}")   # the duration read as the end time (right by luck at 0 s)


def _box(rng: random.Random) -> ToyExample:
    x, y, w, h = rng.randint(0, 50), rng.randint(0, 50), rng.randint(5, 40), rng.randint(5, 40)
    return ToyExample(f"Box at x={x} y={y} size {w}x{h}. Corners?",
                      f"Answer: [{x}, {y}, {x + w}, {y + h}]", [x, y, x + w, y + h],
                      f"Answer: [{x}, {y}, {w}, {h}]")   # xywh written where xyxy corners were asked


def _frac(rng: random.Random) -> ToyExample:
    # Math-verifier domain: the reduced fraction is checked by symbolic equivalence (the `math` reward).
    b = rng.randint(2, 9)
    a = rng.randint(1, b - 1)
    m = rng.randint(2, 5)
    from math import gcd
    g = gcd(a, b)
    return ToyExample(f"Simplify {a * m}/{b * m}.", f"Answer: {a // g}/{b // g}", f"{a // g}/{b // g}",
                      f"Answer: {b // g}/{a // g}")   # numerator and denominator swapped


def _solve(rng: random.Random) -> ToyExample:
    a, x = rng.randint(2, 9), rng.randint(1, 12)
    return ToyExample(f"Solve {a}x={a * x}.", f"Answer: {x}", str(x),
                      f"Answer: {a * x - a}" if a * x - a != x else None)   # subtracted instead of divided


def _think(rng: random.Random) -> ToyExample:
    # Reasoning span then a tagged answer: exercises the think/answer token categories of MOPD.
    a = rng.randint(10, 49)
    carries = (a % 10) * 2 >= 10   # the reasoning is right, the answer drops its carry
    return ToyExample(f"Double {a}, thinking first.", f"<think>{a}+{a}</think><answer>{2 * a}</answer>", str(2 * a),
                      f"<think>{a}+{a}</think><answer>{2 * a - 10}</answer>" if carries else None)


_TOOLS = {"weather": "What is the weather in {}?", "time": "What time is it in {}?", "news": "Any news from {}?"}
_CITIES = ["Oslo", "Paris", "Lima", "Rome", "Cairo", "Tokyo", "Quito", "Delhi", "Seoul", "Accra"]


def _tool(rng: random.Random) -> ToyExample:
    name, city = rng.choice(sorted(_TOOLS)), rng.choice(_CITIES)
    call = json.dumps({"name": name, "arguments": {"city": city}})
    wrong_schema = json.dumps({"name": name, "arguments": {"location": city}})   # an argument renamed
    return ToyExample(_TOOLS[name].format(city), f"<tool_call>{call}</tool_call>",
                      json.dumps({"name": name, "arguments": {"city": city}}), f"<tool_call>{wrong_schema}</tool_call>")


def _ocr(rng: random.Random) -> ToyExample:
    # Perception-style readout: copy a quoted string exactly.
    text = "".join(rng.choice("abcdefghkmnpqrstuvwxyz") for _ in range(rng.randint(3, 5)))
    return ToyExample(f'Read the sign: "{text}"', f'Answer: "{text}"', text, f'Answer: "{text[:-1]}"')   # truncated


def _code(rng: random.Random) -> ToyExample:
    # Program synthesis judged by running the program (the `code` reward, sandboxed).
    op, k = rng.choice(["+", "-", "*"]), rng.randint(2, 9)
    inputs = [[1], [4], [7]]
    outputs = [eval(f"{x[0]}{op}{k}") for x in inputs]  # noqa: S307 — our own generated arithmetic
    return ToyExample(f"Write f(x) returning x{op}{k}.", f"```python\ndef f(x): return x{op}{k}\n```",
                      json.dumps({"fn_name": "f", "inputs": inputs, "outputs": outputs}),
                      f"```python\ndef f(x): return {k}{op}x\n```" if op == "-" else None)   # operands swapped


DOMAINS: dict[str, ToyDomain] = {
    "add": ToyDomain("add", _add, "posttrain.toy.rewards:exact_answer"),
    "sub": ToyDomain("sub", _sub, "posttrain.toy.rewards:exact_answer"),
    "mul": ToyDomain("mul", _mul, "posttrain.toy.rewards:exact_answer"),
    "max": ToyDomain("max", _max, "posttrain.toy.rewards:exact_answer"),
    "count": ToyDomain("count", _count, "posttrain.toy.rewards:exact_answer"),
    "tspan": ToyDomain("tspan", _tspan, "tiou"),
    "box": ToyDomain("box", _box, "iou"),
    "frac": ToyDomain("frac", _frac, "math"),
    "solve": ToyDomain("solve", _solve, "math"),
    "think": ToyDomain("think", _think, "math"),
    "tool": ToyDomain("tool", _tool, "posttrain.toy.rewards:tool_call_match"),
    "ocr": ToyDomain("ocr", _ocr, "posttrain.toy.rewards:exact_string"),
    "code": ToyDomain("code", _code, "code"),
}


# ------------------------------------------------------------------ agent domains (multi-turn, with tools)
# Each is a generator `rng -> AgentExample`: the question, the environment that answers it (envs/, by built-in
# name and kwargs), and demonstrations as chat messages (assistant turns and the tool messages the environment
# returns — produced by the environment's own tool code, so a warm-up sees exactly what a rollout will). The bad
# habit is the agent's classic one: answering (or acting) without the tool that the task needs.

@dataclasses.dataclass(frozen=True)
class AgentExample:
    question: str
    ground_truth: object
    env: str                       # envs built-in name
    env_kwargs: dict
    demo: list                     # ideal continuation: [{"role": "assistant" | "tool", "content": ...}, ...]
    habit_demo: list | None = None


@dataclasses.dataclass(frozen=True)
class AgentDomain:
    name: str
    make: Callable[[random.Random], AgentExample]


def _call(name: str, **arguments) -> dict:
    return {"role": "assistant", "content": f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"}


def _agent_python(rng: random.Random) -> AgentExample:
    # 4-digit by 3-digit multiplication: far beyond a 2-layer model's head, one line of Python.
    a, b = rng.randint(1000, 9999), rng.randint(100, 999)
    demo = [_call("python", code=f"print({a}*{b})"), {"role": "tool", "content": str(a * b)},
            {"role": "assistant", "content": f"Answer: {a * b}"}]
    estimate = round(a * b, -3)   # a guess in its head: the right size, the wrong digits
    return AgentExample(f"What is {a}*{b}?", str(a * b), "python", {}, demo,
                        [{"role": "assistant", "content": f"Answer: {estimate}"}] if estimate != a * b else None)


def _agent_lookup(rng: random.Random) -> AgentExample:
    from envs.lookup import search_documents, toy_documents, toy_facts
    facts = toy_facts(0)
    country, capital, river = rng.choice(facts)
    if rng.random() < 0.5:
        question, answer, query = f"What is the capital of {country}?", capital, f"capital of {country}"
    else:
        question, answer, query = f"Which river flows through {country}?", river, f"river {country}"
    found = "\n".join(search_documents(toy_documents(0), query, 2))
    demo = [_call("search", query=query), {"role": "tool", "content": found},
            {"role": "assistant", "content": f"Answer: {answer}"}]
    guess = rng.choice(facts)[1 if answer == capital else 2]   # a made-up name that sounds right
    return AgentExample(question, answer, "lookup", {"store_seed": 0}, demo,
                        [{"role": "assistant", "content": f"Answer: {guess}"}] if guess != answer else None)


_USERS = ["ana", "ben", "cy", "dee", "eli", "fay", "gus", "hal"]
_ITEMS = ["lamp", "desk", "mug", "rug", "fan", "pen", "bag", "cap"]
_STREETS = ["Elm", "Oak", "Pine", "Ash", "Birch", "Cedar"]


def _agent_tau(rng: random.Random) -> AgentExample:
    from envs.tau import OrdersAPI
    user = rng.choice(_USERS)
    items = rng.sample(_ITEMS, 3)
    ids = rng.sample(range(10, 99), 4)
    orders = {f"o{ids[i]}": {"user": user, "item": item, "status": "pending", "address": f"{rng.randint(1, 99)} "
                             f"{rng.choice(_STREETS)} St"} for i, item in enumerate(items)}
    orders[f"o{ids[3]}"] = {"user": rng.choice([u for u in _USERS if u != user]), "item": items[0],
                            "status": "pending", "address": "1 Main St"}
    db = {"orders": orders}
    target = rng.randrange(3)
    order_id = f"o{ids[target]}"
    if rng.random() < 0.5:
        question, action = f"I am {user}. Cancel my {items[target]} order.", {"name": "cancel_order",
                                                                              "arguments": {"order_id": order_id}}
    else:
        address = f"{rng.randint(1, 99)} {rng.choice(_STREETS)} St"
        question = f"I am {user}. Send my {items[target]} order to {address}."
        action = {"name": "change_address", "arguments": {"order_id": order_id, "address": address}}
    api = OrdersAPI(db)
    demo = [_call("find_orders", user=user), {"role": "tool", "content": api.find_orders(user)},
            _call(action["name"], **action["arguments"]), {"role": "tool", "content": api.apply(action)},
            {"role": "assistant", "content": "Done."}]
    wrong_id = f"o{ids[(target + 1) % 3]}"   # acting on a guessed order id without looking it up
    wrong = {**action, "arguments": {**action["arguments"], "order_id": wrong_id}}
    habit = [_call(wrong["name"], **wrong["arguments"]), {"role": "tool", "content": OrdersAPI(db).apply(wrong)},
             {"role": "assistant", "content": "Done."}]
    return AgentExample(question, json.dumps([action]), "tau", {"db": json.dumps(db)}, demo, habit)


def _agent_codefix(rng: random.Random) -> AgentExample:
    # Submit to the judge; on a failing test, read it and fix. The habit: give up after the first failure.
    op, k = rng.choice(["+", "-", "*"]), rng.randint(2, 9)
    inputs = [[1], [4], [7]]
    outputs = [eval(f"{x[0]}{op}{k}") for x in inputs]  # noqa: S307 — our own generated arithmetic
    right, wrong = f"def f(x): return x{op}{k}", f"def f(x): return x{op}{k + 1}"
    failed = f"Failed wrong_answer on f(1): expected {outputs[0]}; returned {eval(f'1{op}{k + 1}')}. 2 submission(s) left."  # noqa: S307
    first_wrong = rng.random() < 0.3
    demo = ([_call("submit", code=wrong), {"role": "tool", "content": failed}] if first_wrong else []) + \
        [_call("submit", code=right)]
    habit = [_call("submit", code=wrong), {"role": "tool", "content": failed}, {"role": "assistant", "content": "Done."}]
    return AgentExample(f"Write f(x) returning x{op}{k}. Submit it.",
                        json.dumps({"fn_name": "f", "inputs": inputs, "outputs": outputs}), "code", {}, demo, habit)


AGENT_DOMAINS: dict[str, AgentDomain] = {
    "python": AgentDomain("python", _agent_python),
    "lookup": AgentDomain("lookup", _agent_lookup),
    "tau": AgentDomain("tau", _agent_tau),
    "codefix": AgentDomain("codefix", _agent_codefix),
}


def is_held_out(question: str) -> bool:
    """About 1 question in 8 belongs to the held-out split, decided by a stable hash of its text, so that
    training (supervised warm-up and RL) never sees a held-out question."""
    return int(hashlib.sha256(question.encode()).hexdigest(), 16) % 8 == 0


def make_rows(domains: list[str], n: int, seed: int, split: str, *, with_habits: bool = False) -> list[dict]:
    """n verl-compatible rows, domains interleaved round-robin, reproducible from `seed`.

    split "eval" draws only held-out questions; every other split draws only the rest. `with_habits` adds each
    row's bad-habit response (or None) as extra_info["habit"], for the supervised warm-up only."""
    unknown = [d for d in domains if d not in DOMAINS and d not in AGENT_DOMAINS]
    if unknown:
        raise ValueError(f"unknown toy domain(s) {unknown}; known: {sorted(DOMAINS)} and the agent domains "
                         f"{sorted(AGENT_DOMAINS)}")
    rng = random.Random(f"{seed}-{split}")
    rows = []
    for i in range(n):
        name = domains[i % len(domains)]
        domain = DOMAINS.get(name) or AGENT_DOMAINS[name]
        ex = domain.make(rng)
        while is_held_out(ex.question) != (split == "eval"):
            ex = domain.make(rng)
        if isinstance(ex, AgentExample):
            rows.append(_agent_row(domain.name, ex, split, i, with_habits))
            continue
        rows.append({
            "prompt": [{"role": "user", "content": ex.question}],
            "data_source": f"toy/{domain.name}",
            "reward_model": {"style": "rule", "ground_truth": ex.ground_truth},
            "extra_info": {"split": split, "index": i, "answer": ex.answer_text,
                           **({"habit": ex.habit_text} if with_habits else {})},
        })
    return rows


def _agent_row(name: str, ex: AgentExample, split: str, index: int, with_habits: bool) -> dict:
    """An agent row: extra_info.env names the environment; extra_info.answer is the demonstration (messages)."""
    return {
        "prompt": [{"role": "user", "content": ex.question}],
        "data_source": f"toy/{name}",
        "reward_model": {"style": "rule", "ground_truth": ex.ground_truth},
        "extra_info": {"split": split, "index": index, "env": {"name": ex.env, "kwargs": ex.env_kwargs},
                       "answer": ex.demo, **({"habit": ex.habit_demo} if with_habits else {})},
    }


def write_jsonl(rows: list[dict], path: str) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
