"""Rewards in a run: every sample scored by the recipe's reward functions in Ray tasks, off the driver.

A reward that raises scores 0 (`reward/failures/exception:Type`); one that exceeds `rewards.timeout_s` has its
task force-cancelled (the worker process is killed, which also stops C code such as a stuck sympy call) and
scores 0 (`reward/failures/timeout`). Neither stops nor hangs the run.
"""
from __future__ import annotations

import collections
import dataclasses
import time
from typing import Any

import ray

from rewards.base import RewardResult, bind_reward, call_reward

_LOADED: dict[str, Any] = {}  # per worker process: reward spec → bound function


@dataclasses.dataclass(frozen=True)
class RewardFn:
    name: str
    weight: float
    kwargs: tuple  # sorted (key, value) pairs, hashable and picklable
    data_sources: tuple | None

    @property
    def key(self) -> str:
        return f"{self.name}|{self.kwargs!r}"

    def applies_to(self, data_source: str) -> bool:
        return self.data_sources is None or data_source in self.data_sources


def reward_fns_from_recipe(rewards_cfg) -> list[RewardFn]:
    return [RewardFn(f.name, f.weight, tuple(sorted(f.kwargs.items())),
                     tuple(f.data_sources) if f.data_sources is not None else None) for f in rewards_cfg.functions]


def check_rewards_load(fns: list[RewardFn]) -> None:
    """Resolve every reward once on the driver so that a bad name fails before any heavy work."""
    for fn in fns:
        bind_reward(fn.name, dict(fn.kwargs))


def _score_one(fn: RewardFn, data_source: str, solution: str, ground_truth: Any, extra_info: dict | None) -> RewardResult:
    bound = _LOADED.get(fn.key)
    if bound is None:
        bound = _LOADED[fn.key] = bind_reward(fn.name, dict(fn.kwargs))
    return call_reward(bound, data_source, solution, ground_truth, extra_info)


def _score_chunk(fn: RewardFn, items: list[tuple]) -> list[RewardResult]:
    return [_score_one(fn, *item) for item in items]


_score_task = ray.remote(num_cpus=0.5, max_retries=0)(_score_chunk)

_PREPARED: set[str] = set()


def prepare_reward_servers(fns: list[RewardFn]) -> None:
    """Start, from the driver and before any reward task runs, the servers rewards need: an LLM judge served by
    the toolkit (`judge` with `serve_model_path`) takes longer to start than a reward's time limit, so it is
    launched here (a Ray actor running `vllm serve`), once per run, and reached through the same HTTP client."""
    for fn in fns:
        kwargs = dict(fn.kwargs)
        if fn.key in _PREPARED or kwargs.get("serve_model_path") is None:
            continue
        if fn.name == "judge" or fn.name.endswith("rewards.judge:compute_score"):
            from rewards.judge_server import ensure_judge_server
            ensure_judge_server(kwargs["serve_model_path"], extra_args=tuple(kwargs.get("serve_args") or ()))
        _PREPARED.add(fn.key)


def release_reward_servers() -> None:
    if _PREPARED:
        from rewards.judge_server import shutdown_served_judges
        shutdown_served_judges()
        _PREPARED.clear()


def score_batch(fns: list[RewardFn], samples: list[dict], *, timeout_s: float, max_concurrency: int,
                samples_per_task: int = 16) -> list[dict]:
    """samples: [{data_source, solution, ground_truth, extra_info}] → [{score, components, failures}].

    Work goes out as Ray tasks of up to `samples_per_task` samples of one reward function (a task per sample
    costs ~10 ms of overhead each on a small machine). A task that raises out of the worker or runs past
    `timeout_s` is force-cancelled (its worker process is killed, which stops C code too) and its samples are
    retried one per task, so only the sample that hangs or crashes is charged: it scores 0 with a counted
    reason, and the other terms of that sample are unaffected."""
    prepare_reward_servers(fns)
    units: collections.deque = collections.deque()
    for j, fn in enumerate(fns):
        idx = [i for i, s in enumerate(samples) if fn.applies_to(s["data_source"])]
        for start in range(0, len(idx), samples_per_task):
            units.append((j, idx[start:start + samples_per_task]))
    outcome: dict[tuple[int, int], RewardResult] = {}
    in_flight: dict[Any, tuple[tuple[int, list[int]], float]] = {}
    fn_refs = [ray.put(fn) for fn in fns]

    def fail(unit, kind: str) -> None:
        j, idx = unit
        if len(idx) > 1:  # isolate the culprit: retry one sample per task, first in line
            units.extendleft((j, [i]) for i in reversed(idx))
        else:
            outcome[(idx[0], j)] = RewardResult(0.0, {}, kind)

    while units or in_flight:
        while units and len(in_flight) < max_concurrency:
            unit = units.popleft()
            j, idx = unit
            items = [(samples[i]["data_source"], samples[i]["solution"], samples[i]["ground_truth"],
                      samples[i]["extra_info"]) for i in idx]
            in_flight[_score_task.remote(fn_refs[j], items)] = (unit, time.monotonic())
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=0.05)
        for ref in ready:
            unit, _ = in_flight.pop(ref)
            try:
                for i, res in zip(unit[1], ray.get(ref)):
                    outcome[(i, unit[0])] = res
            except Exception as err:  # noqa: BLE001 — a crashed worker (segfault, os._exit) is a failed term
                fail(unit, f"crash:{type(err).__name__}")
        now = time.monotonic()
        for ref, (unit, started) in list(in_flight.items()):
            if now - started > timeout_s:
                ray.cancel(ref, force=True)
                in_flight.pop(ref)
                fail(unit, "timeout")
    results = []
    for i in range(len(samples)):
        total, components, failures = 0.0, {}, []
        for j, fn in enumerate(fns):
            res = outcome.get((i, j))
            if res is None:
                continue
            components[fn.name] = res.score
            total += fn.weight * res.score
            if res.failure:
                failures.append(res.failure)
        results.append({"score": total, "components": components, "failures": failures})
    return results


def reward_metrics(results: list[dict], data_sources: list[str], prefix: str = "reward") -> dict[str, float]:
    scores = [r["score"] for r in results]
    out = {f"{prefix}/mean": sum(scores) / max(len(scores), 1)}
    by_source: dict[str, list[float]] = collections.defaultdict(list)
    for r, ds in zip(results, data_sources):
        by_source[ds].append(r["score"])
    for ds, vals in sorted(by_source.items()):
        out[f"{prefix}/by_source/{ds}"] = sum(vals) / len(vals)
    comp: dict[str, list[float]] = collections.defaultdict(list)
    for r in results:
        for name, v in r["components"].items():
            comp[name].append(v)
    for name, vals in sorted(comp.items()):
        out[f"{prefix}/component/{name}"] = sum(vals) / len(vals)
    failures = collections.Counter(f for r in results for f in r["failures"])
    for kind, count in sorted(failures.items()):
        out[f"{prefix}/failures/{kind}"] = float(count)
    out[f"{prefix}/failures/total"] = float(sum(failures.values()))
    return out
