"""stop_ray kills what the embedded cluster leaves behind, and only that: a child the driver had before the
cluster started (here a multiprocessing forkserver, as `posttrain score`'s worker backend starts) survives. It used
to be killed and reaped, and the next LocalProcesses worker failed with "ChildProcessError: No child processes"
(seen in a fresh-clone CI run after a Ray test)."""
import multiprocessing

import psutil
import pytest

from posttrain.config import parse_recipe
from posttrain.orchestration import start_ray, stop_ray

pytestmark = [pytest.mark.integration]


def _square(x):
    return x * x


def test_children_started_before_the_cluster_survive_stop_ray():
    context = multiprocessing.get_context("forkserver")
    with context.Pool(1) as pool:
        assert pool.apply(_square, (3,)) == 9
    before = {p.pid for p in psutil.Process().children(recursive=True)}
    assert before, "the forkserver should be a child of this process"
    recipe = parse_recipe({"name": "x", "total_steps": 1, "model": {"path": "m"},
                           "data": {"train_files": ["a.jsonl"]}, "rewards": {"functions": [{"name": "math"}]},
                           "ray": {"num_cpus": 1}})
    start_ray(recipe)
    ray_children = {p.pid for p in psutil.Process().children(recursive=True)} - before
    stop_ray()
    after = {p.pid for p in psutil.Process().children(recursive=True)}
    assert before <= after                     # the forkserver is alive
    assert ray_children and not ray_children & after   # the cluster's processes are gone
    with context.Pool(1) as pool:              # and the forkserver still serves
        assert pool.apply(_square, (4,)) == 16
