"""The `code` reward: comparison rules, a dozen problems in both test formats, and a hostile corpus.

Hostile programs run with time_limit_s=0.5 so the whole file stays fast; each must get the right
verdict, and nothing may escape (no network, no host file, no surviving process).
"""
from __future__ import annotations

import http.server
import json
import os
import shutil
import sys
import threading
import time
import uuid

import pytest

from rewards import code as code_mod
from rewards.code import (BadInput, compute_score, compute_score_batch, extract_code, json_equal,
                          normalise_stdout, parse_tests, stdout_matches)
from rewards.sandbox import SandboxUnavailable
from tests.helpers import surviving


def fenced(src: str, lang: str = "python") -> str:
    return f"Here is my solution.\n```{lang}\n{src}\n```\nDone."


# ------------------------------------------------------------------ unit: extraction and comparison

@pytest.mark.unit
def test_extract_code_takes_last_closed_python_block():
    text = "```python\nprint(1)\n```\nthen\n```py\nprint(2)\n```\n```python\nprint(3)"  # last is unclosed
    assert extract_code(text) == "print(2)\n"
    assert extract_code("```Python3\nx = 1\n```") == "x = 1\n"
    assert extract_code("```cpp\nint main(){}\n```") is None
    assert extract_code("```cpp\nint main(){}\n```", "cpp") == "int main(){}\n"
    assert extract_code("no code") is None and extract_code(None) is None
    assert extract_code("```python\n   \n```") is None


@pytest.mark.unit
@pytest.mark.parametrize("actual, expected, same", [
    ("3\n", "3", True),
    ("3   \n\n\n", "3\n", True),              # trailing whitespace and trailing blank lines
    ("1 2\t\r\n3\n", "1 2\n3", True),          # \r and tabs at line ends
    (" 3\n", "3\n", False),                    # leading whitespace is significant
    ("1\n\n2\n", "1\n2\n", False),             # a blank line in the middle is significant
    ("2\n1\n", "1\n2\n", False),               # order matters
    ("1\n", "1\n2\n", False),                  # truncated output fails
    ("1\n2\n3\n", "1\n2\n", False),            # extra output fails
    ("YES\n", "yes\n", False),                 # case matters
])
def test_stdout_comparison_rules(actual, expected, same):
    assert stdout_matches(actual, expected) is same


@pytest.mark.unit
def test_normalise_stdout():
    assert normalise_stdout("a  \nb\n\n") == ["a", "b"]
    assert normalise_stdout("") == []


@pytest.mark.unit
def test_json_equal_is_strict_about_booleans_and_structure():
    assert json_equal(2, 2.0) and json_equal([1, {"a": [True]}], [1, {"a": [True]}])
    assert not json_equal(True, 1) and not json_equal(0, False)
    assert not json_equal([1, 2], [2, 1]) and not json_equal({"a": 1}, {"a": 1, "b": 2})
    assert not json_equal("1", 1) and not json_equal(None, 0) and not json_equal([1], [1, 1])


@pytest.mark.unit
@pytest.mark.parametrize("ground_truth, message", [
    ("{not json", "not valid JSON"),
    ([1, 2], "must be a dict"),
    ({"inputs": ["1"]}, "lists 'inputs' and 'outputs'"),
    ({"inputs": ["1"], "outputs": []}, "equal in number"),
    ({"inputs": [], "outputs": []}, "at least 1"),
    ({"fn_name": "f x", "inputs": [[1]], "outputs": [1]}, "identifier"),
    ({"fn_name": "f", "inputs": [1], "outputs": [1]}, "list of arguments"),
    ({"inputs": [1], "outputs": ["1"]}, "string inputs and outputs"),
])
def test_bad_tests_are_named(ground_truth, message):
    with pytest.raises(BadInput, match=message):
        parse_tests(ground_truth)
    result = compute_score("code", fenced("print(1)"), ground_truth)
    assert result["score"] == 0.0 and result["failure"] == "bad_input" and message in result["failure_detail"]


@pytest.mark.unit
def test_ground_truth_as_json_text_and_tuples_round_trip():
    problem = parse_tests(json.dumps({"fn_name": "f", "inputs": [[1]], "outputs": [[1, 2]]}))
    assert problem.mode == "call" and problem.outputs == ([1, 2],)
    assert parse_tests({"fn_name": "f", "inputs": [[1]], "outputs": [(1, 2)]}).outputs == ([1, 2],)


@pytest.mark.unit
@pytest.mark.parametrize("extra_info, message", [
    ({"time_limit_s": "fast"}, "time_limit_s must be a number"),
    ({"time_limit_s": 0}, "outside"),
    ({"memory_limit_mb": 1e9}, "outside"),
    ({"time_limit_s": float("nan")}, "must be a number"),
])
def test_bad_limits_are_zero_with_reason(extra_info, message):
    result = compute_score("code", fenced("print(1)"), {"inputs": ["\n"], "outputs": ["1\n"]}, extra_info)
    assert result["failure"] == "bad_input" and message in result["failure_detail"]


@pytest.mark.unit
def test_no_code_block():
    result = compute_score("code", "I would print 3.", {"inputs": ["\n"], "outputs": ["3\n"]})
    assert result == {"score": 0.0, "passed": 0, "total": 1, "failure": "no_code"}


@pytest.mark.unit
def test_refuses_when_no_sandbox_works(monkeypatch):
    def unavailable(allow_unsafe=False):
        raise SandboxUnavailable("cannot isolate untrusted code here: no bwrap")
    monkeypatch.setattr(code_mod, "default_sandbox", unavailable)
    with pytest.raises(SandboxUnavailable, match="cannot isolate"):
        compute_score("code", fenced("print(3)"), {"inputs": ["\n"], "outputs": ["3\n"]})


# ------------------------------------------------------------------ a dozen problems, both formats
# (name, call tests, correct function, wrong function, stdin tests, correct program, wrong program)
PROBLEMS = [
    ("add", [([1, 2], 3), ([-5, 9], 4), ([100, 23], 123)],
     "def add(a, b):\n    return a + b", "def add(a, b):\n    return a - b",
     [("1 2\n", "3\n"), ("-5 9\n", "4\n"), ("100 23\n", "123\n")],
     "a, b = map(int, input().split())\nprint(a + b)", "a, b = map(int, input().split())\nprint(a * b)"),
    ("reverse_string", [(["abc"], "cba"), (["racecar!"], "!racecar"), ([""], "")],
     "def reverse_string(s):\n    return s[::-1]", "def reverse_string(s):\n    return s",
     [("abc\n", "cba\n"), ("hello world\n", "dlrow olleh\n")],
     "print(input()[::-1])", "print(input())"),
    ("max_of", [([[3, 1, 2]], 3), ([[-1, -7]], -1), ([[5]], 5)],
     "def max_of(nums):\n    return max(nums)", "def max_of(nums):\n    return nums[-1]",
     [("3\n3 1 2\n", "3\n"), ("2\n-1 -7\n", "-1\n")],
     "input()\nprint(max(map(int, input().split())))", "input()\nprint(input().split()[-1])"),
    ("count_vowels", [(["Hello"], 2), (["AEIOUx"], 5), (["xyz"], 0)],
     "def count_vowels(s):\n    return sum(c in 'aeiou' for c in s.lower())",
     "def count_vowels(s):\n    return sum(c in 'aeiou' for c in s)",
     [("Hello\n", "2\n"), ("AEIOUx\n", "5\n")],
     "print(sum(c in 'aeiou' for c in input().lower()))", "print(sum(c in 'aeiou' for c in input()))"),
    ("fib", [([0], 0), ([1], 1), ([10], 55), ([30], 832040)],
     "def fib(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a",
     "def fib(n):\n    a, b = 0, 1\n    for _ in range(n - 1):\n        a, b = b, a + b\n    return b",
     [("10\n", "55\n"), ("1\n", "1\n"), ("0\n", "0\n")],
     "n = int(input())\na, b = 0, 1\nfor _ in range(n):\n    a, b = b, a + b\nprint(a)",
     "n = int(input())\nprint(n * (n - 1) // 2)"),
    ("is_prime", [([2], True), ([9], False), ([97], True), ([1], False)],
     "def is_prime(n):\n    return n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1))",
     "def is_prime(n):\n    return n % 2 == 1",
     [("2\n", "YES\n"), ("9\n", "NO\n"), ("97\n", "YES\n")],
     "n = int(input())\nprint('YES' if n > 1 and all(n % d for d in range(2, int(n ** 0.5) + 1)) else 'NO')",
     "n = int(input())\nprint('YES' if n % 2 else 'NO')"),
    ("sort_numbers", [([[3, 1, 2]], [1, 2, 3]), ([[]], []), ([[5, -1, 5]], [-1, 5, 5])],
     "def sort_numbers(nums):\n    return sorted(nums)", "def sort_numbers(nums):\n    return sorted(set(nums))",
     [("3 1 2\n", "1 2 3\n"), ("5 -1 5\n", "-1 5 5\n")],
     "print(*sorted(map(int, input().split())))", "print(*sorted(map(int, input().split()), reverse=True))"),
    ("gcd", [([12, 18], 6), ([7, 5], 1), ([0, 9], 9)],
     "import math\ndef gcd(a, b):\n    return math.gcd(a, b)", "def gcd(a, b):\n    return min(a, b)",
     [("12 18\n", "6\n"), ("7 5\n", "1\n")],
     "import math\na, b = map(int, input().split())\nprint(math.gcd(a, b))",
     "a, b = map(int, input().split())\nprint(min(a, b))"),
    ("factorial", [([0], 1), ([5], 120), ([20], 2432902008176640000)],
     "def factorial(n):\n    r = 1\n    for k in range(2, n + 1):\n        r *= k\n    return r",
     "def factorial(n):\n    r = 1\n    for k in range(2, n):\n        r *= k\n    return r",
     [("5\n", "120\n"), ("0\n", "1\n")],
     "import math\nprint(math.factorial(int(input())))", "n = int(input())\nprint(n * n)"),
    ("is_palindrome", [(["abba"], True), (["abca"], False), (["a"], True)],
     "def is_palindrome(s):\n    return s == s[::-1]", "def is_palindrome(s):\n    return s[0] == s[-1]",
     [("abba\n", "true\n"), ("abca\n", "false\n")],
     "s = input()\nprint(str(s == s[::-1]).lower())", "s = input()\nprint(str(s[0] == s[-1]).lower())"),
    ("word_count", [(["a b a"], {"a": 2, "b": 1}), ([""], {}), (["x x x"], {"x": 3})],
     "def word_count(text):\n    out = {}\n    for w in text.split():\n        out[w] = out.get(w, 0) + 1\n    return out",
     "def word_count(text):\n    return {w: 1 for w in text.split()}",
     [("a b a\n", "a 2\nb 1\n"), ("x x x\n", "x 3\n")],
     "from collections import Counter\nfor w, c in sorted(Counter(input().split()).items()):\n    print(w, c)",
     "for w in sorted(set(input().split())):\n    print(w, 1)"),
    ("digit_sum", [([0], 0), ([12345], 15), ([999], 27)],
     "def digit_sum(n):\n    return sum(int(d) for d in str(n))", "def digit_sum(n):\n    return n % 9",
     [("12345\n", "15\n"), ("999\n", "27\n")],
     "print(sum(map(int, input().strip())))", "print(int(input()) % 9)"),
]


def _problem_rows():
    rows = []  # (id, solution_str, ground_truth, expected_score)
    for name, call_tests, good_fn, bad_fn, stdin_tests, good_prog, bad_prog in PROBLEMS:
        call_gt = {"fn_name": name, "inputs": [a for a, _ in call_tests], "outputs": [o for _, o in call_tests]}
        stdin_gt = {"inputs": [i for i, _ in stdin_tests], "outputs": [o for _, o in stdin_tests]}
        rows += [(f"{name}-call-correct", fenced(good_fn), call_gt, 1.0),
                 (f"{name}-call-wrong", fenced(bad_fn), call_gt, 0.0),
                 (f"{name}-stdin-correct", fenced(good_prog), stdin_gt, 1.0),
                 (f"{name}-stdin-wrong", fenced(bad_prog), stdin_gt, 0.0)]
    return rows


ROWS = _problem_rows()


@pytest.fixture(scope="module")
def batch_results():
    start = time.monotonic()
    results = compute_score_batch(["code"] * len(ROWS), [r[1] for r in ROWS], [r[2] for r in ROWS],
                                  [{"time_limit_s": 2}] * len(ROWS))
    return results, time.monotonic() - start


@pytest.mark.integration
def test_dozen_problems_cover_both_formats():
    assert len(PROBLEMS) >= 12 and len(ROWS) == 4 * len(PROBLEMS)


@pytest.mark.integration
@pytest.mark.parametrize("row", ROWS, ids=[r[0] for r in ROWS])
def test_problem_verdicts(batch_results, row):
    results, _ = batch_results
    result = results[ROWS.index(row)]
    assert result["score"] == row[3], result
    if row[3] == 1.0:
        assert result["passed"] == result["total"] == len(row[2]["inputs"]) and "failure" not in result
    else:
        assert result["failure"] == "wrong_answer", result


@pytest.mark.integration
def test_fail_fast_off_counts_every_passing_test():
    gt = {"inputs": ["1\n", "2\n", "3\n", "4\n", "5\n"], "outputs": ["1\n", "2\n", "3\n", "0\n", "0\n"]}
    result = compute_score("code", fenced("print(input())"), gt, fail_fast=False)
    assert result["score"] == 0.0 and result["passed"] == 3 and result["total"] == 5
    fast = compute_score("code", fenced("print(input())"), gt)
    assert fast["score"] == 0.0 and fast["passed"] == 3 and fast["failure"] == "wrong_answer"


@pytest.mark.integration
def test_one_sandbox_per_test_gives_the_same_verdicts():
    for _, solution, gt, expected in ROWS[:8]:
        assert compute_score("code", solution, gt, isolation="test")["score"] == expected


# ------------------------------------------------------------------ hostile corpus
ADD_TESTS = {"inputs": ["1 2\n", "3 4\n", "5 6\n"], "outputs": ["3\n", "7\n", "11\n"]}
ADD_CALL = {"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [3, 7]}
FAST = {"time_limit_s": 0.5, "memory_limit_mb": 256}

HOSTILE = [
    # (id, program, tests, expected failure)
    ("infinite_loop", "while True:\n    pass", ADD_TESTS, "time_limit"),
    ("sleep", "import time\ntime.sleep(60)", ADD_TESTS, "time_limit"),
    ("memory_bomb", "x = bytearray(8 << 30)", ADD_TESTS, "memory_limit"),
    ("memory_growth", "chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 22))", ADD_TESTS, "memory_limit"),
    ("output_flood_1gb", "import sys\nblock = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(block)",
     ADD_TESTS, "output_limit"),
    ("stderr_flood", "import sys\nwhile True:\n    sys.stderr.write('e' * 65536)", ADD_TESTS, "output_limit"),
    ("network", "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=1)\nprint(3)",
     ADD_TESTS, "runtime_error"),
    ("sys_exit_before_output", "import sys\nsys.exit(0)\nprint(3)", ADD_TESTS, "wrong_answer"),
    ("os_exit_before_output", "import os\nos._exit(0)", ADD_TESTS, "wrong_answer"),
    ("nonzero_exit_after_right_output", "a, b = map(int, input().split())\nprint(a + b)\nraise SystemExit(3)",
     ADD_TESTS, "runtime_error"),
    ("exception", "raise ValueError('boom')", ADD_TESTS, "runtime_error"),
    ("syntax_error", "def f(:\n    pass", ADD_TESTS, "compile_error"),
    ("call_sys_exit_at_import", "import sys\nsys.exit(0)\ndef add(a, b):\n    return a + b", ADD_CALL, "runtime_error"),
    ("call_os_exit_in_function", "import os\ndef add(a, b):\n    os._exit(0)", ADD_CALL, "runtime_error"),
    ("call_lying_eq", "class Anything:\n    def __eq__(self, other):\n        return True\n"
                      "def add(a, b):\n    return Anything()", ADD_CALL, "wrong_answer"),
    ("call_lying_int_subclass", "class Liar(int):\n    def __eq__(self, other):\n        return True\n"
                                "def add(a, b):\n    return Liar(0)", ADD_CALL, "wrong_answer"),
    ("call_missing_function", "def plus(a, b):\n    return a + b", ADD_CALL, "runtime_error"),
    ("call_returns_set", "def add(a, b):\n    return {a + b}", ADD_CALL, "wrong_answer"),
    ("forge_harness_channel",
     "import os, sys\n"
     "record = b'{\"i\": 1, \"status\": \"ok\", \"exit_code\": 0, \"cpu_s\": 0, \"stdout_len\": 2}\\n7\\n'\n"
     "for path in ('/proc/%d/fd/1' % os.getppid(), '/proc/2/fd/1', '/proc/1/fd/1'):\n"
     "    try:\n        with open(path, 'wb') as fh:\n            fh.write(record)\n"
     "    except OSError:\n        pass\n"
     "sys.stdout.write(record.decode())", ADD_TESTS, "wrong_answer"),
]


@pytest.mark.integration
@pytest.mark.parametrize("case", HOSTILE, ids=[c[0] for c in HOSTILE])
def test_hostile_program_gets_right_verdict(case):
    _, program, tests, expected = case
    start = time.monotonic()
    # memory growth gets CPU time to fill its 128 MB even on a loaded machine (zero-filling pages)
    extra = {"time_limit_s": 2, "memory_limit_mb": 128} if case[0] == "memory_growth" else FAST
    result = compute_score("code", fenced(program), tests, extra)
    elapsed = time.monotonic() - start
    assert result["score"] == 0.0 and result["failure"] == expected, result
    assert elapsed < 8, f"verdict took {elapsed:.1f} s"


@pytest.mark.integration
def test_forging_the_report_channel_is_just_answering():
    # Writing a "returned" answer for this test's own arguments is the same as returning the value:
    # it passes test 0 (1 + 2 = 3) and cannot touch test 1, which expects 7.
    program = ("import os, json\n"
               "os.write(4, json.dumps({'kind': 'returned', 'value': '3'}).encode())\n"
               "os._exit(0)")
    result = compute_score("code", fenced(program), ADD_CALL, FAST)
    assert result["score"] == 0.0 and result["passed"] == 1 and result["failure"] == "wrong_answer"


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["harness_error", "compile_error"])
@pytest.mark.parametrize("tests", [ADD_CALL, ADD_TESTS], ids=["call", "stdin"])
def test_program_cannot_make_the_judge_fail_or_claim_a_compile_error(kind, tests):
    # The setup channel (fd 3) is closed before program code runs; the answer channel (fd 4) only
    # carries what the program could cause itself. Neither can turn a wrong program into a judge fault.
    program = ("import os, json\n"
               "for fd in (3, 4):\n"
               "    try:\n"
               f"        os.write(fd, json.dumps({{'kind': {kind!r}, 'detail': 'forged'}}).encode())\n"
               "    except OSError:\n"
               "        pass\n"
               "def add(a, b):\n    return a + b\n")
    result = compute_score("code", fenced(program), tests, FAST)
    assert result["score"] == 0.0 and result["failure"] == "runtime_error", result
    assert "forged" not in result.get("failure_detail", "")


@pytest.mark.unit
def test_frame_reader_rejects_unbounded_frames():
    reader = code_mod._FrameReader(max_payload_bytes=100)
    frames = reader.feed(b'{"i": 0, "stdout_len": 2, "answer_len": 3}\nhi{}x')
    assert frames == [({"i": 0, "stdout_len": 2, "answer_len": 3}, b"hi", b"{}x")]
    with pytest.raises(code_mod.FrameError, match="longer than"):
        code_mod._FrameReader(max_payload_bytes=100).feed(b"x" * (code_mod._FrameReader.MAX_HEADER_BYTES + 1))
    with pytest.raises(code_mod.FrameError, match="not a bounded frame"):
        code_mod._FrameReader(max_payload_bytes=100).feed(b'{"i": 0, "stdout_len": 101}\n')
    with pytest.raises(code_mod.FrameError, match="not a bounded frame"):
        code_mod._FrameReader(max_payload_bytes=100).feed(b'{"i": 0, "answer_len": -1}\n')


SPIN_0_3_S = "def spin():\n    t = time.process_time()\n    while time.process_time() - t < 0.3:\n        pass\n    os._exit(0)\n"


@pytest.mark.integration
@pytest.mark.parametrize("name, program", [
    # grandchildren orphaned to the sandbox's init before they finish
    ("orphans", "import os, time\n" + SPIN_0_3_S +
     "r, w = os.pipe()\nif os.fork() == 0:\n    for _ in range(2):\n        if os.fork() == 0:\n"
     "            spin()\n    os._exit(0)\nos.close(w)\nos.read(r, 1)\nprint(3)"),
    # children the kernel reaps by itself (SIGCHLD ignored): their time is never reported to anyone
    ("sigchld_ignored", "import os, signal, time\n" + SPIN_0_3_S +
     "signal.signal(signal.SIGCHLD, signal.SIG_IGN)\nfor _ in range(2):\n    if os.fork() == 0:\n"
     "        spin()\ntry:\n    os.wait()\nexcept ChildProcessError:\n    pass\nprint(3)"),
])
def test_cpu_time_counts_every_process_of_the_test(name, program):
    problem = parse_tests({"inputs": ["1 2\n"], "outputs": ["3\n"]})
    result = code_mod.judge(program, problem, code_mod.JudgeLimits(time_limit_s=10))
    assert result.failure is None, result
    # two children of 0.3 s each; polling every 50 ms may miss the last tick of a kernel-reaped child
    assert result.verdicts[0].cpu_s >= (0.55 if name == "orphans" else 0.35), result


@pytest.mark.integration
def test_processes_sharing_the_time_limit_get_time_limit():
    # four orphaned processes of 0.6 s each: 2.4 s of CPU against a 1 s limit (each alone is under it).
    # The judge stops them once their sum passes 1 s; on a machine so loaded that they cannot get 1 s of
    # CPU in 2 s, the wall clock stops them instead (the accounting itself is tested above).
    program = ("import os, time\n"
               "def spin():\n    t = time.process_time()\n    while time.process_time() - t < 0.6:\n"
               "        pass\n    os._exit(0)\n"
               "r, w = os.pipe()\nif os.fork() == 0:\n    for _ in range(4):\n        if os.fork() == 0:\n"
               "            spin()\n    os._exit(0)\nos.close(w)\nos.read(r, 1)\n"
               "a, b = map(int, input().split())\nprint(a + b)")
    result = compute_score("code", fenced(program), {"inputs": ["1 2\n"], "outputs": ["3\n"]},
                           {"time_limit_s": 1})
    assert result["score"] == 0.0 and result["failure"] == "time_limit", result


@pytest.mark.integration
@pytest.mark.parametrize("where", ["cwd", "tmp", "locked_dir"])
def test_each_test_starts_from_a_clean_scratch_area(where):
    # A program that counts what earlier tests left behind would learn its test index.
    setup = {"cwd": "d = '.'\n",
             "tmp": "d = '/tmp'\n",
             "locked_dir": "d = '/tmp/deep/er'\nos.makedirs(d, exist_ok=True)\nos.chmod('/tmp/deep/er', 0o700)\n"}[where]
    program = ("import os\n" + setup +
               "n = len([f for f in os.listdir(d) if f.startswith('seen')])\n"
               "open(os.path.join(d, f'seen{n}'), 'w').write('x')\n"
               "if d != '.' and d != '/tmp':\n    os.chmod('/tmp/deep', 0)\n"
               "print(n)")
    tests = {"inputs": ["\n"] * 3, "outputs": ["0\n", "1\n", "2\n"]}
    result = compute_score("code", fenced(program), tests, FAST)
    assert result["score"] == 0.0 and result["passed"] == 1 and result["failure"] == "wrong_answer", result


NESTED_USERNS = (
    # what was seen: a user namespace of its own, full capabilities there, an unlimited tmpfs
    "import ctypes, os, socket\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "escaped = []\n"
    "if libc.unshare(0x10000000 | 0x00020000) == 0:\n"
    "    escaped.append('userns')\n"
    "    if libc.mount(b'none', b'/tmp', b'tmpfs', 0, b'size=1g') == 0:\n"
    "        escaped.append('mount')\n"
    "try:\n"
    "    socket.socket(16, socket.SOCK_RAW, 12).close()\n"  # AF_NETLINK, NETLINK_NETFILTER
    "    escaped.append('netlink')\n"
    "except OSError:\n"
    "    pass\n"
    "status = dict(line.split(':\\t', 1) for line in open('/proc/self/status').read().splitlines() if ':\\t' in line)\n"
    "if status['Seccomp'].strip() != '2' or int(status['CapInh'], 16) or int(status['CapAmb'], 16):\n"
    "    escaped.append('privileges ' + status['CapInh'] + status['CapAmb'] + status['Seccomp'])\n"
    "a, b = map(int, input().split())\n"
    "print(a + b, *escaped)\n")


@pytest.mark.integration
def test_judged_program_cannot_make_namespaces_mounts_or_netlink_sockets():
    result = compute_score("code", fenced(NESTED_USERNS), ADD_TESTS, FAST)
    assert result == {"score": 1.0, "passed": 3, "total": 3}, result


@pytest.mark.integration
def test_fork_bomb_is_contained_and_leaves_nothing():
    marker = f"posttrain-judge-bomb-{uuid.uuid4().hex}"
    program = f"# {marker}\nimport os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"
    result = compute_score("code", fenced(program), ADD_TESTS, FAST)
    assert result["score"] == 0.0 and result["failure"] == "time_limit"
    time.sleep(0.2)
    assert surviving(marker) == []


@pytest.mark.integration
def test_background_child_outliving_the_program_is_killed():
    marker = f"posttrain-judge-bg-{uuid.uuid4().hex}"
    program = (f"# {marker}\nimport os, time\n"
               "if os.fork() == 0:\n    os.setsid()\n    time.sleep(60)\n    os._exit(0)\n"
               "a, b = map(int, input().split())\nprint(a + b)")
    result = compute_score("code", fenced(program), ADD_TESTS, FAST)
    assert result["score"] == 1.0  # the answer is right; the lingering child just gets killed
    time.sleep(0.2)
    assert surviving(marker) == []


@pytest.mark.integration
def test_writes_outside_work_dir_reach_nothing_on_host(tmp_path):
    host_file = tmp_path / "escaped.txt"
    marker = f"posttrain-judge-{uuid.uuid4().hex}"
    program = (f"for path in [{str(host_file)!r}, '/etc/{marker}', '/tmp/{marker}', '/sandbox/{marker}',"
               f" '/usr/lib/{marker}']:\n"
               "    try:\n        open(path, 'w').write('x')\n    except OSError:\n        pass\n"
               "a, b = map(int, input().split())\nprint(a + b)")
    result = compute_score("code", fenced(program), ADD_TESTS, FAST)
    assert result["score"] == 1.0
    assert not host_file.exists()
    assert not any(os.path.exists(p) for p in (f"/etc/{marker}", f"/tmp/{marker}", f"/usr/lib/{marker}"))


@pytest.mark.integration
def test_network_attempt_reaches_no_host_server():
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()
            self.wfile.write(b"3")

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    program = ("import urllib.request\n"
               f"print(urllib.request.urlopen('http://127.0.0.1:{port}/leak', timeout=1).read().decode())")
    try:
        result = compute_score("code", fenced(program), ADD_TESTS, FAST)
    finally:
        server.shutdown()
        server.server_close()
    assert result["failure"] == "runtime_error" and hits == []


@pytest.mark.integration
def test_judge_keeps_working_after_hostile_programs():
    # After the corpus above (fork bombs, floods) the judge still runs ordinary solutions.
    result = compute_score("code", fenced("a, b = map(int, input().split())\nprint(a + b)"), ADD_TESTS, FAST)
    assert result == {"score": 1.0, "passed": 3, "total": 3}


@pytest.mark.integration
def test_unsafe_local_mode_still_judges(monkeypatch):
    from rewards import sandbox as sandbox_mod
    monkeypatch.setattr(sandbox_mod, "probe_bwrap", lambda binds=(): "bwrap missing (simulated)")
    sandbox_mod.default_sandbox.cache_clear()
    try:
        good = compute_score("code", fenced("a, b = map(int, input().split())\nprint(a + b)"), ADD_TESTS, FAST,
                             allow_unsafe=True)
        with pytest.raises(SandboxUnavailable):
            compute_score("code", fenced("print(3)"), {"inputs": ["\n"], "outputs": ["3\n"]}, FAST)
    finally:
        sandbox_mod.default_sandbox.cache_clear()
    assert good["score"] == 1.0


# ------------------------------------------------------------------ C++

CPP_ADD = "#include <iostream>\nint main() { long a, b; std::cin >> a >> b; std::cout << a + b << '\\n'; }"


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("g++") is None, reason="C++ judging needs g++ on this machine")
@pytest.mark.parametrize("program, expected", [
    (CPP_ADD, None),
    (CPP_ADD.replace("a + b", "a - b"), "wrong_answer"),
    ("int main( {", "compile_error"),
    ("int main() { volatile long x = 0; while (true) x++; }", "time_limit"),
    ("#include <vector>\nint main() { std::vector<long> v(4000000000L); return (int) v[7]; }", "memory_limit"),
], ids=["correct", "wrong", "compile_error", "loop", "memory"])
def test_cpp(program, expected):
    result = compute_score("code", fenced(program, "cpp"), ADD_TESTS, {**FAST, "language": "cpp"})
    if expected is None:
        assert result == {"score": 1.0, "passed": 3, "total": 3}
    else:
        assert result["score"] == 0.0 and result["failure"] == expected, result


@pytest.mark.integration
@pytest.mark.skipif(shutil.which("g++") is None, reason="C++ judging needs g++ on this machine")
def test_cpp_tests_start_clean_and_cannot_touch_the_judged_binary():
    # Counts marks left by earlier tests (in the work dir, or next to the binary) and tries to replace
    # the binary for the next test; each test must see a clean work dir and the harness's own binary.
    program = (
        "#include <cstdio>\n#include <dirent.h>\n#include <cstring>\n#include <unistd.h>\n"
        "int count(const char *dir) { int n = 0; DIR *d = opendir(dir); if (!d) return 0;\n"
        "  for (dirent *e; (e = readdir(d));) n += strncmp(e->d_name, \"seen\", 4) == 0; closedir(d); return n; }\n"
        "int main(int, char **argv) {\n"
        "  int n = count(\"/sandbox\") + count(\"/sandbox/.judge\");\n"
        "  char path[64]; snprintf(path, sizeof path, \"/sandbox/seen%d\", n); fclose(fopen(path, \"w\"));\n"
        "  snprintf(path, sizeof path, \"/sandbox/.judge/seen%d\", n); FILE *f = fopen(path, \"w\"); if (f) fclose(f);\n"
        "  unlink(argv[0]);\n"
        "  printf(\"%d\\n\", n); }\n")
    tests = {"inputs": ["\n"] * 3, "outputs": ["0\n", "1\n", "2\n"]}
    result = compute_score("code", fenced(program, "cpp"), tests, {**FAST, "language": "cpp"})
    assert result["score"] == 0.0 and result["passed"] == 1 and result["failure"] == "wrong_answer", result


# ------------------------------------------------------------------ Ray

@pytest.mark.integration
@pytest.mark.slow
def test_judging_inside_a_ray_task():
    import ray
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False, configure_logging=False)
    try:
        @ray.remote
        def judge_remote(solutions, tests):
            from rewards.code import compute_score_batch
            return compute_score_batch(["code"] * len(solutions), solutions, [tests] * len(solutions))

        good = fenced("a, b = map(int, input().split())\nprint(a + b)")
        bad = fenced("print(0)")
        results = ray.get(judge_remote.remote([good, bad], ADD_TESTS), timeout=120)
    finally:
        ray.shutdown()
    assert [r["score"] for r in results] == [1.0, 0.0] and results[1]["failure"] == "wrong_answer"
