"""torch threads follow the engines (trainer.torch_threads: 0): all the node's CPUs while the rollout engines are
idle, those the engines do not hold while an asynchronous generation is in flight; a fixed count otherwise."""
import dataclasses
import os

import pytest
import torch

from posttrain.config import Recipe
from posttrain.orchestration import TrainerGroup
from posttrain.trainer.worker import TrainerRank, trainer_settings

pytestmark = pytest.mark.unit


def _recipe(torch_threads: int, async_steps: int) -> Recipe:
    return Recipe.model_validate({
        "name": "threads", "model": {"path": "posttrain/toy/assets/toy-base"},
        "data": {"train_files": ["recipes/data/add/train.jsonl"]}, "total_steps": 1,
        "rewards": {"functions": [{"name": "math"}]}, "rollout": {"async_steps": async_steps},
        "trainer": {"torch_threads": torch_threads}})


@pytest.fixture
def two_cpus(monkeypatch):
    """Two CPUs, and torch's thread count as a plain value: an in-process vLLM engine earlier in the same pytest
    process replaces torch.set_num_threads with a no-op (vllm/v1/worker/cpu_worker.py), so the real one cannot be
    relied on here (a trainer actor never hosts an engine)."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    threads = {"n": 4}
    monkeypatch.setattr(torch, "set_num_threads", lambda n: threads.update(n=n))
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads["n"])


@pytest.mark.parametrize("torch_threads,async_steps,busy,idle", [(0, 1, 1, 2), (0, 0, 2, 2), (1, 1, 1, 1), (2, 0, 2, 2)])
def test_rank_threads_follow_the_engines_only_with_torch_threads_zero(two_cpus, torch_threads, async_steps, busy, idle):
    settings = trainer_settings(_recipe(torch_threads, async_steps), objective=None)
    rank = TrainerRank(0, 1, settings)
    assert rank.fit_threads(engines_busy=True) == busy == torch.get_num_threads()
    assert rank.fit_threads(engines_busy=False) == idle == torch.get_num_threads()


def test_group_asks_the_ranks_only_when_the_engines_state_changes():
    group = object.__new__(TrainerGroup)        # the switching logic alone, without Ray actors
    calls = []
    group.call_all = lambda method, *args: calls.append((method, *args))
    group._adaptive_threads, group._busy_state = True, None
    states = iter([True, True, False, False, True])
    group.engines_busy = lambda: next(states)
    for _ in range(5):
        group._fit_threads()
    assert calls == [("fit_threads", True), ("fit_threads", False), ("fit_threads", True)]
    group._adaptive_threads = False                # a fixed torch_threads: never a call
    group._fit_threads()
    assert len(calls) == 3
