"""OffloadedAdamW (trainer.optimizer_offload): torch.optim.AdamW's update bit for bit, its state format both ways.

On CPU the moments stay beside the parameters, so these tests check the math, the bucketing and the state
format; the GPU streaming (copies on two streams, double-buffered) is checked against fused AdamW in
tests/trainer/test_gpu_trainer.py, and sharded (DTensor) moments with DCP in tests/trainer/test_fsdp.py.
"""
from __future__ import annotations

import pytest
import torch

from posttrain.config import RecipeError, load_recipe
from posttrain.trainer.offload_adamw import OffloadedAdamW

pytestmark = pytest.mark.unit


def _model(seed=0):
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(7, 13), torch.nn.Tanh(), torch.nn.Linear(13, 3))


def _train(model, optimizer, steps, scheduler=None):
    gen = torch.Generator().manual_seed(1)
    for _ in range(steps):
        x = torch.randn(5, 7, generator=gen)
        model(x).pow(2).mean().backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        if scheduler is not None:
            scheduler.step()


def test_update_equals_torch_adamw_bit_for_bit_across_buckets_and_a_schedule():
    kwargs = {"lr": 3e-2, "betas": (0.8, 0.95), "eps": 1e-6, "weight_decay": 0.1}
    ref, off = _model(), _model()
    ref_opt = torch.optim.AdamW(ref.parameters(), foreach=False, **kwargs)
    off_opt = OffloadedAdamW(off.parameters(), bucket_numel=10, **kwargs)   # 91-element weight → 10 buckets
    lam = lambda step: 1.0 / (1 + step)
    _train(ref, ref_opt, 4, torch.optim.lr_scheduler.LambdaLR(ref_opt, lam))
    _train(off, off_opt, 4, torch.optim.lr_scheduler.LambdaLR(off_opt, lam))
    for a, b in zip(ref.parameters(), off.parameters()):
        assert torch.equal(a, b)
    assert not torch.equal(ref[0].weight, _model()[0].weight)
    for a, b in zip(ref_opt.state.values(), off_opt.state.values()):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])
        assert float(a["step"]) == float(b["step"]) == 4


def test_state_moves_between_torch_adamw_and_the_offloaded_one():
    ref, off = _model(), _model()
    ref_opt, off_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False), OffloadedAdamW(off.parameters(), lr=1e-2)
    _train(ref, ref_opt, 2)
    off.load_state_dict(ref.state_dict())
    off_opt.load_state_dict(ref_opt.state_dict())          # torch's format in ...
    _train(ref, ref_opt, 2)
    _train(off, off_opt, 2)
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), off.parameters()))
    back = torch.optim.AdamW(_model().parameters(), lr=1e-2)
    back.load_state_dict(off_opt.state_dict())              # ... and out again
    assert float(next(iter(back.state.values()))["step"]) == 4


def test_a_parameter_that_is_not_fp32_is_refused():
    with pytest.raises(TypeError, match="fp32 master weights"):
        OffloadedAdamW([torch.nn.Parameter(torch.zeros(3, dtype=torch.bfloat16))])


def test_offload_options_need_fsdp_and_exclude_each_other(tmp_path):
    recipe = "recipes/quickstart.yaml"
    with pytest.raises(RecipeError, match="trainer.optimizer_offload needs trainer.fsdp"):
        load_recipe(recipe, ["trainer.optimizer_offload=true"])
    with pytest.raises(RecipeError, match="set only one of"):
        load_recipe(recipe, ["trainer.fsdp=true", "trainer.optimizer_offload=true", "trainer.cpu_offload=true"])
    assert load_recipe(recipe, ["trainer.fsdp=true", "trainer.optimizer_offload=true"]).trainer.optimizer_offload
