"""GSPO pure functions against hand-computed values (docs/algorithms.md §1)."""
import math

import pytest
import torch

from posttrain.algorithms.gspo import group_advantages, gspo_loss

pytestmark = pytest.mark.unit


def test_group_advantages_hand_values_unbiased_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 3.0, 5.0])
    groups = torch.tensor([0, 0, 0, 0, 7, 7])
    adv = group_advantages(rewards, groups)
    std0 = math.sqrt(((0.5 ** 2) * 4) / 3)          # unbiased std of [1,0,0,1]
    std1 = math.sqrt((1.0 + 1.0) / 1)               # unbiased std of [3,5]
    expected = [0.5 / std0, -0.5 / std0, -0.5 / std0, 0.5 / std0, -1 / std1, 1 / std1]
    assert adv.tolist() == pytest.approx(expected, rel=1e-5)


def test_equal_reward_group_gets_zero_and_dr_grpo_skips_std():
    rewards = torch.tensor([2.0, 2.0, 2.0, 0.0, 4.0])
    groups = torch.tensor([0, 0, 0, 1, 1])
    adv = group_advantages(rewards, groups)
    assert adv[:3].tolist() == [0.0, 0.0, 0.0]
    dr = group_advantages(rewards, groups, scale_by_std=False)
    assert dr.tolist() == pytest.approx([0, 0, 0, -2.0, 2.0])


def test_singleton_group_is_mean_zero_std_one():
    adv = group_advantages(torch.tensor([0.7]), torch.tensor([3]))
    assert adv.tolist() == pytest.approx([0.7 / (1 + 1e-6)])


def test_loss_value_at_old_policy_is_minus_mean_advantage_and_masks_padding():
    # At θ = θ_old every ratio is 1, so J = mean_i A_i regardless of lengths; padding must not matter.
    lp = torch.tensor([[-1.0, -2.0, -3.0], [-0.5, -9.0, -9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]], dtype=torch.float32)
    adv = torch.tensor([2.0, -1.0])
    loss, metrics = gspo_loss(lp, lp.detach(), adv, mask)
    assert float(loss) == pytest.approx(-(2.0 - 1.0) / 2)
    loss.backward()
    # d(-J)/d lp_i,t = -(1/N) A_i / |y_i|  on unmasked tokens, 0 on padding.
    assert lp.grad.flatten().tolist() == pytest.approx([-1 / 3, -1 / 3, -1 / 3, 0.5, 0.0, 0.0])
    assert metrics["loss/clip_frac"] == 0.0


def test_sequence_ratio_is_length_normalised_geometric_mean():
    old = torch.zeros(1, 4)
    new = torch.tensor([[0.1, 0.3, -0.2, 0.0]])   # mean log-ratio 0.05 → s = e^0.05
    mask = torch.ones(1, 4)
    loss, m = gspo_loss(new, old, torch.tensor([1.0]), mask, clip_low=1.0, clip_high=1.0)
    assert m["loss/seq_ratio_mean"] == pytest.approx(math.exp(0.05), rel=1e-6)
    assert float(loss) == pytest.approx(-math.exp(0.05), rel=1e-6)


def test_clipping_upper_side_positive_advantage_kills_gradient():
    old = torch.zeros(1, 2)
    new = torch.full((1, 2), 0.01, requires_grad=True)   # s = e^0.01 > 1 + 4e-4
    loss, m = gspo_loss(new, old, torch.tensor([1.0]), torch.ones(1, 2))
    loss.backward()
    assert float(loss) == pytest.approx(-(1 + 4e-4), rel=1e-6)
    assert new.grad.abs().max() == 0.0
    assert m["loss/clip_frac"] == 1.0 and m["loss/clip_frac_high"] == 1.0


def test_clipping_lower_side_negative_advantage_kills_gradient():
    old = torch.zeros(1, 2)
    new = torch.full((1, 2), -0.01, requires_grad=True)  # s = e^-0.01 < 1 − 3e-4
    loss, m = gspo_loss(new, old, torch.tensor([-1.0]), torch.ones(1, 2))
    loss.backward()
    assert float(loss) == pytest.approx((1 - 3e-4), rel=1e-6)
    assert new.grad.abs().max() == 0.0
    assert m["loss/clip_frac_low"] == 1.0


def test_clip_is_pessimistic_only():
    # Ratio above the range with a NEGATIVE advantage is not clipped (min keeps the unclipped, worse value).
    old = torch.zeros(1, 2)
    new = torch.full((1, 2), 0.01, requires_grad=True)
    loss, m = gspo_loss(new, old, torch.tensor([-1.0]), torch.ones(1, 2))
    loss.backward()
    s = math.exp(0.01)
    assert float(loss) == pytest.approx(s, rel=1e-6)
    assert new.grad.tolist()[0] == pytest.approx([s / 2, s / 2], rel=1e-5)
    assert m["loss/clip_frac"] == 0.0


def test_token_form_with_constant_advantages_matches_sequence_form_gradient():
    torch.manual_seed(0)
    old = torch.randn(3, 5) * 0.1
    new = (old + torch.randn(3, 5) * 1e-5).requires_grad_(True)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]], dtype=torch.float32)
    adv = torch.tensor([0.5, -1.0, 2.0])
    loss_seq, _ = gspo_loss(new, old, adv, mask)
    g_seq, = torch.autograd.grad(loss_seq, new)
    loss_tok, _ = gspo_loss(new, old, adv.unsqueeze(-1).expand(3, 5).contiguous(), mask)
    g_tok, = torch.autograd.grad(loss_tok, new)
    assert torch.allclose(g_seq, g_tok)
    assert float(loss_seq) == pytest.approx(float(loss_tok))


def test_shape_errors_are_clear():
    with pytest.raises(ValueError, match=r"must all be \[N,T\]"):
        gspo_loss(torch.zeros(2, 3), torch.zeros(2, 4), torch.zeros(2), torch.ones(2, 3))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("per_token_advantages", [False, True])
def test_gspo_loss_from_its_pieces_is_bitwise_the_pre_split_function(dtype, per_token_advantages):
    # gspo_loss is now sequence_mean(gspo_token_loss(...)) (the pieces MOPD's RL mix reuses): same bits as before.
    from tests.algorithms.frozen_pre_split import old_gspo_loss

    gen = torch.Generator().manual_seed(3)
    old = -3 * torch.rand(6, 8, generator=gen, dtype=dtype)
    # per-sequence log-ratios of ±1e-3 against a clip range of 3e-4/4e-4: some sequences clipped, some not
    shift = torch.randn(6, 1, generator=gen, dtype=dtype)
    new_value = old + 1e-3 * (shift + torch.randn(6, 8, generator=gen, dtype=dtype))
    mask = (torch.arange(8).unsqueeze(0) < torch.tensor([8, 5, 1, 0, 3, 7]).unsqueeze(-1)).to(dtype)
    adv = torch.randn(6, 8, generator=gen, dtype=dtype) if per_token_advantages else torch.randn(6, generator=gen,
                                                                                                   dtype=dtype)
    results = []
    for fn in (gspo_loss, old_gspo_loss):
        lp = new_value.clone().requires_grad_()
        loss, metrics = fn(lp, old, adv, mask)
        loss.backward()
        results.append((loss.detach(), lp.grad, metrics))
    assert 0 < results[1][2]["loss/clip_frac"] < 1, "the inputs should clip some sequences and not others"
    assert torch.equal(results[0][0], results[1][0])
    assert torch.equal(results[0][1], results[1][1])
    assert results[0][2] == results[1][2]
