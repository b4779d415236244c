"""The driver's per-step MOPD arrays (posttrain.loops.algorithms.mopd_batch) with the rest bucket on: the arrays
reach MOPDBatch under the names the loss reads, equal the pure function's values, and padding carries nothing."""
import types

import numpy as np
import pytest
import torch

from posttrain.algorithms.mopd import MOPDBatch, MOPDLossSettings, mopd_objective, rest_bucket_advantage
from posttrain.loops.algorithms import mopd_batch
from teachers.scores import TeacherScores

pytestmark = pytest.mark.unit


def _scores(rng, lengths, k, vocab):
    parts = []
    for n in lengths:
        logits = rng.normal(size=(n, vocab))
        logp = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
        ids = np.argsort(-logp, -1)[:, :k].astype(np.int32)
        parts.append((ids, np.take_along_axis(logp, ids, -1).astype(np.float32), logp[:, 0].astype(np.float32)))
    return TeacherScores.from_sequences(parts, k)


@pytest.mark.parametrize("rest_bucket", [False, True])
def test_mopd_batch_carries_the_rest_bucket_only_when_asked(rest_bucket):
    rng = np.random.default_rng(0)
    lengths, k, vocab = [3, 5], 4, 7
    student, teacher = _scores(rng, lengths, k, vocab), _scores(rng, lengths, k, vocab)
    m = types.SimpleNamespace(gate_low=None, gate_high=None, rest_bucket=rest_bucket)
    arrays = mopd_batch(student, teacher, [[0] * n for n in lengths], m, rollout_logprobs=[[0.0] * n for n in lengths],
                        token_weights_raw=None, loop_start=list(lengths), outcome_advantages=None)
    assert ("rest_adv" in arrays) == rest_bucket and ("rest_old_logprobs" in arrays) == rest_bucket
    if not rest_bucket:
        return
    batch = MOPDBatch.from_arrays(arrays)
    expected_old, expected_adv = rest_bucket_advantage(batch.cand_mask, batch.cand_old_logprobs,
                                                       batch.cand_teacher_logprobs)
    torch.testing.assert_close(batch.rest_adv, expected_adv)
    torch.testing.assert_close(batch.rest_old_logprobs, expected_old)
    assert batch.rest_adv[0, 3:].abs().sum() == 0                     # sequence 0 is 3 tokens long: padding is 0
    assert batch.rest_adv[:, :3].abs().sum() > 0
    cand = batch.cand_old_logprobs.clone().requires_grad_()
    with_rest, _ = mopd_objective(batch, MOPDLossSettings(rest_bucket=True), cand_logprobs=cand)
    without, _ = mopd_objective(batch, MOPDLossSettings(), cand_logprobs=cand)
    assert torch.isfinite(with_rest) and not torch.equal(with_rest, without)


def test_train_inference_mismatch_metric_is_the_mean_absolute_gap_on_real_tokens():
    from posttrain.loops.algorithms import step_metrics

    rng = np.random.default_rng(1)
    lengths, k, vocab = [2, 4], 3, 6
    student, teacher = _scores(rng, lengths, k, vocab), _scores(rng, lengths, k, vocab)
    old = [student.sequence(i)[2] for i in range(2)]
    mu = [lp + 0.5 for lp in old[:1]] + [old[1] - 0.25]          # the engine off by 0.5 and by 0.25 nats
    m = types.SimpleNamespace(gate_low=None, gate_high=None, rest_bucket=False)
    arrays = mopd_batch(student, teacher, [[0] * n for n in lengths], m, rollout_logprobs=mu, token_weights_raw=None,
                        loop_start=list(lengths), outcome_advantages=None)
    metrics = step_metrics(arrays, MOPDLossSettings(), [0, 1], ["a", "b"])
    assert metrics["mopd/train_inference_abs_diff"] == pytest.approx((2 * 0.5 + 4 * 0.25) / 6, abs=1e-6)
    assert metrics["mopd/train_inference_abs_diff/a"] == pytest.approx(0.5, abs=1e-6)
