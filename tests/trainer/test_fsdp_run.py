"""The FSDP2 trainer through real runs (trainer.fsdp: true): 2 sharded ranks against 1, and a sharded checkpoint
resumed on a different number of ranks. (The building blocks are tested on their own in test_fsdp.py.)"""
import pytest
import torch

from tests.helpers import final_weights, metrics_records, run_posttrain

pytestmark = [pytest.mark.integration, pytest.mark.slow]

FSDP = ["recipes/smoke.yaml", "trainer.fsdp=true", "data.eval_files=[]", "checkpoint.every=1"]


_run, _records, _weights = run_posttrain, metrics_records, final_weights


def test_two_sharded_ranks_match_one_and_resume_across_rank_counts(tmp_path):
    one, two, moved = str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "moved")
    _run([*FSDP, "total_steps=2", "--run-dir", one])
    _run([*FSDP, "total_steps=2", "trainer.num_workers=2", "--run-dir", two])
    a, b = _records(one), _records(two)
    # Step 1 trains on the same batch from the same weights: the same loss and gradient norm within fp32 noise.
    assert a[0]["reward/mean"] == b[0]["reward/mean"]
    assert a[0]["loss/grad_norm"] == pytest.approx(b[0]["loss/grad_norm"], rel=1e-4)
    assert a[0]["loss/policy"] == pytest.approx(b[0]["loss/policy"], abs=1e-6)
    wa, wb = _weights(one), _weights(two)
    assert set(wa) == set(wb)
    for name in wa:
        torch.testing.assert_close(wa[name], wb[name], rtol=1e-4, atol=1e-5, msg=name)
    # Resharding: 1 rank for step 1, then the sharded checkpoint resumed on 2 ranks for step 2.
    _run([*FSDP, "total_steps=1", "--run-dir", moved])
    out = _run([*FSDP, "total_steps=2", "trainer.num_workers=2", "--allow-change", "total_steps",
                "--allow-change", "trainer.num_workers", "--run-dir", moved])
    assert "resuming" in out.stdout
    assert [r["step"] for r in _records(moved)] == [1, 2]
    wm = _weights(moved)
    for name in wa:
        torch.testing.assert_close(wm[name], wa[name], rtol=1e-4, atol=1e-5, msg=name)


def test_offloaded_adamw_moments_train_like_the_resident_ones(tmp_path):
    """trainer.optimizer_offload through a run (recipe → settings → OffloadedAdamW on every sharded rank): the
    same weights as the default optimizer after 2 steps on 2 ranks."""
    plain, offloaded = str(tmp_path / "plain"), str(tmp_path / "offloaded")
    _run([*FSDP, "total_steps=2", "trainer.num_workers=2", "--run-dir", plain])
    _run([*FSDP, "total_steps=2", "trainer.num_workers=2", "trainer.optimizer_offload=true", "--run-dir", offloaded])
    a, b = _records(plain), _records(offloaded)
    assert [r["loss/grad_norm"] for r in a] == pytest.approx([r["loss/grad_norm"] for r in b], rel=1e-4)
    wa, wb = _weights(plain), _weights(offloaded)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5, msg=name)


def test_speed_options_train_like_the_defaults(tmp_path):
    """The GPU speed options through a run (recipe → settings → every sharded rank): weights kept gathered through
    the step (and held between micro-batches), rows padded to a multiple of 64, decoder layers compiled, the LM
    head's probabilities stored for the backward (fp32 here: the same math as the recompute) — the
    same losses and weights as the defaults after 2 steps on 2 ranks (a 128-token budget: several micro-batches per rank)."""
    plain, fast = str(tmp_path / "plain"), str(tmp_path / "fast")
    common = [*FSDP, "total_steps=2", "trainer.num_workers=2", "trainer.token_budget=128"]
    _run([*common, "--run-dir", plain])
    _run([*common, "trainer.keep_weights_gathered=true", "trainer.pad_to_multiple=64", "trainer.compile_layers=true",
          "trainer.lm_head_store_probs=true", "--run-dir", fast])
    a, b = _records(plain), _records(fast)
    assert [r["loss/grad_norm"] for r in a] == pytest.approx([r["loss/grad_norm"] for r in b], rel=1e-4)
    assert [r["loss/policy"] for r in a] == pytest.approx([r["loss/policy"] for r in b], abs=1e-6)
    wa, wb = _weights(plain), _weights(fast)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5, msg=name)


def test_speed_options_are_checked_against_the_recipe():
    from posttrain.config import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="trainer.keep_weights_gathered needs trainer.fsdp"):
        load_recipe("recipes/smoke.yaml", ["trainer.keep_weights_gathered=true"])
    with pytest.raises(RecipeError, match="trainer.compile_layers needs trainer.fsdp"):
        load_recipe("recipes/smoke.yaml", ["trainer.compile_layers=true"])
    with pytest.raises(RecipeError, match="set only one of them"):
        load_recipe("recipes/smoke.yaml", ["trainer.fsdp=true", "trainer.keep_weights_gathered=true",
                                           "trainer.cpu_offload=true"])
    with pytest.raises(RecipeError, match="not a multiple of trainer.pad_to_multiple"):
        load_recipe("recipes/smoke.yaml", ["trainer.fsdp=true", "trainer.token_budget=1000",
                                           "trainer.pad_to_multiple=64"])


def test_a_bfloat16_run_passes_the_canary_at_its_dtype_default_and_fp32_keeps_the_tight_one(tmp_path):
    """model.dtype: bfloat16 with fsdp (the README's GPU configuration) runs through on the dtype's default canary
    tolerance: engine and trainer disagree by bf16 rounding of the logits (~0.06–0.125 here), which the float32
    default (2e-3) would have stopped at step 1 as 'stale weights'; a float32 run stays within 2e-3."""
    from posttrain.config import CANARY_TOLERANCE

    bf16, fp32 = str(tmp_path / "bf16"), str(tmp_path / "fp32")
    _run([*FSDP, "total_steps=2", "model.dtype=bfloat16", "--run-dir", bf16])
    diffs = [r["rollout/canary_max_abs_diff"] for r in _records(bf16)]
    assert len(diffs) == 2 and all(CANARY_TOLERANCE["float32"] < d <= CANARY_TOLERANCE["bfloat16"] for d in diffs)
    _run([*FSDP, "total_steps=1", "--run-dir", fp32])
    assert _records(fp32)[0]["rollout/canary_max_abs_diff"] <= CANARY_TOLERANCE["float32"]
