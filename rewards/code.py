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
starts one bubblewrap sandbox whose trusted harness (`_HARNESS`, stdlib only) forks one child per
test. Each child drops to the sandbox's unprivileged uid, sets its own limits (CPU, memory, processes,
file size), runs the program with the test's input, and its stdout / return value goes back to the
host, which compares it with the expected output. So:
  * expected outputs never enter the sandbox, and the verdict is decided on the host: a program can
    only pass by producing the right output for every test; nothing it writes can say "passed";
  * exiting early (`sys.exit(0)`, `os._exit(0)`) just ends that test's output: a function test with
    no returned value is a runtime error; a stdin test is compared on what was printed;
  * returned values travel as JSON and are compared as JSON values on the host, so an object whose
    `__eq__` lies is not JSON and fails (an int subclass arrives as its plain int value);
  * between tests every process of the test is killed (kill(-1) inside the PID namespace), so
    background children cannot leak into the next test or outlive the judgement.

Comparison rules: stdout is compared line by line after removing trailing whitespace on each line and
trailing blank lines; everything else (leading spaces, blank lines in the middle, case) is exact.
Returned values: JSON round trip of both sides, then equal as JSON values: numbers by value (2 == 2.0),
booleans only equal booleans, lists in order, objects by keys; no float tolerance.

Limits (per test) come from extra_info: `time_limit_s` (CPU seconds, default 2; the wall clock allows
1.5x + 0.5 s), `memory_limit_mb` (address space, default 512), `output_limit_mb` (default 4).

`compute_score_batch` judges many completions in parallel (threads: each judgement mostly waits on
its sandbox). `backend="sandboxfusion", sandbox_url=...` sends the programs to a SandboxFusion
server instead (rewards/sandboxfusion.py).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import json
import math
import os
import re
import signal
import sys
from typing import Any, Sequence

from rewards.sandbox import Sandbox, SandboxLimits, SandboxUnavailable, default_sandbox

DEFAULT_TIME_LIMIT_S = 2.0
DEFAULT_MEMORY_LIMIT_MB = 512
DEFAULT_OUTPUT_LIMIT_MB = 4
MAX_TIME_LIMIT_S = 60.0
MAX_TESTS = 1000
CPP_COMPILE_TIME_S = 30.0
WALL_FACTOR, WALL_SLACK_S = 1.5, 0.5
FAILURE_KINDS = ("no_code", "compile_error", "wrong_answer", "runtime_error", "time_limit",
                 "memory_limit", "output_limit", "bad_input", "sandbox_error")

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


# ------------------------------------------------------------------ comparison (host side)

def normalise_stdout(text: str) -> list[str]:
    """Lines with trailing whitespace removed, trailing blank lines dropped. Nothing else changes."""
    lines = [line.rstrip() for line in text.split("\n")]
    while lines and lines[-1] == "":
        lines.pop()
    return lines


def stdout_matches(actual: str, expected: str) -> bool:
    return normalise_stdout(actual) == normalise_stdout(expected)


def json_equal(a: Any, b: Any) -> bool:
    """Equality of two JSON values (as json.loads returns them); bool never equals a number."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b  # str, None


# ------------------------------------------------------------------ problem description

@dataclasses.dataclass(frozen=True)
class Problem:
    mode: str                      # "stdin" or "call"
    inputs: tuple                  # stdin texts, or JSON texts of argument lists
    outputs: tuple                 # expected stdout texts, or expected JSON values (round-tripped)
    fn_name: str | None = None


class BadInput(ValueError):
    """A malformed test row or limit; becomes a zero score with failure "bad_input"."""


def parse_tests(ground_truth: Any) -> Problem:
    """Validate the tests dict (or its JSON text); raise BadInput naming what is wrong and the fix."""
    if isinstance(ground_truth, (str, bytes)):
        try:
            ground_truth = json.loads(ground_truth)
        except (ValueError, RecursionError) as err:
            raise BadInput(f"ground_truth is not valid JSON ({err}); give the tests dict") from None
    if not isinstance(ground_truth, dict):
        raise BadInput(f"ground_truth must be a dict with 'inputs' and 'outputs', got {type(ground_truth).__name__}")
    inputs, outputs = ground_truth.get("inputs"), ground_truth.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        raise BadInput("ground_truth needs lists 'inputs' and 'outputs'")
    if len(inputs) != len(outputs) or not inputs:
        raise BadInput(f"ground_truth has {len(inputs)} inputs and {len(outputs)} outputs; "
                       "they must be equal in number and at least 1")
    if len(inputs) > MAX_TESTS:
        raise BadInput(f"ground_truth has {len(inputs)} tests; at most {MAX_TESTS} are judged")
    fn_name = ground_truth.get("fn_name")
    if fn_name:
        if not isinstance(fn_name, str) or not fn_name.isidentifier():
            raise BadInput(f"fn_name {fn_name!r} is not a Python identifier")
        if not all(isinstance(args, list) for args in inputs):
            raise BadInput("function-call tests need each input to be a list of arguments, e.g. [[1, 2]]")
        try:
            args_texts = tuple(json.dumps(args) for args in inputs)
            expected = tuple(json.loads(json.dumps(out)) for out in outputs)
        except (TypeError, ValueError) as err:
            raise BadInput(f"function-call test values must be JSON values: {err}") from None
        return Problem("call", args_texts, expected, fn_name)
    if not all(isinstance(x, str) for x in inputs) or not all(isinstance(x, str) for x in outputs):
        raise BadInput("stdin/stdout tests need string inputs and outputs (or give 'fn_name' for "
                       "function-call tests)")
    return Problem("stdin", tuple(inputs), tuple(outputs))


@dataclasses.dataclass(frozen=True)
class JudgeLimits:
    time_limit_s: float = DEFAULT_TIME_LIMIT_S
    memory_limit_mb: int = DEFAULT_MEMORY_LIMIT_MB
    output_limit_mb: float = DEFAULT_OUTPUT_LIMIT_MB
    nproc: int = 32
    file_size_mb: int = 16

    @property
    def test_wall_s(self) -> float:
        return self.time_limit_s * WALL_FACTOR + WALL_SLACK_S

    @property
    def output_bytes(self) -> int:
        return int(self.output_limit_mb * (1 << 20))


def limits_from_extra_info(extra_info: Any) -> JudgeLimits:
    extra_info = extra_info if isinstance(extra_info, dict) else {}
    values = {}
    for key, default, low, high in (("time_limit_s", DEFAULT_TIME_LIMIT_S, 0.05, MAX_TIME_LIMIT_S),
                                    ("memory_limit_mb", DEFAULT_MEMORY_LIMIT_MB, 32, 16384),
                                    ("output_limit_mb", DEFAULT_OUTPUT_LIMIT_MB, 0.001, 256)):
        value = extra_info.get(key, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BadInput(f"extra_info.{key} must be a number, got {value!r}")
        if not low <= value <= high:
            raise BadInput(f"extra_info.{key}={value} is outside [{low}, {high}]")
        values[key] = value
    values["memory_limit_mb"] = int(values["memory_limit_mb"])
    return JudgeLimits(**values)


# ------------------------------------------------------------------ verdicts

@dataclasses.dataclass
class TestVerdict:
    index: int
    passed: bool
    kind: str | None               # None when passed, else one of FAILURE_KINDS
    detail: str = ""
    cpu_s: float = 0.0
    wall_s: float = 0.0


@dataclasses.dataclass
class JudgeResult:
    total: int
    verdicts: list[TestVerdict]
    failure: str | None = None     # kind of the first failure
    detail: str = ""

    @property
    def passed(self) -> int:
        return sum(v.passed for v in self.verdicts)

    @property
    def score(self) -> float:
        return 1.0 if self.failure is None and self.passed == self.total else 0.0

    def as_reward(self) -> dict:
        out = {"score": self.score, "passed": self.passed, "total": self.total}
        if self.score == 0.0:
            out["failure"] = self.failure or "wrong_answer"
            if self.detail:
                out["failure_detail"] = self.detail[:300]
        return out


def verdict_from_record(problem: Problem, limits: JudgeLimits, record: dict, stdout: bytes) -> TestVerdict:
    """Decide one test on the host from what the harness saw (the sandbox never sees expected outputs)."""
    i = record["i"]
    cpu, wall = float(record.get("cpu_s", 0.0)), float(record.get("wall_s", 0.0))
    report = record.get("report") if isinstance(record.get("report"), dict) else {}
    kind = report.get("kind")
    sig = record.get("signal")

    def fail(failure: str, detail: str) -> TestVerdict:
        return TestVerdict(i, False, failure, f"test {i}: {detail}", cpu, wall)

    if record.get("status") == "timeout" or sig == signal.SIGXCPU or cpu > limits.time_limit_s:
        return fail("time_limit", f"over {limits.time_limit_s:g} s (cpu {cpu:.2f} s, wall {wall:.2f} s)")
    if record.get("status") == "output_limit":
        return fail("output_limit", f"printed more than {limits.output_limit_mb:g} MB")
    if kind == "compile_error":
        return fail("compile_error", str(report.get("detail", ""))[:300])
    if kind == "memory_limit" or (sig == signal.SIGABRT and "bad_alloc" in str(record.get("stderr", ""))):
        return fail("memory_limit", f"MemoryError under a {limits.memory_limit_mb} MB limit")
    if kind == "harness_error":
        return fail("sandbox_error", str(report.get("detail", ""))[:300])
    stderr_tail = str(record.get("stderr", ""))[-200:]
    if problem.mode == "call":
        if kind == "returned":
            try:
                value = json.loads(report["value"])
            except (ValueError, RecursionError, TypeError, KeyError):
                return fail("wrong_answer", "returned value could not be read back as JSON")
            if json_equal(value, problem.outputs[i]):
                return TestVerdict(i, True, None, "", cpu, wall)
            return fail("wrong_answer", f"returned {report['value'][:80]}")
        if kind == "bad_return":
            return fail("wrong_answer", f"returned a {report.get('detail')}, which is not a JSON value")
        if kind == "exited":
            return fail("runtime_error", f"exited (code {report.get('code')}) before returning a value")
        if kind in ("runtime_error", "no_function"):
            return fail("runtime_error", str(report.get("detail", ""))[:300])
        if sig is not None:
            return fail("runtime_error", f"killed by signal {sig}")
        return fail("runtime_error", f"exited (code {record.get('exit_code')}) before returning a value")
    if kind == "runtime_error" or sig is not None or record.get("exit_code") != 0:
        what = report.get("detail") or (f"killed by signal {sig}" if sig is not None
                                         else f"exit code {record.get('exit_code')}: {stderr_tail}")
        return fail("runtime_error", what.strip())
    actual = stdout.decode("utf-8", errors="replace")
    if stdout_matches(actual, problem.outputs[i]):
        return TestVerdict(i, True, None, "", cpu, wall)
    return fail("wrong_answer", f"printed {actual[:80]!r}, expected {problem.outputs[i][:80]!r}")


class _FrameReader:
    """Parses the harness's channel: a JSON header line, then `stdout_len` raw bytes of test stdout."""

    def __init__(self):
        self.buffer = bytearray()
        self.header: dict | None = None

    def feed(self, data: bytes) -> list[tuple[dict, bytes]]:
        self.buffer += data
        frames = []
        while True:
            if self.header is None:
                newline = self.buffer.find(b"\n")
                if newline < 0:
                    return frames
                line = bytes(self.buffer[:newline])
                del self.buffer[:newline + 1]
                try:
                    self.header = json.loads(line)
                except ValueError:
                    self.header = {"garbled": line[:200].decode(errors="replace")}
                if not isinstance(self.header, dict):
                    self.header = {"garbled": repr(self.header)[:200]}
            need = int(self.header.get("stdout_len", 0) or 0)
            if len(self.buffer) < need:
                return frames
            frames.append((self.header, bytes(self.buffer[:need])))
            del self.buffer[:need]
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
    reader = _FrameReader()
    verdicts: list[TestVerdict] = []
    state = {"done": False, "compile": None}

    def on_stdout(chunk: bytes) -> bool:
        for header, stdout in reader.feed(chunk):
            if "garbled" in header or header.get("event") == "done":
                state["done"] = state["done"] or header.get("event") == "done"
                continue
            if header.get("event") == "compile":
                state["compile"] = header
                continue
            if header.get("i") not in indices:
                continue
            verdict = verdict_from_record(problem, limits, header, stdout)
            verdicts.append(verdict)
            if fail_fast and not verdict.passed:
                return False  # decided: stop the sandbox now
        return True

    compile_budget = CPP_COMPILE_TIME_S if language == "cpp" else 0.0
    sandbox_limits = SandboxLimits(
        wall_s=10.0 + compile_budget + len(indices) * (limits.test_wall_s + 0.5),
        stdout_bytes=len(indices) * (limits.output_bytes + 8192) + (1 << 16),
        stderr_bytes=1 << 16, tmpfs_mb=max(64, 2 * limits.file_size_mb))
    result = sandbox.run([sys.executable, "-I", "-S", "-c", _HARNESS],
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
    why = ("timed out" if result.timed_out else "overflowed its channel" if result.output_limited
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


# ------------------------------------------------------------------ the harness (runs inside the sandbox)
# Trusted, stdlib-only; started as `python -I -S -c _HARNESS` with the payload on stdin. It keeps
# CAP_SETUID/SETGID/KILL and is non-dumpable, so test processes (another uid, no capabilities) can
# neither signal it nor open its file descriptors. Channel to the host: its stdout, as frames of a JSON
# header line followed by `stdout_len` raw bytes.
_HARNESS = r'''
import builtins, io, json, os, resource, select, signal, sys, time, traceback, types

PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS = 4, 38
try:
    import ctypes
    _prctl = ctypes.CDLL(None, use_errno=True).prctl
except Exception:
    _prctl = None

def emit(header, raw=b""):
    header["stdout_len"] = len(raw)
    data = json.dumps(header).encode() + b"\n" + raw
    view = memoryview(data)
    while view:
        view = view[os.write(1, view):]

def main():
    cfg = json.loads(sys.stdin.buffer.read())
    if _prctl is not None:
        _prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    uid = int(os.environ.get("POSTTRAIN_SANDBOX_UID", "-1"))
    can_drop = os.getuid() == 0 and uid > 0
    # kill(-1) ends every process we may signal: only safe as pid 2 of a PID namespace (bwrap is 1).
    in_pidns = os.environ.get("POSTTRAIN_SANDBOX_PIDNS") == "1" and os.getpid() == 2
    work = os.environ.get("POSTTRAIN_SANDBOX_WORK_DIR", "/sandbox")
    lang = cfg["language"]

    def limits(cpu_s, mem_mb, fsize_mb, nproc):
        cpu = int(cpu_s) + 1
        for res, val in ((resource.RLIMIT_CPU, (cpu, cpu + 1)),
                         (resource.RLIMIT_AS, (mem_mb << 20,) * 2),
                         (resource.RLIMIT_FSIZE, (fsize_mb << 20,) * 2),
                         (resource.RLIMIT_NPROC, (nproc, nproc)),
                         (resource.RLIMIT_NOFILE, (256, 256)),
                         (resource.RLIMIT_CORE, (0, 0))):
            resource.setrlimit(res, val)
        try:
            hard = resource.getrlimit(resource.RLIMIT_STACK)[1]
            want = min(256 << 20, mem_mb << 20)
            resource.setrlimit(resource.RLIMIT_STACK, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))
        except (ValueError, OSError):
            pass

    def kill_others(pid):
        try:
            if in_pidns:
                os.kill(-1, signal.SIGKILL)
            else:
                os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass

    def run_child(target, stdin_bytes, cpu_s, wall_s, mem_mb, out_cap):
        in_fd = os.memfd_create("stdin")
        view = memoryview(stdin_bytes)
        while view:
            view = view[os.write(in_fd, view):]
        os.lseek(in_fd, 0, 0)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        rep_r, rep_w = os.pipe()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            code = 121
            try:
                os.setsid()
                os.dup2(in_fd, 0); os.dup2(out_w, 1); os.dup2(err_w, 2); os.dup2(rep_w, 3)
                os.closerange(4, 1 << 16)
                limits(cpu_s, mem_mb, cfg["file_size_mb"], cfg["nproc"])
                if _prctl is not None:
                    _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
                if can_drop:
                    os.setgroups([])
                    os.setresgid(uid, uid, uid)
                    os.setresuid(uid, uid, uid)
                code = target()
            except BaseException as err:
                try:
                    os.write(3, json.dumps({"kind": "harness_error", "detail": repr(err)[:300]}).encode())
                except BaseException:
                    pass
            os._exit(code)
        for fd in (in_fd, out_w, err_w, rep_w):
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        poller = select.poll()
        bufs = {out_r: [], err_r: [], rep_r: []}
        sizes = dict.fromkeys(bufs, 0)
        for fd in bufs:
            poller.register(fd, select.POLLIN)
        poller.register(pidfd, select.POLLIN)
        open_fds = set(bufs)
        status, exited = "ok", False
        deadline = start + wall_s
        while open_fds or not exited:
            left = deadline - time.monotonic()
            if left <= 0:
                status = "timeout"
                break
            for fd, _ev in poller.poll(left * 1000):
                if fd == pidfd:
                    exited = True
                    poller.unregister(pidfd)
                    kill_others(pid)  # background children would hold the pipes open
                    continue
                data = os.read(fd, 1 << 16)
                if not data:
                    poller.unregister(fd)
                    open_fds.discard(fd)
                    continue
                sizes[fd] += len(data)
                if sizes[fd] > out_cap:
                    status = "output_limit"
                    break
                if fd != err_r or sizes[fd] <= 4096:
                    bufs[fd].append(data)
            if status != "ok":
                break
        wall = time.monotonic() - start
        kill_others(pid)
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        _, wstatus, usage = os.wait4(pid, 0)
        for fd in (out_r, err_r, rep_r, pidfd):
            os.close(fd)
        report = None
        rep = b"".join(bufs[rep_r])
        if rep:
            try:
                report = json.loads(rep)
            except (ValueError, RecursionError):
                report = {"kind": "runtime_error", "detail": "garbled report"}
        rec = {"status": status, "cpu_s": usage.ru_utime + usage.ru_stime, "wall_s": wall,
               "maxrss_kb": usage.ru_maxrss, "report": report,
               "stderr": b"".join(bufs[err_r])[-1000:].decode("utf-8", "replace"),
               "exit_code": os.WEXITSTATUS(wstatus) if os.WIFEXITED(wstatus) else None,
               "signal": os.WTERMSIG(wstatus) if os.WIFSIGNALED(wstatus) else None}
        return rec, b"".join(bufs[out_r])

    def report(obj):
        data = json.dumps(obj).encode()
        view = memoryview(data)
        while view:
            view = view[os.write(3, view):]

    def python_target(test_input):
        def target():
            sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8", errors="replace")
            sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8", errors="replace")
            sys.stderr = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)), encoding="utf-8", errors="backslashreplace", line_buffering=True)
            sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
            sys.argv = ["solution.py"]
            sys.setrecursionlimit(100000)
            try:
                code = compile(cfg["source"], "solution.py", "exec")
            except (SyntaxError, ValueError, MemoryError, RecursionError, OverflowError) as err:
                report({"kind": "compile_error", "detail": f"{type(err).__name__}: {err}"[:300]})
                return 1
            module = types.ModuleType("__main__" if cfg["mode"] == "stdin" else "solution")
            module.__builtins__ = builtins
            sys.modules[module.__name__] = module
            exit_code = 0
            try:
                exec(code, module.__dict__)
                if cfg["mode"] == "call":
                    name = cfg["fn_name"]
                    fn = module.__dict__.get(name)
                    if not callable(fn) and isinstance(module.__dict__.get("Solution"), type):
                        fn = getattr(module.__dict__["Solution"](), name, None)
                    if not callable(fn):
                        report({"kind": "no_function", "detail": f"no function or Solution method named {name!r}"})
                        return 1
                    value = fn(*json.loads(test_input))
                    try:
                        text = json.dumps(value, allow_nan=False)
                    except (TypeError, ValueError, RecursionError):
                        report({"kind": "bad_return", "detail": type(value).__name__})
                        return 1
                    report({"kind": "returned", "value": text})
            except SystemExit as err:
                c = err.code
                exit_code = 0 if c is None else c if isinstance(c, int) else 1
                if not isinstance(c, (int, type(None))):
                    print(c, file=sys.stderr)
                if cfg["mode"] == "call":
                    report({"kind": "exited", "code": exit_code})
            except MemoryError:
                report({"kind": "memory_limit"})
                exit_code = 1
            except BaseException as err:
                traceback.print_exc()
                report({"kind": "runtime_error", "detail": f"{type(err).__name__}: {err}"[:300]})
                exit_code = 1
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except BaseException:
                return exit_code or 1
            return exit_code & 0xFF
        return target

    def exec_target(argv):
        def target():
            for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGXCPU):
                signal.signal(sig, signal.SIG_DFL)  # Python ignores some; compiled programs must not
            os.execv(argv[0], argv)
        return target

    tl = float(cfg["time_limit_s"])
    if lang == "cpp":
        src = os.path.join(work, "solution.cpp")
        binary = os.path.join(work, "solution")
        with open(src, "w") as fh:
            fh.write(cfg["source"])
        os.chmod(src, 0o644)
        gxx = "/usr/bin/g++"
        rec, _ = run_child(exec_target([gxx, "-O2", "-std=gnu++17", "-pipe", "-o", binary, src]), b"",
                           cfg["compile_wall_s"], cfg["compile_wall_s"], 2048, 1 << 20)
        ok = rec["status"] == "ok" and rec["exit_code"] == 0 and os.path.exists(binary)
        emit({"event": "compile", "status": "ok" if ok else "error",
              "stderr": rec["stderr"][-1000:] or str(rec["status"])})
        if not ok:
            emit({"event": "done"})
            return
    for i, test_input in cfg["tests"]:
        if lang == "cpp":
            target, stdin = exec_target([binary]), test_input.encode()
        elif cfg["mode"] == "stdin":
            target, stdin = python_target(None), test_input.encode("utf-8", "surrogateescape")
        else:
            target, stdin = python_target(test_input), b""
        rec, out = run_child(target, stdin, tl, cfg["wall_s"], cfg["memory_mb"], cfg["output_bytes"])
        rec["i"] = i
        emit(rec, out)
        rep = rec["report"] or {}
        bad = (rec["status"] != "ok" or rec["signal"] is not None or rec["cpu_s"] > tl
               or rep.get("kind") not in (None, "returned")
               or (cfg["mode"] == "stdin" and rec["exit_code"] != 0))
        if bad and (cfg["fail_fast"] or rep.get("kind") == "compile_error"):
            break
    emit({"event": "done"})

main()
'''
