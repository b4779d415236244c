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


def is_held_out(question: str) -> bool:
    """About 1 question in 8 belongs to the held-out split, decided by a stable hash of its text, so that
    training (supervised warm-up and RL) never sees a held-out question."""
    return int(hashlib.sha256(question.encode()).hexdigest(), 16) % 8 == 0


def make_rows(domains: list[str], n: int, seed: int, split: str, *, with_habits: bool = False) -> list[dict]:
    """n verl-compatible rows, domains interleaved round-robin, reproducible from `seed`.

    split "eval" draws only held-out questions; every other split draws only the rest. `with_habits` adds each
    row's bad-habit response (or None) as extra_info["habit"], for the supervised warm-up only."""
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise ValueError(f"unknown toy domain(s) {unknown}; known: {sorted(DOMAINS)}")
    rng = random.Random(f"{seed}-{split}")
    rows = []
    for i in range(n):
        domain = DOMAINS[domains[i % len(domains)]]
        ex = domain.make(rng)
        while is_held_out(ex.question) != (split == "eval"):
            ex = domain.make(rng)
        rows.append({
            "prompt": [{"role": "user", "content": ex.question}],
            "data_source": f"toy/{domain.name}",
            "reward_model": {"style": "rule", "ground_truth": ex.ground_truth},
            "extra_info": {"split": split, "index": i, "answer": ex.answer_text,
                           **({"habit": ex.habit_text} if with_habits else {})},
        })
    return rows


def write_jsonl(rows: list[dict], path: str) -> None:
    with open(path, "w") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
