"""Exact resume: SIGKILL a run at a random point, re-run the same command, and get bitwise the weights of an
uninterrupted run; changed recipes are refused unless the change is safe and allowed; resume with different
worker counts; `posttrain status`."""
import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file

from tests.helpers import REPO, sigkill_at_random_step

pytestmark = [pytest.mark.integration, pytest.mark.slow]

SMOKE = ["recipes/smoke.yaml", "total_steps=5"]


def _cmd(args):
    return [sys.executable, "-m", "posttrain.cli", *args]


def _env():
    return dict(os.environ, PYTHONPATH=REPO)


def _run(args, timeout=900):
    return subprocess.run(_cmd(["run", *args, "--no-progress"]), cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env=_env())


def _steps(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [json.loads(line)["step"] for line in f if line.strip()]


def _weights(run_dir):
    return load_file(os.path.join(run_dir, "final", "model.safetensors"))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    run_dir = str(tmp_path_factory.mktemp("uninterrupted") / "run")
    out = _run([*SMOKE, "--run-dir", run_dir])
    assert out.returncode == 0, out.stderr[-3000:]
    return run_dir


def _sigkill_at_random_point(run_dir, rng):
    """SIGKILL a smoke run at a random point after its first completed step."""
    return sigkill_at_random_step(["run", *SMOKE, "--run-dir", run_dir, "--no-progress"], run_dir, rng, [1, 2, 3])


def test_sigkill_then_resume_is_bitwise_identical(uninterrupted, tmp_path):
    rng = random.Random(int(os.environ.get("POSTTRAIN_TEST_SEED", time.time())))
    run_dir = str(tmp_path / "run")
    killed_at = _sigkill_at_random_point(run_dir, rng)
    assert killed_at < 5, "the run finished before it could be killed; the test proved nothing"
    out = _run([*SMOKE, "--run-dir", run_dir])
    assert out.returncode == 0, out.stderr[-3000:]
    assert "resuming" in out.stdout or killed_at == 0
    assert _steps(run_dir) == _steps(uninterrupted)          # no step lost, none counted twice
    a, b = _weights(uninterrupted), _weights(run_dir)
    assert set(a) == set(b)
    for name in a:
        assert (a[name] == b[name]).all(), f"{name} differs after resume (killed after step {killed_at})"
    with open(os.path.join(uninterrupted, "metrics.jsonl")) as f:
        ref = [json.loads(line) for line in f]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        got = [json.loads(line) for line in f]
    assert [r.get("reward/mean") for r in ref] == [r.get("reward/mean") for r in got]

    status = subprocess.run(_cmd(["status", run_dir, "--json"]), cwd=REPO, capture_output=True, text=True,
                            env=_env())
    info = json.loads(status.stdout)
    assert info["state"] == "finished" and info["step"] == 5 and info["latest_checkpoint"].endswith("step_000005")


def test_changed_recipe_refused_then_extended_and_resharded(uninterrupted, tmp_path):
    import shutil
    run_dir = str(tmp_path / "run")
    shutil.copytree(uninterrupted, run_dir)
    # An unsafe change (what a step computes) is refused, naming the key.
    out = _run([*SMOKE, "rollout.temperature=0.5", "--run-dir", run_dir])
    assert out.returncode == 2 and "rollout.temperature" in out.stderr
    # A safe change needs the user's word.
    out = _run(["recipes/smoke.yaml", "total_steps=6", "--run-dir", run_dir])
    assert out.returncode == 2 and "--allow-change total_steps" in out.stderr
    # Extended by one step, on 2 rollout workers and 2 trainer ranks instead of 1 and 1.
    out = _run(["recipes/smoke.yaml", "total_steps=6", "rollout.num_workers=2", "trainer.num_workers=2",
                "--allow-change", "total_steps", "--allow-change", "rollout.num_workers",
                "--allow-change", "trainer.num_workers", "--run-dir", run_dir])
    assert out.returncode == 0, out.stderr[-3000:]
    assert _steps(run_dir) == [0, 1, 2, 3, 4, 5, 6]
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        last = [json.loads(line) for line in f][-1]
    assert last["rollout/canary_max_abs_diff"] < 2e-3


def test_ctrl_c_leaves_no_orphans_and_checkpoint_intact(tmp_path):
    import psutil
    run_dir = str(tmp_path / "run")
    # 30 steps: with a faster start-up and reward step, 5 steps could end before the signal landed (seen once)
    proc = subprocess.Popen(_cmd(["run", SMOKE[0], "total_steps=30", "--run-dir", run_dir, "--no-progress"]),
                            cwd=REPO, env=_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
        if os.path.exists(os.path.join(run_dir, "checkpoints", "latest")):
            break
        time.sleep(0.2)
    os.killpg(proc.pid, signal.SIGINT)                     # what Ctrl-C in a terminal does
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode != 0 and "checkpoint" in stderr
    time.sleep(3)
    survivors = []
    for p in psutil.process_iter(["pid", "cmdline"]):
        try:
            if os.getpgid(p.info["pid"]) == proc.pid:
                survivors.append(" ".join(p.info["cmdline"] or [])[:120])
        except (ProcessLookupError, psutil.NoSuchProcess):
            pass
    assert survivors == [], survivors
    from posttrain import checkpoint as ckpt
    latest = ckpt.latest_checkpoint(run_dir)
    assert latest is not None and os.path.exists(os.path.join(latest, "model", "model.safetensors"))
    # ... and the same command resumes from it.
    out = _run([SMOKE[0], "total_steps=30", "--run-dir", run_dir])
    assert out.returncode == 0 and "resuming" in out.stdout, out.stderr[-2000:]
