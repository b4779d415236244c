"""One-step-off asynchronous rollout (`rollout.async_steps: 1`): the importance weight against the behaviour policy,
and resume that keeps the batch in flight (nothing dropped, nothing counted twice)."""
import json
import os
import random
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, sigkill_at_random_step

ASYNC = ["recipes/smoke.yaml", "total_steps=5", "rollout.async_steps=1"]


@pytest.mark.unit
def test_truncated_importance_weight_is_the_length_normalised_ratio():
    from posttrain.algorithms.gspo import truncated_importance_weights

    old = torch.tensor([[-1.0, -2.0, 0.0], [-1.0, -1.0, -1.0], [-0.5, -0.5, -0.5]])
    mu = torch.tensor([[-1.5, -2.5, -9.0], [-1.0, -1.0, -1.0], [-5.0, -5.0, -5.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 1.0, 1.0], [1.0, 1.0, 1.0]])
    w = truncated_importance_weights(old, mu, mask, cap=2.0)
    # exp(mean(0.5, 0.5)) = e^0.5 (the padded position is ignored); equal policies: 1; a far older μ: capped.
    torch.testing.assert_close(w, torch.tensor([float(torch.exp(torch.tensor(0.5))), 1.0, 2.0]))


def _run(args):
    return subprocess.run([sys.executable, "-m", "posttrain.cli", "run", *args, "--no-progress"], cwd=REPO,
                          capture_output=True, text=True, timeout=900, env=dict(os.environ, PYTHONPATH=REPO))


def _records(run_dir):
    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]


@pytest.mark.integration
@pytest.mark.slow
def test_async_resume_keeps_the_batch_in_flight(tmp_path):
    """An uninterrupted asynchronous run against one SIGKILLed at a random step and resumed: the same steps once
    each, the same rewards per step (the in-flight batch came back from the checkpoint, not re-sampled from other
    weights), bitwise the same final weights."""
    reference = str(tmp_path / "reference")
    out = _run([*ASYNC, "--run-dir", reference])
    assert out.returncode == 0, out.stderr[-3000:]
    ref = _records(reference)
    assert all(r["rollout/importance_weight_mean"] > 0 for r in ref if r["step"] > 0)

    rng = random.Random(int(os.environ.get("POSTTRAIN_TEST_SEED", time.time())))
    run_dir = str(tmp_path / "killed")
    killed_at = sigkill_at_random_step(["run", *ASYNC, "--run-dir", run_dir, "--no-progress"], run_dir, rng,
                                       [1, 2, 3])
    assert killed_at < 5, "the run finished before it could be killed; the test proved nothing"
    out = _run([*ASYNC, "--run-dir", run_dir])
    assert out.returncode == 0, out.stderr[-3000:]
    got = _records(run_dir)
    assert [r["step"] for r in got] == [r["step"] for r in ref]            # none lost, none twice
    assert [r.get("reward/mean") for r in got] == [r.get("reward/mean") for r in ref]
    a = load_file(os.path.join(reference, "final", "model.safetensors"))
    b = load_file(os.path.join(run_dir, "final", "model.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a), f"weights differ after a resume (killed after step {killed_at})"
