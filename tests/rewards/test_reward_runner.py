"""The reward runner (posttrain/rewards_runner.py): one set of failure rules for runs (Ray tasks) and
`posttrain score` (local processes), the verl signature check, the prepare/release hooks, the failing-reward
report, metrics."""
from __future__ import annotations

import json

import pytest

from posttrain.rewards_runner import (LocalProcesses, RayTasks, RewardFn, check_rewards_load, failing_rewards,
                                      release_reward_servers, reward_metrics, score_batch, score_stream)
from rewards.base import RewardSpecError, call_reward

# A reward that misbehaves in every way the runner must survive, chosen by the completion text.
HOSTILE_REWARD = '''
import os, signal, threading, time

class Opaque:  # defined in the user's file: the driver cannot unpickle it by module name
    pass

def score(data_source, solution_str, ground_truth, extra_info=None):
    behaviour = {
        "ok": lambda: {"score": 1.0, "n_tokens": 3, "label": "fine"},
        "raise": lambda: 1 / 0,
        "hang": lambda: time.sleep(600),
        "segfault": lambda: os.kill(os.getpid(), signal.SIGSEGV),
        "exit": lambda: os._exit(3),
        "string": lambda: "1.0",
        "no_score": lambda: {"value": 1.0},
        "huge_int": lambda: 10 ** 400,
        "over_float32": lambda: 1e39,
        "nan": lambda: float("nan"),
        "bool": lambda: True,
        "unpicklable": lambda: {"score": 0.5, "lock": threading.Lock(), "obj": Opaque()},
    }
    return behaviour[solution_str]()
'''

EXPECTED = {  # completion → (score, failure kind)
    "ok": (1.0, None), "raise": (0.0, "exception:ZeroDivisionError"), "hang": (0.0, "timeout"),
    "segfault": (0.0, "crash:worker_died"), "exit": (0.0, "crash:worker_died"), "string": (0.0, "bad_result:str"),
    "no_score": (0.0, "bad_result:dict_without_score"), "huge_int": (0.0, "non_finite"),
    "over_float32": (0.0, "non_finite"), "nan": (0.0, "non_finite"), "bool": (1.0, None),
    "unpicklable": (0.5, None),
}


def samples_for(completions, source="d"):
    return [{"data_source": source, "solution": c, "ground_truth": None, "extra_info": {}} for c in completions]


@pytest.fixture
def hostile(tmp_path):
    path = tmp_path / "hostile.py"
    path.write_text(HOSTILE_REWARD)
    return RewardFn(f"{path}:score", 1.0, (), None)


def check_hostile_results(fn, results):
    assert len(results) == len(EXPECTED)
    for completion, result in zip(EXPECTED, results):
        score, kind = EXPECTED[completion]
        assert result["score"] == score, completion
        assert result["failures"] == ([kind] if kind else []), completion
        assert result["failures_by_reward"] == ({fn.name: kind} if kind else {}), completion
    ok, unpicklable = results[0], results[-1]
    assert ok["details"][fn.name] == {"n_tokens": 3, "label": "fine"}
    # The score stands; details that are not plain data come back as their text.
    assert unpicklable["details"][fn.name]["lock"].startswith("<unlocked _thread.lock")
    assert "Opaque object" in unpicklable["details"][fn.name]["obj"]
    json.dumps(unpicklable)


@pytest.mark.unit
def test_every_failure_costs_only_its_own_sample_in_local_processes(hostile):
    backend = LocalProcesses(2)
    try:
        results = list(score_stream([hostile], samples_for(EXPECTED), backend, timeout_s=1.5, max_concurrency=2,
                                    samples_per_task=16))
    finally:
        backend.close()
    check_hostile_results(hostile, results)


@pytest.mark.integration
def test_ray_tasks_follow_the_same_rules(hostile):
    import ray
    ray.init(address="local", num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        # A generous limit: after a crash Ray starts a new worker process, which takes seconds on a busy machine.
        results = score_batch([hostile], samples_for(EXPECTED), timeout_s=10.0, max_concurrency=2,
                              samples_per_task=16)
    finally:
        ray.shutdown()
    check_hostile_results(hostile, results)


@pytest.mark.unit
def test_weights_data_sources_and_order_while_streaming(tmp_path):
    path = tmp_path / "r.py"
    path.write_text("def length(data_source, solution_str, ground_truth, extra_info=None):\n"
                    "    return len(solution_str)\n"
                    "def is_b(data_source, solution_str, ground_truth, extra_info=None):\n"
                    "    return {'score': 1.0, 'source': data_source}\n")
    length = RewardFn(f"{path}:length", 0.5, (), None)
    only_b = RewardFn(f"{path}:is_b", 2.0, (), ("b",))
    samples = [{"data_source": "b" if i % 7 == 0 else "a", "solution": "x" * i, "ground_truth": None,
                "extra_info": None} for i in range(50)]
    backend = LocalProcesses(2)
    try:  # a pending bound below a unit of the rare source: partial units must still go out
        results = list(score_stream([length, only_b], iter(samples), backend, timeout_s=30, max_concurrency=2,
                                    samples_per_task=4, max_pending=3))
    finally:
        backend.close()
    for i, result in enumerate(results):
        assert result["score"] == 0.5 * i + (2.0 if i % 7 == 0 else 0.0)
        assert (only_b.name in result["components"]) == (i % 7 == 0)


@pytest.mark.unit
def test_a_reward_that_does_not_take_verls_keywords_is_refused_with_the_fix(tmp_path):
    path = tmp_path / "gsm8k.py"
    path.write_text('def compute_score(solution_str, ground_truth, method="strict", format_score=0.0, score=1.0):\n'
                    "    return 1.0\n"
                    "def reordered(solution_str, data_source, extra_info, ground_truth):\n"
                    "    return {'score': 1.0, 'got': [data_source, solution_str, ground_truth, extra_info]}\n")
    with pytest.raises(RewardSpecError) as err:
        check_rewards_load([RewardFn(f"{path}:compute_score", 1.0, (), None)])
    message = str(err.value)
    assert f"{path}:compute_score" in message
    assert "compute_score(solution_str, ground_truth, method='strict', format_score=0.0, score=1.0)" in message
    assert "data_source" in message and "wrap it" in message
    # Parameters in another order are fine: rewards are called by keyword, as verl calls them.
    check_rewards_load([RewardFn(f"{path}:reordered", 1.0, (), None)])
    from rewards.base import load_reward
    assert call_reward(load_reward(f"{path}:reordered"), "ds", "sol", "gt", {"e": 1}).details == {
        "got": ["ds", "sol", "gt", {"e": 1}]}


@pytest.mark.unit
def test_failing_rewards_names_the_broken_function_with_counts_by_kind():
    def result(**by_reward):
        return {"score": 0.0, "components": {name: 0.0 for name in by_reward},
                "failures": [k for k in by_reward.values() if k], "failures_by_reward":
                    {name: kind for name, kind in by_reward.items() if kind}}

    results = ([result(broken="exception:KeyError", math="no_answer")] * 5
               + [result(broken="timeout", math="no_answer")] * 2 + [result(broken=None, math="no_answer")] * 3
               + [result(math=None)] * 10)
    report = failing_rewards(results)
    # math's `no_answer` (70% of its samples here) is about the completions, not a broken reward.
    assert report == [{"reward": "broken", "failed": 7, "applied": 10,
                       "by_kind": {"exception:KeyError": 5, "timeout": 2}}]
    assert failing_rewards(results, max_failure_fraction=0.7) == []


@pytest.mark.unit
def test_prepare_hook_runs_once_on_the_driver_and_workers_get_its_kwargs(tmp_path):
    marker = tmp_path / "released"
    path = tmp_path / "served.py"
    path.write_text(
        "import os\n"
        "PREPARED = []\n"
        "def score(data_source, solution_str, ground_truth, extra_info=None, url=None, model_path=None):\n"
        "    return {'score': 1.0 if url == 'http://served' else 0.0, 'url': url, 'model_path': model_path}\n"
        "def prepare(kwargs):\n"
        "    PREPARED.append(os.getpid())\n"
        "    return {'url': 'http://served'}\n"
        "def release():\n"
        f"    open({str(marker)!r}, 'w').write(str(PREPARED))\n"
        "score.prepare, score.release = prepare, release\n")
    fn = RewardFn(f"{path}:score", 1.0, (("model_path", "/models/judge"),), None)
    backend = LocalProcesses(2)
    try:
        for _ in range(2):  # a second batch (the next step) does not prepare again
            results = score_batch([fn], samples_for(["a", "b", "c"]), timeout_s=30, max_concurrency=2,
                                  backend=backend)
            assert [r["details"][fn.name] for r in results] == [{"url": "http://served", "model_path": None}] * 3
    finally:
        backend.close()
    assert not marker.exists()
    release_reward_servers()
    import os
    assert marker.read_text() == str([os.getpid()])


@pytest.mark.unit
def test_reward_metrics_keys_and_numeric_details():
    results = [{"score": 1.0, "components": {"m": 1.0}, "failures": [], "details": {"m": {"len": 3, "x": "s"}}},
               {"score": 0.0, "components": {"m": 0.0}, "failures": ["timeout"],
                "details": {"m": {"len": 5, "flag": True, "huge": 10 ** 400, "nan": float("nan")}}}]
    assert reward_metrics(results, ["a", "b"]) == {
        "reward/mean": 0.5, "reward/by_source/a": 1.0, "reward/by_source/b": 0.0, "reward/component/m": 0.5,
        "reward/detail/m/len": 4.0, "reward/detail/m/flag": 1.0, "reward/failures/timeout": 1.0,
        "reward/failures/total": 1.0}


@pytest.mark.unit
def test_the_runner_imports_without_ray():
    import subprocess
    import sys
    code = ("import sys, posttrain.rewards_runner, posttrain.reward_pool; "
            "assert 'ray' not in sys.modules, 'ray imported'")
    subprocess.run([sys.executable, "-c", code], check=True)
    assert RayTasks  # the Ray backend imports Ray only when built


@pytest.mark.unit
def test_each_sample_has_its_own_time_limit_and_reported_ones_are_not_rerun(tmp_path):
    calls = tmp_path / "calls.log"
    path = tmp_path / "slow.py"
    path.write_text("import time\n"
                    "def score(data_source, solution_str, ground_truth, extra_info=None):\n"
                    f"    open({str(calls)!r}, 'a').write(solution_str + '\\n')\n"
                    "    time.sleep(600 if solution_str == 'hang' else 0.4)\n"
                    "    return 1.0\n")
    fn = RewardFn(f"{path}:score", 1.0, (), None)
    backend = LocalProcesses(1)
    try:  # one unit of 5 samples, 2 s of work in all, each sample well under the 1 s limit but the hang
        results = list(score_stream([fn], samples_for(["a", "b", "hang", "c", "d"]), backend, timeout_s=1.0,
                                    max_concurrency=1, samples_per_task=5))
    finally:
        backend.close()
    assert [r["score"] for r in results] == [1.0, 1.0, 0.0, 1.0, 1.0]
    assert results[2]["failures"] == ["timeout"]
    # a and b were reported before the hang: kept, never re-run; the unreported rest was retried one by one.
    assert calls.read_text().split() == ["a", "b", "hang", "hang", "c", "d"]
