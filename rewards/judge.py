"""LLM-as-judge reward: a judge model behind an OpenAI-compatible chat-completions endpoint scores completions.

    compute_score(data_source, solution_str, ground_truth, extra_info=None, *, base_url=..., model=..., ...) -> dict

Modes:
- pointwise (default): the judge sees the question (`extra_info["question"]`, else the prompt), the reference
  (`ground_truth`, optional) and the completion, and writes a rating `[[N]]` with N in 1..10; score = N / 10.
  The FastChat MT-Bench prompt (single-v1 / single-ref-v1), with the same strict `[[N]]` format.
- pairwise: the completion is compared with the reference answer (`ground_truth`, required) twice, once as
  "Assistant A" and once as "Assistant B"; the judge answers `[[A]]`, `[[B]]` or `[[C]]` (tie). Score =
  mean over the two orders of P(completion better), so a judge that always prefers the first position gives
  0.5, not 1 — position bias cancels instead of becoming reward.

What differs from the usual judge client, on purpose:
- Nothing raises into the training loop. An unparseable verdict, a timeout, an HTTP error after bounded retries
  with exponential back-off, a dead endpoint: the fallback score (default 0.0) with a short kind under
  `"failure"` (which the reward contract counts as `reward/failures/<kind>`) and the message under
  `"judge_error"`. Unparseable never becomes a high score: a verdict with two different ratings is unparseable.
- One judge runtime per process (a private asyncio loop in a daemon thread): every call from every thread and
  every event loop shares its concurrency limit, its request/token rate limits, its HTTP connection pool, an
  in-flight table (identical requests in flight at once are sent once) and a circuit breaker (after a run of
  requests that failed all their retries, calls fail fast for a cool-down instead of each waiting out its own
  timeouts: a dead judge must not stall training).
- An on-disk sqlite cache keyed by the judge model and the exact request (messages, which carry the template,
  question, reference and completion, plus sampling settings): identical requests are answered once within
  a run and across `posttrain score` calls. WAL mode, so concurrent processes share it safely. Answered
  requests are cached even when the verdict is unparseable (the judge answered; asking again at temperature 0
  would give the same); transport failures are not.
- `serve_model_path` makes the toolkit serve the judge itself (a real `vllm serve` process, in a Ray actor when
  Ray is running) and then talks to it through this same HTTP client.

Entry points: `compute_score` (sync, verl signature), `compute_score_async`, and `compute_score_batch` /
`compute_score_batch_async` (verl's batch signature) which judge many completions concurrently.
`judge_stats()` returns the process's counters (requests, cache hits, retries, failures by kind, tokens).
"""
from __future__ import annotations

import asyncio
import atexit
import collections
import concurrent.futures
import dataclasses
import hashlib
import json
import math
import os
import random
import re
import sqlite3
import threading
import time
from typing import Any, Callable, Sequence
from urllib.parse import urlparse

import httpx  # imported here, not lazily: a first import on the runtime loop would stall every request

BASE_URL_ENV = "POSTTRAIN_JUDGE_BASE_URL"
MODEL_ENV = "POSTTRAIN_JUDGE_MODEL"
API_KEY_ENVS = ("POSTTRAIN_JUDGE_API_KEY", "OPENAI_API_KEY")
CACHE_DIR_ENV = "POSTTRAIN_JUDGE_CACHE_DIR"
DEFAULT_BASE_URL = "http://127.0.0.1:8000/v1"
CACHE_FILE_NAME = "judge_cache.sqlite"
CACHE_SCHEMA_VERSION = 1  # part of every cache key: bump when the request format changes meaning

SYSTEM_PROMPT = "You are a helpful assistant."

# FastChat's MT-Bench judge prompts (llm_judge/data/judge_prompts.jsonl), kept close to the originals so that
# ratings are comparable with the literature. Placeholders: {question}, {reference}, {completion} (pointwise),
# {question}, {answer_a}, {answer_b} (pairwise). Other braces in a template are left alone.
POINTWISE_TEMPLATE = (
    "[Instruction]\n"
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to "
    "the user question displayed below. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of the response. Begin your evaluation by "
    "providing a short explanation. Be as objective as possible. After providing your explanation, you must rate "
    "the response on a scale of 1 to 10 by strictly following this format: \"[[rating]]\", for example: "
    "\"Rating: [[5]]\".\n\n"
    "[Question]\n{question}\n\n"
    "[The Start of Assistant's Answer]\n{completion}\n[The End of Assistant's Answer]"
)
POINTWISE_REFERENCE_TEMPLATE = (
    "[Instruction]\n"
    "Please act as an impartial judge and evaluate the quality of the response provided by an AI assistant to "
    "the user question displayed below. Your evaluation should consider correctness and helpfulness. You will be "
    "given a reference answer and the assistant's answer. Begin your evaluation by comparing the assistant's "
    "answer with the reference answer. Identify and correct any mistakes. Be as objective as possible. After "
    "providing your explanation, you must rate the response on a scale of 1 to 10 by strictly following this "
    "format: \"[[rating]]\", for example: \"Rating: [[5]]\".\n\n"
    "[Question]\n{question}\n\n"
    "[The Start of Reference Answer]\n{reference}\n[The End of Reference Answer]\n\n"
    "[The Start of Assistant's Answer]\n{completion}\n[The End of Assistant's Answer]"
)
PAIRWISE_TEMPLATE = (
    "Please act as an impartial judge and evaluate the quality of the responses provided by two AI assistants to "
    "the user question displayed below. You should choose the assistant that follows the user's instructions and "
    "answers the user's question better. Your evaluation should consider factors such as the helpfulness, "
    "relevance, accuracy, depth, creativity, and level of detail of their responses. Begin your evaluation by "
    "comparing the two responses and provide a short explanation. Avoid any position biases and ensure that the "
    "order in which the responses were presented does not influence your decision. Do not allow the length of "
    "the responses to influence your evaluation. Do not favor certain names of the assistants. Be as objective "
    "as possible. After providing your explanation, output your final verdict by strictly following this "
    "format: \"[[A]]\" if assistant A is better, \"[[B]]\" if assistant B is better, and \"[[C]]\" for a tie.\n\n"
    "[User Question]\n{question}\n\n"
    "[The Start of Assistant A's Answer]\n{answer_a}\n[The End of Assistant A's Answer]\n\n"
    "[The Start of Assistant B's Answer]\n{answer_b}\n[The End of Assistant B's Answer]"
)
NO_QUESTION = "(no question was given; judge the answer on its own)"

_PLACEHOLDER = re.compile(r"\{(question|reference|completion|answer_a|answer_b)\}")
_RATING = re.compile(r"\[\[\s*(\d+(?:\.\d+)?)\s*\]\]")
_PREFERENCE = re.compile(r"\[\[\s*(A|B|C|tie)\s*\]\]", re.IGNORECASE)
_THINK_BLOCK = re.compile(r"<think>.*?</think>", re.DOTALL)

# Failure kinds (the value under "failure"; counted as reward/failures/<kind> by the reward contract).
UNPARSEABLE = "unparseable"
TIMEOUT = "timeout"
HTTP_ERROR = "http_error"
CONNECTION_ERROR = "connection_error"
BAD_RESPONSE = "bad_response"
JUDGE_UNAVAILABLE = "judge_unavailable"
INPUT_TOO_LONG = "input_too_long"
BAD_INPUT = "bad_input"
NO_REFERENCE = "no_reference"
PARSER_ERROR = "parser_error"

_RETRYABLE_STATUS = {408, 409, 429, 500, 502, 503, 504}


class JudgeConfigError(ValueError):
    """A judge keyword argument that cannot work; the message names it and says how to fix it."""


# --------------------------------------------------------------------------------------------- verdict parsers

def strip_thinking(verdict: str) -> str:
    """Drop `<think>...</think>` blocks (reasoning judges): a rating inside the reasoning is not the verdict.
    An unclosed `<think>` (cut by max_tokens) leaves nothing, so the verdict is unparseable."""
    text = _THINK_BLOCK.sub("", verdict)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    if "<think>" in text:
        text = text.split("<think>", 1)[0]
    return text


def parse_rating(verdict: str) -> float | None:
    """Pointwise: `[[N]]`, N in 1..10 (decimals allowed, as FastChat) → N/10. None if there is no rating, if it
    is out of range, or if the verdict gives two different ratings (ambiguous must not become a high score).
    Single brackets (`[8]`) do not count: they are as likely a citation as a rating."""
    values = {float(m) for m in _RATING.findall(strip_thinking(verdict))}
    if len(values) != 1:
        return None
    (rating,) = values
    return rating / 10.0 if 1.0 <= rating <= 10.0 else None


def parse_preference(verdict: str) -> float | None:
    """Pairwise: P(assistant A is better): `[[A]]` → 1.0, `[[B]]` → 0.0, `[[C]]` or `[[tie]]` → 0.5.
    None if absent or if the verdict names two different outcomes."""
    values = {m.upper() for m in _PREFERENCE.findall(strip_thinking(verdict))}
    values = {"C" if v == "TIE" else v for v in values}
    if len(values) != 1:
        return None
    return {"A": 1.0, "B": 0.0, "C": 0.5}[values.pop()]


# ------------------------------------------------------------------------------------------------- config

@dataclasses.dataclass(frozen=True)
class JudgeConfig:
    """The judge's keyword arguments, validated. Built from `compute_score`'s kwargs on every call (cheap)."""
    base_url: str
    model: str | None
    mode: str
    template: str | None  # None: the built-in template of the mode
    system_prompt: str | None
    parser: Callable[[str], float | None]
    timeout_s: float
    total_timeout_s: float | None
    max_concurrency: int
    max_retries: int
    backoff_s: float
    max_backoff_s: float
    requests_per_minute: float | None
    tokens_per_minute: float | None
    max_tokens: int
    temperature: float
    extra_body: str  # JSON text (hashable; merged into every request body, e.g. chat_template_kwargs)
    fallback_score: float
    cache_path: str | None
    max_input_chars: int
    circuit_breaker_failures: int
    circuit_breaker_cooldown_s: float
    api_key: str | None = dataclasses.field(repr=False, default=None)

    @property
    def limits_key(self) -> tuple:
        """Calls with the same endpoint and limits share one concurrency slot pool and one rate limiter."""
        return (self.base_url, self.model, self.max_concurrency, self.requests_per_minute, self.tokens_per_minute)


def default_cache_dir() -> str:
    """$POSTTRAIN_JUDGE_CACHE_DIR, else $XDG_CACHE_HOME/posttrain/judge, else ~/.cache/posttrain/judge."""
    if os.environ.get(CACHE_DIR_ENV):
        return os.environ[CACHE_DIR_ENV]
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return os.path.join(base, "posttrain", "judge")


def _resolve_dotted(spec: str, what: str) -> Any:
    """'package.module:NAME' or 'path/to/file.py:NAME' → the object (a template string, a parser function)."""
    import importlib
    import importlib.util
    import sys
    target, _, attr = spec.rpartition(":")
    if not target or not attr:
        raise JudgeConfigError(f"judge {what} {spec!r} is not of the form 'package.module:NAME' or "
                               "'path/to/file.py:NAME'")
    try:
        if target.endswith(".py"):
            path = os.path.abspath(target)
            module_name = f"_posttrain_judge_user_{hashlib.sha1(path.encode()).hexdigest()[:12]}"
            module = sys.modules.get(module_name)
            if module is None:
                file_spec = importlib.util.spec_from_file_location(module_name, path)
                if file_spec is None or not os.path.isfile(path):
                    raise ImportError(f"no file {path}")
                module = importlib.util.module_from_spec(file_spec)
                file_spec.loader.exec_module(module)
                sys.modules[module_name] = module
        else:
            module = importlib.import_module(target)
    except Exception as err:  # noqa: BLE001 - any import failure is a configuration error to report
        raise JudgeConfigError(f"judge {what} {spec!r}: cannot import {target!r} ({type(err).__name__}: {err}); "
                               "is it installed, on PYTHONPATH, or the right file path?") from err
    if not hasattr(module, attr):
        raise JudgeConfigError(f"judge {what} {spec!r}: {target!r} has no attribute {attr!r}")
    return getattr(module, attr)


def _resolve_template(template: str | None, mode: str) -> str | None:
    """None stays None (the built-in template for the mode, chosen per sample by whether there is a reference)."""
    if template is None:
        return None
    if "{" not in template and ":" in template:  # a dotted path to a string constant or a no-argument function
        obj = _resolve_dotted(template, "template")
        template = obj() if callable(obj) else obj
        if not isinstance(template, str):
            raise JudgeConfigError(f"judge template path resolved to {type(template).__name__}, not a string")
    needed = ("{answer_a}", "{answer_b}") if mode == "pairwise" else ("{completion}",)
    missing = [p for p in needed if p not in template]
    if missing:
        raise JudgeConfigError(f"judge template for mode {mode!r} lacks placeholder(s) {missing}; a template is a "
                               "string with {question}, {reference}, {completion} (pointwise) or {question}, "
                               "{answer_a}, {answer_b} (pairwise), or a 'module:NAME' path to one")
    return template


def _resolve_parser(parser: str | Callable | None, mode: str) -> Callable[[str], float | None]:
    if parser is None:
        return parse_preference if mode == "pairwise" else parse_rating
    if callable(parser):
        return parser
    if isinstance(parser, str):
        fn = _resolve_dotted(parser, "parser")
        if not callable(fn):
            raise JudgeConfigError(f"judge parser {parser!r} is not callable")
        return fn
    raise JudgeConfigError(f"judge parser must be a 'module:function' path or a callable, got {parser!r}")


def make_config(*, base_url: str | None = None, model: str | None = None, mode: str = "pointwise",
                template: str | None = None, system_prompt: str | None = SYSTEM_PROMPT,
                parser: str | Callable | None = None, timeout_s: float = 30.0, total_timeout_s: float | None = None,
                max_concurrency: int = 16, max_retries: int = 3, backoff_s: float = 1.0, max_backoff_s: float = 20.0,
                requests_per_minute: float | None = None, tokens_per_minute: float | None = None,
                max_tokens: int = 512, temperature: float = 0.0, extra_body: dict | None = None,
                fallback_score: float = 0.0, cache: bool = True, cache_dir: str | None = None,
                max_input_chars: int = 32_000, circuit_breaker_failures: int = 5,
                circuit_breaker_cooldown_s: float = 30.0, api_key: str | None = None,
                serve_model_path: str | None = None, serve_args: Sequence[str] | None = None) -> JudgeConfig:
    """Validate the judge kwargs. Raises JudgeConfigError naming the argument and the fix."""
    if mode not in ("pointwise", "pairwise"):
        raise JudgeConfigError(f"judge mode {mode!r} is unknown; use 'pointwise' (rating [[1..10]]) or 'pairwise' "
                               "(against the reference, both orders)")
    checks = [("timeout_s", timeout_s, timeout_s > 0), ("max_concurrency", max_concurrency, max_concurrency >= 1),
              ("max_retries", max_retries, max_retries >= 0), ("backoff_s", backoff_s, backoff_s >= 0),
              ("max_tokens", max_tokens, max_tokens >= 1), ("max_input_chars", max_input_chars, max_input_chars >= 1),
              ("requests_per_minute", requests_per_minute, requests_per_minute is None or requests_per_minute > 0),
              ("tokens_per_minute", tokens_per_minute, tokens_per_minute is None or tokens_per_minute > 0),
              ("total_timeout_s", total_timeout_s, total_timeout_s is None or total_timeout_s > 0),
              ("fallback_score", fallback_score, isinstance(fallback_score, (int, float))
               and math.isfinite(fallback_score))]
    for name, value, ok in checks:
        if not ok:
            raise JudgeConfigError(f"judge {name}={value!r} is out of range; see docs/judge.md for valid values")
    if serve_model_path is not None:
        if base_url is not None:
            raise JudgeConfigError("give the judge either base_url (a server you run) or serve_model_path (the "
                                   "toolkit serves it), not both")
        from rewards.judge_server import ensure_judge_server
        base_url, served_name = ensure_judge_server(serve_model_path, extra_args=tuple(serve_args or ()))
        model = model or served_name
    base_url = (base_url or os.environ.get(BASE_URL_ENV) or DEFAULT_BASE_URL).rstrip("/")
    if urlparse(base_url).scheme not in ("http", "https"):
        raise JudgeConfigError(f"judge base_url {base_url!r} must start with http:// or https:// "
                               "(an OpenAI-compatible base, e.g. http://127.0.0.1:8000/v1)")
    if api_key is None:
        api_key = next((os.environ[e] for e in API_KEY_ENVS if os.environ.get(e)), None)
    return JudgeConfig(
        base_url=base_url, model=model or os.environ.get(MODEL_ENV) or None, mode=mode,
        template=_resolve_template(template, mode), system_prompt=system_prompt,
        parser=_resolve_parser(parser, mode), timeout_s=float(timeout_s),
        total_timeout_s=None if total_timeout_s is None else float(total_timeout_s),
        max_concurrency=int(max_concurrency), max_retries=int(max_retries), backoff_s=float(backoff_s),
        max_backoff_s=float(max_backoff_s), requests_per_minute=requests_per_minute,
        tokens_per_minute=tokens_per_minute, max_tokens=int(max_tokens), temperature=float(temperature),
        extra_body=json.dumps(extra_body or {}, sort_keys=True), fallback_score=float(fallback_score),
        cache_path=os.path.join(cache_dir or default_cache_dir(), CACHE_FILE_NAME) if cache else None,
        max_input_chars=int(max_input_chars), circuit_breaker_failures=int(circuit_breaker_failures),
        circuit_breaker_cooldown_s=float(circuit_breaker_cooldown_s), api_key=api_key)


# --------------------------------------------------------------------------------------------- the runtime

@dataclasses.dataclass
class _Answer:
    """One chat request's outcome: the verdict text, or a failure kind and message."""
    text: str | None = None
    cached: bool = False
    failure: str | None = None
    error: str | None = None


class _RateLimiter:
    """Requests and tokens per minute, as even spacing (no burst): each request reserves 60/rpm seconds of the
    request budget and est_tokens*60/tpm seconds of the token budget, and starts when both are free. Reservation
    happens without an await in between, so it is race-free on the runtime's single loop."""

    def __init__(self, requests_per_minute: float | None, tokens_per_minute: float | None):
        self.rpm, self.tpm = requests_per_minute, tokens_per_minute
        self.next_request_at = 0.0
        self.next_tokens_at = 0.0

    async def wait_turn(self, estimated_tokens: int) -> None:
        if not self.rpm and not self.tpm:
            return
        now = time.monotonic()
        start = max(now, self.next_request_at if self.rpm else now, self.next_tokens_at if self.tpm else now)
        if self.rpm:
            self.next_request_at = start + 60.0 / self.rpm
        if self.tpm:
            self.next_tokens_at = start + estimated_tokens * 60.0 / self.tpm
        if start > now:
            await asyncio.sleep(start - now)


class _Endpoint:
    """Shared state of one (endpoint, limits): concurrency slots, rate limiter, circuit breaker."""

    def __init__(self, cfg: JudgeConfig):
        self.slots = asyncio.Semaphore(cfg.max_concurrency)
        self.rate = _RateLimiter(cfg.requests_per_minute, cfg.tokens_per_minute)
        self.consecutive_failures = 0
        self.open_until = 0.0  # circuit breaker: fail fast until this monotonic time


class _Cache:
    """sqlite verdict cache shared by processes (WAL + busy timeout). Errors disable nothing but the lookup."""

    def __init__(self, path: str):
        os.makedirs(os.path.dirname(path), mode=0o700, exist_ok=True)
        self.conn = sqlite3.connect(path, timeout=30.0, check_same_thread=False, isolation_level=None)
        self.conn.execute("PRAGMA busy_timeout = 30000")
        self.conn.execute("PRAGMA journal_mode = WAL")
        self.conn.execute("PRAGMA synchronous = NORMAL")
        self.conn.execute("CREATE TABLE IF NOT EXISTS verdicts (key TEXT PRIMARY KEY, model TEXT NOT NULL, "
                          "verdict TEXT NOT NULL, created REAL NOT NULL)")

    def get(self, key: str) -> str | None:
        row = self.conn.execute("SELECT verdict FROM verdicts WHERE key = ?", (key,)).fetchone()
        return row[0] if row else None

    def put(self, key: str, model: str, verdict: str) -> None:
        self.conn.execute("INSERT OR IGNORE INTO verdicts (key, model, verdict, created) VALUES (?, ?, ?, ?)",
                          (key, model, verdict, time.time()))

    def close(self) -> None:
        self.conn.close()


class _Stats:
    """Process-wide counters (thread-safe): what a benchmark or a run's metrics report."""

    def __init__(self):
        self.lock = threading.Lock()
        self.counts: collections.Counter = collections.Counter()
        self.failures: collections.Counter = collections.Counter()

    def add(self, key: str, n: int = 1) -> None:
        with self.lock:
            self.counts[key] += n

    def fail(self, kind: str) -> None:
        with self.lock:
            self.failures[kind] += 1

    def snapshot(self) -> dict:
        with self.lock:
            out = {k: self.counts.get(k, 0) for k in ("calls", "requests", "http_attempts", "retries",
                                                      "cache_hits", "inflight_hits", "cache_errors",
                                                      "prompt_tokens", "completion_tokens")}
            out["failures"] = dict(self.failures)
        needed = out["requests"] + out["cache_hits"] + out["inflight_hits"]
        out["cache_hit_rate"] = (out["cache_hits"] + out["inflight_hits"]) / needed if needed else 0.0
        return out


class _JudgeRuntime:
    """The process's judge machinery on a private event loop in a daemon thread (see the module docstring)."""

    def __init__(self):
        self.pid = os.getpid()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run_loop, name="posttrain-judge", daemon=True)
        self.thread.start()
        self.stats = _Stats()
        # The following are touched only on self.loop's thread.
        self.endpoints: dict[tuple, _Endpoint] = {}
        self.clients: dict[str, Any] = {}
        self.caches: dict[str, _Cache | None] = {}
        self.inflight: dict[str, asyncio.Future] = {}
        self.models: dict[str, str] = {}

    def _run_loop(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.loop.run_forever()

    def submit(self, coro) -> concurrent.futures.Future:
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def close(self) -> None:
        async def _close():
            for client in self.clients.values():
                await client.aclose()
            for cache in self.caches.values():
                if cache is not None:
                    cache.close()
        try:
            self.submit(_close()).result(timeout=10)
        except Exception:  # noqa: BLE001 - closing at exit: nothing left to protect
            pass
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(timeout=5)

    # -- pieces used on the loop

    def client_for(self, base_url: str):
        client = self.clients.get(base_url)
        if client is None:
            host = urlparse(base_url).hostname or ""
            # A proxy from the environment must not capture loopback traffic to a local judge.
            loopback = host in ("127.0.0.1", "localhost", "::1")
            client = httpx.AsyncClient(trust_env=not loopback,
                                       limits=httpx.Limits(max_connections=256, max_keepalive_connections=64))
            self.clients[base_url] = client
        return client

    def cache_for(self, path: str | None) -> _Cache | None:
        if path is None:
            return None
        if path not in self.caches:
            try:
                self.caches[path] = _Cache(path)
            except (sqlite3.Error, OSError):
                self.stats.add("cache_errors")
                self.caches[path] = None  # judged without a cache rather than not judged
        return self.caches[path]

    def endpoint_for(self, cfg: JudgeConfig) -> _Endpoint:
        ep = self.endpoints.get(cfg.limits_key)
        if ep is None:
            ep = self.endpoints[cfg.limits_key] = _Endpoint(cfg)
        return ep


_RUNTIME: _JudgeRuntime | None = None
_RUNTIME_LOCK = threading.Lock()


def _runtime() -> _JudgeRuntime:
    global _RUNTIME
    with _RUNTIME_LOCK:
        # After a fork the parent's loop thread does not exist in the child: start a fresh runtime.
        if _RUNTIME is None or _RUNTIME.pid != os.getpid() or not _RUNTIME.thread.is_alive():
            _RUNTIME = _JudgeRuntime()
        return _RUNTIME


def judge_stats() -> dict:
    """This process's judge counters: calls, requests sent, HTTP attempts, retries, cache and in-flight hits,
    cache_hit_rate, tokens, and failures by kind."""
    return _runtime().stats.snapshot()


def reset_judge_stats() -> None:
    rt = _runtime()
    with rt.stats.lock:
        rt.stats.counts.clear()
        rt.stats.failures.clear()


def close_judge_runtime() -> None:
    """Close HTTP clients and cache files and stop the loop thread (tests; also runs at exit)."""
    global _RUNTIME
    with _RUNTIME_LOCK:
        rt, _RUNTIME = _RUNTIME, None
    if rt is not None and rt.pid == os.getpid():
        rt.close()


atexit.register(close_judge_runtime)


# ------------------------------------------------------------------------------------------ HTTP + cache

def _backoff_delay(cfg: JudgeConfig, attempt: int, retry_after: float | None) -> float:
    if retry_after is not None:
        return min(max(retry_after, 0.0), cfg.max_backoff_s)
    # Exponential with full jitter, so that many workers retrying a recovering server do not arrive together.
    return random.uniform(0.5, 1.0) * min(cfg.backoff_s * (2 ** attempt), cfg.max_backoff_s)


def _retry_after_seconds(response) -> float | None:
    value = response.headers.get("retry-after")
    try:
        return float(value) if value is not None else None
    except ValueError:
        return None


async def _resolve_model(rt: _JudgeRuntime, cfg: JudgeConfig, headers: dict) -> str:
    """model=None: ask the server (`GET /models`, first id), as for a `vllm serve` with one model."""
    if cfg.model:
        return cfg.model
    if cfg.base_url not in rt.models:
        response = await asyncio.wait_for(
            rt.client_for(cfg.base_url).get(cfg.base_url + "/models", headers=headers), cfg.timeout_s)
        response.raise_for_status()
        rt.models[cfg.base_url] = response.json()["data"][0]["id"]
    return rt.models[cfg.base_url]


async def _post_once(rt: _JudgeRuntime, cfg: JudgeConfig, body: dict,
                     headers: dict) -> tuple[_Answer, float | None, bool]:
    """One HTTP attempt → (answer, retry_after, retryable)."""
    rt.stats.add("http_attempts")
    try:
        response = await asyncio.wait_for(
            rt.client_for(cfg.base_url).post(cfg.base_url + "/chat/completions", json=body, headers=headers,
                                             timeout=cfg.timeout_s),
            cfg.timeout_s)  # wait_for bounds the whole exchange; httpx's timeout is per read/connect phase
    except (asyncio.TimeoutError, httpx.TimeoutException):
        return _Answer(failure=TIMEOUT, error=f"no answer within timeout_s={cfg.timeout_s}"), None, True
    except httpx.HTTPError as err:
        return _Answer(failure=CONNECTION_ERROR, error=f"{type(err).__name__}: {err}"[:300]), None, True
    if response.status_code != 200:
        retryable = response.status_code in _RETRYABLE_STATUS
        return (_Answer(failure=HTTP_ERROR, error=f"HTTP {response.status_code}: {response.text[:200]}"),
                _retry_after_seconds(response), retryable)
    try:
        payload = response.json()
        content = payload["choices"][0]["message"]["content"]
        usage = payload.get("usage") or {}
    except (ValueError, KeyError, IndexError, TypeError) as err:
        return _Answer(failure=BAD_RESPONSE, error=f"not a chat completion: {type(err).__name__}: {err}"[:300]), \
            None, False
    rt.stats.add("prompt_tokens", int(usage.get("prompt_tokens") or 0))
    rt.stats.add("completion_tokens", int(usage.get("completion_tokens") or 0))
    return _Answer(text=content if isinstance(content, str) else ""), None, False


async def _request_with_retries(rt: _JudgeRuntime, cfg: JudgeConfig, body: dict, headers: dict) -> _Answer:
    ep = rt.endpoint_for(cfg)
    estimated_tokens = sum(len(m["content"]) for m in body["messages"]) // 4 + cfg.max_tokens
    answer = _Answer(failure=JUDGE_UNAVAILABLE, error="no attempt made")
    for attempt in range(cfg.max_retries + 1):
        if time.monotonic() < ep.open_until:
            return _Answer(failure=JUDGE_UNAVAILABLE,
                           error=f"judge at {cfg.base_url} failed {ep.consecutive_failures} requests in a row "
                                 f"(last: {answer.error}); failing fast for circuit_breaker_cooldown_s")
        async with ep.slots:
            await ep.rate.wait_turn(estimated_tokens)
            answer, retry_after, retryable = await _post_once(rt, cfg, body, headers)
        if answer.failure is None:
            ep.consecutive_failures = 0
            return answer
        if not retryable or attempt == cfg.max_retries:
            break
        rt.stats.add("retries")
        await asyncio.sleep(_backoff_delay(cfg, attempt, retry_after))
    if answer.failure in (TIMEOUT, CONNECTION_ERROR) or (answer.failure == HTTP_ERROR and retryable):
        ep.consecutive_failures += 1
        if cfg.circuit_breaker_failures and ep.consecutive_failures >= cfg.circuit_breaker_failures:
            ep.open_until = time.monotonic() + cfg.circuit_breaker_cooldown_s
    return answer


def _cache_key(model: str, body: dict) -> str:
    keyed = {k: v for k, v in body.items() if k != "model"}
    text = json.dumps({"v": CACHE_SCHEMA_VERSION, "model": model, "request": keyed}, sort_keys=True,
                      ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


async def _ask(rt: _JudgeRuntime, cfg: JudgeConfig, messages: list[dict]) -> _Answer:
    """One chat request through the cache, the in-flight table, the limits and the retries."""
    headers = {"Authorization": f"Bearer {cfg.api_key}"} if cfg.api_key else {}
    try:
        model = await _resolve_model(rt, cfg, headers)
    except asyncio.TimeoutError:
        return _Answer(failure=TIMEOUT, error=f"GET {cfg.base_url}/models: no answer within {cfg.timeout_s}s")
    except Exception as err:  # noqa: BLE001 - any failure to learn the model name is an unavailable judge
        return _Answer(failure=JUDGE_UNAVAILABLE,
                       error=f"GET {cfg.base_url}/models: {type(err).__name__}: {err}"[:300])
    body = {"model": model, "messages": messages, "max_tokens": cfg.max_tokens, "temperature": cfg.temperature}
    body.update(json.loads(cfg.extra_body))
    key = _cache_key(model, body)
    cache = rt.cache_for(cfg.cache_path)
    if cache is not None:
        try:
            hit = cache.get(key)
        except sqlite3.Error:
            rt.stats.add("cache_errors")
            hit = None
        if hit is not None:
            rt.stats.add("cache_hits")
            return _Answer(text=hit, cached=True)
    pending = rt.inflight.get(key)
    if pending is not None:  # the same request is already on its way: share its answer
        rt.stats.add("inflight_hits")
        answer = await asyncio.shield(pending)
        return dataclasses.replace(answer, cached=answer.failure is None)
    future = rt.loop.create_future()
    rt.inflight[key] = future
    try:
        rt.stats.add("requests")
        answer = await _request_with_retries(rt, cfg, body, headers)
        if answer.failure is None and cache is not None:
            try:
                cache.put(key, model, answer.text)
            except sqlite3.Error:
                rt.stats.add("cache_errors")
        future.set_result(answer)
        return answer
    except BaseException as err:  # cancelled (total_timeout_s) or a bug: waiters get an answer, not a hang
        cancelled = isinstance(err, asyncio.CancelledError)
        future.set_result(_Answer(failure=TIMEOUT if cancelled else f"exception:{type(err).__name__}",
                                  error=f"request {'cancelled' if cancelled else 'failed'}: {type(err).__name__}"))
        raise
    finally:
        rt.inflight.pop(key, None)


# --------------------------------------------------------------------------------------------- scoring

def _question_from(extra_info: Any) -> str:
    """`extra_info["question"]`, else the prompt (a string or chat messages: the last user message)."""
    if not isinstance(extra_info, dict):
        return NO_QUESTION
    for key in ("question", "prompt"):
        value = extra_info.get(key)
        if isinstance(value, str) and value.strip():
            return value
        if isinstance(value, list):
            user_turns = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"]
            user_turns = [c if isinstance(c, str) else json.dumps(c, ensure_ascii=False) for c in user_turns if c]
            if user_turns:
                return user_turns[-1]
    return NO_QUESTION


def _reference_from(ground_truth: Any) -> str | None:
    if ground_truth is None or (isinstance(ground_truth, str) and not ground_truth.strip()):
        return None
    if isinstance(ground_truth, str):
        return ground_truth
    return json.dumps(ground_truth, ensure_ascii=False, sort_keys=True)


def render(template: str, **values: str) -> str:
    """Fill {question}/{reference}/{completion}/{answer_a}/{answer_b} in one pass: braces inside the values
    (code, JSON) and any other braces in the template are left as they are."""
    return _PLACEHOLDER.sub(lambda m: values.get(m.group(1), m.group(0)), template)


def _template_for(cfg: JudgeConfig, has_reference: bool) -> str:
    if cfg.template is not None:
        return cfg.template
    if cfg.mode == "pairwise":
        return PAIRWISE_TEMPLATE
    return POINTWISE_REFERENCE_TEMPLATE if has_reference else POINTWISE_TEMPLATE


def _messages(cfg: JudgeConfig, user_text: str) -> list[dict]:
    messages = [{"role": "system", "content": cfg.system_prompt}] if cfg.system_prompt else []
    return messages + [{"role": "user", "content": user_text}]


def _parse(cfg: JudgeConfig, verdict: str) -> tuple[float | None, str | None]:
    """→ (value in [0, 1], None) or (None, failure kind)."""
    try:
        value = cfg.parser(verdict)
    except Exception:  # noqa: BLE001 - a user parser that raises is a failed verdict, not a crashed run
        return None, PARSER_ERROR
    if value is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return None, UNPARSEABLE
    value = float(value)
    if not math.isfinite(value) or not 0.0 <= value <= 1.0:
        return None, UNPARSEABLE
    return value, None


async def _judge(rt: _JudgeRuntime, cfg: JudgeConfig, solution_str: Any, ground_truth: Any,
                 extra_info: Any) -> dict:
    def fallback(kind: str, error: str, **extra) -> dict:
        rt.stats.fail(kind)
        return {"score": cfg.fallback_score, "failure": kind, "judge_error": error[:500], "judge_mode": cfg.mode,
                **extra}

    if not isinstance(solution_str, str):
        return fallback(BAD_INPUT, f"completion is {type(solution_str).__name__}, not a string")
    if len(solution_str) > cfg.max_input_chars:
        return fallback(INPUT_TOO_LONG, f"completion has {len(solution_str)} characters > max_input_chars="
                                        f"{cfg.max_input_chars}")
    question, reference = _question_from(extra_info), _reference_from(ground_truth)

    if cfg.mode == "pointwise":
        text = render(_template_for(cfg, reference is not None), question=question,
                      reference=reference or "(none)", completion=solution_str)
        answer = await _ask(rt, cfg, _messages(cfg, text))
        if answer.failure:
            return fallback(answer.failure, answer.error or answer.failure)
        value, failure = _parse(cfg, answer.text)
        if failure:
            return fallback(failure, f"no valid verdict in: {answer.text[-300:]!r}", judge_cached=answer.cached)
        return {"score": value, "judge_mode": cfg.mode, "judge_cached": answer.cached,
                "judge_verdict": answer.text[-500:]}

    if reference is None:
        return fallback(NO_REFERENCE, "pairwise mode compares against ground_truth, which is empty")
    # Both orders: completion as A (then P(A better) is the completion's win), and as B (then 1 - P(A better)).
    template = _template_for(cfg, True)
    first, second = await asyncio.gather(
        _ask(rt, cfg, _messages(cfg, render(template, question=question, answer_a=solution_str,
                                            answer_b=reference))),
        _ask(rt, cfg, _messages(cfg, render(template, question=question, answer_a=reference,
                                            answer_b=solution_str))))
    for answer in (first, second):
        if answer.failure:
            return fallback(answer.failure, answer.error or answer.failure)
    p_first, failure_first = _parse(cfg, first.text)
    p_second, failure_second = _parse(cfg, second.text)
    if failure_first or failure_second:
        bad = first.text if failure_first else second.text
        return fallback(failure_first or failure_second, f"no valid verdict in: {bad[-300:]!r}",
                        judge_cached=first.cached and second.cached)
    win_as_a, win_as_b = p_first, 1.0 - p_second
    return {"score": (win_as_a + win_as_b) / 2.0, "judge_mode": cfg.mode,
            "judge_cached": first.cached and second.cached,
            "judge_win_as_a": win_as_a, "judge_win_as_b": win_as_b,
            # False when the verdict flipped with the order: the judge preferred a position, not an answer.
            "judge_position_consistent": win_as_a == win_as_b,
            "judge_verdict_as_a": first.text[-300:], "judge_verdict_as_b": second.text[-300:]}


async def _judge_bounded(rt: _JudgeRuntime, cfg: JudgeConfig, solution_str, ground_truth, extra_info) -> dict:
    rt.stats.add("calls")
    try:
        if cfg.total_timeout_s is None:
            return await _judge(rt, cfg, solution_str, ground_truth, extra_info)
        return await asyncio.wait_for(_judge(rt, cfg, solution_str, ground_truth, extra_info), cfg.total_timeout_s)
    except asyncio.TimeoutError:
        rt.stats.fail(TIMEOUT)
        return {"score": cfg.fallback_score, "failure": TIMEOUT, "judge_mode": cfg.mode,
                "judge_error": f"not judged within total_timeout_s={cfg.total_timeout_s}"}
    except Exception as err:  # noqa: BLE001 - the last line of defence: the training loop never sees it
        rt.stats.fail(f"exception:{type(err).__name__}")
        return {"score": cfg.fallback_score, "failure": f"exception:{type(err).__name__}", "judge_mode": cfg.mode,
                "judge_error": f"{type(err).__name__}: {err}"[:500]}


# ------------------------------------------------------------------------------------------ public entry points

def _config_or_failure(judge_kwargs: dict) -> tuple[JudgeConfig | None, dict | None]:
    """A served judge that cannot start is an unavailable judge (fallback score), not an exception."""
    from rewards.judge_server import JudgeServerError
    try:
        return make_config(**judge_kwargs), None
    except JudgeServerError as err:
        _runtime().stats.fail(JUDGE_UNAVAILABLE)
        return None, {"score": float(judge_kwargs.get("fallback_score", 0.0)), "failure": JUDGE_UNAVAILABLE,
                      "judge_error": f"served judge did not start: {err}"[:500]}


def compute_score(data_source: str, solution_str: str, ground_truth: Any = None, extra_info: dict | None = None,
                  **judge_kwargs: Any) -> dict:
    """Judge one completion (sync; safe from any thread). Returns {"score", ...details}; on any failure the
    fallback score with "failure" set. Keyword arguments: see `make_config` and docs/judge.md."""
    cfg, failed = _config_or_failure(judge_kwargs)
    if failed:
        return failed
    rt = _runtime()
    return rt.submit(_judge_bounded(rt, cfg, solution_str, ground_truth, extra_info)).result()


async def compute_score_async(data_source: str, solution_str: str, ground_truth: Any = None,
                              extra_info: dict | None = None, **judge_kwargs: Any) -> dict:
    """compute_score for callers on an event loop: awaits without blocking it. Limits are still the process's.
    (With serve_model_path, the first call blocks while the server starts.)"""
    cfg, failed = _config_or_failure(judge_kwargs)
    if failed:
        return failed
    rt = _runtime()
    return await asyncio.wrap_future(rt.submit(_judge_bounded(rt, cfg, solution_str, ground_truth, extra_info)))


def _batch_coroutine(rt: _JudgeRuntime, cfg: JudgeConfig, solution_strs: Sequence[Any],
                     ground_truths: Sequence[Any], extra_infos: Sequence[Any] | None):
    n = len(solution_strs)
    if len(ground_truths) != n or (extra_infos is not None and len(extra_infos) != n):
        raise ValueError(f"compute_score_batch: lists differ in length (solution_strs {n}, ground_truths "
                         f"{len(ground_truths)}, extra_infos {None if extra_infos is None else len(extra_infos)})")
    extra_infos = list(extra_infos) if extra_infos is not None else [None] * n

    async def judge_all() -> list[dict]:
        return list(await asyncio.gather(*(_judge_bounded(rt, cfg, s, gt, ei)
                                           for s, gt, ei in zip(solution_strs, ground_truths, extra_infos))))
    return judge_all()


def compute_score_batch(data_sources: Sequence[str], solution_strs: Sequence[str], ground_truths: Sequence[Any],
                        extra_infos: Sequence[dict | None] | None = None, **judge_kwargs: Any) -> list[dict]:
    """verl's batch signature (BatchRewardManager): many completions judged concurrently (bounded by
    max_concurrency and the rate limits), results in input order."""
    cfg, failed = _config_or_failure(judge_kwargs)
    if failed:
        return [dict(failed) for _ in solution_strs]
    rt = _runtime()
    return rt.submit(_batch_coroutine(rt, cfg, solution_strs, ground_truths, extra_infos)).result()


async def compute_score_batch_async(data_sources: Sequence[str], solution_strs: Sequence[str],
                                    ground_truths: Sequence[Any], extra_infos: Sequence[dict | None] | None = None,
                                    **judge_kwargs: Any) -> list[dict]:
    """compute_score_batch for callers on an event loop."""
    cfg, failed = _config_or_failure(judge_kwargs)
    if failed:
        return [dict(failed) for _ in solution_strs]
    rt = _runtime()
    return await asyncio.wrap_future(rt.submit(_batch_coroutine(rt, cfg, solution_strs, ground_truths,
                                                                extra_infos)))


# ------------------------------------------------------------------------ lifecycle hooks (see rewards.base)

def prepare_judge(judge_kwargs: dict) -> dict:
    """Called once on the driver before any sample is judged. Checks the kwargs (a bad one stops the run's start,
    instead of scoring every sample 0) and, with `serve_model_path`, starts the served judge (it takes longer to
    start than a reward's time limit) and returns the kwargs with its base_url and model in place of
    serve_model_path / serve_args, so every worker (a Ray task, a `posttrain score` process) reaches that one
    server instead of starting its own."""
    cfg = make_config(**judge_kwargs)
    if judge_kwargs.get("serve_model_path") is None:
        return judge_kwargs
    kept = {k: v for k, v in judge_kwargs.items() if k not in ("serve_model_path", "serve_args")}
    return {**kept, "base_url": cfg.base_url, "model": cfg.model}


def release_judge() -> None:
    """Stop the judges `prepare_judge` (or a worker) served; the served judge is detached under Ray."""
    from rewards.judge_server import shutdown_served_judges
    shutdown_served_judges()


for _entry in (compute_score, compute_score_async):
    _entry.prepare, _entry.release = prepare_judge, release_judge
del _entry
