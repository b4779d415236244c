"""Multi-turn environments through the one loop: observations masked out of the loss, env metrics, trajectory
dumps, and exact resume (a run extended from its checkpoint ends bitwise where an uninterrupted one does)."""
import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

ENV = textwrap.dedent("""
    from envs import Env, Observation, StepResult

    class AskTwice(Env):
        '''Two turns: the first answer is met with "Are you sure?", the second is scored.'''
        def __init__(self, row, **kwargs):
            self.row, self.turn = row, 0

        def initial_observation(self):
            return Observation(self.row["prompt"])

        def step(self, action):
            self.turn += 1
            if self.turn == 1:
                return StepResult([{"role": "user", "content": "Are you sure? Answer again."}], info={"tool_calls": 1})
            truth = str(self.row["reward_model"]["ground_truth"])
            return StepResult([], reward=float(action.strip().endswith(truth)), done=True)
""")


def _run(recipe, run_dir, *extra):
    out = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", recipe, *extra, "--run-dir", run_dir,
                          "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=900,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr[-3000:]


def test_multi_turn_run_masks_observations_dumps_trajectories_and_resumes_exactly(tmp_path):
    env_file = tmp_path / "ask_twice.py"
    env_file.write_text(ENV)
    recipe = tmp_path / "agent.yaml"
    recipe.write_text(json.dumps({
        "name": "agent-test", "seed": 0, "total_steps": 3,
        "model": {"path": os.path.join(REPO, "posttrain/toy/assets/toy-base")},
        "data": {"train_files": [os.path.join(REPO, "recipes/data/add/train.jsonl")],
                 "eval_files": [os.path.join(REPO, "recipes/data/add/eval.jsonl")], "eval_every": 0,
                 "eval_max_prompts": 4},
        "rollout": {"prompts_per_step": 4, "n": 4, "eval_n": 1},
        "environment": {"name": f"{env_file}:AskTwice", "max_turns": 3, "max_tokens_per_turn": 12,
                        "dump_trajectories": 2},
        "algorithm": {"type": "gspo", "mini_batches": 2},
        "trainer": {"optimizer": {"lr": 2e-4}}, "checkpoint": {"every": 1}}))
    whole, extended = str(tmp_path / "whole"), str(tmp_path / "extended")
    _run(str(recipe), whole)
    records = [json.loads(line) for line in open(os.path.join(whole, "metrics.jsonl"))]
    steps = [r for r in records if "reward/mean" in r]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["env/turns_mean"] == 2.0 and r["env/tool_calls_mean"] == 1.0
        assert 0 < r["env/policy_token_frac"] < 1            # observation tokens are in the ids, mask 0
        assert "reward/component/env" in r
    dump = open(os.path.join(whole, "trajectories", "step_000003.txt")).read()
    assert "⟦" in dump and "Are you sure? Answer again." in dump
    # The observation sits inside a masked span: it carries no loss.
    masked = "".join(part.split("⟧")[0] for part in dump.split("⟦")[1:])
    assert "Are you sure? Answer again." in masked

    _run(str(recipe), extended, "total_steps=2")
    _run(str(recipe), extended, "total_steps=3", "--allow-change", "total_steps")
    a = load_file(os.path.join(whole, "final", "model.safetensors"))
    b = load_file(os.path.join(extended, "final", "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), "a multi-turn run resumed from its checkpoint diverged"
    again = [json.loads(line) for line in open(os.path.join(extended, "metrics.jsonl"))]
    assert [r.get("reward/mean") for r in again if "reward/mean" in r] == [r["reward/mean"] for r in steps]
