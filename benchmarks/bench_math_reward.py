"""Throughput of `posttrain score --reward math` (the whole command) vs Math-Verify in-process.

    .venv/bin/python benchmarks/bench_math_reward.py            # 4,000 answers, as in REWARDS.md
    .venv/bin/python benchmarks/bench_math_reward.py --answers 1000 --bombs 10

The mix imitates RL rollouts on MATH/GSM8K-style prompts: 4 samples per prompt (one reference
parsed per group), chain-of-thought prose of 200–1,500 characters ending in a final answer, answers
written in the many equivalent forms models use, about half of them wrong, some with no final
answer. Category shares are printed. Prints answers/s for both, their agreement, and the cost of
the worst adversarial answers (huge exponents) on their own and inside the mix.
"""
from __future__ import annotations

import argparse
import json
import logging
import os
import random
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

# Category shares, roughly those of MATH/GSM8K reference answers.
CATEGORIES = [("integer", 0.45), ("fraction", 0.15), ("radical_pi", 0.10), ("expression", 0.08),
              ("interval_tuple_set", 0.07), ("decimal_percent_thousands", 0.06), ("choice_text", 0.04),
              ("no_final_answer", 0.05)]


def make_problem(category: str, rng: random.Random) -> tuple[str, list[str], list[str]]:
    """(gold, equivalent predictions, wrong predictions) for one prompt of a category."""
    if category == "integer":
        n = rng.randint(0, 5000)
        return str(n), [str(n), f"{n}.0" if n < 100 else f"{n:,}", f"x = {n}"], [str(n + 1), str(n * 10), str(-n - 1)]
    if category == "fraction":
        p, q = rng.randint(1, 30), rng.randint(31, 60)
        return (rf"\frac{{{p}}}{{{q}}}", [rf"\dfrac{{{p}}}{{{q}}}", f"{p}/{q}", rf"\frac{{{2 * p}}}{{{2 * q}}}"],
                [rf"\frac{{{q}}}{{{p}}}", rf"\frac{{{p + 1}}}{{{q}}}"])
    if category == "radical_pi":
        a, b = rng.randint(2, 9), rng.choice([2, 3, 5, 6, 7])
        if rng.random() < 0.5:
            return rf"{a}\sqrt{{{b}}}", [rf"\sqrt{{{a * a * b}}}", rf"{a} \sqrt {b}"], [rf"{a + 1}\sqrt{{{b}}}", rf"\sqrt{{{a * b}}}"]
        return rf"\frac{{{a}\pi}}{{{b}}}", [rf"\frac{{{a}}}{{{b}}}\pi", rf"{a}\pi/{b}"], [rf"\frac{{{b}\pi}}{{{a}}}", rf"{a}\pi"]
    if category == "expression":
        a = rng.randint(1, 9)
        return (f"x^2+{2 * a}x+{a * a}", [f"(x+{a})^2", f"x^2 + {2 * a} x + {a * a}"], [f"(x-{a})^2", f"x^2+{a * a}"])
    if category == "interval_tuple_set":
        a, b = sorted(rng.sample(range(-20, 20), 2))
        kind = rng.choice(["interval", "tuple", "set"])
        if kind == "interval":
            return f"[{a}, {b})", [f"[{a},{b})"], [f"({a},{b})", f"[{a},{b}]"]
        if kind == "tuple":
            return f"({b}, {a})", [f"({b},{a})"], [f"({a},{b})"]
        return rf"\{{{a}, {b}\}}", [rf"\{{{b},{a}\}}", f"{a}, {b}"], [rf"\{{{a}\}}"]
    if category == "decimal_percent_thousands":
        n = rng.randint(1, 99)
        kind = rng.choice(["percent", "decimal", "thousands"])
        if kind == "percent":
            return rf"{n}\%", [f"{n}", rf"{n}\%", f"{n / 100}"], [f"{n + 1}"]
        if kind == "decimal":
            return f"{n}.25", [f"{n}.250", f"{4 * n + 1}/4"], [f"{n}.24"]
        return f"{n}{rng.randint(100, 999)}000", [], []
    if category == "choice_text":
        if rng.random() < 0.5:
            letter = rng.choice("ABCDE")
            return letter, [f"({letter})", rf"\text{{{letter}}}"], [rng.choice([c for c in "ABCDE" if c != letter])]
        word = rng.choice(["Monday", "east", "yes", "no solution"])
        return rf"\text{{{word}}}", [word, word.upper()], ["never"]
    return str(rng.randint(1, 100)), [], []


PROSE = ("We consider the quantities given in the problem and simplify step by step. "
         "Substituting the values and collecting terms gives an intermediate result of 12 and 7, "
         "which we check against the constraints. ")


def completion_for(answer: str | None, rng: random.Random) -> str:
    body = PROSE * rng.randint(1, 8)
    if answer is None:
        return body + "I am not sure how to finish this one.\nPerhaps 17."
    style = rng.random()
    if style < 0.7:
        return body + rf"Therefore the answer is $\boxed{{{answer}}}$."
    if style < 0.9:
        return body + f"The final answer is ${answer}$. I hope it is correct."
    return body + f"\nAnswer: {answer}"


def make_rows(n_answers: int, seed: int = 0, samples_per_prompt: int = 4) -> tuple[list[dict], dict]:
    rng = random.Random(seed)
    names = [c[0] for c in CATEGORIES]
    weights = [c[1] for c in CATEGORIES]
    rows, counts = [], {name: 0 for name in names}
    while len(rows) < n_answers:
        category = rng.choices(names, weights)[0]
        gold, right, wrong = make_problem(category, rng)
        for _ in range(samples_per_prompt):
            if category == "no_final_answer" or (not right and not wrong):
                answer = None if category == "no_final_answer" else gold
            else:
                answer = rng.choice(right) if (rng.random() < 0.5 or not wrong) and right else rng.choice(wrong)
            rows.append({"completion": completion_for(answer, rng), "ground_truth": gold, "category": category})
            counts[category] += 1
    return rows[:n_answers], counts


def run_posttrain_score(path: str, out: str) -> float:
    started = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "posttrain.score", "--reward", "math", path, "-o", out,
                           "--no-progress"], cwd=REPO, capture_output=True, text=True)
    elapsed = time.perf_counter() - started
    if proc.returncode != 0:
        raise SystemExit(f"posttrain score failed:\n{proc.stderr}")
    print(proc.stderr.strip())
    return elapsed


def run_math_verify_in_process(rows: list[dict]) -> tuple[float, list[float]]:
    from math_verify import parse, verify
    logging.disable(logging.WARNING)
    parse("$1$")  # import and regex compilation outside the timing
    started = time.perf_counter()
    scores = []
    for row in rows:
        gold = parse(f"${row['ground_truth']}$")
        pred = parse(row["completion"])
        scores.append(float(verify(gold, pred)))
    return time.perf_counter() - started, scores


def bomb_cost(timeout_s: float) -> dict:
    from rewards.matheq import compute_score
    compute_score("b", r"\boxed{\sqrt{2}}", r"\sqrt{3}")  # start the pool outside the timing
    costs = {}
    for bomb, gold in [(r"9^{9^{9^{9}}}", "5"), (r"10^{10^{10}}", "5"), (r"(10^{100})!", "5"),
                       (r"\sum_{k=1}^{10^{12}} k^{k}", "5"), (r"(x+1)^{100000}", "x^{100000}+1")]:
        started = time.perf_counter()
        result = compute_score("b", rf"\boxed{{{bomb}}}", gold, timeout_s=timeout_s)
        costs[bomb] = (round(time.perf_counter() - started, 3), result.get("failure"))
    started = time.perf_counter()
    compute_score("b", r"\boxed{\sqrt{8}}", r"2\sqrt2")
    costs["next normal answer after a kill (s)"] = round(time.perf_counter() - started, 3)
    return costs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--answers", type=int, default=4000)
    parser.add_argument("--bombs", type=int, default=10, help="guard-evading adversarial answers (each runs to the time limit) added for the last run")
    parser.add_argument("--skip-math-verify", action="store_true")
    args = parser.parse_args()

    rows, counts = make_rows(args.answers)
    print(f"mix of {len(rows)} answers: " + ", ".join(f"{k} {v}" for k, v in counts.items()))
    print(f"cpus available: {len(os.sched_getaffinity(0))}")
    with tempfile.TemporaryDirectory() as tmp:
        source, out = os.path.join(tmp, "in.jsonl"), os.path.join(tmp, "out.jsonl")
        with open(source, "w") as handle:
            for row in rows:
                handle.write(json.dumps(row) + "\n")
        elapsed = run_posttrain_score(source, out)
        ours = [json.loads(line)["score"] for line in open(out)]
        print(f"posttrain score --reward math: {len(rows)} answers in {elapsed:.2f}s = "
              f"{len(rows) / elapsed:.0f} answers/s (whole command, incl. start-up)")

        if not args.skip_math_verify:
            mv_elapsed, theirs = run_math_verify_in_process(rows)
            print(f"Math-Verify in-process (parse+verify, one process): {len(rows) / mv_elapsed:.0f} answers/s "
                  f"({mv_elapsed:.2f}s)")
            agree = sum(a == b for a, b in zip(ours, theirs)) / len(rows)
            print(f"agreement with Math-Verify: {agree:.3f}; mean score ours {sum(ours) / len(ours):.3f}, "
                  f"Math-Verify {sum(theirs) / len(theirs):.3f}")
            by_cat: dict[str, list[int]] = {}
            for row, a, b in zip(rows, ours, theirs):
                if a != b:
                    by_cat.setdefault(row["category"], []).append(int(b > a))
            for cat, diffs in by_cat.items():
                print(f"  disagreements in {cat}: {len(diffs)} (Math-Verify higher in {sum(diffs)})")

        rng = random.Random(1)
        with_bombs = list(rows)
        for _ in range(args.bombs):
            with_bombs.insert(rng.randrange(len(with_bombs)),
                              {"completion": r"so \boxed{\sum_{k=1}^{10^{12}} k^{k}}", "ground_truth": "1",
                               "category": "bomb"})
        with open(source, "w") as handle:
            for row in with_bombs:
                handle.write(json.dumps(row) + "\n")
        elapsed = run_posttrain_score(source, out)
        print(f"same mix + {args.bombs} bombs: {len(with_bombs)} answers in {elapsed:.2f}s = "
              f"{len(with_bombs) / elapsed:.0f} answers/s")

    print("single adversarial answers, default 2 s limit (seconds, failure):", bomb_cost(2.0))


if __name__ == "__main__":
    main()
