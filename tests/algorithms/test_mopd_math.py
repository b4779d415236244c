"""MOPD math (docs/algorithms.md §2): hand-computed values, the gradient identity, and the literal form's zero gradient."""
import math

import pytest
import torch

from posttrain.algorithms.gspo import gspo_loss
from posttrain.algorithms.mopd import (
    MOPDBatch,
    MOPDLossSettings,
    candidate_advantages,
    keye_literal_loss,
    mopd_loss,
    mopd_metrics,
    mopd_objective,
    normalise_token_weights,
    overlap_advantages,
    per_teacher_metrics,
    rest_bucket_advantage,
    teacher_logprobs_at_candidates,
    train_inference_gate,
)

pytestmark = pytest.mark.unit
F64 = torch.float64
log = math.log


def t64(x):
    return torch.tensor(x, dtype=F64)


# ---------------------------------------------------------------------------------------------------------
# overlap_advantages
# ---------------------------------------------------------------------------------------------------------

def test_overlap_advantages_hand_computed():
    # student top-3: ids 5, 2, 9 with π_old 0.5, 0.3, 0.1;  teacher top-3: ids 2, 7, 5 with π_T 0.6, 0.2, 0.1.
    # Ω = {5, 2}; π̄(5) = 0.5/0.8, π̄(2) = 0.3/0.8; δ(5) = log(0.1/0.5), δ(2) = log(0.6/0.3); 9 ∉ Ω.
    s_ids = torch.tensor([[[5, 2, 9]]])
    s_lp = t64([[[log(0.5), log(0.3), log(0.1)]]])
    t_ids = torch.tensor([[[2, 7, 5]]])
    t_lp = t64([[[log(0.6), log(0.2), log(0.1)]]])
    cand_mask, cand_adv = overlap_advantages(s_ids, s_lp, t_ids, t_lp)
    assert cand_mask.tolist() == [[[True, True, False]]]
    expected = t64([[[0.625 * log(0.2), 0.375 * log(2.0), 0.0]]])
    torch.testing.assert_close(cand_adv, expected, rtol=0, atol=1e-12)
    # 0.625·log 0.2 = −1.00590, 0.375·log 2 = +0.25993: written out so a sign slip cannot hide
    assert abs(cand_adv[0, 0, 0].item() - (-1.0058987)) < 1e-6
    assert abs(cand_adv[0, 0, 1].item() - 0.2599302) < 1e-6


def test_overlap_with_teacher_wider_than_student_and_empty_overlap():
    # position 0: teacher k_T = 4 covers student id 3 (at its last slot); position 1: no common id.
    s_ids = torch.tensor([[[3, 1], [4, 0]]])
    s_lp = t64([[[log(0.7), log(0.2)], [log(0.6), log(0.3)]]])
    t_ids = torch.tensor([[[8, 9, 6, 3], [1, 2, 3, 5]]])
    t_lp = t64([[[log(0.4), log(0.3), log(0.2), log(0.05)], [log(0.4), log(0.3), log(0.2), log(0.05)]]])
    cand_mask, cand_teacher_lp = teacher_logprobs_at_candidates(s_ids, t_ids, t_lp)
    assert cand_mask.tolist() == [[[True, False], [False, False]]]
    torch.testing.assert_close(cand_teacher_lp[0, 0, 0], t64(log(0.05)))
    _, cand_adv = overlap_advantages(s_ids, s_lp, t_ids, t_lp)
    # |Ω| = 1 ⇒ π̄ = 1, a = log(0.05/0.7); empty Ω ⇒ exactly 0, never NaN
    torch.testing.assert_close(cand_adv, t64([[[log(0.05 / 0.7), 0.0], [0.0, 0.0]]]), rtol=0, atol=1e-12)


def test_k_equal_one_is_not_identically_zero():
    # Renormalising both sides over Ω would make k = 1 always 0; δ must use the raw log-probs.
    cand_adv = candidate_advantages(torch.tensor([[[True]]]), t64([[[log(0.5)]]]), t64([[[log(0.8)]]]))
    torch.testing.assert_close(cand_adv, t64([[[log(1.6)]]]))


def test_misaligned_teacher_positions_are_rejected():
    with pytest.raises(ValueError, match="aligned"):
        overlap_advantages(torch.zeros(1, 3, 2, dtype=torch.long), torch.zeros(1, 3, 2),
                           torch.zeros(1, 4, 2, dtype=torch.long), torch.zeros(1, 4, 2))


# ---------------------------------------------------------------------------------------------------------
# mopd_loss: hand-computed values
# ---------------------------------------------------------------------------------------------------------

def _hand_case():
    """N = 2, T = 2, k = 2.  Sequence 1 has one masked token; its masked slot holds garbage that must not count."""
    cand_adv = t64([[[0.2, -0.1], [0.5, 0.0]],
                    [[-0.4, 0.0], [100.0, 100.0]]])
    cand_mask = torch.tensor([[[True, True], [True, False]],
                              [[True, False], [True, True]]])
    cand_old = t64([[[log(0.5), log(0.3)], [log(0.4), log(0.2)]],
                    [[log(0.6), log(0.1)], [log(0.5), log(0.4)]]])
    ratio = t64([[[1.5, 1.0], [2.0, 7.0]],          # 7.0 sits outside Ω: must be ignored
                 [[0.5, 3.0], [9.0, 9.0]]])
    token_weights = t64([[2.0, 1.0], [0.5, 4.0]])
    mask = t64([[1, 1], [1, 0]])
    return cand_adv, cand_mask, cand_old, ratio, token_weights, mask


def test_mopd_loss_hand_computed_value_and_gradient():
    cand_adv, cand_mask, cand_old, ratio, weights, mask = _hand_case()
    cand_lp = (cand_old + torch.log(ratio)).requires_grad_()
    loss, metrics = mopd_loss(cand_lp, cand_old, cand_adv, cand_mask, weights, mask)
    # seq 0: t0  2·(0.2·1.5 − 0.1·1.0) = 0.4;  t1  1·(0.5·2.0) = 1.0;  mean 0.7
    # seq 1: t0  0.5·(−0.4·0.5) = −0.1;                                mean −0.1
    # loss = −(0.7 + (−0.1)) / 2 = −0.3
    torch.testing.assert_close(loss, t64(-0.3), rtol=0, atol=1e-12)
    loss.backward()
    # ∂L/∂log πθ(v) = −(1/N)(1/|M_i|) w a ρ
    expected_grad = t64([[[-0.25 * 2 * 0.2 * 1.5, -0.25 * 2 * -0.1 * 1.0], [-0.25 * 1 * 0.5 * 2.0, 0.0]],
                         [[-0.5 * 0.5 * -0.4 * 0.5, 0.0], [0.0, 0.0]]])
    torch.testing.assert_close(cand_lp.grad, expected_grad, rtol=0, atol=1e-12)
    assert metrics["mopd/loss"] == pytest.approx(-0.3)
    assert metrics["mopd/clip_frac"] == 0.0


def test_mopd_loss_per_candidate_clip():
    cand_adv, cand_mask, cand_old, ratio, weights, mask = _hand_case()
    cand_lp = (cand_old + torch.log(ratio)).requires_grad_()
    loss, metrics = mopd_loss(cand_lp, cand_old, cand_adv, cand_mask, weights, mask, clip_eps=0.2)
    # seq 0 t0: min(0.2·1.5, 0.2·1.2) = 0.24, −0.1·1.0 → 2·0.14 = 0.28;  t1: min(1.0, 0.5·1.2) = 0.6;  mean 0.44
    # seq 1 t0: a = −0.4, ρ = 0.5: min(−0.2, −0.4·0.8 = −0.32) = −0.32 → 0.5·(−0.32) = −0.16
    # loss = −(0.44 − 0.16)/2 = −0.14
    torch.testing.assert_close(loss, t64(-0.14), rtol=0, atol=1e-12)
    loss.backward()
    # clipped candidates get no gradient; the unclipped one (ρ = 1) keeps −(1/4)·2·(−0.1)·1
    expected_grad = torch.zeros_like(cand_lp)
    expected_grad[0, 0, 1] = -0.25 * 2 * -0.1
    torch.testing.assert_close(cand_lp.grad, expected_grad, rtol=0, atol=1e-12)
    assert metrics["mopd/clip_frac"] == pytest.approx(3 / 4)      # 3 of the 4 masked Ω candidates


def test_mopd_metrics_hand_computed():
    cand_adv, cand_mask, cand_old, ratio, weights, mask = _hand_case()
    cand_teacher = t64([[[log(0.4), log(0.1)], [log(0.3), 0.0]], [[log(0.2), 0.0], [0.0, 0.0]]])
    old_y = t64([[log(0.5), log(0.2)], [log(0.6), 0.0]])
    teacher_y = t64([[log(0.4), log(0.1)], [log(0.2), 0.0]])
    _, m = mopd_loss(cand_old.clone(), cand_old, cand_adv, cand_mask, weights, mask,
                     cand_teacher_logprobs=cand_teacher, sampled_old_logprobs=old_y,
                     sampled_teacher_logprobs=teacher_y,
                     teacher_index=torch.tensor([1, 0]), teacher_names=["math", "ocr"])
    # three masked tokens: |Ω|/k = 1, 1/2, 1/2
    assert m["mopd/overlap_ratio"] == pytest.approx((1 + 0.5 + 0.5) / 3)
    assert m["mopd/empty_overlap_frac"] == 0.0
    assert m["mopd/student_mass_on_overlap"] == pytest.approx((0.8 + 0.4 + 0.6) / 3)
    assert m["mopd/teacher_mass_on_overlap"] == pytest.approx((0.5 + 0.3 + 0.2) / 3)
    assert m["mopd/adv_mean"] == pytest.approx((0.1 + 0.5 - 0.4) / 3)
    rkl = [log(0.5 / 0.4), log(0.2 / 0.1), log(0.6 / 0.2)]
    assert m["mopd/reverse_kl"] == pytest.approx(sum(rkl) / 3)
    # per teacher: sequence 0 → "ocr" (2 tokens), sequence 1 → "math" (1 token)
    assert m["mopd/token_share/ocr"] == pytest.approx(2 / 3)
    assert m["mopd/token_share/math"] == pytest.approx(1 / 3)
    assert m["mopd/reverse_kl/ocr"] == pytest.approx((rkl[0] + rkl[1]) / 2)
    assert m["mopd/reverse_kl/math"] == pytest.approx(rkl[2])
    assert m["mopd/gate_drop_frac"] == 0.0 and m["mopd/loop_seq_frac"] == 0.0


def test_per_teacher_metrics_leaves_out_absent_teachers():
    values = {"x": t64([[1.0, 3.0], [10.0, 0.0]])}
    out = per_teacher_metrics(values, t64([[1, 1], [1, 0]]), torch.tensor([0, 0]), ["a", "b"])
    assert out == {"mopd/token_share/a": 1.0, "mopd/x/a": pytest.approx(14 / 3)}
    with pytest.raises(ValueError, match="outside teacher_names"):
        per_teacher_metrics(values, t64([[1, 1], [1, 0]]), torch.tensor([0, 5]), ["a", "b"])


# ---------------------------------------------------------------------------------------------------------
# The gradient identity of §2.2 and the teacher = student case
# ---------------------------------------------------------------------------------------------------------

def _student_teacher(n=2, t=3, v=12, k=4, seed=0, teacher_noise=0.7):
    gen = torch.Generator().manual_seed(seed)
    student_logits = torch.randn(n, t, v, generator=gen, dtype=F64)
    teacher_logits = student_logits + teacher_noise * torch.randn(n, t, v, generator=gen, dtype=F64)
    teacher_lp_full = torch.log_softmax(teacher_logits, -1)
    old_lp_full = torch.log_softmax(student_logits, -1)
    s_lp, s_ids = old_lp_full.topk(k, -1)
    t_lp, t_ids = teacher_lp_full.topk(k, -1)
    return student_logits, teacher_lp_full, s_ids, s_lp, t_ids, t_lp


def test_gradient_at_theta_old_is_generalised_kl_on_overlap_over_detached_mass():
    n, t = 2, 3
    student_logits, teacher_lp_full, s_ids, s_lp, t_ids, t_lp = _student_teacher(n=n, t=t)
    cand_mask, cand_adv = overlap_advantages(s_ids, s_lp, t_ids, t_lp)
    assert bool(cand_mask.any(-1).all()), "the test wants non-empty Ω everywhere"
    assert bool((~cand_mask).any()), "…and at least one candidate outside Ω"
    mask = torch.ones(n, t, dtype=F64)

    theta = student_logits.clone().requires_grad_()                       # θ = θ_old
    cand_lp = torch.log_softmax(theta, -1).gather(-1, s_ids)
    loss, _ = mopd_loss(cand_lp, s_lp, cand_adv, cand_mask, None, mask)
    (grad_mopd,) = torch.autograd.grad(loss, theta)

    theta2 = student_logits.clone().requires_grad_()
    probs = torch.softmax(theta2, -1).gather(-1, s_ids)                   # πθ(v) at the candidates
    teacher_probs = teacher_lp_full.exp().gather(-1, s_ids)
    # G = Σ_{v∈Ω} πθ log(πθ/π_T) − πθ + π_T ;  divided by sg[πθ(Ω)], averaged as the loss averages tokens
    gen_kl = torch.where(cand_mask, probs * (probs.log() - teacher_probs.log()) - probs + teacher_probs,
                         torch.zeros_like(probs)).sum(-1)
    mass = torch.where(cand_mask, probs, torch.zeros_like(probs)).sum(-1).detach()
    (grad_kl,) = torch.autograd.grad((gen_kl / mass).mean(), theta2)

    assert grad_mopd.abs().max() > 1e-3                                   # a real, non-trivial gradient
    torch.testing.assert_close(grad_mopd, grad_kl, rtol=1e-10, atol=1e-12)


def test_teacher_equal_to_student_gives_zero_advantage_and_zero_gradient():
    student_logits, _, s_ids, s_lp, _, _ = _student_teacher()
    cand_mask, cand_adv = overlap_advantages(s_ids, s_lp, s_ids.clone(), s_lp.clone())
    assert bool(cand_mask.all())
    assert torch.count_nonzero(cand_adv) == 0
    theta = student_logits.clone().requires_grad_()
    loss, _ = mopd_loss(torch.log_softmax(theta, -1).gather(-1, s_ids), s_lp, cand_adv, cand_mask, None,
                        torch.ones(2, 3, dtype=F64))
    loss.backward()
    assert loss.item() == 0.0
    assert torch.count_nonzero(theta.grad) == 0


def test_literal_form_has_zero_mean_gradient_while_per_candidate_form_does_not():
    # One state, V = 8. Enumerate every sampled token y with weight π(y): that is the exact expectation.
    v = 8
    student_logits, _, s_ids, s_lp, t_ids, t_lp = _student_teacher(n=1, t=1, v=v, k=4, seed=3, teacher_noise=1.5)
    cand_mask, cand_adv = overlap_advantages(s_ids, s_lp, t_ids, t_lp)
    assert cand_adv.abs().sum() > 0.05
    mask = torch.ones(1, 1, dtype=F64)
    probs = torch.softmax(student_logits[0, 0], -1)

    literal_grads = []
    for y in range(v):
        theta = student_logits.clone().requires_grad_()
        lp_y = torch.log_softmax(theta, -1)[..., y]                           # [1,1]
        loss, _ = keye_literal_loss(lp_y, cand_adv, None, mask)
        literal_grads.append(torch.autograd.grad(loss, theta)[0].flatten())
    literal_grads = torch.stack(literal_grads)                                # [V(y), V(θ)]
    expected_literal = (probs.unsqueeze(-1) * literal_grads).sum(0)
    assert expected_literal.abs().max() < 1e-15                              # exactly zero up to rounding

    theta = student_logits.clone().requires_grad_()
    loss, _ = mopd_loss(torch.log_softmax(theta, -1).gather(-1, s_ids), s_lp, cand_adv, cand_mask, None, mask)
    per_candidate = torch.autograd.grad(loss, theta)[0].flatten()             # does not depend on y at all
    assert per_candidate.norm() > 1e-2

    # Monte Carlo over y ~ π, as training would see it: the literal mean is noise within 5σ of 0.
    n_samples = 20000
    counts = torch.bincount(torch.multinomial(probs, n_samples, replacement=True,
                                              generator=torch.Generator().manual_seed(0)), minlength=v)
    mc_literal = (counts.to(F64).unsqueeze(-1) * literal_grads).sum(0) / n_samples
    per_sample_std = ((probs.unsqueeze(-1) * (literal_grads - expected_literal) ** 2).sum(0)).sqrt()
    assert bool((mc_literal.abs() <= 5 * per_sample_std / math.sqrt(n_samples) + 1e-15).all())
    assert per_candidate.norm() > 10 * (per_sample_std / math.sqrt(n_samples)).norm()


def test_literal_loss_value_hand_computed():
    lp = t64([[log(0.5), log(0.25)]]).requires_grad_()
    cand_adv = t64([[[0.3, -0.1], [0.2, 0.0]]])
    loss, m = keye_literal_loss(lp, cand_adv, None, t64([[1, 1]]))
    # −(1/2)(0.2·log 0.5 + 0.2·log 0.25)
    torch.testing.assert_close(loss, t64(-0.5 * (0.2 * log(0.5) + 0.2 * log(0.25))))
    assert m["mopd_literal/adv_mean"] == pytest.approx(0.2)


# ---------------------------------------------------------------------------------------------------------
# Empty overlap, gate, repetition penalty, RL mix, token weights
# ---------------------------------------------------------------------------------------------------------

def test_empty_overlap_without_fallback_contributes_nothing():
    cand_mask = torch.zeros(1, 2, 3, dtype=torch.bool)
    cand_old = t64([[[log(0.5), log(0.2), log(0.1)]] * 2])
    cand_lp = (cand_old + 0.3).requires_grad_()
    loss, m = mopd_loss(cand_lp, cand_old, torch.zeros_like(cand_old), cand_mask, None, t64([[1, 1]]))
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(cand_lp.grad) == 0
    assert m["mopd/empty_overlap_frac"] == 1.0 and m["mopd/overlap_ratio"] == 0.0


def test_empty_overlap_fallback_uses_sampled_token_reverse_kl_advantage():
    # position 0 has Ω ≠ ∅ (adv 0.1 on one candidate, ρ = 1); position 1 has Ω = ∅ → fallback on y_1.
    cand_mask = torch.tensor([[[True, False], [False, False]]])
    cand_adv = t64([[[0.1, 0.0], [0.0, 0.0]]])
    cand_old = t64([[[log(0.6), log(0.3)], [log(0.5), log(0.4)]]])
    old_y = t64([[log(0.6), log(0.05)]])
    teacher_y = t64([[log(0.9), log(0.2)]])
    lp_y = (old_y + t64([[0.0, log(2.0)]])).requires_grad_()                 # ρ(y_1) = 2
    weights = t64([[1.0, 3.0]])
    loss, m = mopd_loss(cand_old.clone(), cand_old, cand_adv, cand_mask, weights, t64([[1, 1]]),
                        empty_overlap_fallback=True, sampled_logprobs=lp_y, sampled_old_logprobs=old_y,
                        sampled_teacher_logprobs=teacher_y)
    fallback_adv = log(0.2 / 0.05)                                             # log π_T(y) − log π_old(y)
    torch.testing.assert_close(loss, t64(-(1.0 * 0.1 + 3.0 * fallback_adv * 2.0) / 2))
    loss.backward()
    torch.testing.assert_close(lp_y.grad, t64([[0.0, -3.0 * fallback_adv * 2.0 / 2]]))
    assert m["mopd/fallback_token_frac"] == 0.5 and m["mopd/empty_overlap_frac"] == 0.5
    with pytest.raises(ValueError, match="sampled_teacher_logprobs is required"):
        mopd_loss(cand_old, cand_old, cand_adv, cand_mask, None, t64([[1, 1]]), empty_overlap_fallback=True,
                  sampled_logprobs=lp_y, sampled_old_logprobs=old_y)


def test_train_inference_gate_bounds():
    old = t64([[0.0, log(3.0), -log(3.0), log(2.0), log(0.5)]])
    gate = train_inference_gate(old, torch.zeros_like(old), low=0.5, high=2.0)
    assert gate.tolist() == [[1.0, 0.0, 0.0, 1.0, 1.0]]                      # bounds are inclusive
    with pytest.raises(ValueError, match="low ≤ 1 ≤ high"):
        train_inference_gate(old, old, low=1.5, high=2.0)


def test_gate_multiplies_distillation_and_reports_drop_rate():
    cand_adv, cand_mask, cand_old, ratio, weights, mask = _hand_case()
    gate = t64([[0.0, 1.0], [1.0, 0.0]])                                    # drops seq 0 t0 (and a masked slot)
    loss, m = mopd_loss(cand_old + torch.log(ratio), cand_old, cand_adv, cand_mask, weights, mask, gate=gate)
    # seq 0: (0 + 1.0)/2 = 0.5; seq 1: −0.1  →  loss = −(0.5 − 0.1)/2
    torch.testing.assert_close(loss, t64(-0.2), rtol=0, atol=1e-12)
    assert m["mopd/gate_drop_frac"] == pytest.approx(1 / 3)


def test_repetition_penalty_only_after_loop_start():
    # N = 1, T = 4, τ = 2, λ = 0.5, gate b = [1, 1, 0, 1]; one candidate per position with a = 0.3, ρ = 1.
    cand_mask = torch.ones(1, 4, 1, dtype=torch.bool)
    cand_old = t64([[[log(0.5)]] * 4])
    cand_adv = torch.full((1, 4, 1), 0.3, dtype=F64)
    cand_lp = cand_old.clone().requires_grad_()
    lp_y = t64([[log(0.5), log(0.4), log(0.9), log(0.8)]]).requires_grad_()
    gate = t64([[1, 1, 0, 1]])
    mask = torch.ones(1, 4, dtype=F64)
    loss, m = mopd_loss(cand_lp, cand_old, cand_adv, cand_mask, None, mask, gate=gate, sampled_logprobs=lp_y,
                        loop_start=torch.tensor([2]), repetition_penalty=0.5)
    # t0, t1: −0.3 each;  t2: +0.5·0·log 0.9 = 0;  t3: +0.5·1·log 0.8
    torch.testing.assert_close(loss, t64((-0.3 - 0.3 + 0.5 * log(0.8)) / 4))
    loss.backward()
    torch.testing.assert_close(cand_lp.grad, t64([[[-0.3 / 4], [-0.3 / 4], [0.0], [0.0]]]))
    torch.testing.assert_close(lp_y.grad, t64([[0.0, 0.0, 0.0, 0.5 / 4]]))   # pushes the loop's tokens down
    assert m["mopd/loop_seq_frac"] == 1.0 and m["mopd/loop_token_frac"] == 0.5

    # No loop (τ = T, or the −1 convention), or λ = 0: identical to plain MOPD.
    plain, _ = mopd_loss(cand_old, cand_old, cand_adv, cand_mask, None, mask)
    for starts, lam in ((torch.tensor([4]), 0.5), (torch.tensor([-1]), 0.5), (torch.tensor([2]), 0.0)):
        other, _ = mopd_loss(cand_old, cand_old, cand_adv, cand_mask, None, mask, sampled_logprobs=lp_y.detach(),
                             loop_start=starts, repetition_penalty=lam)
        torch.testing.assert_close(other, plain)


def test_rl_mix_matches_alpha_times_gspo_token_loss():
    gen = torch.Generator().manual_seed(1)
    n, t = 3, 5
    old_y = -torch.rand(n, t, generator=gen, dtype=F64) * 2
    lp_y_value = old_y + 1e-4 * torch.randn(n, t, generator=gen, dtype=F64)
    mask = t64([[1, 1, 1, 1, 1], [1, 1, 1, 0, 0], [1, 0, 0, 0, 0]])
    adv = t64([1.0, -0.5, 2.0])
    alpha = 0.3
    zeros = torch.zeros(n, t, 2, dtype=F64)

    lp1 = lp_y_value.clone().requires_grad_()
    loss, m = mopd_loss(zeros, zeros, zeros, torch.zeros(n, t, 2, dtype=torch.bool), None, mask,
                        sampled_logprobs=lp1, sampled_old_logprobs=old_y, rl_alpha=alpha, outcome_advantages=adv)
    loss.backward()
    lp2 = lp_y_value.clone().requires_grad_()
    ref, _ = gspo_loss(lp2, old_y, adv, mask)
    (alpha * ref).backward()
    torch.testing.assert_close(loss, alpha * ref.detach())
    torch.testing.assert_close(lp1.grad, lp2.grad)
    assert "mopd/rl_clip_frac" in m

    # at θ = θ_old: loss = −α·mean_i A_i and ∂L/∂log πθ(y_i,t) = −α·A_i / (N·|M_i|)
    lp3 = old_y.clone().requires_grad_()
    loss3, _ = mopd_loss(zeros, zeros, zeros, torch.zeros(n, t, 2, dtype=torch.bool), None, mask,
                         sampled_logprobs=lp3, sampled_old_logprobs=old_y, rl_alpha=alpha, outcome_advantages=adv)
    loss3.backward()
    torch.testing.assert_close(loss3, t64(-alpha * (1.0 - 0.5 + 2.0) / 3))
    expected = -alpha * adv.unsqueeze(-1) / (3 * t64([5, 3, 1]).unsqueeze(-1)) * mask
    torch.testing.assert_close(lp3.grad, expected)


def test_token_weights_normalise_to_mean_one_over_masked_tokens():
    raw = t64([[2.0, 1.0, 0.5], [1.0, 50.0, 0.0]])
    mask = t64([[1, 1, 1], [1, 0, 1]])
    c = normalise_token_weights(raw, mask)
    # masked sum = 2 + 1 + 0.5 + 1 + 0 = 4.5 over 5 tokens → scale 5/4.5
    torch.testing.assert_close(c, raw * (5 / 4.5))
    assert (c * mask).sum().item() / mask.sum().item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="weight 0"):
        normalise_token_weights(torch.zeros(2, 3, dtype=F64), mask)


def test_student_side_pipeline_from_hidden_states():
    """chunked top-k (π_old) → overlap advantages → chunked candidate log-probs (πθ) → loss → grad on hidden."""
    from posttrain.algorithms.topk import chunked_logprobs_at, chunked_topk

    gen = torch.Generator().manual_seed(7)
    hidden = torch.randn(2, 5, 8, generator=gen, dtype=F64)
    weight = torch.randn(30, 8, generator=gen, dtype=F64)
    teacher_lp_full = torch.log_softmax(hidden @ weight.T + 0.8 * torch.randn(2, 5, 30, generator=gen, dtype=F64), -1)
    t_lp, t_ids = teacher_lp_full.topk(6, -1)

    s_ids, s_lp = chunked_topk(hidden, weight, k=4, chunk_size=3)
    cand_mask, cand_adv = overlap_advantages(s_ids, s_lp, t_ids, t_lp)
    h = hidden.clone().requires_grad_()
    cand_lp = chunked_logprobs_at(h, weight, s_ids, chunk_size=3)
    assert torch.equal(cand_lp.detach(), s_lp)                   # same functions, same chunks: ρ = 1 exactly
    mask = torch.ones(2, 5, dtype=F64)
    loss, metrics = mopd_loss(cand_lp, s_lp, cand_adv, cand_mask, None, mask)
    torch.testing.assert_close(loss, -cand_adv.sum(-1).mean(), rtol=0, atol=1e-12)   # ρ = 1, equal lengths
    loss.backward()
    assert h.grad.abs().max() > 1e-4
    assert 0.0 < metrics["mopd/overlap_ratio"] <= 1.0


# ---------------------------------------------------------------------------------------------------------
# The split API: bitwise the pre-split numbers, and the two objects the trainer passes
# ---------------------------------------------------------------------------------------------------------

def _random_batch(dtype, seed=0, n=5, t=9, k=4):
    """Every optional input present, values in the ranges training sees (some clipped, some empty Ω, loops)."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=dtype)

    def rand(*shape):
        return torch.rand(*shape, generator=gen, dtype=dtype)

    cand_old = torch.log_softmax(randn(n, t, k + 3), -1)[..., :k]
    cand_mask = rand(n, t, k) < 0.6
    cand_mask[0, 1] = False                                                  # an empty Ω
    cand_adv = torch.where(cand_mask, 0.5 * randn(n, t, k), torch.zeros(n, t, k, dtype=dtype))
    lengths = torch.tensor([t, t - 2, 1, 0, t - 4])                          # one fully masked row
    mask = (torch.arange(t).unsqueeze(0) < lengths.unsqueeze(-1)).to(dtype)
    old_y = -3 * rand(n, t)
    return dict(
        cand_logprobs=cand_old + 0.3 * randn(n, t, k), cand_old_logprobs=cand_old, cand_adv=cand_adv,
        cand_mask=cand_mask, token_weights=0.2 + 2 * rand(n, t), mask=mask, gate=1.5 * rand(n, t),
        sampled_logprobs=old_y + 0.01 * randn(n, t), sampled_old_logprobs=old_y,
        sampled_teacher_logprobs=-3 * rand(n, t), loop_start=torch.tensor([3, -1, 0, 2, t]),
        outcome_advantages=randn(n), cand_teacher_logprobs=torch.log_softmax(randn(n, t, k + 2), -1)[..., :k],
        teacher_index=torch.tensor([0, 1, 1, 0, 2]))


_OPTION_SETS = {
    "plain": dict(),
    "clip": dict(clip_eps=0.2),
    "fallback": dict(empty_overlap_fallback=True, clip_eps=0.2),
    "repetition": dict(repetition_penalty=0.7),
    "rl": dict(rl_alpha=0.3),
    "all": dict(clip_eps=0.2, empty_overlap_fallback=True, repetition_penalty=0.7, rl_alpha=0.3,
                rl_clip_low=3e-4, rl_clip_high=4e-4),
}


def _loss_and_grads(fn, inputs, options):
    cand_lp = inputs["cand_logprobs"].clone().requires_grad_()
    lp_y = inputs["sampled_logprobs"].clone().requires_grad_()
    others = {key: value for key, value in inputs.items() if key not in ("cand_logprobs", "sampled_logprobs")}
    positional = [others.pop(name) for name in ("cand_old_logprobs", "cand_adv", "cand_mask", "token_weights", "mask")]
    loss, metrics = fn(cand_lp, *positional, sampled_logprobs=lp_y, teacher_names=["a", "b", "c"], **others,
                       **options)
    loss.backward()
    return loss.detach(), cand_lp.grad, lp_y.grad, metrics


@pytest.mark.parametrize("dtype", [torch.float32, F64])
@pytest.mark.parametrize("options", list(_OPTION_SETS), ids=list(_OPTION_SETS))
def test_split_mopd_loss_is_bitwise_the_pre_split_function(options, dtype):
    from tests.algorithms.frozen_pre_split import old_mopd_loss

    for seed in range(3):
        inputs = _random_batch(dtype, seed=seed)
        new = _loss_and_grads(mopd_loss, inputs, _OPTION_SETS[options])
        old = _loss_and_grads(old_mopd_loss, inputs, _OPTION_SETS[options])
        assert torch.equal(new[0], old[0]), (new[0], old[0])
        assert torch.equal(new[1], old[1]), "gradient at the candidates differs"
        if old[2] is None:
            assert new[2] is None or torch.count_nonzero(new[2]) == 0
        else:
            assert torch.equal(new[2], old[2]), "gradient at the sampled tokens differs"
        assert new[3] == old[3]                                   # every metric, exactly


def test_mopd_objective_with_batch_and_settings_is_the_flat_call():
    inputs = _random_batch(torch.float32, seed=4)
    options = _OPTION_SETS["all"]
    loss_flat, grad_cand_flat, grad_y_flat, metrics_flat = _loss_and_grads(mopd_loss, inputs, options)

    arrays = {key: value.numpy() for key, value in inputs.items() if key not in ("cand_logprobs", "sampled_logprobs")}
    batch = MOPDBatch.from_arrays(arrays)
    settings = MOPDLossSettings(**options)
    assert settings.needs_sampled_logprobs and not MOPDLossSettings().needs_sampled_logprobs
    cand_lp = inputs["cand_logprobs"].clone().requires_grad_()
    lp_y = inputs["sampled_logprobs"].clone().requires_grad_()
    loss, token_losses = mopd_objective(batch, settings, cand_logprobs=cand_lp, sampled_logprobs=lp_y)
    assert list(token_losses) == ["distillation", "empty_overlap_fallback", "repetition", "rl"]
    assert all(term.shape == (5, 9) for term in token_losses.values())
    loss.backward()
    assert torch.equal(loss.detach(), loss_flat)
    assert torch.equal(cand_lp.grad, grad_cand_flat) and torch.equal(lp_y.grad, grad_y_flat)
    metrics = mopd_metrics(batch, settings, token_losses=token_losses, cand_logprobs=cand_lp,
                           sampled_logprobs=lp_y, teacher_names=["a", "b", "c"])
    assert metrics == metrics_flat
    # The per-term losses add up to the loss (each is a sequence mean of its weighted per-token term).
    parts = metrics["mopd/loss_distill"] + metrics["mopd/loss_repetition"] + metrics["mopd/loss_rl"]
    assert parts == pytest.approx(metrics["mopd/loss"], rel=1e-5)


def test_keye_literal_form_is_bitwise_the_pre_split_ablation():
    from tests.algorithms.frozen_pre_split import old_keye_literal_loss

    inputs = _random_batch(torch.float32, seed=2)
    results = []
    for fn in (keye_literal_loss, old_keye_literal_loss):
        lp_y = inputs["sampled_logprobs"].clone().requires_grad_()
        loss, metrics = fn(lp_y, inputs["cand_adv"], inputs["token_weights"], inputs["mask"], gate=inputs["gate"])
        loss.backward()
        results.append((loss.detach(), lp_y.grad, metrics))
    assert torch.equal(results[0][0], results[1][0]) and torch.equal(results[0][1], results[1][1])
    assert results[0][2] == results[1][2]
    # the same ablation through the new entry point
    batch = MOPDBatch(mask=inputs["mask"], cand_old_logprobs=inputs["cand_old_logprobs"], cand_adv=inputs["cand_adv"],
                      cand_mask=inputs["cand_mask"], token_weights=inputs["token_weights"], gate=inputs["gate"])
    loss, terms = mopd_objective(batch, MOPDLossSettings(loss_form="keye_literal"), cand_logprobs=None,
                                 sampled_logprobs=inputs["sampled_logprobs"])
    assert torch.equal(loss, results[1][0]) and list(terms) == ["keye_literal"]


def test_batch_and_settings_reject_bad_input_naming_the_field():
    inputs = _random_batch(torch.float32)
    with pytest.raises(ValueError, match=r"loop_start must be \[N\] = \(5,\)"):
        MOPDBatch(mask=inputs["mask"], cand_old_logprobs=inputs["cand_old_logprobs"], cand_adv=inputs["cand_adv"],
                  cand_mask=inputs["cand_mask"], loop_start=torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match=r"unknown array\(s\) \['gate_mask'\]"):
        MOPDBatch.from_arrays({"mask": inputs["mask"], "cand_old_logprobs": inputs["cand_old_logprobs"],
                               "cand_adv": inputs["cand_adv"], "cand_mask": inputs["cand_mask"],
                               "gate_mask": inputs["gate"]})
    with pytest.raises(ValueError, match="loss_form"):
        MOPDLossSettings(loss_form="literal")
    with pytest.raises(ValueError, match="rl_alpha must be ≥ 0"):
        MOPDLossSettings(rl_alpha=-1.0)
    batch = MOPDBatch(mask=inputs["mask"], cand_old_logprobs=inputs["cand_old_logprobs"], cand_adv=inputs["cand_adv"],
                      cand_mask=inputs["cand_mask"])
    with pytest.raises(ValueError, match="sampled_old_logprobs is required when rl_alpha > 0"):
        mopd_objective(batch, MOPDLossSettings(rl_alpha=0.5), cand_logprobs=inputs["cand_logprobs"],
                       sampled_logprobs=inputs["sampled_logprobs"])


def test_settings_survive_a_pickle_round_trip():
    # They travel to the trainer ranks as Ray arguments.
    import pickle

    settings = MOPDLossSettings(clip_eps=0.2, rl_alpha=0.1)
    assert pickle.loads(pickle.dumps(settings)) == settings


def test_metrics_at_theta_old_need_no_loss():
    # What the driver logs each step: the batch's diagnostics, without evaluating the loss.
    inputs = _random_batch(F64, seed=1)
    batch = MOPDBatch(mask=inputs["mask"], cand_old_logprobs=inputs["cand_old_logprobs"], cand_adv=inputs["cand_adv"],
                      cand_mask=inputs["cand_mask"], sampled_old_logprobs=inputs["sampled_old_logprobs"],
                      sampled_teacher_logprobs=inputs["sampled_teacher_logprobs"],
                      teacher_index=inputs["teacher_index"])
    metrics = mopd_metrics(batch, MOPDLossSettings(), teacher_names=["a", "b", "c"])
    assert not any(key.startswith("mopd/loss") for key in metrics)
    assert metrics["mopd/clip_frac"] == 0.0
    mask = inputs["mask"]
    expected_kl = ((inputs["sampled_old_logprobs"] - inputs["sampled_teacher_logprobs"]) * mask).sum() / mask.sum()
    assert metrics["mopd/reverse_kl"] == pytest.approx(float(expected_kl))
    assert sum(metrics[f"mopd/token_share/{name}"] for name in "abc") == pytest.approx(1.0)


# ---------------------------------------------------------------------------------------------------------
# The rest bucket R = V ∖ Ω (rest_bucket=True)


def _rest_batch(s_ids, s_lp, t_ids, t_lp, n, t):
    cand_mask, cand_adv = overlap_advantages(s_ids, s_lp, t_ids, t_lp)
    _, cand_teacher = teacher_logprobs_at_candidates(s_ids, t_ids, t_lp)
    rest_old, rest_adv = rest_bucket_advantage(cand_mask, s_lp, cand_teacher)
    return MOPDBatch(mask=torch.ones(n, t, dtype=F64), cand_old_logprobs=s_lp, cand_adv=cand_adv,
                     cand_mask=cand_mask, rest_old_logprobs=rest_old, rest_adv=rest_adv)


def test_rest_bucket_gradient_at_theta_old_is_the_coarsened_kl_over_detached_mass():
    # With R, the loss's gradient at θ_old is ∇ KL(πθ‖π_T) over the partition {v ∈ Ω} ∪ {R}, / sg[πθ(Ω)].
    n, t = 2, 3
    student_logits, teacher_lp_full, s_ids, s_lp, t_ids, t_lp = _student_teacher(n=n, t=t)
    batch = _rest_batch(s_ids, s_lp, t_ids, t_lp, n, t)
    assert bool(batch.cand_mask.any(-1).all()) and bool((~batch.cand_mask).any())

    theta = student_logits.clone().requires_grad_()
    loss, _ = mopd_objective(batch, MOPDLossSettings(rest_bucket=True),
                             cand_logprobs=torch.log_softmax(theta, -1).gather(-1, s_ids))
    (grad_mopd,) = torch.autograd.grad(loss, theta)

    theta2 = student_logits.clone().requires_grad_()
    probs = torch.softmax(theta2, -1).gather(-1, s_ids)
    teacher_probs = teacher_lp_full.exp().gather(-1, s_ids)
    zeros = torch.zeros_like(probs)
    on_omega = torch.where(batch.cand_mask, probs, zeros)
    rest, rest_teacher = 1 - on_omega.sum(-1), 1 - torch.where(batch.cand_mask, teacher_probs, zeros).sum(-1)
    kl = (torch.where(batch.cand_mask, probs * (probs.log() - teacher_probs.log()), zeros).sum(-1)
          + rest * (rest.log() - rest_teacher.log()))                    # KL over Ω's tokens and R
    (grad_kl,) = torch.autograd.grad((kl / on_omega.sum(-1).detach()).mean(), theta2)

    assert grad_mopd.abs().max() > 1e-3
    torch.testing.assert_close(grad_mopd, grad_kl, rtol=1e-9, atol=1e-12)


def test_rest_bucket_pulls_the_mass_outside_omega_toward_the_teachers():
    # One state, V = 6, k = 2. The student is sure of token 0, the teacher prefers token 1 more than the student
    # does and puts almost nothing on tokens 2–5. The Ω terms lower token 0 and the softmax hands part of that
    # mass to tokens 2–5 too; a(R) < 0 pushes it back.
    student = torch.tensor([[[6.0, 3.0, 0.0, 0.0, 0.0, 0.0]]], dtype=F64)
    teacher_lp_full = torch.log_softmax(torch.tensor([[[4.0, 3.5, -4.0, -4.0, -4.0, -4.0]]], dtype=F64), -1)
    s_lp, s_ids = torch.log_softmax(student, -1).topk(2, -1)
    t_lp, t_ids = teacher_lp_full.topk(2, -1)
    batch = _rest_batch(s_ids, s_lp, t_ids, t_lp, 1, 1)
    assert bool(batch.cand_mask.all())
    assert batch.cand_adv[0, 0, 0] < 0 < batch.cand_adv[0, 0, 1] and batch.rest_adv[0, 0] < 0

    def mass_outside_after(steps: int, rest_bucket: bool) -> float:
        logits = student.clone().requires_grad_()
        opt = torch.optim.SGD([logits], lr=1.0)
        for _ in range(steps):   # π_old fixed: one update of several optimizer steps
            loss, _ = mopd_objective(batch, MOPDLossSettings(rest_bucket=rest_bucket),
                                     cand_logprobs=torch.log_softmax(logits, -1).gather(-1, s_ids))
            opt.zero_grad()
            loss.backward()
            opt.step()
        return float(torch.softmax(logits.detach(), -1)[0, 0, 2:].sum())

    for steps in (1, 5, 20):
        assert mass_outside_after(steps, True) < mass_outside_after(steps, False), steps


def test_rest_bucket_is_zero_where_omega_is_empty_and_finite_where_omega_holds_all_mass():
    s_ids = torch.tensor([[[0, 1], [2, 3]]])
    s_lp = torch.tensor([[[0.0, -40.0], [-0.1, -2.5]]], dtype=F64)      # position 0: Ω holds all the mass
    t_ids = torch.tensor([[[0, 1], [4, 5]]])                              # position 1: Ω empty
    t_lp = torch.tensor([[[-1e-9, -30.0], [-0.1, -2.5]]], dtype=F64)
    batch = _rest_batch(s_ids, s_lp, t_ids, t_lp, 1, 2)
    assert batch.rest_adv[0, 1] == 0.0
    assert torch.isfinite(batch.rest_adv).all() and torch.isfinite(batch.rest_old_logprobs).all()
    theta = s_lp.clone().requires_grad_()
    loss, _ = mopd_objective(batch, MOPDLossSettings(rest_bucket=True), cand_logprobs=theta)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(theta.grad).all()


def test_rest_bucket_without_its_arrays_is_a_clear_error():
    _, _, s_ids, s_lp, t_ids, t_lp = _student_teacher()
    cand_mask, cand_adv = overlap_advantages(s_ids, s_lp, t_ids, t_lp)
    batch = MOPDBatch(mask=torch.ones(2, 3, dtype=F64), cand_old_logprobs=s_lp, cand_adv=cand_adv, cand_mask=cand_mask)
    with pytest.raises(ValueError, match="rest_old_logprobs is required when rest_bucket=True"):
        mopd_objective(batch, MOPDLossSettings(rest_bucket=True), cand_logprobs=s_lp)
