"""The judge reward against a scripted OpenAI-compatible server of our own on 127.0.0.1.

The server answers /v1/chat/completions with whatever the test's script says (verdict text, HTTP status,
delay, headers), and records every request with its arrival time and the number in flight, so that tests
can assert parsing, normalisation, timeouts, retries, pairwise order swapping, caching and limits.
"""
from __future__ import annotations

import asyncio
import json
import os
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from rewards import judge
from rewards.base import bind_reward, call_reward

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


class ScriptedJudge:
    """A chat-completions server whose reply to each request is decided by `script(request_body, n)`, which
    returns a dict with any of: verdict (str), status (int), delay (s), headers (dict), raw (bytes body)."""

    def __init__(self):
        self.script = lambda body, n: {"verdict": "Rating: [[7]]"}
        self.requests: list[dict] = []
        self.arrivals: list[float] = []
        self.headers_seen: list[dict] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.lock = threading.Lock()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                if self.path == "/v1/models":
                    self._send(200, json.dumps({"object": "list", "data": [{"id": "scripted-judge"}]}).encode())
                else:
                    self._send(404, b"{}")

            def do_POST(self):
                length = int(self.headers.get("content-length", 0))
                body = json.loads(self.rfile.read(length))
                with outer.lock:
                    n = len(outer.requests)
                    outer.requests.append(body)
                    outer.arrivals.append(time.monotonic())
                    outer.headers_seen.append(dict(self.headers))
                    outer.in_flight += 1
                    outer.max_in_flight = max(outer.max_in_flight, outer.in_flight)
                try:
                    plan = outer.script(body, n)
                    time.sleep(plan.get("delay", 0.0))
                    if "raw" in plan:
                        self._send(plan.get("status", 200), plan["raw"], plan.get("headers"))
                        return
                    status = plan.get("status", 200)
                    if status != 200:
                        self._send(status, b'{"error": "scripted"}', plan.get("headers"))
                        return
                    reply = {"id": f"c{n}", "object": "chat.completion", "model": body["model"],
                             "choices": [{"index": 0, "finish_reason": "stop",
                                          "message": {"role": "assistant", "content": plan["verdict"]}}],
                             "usage": {"prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}}
                    self._send(200, json.dumps(reply).encode(), plan.get("headers"))
                finally:
                    with outer.lock:
                        outer.in_flight -= 1

            def _send(self, status, payload, headers=None):
                try:
                    self.send_response(status)
                    self.send_header("content-type", "application/json")
                    self.send_header("content-length", str(len(payload)))
                    for k, v in (headers or {}).items():
                        self.send_header(k, v)
                    self.end_headers()
                    self.wfile.write(payload)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (timeout tests)
                    pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"

    def user_texts(self) -> list[str]:
        return [r["messages"][-1]["content"] for r in self.requests]

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    s = ScriptedJudge()
    yield s
    s.close()


@pytest.fixture
def kw(server, tmp_path):
    """Judge kwargs pointing at the scripted server with a private cache and fast back-off."""
    return dict(base_url=server.base_url, model="scripted-judge", cache_dir=str(tmp_path / "cache"),
                backoff_s=0.01, max_backoff_s=0.05, timeout_s=5.0)


@pytest.fixture(autouse=True)
def fresh_runtime():
    # Each test gets its own limiter/breaker/counter state (they are per process by design).
    judge.close_judge_runtime()
    yield
    judge.close_judge_runtime()


# ------------------------------------------------------------------------------------------------ parsing

@pytest.mark.unit
@pytest.mark.parametrize("verdict, expected", [
    ("The answer is fine. Rating: [[7]]", 0.7),
    ("Rating: [[ 10 ]]", 1.0),
    ("Rating: [[1]]", 0.1),
    ("Rating: [[8.5]]", 0.85),
    ("[[7]] and again [[7]]", 0.7),
    ("<think>maybe [[2]]</think>Final: [[9]]", 0.9),
    ("Rating: [[0]]", None),          # out of range
    ("Rating: [[11]]", None),
    ("Rating: [8]", None),            # single brackets could be a citation
    ("first [[3]], no wait [[9]]", None),  # two different ratings: ambiguous, never the higher one
    ("<think>cut off by max_tokens [[9]]", None),
    ("no rating at all", None),
    ("", None),
])
def test_parse_rating(verdict, expected):
    assert judge.parse_rating(verdict) == expected


@pytest.mark.unit
@pytest.mark.parametrize("verdict, expected", [
    ("A is better. [[A]]", 1.0), ("[[B]]", 0.0), ("[[C]]", 0.5), ("[[tie]]", 0.5), ("[[ a ]]", 1.0),
    ("[[A]] hmm [[B]]", None), ("Assistant A", None), ("[A]", None),
])
def test_parse_preference(verdict, expected):
    assert judge.parse_preference(verdict) == expected


@pytest.mark.unit
def test_render_fills_placeholders_once_and_leaves_other_braces():
    out = judge.render('Q: {question}\nA: {completion}\nJSON: {"k": 1} {unknown}',
                       question="what is {completion}?", completion="x = {1, 2}")
    assert out == 'Q: what is {completion}?\nA: x = {1, 2}\nJSON: {"k": 1} {unknown}'


@pytest.mark.unit
def test_config_errors_name_the_argument():
    with pytest.raises(judge.JudgeConfigError, match="mode"):
        judge.make_config(mode="listwise")
    with pytest.raises(judge.JudgeConfigError, match="completion"):
        judge.make_config(template="Rate {question}")
    with pytest.raises(judge.JudgeConfigError, match="answer_a"):
        judge.make_config(mode="pairwise", template="{question} {completion}")
    with pytest.raises(judge.JudgeConfigError, match="timeout_s"):
        judge.make_config(timeout_s=0)
    with pytest.raises(judge.JudgeConfigError, match="base_url"):
        judge.make_config(base_url="127.0.0.1:8000")
    with pytest.raises(judge.JudgeConfigError, match="no_such_module"):
        judge.make_config(parser="no_such_module:parse")


# ------------------------------------------------------------------------------------------------ pointwise

@pytest.mark.unit
def test_pointwise_rating_is_normalised_and_request_carries_question_reference_completion(server, kw):
    server.script = lambda body, n: {"verdict": "Good answer.\nRating: [[8]]"}
    out = judge.compute_score("captions", "A cat sits on a mat.", "A cat on a mat.",
                              {"question": "Describe the image."}, **kw)
    assert out["score"] == pytest.approx(0.8)
    assert "failure" not in out and out["judge_cached"] is False
    (request,) = server.requests
    assert request["model"] == "scripted-judge" and request["temperature"] == 0.0
    assert request["messages"][0]["role"] == "system"
    text = request["messages"][-1]["content"]
    assert "Describe the image." in text and "A cat on a mat." in text and "A cat sits on a mat." in text
    assert "[The Start of Reference Answer]" in text


@pytest.mark.unit
def test_pointwise_without_reference_uses_the_reference_free_prompt_and_the_chat_prompt(server, kw):
    prompt = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "Name a prime."}]
    out = judge.compute_score("open", "7", None, {"prompt": prompt}, **kw)
    assert out["score"] == pytest.approx(0.7)
    text = server.user_texts()[0]
    assert "Name a prime." in text and "Reference Answer" not in text


@pytest.mark.unit
def test_unparseable_verdict_gives_the_fallback_never_a_high_score(server, kw):
    server.script = lambda body, n: {"verdict": "I would say [[9]] or maybe [[10]]"}
    out = judge.compute_score("d", "answer", "ref", {"question": "q"}, **kw)
    assert out["score"] == 0.0 and out["failure"] == judge.UNPARSEABLE
    out = judge.compute_score("d", "answer 2", "ref", {"question": "q"}, fallback_score=0.25, **kw)
    assert out["score"] == 0.25 and out["failure"] == judge.UNPARSEABLE
    assert judge.judge_stats()["failures"] == {judge.UNPARSEABLE: 2}


@pytest.mark.unit
def test_failure_reaches_the_reward_contract_as_a_counted_reason(server, kw):
    server.script = lambda body, n: {"verdict": "no verdict here"}
    fn = bind_reward("rewards.judge:compute_score", kw)
    result = call_reward(fn, "d", "answer", "ref", {"question": "q"})
    assert result.score == 0.0 and result.failure == judge.UNPARSEABLE
    server.script = lambda body, n: {"verdict": "[[6]]"}
    result = call_reward(fn, "d", "other answer", "ref", {"question": "q"})
    assert result.score == pytest.approx(0.6) and result.failure is None


@pytest.mark.unit
def test_bad_inputs_fall_back_without_a_request(server, kw):
    out = judge.compute_score("d", None, "ref", None, **kw)
    assert out["failure"] == judge.BAD_INPUT
    out = judge.compute_score("d", "x" * 101, "ref", None, max_input_chars=100, **kw)
    assert out["failure"] == judge.INPUT_TOO_LONG and out["score"] == 0.0
    assert server.requests == []


@pytest.mark.unit
def test_model_is_asked_from_the_server_when_not_given(server, kw):
    kw.pop("model")
    out = judge.compute_score("d", "answer", "ref", None, **kw)
    assert out["score"] == pytest.approx(0.7)
    assert server.requests[0]["model"] == "scripted-judge"


@pytest.mark.unit
def test_api_key_comes_from_the_environment_and_is_not_in_the_details(server, kw, monkeypatch):
    monkeypatch.setenv("POSTTRAIN_JUDGE_API_KEY", "sk-test-123")
    out = judge.compute_score("d", "answer", "ref", None, **kw)
    assert server.headers_seen[0].get("Authorization") == "Bearer sk-test-123"
    assert "sk-test-123" not in json.dumps(out)
    judge.compute_score("d", "answer 2", "ref", None, api_key="sk-explicit", **kw)
    assert server.headers_seen[1].get("Authorization") == "Bearer sk-explicit"


# --------------------------------------------------------------------------------------- failures, retries

@pytest.mark.unit
def test_timeout_is_bounded_and_retried_then_falls_back(server, kw):
    server.script = lambda body, n: {"verdict": "[[9]]", "delay": 3.0}
    kw.update(timeout_s=0.3, max_retries=1)
    started = time.monotonic()
    out = judge.compute_score("d", "answer", "ref", None, **kw)
    elapsed = time.monotonic() - started
    assert out["score"] == 0.0 and out["failure"] == judge.TIMEOUT
    assert len(server.requests) == 2  # one try + one retry
    assert elapsed < 2.0, "the judge waited past its timeout"


@pytest.mark.unit
def test_server_errors_are_retried_with_back_off_until_success(server, kw):
    server.script = lambda body, n: {"status": 503} if n < 2 else {"verdict": "[[5]]"}
    out = judge.compute_score("d", "answer", "ref", None, max_retries=3, **kw)
    assert out["score"] == pytest.approx(0.5)
    assert len(server.requests) == 3
    stats = judge.judge_stats()
    assert stats["retries"] == 2 and stats["http_attempts"] == 3 and stats["failures"] == {}


@pytest.mark.unit
def test_retries_are_bounded_and_end_in_a_counted_http_error(server, kw):
    server.script = lambda body, n: {"status": 500}
    out = judge.compute_score("d", "answer", "ref", None, max_retries=2, **kw)
    assert out["failure"] == judge.HTTP_ERROR and "500" in out["judge_error"]
    assert len(server.requests) == 3


@pytest.mark.unit
def test_client_errors_are_not_retried(server, kw):
    server.script = lambda body, n: {"status": 400}
    out = judge.compute_score("d", "answer", "ref", None, max_retries=3, **kw)
    assert out["failure"] == judge.HTTP_ERROR and len(server.requests) == 1


@pytest.mark.unit
def test_retry_after_is_honoured_on_429(server, kw):
    server.script = lambda body, n: ({"status": 429, "headers": {"Retry-After": "0.4"}} if n == 0
                                     else {"verdict": "[[6]]"})
    kw["max_backoff_s"] = 5.0
    out = judge.compute_score("d", "answer", "ref", None, **kw)
    assert out["score"] == pytest.approx(0.6)
    assert server.arrivals[1] - server.arrivals[0] >= 0.35


@pytest.mark.unit
def test_malformed_response_is_a_bad_response_failure(server, kw):
    server.script = lambda body, n: {"raw": b"<html>proxy error</html>"}
    out = judge.compute_score("d", "answer", "ref", None, **kw)
    assert out["failure"] == judge.BAD_RESPONSE and out["score"] == 0.0


@pytest.mark.unit
def test_dead_judge_trips_the_circuit_breaker_and_later_calls_fail_fast(kw):
    from rewards.judge_server import free_port
    kw.update(base_url=f"http://127.0.0.1:{free_port()}/v1", max_retries=1, circuit_breaker_failures=3,
              circuit_breaker_cooldown_s=60)
    for i in range(3):
        assert judge.compute_score("d", f"a{i}", "ref", None, **kw)["failure"] == judge.CONNECTION_ERROR
    attempts_before = judge.judge_stats()["http_attempts"]
    started = time.monotonic()
    out = judge.compute_score("d", "another", "ref", None, **kw)
    assert out["failure"] == judge.JUDGE_UNAVAILABLE and time.monotonic() - started < 1.0
    assert judge.judge_stats()["http_attempts"] == attempts_before


@pytest.mark.unit
def test_total_timeout_bounds_queueing_too(server, kw):
    server.script = lambda body, n: {"verdict": "[[7]]", "delay": 1.0}
    # One request at a time: the first finishes after ~1 s, the others would need 2, 3, 4 s.
    results = judge.compute_score_batch(["d"] * 4, [f"a{i}" for i in range(4)], ["r"] * 4, None,
                                        max_concurrency=1, total_timeout_s=1.6, **kw)
    kinds = [r.get("failure") for r in results]
    assert kinds.count(None) == 1 and kinds.count(judge.TIMEOUT) == 3


@pytest.mark.unit
def test_a_raising_custom_parser_is_a_counted_failure(server, kw, tmp_path):
    (tmp_path / "bad_parser.py").write_text("def parse(verdict):\n    raise RuntimeError('boom')\n")
    out = judge.compute_score("d", "answer", "ref", None, parser=f"{tmp_path}/bad_parser.py:parse", **kw)
    assert out["failure"] == judge.PARSER_ERROR and out["score"] == 0.0


# ------------------------------------------------------------------------------------------------ pairwise

def _prefers_answer_containing(word: str):
    """A judge that reads both answers and prefers the one containing `word` (tie if both or neither)."""
    def script(body, n):
        text = body["messages"][-1]["content"]
        a = text.split("[The Start of Assistant A's Answer]")[1].split("[The End of Assistant A's Answer]")[0]
        b = text.split("[The Start of Assistant B's Answer]")[1].split("[The End of Assistant B's Answer]")[0]
        if (word in a) == (word in b):
            return {"verdict": "Equal. [[C]]"}
        return {"verdict": "[[A]]" if word in a else "[[B]]"}
    return script


@pytest.mark.unit
def test_pairwise_asks_both_orders_and_scores_the_completions_wins(server, kw):
    server.script = _prefers_answer_containing("GOOD")
    kw["mode"] = "pairwise"
    win = judge.compute_score("d", "a GOOD answer", "a plain reference", {"question": "q?"}, **kw)
    assert win["score"] == 1.0 and win["judge_position_consistent"] is True
    # The completion is Assistant A in one request and Assistant B in the other (both orders are sent at once,
    # so they may reach the server in either order).
    orders = sorted(text.index("a GOOD answer") < text.index("a plain reference") for text in server.user_texts()[:2])
    assert orders == [False, True]
    lose = judge.compute_score("d", "a weak answer", "the GOOD reference", {"question": "q?"}, **kw)
    assert lose["score"] == 0.0
    tie = judge.compute_score("d", "same words", "other words", {"question": "q?"}, **kw)
    assert tie["score"] == 0.5


@pytest.mark.unit
def test_pairwise_cancels_a_judge_that_always_prefers_the_first_position(server, kw):
    server.script = lambda body, n: {"verdict": "[[A]]"}
    out = judge.compute_score("d", "anything", "reference", None, mode="pairwise", **kw)
    assert out["score"] == 0.5
    assert out["judge_win_as_a"] == 1.0 and out["judge_win_as_b"] == 0.0
    assert out["judge_position_consistent"] is False


@pytest.mark.unit
def test_pairwise_needs_a_reference_and_both_verdicts(server, kw):
    out = judge.compute_score("d", "anything", "", None, mode="pairwise", **kw)
    assert out["failure"] == judge.NO_REFERENCE and server.requests == []
    server.script = lambda body, n: {"verdict": "[[A]]" if "first-order" in body["messages"][-1]["content"]
                                     .split("Assistant A's Answer]")[1] else "undecided"}
    out = judge.compute_score("d", "first-order", "ref", None, mode="pairwise", **kw)
    assert out["failure"] == judge.UNPARSEABLE and out["score"] == 0.0


# --------------------------------------------------------------------------------- custom template / parser

@pytest.mark.unit
def test_custom_template_and_parser_by_dotted_path(server, kw, tmp_path):
    (tmp_path / "my_judge.py").write_text(textwrap.dedent('''
        TEMPLATE = "Is this caption of {question} accurate? {completion} Reply PASS or FAIL. {reference}"

        def parse(verdict):
            if "PASS" in verdict:
                return 1.0
            if "FAIL" in verdict:
                return 0.0
            return None
    '''))
    server.script = lambda body, n: {"verdict": "PASS"}
    out = judge.compute_score("d", "a dog", "dog", {"question": "img1"}, template=f"{tmp_path}/my_judge.py:TEMPLATE",
                              parser=f"{tmp_path}/my_judge.py:parse", system_prompt=None, **kw)
    assert out["score"] == 1.0
    (request,) = server.requests
    assert request["messages"] == [{"role": "user", "content": "Is this caption of img1 accurate? a dog Reply "
                                                               "PASS or FAIL. dog"}]
    server.script = lambda body, n: {"verdict": "maybe"}
    out = judge.compute_score("d", "a cat", "dog", None, template="{completion} ok?",
                              parser=f"{tmp_path}/my_judge.py:parse", **kw)
    assert out["failure"] == judge.UNPARSEABLE


@pytest.mark.unit
def test_a_parser_returning_out_of_range_values_is_unparseable(server, kw, tmp_path):
    (tmp_path / "wild.py").write_text("def parse(verdict):\n    return 7.0\n")
    out = judge.compute_score("d", "x", "r", None, parser=f"{tmp_path}/wild.py:parse", **kw)
    assert out["failure"] == judge.UNPARSEABLE and out["score"] == 0.0


@pytest.mark.unit
def test_extra_body_is_sent(server, kw):
    judge.compute_score("d", "x", "r", None, extra_body={"chat_template_kwargs": {"enable_thinking": False}},
                        max_tokens=64, **kw)
    assert server.requests[0]["chat_template_kwargs"] == {"enable_thinking": False}
    assert server.requests[0]["max_tokens"] == 64


# -------------------------------------------------------------------------------------------------- cache

@pytest.mark.unit
def test_identical_requests_are_answered_once_within_a_process(server, kw):
    first = judge.compute_score("d", "answer", "ref", {"question": "q"}, **kw)
    again = judge.compute_score("other_source", "answer", "ref", {"question": "q"}, **kw)
    assert len(server.requests) == 1
    assert again["score"] == first["score"] and again["judge_cached"] is True
    judge.compute_score("d", "different answer", "ref", {"question": "q"}, **kw)
    judge.compute_score("d", "answer", "different ref", {"question": "q"}, **kw)
    judge.compute_score("d", "answer", "ref", {"question": "different q"}, **kw)
    judge.compute_score("d", "answer", "ref", {"question": "q"}, template="Other: {completion}", **kw)
    kw["model"] = "another-judge"
    judge.compute_score("d", "answer", "ref", {"question": "q"}, **kw)
    assert len(server.requests) == 6
    stats = judge.judge_stats()
    assert stats["cache_hits"] == 1 and stats["requests"] == 6


@pytest.mark.unit
def test_transport_failures_are_not_cached(server, kw):
    server.script = lambda body, n: {"status": 500} if n == 0 else {"verdict": "[[4]]"}
    assert judge.compute_score("d", "answer", "ref", None, max_retries=0, **kw)["failure"] == judge.HTTP_ERROR
    assert judge.compute_score("d", "answer", "ref", None, max_retries=0, **kw)["score"] == pytest.approx(0.4)
    assert len(server.requests) == 2


@pytest.mark.unit
def test_cache_can_be_turned_off(server, kw):
    for _ in range(2):
        judge.compute_score("d", "answer", "ref", None, cache=False, **kw)
    assert len(server.requests) == 2


@pytest.mark.unit
def test_identical_requests_in_flight_together_are_sent_once(server, kw):
    server.script = lambda body, n: {"verdict": "[[7]]", "delay": 0.3}
    results = judge.compute_score_batch(["d"] * 8, ["same"] * 6 + ["other", "same"], ["r"] * 8, None, **kw)
    assert [r["score"] for r in results] == [pytest.approx(0.7)] * 8
    assert len(server.requests) == 2
    assert judge.judge_stats()["inflight_hits"] == 6


_SCORE_IN_SUBPROCESS = textwrap.dedent('''
    import json, sys
    from rewards import judge
    kw = json.loads(sys.argv[1])
    completions = json.loads(sys.argv[2])
    out = judge.compute_score_batch(["d"] * len(completions), completions, ["ref"] * len(completions), None, **kw)
    print(json.dumps({"results": out, "stats": judge.judge_stats()}))
''')


def _score_in_subprocess(kw: dict, completions: list[str]) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", _SCORE_IN_SUBPROCESS, json.dumps(kw), json.dumps(completions)],
                            cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


@pytest.mark.integration
def test_cache_is_shared_across_processes(server, kw):
    judge.compute_score("d", "answer one", "ref", None, **kw)
    proc = _score_in_subprocess(kw, ["answer one"])
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    child = json.loads(out)
    assert child["results"][0]["judge_cached"] is True and child["results"][0]["score"] == pytest.approx(0.7)
    assert child["stats"]["requests"] == 0 and len(server.requests) == 1


@pytest.mark.integration
def test_concurrent_processes_writing_one_cache_do_not_corrupt_it(server, kw):
    server.script = lambda body, n: {"verdict": "[[6]]", "delay": 0.01}
    # Three processes, overlapping completions, all writing at once.
    batches = [[f"c{i}" for i in range(k, k + 40)] for k in (0, 20, 40)]
    procs = [_score_in_subprocess(kw, batch) for batch in batches]
    for proc in procs:
        out, err = proc.communicate(timeout=90)
        assert proc.returncode == 0, err
        assert all(r["score"] == pytest.approx(0.6) for r in json.loads(out)["results"])
    db = sqlite3.connect(os.path.join(kw["cache_dir"], judge.CACHE_FILE_NAME))
    assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    assert db.execute("SELECT COUNT(*) FROM verdicts").fetchone()[0] == 80  # c0..c79, each once
    db.close()
    # And now every one of them is a hit.
    results = judge.compute_score_batch(["d"] * 80, [f"c{i}" for i in range(80)], ["ref"] * 80, None, **kw)
    assert all(r["judge_cached"] for r in results)


# ------------------------------------------------------------------------------------------------- limits

@pytest.mark.unit
def test_concurrency_limit_is_shared_by_all_calls_in_the_process(server, kw):
    server.script = lambda body, n: {"verdict": "[[7]]", "delay": 0.15}
    kw["max_concurrency"] = 3
    # Calls from several threads (as reward workers make them) share one limit.
    threads = [threading.Thread(target=judge.compute_score, args=("d", f"t{i}", "r", None), kwargs=kw)
               for i in range(6)]
    for t in threads:
        t.start()
    judge.compute_score_batch(["d"] * 6, [f"b{i}" for i in range(6)], ["r"] * 6, None, **kw)
    for t in threads:
        t.join()
    assert len(server.requests) == 12
    assert server.max_in_flight == 3


def _span_of_limited_batch(server, kw, n: int) -> float:
    """Seconds from just before a batch of n distinct requests to the last arrival at the server. A rate limit
    spaces reservations (the first goes at once) and load on the machine can only delay requests further, so
    span >= (n - 1) * spacing holds however busy the machine is."""
    started = time.monotonic()
    judge.compute_score_batch(["d"] * n, [f"a{i}" for i in range(n)], ["r"] * n, None, **kw)
    assert len(server.requests) == n
    return server.arrivals[-1] - started


@pytest.mark.unit
def test_requests_per_minute_spaces_requests(server, kw):
    kw["requests_per_minute"] = 300  # one every 0.2 s
    span = _span_of_limited_batch(server, kw, 6)
    assert span >= 5 * 0.2


@pytest.mark.unit
def test_tokens_per_minute_spaces_requests_by_their_size(server, kw):
    kw.update(tokens_per_minute=300_000, max_tokens=1000)
    body_chars = len(judge.POINTWISE_REFERENCE_TEMPLATE) + len(judge.SYSTEM_PROMPT)
    per_request_s = (body_chars // 4 + 1000) * 60 / 300_000  # each reserves ~prompt/4 + max_tokens tokens
    span = _span_of_limited_batch(server, kw, 4)
    assert per_request_s > 0.2 and span >= 3 * per_request_s


@pytest.mark.unit
def test_without_limits_the_same_batch_is_not_spaced(server, kw):
    server.script = lambda body, n: {"verdict": "[[7]]", "delay": 0.3}
    started = time.monotonic()
    judge.compute_score_batch(["d"] * 8, [f"a{i}" for i in range(8)], ["r"] * 8, None, **kw)
    assert server.max_in_flight >= 4  # they were in flight together, not queued behind each other
    assert time.monotonic() - started < 8 * 0.3


@pytest.mark.unit
def test_async_entry_points_work_inside_a_running_loop(server, kw):
    async def main():
        one = await judge.compute_score_async("d", "x", "r", None, **kw)
        many = await judge.compute_score_batch_async(["d"] * 3, ["x", "y", "z"], ["r"] * 3, None, **kw)
        return one, many
    one, many = asyncio.run(main())
    assert one["score"] == pytest.approx(0.7) and [m["score"] for m in many] == [pytest.approx(0.7)] * 3
    assert many[0]["judge_cached"] is True and len(server.requests) == 3


# ------------------------------------------------------------------------------------- lifecycle in the runner

@pytest.mark.unit
def test_the_runner_serves_the_judge_once_through_its_prepare_hook(server, kw, monkeypatch):
    # The reward runner knows no reward by name: the judge's prepare hook starts the served judge on the driver
    # (here the launcher answers with the scripted server) and the worker processes get its URL and model.
    from posttrain.rewards_runner import LocalProcesses, RewardFn, release_reward_servers, score_batch
    from rewards import judge_server
    launched, stopped = [], []
    monkeypatch.setattr(judge_server, "ensure_judge_server",
                        lambda path, extra_args=(): launched.append((path, extra_args)) or (kw["base_url"], "served"))
    monkeypatch.setattr(judge_server, "shutdown_served_judges", lambda: stopped.append(True) or 1)
    server.script = lambda body, n: {"verdict": "Rating: [[7]]"}
    served_kw = {k: v for k, v in kw.items() if k not in ("base_url", "model")}
    fn = RewardFn("judge", 1.0, tuple(sorted({**served_kw, "serve_model_path": "/models/judge",
                                              "serve_args": ["--max-model-len", "512"]}.items())), None)
    samples = [{"data_source": "d", "solution": f"answer {i}", "ground_truth": "ref", "extra_info": {"question": "q"}}
               for i in range(4)]
    backend = LocalProcesses(2)
    try:
        results = score_batch([fn], samples, timeout_s=30, max_concurrency=2, samples_per_task=2, backend=backend)
    finally:
        backend.close()
        release_reward_servers()
    assert [r["score"] for r in results] == [pytest.approx(0.7)] * 4
    assert launched == [("/models/judge", ("--max-model-len", "512"))]  # once, on the driver
    assert {r["model"] for r in server.requests} == {"served"}
    assert stopped == [True]


@pytest.mark.unit
def test_bad_judge_kwargs_stop_the_start_not_every_sample():
    from posttrain.rewards_runner import RewardFn, prepare_reward_servers
    from rewards.base import RewardSpecError
    with pytest.raises(RewardSpecError, match="reward 'judge' could not be prepared.*mode 'best-of'"):
        prepare_reward_servers([RewardFn("judge", 1.0, (("mode", "best-of"),), None)])
