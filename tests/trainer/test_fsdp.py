"""FSDP2 trainer blocks on CPU (gloo): 2 sharded ranks = 1 rank, DCP reshards 1↔2, bucketed weights, HF final.

One tiny Qwen3 (2 layers, hidden 128, head_dim 64, vocab 500, tied, fp32, seeded). Every rank builds the same
model, takes its share of the same global batch of ragged sequences (packed into token-budget micro-batches,
padding-free) and runs 3 optimizer steps of the GSPO loss with gradient clipping that really clips.
Three process groups are spawned once for the module (~30 s on 2 busy cores):
  A  1 rank : 3 steps, DCP checkpoint after step 2
  B  2 ranks: 3 steps, DCP checkpoint after step 2, weight buckets, HF final/; then A's checkpoint → step 3
  C  1 rank : B's checkpoint → step 3
  D  2 ranks, moments offloaded (OffloadedAdamW): 3 steps, checkpoint after step 2; then A's checkpoint → step 3
  E  1 rank : D's checkpoint (offloaded moments, 2 ranks) → step 3 with torch's AdamW
  F  2 ranks, trainer.keep_weights_gathered + pad_to_multiple: each step first runs a no-grad pass (π_old-like,
     leaving the weights gathered), then micro-batches that hold the weights gathered between them: 3 steps
"""
from __future__ import annotations

import os

import pytest
import torch
import torch.multiprocessing as mp

from tests.helpers import file_rendezvous, spawn_ranks

pytestmark = pytest.mark.integration

GLOBAL_BATCH, TOKEN_BUDGET, STEPS, LR, MAX_NORM = 8, 48, 3, 1e-3, 0.05


def tiny_qwen3(seed: int = 0, tie: bool = True):
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(seed)
    config = Qwen3Config(vocab_size=500, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, head_dim=64, tie_word_embeddings=tie,
                         max_position_embeddings=256)
    return Qwen3ForCausalLM(config).float()


def global_batch(step: int):
    """Ragged prompts/responses, old log-probs and advantages of optimizer step `step` (same on every rank)."""
    g = torch.Generator().manual_seed(100 + step)
    prompts = [torch.randint(1, 500, (int(n),), generator=g).tolist() for n in torch.randint(2, 12, (GLOBAL_BATCH,), generator=g)]
    responses = [torch.randint(1, 500, (int(n),), generator=g).tolist() for n in torch.randint(1, 24, (GLOBAL_BATCH,), generator=g)]
    # π_old a little off πθ so that the ratio moves away from 1; log-probs of a 500-way uniform ≈ −6.2
    old = [(-6.2 + 0.05 * torch.randn(len(r), generator=g)).tolist() for r in responses]
    advantages = torch.randn(GLOBAL_BATCH, generator=g).tolist()
    return prompts, responses, old, advantages


def train_step(model, optimizer, step: int, rank: int, world: int, keep_gathered: bool = False,
               pad_to: int = 1) -> dict:
    """One GSPO optimizer step on this rank's share (sequences rank::world) of the global batch.
    keep_gathered: the model was sharded with reshard_after_forward=False; a no-grad pass over the batch first
    (it leaves every unit gathered), then the weights stay gathered between micro-batches, as the worker does."""
    import torch.distributed as dist

    from posttrain.algorithms.gspo import gspo_loss
    from posttrain.trainer.fsdp import clip_grad_norm, hold_gathered_weights, release_gathered_weights
    from posttrain.trainer.packing import agree_micro_batch_count, pack_batch, pad_per_sequence, \
        packed_response_logprobs

    prompts, responses, old, advantages = global_batch(step)
    mine = list(range(rank, GLOBAL_BATCH, world))
    prompts, responses = [prompts[i] for i in mine], [responses[i] for i in mine]
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    from posttrain.trainer.packing import plan_micro_batches
    count = agree_micro_batch_count(len(plan_micro_batches(lengths, TOKEN_BUDGET)))
    loss_sum = torch.zeros(())
    micro_batches = pack_batch(prompts, responses, TOKEN_BUDGET, min_micro_batches=count, pad_to_multiple=pad_to)
    if keep_gathered:
        with torch.no_grad():
            for mb in micro_batches:
                packed_response_logprobs(model, mb, chunk_size=16)
    for n, mb in enumerate(micro_batches):
        if keep_gathered:
            hold_gathered_weights(model, hold=n < len(micro_batches) - 1)
        seqs = [mine[i] for i in mb.sequence_indices]
        logprobs, mask = pad_per_sequence(packed_response_logprobs(model, mb, chunk_size=16), mb.response_lengths)
        old_lp, _ = pad_per_sequence(torch.tensor(sum((old[i] for i in seqs), [])), mb.response_lengths)
        adv = torch.tensor([advantages[i] for i in seqs])
        loss, _ = gspo_loss(logprobs, old_lp, adv, mask)
        # Each sequence counts once in the global mean; FSDP sums the ranks' gradients.
        scaled = loss * (len(seqs) / GLOBAL_BATCH)
        scaled.backward()
        loss_sum += scaled.detach()
    if dist.get_world_size() > 1:
        dist.all_reduce(loss_sum)
    if keep_gathered:
        release_gathered_weights(model)      # what the worker's optimizer_step does first
    grad_norm = clip_grad_norm(model, MAX_NORM)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": float(loss_sum), "grad_norm": grad_norm, "micro_batches": count}


def _job(rank: int, world: int, init_method: str, mode: str, workdir: str) -> None:
    import torch.distributed as dist

    from posttrain.trainer.dcp import load_sharded, save_hf_model, save_sharded
    from posttrain.trainer.fsdp import build_optimizer, shard_model
    from posttrain.trainer.weight_sync import gather_full_state_dict, iter_weight_buckets

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)

    def fresh():
        model = shard_model(tiny_qwen3(), reshard_after_forward=mode != "F")
        return model, build_optimizer(model, lr=LR, offload_moments=mode == "D")

    result = {}
    model, optimizer = fresh()
    if mode in ("A", "B", "D", "F"):
        result["steps"] = []
        for step in range(STEPS):
            result["steps"].append(train_step(model, optimizer, step, rank, world, keep_gathered=mode == "F",
                                              pad_to=8 if mode == "F" else 1))
            if step == 1:
                save_sharded(os.path.join(workdir, f"ckpt_{mode}"), model, optimizer,
                             extra={"step": 2, "scheduler": {"last_epoch": 2, "lrs": [0.5, 0.25]}})
        result["final"] = gather_full_state_dict(model)
    if mode == "B":
        buckets = [[(name, t.dtype, t.numel() * t.element_size()) for name, t in bucket]
                   for bucket in iter_weight_buckets(model, 200_000, dtype=torch.bfloat16)]
        result["buckets"] = buckets
        save_hf_model(model, os.path.join(workdir, "final"), dtype=torch.float32)
        model, optimizer = fresh()
        result["extra"] = load_sharded(os.path.join(workdir, "ckpt_A"), model, optimizer,
                                       extra={"step": 0, "scheduler": {"last_epoch": 0, "lrs": [0.0, 0.0]}})
        train_step(model, optimizer, 2, rank, world)
        result["resumed_from_1_rank"] = gather_full_state_dict(model)
    if mode == "D":
        model, optimizer = fresh()
        load_sharded(os.path.join(workdir, "ckpt_A"), model, optimizer)
        train_step(model, optimizer, 2, rank, world)
        result["resumed_from_plain_adamw"] = gather_full_state_dict(model)
    if mode == "E":
        load_sharded(os.path.join(workdir, "ckpt_D"), model, optimizer)
        train_step(model, optimizer, 2, rank, world)
        result["resumed_from_offloaded"] = gather_full_state_dict(model)
    if mode == "C":
        load_sharded(os.path.join(workdir, "ckpt_B"), model, optimizer)
        result["resume_step"] = train_step(model, optimizer, 2, rank, world)
        result["resumed_from_2_ranks"] = gather_full_state_dict(model)
    if rank == 0:
        torch.save(result, os.path.join(workdir, f"result_{mode}.pt"))
    dist.destroy_process_group()


def _spawn(world: int, mode: str, workdir: str) -> dict:
    return spawn_ranks(_job, world, mode, workdir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("fsdp"))
    runs = {"A": _spawn(1, "A", workdir), "B": _spawn(2, "B", workdir), "C": _spawn(1, "C", workdir),
            "workdir": workdir}
    runs["D"] = _spawn(2, "D", workdir)
    runs["E"] = _spawn(1, "E", workdir)
    runs["F"] = _spawn(2, "F", workdir)
    return runs


def _max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float((a[k] - b[k]).abs().max()) for k in a)


def test_two_ranks_match_one_rank_after_three_steps(runs):
    one, two = runs["A"], runs["B"]
    for s1, s2 in zip(one["steps"], two["steps"]):
        assert s2["loss"] == pytest.approx(s1["loss"], rel=1e-5, abs=1e-7)
        assert s2["grad_norm"] == pytest.approx(s1["grad_norm"], rel=1e-5)
        assert s1["grad_norm"] > MAX_NORM          # clipping was active, so the DTensor clip path is exercised
    assert _max_diff(one["final"], two["final"]) < 2e-5
    # the update moved the weights well beyond that tolerance
    assert _max_diff(one["final"], tiny_qwen3().state_dict()) > 1e-3
    # the ranks' token-budget plans differed and were agreed on
    assert all(s["micro_batches"] >= 1 for s in two["steps"])


def test_dcp_checkpoint_reshards_between_one_and_two_ranks(runs):
    # A's step-2 checkpoint → 2 ranks → step 3 equals A's uninterrupted step 3; and B's → 1 rank likewise
    assert _max_diff(runs["B"]["resumed_from_1_rank"], runs["A"]["final"]) < 2e-5
    assert _max_diff(runs["C"]["resumed_from_2_ranks"], runs["B"]["final"]) < 2e-5
    assert runs["C"]["resume_step"]["loss"] == pytest.approx(runs["B"]["steps"][2]["loss"], rel=1e-5)
    # small trainer state (LR schedule, step) rides along in the same checkpoint
    assert runs["B"]["extra"] == {"step": 2, "scheduler": {"last_epoch": 2, "lrs": [0.5, 0.25]}}


def test_offloaded_moments_train_and_checkpoint_like_torch_adamw_across_rank_counts(runs):
    """trainer.optimizer_offload: sharded host-resident moments give A's weights, and its DCP checkpoints
    load into torch's AdamW (and back) on another number of ranks."""
    assert _max_diff(runs["D"]["final"], runs["A"]["final"]) < 2e-5
    for s1, s2 in zip(runs["A"]["steps"], runs["D"]["steps"]):
        assert s2["loss"] == pytest.approx(s1["loss"], rel=1e-5, abs=1e-7)
    assert _max_diff(runs["D"]["resumed_from_plain_adamw"], runs["A"]["final"]) < 2e-5
    assert _max_diff(runs["E"]["resumed_from_offloaded"], runs["D"]["final"]) < 2e-5


def test_weights_kept_gathered_through_the_step_train_like_one_rank(runs):
    """trainer.keep_weights_gathered (+ rows padded to a multiple of 8): the same losses and weights as A. A gathered
    copy outliving an optimizer step would make the next step's no-grad pass and forward run on stale weights."""
    for s1, s2 in zip(runs["A"]["steps"], runs["F"]["steps"]):
        assert s2["loss"] == pytest.approx(s1["loss"], rel=1e-5, abs=1e-7)
        assert s2["grad_norm"] == pytest.approx(s1["grad_norm"], rel=1e-5)
    assert _max_diff(runs["F"]["final"], runs["A"]["final"]) < 2e-5


def test_weight_buckets_cover_every_hf_name_within_the_byte_bound(runs):
    buckets = runs["B"]["buckets"]
    names = [name for bucket in buckets for name, _, _ in bucket]
    expected = list(tiny_qwen3().state_dict().keys())
    assert names == expected
    assert "lm_head.weight" in names and "model.embed_tokens.weight" in names      # tied: sent under both names
    for bucket in buckets:
        assert all(dtype == torch.bfloat16 for _, dtype, _ in bucket)
        assert len(bucket) == 1 or sum(n for _, _, n in bucket) <= 200_000
    assert len(buckets) > 3


def test_hf_final_is_loadable_and_holds_the_trained_weights(runs):
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(os.path.join(runs["workdir"], "final"), dtype=torch.float32)
    assert type(loaded).__name__ == "Qwen3ForCausalLM"
    assert _max_diff(loaded.state_dict(), runs["B"]["final"]) == 0.0


@pytest.mark.unit
def test_bf16_stored_weights_with_bf16_compute_are_refused():
    from posttrain.trainer.fsdp import shard_model

    with pytest.raises(ValueError, match="load it in float32"):
        shard_model(tiny_qwen3().to(torch.bfloat16), compute_dtype=torch.bfloat16)


@pytest.mark.unit
def test_loading_a_missing_checkpoint_names_the_directory(tmp_path):
    from posttrain.trainer.dcp import load_sharded

    model = tiny_qwen3()
    with pytest.raises(FileNotFoundError, match="holds no DCP checkpoint"):
        load_sharded(str(tmp_path / "nope"), model, torch.optim.AdamW(model.parameters()))


def _untied_job(rank: int, world: int, init_method: str, workdir: str) -> None:
    """Untied embedding and LM head: 2 ranks with each its own FSDP unit, or 1 process with no FSDP at all."""
    import torch.distributed as dist

    from posttrain.trainer.fsdp import build_optimizer, shard_model
    from posttrain.trainer.packing import HEAD_LOGPROBS_METHOD, use_varlen_attention
    from posttrain.trainer.weight_sync import gather_full_state_dict

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    if world > 1:
        model = shard_model(tiny_qwen3(tie=False))
        optimizer = build_optimizer(model, lr=LR)
    else:
        model = use_varlen_attention(tiny_qwen3(tie=False))
        optimizer = torch.optim.AdamW(model.parameters(), lr=LR, foreach=True)
    result = {"head_is_a_unit": hasattr(model.get_output_embeddings(), HEAD_LOGPROBS_METHOD),
              "steps": [train_step(model, optimizer, step, rank, world) for step in range(2)]}
    result["final"] = gather_full_state_dict(model) if world > 1 else dict(model.state_dict())
    if rank == 0:
        torch.save(result, os.path.join(workdir, f"result_untied_{world}.pt"))
    dist.destroy_process_group()


def test_untied_embedding_and_lm_head_as_units_of_their_own_train_like_the_unsharded_model(tmp_path):
    results = {}
    for world in (2, 1):
        mp.spawn(_untied_job, args=(world, file_rendezvous(str(tmp_path), f"untied{world}"), str(tmp_path)),
                 nprocs=world, join=True)
        results[world] = torch.load(tmp_path / f"result_untied_{world}.pt", weights_only=False)
    assert results[2]["head_is_a_unit"] and not results[1]["head_is_a_unit"]
    # Step 1 (same weights) agrees to fp32 noise; after one strongly clipped AdamW step the unsharded and the
    # FSDP trainers differ by ~3e-5 relative (tied models alike: summation order), hence the looser step-2 bound.
    for step, (sharded, plain) in enumerate(zip(results[2]["steps"], results[1]["steps"])):
        assert sharded["loss"] == pytest.approx(plain["loss"], rel=1e-5, abs=1e-7)
        assert sharded["grad_norm"] == pytest.approx(plain["grad_norm"], rel=1e-5 if step == 0 else 1e-4)
    final = {k: v for k, v in results[1]["final"].items() if k in results[2]["final"]}
    assert {"lm_head.weight", "model.embed_tokens.weight"} <= final.keys()
    assert _max_diff({k: results[2]["final"][k] for k in final}, final) < 5e-5     # lr 1e-3: the weights moved ~2e-3
