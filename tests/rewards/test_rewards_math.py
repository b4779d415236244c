"""The `math` reward: extraction, equivalence tables, reward-hacking attempts, hostile input,
time limits, and safety from threads and Ray workers."""
from __future__ import annotations

import threading
import time

import pytest

from rewards import call_reward, load_reward
from rewards.matheq import (compute_score, extract_final_answer, is_text_answer, last_boxed,
                            matching_braces, multiple_choice_letter, normalise_answer,
                            parse_plain_number, predicted_letter)


def score(completion, gold, **kwargs) -> dict:
    return compute_score("test", completion, gold, None, **kwargs)


# --------------------------------------------------------------------------- extraction (pure)

@pytest.mark.unit
@pytest.mark.parametrize("completion, answer, method", [
    (r"so the area is \boxed{12}.", "12", "boxed"),
    (r"first \boxed{1} then \boxed{2}", "2", "boxed"),
    (r"\boxed{\frac{a}{\sqrt{b^{2}}}}", r"\frac{a}{\sqrt{b^{2}}}", "boxed"),
    (r"\fbox{7}", "7", "boxed"),
    (r"final: \boxed 5", "5", "boxed"),
    (r"\boxed{\{1,2\}}", r"\{1,2\}", "boxed"),
    ("Thus the answer is 42.", "42", "answer_is"),
    ("The final answer is $\\frac{3}{4}$. I hope it is correct.", r"\frac{3}{4}", "answer_is"),
    ("blah\nAnswer: 17\n", "17", "answer_is"),
    ("**Final Answer:** 3.5", "3.5", "answer_is"),
    ("<think>x is 4</think><answer>9</answer>", "9", "answer_tag"),
    ("<answer>1</answer> <answer>\\boxed{2}</answer>", "2", "boxed"),
    ("12", "12", "bare"),
])
def test_extracts_the_final_answer(completion, answer, method):
    assert extract_final_answer(completion) == (answer, method)


@pytest.mark.unit
@pytest.mark.parametrize("completion", [
    "", "   ", "I computed 3 + 4 = 7 and then kept going for a long while\nwithout saying which is final",
    r"\boxed{unbalanced" + "\nmore text on another line",
])
def test_no_final_answer_means_none(completion):
    assert extract_final_answer(completion) == (None, "none")


@pytest.mark.unit
def test_outside_the_last_answer_tag_is_ignored():
    assert extract_final_answer(r"\boxed{5} <answer>6</answer>") == ("6", "answer_tag")


@pytest.mark.unit
def test_brace_matching_is_linear_and_tolerates_garbage():
    text = "{" * 30000 + "}" * 10 + "\\{"
    pairs = matching_braces(text)
    assert len(pairs) == 10
    assert last_boxed("\\boxed{" * 20000) is None


@pytest.mark.unit
@pytest.mark.parametrize("raw, normalised", [
    ("$5$.", "5"), ("**12**", "12"), (r"\(x+1\)", "x+1"), ("1,000,000", "1000000"), (r"1{,}000", "1000"),
    (r"12\,345", "12345"), ("3e5", r"3\times 10^{5}"), ("2.5E-3", r"2.5\times 10^{-3}"), ("π/2", r"\pi /2"),
    ("−3", "-3"), (r"\displaystyle \frac12", r"\frac12"), ("(1,2)", "(1,2)"),
])
def test_normalise_answer(raw, normalised):
    assert normalise_answer(raw) == normalised


@pytest.mark.unit
def test_plain_number_parsing():
    from fractions import Fraction
    assert parse_plain_number("x = -3") == (Fraction(-3), False)
    assert parse_plain_number(r"50\%") == (Fraction(50), True)
    assert parse_plain_number(r"1.5\times 10^{-3}") == (Fraction(3, 2000), False)
    assert parse_plain_number(r"\frac12") is None
    assert parse_plain_number("9" * 500) is None  # left to the time-limited worker


@pytest.mark.unit
def test_gold_classification():
    assert multiple_choice_letter(r"\text{(C)}") == "C"
    assert multiple_choice_letter("x") is None
    assert predicted_letter("B) 42") == "B"
    assert predicted_letter("B and C") is None
    assert is_text_answer("Monday") and is_text_answer(r"\text{east}") and is_text_answer("no")
    assert not is_text_answer("ab") and not is_text_answer(r"\sin x") and not is_text_answer("3")


# --------------------------------------------------------------------------- equivalence tables

EQUIVALENT = [
    # numbers, fractions, decimals
    (r"\boxed{\frac{1}{2}}", "0.5"), (r"\boxed{0.5}", r"\frac{1}{2}"), (r"\boxed{\dfrac{3}{4}}", "3/4"),
    (r"\boxed{1/2}", r"\tfrac12"), (r"\boxed{5.0}", "5"), (r"\boxed{-3}", "-3"), (r"\boxed{03}", "3"),
    # radicals, pi, symbolic identities
    (r"\boxed{2\sqrt{2}}", r"\sqrt{8}"), (r"\boxed{\frac{\sqrt2}{2}}", r"\frac{1}{\sqrt{2}}"),
    (r"\boxed{\frac{\pi}{2}}", r"\pi/2"), (r"\boxed{π/2}", r"\frac{\pi}{2}"), (r"\boxed{(x+1)^2}", "x^2+2x+1"),
    (r"\boxed{\sin(\pi/3)}", r"\frac{\sqrt{3}}{2}"),
    # scientific notation, thousands separators
    (r"\boxed{3 \times 10^{5}}", "300000"), (r"\boxed{3e5}", "300000"), (r"\boxed{1.5\cdot 10^{-3}}", "0.0015"),
    (r"\boxed{1,000}", "1000"), (r"\boxed{1{,}234{,}567}", "1234567"), (r"\boxed{10\,000}", "10000"),
    ("The answer is 1,000.", "1000"),
    # intervals, sets, tuples, matrices
    (r"\boxed{[1, 2)}", "[1,2)"), (r"\boxed{(-\infty, 3]}", r"(-\infty,3]"), (r"\boxed{\{3, 1, 2\}}", r"\{1,2,3\}"),
    (r"\boxed{(1, 2)}", "(1,2)"), (r"\boxed{\begin{pmatrix}1&2\\3&4\end{pmatrix}}", r"\begin{pmatrix}1&2\\3&4\end{pmatrix}"),
    (r"\boxed{(1,\infty)}", "x>1"),
    # assignments, units, degrees, percentages
    (r"\boxed{x = 3}", "3"), (r"\boxed{3}", "x=3"), (r"\boxed{5\text{ cm}}", "5"), (r"\boxed{90^\circ}", "90"),
    (r"\boxed{90°}", "90"), (r"\boxed{10 \text{ meters}}", "10"), (r"\boxed{50\%}", "50"), (r"\boxed{50\%}", "0.5"),
    (r"\boxed{0.5}", r"50\%"), (r"\boxed{\$10}", "10"),
    # multiple choice, text
    (r"\boxed{B}", "B"), ("The answer is (C).", "C"), (r"\boxed{\text{(D)}}", "D"), ("Answer: b", "B"),
    (r"\boxed{\textbf{A}}", r"\text{(A)}"), (r"\boxed{\text{Monday}}", "monday"), ("Answer: Yes.", "yes"),
    (r"\boxed{\text{no solution}}", "No Solution"),
    # integer / float ground truths, lists of acceptable answers
    (r"\boxed{7}", 7), (r"\boxed{2.5}", 2.5), (r"\boxed{4}", ["2", "4"]),
]

NOT_EQUIVALENT = [
    (r"\boxed{0.5}", "50"), (r"\boxed{50}", "0.5"), (r"\boxed{5}", "500"), (r"\boxed{500}", "5"),  # no ×100
    (r"\boxed{-3}", "3"), (r"\boxed{2.0000001}", "2"), (r"\boxed{0.333}", r"\frac{1}{3}"),
    (r"\boxed{3.14159}", r"\pi"), (r"\boxed{1000}", "1,000,000"),
    (r"\boxed{[1,2]}", "(1,2)"), (r"\boxed{(1,2]}", "(1,2)"), (r"\boxed{(2,1)}", "(1,2)"),  # open vs closed
    (r"\boxed{\{1,2\}}", "(2,1)"), (r"\boxed{(1,2)}", "(2,1)"),  # tuples are ordered
    (r"\boxed{x>1}", r"(1,\infty)"),  # asymmetric: a predicted inequality is not a gold interval
    (r"\boxed{3, 4}", "3"), (r"\boxed{\pm 2}", "2"), (r"\boxed{x^2}", "x^3"),
    (r"\boxed{B}", "C"), (r"\boxed{B and C}", "B"), (r"\boxed{A, B, C, D}", "B"), (r"\boxed{\text{Tuesday}}", "Monday"),
    (r"\boxed{yadnoM}", "Monday"), (r"\boxed{a+b}", "ab"),
    (r"\boxed{5}", ["2", "4"]),
]


@pytest.mark.unit
@pytest.mark.parametrize("completion, gold", EQUIVALENT)
def test_equivalent_answers_score_one(completion, gold):
    result = score(completion, gold)
    assert result["score"] == 1.0, result


@pytest.mark.unit
@pytest.mark.parametrize("completion, gold", NOT_EQUIVALENT)
def test_different_answers_score_zero(completion, gold):
    result = score(completion, gold)
    assert result["score"] == 0.0, result


# --------------------------------------------------------------------------- reward hacking

@pytest.mark.unit
@pytest.mark.parametrize("completion, failure", [
    ("I tried many numbers: 1, 2, 3, 4, 5, 6, 7 and more and more\nso many options", "no_answer"),  # no last-number fallback
    ("Let me think. 2+2=4, so maybe 4.\nOr 5. Who knows.", "no_answer"),
    # One short line is read as a bare answer, and prose does not parse as one.
    ("Let me think. 2+2=4, so maybe 4. Or 5. Who knows.", "parse_error"),
])
def test_no_last_number_fallback(completion, failure):
    result = score(completion, "4")
    assert result["score"] == 0.0 and result["failure"] == failure


@pytest.mark.unit
def test_model_output_is_never_evaluated_as_python():
    result = score(r"\boxed{__import__('os').system('touch /tmp/pwned_by_reward')}", "0")
    assert result["score"] == 0.0
    import os
    assert not os.path.exists("/tmp/pwned_by_reward")


@pytest.mark.unit
def test_answer_spread_over_many_boxes_only_the_last_counts():
    assert score(r"\boxed{1}\boxed{2}\boxed{3}\boxed{4}", "3")["score"] == 0.0
    assert score(r"\boxed{1}\boxed{2}\boxed{3}", "3")["score"] == 1.0


# --------------------------------------------------------------------------- hostile input

@pytest.mark.unit
@pytest.mark.parametrize("completion, gold, failure", [
    ("", "5", "no_answer"),
    ("x" * 50_000, "5", "no_answer"),
    ("\\boxed{" + "1" * 5_000 + "}", "5", "answer_too_long"),
    ("\x00\x01\xff\ufffd" * 1000, "5", "no_answer"),
    (None, "5", "bad_input"),
    (b"\\boxed{5}", "5", "bad_input"),
    (r"\boxed{5}", {"answer": 5}, "bad_ground_truth"),
    (r"\boxed{5}", float("nan"), "bad_ground_truth"),
    (r"\boxed{5}", None, "bad_ground_truth"),
    (r"\boxed{5}", True, "bad_ground_truth"),
    (r"\boxed{5}", "", "bad_ground_truth"),
    (r"\boxed{5}", [], "bad_ground_truth"),
])
def test_hostile_input_scores_zero_with_a_reason(completion, gold, failure):
    result = score(completion, gold)
    assert result["score"] == 0.0 and result["failure"] == failure


@pytest.mark.unit
def test_long_completion_with_answer_at_the_end_still_scores():
    assert score("blah " * 10_000 + r"\boxed{\frac{2}{4}}", "1/2")["score"] == 1.0
    assert score("}{" * 20_000 + r"\boxed{3}", "3")["score"] == 1.0


@pytest.mark.unit
def test_unparseable_answer_is_a_parse_error():
    result = score(r"\boxed{\frac{}{}{{}}\left(}", "5")
    assert result["score"] == 0.0 and result["failure"] == "parse_error"


@pytest.mark.unit
@pytest.mark.parametrize("bomb", [r"9^{9^{9^{9}}}", r"10^{10^{10}}", r"(10^{100})!", r"x^{9^{9^9}}",
                                  r"2^{10^{6}}", r"(\frac{1}{3})^{10^{7}}"])
def test_huge_numbers_are_refused_before_evaluation(bomb):
    started = time.monotonic()
    result = score(rf"\boxed{{{bomb}}}", "5", timeout_s=5.0)
    assert result["score"] == 0.0 and result["failure"] == "too_large"
    assert time.monotonic() - started < 2.0  # refused by the size guard, not by the time limit


@pytest.mark.unit
@pytest.mark.parametrize("completion, gold", [(r"\boxed{2^{100}}", "1267650600228229401496703205376"),
                                              (r"\boxed{10!}", "3628800"), (r"\boxed{2^{2^{4}}}", "65536")])
def test_size_guard_lets_ordinary_large_numbers_through(completion, gold):
    assert score(completion, gold)["score"] == 1.0


SLOW_FOR_SYMPY = [(r"\boxed{\sum_{k=1}^{10^{12}} k^{k}}", "5"), (r"\boxed{(x+1)^{100000}}", "x^{100000}+1")]


@pytest.mark.integration
@pytest.mark.parametrize("completion, gold", SLOW_FOR_SYMPY)
def test_slow_verification_is_killed_within_the_limit(completion, gold):
    score(r"\boxed{\sqrt{8}}", r"2\sqrt{2}")  # a warm idle worker: measure the limit, not start-up
    started = time.monotonic()
    result = score(completion, gold, timeout_s=1.0)
    elapsed = time.monotonic() - started
    assert result["score"] == 0.0 and result["failure"] == "timeout"
    # 1 s of CPU time: about 1 s on an idle machine; on a loaded one at most the wall cap
    # (5 x the limit) plus process bookkeeping.
    assert elapsed < 5 * 1.0 + 1.0, elapsed
    # The pool recovered: a normal answer right after is scored as usual.
    assert score(r"\boxed{\frac{6}{8}}", "0.75")["score"] == 1.0


# --------------------------------------------------------------------------- threads, Ray, contract

@pytest.mark.integration
def test_from_many_threads_and_a_bomb_does_not_delay_the_others():
    cases = [(r"\boxed{\frac{1}{3}}", "2/6", 1.0), (r"\boxed{\sqrt{12}}", r"2\sqrt{3}", 1.0),
             (r"\boxed{(1,2]}", "(1,2)", 0.0), (r"\boxed{x+1}", "1+x", 1.0)] * 3
    results: dict[int, tuple[float, float]] = {}

    def run(index, completion, gold):
        started = time.monotonic()
        results[index] = (score(completion, gold, timeout_s=3.0)["score"], time.monotonic() - started)

    bomb = threading.Thread(target=run, args=(-1, *SLOW_FOR_SYMPY[0]))
    bomb.start()
    threads = [threading.Thread(target=run, args=(i, c, g)) for i, (c, g, _) in enumerate(cases)]
    for thread in threads:
        thread.start()
    for thread in threads + [bomb]:
        thread.join(timeout=30)
    assert all(not t.is_alive() for t in threads + [bomb])
    for index, (_, _, expected) in enumerate(cases):
        assert results[index][0] == expected
        # Never delayed by more than the bomb's own limit (plus bookkeeping).
        assert results[index][1] < 3.0 + 2.0
    assert results[-1][0] == 0.0


@pytest.mark.integration
def test_inside_a_ray_worker():
    ray = pytest.importorskip("ray")
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        @ray.remote
        def verify_remote(items):
            from rewards.matheq import compute_score as math_score
            return [math_score("ray", c, g, None, timeout_s=1.0) for c, g in items]

        results = ray.get(verify_remote.remote([(r"\boxed{\frac{1}{2}}", "0.5"), SLOW_FOR_SYMPY[0],
                                                (r"\boxed{2\sqrt2}", r"\sqrt8")]), timeout=120)
    finally:
        ray.shutdown()
    assert [r["score"] for r in results] == [1.0, 0.0, 1.0]
    assert results[1]["failure"] == "timeout"


@pytest.mark.unit
def test_registered_and_callable_through_the_contract():
    fn = load_reward("math")
    outcome = call_reward(fn, "x", r"\boxed{4}", "4", None)
    assert outcome.score == 1.0 and outcome.failure is None and outcome.details["method"] == "boxed"
    outcome = call_reward(fn, "x", "", "4", None)
    assert outcome.score == 0.0 and outcome.failure == "no_answer"
    from rewards import math_reward
    assert math_reward("x", r"\boxed{4}", "4")["score"] == 1.0


@pytest.mark.unit
@pytest.mark.parametrize("gold, pred, verdict", [
    (r"\frac{3}{4}", "0.75", True), (r"\frac{1}{3}", "2/6", True), (r"\dfrac34", "3/4", True), ("3", "6/2", True),
    (r"\frac{1}{2}", r"50\%", True), (r"\frac{1}{2}", "50", False), (r"\frac{3}{4}", "0.76", False),
    (r"\frac{1}{3}", "0.333333", None),  # non-terminating: Math-Verify's rounding rules decide
    ("1/0", "5", None), ("x^2", "1", None),
])
def test_exact_fast_path_for_numbers_and_fractions(gold, pred, verdict):
    from rewards.matheq import plain_values_equal
    assert plain_values_equal(gold, pred) is verdict


# --------------------------------------------------------------------------- issue #11: linear parsing

# 200 KB each; the completion side and the reference side are both parsed outside the killable worker.
ADVERSARIAL_200KB = {
    "unclosed answer tags": "<answer>" * 25_000,  # the lazy <answer>(.*?)</answer> regex: 23 s at 10,000
    "nested answer tags": "<answer>" * 12_000 + "x" + "</answer>" * 10_000,
    "unclosed boxes": "\\boxed{" * 28_600,
    "boxes without braces": "\\boxed $" * 25_000,  # each \boxed used to copy the rest of the text
    "open braces": "{" * 200_000,
    "dollars": "$" * 200_000,  # the reference clean-up peeled two per pass: quadratic
    "answer anchors": "answer is " * 20_000,
    "anchor then spaces": "Final answer" + " " * 200_000,
    "gsm8k hashes": "#### " * 40_000,
    "spacing commands": "\\, \\! ~" * 33_000,
}


@pytest.mark.unit
@pytest.mark.parametrize("name", list(ADVERSARIAL_200KB))
def test_adversarial_200kb_text_is_parsed_in_linear_time(name):
    text = ADVERSARIAL_200KB[name]
    # CPU time of this process: the parsing under test runs here, and the shared machine's load
    # must not make the test flaky.
    started = time.process_time()
    as_completion = score(text, "5")
    as_reference = score(r"\boxed{5}", text)
    elapsed = time.process_time() - started
    assert as_completion["score"] == 0.0 and as_reference["score"] == 0.0
    assert elapsed < 0.5, f"{name}: {elapsed:.2f} s of CPU"


@pytest.mark.unit
def test_last_complete_answer_block_is_found_backwards():
    from rewards.matheq import last_answer_block
    assert last_answer_block("<answer>1</answer> 2</answer>") == "1"
    assert last_answer_block("<answer>1</answer> <ANSWER>2</Answer> <answer>3") == "2"
    assert last_answer_block("<answer>" * 1000) is None


# --------------------------------------------------------------------------- issue #11: busy machines

def _stop(pids):
    import os
    import signal
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)


def _resume(pids):
    import os
    import signal
    for pid in pids:
        try:
            os.kill(pid, signal.SIGCONT)
        except ProcessLookupError:
            pass


@pytest.mark.integration
def test_pool_budgets_cpu_time_not_wall_time():
    from rewards._pool import KillablePool
    pool = KillablePool(max_workers=1, preload=(), warmup=None)
    try:
        # A task that needs 0.6 s of wall time but almost no CPU (like a worker starved of CPU
        # on a loaded machine) is not a time-out under a 0.3 s limit...
        outcome = pool.call("time:sleep", (0.6,), timeout_s=0.3)
        assert outcome.status == "ok" and outcome.wall_s >= 0.6
        # ...but the wall-clock cap still ends it.
        started = time.monotonic()
        outcome = pool.call("time:sleep", (30,), timeout_s=0.3, max_wall_s=1.0)
        assert outcome.status == "timeout" and time.monotonic() - started < 2.0
        # A task that burns CPU is stopped at its CPU budget.
        started = time.monotonic()
        outcome = pool.call("math:factorial", (10**8,), timeout_s=0.5, max_wall_s=30)
        assert outcome.status == "timeout" and outcome.cpu_s >= 0.5
        assert time.monotonic() - started < 10.0  # 0.5 s of CPU on a machine shared by ~8 people
    finally:
        pool.close()


@pytest.mark.integration
def test_a_worker_starved_of_cpu_still_scores_the_right_answer():
    from rewards._pool import shared_pool
    assert score(r"\boxed{\sqrt{8}}", r"2\sqrt{2}")["score"] == 1.0  # a warm, idle worker
    pids = shared_pool().idle_worker_pids()
    assert pids
    _stop(pids)  # the scheduler gives it no CPU for 1.5 s: far past the 0.5 s limit in wall time
    resume = threading.Timer(1.5, _resume, args=(pids,))
    resume.start()
    try:
        result = score(r"\boxed{\sqrt{12}}", r"2\sqrt{3}", timeout_s=0.5)
    finally:
        resume.cancel()
        _resume(pids)
    assert result["score"] == 1.0, result
    assert result["cpu_starved"] is True  # counted: the wall limit would have bitten


@pytest.mark.integration
def test_a_worker_that_never_answers_still_times_out_in_bounded_wall_time():
    from rewards._pool import shared_pool
    assert score(r"\boxed{\sqrt{8}}", r"2\sqrt{2}")["score"] == 1.0
    pids = shared_pool().idle_worker_pids()
    _stop(pids)  # never resumed: the wall-clock cap (5 x timeout_s) must end the call
    try:
        started = time.monotonic()
        result = score(r"\boxed{\sqrt{12}}", r"2\sqrt{3}", timeout_s=0.3)
        elapsed = time.monotonic() - started
    finally:
        _resume(pids)
    assert result["score"] == 0.0 and result["failure"] == "timeout"
    assert elapsed < 5 * 0.3 + 1.0, elapsed


# --------------------------------------------------------------------------- issue #11: real-world formats

FORMATS_SCORED_RIGHT = [
    # GSM8K: "#### 72" (what verl's GSM8K preprocessing asks for), also as a full reference solution
    ("Natalia sold 48/2 = 24 clips in May.\n#### 72", "72"), ("#### 1,000", "1000"), ("#### $72", "72"),
    (r"\boxed{72}", "She sold 48+24 = 72 clips.\n#### 72"),
    # unit words after a number
    ("The answer is 961 dollars.", "961"), ("The answer is 5 euros.", "5"), ("The answer is 5 people.", "5"),
    ("The answer is 1,200 square meters.", "1200"), (r"\boxed{€5}", "5"), (r"\boxed{5€}", "5"),
    # LaTeX spacing inside \boxed{}
    (r"\boxed{x\;=\;5}", "5"), (r"\boxed{3\!\times\!4}", "12"), (r"\boxed{\quad 7}", "7"),
    (r"\boxed{7~\text{cm}}", "7"), (r"\boxed{(1,\ 2)}", "(1,2)"), (r"\boxed{11,\! 111,\! 100}", "11111100"),
    (r"\boxed{\qquad\frac{1}{2}\,}", "0.5"),
    # synonymous commands
    (r"\boxed{\tfrac{1}{2}}", r"\dfrac{1}{2}"), (r"\boxed{x\leqslant 3}", r"x\le 3"), (r"\boxed{x \leq 3}", r"x\leqslant 3"),
    (r"\boxed{x\geq 3}", r"x\ge 3"), (r"\boxed{x\geqslant 3}", r"x\ge 3"), (r"\boxed{x \neq 3}", r"x\ne 3"),
    (r"\boxed{x \to \infty}", r"x\rightarrow\infty"), (r"\boxed{\left(1,2\right)}", "(1,2)"),
    (r"\boxed{\left[ 1, 2 \right]}", "[1,2]"), (r"\boxed{(1,\infinity)}", r"(1,\infty)"),
    (r"\boxed{2\cdot 3}", r"2\times 3"), (r"\boxed{2 \times x}", r"2\cdot x"), (r"\boxed{x \lt 3}", "x<3"),
    # decimal comma
    (r"\boxed{1000,99}", "1000.99"), (r"\boxed{1000.99}", "1000,99"), (r"\boxed{0.111}", "0,111"),
    (r"\boxed{1.22}", "1,22"), (r"\boxed{1,5}", r"\{1,5\}"),  # a list stays a list against a set
    # \mathrm{e} in the reference is Euler's number, not a parse failure
    (r"\boxed{1 - \frac{1}{e}}", r"1 - \frac{1}{\mathrm{e}}"), (r"\boxed{\mathrm{e}^{2}}", "e^2"),
    # "Answer" on its own line followed by display math
    ("Answer $$ \n 9 \n $$", "9"),
]

FORMATS_SCORED_ZERO = [
    (r"\boxed{0,111}", "111"), (r"\boxed{111}", "0,111"),  # a decimal comma, not a thousands separator
    (r"\boxed{1 + \frac{1}{e}}", r"1 - \frac{1}{\mathrm{e}}"), (r"\boxed{1}", r"1 - \frac{1}{\mathrm{e}}"),
    ("The answer is 5 or more.", "5"), ("The answer $x$ is 5.", "x"),  # not unit words; not an anchor mid-line
    ("Answer $ \n 9 \n $", "9"),  # inline math does not span lines
    (r"\boxed{23}", "2 3"),  # the layout-free identity check keeps spaces between digits
]


@pytest.mark.unit
@pytest.mark.parametrize("completion, gold", FORMATS_SCORED_RIGHT)
def test_real_world_formats_score_one(completion, gold):
    result = score(completion, gold)
    assert result["score"] == 1.0, result


@pytest.mark.unit
@pytest.mark.parametrize("completion, gold", FORMATS_SCORED_ZERO)
def test_real_world_format_false_positives_score_zero(completion, gold):
    result = score(completion, gold)
    assert result["score"] == 0.0, result


@pytest.mark.unit
def test_gsm8k_final_answer_is_extracted():
    assert extract_final_answer("48/2 = 24\n#### 72") == ("72", "gsm8k")


@pytest.mark.unit
def test_a_reference_sympy_cannot_read_is_a_gold_parse_error_not_a_silent_zero():
    # Math-Verify returns only its input text (or a fragment of it) when it cannot parse; scoring
    # against that rejected right answers with no failure kind.
    result = score(r"\boxed{1/2}", r"\frac{1}{2} \foo{3}")
    assert result["score"] == 0.0 and result["failure"] == "gold_parse_error"
