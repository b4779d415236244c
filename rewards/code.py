"""The `code` reward: an online judge for model-written programs, run in `rewards.sandbox`.

    compute_score(data_source, solution_str, ground_truth, extra_info=None, **kwargs) -> dict

takes the last ```python (or, with language="cpp", ```cpp) block of the completion and runs it
against the tests in `ground_truth` (a dict or its JSON text), in one of the de-facto formats:

    stdin/stdout:   {"inputs": ["1 2\\n", ...], "outputs": ["3\\n", ...]}
    function call:  {"fn_name": "add", "inputs": [[1, 2], ...], "outputs": [3, ...]}
                    (a top-level function, or a method of `class Solution` as on LeetCode)

Score 1.0 only if every test passes, else 0.0. Details: `passed`, `total`, and for a failure its kind
under "failure": no_code, compile_error, wrong_answer, runtime_error, time_limit, memory_limit,
output_limit, bad_input (the row itself is malformed), sandbox_error (the judge failed, not the code).

How a problem is judged (one sandbox per problem; measured in benchmarks/CODE_JUDGE.md): the host
starts one bubblewrap sandbox whose trusted harness (rewards/_judge_harness.py, stdlib only) forks
one child per test. Each child drops to the sandbox's unprivileged uid, sets its own limits (memory,
processes, file size; CPU time is counted over all of the test's processes), runs the program with
the test's input, and its stdout / return value goes back to the host, which compares it with the
expected output. So:
  * expected outputs never enter the sandbox, and the verdict is decided on the host: a program can
    only pass by producing the right output for every test; nothing it writes can say "passed";
  * exiting early (`sys.exit(0)`, `os._exit(0)`) just ends that test's output: a function test with
    no returned value is a runtime error; a stdin test is compared on what was printed;
  * returned values travel as JSON and are compared as JSON values on the host, so an object whose
    `__eq__` lies is not JSON and fails (an int subclass arrives as its plain int value);
  * the harness's verdict channel is unreachable from the program; the one channel the program can
    write besides stdout (the answer of a function test) can only say what the program could cause
    itself, so no program can turn its failure into a compile_error or a sandbox_error;
  * between tests every process of the test is killed and the files it left are removed, so
    background children and files cannot leak into the next test or outlive the judgement.

Comparison rules: stdout is compared line by line after removing trailing whitespace on each line and
trailing blank lines; everything else (leading spaces, blank lines in the middle, case) is exact.
Returned values: JSON round trip of both sides, then equal as JSON values: numbers by value (2 == 2.0),
booleans only equal booleans, lists in order, objects by keys; no float tolerance.

Limits (per test) come from extra_info: `time_limit_s` (CPU seconds of all the test's processes
together, default 2; the wall clock allows
1.5x + 0.5 s), `memory_limit_mb` (address space, default 512), `output_limit_mb` (default 4).

`compute_score_batch` judges many completions in parallel (threads: each judgement mostly waits on
its sandbox). `backend="sandboxfusion", sandbox_url=...` sends the programs to a SandboxFusion
server instead (rewards/sandboxfusion.py).
"""
from __future__ import annotations

import concurrent.futures
import functools
import importlib.resources
import json
import os
import re
import signal
import sys
from typing import Any, Sequence

from rewards._code_common import (CPP_COMPILE_TIME_S, DEFAULT_MEMORY_LIMIT_MB,  # noqa: F401 - public names
                                  DEFAULT_OUTPUT_LIMIT_MB, DEFAULT_TIME_LIMIT_S, FAILURE_KINDS, MAX_TESTS,
                                  MAX_TIME_LIMIT_S, BadInput, JudgeLimits, JudgeResult, Problem, TestVerdict,
                                  json_equal, limits_from_extra_info, normalise_stdout, parse_tests,
                                  stdout_matches)
from rewards.sandbox import Sandbox, SandboxLimits, SandboxUnavailable, default_sandbox

# kinds the answer channel may carry: each is something the program itself can cause
ANSWER_KINDS = ("returned", "bad_return", "exited", "runtime_error", "no_function", "memory_limit")

_FENCE = {
    "python": re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE),
    "cpp": re.compile(r"```[ \t]*(?:cpp|c\+\+|cc|cxx)[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE),
}


def extract_code(completion: str, language: str = "python") -> str | None:
    """The last fenced block of `language` in the completion, or None (unclosed blocks do not count)."""
    if not isinstance(completion, str):
        return None
    blocks = _FENCE[language].findall(completion)
    return blocks[-1] if blocks and blocks[-1].strip() else None



# ------------------------------------------------------------------ verdicts (host side)

def read_answer(answer: bytes) -> dict:
    """The test's answer channel, which the judged program can write: only what it could have caused."""
    if not answer:
        return {}
    try:
        parsed = json.loads(answer)
    except (ValueError, RecursionError):
        parsed = None
    if not isinstance(parsed, dict) or parsed.get("kind") not in ANSWER_KINDS:
        return {"kind": "runtime_error", "detail": "garbled answer channel"}
    return parsed


def verdict_from_record(problem: Problem, limits: JudgeLimits, record: dict, stdout: bytes,
                        answer: bytes = b"") -> TestVerdict:
    """Decide one test on the host from what the harness saw (the sandbox never sees expected outputs).

    `record` comes from the harness (trusted; its `setup` field from before any program code ran);
    `stdout` and `answer` were written by the program and only count as its output.
    """
    i = record["i"]
    cpu, wall = float(record.get("cpu_s", 0.0)), float(record.get("wall_s", 0.0))
    setup = record.get("setup") if isinstance(record.get("setup"), dict) else {}
    report = read_answer(answer)
    kind = report.get("kind")
    sig = record.get("signal")

    def fail(failure: str, detail: str) -> TestVerdict:
        return TestVerdict(i, False, failure, f"test {i}: {detail}", cpu, wall)

    if setup.get("kind") == "compile_error":
        return fail("compile_error", str(setup.get("detail", ""))[:300])
    if setup:
        return fail("sandbox_error", str(setup.get("detail", "harness failed before the program ran"))[:300])
    if record.get("status") == "cpu_limit" or sig == signal.SIGXCPU or cpu > limits.time_limit_s:
        return fail("time_limit", f"used {cpu:.2f} s of CPU over all its processes (limit "
                                  f"{limits.time_limit_s:g} s)")
    if record.get("status") == "timeout":
        return fail("time_limit", f"still running after {wall:.2f} s of wall clock (cpu {cpu:.2f} s)")
    if record.get("status") == "output_limit":
        return fail("output_limit", f"printed more than {limits.output_limit_mb:g} MB")
    if kind == "memory_limit" or (sig == signal.SIGABRT and "bad_alloc" in str(record.get("stderr", ""))):
        return fail("memory_limit", f"MemoryError under a {limits.memory_limit_mb} MB limit")
    stderr_tail = str(record.get("stderr", ""))[-200:]
    if problem.mode == "call":
        if kind == "returned":
            try:
                value = json.loads(report["value"])
            except (ValueError, RecursionError, TypeError, KeyError):
                return fail("wrong_answer", "returned value could not be read back as JSON")
            if json_equal(value, problem.outputs[i]):
                return TestVerdict(i, True, None, "", cpu, wall)
            return fail("wrong_answer", f"returned {str(report['value'])[:80]}")
        if kind == "bad_return":
            return fail("wrong_answer", f"returned a {str(report.get('detail'))[:80]}, which is not a JSON value")
        if kind == "exited":
            return fail("runtime_error", f"exited (code {str(report.get('code'))[:20]}) before returning a value")
        if kind in ("runtime_error", "no_function"):
            return fail("runtime_error", str(report.get("detail", ""))[:300])
        if sig is not None:
            return fail("runtime_error", f"killed by signal {sig}")
        return fail("runtime_error", f"exited (code {record.get('exit_code')}) before returning a value")
    if kind == "runtime_error" or sig is not None or record.get("exit_code") != 0:
        what = str(report.get("detail") or "") or (f"killed by signal {sig}" if sig is not None
                                                    else f"exit code {record.get('exit_code')}: {stderr_tail}")
        return fail("runtime_error", what.strip())
    actual = stdout.decode("utf-8", errors="replace")
    if stdout_matches(actual, problem.outputs[i]):
        return TestVerdict(i, True, None, "", cpu, wall)
    return fail("wrong_answer", f"printed {actual[:80]!r}, expected {problem.outputs[i][:80]!r}")


class FrameError(ValueError):
    """The harness's channel broke its own protocol (a judge fault, never the program's)."""


class _FrameReader:
    """Parses the harness's channel: per frame a JSON header line, then `stdout_len` raw bytes of the
    test's stdout and `answer_len` raw bytes of its answer channel. Every part has a bound; a frame over
    one raises FrameError instead of buffering without end."""

    MAX_HEADER_BYTES = 64 << 10  # the harness's headers are a few hundred bytes

    def __init__(self, max_payload_bytes: int):
        self.max_payload_bytes = max_payload_bytes
        self.buffer = bytearray()
        self.header: dict | None = None

    def feed(self, data: bytes) -> list[tuple[dict, bytes, bytes]]:
        self.buffer += data
        frames = []
        while True:
            if self.header is None:
                newline = self.buffer.find(b"\n", 0, self.MAX_HEADER_BYTES + 1)
                if newline < 0:
                    if len(self.buffer) > self.MAX_HEADER_BYTES:
                        raise FrameError(f"frame header longer than {self.MAX_HEADER_BYTES} bytes")
                    return frames
                line = bytes(self.buffer[:newline])
                del self.buffer[:newline + 1]
                try:
                    header = json.loads(line)
                except (ValueError, RecursionError):
                    raise FrameError(f"garbled frame header {line[:200]!r}") from None
                lengths = [header.get(k, 0) if isinstance(header, dict) else None
                           for k in ("stdout_len", "answer_len")]
                if not all(isinstance(n, int) and 0 <= n <= self.max_payload_bytes for n in lengths):
                    raise FrameError(f"frame header {line[:200]!r} is not a bounded frame")
                self.header = header
            stdout_len, answer_len = self.header.get("stdout_len", 0), self.header.get("answer_len", 0)
            if len(self.buffer) < stdout_len + answer_len:
                return frames
            frames.append((self.header, bytes(self.buffer[:stdout_len]),
                           bytes(self.buffer[stdout_len:stdout_len + answer_len])))
            del self.buffer[:stdout_len + answer_len]
            self.header = None


# ------------------------------------------------------------------ the judge

def judge(source: str, problem: Problem, limits: JudgeLimits = JudgeLimits(), *, language: str = "python",
          sandbox: Sandbox | None = None, fail_fast: bool = True, isolation: str = "problem") -> JudgeResult:
    """Run `source` against `problem` in the sandbox and decide every test on the host.

    fail_fast stops at the first failing test (the score is then already 0; `passed` counts the tests
    before it). isolation="test" starts a fresh sandbox for every test instead of one per problem.
    """
    if isolation not in ("problem", "test"):
        raise ValueError(f"isolation must be 'problem' or 'test', got {isolation!r}")
    if language not in ("python", "cpp"):
        raise ValueError(f"language must be 'python' or 'cpp', got {language!r}")
    if language == "cpp" and problem.mode == "call":
        return JudgeResult(len(problem.inputs), [], "bad_input", "function-call tests are Python-only")
    sandbox = sandbox or default_sandbox()
    groups = [list(range(len(problem.inputs)))] if isolation == "problem" else \
        [[i] for i in range(len(problem.inputs))]
    verdicts: list[TestVerdict] = []
    for group in groups:
        result = _judge_group(source, problem, limits, language, sandbox, fail_fast, group)
        verdicts += result.verdicts
        if result.failure is not None and (fail_fast or result.failure in ("compile_error", "sandbox_error")):
            return JudgeResult(len(problem.inputs), verdicts, result.failure, result.detail)
    first = next((v for v in verdicts if not v.passed), None)
    return JudgeResult(len(problem.inputs), verdicts, first.kind if first else None,
                       first.detail if first else "")


def _judge_group(source, problem, limits, language, sandbox, fail_fast, indices) -> JudgeResult:
    payload = {
        "language": language, "mode": problem.mode, "source": source, "fn_name": problem.fn_name,
        "tests": [[i, problem.inputs[i]] for i in indices], "fail_fast": fail_fast,
        "time_limit_s": limits.time_limit_s, "wall_s": limits.test_wall_s,
        "memory_mb": limits.memory_limit_mb, "nproc": limits.nproc, "file_size_mb": limits.file_size_mb,
        "output_bytes": limits.output_bytes, "compile_wall_s": CPP_COMPILE_TIME_S,
    }
    reader = _FrameReader(max_payload_bytes=limits.output_bytes)
    verdicts: list[TestVerdict] = []
    state = {"done": False, "compile": None, "protocol_error": None}

    def on_stdout(chunk: bytes) -> bool:
        try:
            frames = reader.feed(chunk)
        except FrameError as err:
            state["protocol_error"] = str(err)
            return False
        for header, stdout, answer in frames:
            if header.get("event") == "done":
                state["done"] = True
                continue
            if header.get("event") == "compile":
                state["compile"] = header
                continue
            if header.get("i") not in indices:
                continue
            verdict = verdict_from_record(problem, limits, header, stdout, answer)
            verdicts.append(verdict)
            if fail_fast and not verdict.passed:
                return False  # decided: stop the sandbox now
        return True

    compile_budget = CPP_COMPILE_TIME_S if language == "cpp" else 0.0
    sandbox_limits = SandboxLimits(
        wall_s=10.0 + compile_budget + len(indices) * (limits.test_wall_s + 0.5),
        # each frame: a bounded header, the test's stdout and its answer channel (each <= output limit)
        stdout_bytes=len(indices) * (2 * limits.output_bytes + 8192) + (1 << 16),
        stderr_bytes=1 << 16, tmpfs_mb=max(64, 2 * limits.file_size_mb))
    result = sandbox.run([sys.executable, "-I", "-S", "-c", _harness_source()],
                         stdin=json.dumps(payload).encode(), limits=sandbox_limits,
                         trusted_supervisor=True, on_stdout=on_stdout)
    total = len(indices)
    compile_header = state["compile"]
    if compile_header is not None and compile_header.get("status") != "ok":
        return JudgeResult(total, verdicts, "compile_error", str(compile_header.get("stderr", ""))[:300])
    failed = next((v for v in verdicts if not v.passed), None)
    if failed is not None:
        return JudgeResult(total, verdicts, failed.kind, failed.detail)
    if len(verdicts) == total:
        return JudgeResult(total, verdicts)
    why = (f"broke its protocol ({state['protocol_error']})" if state["protocol_error"]
           else "timed out" if result.timed_out else "overflowed its channel" if result.output_limited
           else f"ended with code {result.exit_code} signal {result.signal}")
    return JudgeResult(total, verdicts, "sandbox_error",
                       f"harness {why} after {len(verdicts)}/{total} tests: "
                       + result.stderr.decode(errors="replace")[-300:])


# ------------------------------------------------------------------ reward entry points

def compute_score(data_source: str, solution_str: str, ground_truth: Any, extra_info: dict | None = None,
                  *, language: str | None = None, backend: str = "local", sandbox_url: str | None = None,
                  allow_unsafe: bool = False, fail_fast: bool = True, isolation: str = "problem",
                  **backend_kwargs) -> dict:
    """verl-signature `code` reward; see the module docstring. Raises SandboxUnavailable when no sandbox
    works here and allow_unsafe is not set (a configuration error, not a property of the sample)."""
    if language is None:
        language = extra_info.get("language", "python") if isinstance(extra_info, dict) else "python"
    if language in ("c++", "cxx"):
        language = "cpp"
    if language not in _FENCE:
        return {"score": 0.0, "passed": 0, "total": 0, "failure": "bad_input",
                "failure_detail": f"language {language!r} is not supported (python, cpp)"}
    try:
        problem = parse_tests(ground_truth)
        limits = limits_from_extra_info(extra_info)
    except BadInput as err:
        return {"score": 0.0, "passed": 0, "total": 0, "failure": "bad_input", "failure_detail": str(err)}
    source = extract_code(solution_str, language)
    if source is None:
        return {"score": 0.0, "passed": 0, "total": len(problem.inputs), "failure": "no_code"}
    if backend == "local":
        sandbox = default_sandbox(allow_unsafe=bool(allow_unsafe))
        result = judge(source, problem, limits, language=language, sandbox=sandbox, fail_fast=fail_fast,
                       isolation=isolation)
    elif backend == "sandboxfusion":
        from rewards.sandboxfusion import judge_remote
        if not sandbox_url:
            raise ValueError("backend='sandboxfusion' needs sandbox_url='http://HOST:PORT' (the server's "
                             "base URL; /run_code is appended)")
        result = judge_remote(source, problem, limits, language=language, url=sandbox_url,
                              fail_fast=fail_fast, **backend_kwargs)
    else:
        raise ValueError(f"backend must be 'local' or 'sandboxfusion', got {backend!r}")
    return result.as_reward()


def compute_score_batch(data_sources: Sequence[str], solution_strs: Sequence[str],
                        ground_truths: Sequence[Any], extra_infos: Sequence[dict | None] | None = None,
                        *, max_workers: int | None = None, **kwargs) -> list[dict]:
    """Judge many completions in parallel (verl's batched-reward signature); results in input order.

    Threads are enough: each judgement spends its time waiting on its sandbox process. The default,
    two workers per core, measured fastest (benchmarks/CODE_JUDGE.md): a sandbox spends part of its
    life starting up and tearing down, and a second one per core fills those gaps.
    """
    n = len(solution_strs)
    if not (len(data_sources) == len(ground_truths) == n) or (extra_infos is not None and len(extra_infos) != n):
        raise ValueError("data_sources, solution_strs, ground_truths (and extra_infos) must have equal lengths")
    extra_infos = list(extra_infos) if extra_infos is not None else [None] * n
    workers = max_workers or 2 * max(1, len(os.sched_getaffinity(0)))

    def one(i: int) -> dict:
        try:
            return compute_score(data_sources[i], solution_strs[i], ground_truths[i], extra_infos[i], **kwargs)
        except SandboxUnavailable:
            raise
        except Exception as err:  # noqa: BLE001 - one broken row must not sink the batch
            return {"score": 0.0, "passed": 0, "total": 0, "failure": "sandbox_error",
                    "failure_detail": f"{type(err).__name__}: {err}"[:300]}

    with concurrent.futures.ThreadPoolExecutor(max_workers=min(workers, max(n, 1))) as pool:
        return list(pool.map(one, range(n)))


@functools.lru_cache(maxsize=1)
def _harness_source() -> str:
    """The trusted harness run inside the sandbox (rewards/_judge_harness.py, stdlib only)."""
    return importlib.resources.files("rewards").joinpath("_judge_harness.py").read_text(encoding="utf-8")
