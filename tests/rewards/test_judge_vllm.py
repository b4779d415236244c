"""The judge reward against a real `vllm serve` on loopback, served by the toolkit's own Ray actor.

The judge model is a tiny random Qwen3 built here (tokenizer trained with `tokenizers` on generated text, a
chat template of our own): its verdicts are noise, so these tests assert plumbing, fallbacks and their counts,
caching and limits — never quality. One server for the whole module (start-up is the expensive part).
"""
from __future__ import annotations

import json
import os
import random
import socket
import subprocess
import sys
import time

import pytest

from rewards import judge

pytestmark = pytest.mark.integration

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
RATING_REGEX = r"\[\[(10|[1-9])\]\]"


def build_tiny_judge(path: str) -> None:
    """posttrain.toy.build.build_random_chat_model on judge-like text (prompts, ratings, [[A]]/[[B]] verdicts)."""
    from posttrain.toy.build import build_random_chat_model

    rng = random.Random(0)
    words = ("please act as an impartial judge and evaluate the quality of the response assistant answer question "
             "reference rating better worse tie caption video frame object person moves left right because "
             "helpful accurate detail explanation objective format example").split()
    corpus = [" ".join(rng.choice(words) for _ in range(rng.randint(5, 30))) +
              rng.choice([f" Rating: [[{rng.randint(1, 10)}]]", " [[A]]", " [[B]]", " [[C]]", "."])
              for _ in range(3000)]
    build_random_chat_model(path, corpus)


@pytest.fixture(scope="module")
def tiny_judge_path(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("tiny-judge"))
    build_tiny_judge(path)
    return path


@pytest.fixture(scope="module")
def served_judge(tiny_judge_path):
    """(actor, base_url, model name): `vllm serve` in the toolkit's Ray actor on a free loopback port, started
    the way the `serve_model_path` kwarg starts it (one detached named actor per model for the cluster)."""
    import ray

    from rewards.judge_server import SERVED_ACTOR_PREFIX, ensure_judge_server, shutdown_served_judges
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        base_url, model = ensure_judge_server(tiny_judge_path)
        (entry,) = [a for a in ray.util.list_named_actors(all_namespaces=True)
                    if a["name"].startswith(SERVED_ACTOR_PREFIX)]
        yield ray.get_actor(entry["name"], namespace=entry["namespace"]), base_url, model
    finally:
        shutdown_served_judges()
        ray.shutdown()


@pytest.fixture
def kw(served_judge, tmp_path):
    _, base_url, model = served_judge
    judge.close_judge_runtime()  # fresh counters and limits per test
    yield dict(base_url=base_url, model=model, cache_dir=str(tmp_path / "cache"), max_tokens=8, timeout_s=60,
               backoff_s=0.05)
    judge.close_judge_runtime()


def test_served_judge_answers_and_noise_is_a_counted_fallback_never_an_exception(kw, tiny_judge_path):
    # serve_model_path instead of base_url: the reward finds the toolkit's served judge (already started by
    # the fixture, so this reuses it) and talks to it over HTTP like to any endpoint.
    kw.pop("base_url"), kw.pop("model")
    out = judge.compute_score("captions", "a cat on a mat", "a cat sits on a mat", {"question": "Describe it."},
                              serve_model_path=tiny_judge_path, **kw)
    stats = judge.judge_stats()
    assert stats["requests"] == 1 and stats["http_attempts"] == 1 and stats["completion_tokens"] >= 1
    # A random model almost never writes a valid [[N]]; whatever it wrote, the score is either a parsed
    # rating or the fallback with its reason counted.
    if "failure" in out:
        assert out["failure"] == judge.UNPARSEABLE and out["score"] == 0.0
        assert stats["failures"] == {judge.UNPARSEABLE: 1}
    else:
        assert out["score"] in [k / 10 for k in range(1, 11)]


def test_constrained_verdicts_parse_into_ratings(kw):
    # vLLM's structured outputs force the verdict format: the full success path through a real server.
    kw["extra_body"] = {"structured_outputs": {"regex": RATING_REGEX}}
    outs = judge.compute_score_batch(["d"] * 6, [f"answer number {i}" for i in range(6)], ["ref"] * 6,
                                     [{"question": "q"}] * 6, **kw)
    assert all("failure" not in o for o in outs), outs
    assert all(o["score"] in [k / 10 for k in range(1, 11)] for o in outs)
    assert judge.judge_stats()["requests"] == 6


def test_pairwise_with_a_real_server_asks_both_orders(kw):
    kw.update(mode="pairwise", extra_body={"structured_outputs": {"regex": r"\[\[(A|B|C)\]\]"}})
    out = judge.compute_score("d", "the completion", "the reference", {"question": "q"}, **kw)
    assert "failure" not in out, out
    assert out["score"] in (0.0, 0.25, 0.5, 0.75, 1.0)
    assert out["score"] == (out["judge_win_as_a"] + out["judge_win_as_b"]) / 2
    assert judge.judge_stats()["requests"] == 2


def test_a_runs_worth_of_duplicates_is_judged_once_each(kw):
    unique = [f"completion {i} about the video" for i in range(24)]
    completions = unique + unique[:8]  # 25% duplicates
    random.Random(1).shuffle(completions)
    outs = judge.compute_score_batch(["d"] * 32, completions, ["ref"] * 32, None, **kw)
    stats = judge.judge_stats()
    assert stats["requests"] == 24
    assert stats["cache_hits"] + stats["inflight_hits"] == 8
    by_completion: dict[str, set] = {}
    for completion, out in zip(completions, outs):
        by_completion.setdefault(completion, set()).add((out["score"], out.get("failure")))
    assert all(len(v) == 1 for v in by_completion.values())  # a duplicate gets the same verdict
    # Every fallback is a counted unparseable verdict, nothing else.
    assert sum(stats["failures"].values()) == sum(1 for o in outs if "failure" in o)
    assert set(stats["failures"]) <= {judge.UNPARSEABLE}


def test_posttrain_score_reuses_the_cache_across_calls(kw, tmp_path):
    rows = [{"completion": f"caption {i}", "ground_truth": "a reference", "extra_info": {"question": "q"},
             "id": i} for i in range(5)]
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    kwargs = json.dumps(kw)

    def score(out_name: str) -> list[dict]:
        proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "score", "--reward", "judge",
                               "--reward-kwargs", kwargs, "--workers", "1", "--no-progress",
                               str(tmp_path / "in.jsonl"), "-o", str(tmp_path / out_name)],
                              cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        return [json.loads(line) for line in (tmp_path / out_name).read_text().splitlines()]

    first, second = score("first.jsonl"), score("second.jsonl")
    assert [r["id"] for r in second] == list(range(5))
    assert [r["score"] for r in second] == [r["score"] for r in first]
    assert all(r["details"].get("judge_cached") is True for r in second)
    assert not any(r["details"].get("judge_cached") for r in first)


def test_timeouts_and_rate_limits_with_a_real_server(kw):
    out = judge.compute_score("d", "slow one", "ref", None, **{**kw, "timeout_s": 0.001, "max_retries": 1})
    assert out["failure"] == judge.TIMEOUT and out["score"] == 0.0
    started = time.monotonic()
    judge.compute_score_batch(["d"] * 5, [f"limited {i}" for i in range(5)], ["r"] * 5, None,
                              requests_per_minute=240, **kw)
    assert time.monotonic() - started >= 4 * 0.25  # five requests, 0.25 s apart at least


def test_a_served_judge_that_cannot_start_is_an_unavailable_judge(kw, tmp_path):
    # serve_model_path under Ray starts a named actor; a folder that is not a model fails its start (the actor
    # is killed), which becomes a counted fallback — and is remembered, so the next call does not wait again.
    kw.pop("base_url"), kw.pop("model")
    missing = str(tmp_path / "not-a-model")
    os.makedirs(missing)
    out = judge.compute_score("d", "x", "r", None, serve_model_path=missing, **kw)
    assert out["failure"] == judge.JUDGE_UNAVAILABLE and out["score"] == 0.0
    started = time.monotonic()
    again = judge.compute_score("d", "y", "r", None, serve_model_path=missing, **kw)
    assert again["failure"] == judge.JUDGE_UNAVAILABLE and time.monotonic() - started < 1.0
    import ray
    from rewards.judge_server import SERVED_ACTOR_PREFIX
    # The failed actor was killed (it holds no CPU and no name): only the module's working judge is left.
    assert len([a for a in ray.util.list_named_actors(all_namespaces=True)
                if a["name"].startswith(SERVED_ACTOR_PREFIX)]) == 1


def test_shutdown_stops_the_server_and_the_judge_then_falls_back(served_judge, kw):
    import ray
    actor, base_url, _ = served_judge
    pid = ray.get(actor.pid.remote())
    port = int(base_url.rsplit(":", 1)[1].split("/")[0])
    ray.get(actor.shutdown.remote(), timeout=60)
    assert not ray.get(actor.is_running.remote())
    with pytest.raises(ProcessLookupError):
        os.kill(pid, 0)
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    out = judge.compute_score("d", "after shutdown", "r", None, **{**kw, "max_retries": 1})
    assert out["failure"] == judge.CONNECTION_ERROR and out["score"] == 0.0
