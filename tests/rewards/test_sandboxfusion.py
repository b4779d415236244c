"""The SandboxFusion client, against a small local server of our own that speaks the same /run_code API.

No real SandboxFusion server can run here, so `FakeSandboxFusion` implements the endpoint: it runs the
posted Python program in our own bubblewrap sandbox (so results are real executions) and answers in
SandboxFusion's response format. Knobs let it fail, stall or count concurrent requests, to test the
client's retries, timeouts and concurrency cap. It listens on 127.0.0.1 only.
"""
from __future__ import annotations

import http.server
import json
import sys
import threading
import time

import pytest

from rewards.code import compute_score, compute_score_batch
from rewards.sandbox import SandboxLimits, default_sandbox


class FakeSandboxFusion(http.server.ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self):
        super().__init__(("127.0.0.1", 0), _Handler)
        self.fail_next: list[int] = []   # HTTP codes (or 0 for a "SandboxError" answer) to give first
        self.delay_s = 0.0
        self.requests = 0
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()

    def handle_error(self, request, client_address):
        # The timeout test hangs up on a stalled request; the late answer then hits a closed socket.
        if not isinstance(sys.exc_info()[1], (BrokenPipeError, ConnectionResetError)):
            super().handle_error(request, client_address)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}"


class _Handler(http.server.BaseHTTPRequestHandler):
    server: FakeSandboxFusion

    def log_message(self, *args):
        pass

    def _answer(self, code: int, body: dict | str) -> None:
        data = (json.dumps(body) if isinstance(body, dict) else body).encode()
        self.send_response(code)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def do_POST(self):  # noqa: N802 - http.server API
        srv = self.server
        with srv.lock:
            srv.requests += 1
            srv.in_flight += 1
            srv.max_in_flight = max(srv.max_in_flight, srv.in_flight)
            failure = srv.fail_next.pop(0) if srv.fail_next else None
        try:
            code, body = self._handle(failure)
        finally:
            with srv.lock:  # before answering: the client may send its next request as soon as it reads
                srv.in_flight -= 1
        self._answer(code, body)

    def _handle(self, failure):
        srv = self.server
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        if srv.delay_s:
            time.sleep(srv.delay_s)
        if self.path != "/run_code":
            return 404, {"detail": "Not Found"}
        if failure == 0:
            return 200, {"status": "SandboxError", "message": "executor pod restarting"}
        if failure:
            return failure, "upstream trouble"
        if request.get("language") != "python":
            return 200, {"status": "SandboxError", "message": "fake server runs python only"}
        run_timeout = float(request.get("run_timeout", 10))
        limits = SandboxLimits(wall_s=run_timeout, cpu_s=run_timeout,
                               memory_mb=int(request.get("memory_limit_MB", 512)))
        result = default_sandbox().run([sys.executable, "-I", "-S", "main.py"],
                                       stdin=request.get("stdin", "").encode(),
                                       files={"main.py": request["code"].encode()}, limits=limits)
        status = "TimeLimitExceeded" if result.timed_out else "Finished" if result.exit_code == 0 else "Error"
        return 200, {
            "status": "Success" if status == "Finished" else "Failed", "message": "",
            "compile_result": None,
            "run_result": {"status": status, "execution_time": result.wall_s,
                           "return_code": result.exit_code if result.exit_code is not None else -1,
                           "stdout": result.stdout.decode(errors="replace"),
                           "stderr": result.stderr.decode(errors="replace")},
            "executor_pod_name": None, "files": {}}


@pytest.fixture()
def server():
    srv = FakeSandboxFusion()
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def fenced(src: str) -> str:
    return f"```python\n{src}\n```"


ADD_STDIN = {"inputs": ["1 2\n", "3 4\n"], "outputs": ["3\n", "7\n"]}
ADD_CALL = {"fn_name": "add", "inputs": [[1, 2], [3, 4]], "outputs": [3, 7]}
GOOD_STDIN = fenced("a, b = map(int, input().split())\nprint(a + b)")
FAST = {"time_limit_s": 0.5}


def remote(server, solution, tests, extra=FAST, **kwargs):
    kwargs.setdefault("backoff_s", 0.01)
    return compute_score("code", solution, tests, extra, backend="sandboxfusion", sandbox_url=server.url, **kwargs)


@pytest.mark.integration
@pytest.mark.parametrize("solution, tests, expected", [
    (GOOD_STDIN, ADD_STDIN, (1.0, None)),
    (fenced("print(0)"), ADD_STDIN, (0.0, "wrong_answer")),
    (fenced("def add(a, b):\n    print('debug output is ignored')\n    return a + b"), ADD_CALL, (1.0, None)),
    (fenced("class Solution:\n    def add(self, a, b):\n        return a + b"), ADD_CALL, (1.0, None)),
    (fenced("def add(a, b):\n    return a * b"), ADD_CALL, (0.0, "wrong_answer")),
    (fenced("class A:\n    def __eq__(self, o):\n        return True\ndef add(a, b):\n    return A()"),
     ADD_CALL, (0.0, "wrong_answer")),
    (fenced("import sys\nsys.exit(0)\ndef add(a, b):\n    return a + b"), ADD_CALL, (0.0, "runtime_error")),
    (fenced("import os\ndef add(a, b):\n    os._exit(0)"), ADD_CALL, (0.0, "runtime_error")),
    (fenced("import sys\nsys.exit(0)"), ADD_STDIN, (0.0, "wrong_answer")),
    (fenced("def f(:\n    pass"), ADD_STDIN, (0.0, "compile_error")),
    (fenced("x = bytearray(8 << 30)"), ADD_STDIN, (0.0, "memory_limit")),
    (fenced("while True:\n    pass"), ADD_STDIN, (0.0, "time_limit")),
], ids=["stdin-correct", "stdin-wrong", "call-correct", "call-solution-class", "call-wrong", "lying-eq",
        "exit-at-import", "os-exit", "stdin-exit", "syntax", "memory", "loop"])
def test_remote_verdicts_match_local_rules(server, solution, tests, expected):
    result = remote(server, solution, tests)
    assert (result["score"], result.get("failure")) == expected, result


@pytest.mark.integration
def test_expected_outputs_never_reach_the_server(server, monkeypatch):
    seen = []
    from rewards import sandboxfusion
    real = sandboxfusion.run_code

    def spy(url, payload, **kwargs):
        seen.append(json.dumps(payload))
        return real(url, payload, **kwargs)

    monkeypatch.setattr(sandboxfusion, "run_code", spy)
    tests = {"fn_name": "add", "inputs": [[20, 3]], "outputs": [918273645]}
    remote(server, fenced("def add(a, b):\n    return a + b"), tests)
    assert seen and not any("918273645" in body for body in seen)


@pytest.mark.integration
def test_transient_failures_are_retried(server):
    server.fail_next = [503, 0, 502]  # HTTP 503, a SandboxError answer, HTTP 502
    result = remote(server, GOOD_STDIN, ADD_STDIN, retries=3)
    assert result["score"] == 1.0 and server.requests == 5  # 3 failures + 2 tests


@pytest.mark.integration
def test_retries_exhausted_is_a_zero_not_a_crash(server):
    server.fail_next = [500] * 10
    result = remote(server, GOOD_STDIN, ADD_STDIN, retries=2)
    assert result["score"] == 0.0 and result["failure"] == "sandbox_error"
    assert "after 3 attempts" in result["failure_detail"] and server.requests == 3


@pytest.mark.integration
def test_client_errors_are_not_retried(server):
    server.fail_next = [400]
    result = remote(server, GOOD_STDIN, ADD_STDIN, retries=3)
    assert result["failure"] == "sandbox_error" and "HTTP 400" in result["failure_detail"]
    assert server.requests == 1


@pytest.mark.integration
def test_request_timeout_bounds_a_stalled_server(server):
    server.delay_s = 3.0
    start = time.monotonic()
    result = remote(server, GOOD_STDIN, ADD_STDIN, retries=1, request_timeout_s=0.3)
    assert result["failure"] == "sandbox_error" and "Timeout" in result["failure_detail"]
    assert time.monotonic() - start < 2.5


@pytest.mark.integration
def test_unreachable_server_is_a_zero():
    start = time.monotonic()
    result = compute_score("code", GOOD_STDIN, ADD_STDIN, FAST, backend="sandboxfusion",
                           sandbox_url="http://127.0.0.1:9", retries=1, backoff_s=0.01)
    assert result["failure"] == "sandbox_error" and time.monotonic() - start < 5


@pytest.mark.integration
def test_concurrency_cap_holds_across_a_batch(server):
    server.delay_s = 0.1
    n = 8
    results = compute_score_batch(["code"] * n, [GOOD_STDIN] * n, [ADD_STDIN] * n, [FAST] * n, max_workers=8,
                                  backend="sandboxfusion", sandbox_url=server.url, max_concurrency=2)
    assert all(r["score"] == 1.0 for r in results)
    assert server.max_in_flight == 2 and server.requests == 2 * n


@pytest.mark.unit
def test_missing_url_is_a_clear_error():
    with pytest.raises(ValueError, match="sandbox_url"):
        compute_score("code", GOOD_STDIN, ADD_STDIN, backend="sandboxfusion")
    with pytest.raises(ValueError, match="backend must be"):
        compute_score("code", GOOD_STDIN, ADD_STDIN, backend="docker")
