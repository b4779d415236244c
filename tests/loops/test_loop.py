"""The one loop and its algorithm parts: the recipe's algorithm block, GRPO as a third part, the non-finite guard,
the NaN canary, an atomic end of run, and no process of a run outliving it."""
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from posttrain.config import RecipeError, parse_recipe
from tests.helpers import REPO

BASE = {"name": "x", "total_steps": 1, "model": {"path": "m"}, "data": {"train_files": ["a.jsonl"]},
        "rewards": {"functions": [{"name": "math"}]}}
TEACHERS = [{"name": "a", "path": "p", "labels": ["x"]}]


# ---------------------------------------------------------------------------------------------------------------
# The algorithm block


@pytest.mark.unit
def test_each_algorithm_reads_only_its_own_block():
    # MOPD with 5 mini-batches used to be refused because of gspo.mini_batches = 4 (not divisible).
    recipe = parse_recipe({**BASE, "rollout": {"prompts_per_step": 5, "n": 4},
                           "algorithm": {"type": "mopd", "mini_batches": 5, "teachers": TEACHERS}})
    assert recipe.algorithm.type == "mopd" and recipe.optimizer_steps_per_step == 5
    assert parse_recipe(BASE).algorithm.type == "gspo"          # the default algorithm
    grpo = parse_recipe({**BASE, "algorithm": {"type": "grpo"}}).algorithm
    assert (grpo.clip_low, grpo.clip_high) == (0.2, 0.28)          # its own defaults, not GSPO's 3e-4 / 4e-4


@pytest.mark.unit
def test_algorithm_errors_name_the_users_path():
    with pytest.raises(RecipeError, match=r"`algorithm.clip_lo`: unknown key; did you mean `algorithm.clip_low`"):
        parse_recipe({**BASE, "algorithm": {"type": "gspo", "clip_lo": 0.1}})
    with pytest.raises(RecipeError, match=r"`algorithm.teachers`: required field is missing"):
        parse_recipe({**BASE, "algorithm": {"type": "mopd"}})
    with pytest.raises(RecipeError, match=r"does not match any of the expected tags: 'gspo', 'grpo', 'mopd'"):
        parse_recipe({**BASE, "algorithm": {"type": "ppo"}})
    with pytest.raises(RecipeError, match=r"`algorithm.rl_mix.alpha`"):
        parse_recipe({**BASE, "algorithm": {"type": "mopd", "teachers": TEACHERS, "rl_mix": {"alpha": -1}}})


@pytest.mark.unit
def test_old_recipe_shape_gets_its_rewrite():
    old = {**BASE, "algorithm": "mopd", "gspo": {"mini_batches": 1, "clip_low": 1e-3},
           "mopd": {"top_k": 8, "rl_alpha": 0.5, "teachers": TEACHERS}}
    with pytest.raises(RecipeError) as err:
        parse_recipe(old)
    message = str(err.value)
    assert "old shape" in message and "type: mopd" in message and "delete the `mopd:` section" in message
    # The suggested block is itself a valid recipe: the RL-mix settings moved under algorithm.rl_mix.
    assert "rl_mix:" in message and "alpha: 0.5" in message and "clip_low: 0.001" in message
    fixed = {**BASE, "algorithm": {"type": "mopd", "top_k": 8, "teachers": TEACHERS,
                                   "rl_mix": {"alpha": 0.5, "clip_low": 1e-3}}}
    assert parse_recipe(fixed).algorithm.rl_mix.alpha == 0.5
    with pytest.raises(RecipeError, match=r"type: gspo\n +mini_batches: 2"):
        parse_recipe({**BASE, "algorithm": "gspo", "gspo": {"mini_batches": 2}})


# ---------------------------------------------------------------------------------------------------------------
# GRPO, the third algorithm part


@pytest.mark.unit
def test_grpo_loss_is_the_token_level_ppo_clip():
    from posttrain.algorithms.grpo import grpo_loss

    old = torch.log(torch.tensor([[0.5, 0.5, 0.5], [0.5, 0.5, 0.5]]))
    new = torch.log(torch.tensor([[0.8, 0.5, 0.1], [0.6, 0.5, 0.5]]))          # ratios 1.6, 1, 0.2 / 1.2, 1, (pad)
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    loss, metrics = grpo_loss(new, old, adv, mask, clip_low=0.2, clip_high=0.28)
    # seq 0 (A=+1): min(1.6, 1.28)=1.28, 1, min(0.2, 0.8)=0.2 → mean 0.8267; seq 1 (A=−1): min(−1.2, −1.2)… = −1.2, −1
    expected = -((1.28 + 1.0 + 0.2) / 3 + (-1.2 - 1.0) / 2) / 2
    assert float(loss) == pytest.approx(expected, rel=1e-6)
    assert metrics["loss/clip_frac"] == pytest.approx(1 / 5)   # only the 1.6 token is clipped


@pytest.mark.unit
def test_grpo_and_gspo_have_the_same_gradient_at_the_old_policy():
    """At θ = θ_old both ratios are 1 and nothing is clipped: both gradients are −(1/N) Σ_i A_i mean_t ∇log πθ."""
    from posttrain.algorithms.grpo import grpo_loss
    from posttrain.algorithms.gspo import gspo_loss

    torch.manual_seed(0)
    logits = torch.randn(4, 6, requires_grad=True)
    mask = (torch.rand(4, 6) > 0.3).float()
    adv = torch.randn(4)
    grads = []
    for fn in (grpo_loss, gspo_loss):
        lp = torch.nn.functional.logsigmoid(logits)
        loss, _ = fn(lp, lp.detach(), adv, mask)
        grads.append(torch.autograd.grad(loss, logits)[0])
    torch.testing.assert_close(grads[0], grads[1])


# ---------------------------------------------------------------------------------------------------------------
# Guards: non-finite updates, NaN canary


@pytest.fixture(scope="module")
def trainer_rank():
    """A real TrainerRank on the toy model, world size 1 (gloo), no Ray."""
    import torch.distributed as dist

    from posttrain.algorithms.gspo import gspo_loss
    from posttrain.trainer.objectives import PolicyGradientObjective
    from posttrain.trainer.worker import TrainerRank, free_port, trainer_settings

    recipe = parse_recipe({**BASE, "model": {"path": os.path.join(REPO, "posttrain/toy/assets/toy-base")},
                           "trainer": {"optimizer": {"lr": 1e-3}}})
    rank = TrainerRank(0, 1, trainer_settings(recipe, PolicyGradientObjective(gspo_loss, 3e-4, 4e-4)))
    created = not dist.is_initialized()   # an in-process vLLM engine of an earlier test may have made one
    rank.setup("127.0.0.1", free_port())
    yield rank
    if created:
        dist.destroy_process_group()


@pytest.mark.unit
def test_a_non_finite_update_is_skipped_and_leaves_the_weights_alone(trainer_rank):
    prompts, responses = [[1, 2, 3], [1, 2, 4]], [[5, 6], [7, 8, 9]]
    old = trainer_rank.compute_logprobs(prompts, responses)
    arrays = {"old_logprobs": np.array([old[0] + [0.0], old[1]], np.float32)}
    before = {k: v.clone() for k, v in trainer_rank.model.state_dict().items()}
    lr_before = trainer_rank.scheduler.get_last_lr()
    out = trainer_rank.train_minibatch(prompts, responses, {**arrays, "advantages": np.array([np.nan, 1.0],
                                                                                           np.float32)}, 2)
    assert out["loss/nonfinite_skipped"] == 1.0 and np.isnan(out["loss/grad_norm"])
    assert all(torch.equal(before[k], v) for k, v in trainer_rank.model.state_dict().items())
    assert trainer_rank.scheduler.get_last_lr() == lr_before and not trainer_rank.optimizer.state
    out = trainer_rank.train_minibatch(prompts, responses, {**arrays, "advantages": np.array([1.0, -1.0],
                                                                                           np.float32)}, 2)
    assert out["loss/nonfinite_skipped"] == 0.0
    assert not all(torch.equal(before[k], v) for k, v in trainer_rank.model.state_dict().items())


@pytest.mark.unit
def test_the_canary_fails_on_nan_and_on_an_engine_holding_another_weights_version():
    from posttrain.loops.run import StaleWeightsError, check_canary

    class Trainer:
        def call_collective(self, method, ids):
            return [-1.0, -2.0]

    class Rollout:
        def __init__(self, values, versions=(1,)):
            self.values, self.versions = values, list(versions)

        def canary(self, ids):
            return [self.values] * len(self.versions)

        def weight_versions(self):
            return self.versions

    recipe = parse_recipe(BASE)
    assert check_canary(recipe, Trainer(), Rollout([-1.0, -2.0005]), [1, 2, 3], 1) == pytest.approx(5e-4)
    with pytest.raises(StaleWeightsError, match="NaN means non-finite weights"):
        check_canary(recipe, Trainer(), Rollout([-1.0, float("nan")]), [1, 2, 3], 1)
    # Log-probs that agree do not hide an engine one version behind (in bf16 a one-step-old engine is within noise).
    with pytest.raises(StaleWeightsError, match="rollout worker 1 holds weights version 1, the trainer's are version 2"):
        check_canary(recipe, Trainer(), Rollout([-1.0, -2.0], versions=(2, 1)), [1, 2, 3], 2)


@pytest.mark.unit
def test_step_timer_spans():
    from posttrain.metrics import StepTimer

    timer = StepTimer()
    timer.start_step()
    with timer.span("rollout"):
        pass
    with timer.span("update"):
        pass
    with timer.span("update"):
        pass
    m = timer.metrics()
    assert set(m) == {"time/step_s", "time/rollout_s", "time/update_s", "time/rollout_share", "time/update_share"}
    assert 0 <= m["time/rollout_s"] + m["time/update_s"] <= m["time/step_s"]


# ---------------------------------------------------------------------------------------------------------------
# End to end: GRPO through the one loop; an end of run that completes; no process outlives the run


def _ray_pids() -> set[int]:
    import psutil
    out = set()
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if "ray::" in cmd or "raylet" in cmd or "gcs_server" in cmd:
            out.add(proc.info["pid"])
    return out


@pytest.mark.integration
def test_grpo_run_with_a_thread_leaking_reward_leaves_no_process_and_ends_atomically(tmp_path):
    reward = tmp_path / "leaky.py"
    reward.write_text(textwrap.dedent("""
        import threading, time
        from posttrain.toy.rewards import exact_answer

        def compute_score(data_source, solution_str, ground_truth, extra_info=None):
            # A careless reward: a non-daemon thread that never ends keeps its worker process alive.
            threading.Thread(target=time.sleep, args=(3600,), daemon=False).start()
            return exact_answer(data_source, solution_str, ground_truth, extra_info)
    """))
    run_dir = str(tmp_path / "run")
    before = _ray_pids()
    args = [sys.executable, "-m", "posttrain.cli", "run", "recipes/smoke.yaml", "total_steps=2",
            "algorithm.type=grpo", f"rewards.functions=[{{name: {reward}:compute_score}}]", "--run-dir", run_dir,
            "--no-progress"]
    env = dict(os.environ, PYTHONPATH=REPO)
    out = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert out.returncode == 0, out.stderr[-3000:]
    records = [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))]
    assert [r["step"] for r in records if "reward/mean" in r] == [1, 2]
    assert all("loss/ratio_mean" in r for r in records if "reward/mean" in r)   # GRPO's own loss ran
    leftover = _ray_pids() - before
    assert not leftover, f"processes of the run outlived it: {leftover}"

    # A kill between the final model and the summary: the run is not finished, and the same command completes
    # the end (no step trained again, no metric line added).
    os.remove(os.path.join(run_dir, "summary.json"))
    os.remove(os.path.join(run_dir, "final", "COMPLETE"))
    status = subprocess.run([sys.executable, "-m", "posttrain.cli", "status", run_dir, "--json"], cwd=REPO,
                            capture_output=True, text=True, env=env)
    assert json.loads(status.stdout)["state"] != "finished", status.stdout
    again = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert again.returncode == 0 and "nothing to do" not in again.stdout, again.stderr[-3000:]
    assert os.path.isfile(os.path.join(run_dir, "summary.json"))
    assert os.path.isfile(os.path.join(run_dir, "final", "COMPLETE"))
    assert [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl"))] == records
    third = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=600, env=env)
    assert third.returncode == 0 and "nothing to do" in third.stdout


@pytest.mark.integration
def test_a_reward_failing_on_most_samples_is_loud_and_stops_the_run(tmp_path):
    reward = tmp_path / "broken.py"
    reward.write_text("def compute_score(data_source, solution_str, ground_truth, extra_info=None):\n"
                      "    return {'score': 1.0, 'x': 1 / 0}\n")
    run_dir = str(tmp_path / "run")
    out = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", "recipes/smoke.yaml", "total_steps=5",
                          f"rewards.functions=[{{name: {reward}:compute_score}}]", "rewards.max_failing_steps=2",
                          "data.eval_files=[]", "--run-dir", run_dir, "--no-progress"],
                         cwd=REPO, capture_output=True, text=True, timeout=600, env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 3, out.stderr[-3000:]
    assert "FAILED on 32/32 samples (exception:ZeroDivisionError: 32)" in out.stderr, out.stderr[-3000:]
    assert "in 2 steps in a row (rewards.max_failing_steps = 2)" in out.stderr
    assert "FAILED on" in open(os.path.join(run_dir, "events.log")).read()
    assert not os.path.exists(os.path.join(run_dir, "final"))


@pytest.mark.unit
def test_algorithm_type_defaults_to_gspo_in_a_partial_block():
    assert parse_recipe({**BASE, "algorithm": {"clip_low": 0.1}}).algorithm.clip_low == 0.1


@pytest.mark.unit
def test_observation_tokens_carry_no_loss(trainer_rank):
    """Multi-turn: the trainer's loss sees only the tokens the loss mask marks as policy-sampled. Changing π_old at
    the masked (observation) positions changes nothing; at a policy position it changes the loss."""
    from posttrain.trainer.objectives import PolicyGradientObjective
    from posttrain.algorithms.gspo import gspo_loss

    objective = PolicyGradientObjective(gspo_loss, 3e-4, 4e-4)
    prompts, responses = [[1, 2, 3], [1, 2, 4]], [[5, 6, 7, 8], [9, 10, 11, 12]]
    old = np.array(trainer_rank.compute_logprobs(prompts, responses), np.float32)
    loss_mask = np.array([[1, 1, 0, 0], [1, 0, 0, 1]], np.float32)      # 0: observation tokens
    base = {"old_logprobs": old, "advantages": np.array([1.0, -1.0], np.float32), "loss_mask": loss_mask}

    def loss(arrays):
        with torch.no_grad():
            return float(objective.loss(trainer_rank, prompts, responses, arrays)[0])

    shifted_masked = {**base, "old_logprobs": old - 5.0 * (1 - loss_mask)}
    shifted_policy = {**base, "old_logprobs": old - 5.0 * loss_mask}
    assert loss(shifted_masked) == loss(base)
    assert loss(shifted_policy) != loss(base)
    ones = {**base, "loss_mask": np.ones_like(loss_mask)}
    no_mask = {k: v for k, v in base.items() if k != "loss_mask"}
    assert loss(ones) == loss(no_mask)          # all-ones mask = the single-turn path, bitwise


@pytest.mark.unit
def test_rank_metrics_are_averaged_over_all_sequences_and_optimizer_metrics_taken_once():
    from posttrain.orchestration import merge_rank_metrics

    merged = merge_rank_metrics([{"loss/loss": 1.0, "loss/clip_frac": 0.5, "loss/grad_norm": 3.0, "loss/lr": 1e-3,
                                  "loss/nonfinite_skipped": 0.0, "_sequences": 3},
                                 {"loss/loss": -1.0, "loss/clip_frac": 0.0, "loss/grad_norm": 3.0, "loss/lr": 1e-3,
                                  "loss/nonfinite_skipped": 0.0, "_sequences": 1}])
    assert merged == {"loss/loss": 0.5, "loss/clip_frac": 0.375, "loss/grad_norm": 3.0, "loss/lr": 1e-3,
                      "loss/nonfinite_skipped": 0.0}


@pytest.mark.unit
def test_pi_old_from_the_training_forward_equals_the_separate_pass(trainer_rank):
    """OLD_FROM_OWN_FORWARD: the first mini-batch's π_old taken from its own forward, detached, gives the loss and
    gradient of π_old from a separate pass over the same weights."""
    from posttrain.trainer.objectives import OLD_FROM_OWN_FORWARD

    prompts, responses = [[1, 2, 3], [1, 2, 4], [3, 1]], [[5, 6], [7, 8, 9], [4]]
    old = trainer_rank.compute_logprobs(prompts, responses)
    arrays = {"old_logprobs": np.array([o + [0.0] * (3 - len(o)) for o in old], np.float32),
              "advantages": np.array([1.0, -0.5, 0.25], np.float32)}
    results = []
    for own in (False, True):
        extra = {OLD_FROM_OWN_FORWARD: np.array([True, True, True]),
                 "old_logprobs": np.zeros((3, 3), np.float32)} if own else {}
        trainer_rank.model.zero_grad(set_to_none=True)
        loss, _ = trainer_rank.objective.loss(trainer_rank, prompts, responses, {**arrays, **extra})
        loss.backward()
        results.append((float(loss), [p.grad.clone() for p in trainer_rank.model.parameters()]))
    trainer_rank.model.zero_grad(set_to_none=True)
    assert results[1][0] == pytest.approx(results[0][0], abs=1e-6)
    for g_separate, g_own in zip(results[0][1], results[1][1]):
        torch.testing.assert_close(g_own, g_separate, rtol=1e-4, atol=1e-6)
    assert any(float(g.abs().max()) > 0 for g in results[1][1])


class _RecordingTrainer:
    """What GSPO.update asks of the trainer group, recorded (the real group is tested in the run tests)."""

    def __init__(self):
        self.logprob_calls, self.minibatch_arrays = [], []

    def share_media(self, mm_prompts):
        return None

    def compute_logprobs(self, prompts, responses, media=None):
        self.logprob_calls.append(len(prompts))
        return [[-1.0] * len(r) for r in responses]

    def train_minibatch(self, prompts, responses, arrays, media=None):
        self.minibatch_arrays.append(arrays)
        return {"loss/policy": 0.0}


@pytest.mark.unit
@pytest.mark.parametrize("stale_steps", [0, 1])
def test_gspo_skips_the_pi_old_pass_of_the_first_minibatch_only_when_synchronous(stale_steps):
    from types import SimpleNamespace

    from posttrain.loops.algorithms import GSPO
    from posttrain.metrics import StepTimer
    from posttrain.trainer.objectives import OLD_FROM_OWN_FORWARD

    n = 8
    batch = SimpleNamespace(prompts=[[1, 2]] * n, responses=[[3] * (k + 1) for k in range(n)],
                            rewards=torch.tensor([0.0, 1.0] * 4), group_ids=torch.tensor([0, 0, 1, 1, 2, 2, 3, 3]),
                            mm_prompts=None, stale_steps=stale_steps, loss_masks=None,
                            sampling_logprobs=[[-1.0] * (k + 1) for k in range(n)], max_importance_weight=2.0)
    settings = SimpleNamespace(epochs=1, mini_batches=4, scale_by_std=True, eps=1e-6,
                               filter_equal_reward_groups=False)
    trainer = _RecordingTrainer()
    GSPO(settings).update(batch, trainer, StepTimer())
    assert len(trainer.minibatch_arrays) == 4
    if stale_steps:     # the importance weights π_old/μ need every π_old before the first step
        assert trainer.logprob_calls == [n]
        assert all(OLD_FROM_OWN_FORWARD not in a for a in trainer.minibatch_arrays)
    else:               # the first mini-batch (2 sequences) takes π_old from its own forward
        assert trainer.logprob_calls == [n - 2]
        assert trainer.minibatch_arrays[0][OLD_FROM_OWN_FORWARD].tolist() == [True, True]
        assert all(not a[OLD_FROM_OWN_FORWARD].any() for a in trainer.minibatch_arrays[1:])
