"""MOPD end to end: real Ray, a vLLM rollout engine, two real vLLM teachers time-sharing ONE engine (weights
swapped in memory), the torch student. The sampled-token reverse KL to the routed teacher must fall; a resumed
run must continue exactly where the checkpoint left off."""
import json
import os
import random
import subprocess
import sys
import time

import pytest

from posttrain.toy.tasks import make_rows, write_jsonl
from tests.helpers import REPO, sigkill_at_random_step

pytestmark = [pytest.mark.integration]


def _write_recipe(tmp_path, family, **overrides):
    data = tmp_path / "data"
    data.mkdir(exist_ok=True)
    for d in ("add", "sub"):
        write_jsonl(make_rows([d], 200, 0, "train"), str(data / f"{d}-train.jsonl"))
        write_jsonl(make_rows([d], 8, 0, "eval"), str(data / f"{d}-eval.jsonl"))
    recipe = {
        "name": "mopd-test", "seed": 0, "total_steps": 10,
        "model": {"path": family["student"]},
        "data": {"train_files": [str(data / "add-train.jsonl"), str(data / "sub-train.jsonl")],
                 "eval_files": [str(data / "add-eval.jsonl"), str(data / "sub-eval.jsonl")], "eval_every": 0},
        "rollout": {"prompts_per_step": 8, "n": 4, "max_tokens": 8, "eval_n": 2},
        "rewards": {"functions": [{"name": "posttrain.toy.rewards:exact_answer"}], "max_concurrency": 2},
        "trainer": {"optimizer": {"lr": 1e-3}},
        "algorithm": {"type": "mopd", "top_k": 8, "resident_engines": 1, "mini_batches": 1,
                 "teachers": [{"name": "add", "path": family["add"], "labels": ["toy/add"]},
                              {"name": "sub", "path": family["sub"], "labels": ["toy/sub"]}]},
        "checkpoint": {"every": 5, "keep_last": 2}, "ray": {"num_cpus": 5},
    }
    recipe.update(overrides)
    path = tmp_path / "mopd.yaml"
    path.write_text(json.dumps(recipe))
    return str(path)


def _run(recipe, run_dir, timeout=900):
    return subprocess.run([sys.executable, "-m", "posttrain.cli", "run", recipe, "--run-dir", run_dir, "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, PYTHONPATH=REPO))


def _steps(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["step"] >= 1]


def _run_ten_steps(recipe, run_dir):
    """Run the recipe to its end (10 steps) and return its step records."""
    out = _run(recipe, run_dir)
    assert out.returncode == 0, out.stderr[-4000:]
    steps = _steps(run_dir)
    assert [r["step"] for r in steps] == list(range(1, 11))
    return steps


def test_two_vllm_teachers_distil_and_reverse_kl_falls_then_resume_continues_exactly(tmp_path, tiny_family):
    recipe = _write_recipe(tmp_path, tiny_family)
    run_dir = str(tmp_path / "run")
    steps = _run_ten_steps(recipe, run_dir)
    for r in steps:
        for key in ("mopd/reverse_kl", "mopd/overlap_ratio", "mopd/empty_overlap_frac", "mopd/student_mass_on_overlap",
                    "mopd/teacher_mass_on_overlap", "mopd/gate_drop_frac", "mopd/loop_seq_frac",
                    "mopd/reverse_kl/add", "mopd/reverse_kl/sub", "mopd/token_share/add", "mopd/token_share/sub",
                    "reward/mean", "time/teacher_s", "loss/loss"):
            assert key in r, key
        assert abs(r["mopd/token_share/add"] + r["mopd/token_share/sub"] - 1) < 1e-6
        assert 68 <= r["teachers/payload_bytes_per_token"] < 68 + 8 + 1   # k=8: 8k+4 = 68 B per token + offsets
        assert r["rollout/canary_max_abs_diff"] < 2e-3
    # Both teachers in every batch, one engine: the pool swaps weights at least once per step.
    assert all(r["teachers/swaps"] >= 1 for r in steps)
    # The student moves towards its routed teachers: the sampled-token reverse KL falls.
    # (Measured: 2.3, 4.4, 4.2, 3.8, 3.2, 2.9, 2.6, 2.6, 2.2, 2.5 — the first full-size Adam step overshoots,
    # then the KL falls steadily; so the test compares the end with the early peak.)
    kl = [r["mopd/reverse_kl"] for r in steps]
    assert min(kl) > 0.05, kl                       # the teachers really differ from the student
    assert (kl[-1] + kl[-2]) / 2 < 0.7 * max(kl[:3]), kl
    assert os.path.isfile(os.path.join(run_dir, "final", "model.safetensors"))

    # Exact resume: SIGKILL a second run of the same recipe (its whole process group: driver, Ray, engines) at a
    # random point after its first checkpoint, re-run the same command, and compare with the uninterrupted run:
    # the same steps, and bitwise the same final weights.
    from safetensors.torch import load_file
    reference = load_file(os.path.join(run_dir, "final", "model.safetensors"))
    killed_dir = str(tmp_path / "killed")
    rng = random.Random(int(os.environ.get("POSTTRAIN_TEST_SEED", time.time())))
    killed_at = sigkill_at_random_step(["run", recipe, "--run-dir", killed_dir, "--no-progress"], killed_dir, rng,
                                       [5, 6, 7, 8])
    assert killed_at < 10, "the run finished before it could be killed"
    again = _run(recipe, killed_dir)
    assert again.returncode == 0, again.stderr[-4000:]
    assert "resuming" in again.stdout
    assert [r["step"] for r in _steps(killed_dir)] == list(range(1, 11))   # no step twice, none skipped
    resumed = load_file(os.path.join(killed_dir, "final", "model.safetensors"))
    assert set(resumed) == set(reference)
    for name in reference:
        assert (resumed[name] == reference[name]).all(), f"{name} differs (killed after step {killed_at})"
    for a, b in zip(steps, _steps(killed_dir)):
        assert a["mopd/reverse_kl"] == b["mopd/reverse_kl"]


def test_rest_bucket_run_distils_and_logs_its_term(tmp_path, tiny_family):
    """`algorithm.rest_bucket: true` through the whole loop (driver arrays → trainer objective): the reverse KL
    still falls, a(R) is logged, and the trainer and the engine agree on the sampled tokens."""
    recipe = _write_recipe(tmp_path, tiny_family)
    with open(recipe) as f:
        tree = json.load(f)
    tree["algorithm"]["rest_bucket"] = True
    tree["checkpoint"] = {"every": 10, "keep_last": 1}
    with open(recipe, "w") as f:
        json.dump(tree, f)
    steps = _run_ten_steps(recipe, str(tmp_path / "run"))
    for r in steps:
        assert r["mopd/rest_adv_mean"] == r["mopd/rest_adv_mean"] and r["mopd/rest_adv_mean"] != 0.0, r
        assert r["mopd/train_inference_abs_diff"] < 1e-3, r
    kl = [r["mopd/reverse_kl"] for r in steps]
    assert (kl[-1] + kl[-2]) / 2 < 0.7 * max(kl[:3]), kl


def test_mopd_on_two_fsdp_ranks_matches_the_plain_trainer(tmp_path, tiny_family):
    """trainer.fsdp: true with MOPD: the student's top-k (S_θ) and the per-candidate loss run inside FSDP's
    gathered forward on packed rows, over 2 sharded ranks. Same batches, same weights at step 1: the driver's
    MOPD arrays, the loss and the gradient norm equal the plain 1-rank trainer's within fp32 noise, and the
    3-step weights agree."""
    from safetensors.torch import load_file

    recipe = _write_recipe(tmp_path, tiny_family, total_steps=3, checkpoint={"every": 3, "keep_last": 1})
    runs = {}
    for name, extra in (("plain", []), ("fsdp", ["trainer.fsdp=true", "trainer.num_workers=2"])):
        run_dir = str(tmp_path / name)
        out = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", recipe, *extra, "--run-dir", run_dir,
                              "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=900,
                             env=dict(os.environ, PYTHONPATH=REPO))
        assert out.returncode == 0, out.stderr[-4000:]
        runs[name] = (_steps(run_dir), load_file(os.path.join(run_dir, "final", "model.safetensors")))
    (plain, w_plain), (fsdp, w_fsdp) = runs["plain"], runs["fsdp"]
    assert [r["step"] for r in fsdp] == [1, 2, 3]
    first_plain, first_fsdp = plain[0], fsdp[0]
    assert first_fsdp["reward/mean"] == first_plain["reward/mean"]          # the same samples
    for key in ("mopd/reverse_kl", "mopd/overlap_ratio", "mopd/student_mass_on_overlap", "loss/loss"):
        assert first_fsdp[key] == pytest.approx(first_plain[key], rel=1e-4, abs=1e-6), key
    assert first_fsdp["loss/grad_norm"] == pytest.approx(first_plain["loss/grad_norm"], rel=1e-3)
    assert set(w_fsdp) == set(w_plain)
    moved = max(float((w_plain[n] - load_file(os.path.join(tiny_family["student"], "model.safetensors"))[n])
                      .abs().max()) for n in w_plain)
    worst = max(float((w_fsdp[n] - w_plain[n]).abs().max()) for n in w_plain)
    assert worst < 0.05 * moved, (worst, moved)
