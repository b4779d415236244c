"""envs.python: one long-lived sandboxed interpreter per trajectory — state without replay, failures contained and
restarted, isolation as in rewards.sandbox, and no process left once the episode is closed."""
from __future__ import annotations

import gc
import http.server
import os
import socket
import sys
import threading
import time
import uuid

import pytest

from envs.python import PythonEnv, PythonSession
from envs.tools import ToolError
from tests.helpers import surviving

SERVER_MARK = "the host closed the pipe: the session is over"   # in the sandboxed interpreter's command line


def left_after(before: set[int], within_s: float = 3.0) -> set[int]:
    deadline = time.monotonic() + within_s
    while (left := set(surviving(SERVER_MARK)) - before) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture
def session():
    s = PythonSession(timeout_s=1.5)
    yield s
    s.close()


@pytest.mark.integration
def test_state_persists_without_rerunning_earlier_cells(session):
    assert session.run("print('hello')\nimport os, time\ntoken = os.urandom(8).hex()\ncount = 1") == "hello"
    first = session.run("count += 1\nprint(token)\ncount")
    second = session.run("count += 1\nprint(token)\ncount")
    # A replayed session would draw a new token on every call and print 'hello' again (or hide it and re-run it).
    assert first.splitlines()[1] == "2" and second.splitlines()[1] == "3"
    assert first.splitlines()[0] == second.splitlines()[0] and "hello" not in first + second
    assert session.run("time.sleep(1.0)\nopen('/sandbox/f', 'w').write('kept')") == "4"
    start = time.monotonic()
    assert session.run("open('/sandbox/f').read()") == "'kept'"      # the scratch dir lives as long as the session
    assert time.monotonic() - start < 0.5                              # the 1 s cell was not run again
    assert session.starts == 1


@pytest.mark.integration
@pytest.mark.parametrize("cell, kind, says", [
    ("x = 0\nwhile True: pass", "tool_timeout", "did not finish within 1.5 s"),
    ("import time\nx = 0\ntime.sleep(60)", "tool_timeout", "did not finish within 1.5 s"),
    ("import os, signal\nos.kill(os.getpid(), signal.SIGXCPU)", "tool_timeout", "more than 1.5 s of CPU"),
    ("import os\nx = 0\nos._exit(3)", "tool_crash", "exit status 3"),
    ("import ctypes\nx = 0\nctypes.string_at(0)", "tool_crash", "signal 11"),
    ("x = 0\nprint('a' * 10_000_000)", "tool_output_limit", "printed more than"),
    ("import os\nx = 0\nos.write(2, b'e' * 10_000_000)", "tool_output_limit", "printed more than"),
])
def test_a_failing_cell_is_an_error_and_the_next_call_works_in_a_fresh_interpreter(session, cell, kind, says):
    session.run("x = 42")
    start = time.monotonic()
    with pytest.raises(ToolError) as failure:
        session.run(cell)
    assert failure.value.kind == kind and says in str(failure.value), str(failure.value)
    assert "restarts the interpreter" in str(failure.value)
    assert time.monotonic() - start < 1.5 + 2.0                       # the wall clock, plus killing it
    assert session.run("x") == "42" and session.starts == 2          # state restored, the failed cell dropped
    assert session.run("x + 1") == "43" and session.starts == 2


@pytest.mark.integration
def test_without_restore_the_state_is_lost_and_the_model_is_told():
    session = PythonSession(timeout_s=1.5, restore_after_restart=False)
    try:
        session.run("x = 42")
        with pytest.raises(ToolError, match="state is lost"):
            session.run("import os; os._exit(1)")
        assert session.run("x").endswith("NameError: name 'x' is not defined")
    finally:
        session.close()


@pytest.mark.integration
def test_a_restore_that_fails_starts_empty_and_says_so():
    # Each cell alone fits the 1 s wall clock; re-running both does not.
    session = PythonSession(timeout_s=1.0)
    try:
        session.run("import time\ntime.sleep(0.6)\nx = 1")
        session.run("time.sleep(0.6)\ny = 2")
        with pytest.raises(ToolError):
            session.run("import os; os._exit(1)")
        out = session.run("print('z' in dir())\n'x' in dir()")
        assert out.startswith("(the session's earlier state could not be restored") and out.endswith("False\nFalse")
        assert session.run("x = 5\nx") == "5"
    finally:
        session.close()


@pytest.mark.integration
def test_the_interpreter_is_cut_off_from_network_and_host_files(session, tmp_path):
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    port = server.server_address[1]
    try:
        out = session.run("import socket\n"
                          f"for host in [('127.0.0.1', {port}), ('1.1.1.1', 80), ('8.8.8.8', 53)]:\n"
                          "    try:\n"
                          "        socket.create_connection(host, timeout=1).close(); print('CONNECTED', host)\n"
                          "    except OSError as err: print('blocked', err.errno)\n")
        with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:   # reachable from the host
            conn.sendall(b"GET /from-host HTTP/1.0\r\n\r\n")
            conn.recv(100)
    finally:
        server.shutdown()
        server.server_close()
    assert "CONNECTED" not in out and out.count("blocked") == 3 and hits == ["/from-host"]

    host_target, marker = tmp_path / "written_by_session", f"posttrain-py-{uuid.uuid4().hex}"
    out = session.run(
        "import os\n"
        f"for path in ['/etc/{marker}', '/usr/{marker}', {str(host_target)!r}, {os.path.abspath(__file__)!r},"
        f" '{sys.prefix}/{marker}']:\n"
        "    try:\n"
        "        open(path, 'a').write('x'); print('WROTE', path)\n"
        "    except OSError as err: print('denied', err.errno)\n"
        f"open('/tmp/{marker}', 'w').write('private'); open('/sandbox/{marker}', 'w').write('private')\n"
        "print(os.path.exists('/work/main/rewards'), os.getuid())\n")
    assert "WROTE" not in out and out.count("denied") == 5 and "False" in out.splitlines()[-1]
    assert out.splitlines()[-1].split()[1] != "0"                     # not root inside
    assert not host_target.exists() and not os.path.exists(f"/tmp/{marker}")


@pytest.mark.integration
def test_no_interpreter_outlives_its_episode():
    before = set(surviving(SERVER_MARK))
    env = PythonEnv({"prompt": [{"role": "user", "content": "6*7?"}], "reward_model": {"ground_truth": "42"}},
                    timeout_s=2)
    result = env.step('<tool_call>{"name": "python", "arguments": {"code": "import threading, time\\n'
                      'threading.Thread(target=time.sleep, args=(600,)).start()\\n6 * 7"}}</tool_call>')
    assert result.messages == [{"role": "tool", "content": "42"}] and not result.info["errors"]
    assert len(left_after(before, within_s=0)) >= 1                   # the interpreter is alive between calls
    env.close()
    assert left_after(before) == set()
    with pytest.raises(ToolError, match="closed"):
        env.session.run("1")                                           # nothing restarts after close

    dropped = PythonSession(timeout_s=2)                               # never closed: collected instead
    dropped.run("1")
    del dropped
    gc.collect()
    assert left_after(before) == set()

    busy = PythonSession(timeout_s=30)                                 # closed while a cell runs
    busy.run("1")
    errors = []
    worker = threading.Thread(target=lambda: errors.append(pytest.raises(ToolError, busy.run, "while True: pass")))
    worker.start()
    time.sleep(0.3)
    start = time.monotonic()
    busy.close()
    worker.join(timeout=5)
    assert not worker.is_alive() and time.monotonic() - start < 5 and errors[0].value.kind == "tool_crash"
    assert left_after(before) == set()


@pytest.mark.integration
def test_prestart_starts_the_interpreter_when_the_episode_begins():
    before = set(surviving(SERVER_MARK))
    env = PythonEnv({"prompt": [{"role": "user", "content": "6*7?"}], "reward_model": {"ground_truth": "42"}},
                    prestart=True)
    env.initial_observation()
    deadline = time.monotonic() + 10
    while env.session.process is None and time.monotonic() < deadline:
        time.sleep(0.02)
    assert env.session.starts == 1 and len(left_after(before, within_s=0)) >= 1    # running before any call
    assert env.session.run("6 * 7") == "42" and env.session.starts == 1
    env.close()
    assert left_after(before) == set()
    lazy = PythonEnv({"prompt": [{"role": "user", "content": "6*7?"}]})
    lazy.initial_observation()
    time.sleep(0.2)
    assert lazy.session.starts == 0 and lazy.session.process is None                 # the default: at the first call
    lazy.close()
