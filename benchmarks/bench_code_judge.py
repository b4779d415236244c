"""Benchmark of the code judge (rewards.code + rewards.sandbox); results go in benchmarks/CODE_JUDGE.md.

    .venv/bin/python benchmarks/bench_code_judge.py            # everything, ~1 minute on 2 cores
    .venv/bin/python benchmarks/bench_code_judge.py --quick    # fewer repetitions

Measures:
  1. sandbox overhead per run: the same command started plainly vs inside the bubblewrap sandbox;
  2. judgements per second for small problems with 5 tests each (correct and wrong solutions, both
     test formats), one sandbox per problem vs one sandbox per test, and by number of workers;
  3. time to the verdict for each hostile program under the default limits (2 s per test).
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rewards.code import compute_score, compute_score_batch  # noqa: E402
from rewards.sandbox import default_sandbox  # noqa: E402


def timed_ms(fn, repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        out.append((time.perf_counter() - start) * 1000)
    return out


def overhead(repeats: int) -> None:
    sandbox = default_sandbox()
    print("## 1. Sandbox overhead per run (ms; median / mean over", repeats, "runs)")
    for label, argv in (("/bin/true", ["/bin/true"]),
                        ("python -I -S -c pass", [sys.executable, "-I", "-S", "-c", "pass"])):
        plain = timed_ms(lambda: subprocess.run(argv, stdin=subprocess.DEVNULL, capture_output=True), repeats)
        boxed = timed_ms(lambda: sandbox.run(argv), repeats)
        print(f"  {label:24s} plain {statistics.median(plain):6.1f} / {statistics.mean(plain):6.1f}"
              f"   sandboxed {statistics.median(boxed):6.1f} / {statistics.mean(boxed):6.1f}"
              f"   overhead (median) {statistics.median(boxed) - statistics.median(plain):6.1f}")


def judge_overhead(repeats: int) -> None:
    """The judge's own path: one problem with one test, sandboxed vs the same harness run unsandboxed."""
    from rewards.sandbox import Sandbox
    from rewards import code
    unsafe = Sandbox.__new__(Sandbox)
    unsafe.limits, unsafe.extra_ro_binds, unsafe.mechanism, unsafe.privileged = default_sandbox().limits, (), "unsafe", False
    problem = code.parse_tests({"inputs": ["1 2\n"], "outputs": ["3\n"]})
    source = "a, b = map(int, input().split())\nprint(a + b)\n"
    boxed = timed_ms(lambda: code.judge(source, problem, sandbox=default_sandbox()), repeats)
    plain = timed_ms(lambda: code.judge(source, problem, sandbox=unsafe), repeats)
    print(f"  judge, 1 test (harness)  plain {statistics.median(plain):6.1f} / {statistics.mean(plain):6.1f}"
          f"   sandboxed {statistics.median(boxed):6.1f} / {statistics.mean(boxed):6.1f}"
          f"   overhead (median) {statistics.median(boxed) - statistics.median(plain):6.1f}")


def small_problems(n_problems: int):
    """n problems x 5 tests: a mix of correct and wrong solutions in both formats."""
    stdin_tests = {"inputs": [f"{a} {a + 3}\n" for a in range(5)], "outputs": [f"{2 * a + 3}\n" for a in range(5)]}
    call_tests = {"fn_name": "add", "inputs": [[a, a + 3] for a in range(5)], "outputs": [2 * a + 3 for a in range(5)]}
    kinds = [
        ("```python\na, b = map(int, input().split())\nprint(a + b)\n```", stdin_tests),
        ("```python\nimport sys\nfor line in sys.stdin:\n    a, b = map(int, line.split())\n    print(a + b)\n```",
         stdin_tests),
        ("```python\ndef add(a, b):\n    return a + b\n```", call_tests),
        ("```python\nclass Solution:\n    def add(self, a, b):\n        return sum([a, b])\n```", call_tests),
        ("```python\na, b = map(int, input().split())\nprint(a - b)\n```", stdin_tests),  # wrong at test 0
    ]
    rows = [kinds[i % len(kinds)] for i in range(n_problems)]
    return [r[0] for r in rows], [r[1] for r in rows]


def throughput(n_problems: int) -> None:
    solutions, tests = small_problems(n_problems)
    cores = len(os.sched_getaffinity(0))
    print(f"\n## 2. Judgements per second ({n_problems} problems x 5 tests, {cores} cores, fail_fast on)")
    compute_score_batch(["code"] * 4, solutions[:4], tests[:4])  # warm-up: probe, page cache
    configs = [("problem", None), ("problem", 1), ("problem", cores), ("problem", 4 * cores), ("test", None)]
    for isolation, workers in configs:
        start = time.perf_counter()
        results = compute_score_batch(["code"] * n_problems, solutions, tests, max_workers=workers,
                                      isolation=isolation)
        elapsed = time.perf_counter() - start
        right = sum(r["score"] for r in results)
        print(f"  one sandbox per {isolation:7s} workers={workers or 2 * cores:<3d} {n_problems / elapsed:6.1f} problems/s"
              f"  ({1000 * elapsed / n_problems:6.1f} ms each; {int(right)} of {n_problems} correct)")


HOSTILE = [
    ("infinite loop", "while True:\n    pass"),
    ("sleep(60)", "import time\ntime.sleep(60)"),
    ("memory bomb (8 GB at once)", "x = bytearray(8 << 30)"),
    ("memory growth (16 MB steps)", "chunks = []\nwhile True:\n    chunks.append(bytearray(1 << 24))"),
    ("fork bomb", "import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass"),
    ("1 GB of output", "import sys\nb = 'x' * (1 << 20)\nfor _ in range(1024):\n    sys.stdout.write(b)"),
    ("network attempt", "import socket\nsocket.create_connection(('1.1.1.1', 80), timeout=5)"),
    ("write outside work dir", "open('/etc/pwned', 'w').write('x')"),
    ("background child + answer", "import os, time\nif os.fork() == 0:\n    os.setsid(); time.sleep(60)\n"
                                  "a, b = map(int, input().split())\nprint(a + b)"),
    ("sys.exit(0) first", "import sys\nsys.exit(0)"),
    ("os._exit(0) first", "import os\nos._exit(0)"),
    ("syntax error", "def f(:\n    pass"),
]


def hostile() -> None:
    tests = {"inputs": [f"{a} {a}\n" for a in range(5)], "outputs": [f"{2 * a}\n" for a in range(5)]}
    call = {"fn_name": "add", "inputs": [[1, 2]], "outputs": [3]}
    print("\n## 3. Time to verdict for hostile programs (default limits: 2 s CPU, 3.5 s wall per test, 512 MB)")
    cases = [(label, f"```python\n{src}\n```", tests) for label, src in HOSTILE]
    cases.append(("lying __eq__ (call test)", "```python\nclass A:\n    def __eq__(s, o):\n        return True\n"
                                              "def add(a, b):\n    return A()\n```", call))
    for label, completion, gt in cases:
        start = time.perf_counter()
        result = compute_score("code", completion, gt)
        elapsed = time.perf_counter() - start
        print(f"  {label:28s} {elapsed:6.2f} s  score={result['score']}  {result.get('failure', 'passed')}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    args = parser.parse_args()
    print(f"# code judge benchmark — {time.strftime('%Y-%m-%d %H:%M')}, python {sys.version.split()[0]}, "
          f"load average {os.getloadavg()[0]:.2f}")
    overhead(10 if args.quick else 40)
    judge_overhead(10 if args.quick else 40)
    throughput(20 if args.quick else 60)
    hostile()


if __name__ == "__main__":
    main()
