"""A run scores rewards every step in the same reward processes (posttrain/rewards_runner.py `RayTasks`): with
plain Ray tasks, Ray started fresh worker processes at every reward step (and killed them, idle, during the
update), two Python starts per step on a 2-core machine: the quickstart's 0.5–1 s reward step
(benchmarks/VS_TRL.md)."""
import os
import threading
import time

import psutil
import pytest

from posttrain.config import parse_recipe
from posttrain.orchestration import start_ray, stop_ray
from posttrain.rewards_runner import RewardFn, release_reward_servers, score_batch

PID_REWARD = """import os, time
def score(data_source, solution_str, ground_truth, extra_info=None):
    time.sleep(0.05)  # long enough that all reward slots are busy at once
    return {"score": 1.0, "pid": os.getpid()}
"""


def processes_started_during(action) -> set[int]:
    """The pids of this process's descendants that started while `action()` ran (polled every 20 ms, so
    short-lived ones are seen too)."""
    me, since, seen, done = psutil.Process(), time.time(), set(), threading.Event()

    def watch():
        while not done.is_set():
            for child in me.children(recursive=True):
                try:
                    if child.create_time() >= since - 0.05:
                        seen.add(child.pid)
                except psutil.NoSuchProcess:
                    pass
            time.sleep(0.02)
    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        action()
    finally:
        done.set()
        watcher.join()
    return seen


@pytest.mark.integration
def test_reward_steps_reuse_the_same_worker_processes(tmp_path):
    import ray

    path = tmp_path / "pid_reward.py"
    path.write_text(PID_REWARD)
    recipe = parse_recipe({"name": "x", "total_steps": 1, "model": {"path": "m"}, "data": {"train_files": ["a.jsonl"]},
                           "rewards": {"functions": [{"name": f"{path}:score"}], "max_concurrency": 4,
                                       "samples_per_task": 4},
                           "ray": {"num_cpus": 4}})
    fn = RewardFn(f"{path}:score", 1.0, (), None)
    samples = [{"data_source": "d", "solution": "x", "ground_truth": "1", "extra_info": {}} for _ in range(64)]
    start_ray(recipe)
    try:
        @ray.remote(num_cpus=0)
        class Busy:  # stands for the trainer: an actor holding a worker process for the whole run
            def pid(self):
                return os.getpid()

        busy = [Busy.remote() for _ in range(2)]  # the trainer and the engine
        ray.get([b.pid.remote() for b in busy])
        steps = []

        def reward_step_then_update():
            results = score_batch([fn], samples, timeout_s=30, max_concurrency=4, samples_per_task=4)
            steps.append({r["details"][fn.name]["pid"] for r in results})
            time.sleep(2.5)  # the update: Ray kills workers idle for 1 s beyond its soft limit

        reward_step_then_update()
        started = processes_started_during(lambda: [reward_step_then_update() for _ in range(2)])
        assert len(steps[0]) >= 2, steps  # the slots had their own processes
        assert steps[1] == steps[2] == steps[0], steps
        assert started == set(), f"processes started during later reward steps: {started}"
    finally:
        release_reward_servers()
        stop_ray()
