"""Padding-free micro-batches: planning, packing, and attention that never crosses sequences (CPU, fp32)."""
from __future__ import annotations

import copy

import pytest
import torch

from posttrain.algorithms.gspo import gspo_loss
from posttrain.algorithms.logprobs import sequence_token_logprobs
from posttrain.trainer.packing import (pack_batch, pack_micro_batch, packed_response_logprobs, pad_per_sequence,
                                       plan_micro_batches, use_varlen_attention)

pytestmark = pytest.mark.unit


def _tiny(attn: str):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=500, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=True,
                         max_position_embeddings=256, attn_implementation="sdpa")
    model = Qwen3ForCausalLM(config).float()
    return use_varlen_attention(model) if attn == "varlen" else model


@pytest.fixture(scope="module")
def models():
    packed = _tiny("varlen")
    alone = _tiny("sdpa")
    alone.load_state_dict(packed.state_dict())
    return packed, alone


def _ragged(n: int, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, 500, (int(k),), generator=g).tolist() for k in torch.randint(1, 20, (n,), generator=g)]
    responses = [torch.randint(0, 500, (int(k),), generator=g).tolist() for k in torch.randint(1, 30, (n,), generator=g)]
    return prompts, responses


def _alone_logprobs(model, prompt, response):
    ids = torch.tensor([prompt + response])
    return sequence_token_logprobs(model, ids, torch.ones_like(ids))[0, len(prompt) - 1:]


def test_plan_is_balanced_within_budget_and_deterministic():
    lengths = [5, 9, 3, 7, 7, 2, 10]
    plan = plan_micro_batches(lengths, 12)
    assert plan == plan_micro_batches(list(lengths), 12)
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))
    assert all(sum(lengths[i] for i in b) <= 12 for b in plan)
    # 43 tokens need ≥ 4 bins of 12; longest first into the least-loaded bin with room: 10 | 9 | 7 | 7, then
    # 5 → the first 7, 3 → the other 7, 2 → the 9. Bins listed by their first index.
    assert plan == [[0, 3], [1, 5], [2, 4], [6]]


def test_plan_avoids_first_fit_decreasing_near_empty_last_bin():
    # 32 tokens fit 2 bins of 16, but first-fit decreasing fills two bins to the brim and leaves a third holding
    # one 3-token sequence (8+7 | 5+5+4 | 3): a whole extra forward/backward pass, FSDP gathers included.
    lengths = [8, 5, 5, 3, 7, 4]
    plan = plan_micro_batches(lengths, 16)
    assert len(plan) == 2
    assert [sum(lengths[i] for i in b) for b in plan] == [16, 16]             # 8+5+3 | 5+7+4
    assert sorted(i for b in plan for i in b) == list(range(len(lengths)))


def test_plan_splits_bins_to_reach_the_agreed_count_and_pads_with_empty_ones():
    lengths = [4, 4, 4, 4]
    assert len(plan_micro_batches(lengths, 16)) == 1
    split = plan_micro_batches(lengths, 16, min_micro_batches=3)
    assert len(split) == 3 and sorted(i for b in split for i in b) == [0, 1, 2, 3]
    padded = plan_micro_batches([4], 16, min_micro_batches=2)
    assert padded == [[0], []]


def test_plan_rejects_a_sequence_longer_than_the_budget_naming_it():
    with pytest.raises(ValueError, match=r"sequence 1 has 20 tokens.*budget 16"):
        plan_micro_batches([3, 20], 16)


def test_response_positions_pick_exactly_the_response_tokens():
    prompts, responses = [[1, 2, 3], [4], [5, 6]], [[7, 8], [9, 10, 11], [12]]
    mb = pack_micro_batch(prompts, responses, [2, 0, 1])
    assert mb.input_ids.tolist() == [[5, 6, 12, 1, 2, 3, 7, 8, 4, 9, 10, 11]]
    assert mb.position_ids.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4, 0, 1, 2, 3]]
    assert mb.cu_seq_lens.tolist() == [0, 3, 8, 12]
    assert mb.response_targets.tolist() == [12, 7, 8, 9, 10, 11]
    assert mb.response_positions.tolist() == [1, 5, 6, 8, 9, 10]
    assert mb.response_lengths == [1, 2, 3]


def test_packed_logprobs_equal_each_sequence_run_alone(models):
    packed_model, alone_model = models
    prompts, responses = _ragged(7)
    micro_batches = pack_batch(prompts, responses, 64)
    assert any(len(mb.sequence_indices) > 1 for mb in micro_batches)
    seen = []
    with torch.no_grad():
        for mb in micro_batches:
            pieces = packed_response_logprobs(packed_model, mb, chunk_size=8).split(mb.response_lengths)
            for i, piece in zip(mb.sequence_indices, pieces):
                torch.testing.assert_close(piece, _alone_logprobs(alone_model, prompts[i], responses[i]),
                                           rtol=0, atol=1e-5)
                seen.append(i)
    assert sorted(seen) == list(range(7))


def test_packed_gspo_loss_and_gradients_equal_the_padded_batch(models):
    """Same loss and the same parameter gradients as running each sequence alone (each sequence counts once)."""
    packed_model, alone_model = models
    prompts, responses = _ragged(5, seed=3)
    g = torch.Generator().manual_seed(4)
    old = [(-6.2 + 0.05 * torch.randn(len(r), generator=g)) for r in responses]
    adv = torch.randn(5, generator=g)

    (mb,) = pack_batch(prompts, responses, 200)
    logprobs, mask = pad_per_sequence(packed_response_logprobs(packed_model, mb, chunk_size=8), mb.response_lengths)
    old_packed, _ = pad_per_sequence(torch.cat([old[i] for i in mb.sequence_indices]), mb.response_lengths)
    loss_packed, _ = gspo_loss(logprobs, old_packed, adv[mb.sequence_indices], mask)
    loss_packed.backward()

    width = max(len(r) for r in responses)
    alone = torch.zeros(5, width)
    old_alone, mask_alone = torch.zeros(5, width), torch.zeros(5, width)
    rows = [_alone_logprobs(alone_model, p, r) for p, r in zip(prompts, responses)]
    for i, row in enumerate(rows):
        alone = alone.index_put((torch.tensor([i]), torch.arange(len(row))), row)
        old_alone[i, :len(row)], mask_alone[i, :len(row)] = old[i], 1.0
    loss_alone, _ = gspo_loss(alone, old_alone, adv, mask_alone)
    loss_alone.backward()

    torch.testing.assert_close(loss_packed, loss_alone, rtol=0, atol=1e-6)
    for (name, p), q in zip(packed_model.named_parameters(), alone_model.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-6, msg=name)
    packed_model.zero_grad(), alone_model.zero_grad()


def test_filler_padding_changes_no_log_prob(models):
    packed_model, _ = models
    prompts, responses = _ragged(4, seed=5)
    with torch.no_grad():
        plain = [packed_response_logprobs(packed_model, mb) for mb in pack_batch(prompts, responses, 96)]
        padded_mbs = pack_batch(prompts, responses, 96, pad_to_multiple=32)
        padded = [packed_response_logprobs(packed_model, mb) for mb in padded_mbs]
    assert all(mb.num_tokens % 32 == 0 for mb in padded_mbs)
    assert any(mb.cu_seq_lens.numel() == len(mb.sequence_indices) + 2 for mb in padded_mbs)   # a filler segment
    for a, b in zip(plain, padded):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_empty_micro_batch_runs_every_layer_with_zero_loss(models):
    packed_model, _ = models
    mb = pack_micro_batch([[1]], [[2]], [])
    logprobs = packed_response_logprobs(packed_model, mb)
    assert logprobs.shape == (0,)
    logprobs.sum().backward()          # the graph reaches the model, so FSDP's per-layer hooks would fire
    assert packed_model.model.layers[0].mlp.up_proj.weight.grad is not None
    packed_model.zero_grad()


def test_a_model_without_packed_attention_is_refused(models):
    _, alone_model = models
    mb = pack_micro_batch([[1, 2]], [[3]], [0])
    with pytest.raises(ValueError, match="use_varlen_attention"):
        packed_response_logprobs(copy.deepcopy(alone_model), mb)
