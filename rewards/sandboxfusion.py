"""Remote judging on a SandboxFusion server (bytedance/SandboxFusion), for clusters where untrusted
code runs on dedicated machines. Selected with `compute_score(..., backend="sandboxfusion",
sandbox_url="http://HOST:8080")` or, in a recipe, the `code` reward's kwargs.

Each test is one `POST {sandbox_url}/run_code` request:
    {"code", "language", "stdin", "run_timeout", "compile_timeout", "memory_limit_MB", "files": {}}
answered by {"status": "Success"|"Failed"|"SandboxError", "compile_result", "run_result": {"status":
"Finished"|"Error"|"TimeLimitExceeded", "return_code", "stdout", "stderr", "execution_time"}}.

As with the local judge, expected outputs never leave this process: the server only runs the program,
and the verdict is decided here with the same comparison rules (rewards._code_common). Function-call tests
send a small wrapper that prints the JSON of the returned value after a per-request random marker.

Client behaviour: at most `max_concurrency` requests in flight per server from this process (shared by
all threads, e.g. compute_score_batch); each request has a timeout (default: the test's wall limit +
compile time + 10 s); transport errors, HTTP 429/5xx and "SandboxError" answers are retried
`retries` times with exponential backoff; anything still failing becomes a zero with failure
"sandbox_error" — it never raises into the training loop and never hangs it.

No SandboxFusion server can run on the machine this was built on; tests/rewards/test_sandboxfusion.py tests
the client against a small local HTTP server of its own that speaks the same /run_code API.
"""
from __future__ import annotations

import json
import secrets
import threading
import time
from typing import Any

import httpx

from rewards._code_common import (CPP_COMPILE_TIME_S, JudgeLimits, JudgeResult, Problem, TestVerdict,
                                  json_equal, stdout_matches)

_LANGUAGES = {"python": "python", "cpp": "cpp"}
_semaphores: dict[tuple[str, int], threading.BoundedSemaphore] = {}
_clients: dict[str, httpx.Client] = {}
_registry_lock = threading.Lock()


class SandboxFusionError(RuntimeError):
    """The server could not run the program (after retries); the judgement becomes sandbox_error."""


def _shared(url: str, max_concurrency: int) -> tuple[httpx.Client, threading.BoundedSemaphore]:
    with _registry_lock:
        sem = _semaphores.setdefault((url, max_concurrency), threading.BoundedSemaphore(max_concurrency))
        client = _clients.get(url)
        if client is None:
            client = _clients[url] = httpx.Client(limits=httpx.Limits(max_connections=64))
        return client, sem


def run_code(url: str, payload: dict, *, max_concurrency: int = 8, retries: int = 3, backoff_s: float = 0.5,
             request_timeout_s: float = 30.0) -> dict:
    """POST one /run_code request with the concurrency cap, timeout and retries; returns the answer."""
    if max_concurrency < 1 or retries < 0 or request_timeout_s <= 0:
        raise ValueError("sandboxfusion: max_concurrency >= 1, retries >= 0 and request_timeout_s > 0 required")
    endpoint = url.rstrip("/") + "/run_code"
    client, sem = _shared(url.rstrip("/"), max_concurrency)
    last_error = "no attempt made"
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff_s * 2 ** (attempt - 1))
        with sem:
            try:
                response = client.post(endpoint, json=payload, timeout=request_timeout_s)
            except httpx.HTTPError as err:
                last_error = f"{type(err).__name__}: {err}"
                continue
        if response.status_code == 429 or response.status_code >= 500:
            last_error = f"HTTP {response.status_code}: {response.text[:200]}"
            continue
        if response.status_code != 200:  # a request the server rejects will not improve by retrying
            raise SandboxFusionError(f"{endpoint} answered HTTP {response.status_code}: {response.text[:200]}")
        try:
            answer = response.json()
        except ValueError:
            last_error = f"non-JSON answer: {response.text[:200]!r}"
            continue
        if not isinstance(answer, dict):
            last_error = f"unexpected answer {str(answer)[:200]!r}"
            continue
        if answer.get("status") == "SandboxError":
            last_error = f"SandboxError: {str(answer.get('message', ''))[:200]}"
            continue
        return answer
    raise SandboxFusionError(f"{endpoint} failed after {retries + 1} attempts; last: {last_error}")


def _call_wrapper(source: str, fn_name: str, args_text: str, marker: str) -> str:
    # The marker only frames the value in stdout; forging it gains nothing, since the value must still
    # equal the expected output, which the server never sees.
    return (
        "import json as _json, sys as _sys\n"
        f"_ns = {{'__name__': 'solution'}}\n"
        f"exec(compile({source!r}, 'solution.py', 'exec'), _ns)\n"
        f"_fn = _ns.get({fn_name!r})\n"
        "if not callable(_fn) and isinstance(_ns.get('Solution'), type):\n"
        f"    _fn = getattr(_ns['Solution'](), {fn_name!r}, None)\n"
        "if not callable(_fn):\n"
        f"    raise SystemExit('no function or Solution method named {fn_name}')\n"
        f"_value = _fn(*_json.loads({args_text!r}))\n"
        "try:\n"
        "    _text = _json.dumps(_value, allow_nan=False)\n"
        "except (TypeError, ValueError):\n"
        "    _text = None\n"
        "_sys.stdout.flush()\n"
        f"_sys.stdout.write('\\n' + {marker!r} + ('BAD_RETURN ' + type(_value).__name__ if _text is None else _text) + '\\n')\n"
        "_sys.stdout.flush()\n")


def _verdict(i: int, problem: Problem, limits: JudgeLimits, answer: dict, marker: str | None) -> TestVerdict:
    def fail(kind: str, detail: str) -> TestVerdict:
        return TestVerdict(i, False, kind, f"test {i}: {detail}")

    compile_result = answer.get("compile_result") or {}
    if compile_result and (compile_result.get("status") != "Finished" or compile_result.get("return_code")):
        return fail("compile_error", str(compile_result.get("stderr", ""))[:300])
    run = answer.get("run_result") or {}
    if not isinstance(run, dict) or not run:
        return fail("sandbox_error", f"answer without run_result: {str(answer)[:200]}")
    stdout, stderr = str(run.get("stdout") or ""), str(run.get("stderr") or "")
    wall = float(run.get("execution_time") or 0.0)
    if run.get("status") == "TimeLimitExceeded":
        return fail("time_limit", f"over {limits.time_limit_s:g} s on the server")
    if len(stdout.encode()) > limits.output_bytes or len(stderr.encode()) > limits.output_bytes:
        return fail("output_limit", f"printed more than {limits.output_limit_mb:g} MB")
    if run.get("return_code") and "SyntaxError" in stderr:
        return fail("compile_error", stderr.strip().splitlines()[-1][:300])
    if "MemoryError" in stderr or "bad_alloc" in stderr:
        return fail("memory_limit", f"out of memory under {limits.memory_limit_mb} MB")
    if problem.mode == "call":
        lines = [line for line in stdout.split("\n") if marker and line.startswith(marker)]
        if run.get("return_code") or not lines:
            tail = stderr.strip().splitlines()[-1:] or [f"exit code {run.get('return_code')}"]
            return fail("runtime_error", f"no value returned ({tail[0][:200]})")
        text = lines[-1][len(marker):]
        if text.startswith("BAD_RETURN "):
            return fail("wrong_answer", f"returned a {text[11:]}, which is not a JSON value")
        try:
            value = json.loads(text)
        except (ValueError, RecursionError):
            return fail("wrong_answer", "returned value could not be read back as JSON")
        if json_equal(value, problem.outputs[i]):
            return TestVerdict(i, True, None, "", 0.0, wall)
        return fail("wrong_answer", f"returned {text[:80]}")
    if run.get("return_code") or run.get("status") != "Finished":
        tail = stderr.strip().splitlines()[-1:] or [f"exit code {run.get('return_code')}"]
        return fail("runtime_error", tail[0][:300])
    if stdout_matches(stdout, problem.outputs[i]):
        return TestVerdict(i, True, None, "", 0.0, wall)
    return fail("wrong_answer", f"printed {stdout[:80]!r}, expected {problem.outputs[i][:80]!r}")


def judge_remote(source: str, problem: Problem, limits: JudgeLimits, *, language: str, url: str,
                 fail_fast: bool = True, max_concurrency: int = 8, retries: int = 3, backoff_s: float = 0.5,
                 request_timeout_s: float | None = None) -> JudgeResult:
    """Judge `source` on a SandboxFusion server, one /run_code request per test; decide verdicts here."""
    if language not in _LANGUAGES:
        return JudgeResult(len(problem.inputs), [], "bad_input", f"language {language!r} is not supported")
    if language != "python" and problem.mode == "call":
        return JudgeResult(len(problem.inputs), [], "bad_input", "function-call tests are Python-only")
    compile_timeout = CPP_COMPILE_TIME_S if language == "cpp" else 10.0
    timeout = request_timeout_s or (limits.test_wall_s + 1.0 + compile_timeout + 10.0)
    verdicts: list[TestVerdict] = []
    for i, test_input in enumerate(problem.inputs):
        marker = None
        if problem.mode == "call":
            marker = f"@@posttrain-return-{secrets.token_hex(12)}@@"
            code, stdin = _call_wrapper(source, problem.fn_name, test_input, marker), ""
        else:
            code, stdin = source, test_input
        payload: dict[str, Any] = {"code": code, "language": _LANGUAGES[language], "stdin": stdin,
                                   # the server's clock also covers interpreter start-up: 1 s of slack
                                   "run_timeout": limits.test_wall_s + 1.0, "compile_timeout": compile_timeout,
                                   "memory_limit_MB": limits.memory_limit_mb, "files": {}}
        try:
            answer = run_code(url, payload, max_concurrency=max_concurrency, retries=retries,
                              backoff_s=backoff_s, request_timeout_s=timeout)
        except SandboxFusionError as err:
            return JudgeResult(len(problem.inputs), verdicts, "sandbox_error", str(err))
        verdict = _verdict(i, problem, limits, answer, marker)
        verdicts.append(verdict)
        if not verdict.passed and (fail_fast or verdict.kind == "compile_error"):
            return JudgeResult(len(problem.inputs), verdicts, verdict.kind, verdict.detail)
    first = next((v for v in verdicts if not v.passed), None)
    return JudgeResult(len(problem.inputs), verdicts, first.kind if first else None,
                       first.detail if first else "")
