"""trainer.fsdp for vision-language models on CPU (gloo): 2 sharded ranks = 1 unsharded rank, frozen vision tower,
DCP reshards 2 → 1, bucketed weights and the HF final/ of the committed toy Qwen3-VL (posttrain/toy/assets/toy-vl:
2 vision blocks, 2 decoder layers, tied embedding; fp32); then real runs through `posttrain run`.

The global batch mixes images (three sources), 8-frame videos and a text prompt, with random responses; each
optimizer step is GSPO with gradient clipping that really clips. The 2 ranks get uneven, differently-moded shares
(rank 0: image, image | text, image | video; rank 1: image + video | video | nothing), so that the ranks agree
on their micro-batch count and on each micro-batch's modalities, and run filler rows (posttrain/vl/fsdp.py).
Process groups spawned once for the module:
  P  1 rank, unsharded (the plain VL path: vl_sequence_token_logprobs on padded rows, AdamW): MOPD's top-k and
     candidate log-probs at the initial weights, then 3 steps
  S  2 ranks sharded: the same top-k and candidates, 3 steps, DCP checkpoint after step 2, weight buckets, HF
     final/ with the processor
  C  1 rank sharded: S's checkpoint → step 3
  PF / SF  as P / S with the vision tower frozen (trainer.train_vision: false)
  K  2 ranks sharded with keep_weights_gathered (a no-grad pass first, weights held between micro-batches),
     activation checkpointing and the LM head's stored probabilities: 3 steps
"""
from __future__ import annotations

import functools
import json
import os

import pytest
import torch
from safetensors.torch import load_file

from tests.helpers import REPO, final_weights, metrics_records, run_posttrain, spawn_ranks

pytestmark = pytest.mark.integration

TOY_VL = os.path.join(REPO, "posttrain", "toy", "assets", "toy-vl")
STEPS, LR, MAX_NORM, MICRO_BATCH = 3, 1e-3, 0.05, 2
# The global batch: the kind of each sequence, and each rank's share on 2 ranks (uneven on purpose).
KINDS = ["ground", "count", "text", "ocr", "video", "ground", "video", "video"]
SHARES = {1: [list(range(8))], 2: [[0, 1, 2, 3, 4], [5, 6, 7]]}
VISION_PREFIX = "model.visual."


@functools.lru_cache(maxsize=1)
def _rows_by_kind() -> dict[str, list[dict]]:
    """Held-out rows of the committed visual sources by kind (ground, count, ocr, video), media paths absolute."""
    from posttrain.data import load_prompt_rows

    data = os.path.join(REPO, "recipes", "data")
    rows = load_prompt_rows([os.path.join(data, f"vl-{s}", "eval.jsonl") for s in ("ground", "count", "ocr", "video")],
                            max_rows=16)
    by_kind: dict[str, list[dict]] = {}
    for row in rows:
        by_kind.setdefault(row["data_source"].split("/")[-1], []).append(row)
    return by_kind


def _sequences(processor, tokenizer, config, step: int):
    """The step's VLSequences (same on every rank), their π_old offsets (π_old = πθ detached + offset, per response
    token) and advantages."""
    from posttrain.data import encode_prompt
    from posttrain.vl.inputs import MultimodalPrompt
    from posttrain.vl.logprobs import prepare_vl_sequence
    from posttrain.vl.media import multimodal_prompt

    by_kind = {kind: list(rows) for kind, rows in _rows_by_kind().items()}
    g = torch.Generator().manual_seed(100 + step)
    seqs, old, advantages = [], [], []
    for kind in KINDS:
        if kind == "text":
            prompt = MultimodalPrompt(encode_prompt(tokenizer, [{"role": "user", "content": "What is 2+3?"}]))
        else:
            prompt = multimodal_prompt(tokenizer, by_kind[kind].pop(0))
        response = torch.randint(13, config.text_config.vocab_size, (int(torch.randint(1, 9, (1,), generator=g)),),
                                 generator=g).tolist()
        seqs.append(prepare_vl_sequence(processor, config, prompt, response))
        # π_old a little off πθ: sequence ratios on both sides of GSPO's clip range (ε ≈ 3e-4), some clipped
        old.append((3e-4 * torch.randn(len(response), generator=g)).tolist())
        advantages.append(float(torch.randn((), generator=g)))
    return seqs, old, advantages


def _plain_logprobs(model, seqs, pad_id):
    """The unsharded path's log-probs of each sequence's response tokens, flat in order."""
    from posttrain.vl.logprobs import pack_vl_sequences, vl_sequence_token_logprobs

    lp = vl_sequence_token_logprobs(model, pack_vl_sequences(seqs, pad_id), chunk_size=16)          # [N,L-1]
    return torch.cat([lp[i, s.prompt_len - 1:len(s.token_ids) - 1] for i, s in enumerate(seqs)])


def train_step(model, optimizer, step: int, rank: int, world: int, sharded: bool, keep_gathered: bool = False):
    """One GSPO optimizer step on this rank's share of the global batch; returns the global loss and grad norm."""
    import torch.distributed as dist

    from posttrain.algorithms.gspo import gspo_loss
    from posttrain.trainer.fsdp import clip_grad_norm, hold_gathered_weights, release_gathered_weights
    from posttrain.trainer.packing import pad_per_sequence
    from posttrain.vl.fsdp import plan_vl_micro_batches, vl_response_logprobs

    seqs, old, advantages = _sequences(model.processor, model.tokenizer, model.config, step)
    mine = SHARES[world][rank]
    total = len(seqs)
    if sharded:
        micro_batches = plan_vl_micro_batches(model, [seqs[i] for i in mine], MICRO_BATCH, 0)
        if keep_gathered:
            with torch.no_grad():
                for mb in micro_batches:
                    vl_response_logprobs(model, mb, chunk_size=16)
        parts = [([mine[i] for i in mb.sequence_indices], mb) for mb in micro_batches]
    else:
        parts = [(mine[s:s + MICRO_BATCH], None) for s in range(0, len(mine), MICRO_BATCH)]
    loss_sum = torch.zeros(())
    for n, (idx, mb) in enumerate(parts):
        if keep_gathered:
            hold_gathered_weights(model, hold=n < len(parts) - 1)
        flat = (vl_response_logprobs(model, mb, chunk_size=16) if sharded
                else _plain_logprobs(model, [seqs[i] for i in idx], 0))
        if not idx:       # a filler-only micro-batch: zero loss, but its backward runs the collectives
            (flat.sum() * 0.0).backward()
            continue
        lengths = [len(old[i]) for i in idx]
        logprobs, mask = pad_per_sequence(flat, lengths)
        old_lp = logprobs.detach() + pad_per_sequence(torch.tensor(sum((old[i] for i in idx), [])), lengths)[0]
        loss, _ = gspo_loss(logprobs, old_lp, torch.tensor([advantages[i] for i in idx]), mask)
        scaled = loss * (len(idx) / total)
        scaled.backward()
        loss_sum += scaled.detach()
    if world > 1:
        dist.all_reduce(loss_sum)
    if sharded:
        if keep_gathered:
            release_gathered_weights(model)
        grad_norm = clip_grad_norm(model, MAX_NORM)
    else:
        grad_norm = float(torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None],
                                                         MAX_NORM))
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return {"loss": float(loss_sum), "grad_norm": grad_norm, "micro_batches": len(parts)}


TOP_K = 5


@torch.no_grad()
def head_outputs(model, rank: int, world: int, sharded: bool) -> dict[int, tuple]:
    """MOPD's passes at the current weights on this rank's share of step 0's batch, by sequence: the top-k ids and
    log-probs, log π(y_t), and the log-probs at TOP_K random candidate ids per response token. Unsharded: the plain
    path (body hidden states at the response positions, then the chunked LM head, as TrainerRank.response_hidden
    and MOPDObjective.loss); sharded: vl_topk / vl_candidate_logprobs inside FSDP's gathered forward."""
    from posttrain.algorithms.topk import chunked_logprobs_at, chunked_topk_and_token_logprobs
    from posttrain.vl.fsdp import plan_vl_micro_batches, vl_candidate_logprobs, vl_topk
    from posttrain.vl.logprobs import pack_vl_sequences, vl_hidden_states

    seqs = _sequences(model.processor, model.tokenizer, model.config, 0)[0]
    g = torch.Generator().manual_seed(7)
    candidates = [torch.randint(0, model.config.text_config.vocab_size, (len(s.token_ids) - s.prompt_len, TOP_K),
                                generator=g) for s in seqs]
    mine = SHARES[world][rank]
    out = {}
    if sharded:
        for mb in plan_vl_micro_batches(model, [seqs[i] for i in mine], MICRO_BATCH, 0):
            idx = [mine[i] for i in mb.sequence_indices]
            ids, lps, tok = vl_topk(model, mb, TOP_K, chunk_size=16)
            cand = vl_candidate_logprobs(model, mb, torch.cat([candidates[i] for i in idx] or
                                                              [torch.zeros(0, TOP_K, dtype=torch.long)]), 16)
            if not idx:   # a filler-only micro-batch: it ran for the collectives' sake
                continue
            for i, *parts in zip(idx, *(t.split(mb.response_lengths) for t in (ids, lps, tok, cand[:, :TOP_K]))):
                out[i] = tuple(parts)
        return out
    hidden = vl_hidden_states(model, pack_vl_sequences([seqs[i] for i in mine], 0))                  # [n,L,H]
    weight = model.get_output_embeddings().weight
    for row, i in enumerate(mine):
        s = seqs[i]
        h = hidden[row, s.prompt_len - 1:len(s.token_ids) - 1]                                          # [T,H]
        targets = torch.tensor(s.token_ids[s.prompt_len:])
        ids, lps, tok = chunked_topk_and_token_logprobs(h, weight, TOP_K, targets, 16)
        out[i] = (ids, lps, tok, chunked_logprobs_at(h, weight, candidates[i], 16))
    return out


def _load(sharded: bool, train_vision: bool = True, keep_gathered: bool = False):
    import posttrain.vl  # noqa: F401  (the torchvision shim before any processor import)
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from posttrain.vl.fsdp import build_trainable_optimizer, shard_vl_model
    from posttrain.vl.logprobs import set_vision_trainable

    model = AutoModelForImageTextToText.from_pretrained(TOY_VL, dtype=torch.float32)
    set_vision_trainable(model, train_vision)
    processor = AutoProcessor.from_pretrained(TOY_VL)
    if sharded:
        shard_vl_model(model, reshard_after_forward=not keep_gathered, activation_checkpointing=keep_gathered,
                       lm_head_store_probs=keep_gathered)
        optimizer = build_trainable_optimizer(model, lr=LR)
    else:
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=LR, weight_decay=0.0,
                                      foreach=True)
    # the test's helpers read these off the model (one object to pass around)
    model.processor, model.tokenizer = processor, processor.tokenizer
    return model, optimizer


def _job(rank: int, world: int, init_method: str, mode: str, workdir: str) -> None:
    import torch.distributed as dist

    from posttrain.trainer.dcp import load_sharded, save_hf_model, save_sharded
    from posttrain.trainer.weight_sync import gather_full_state_dict, iter_weight_buckets

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=init_method, rank=rank, world_size=world)
    sharded = mode not in ("P", "PF")
    model, optimizer = _load(sharded, train_vision=mode not in ("PF", "SF"), keep_gathered=mode == "K")
    result = {}
    if mode in ("P", "S"):
        result["head_outputs"] = head_outputs(model, rank, world, sharded)
    if mode in ("P", "PF", "S", "SF", "K"):
        result["steps"] = []
        for step in range(STEPS):
            result["steps"].append(train_step(model, optimizer, step, rank, world, sharded, keep_gathered=mode == "K"))
            if step == 1 and mode == "S":
                save_sharded(os.path.join(workdir, "ckpt_S"), model, optimizer)
        result["final"] = gather_full_state_dict(model) if sharded else dict(model.state_dict())
    if mode == "S":
        result["buckets"] = [[(name, t.dtype) for name, t in bucket]
                             for bucket in iter_weight_buckets(model, 100_000, dtype=torch.bfloat16)]
        save_hf_model(model, os.path.join(workdir, "final"), dtype=torch.float32, tokenizer=model.processor)
    if mode == "C":
        load_sharded(os.path.join(workdir, "ckpt_S"), model, optimizer)
        result["resume_step"] = train_step(model, optimizer, 2, rank, world, sharded)
        result["final"] = gather_full_state_dict(model)
    if rank == 0:
        torch.save(result, os.path.join(workdir, f"result_{mode}.pt"))
    dist.destroy_process_group()


def _spawn(world: int, mode: str, workdir: str) -> dict:
    return spawn_ranks(_job, world, mode, workdir)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("fsdp_vl"))
    runs = {"workdir": workdir, "P": _spawn(1, "P", workdir), "S": _spawn(2, "S", workdir)}
    runs["C"] = _spawn(1, "C", workdir)
    runs["PF"], runs["SF"] = _spawn(1, "PF", workdir), _spawn(2, "SF", workdir)
    runs["K"] = _spawn(2, "K", workdir)
    return runs


def _initial_weights() -> dict:
    return load_file(os.path.join(TOY_VL, "model.safetensors"))


def _max_diff(a: dict, b: dict, names=None) -> float:
    names = list(a) if names is None else names
    return max(float((a[k] - b[k]).abs().max()) for k in names)


def _assert_steps_match(plain: list, sharded: list) -> None:
    for s1, s2 in zip(plain, sharded):
        assert s2["loss"] == pytest.approx(s1["loss"], rel=1e-5, abs=1e-7)
        assert s2["grad_norm"] == pytest.approx(s1["grad_norm"], rel=1e-4)
        assert s1["grad_norm"] > MAX_NORM          # clipping was active, so the DTensor clip path is exercised


def test_two_sharded_ranks_match_one_unsharded_rank_on_images_video_and_text(runs):
    plain, sharded = runs["P"], runs["S"]
    _assert_steps_match(plain["steps"], sharded["steps"])
    # rank 0 ran 3 micro-batches, so rank 1 ran a filler-only one after its own 2
    assert [s["micro_batches"] for s in sharded["steps"]] == [3] * STEPS
    assert plain["final"].keys() == sharded["final"].keys()
    assert _max_diff(plain["final"], sharded["final"]) < 2e-5
    initial = _initial_weights()
    # the update moved the weights well beyond that tolerance, the vision tower's too
    assert _max_diff(plain["final"], initial, list(initial)) > 1e-3
    assert _max_diff(plain["final"], initial, [k for k in initial if k.startswith(VISION_PREFIX + "blocks.")]) > 1e-4


def test_mopd_topk_and_candidate_logprobs_of_the_sharded_vlm_match_the_plain_path(runs):
    plain, sharded = runs["P"]["head_outputs"], runs["S"]["head_outputs"]
    assert sorted(sharded) == SHARES[2][0] and set(sharded) <= set(plain)
    for i, (ids, lps, tok, cand) in sharded.items():
        p_ids, p_lps, p_tok, p_cand = plain[i]
        assert torch.equal(ids, p_ids), i
        for a, b in ((lps, p_lps), (tok, p_tok), (cand, p_cand)):
            torch.testing.assert_close(a, b, rtol=0, atol=2e-5, msg=f"sequence {i}")


def test_frozen_vision_tower_stays_put_and_the_rest_matches(runs):
    plain, sharded, initial = runs["PF"], runs["SF"], _initial_weights()
    _assert_steps_match(plain["steps"], sharded["steps"])
    vision = [k for k in initial if k.startswith(VISION_PREFIX)]
    assert vision and _max_diff(sharded["final"], initial, vision) == 0.0
    assert _max_diff(plain["final"], initial, vision) == 0.0
    assert _max_diff(plain["final"], sharded["final"]) < 2e-5
    assert _max_diff(sharded["final"], initial, [k for k in initial if k not in vision]) > 1e-3


def test_weights_kept_gathered_with_checkpointed_layers_and_stored_probs_train_alike(runs):
    """trainer.keep_weights_gathered, activation_checkpointing and lm_head_store_probs on the VL path: the vision
    blocks run twice per micro-batch (images, then videos) with their weights held gathered; same result."""
    _assert_steps_match(runs["P"]["steps"], runs["K"]["steps"])
    assert _max_diff(runs["P"]["final"], runs["K"]["final"]) < 2e-5


def test_dcp_checkpoint_of_two_ranks_resumes_on_one(runs):
    assert runs["C"]["resume_step"]["loss"] == pytest.approx(runs["S"]["steps"][2]["loss"], rel=1e-5)
    assert _max_diff(runs["C"]["final"], runs["S"]["final"]) < 2e-5


def test_weight_buckets_carry_every_hf_name_of_the_vlm(runs):
    names = [name for bucket in runs["S"]["buckets"] for name, _ in bucket]
    from transformers import AutoModelForImageTextToText

    import posttrain.vl  # noqa: F401
    expected = list(AutoModelForImageTextToText.from_pretrained(TOY_VL, dtype=torch.float32).state_dict())
    assert names == expected
    assert "lm_head.weight" in names and "model.language_model.embed_tokens.weight" in names   # tied: both names
    assert any(n.startswith(VISION_PREFIX + "blocks.") for n in names)
    assert all(dtype == torch.bfloat16 for bucket in runs["S"]["buckets"] for _, dtype in bucket)


def test_hf_final_is_one_loadable_vlm_folder_with_the_trained_weights(runs):
    import posttrain.vl  # noqa: F401
    from transformers import AutoModelForImageTextToText, AutoProcessor

    final = os.path.join(runs["workdir"], "final")
    loaded = AutoModelForImageTextToText.from_pretrained(final, dtype=torch.float32)
    assert type(loaded).__name__ == "Qwen3VLForConditionalGeneration"
    assert json.load(open(os.path.join(final, "config.json")))["architectures"] == ["Qwen3VLForConditionalGeneration"]
    AutoProcessor.from_pretrained(final)                                      # processor files written beside it
    assert os.path.isfile(os.path.join(final, "processor_config.json"))
    state = loaded.state_dict()
    assert _max_diff(state, runs["S"]["final"], list(runs["S"]["final"])) == 0.0


@pytest.mark.unit
def test_filler_rows_and_the_media_agreement():
    import posttrain.vl  # noqa: F401
    from transformers import AutoConfig

    from posttrain.vl.fsdp import agree_media_kinds, filler_sequence, media_kinds

    config = AutoConfig.from_pretrained(TOY_VL)
    both = filler_sequence(config, True, True, 0)
    assert both.token_ids == [config.vision_start_token_id, config.image_token_id, config.vision_end_token_id,
                              config.vision_start_token_id, config.video_token_id, config.vision_end_token_id]
    assert both.token_types == [0, 1, 0, 0, 2, 0] and both.prompt_len == len(both.token_ids)   # never scored
    assert both.pixels["image_grid_thw"].tolist() == [[1, 2, 2]]           # merge² patches: one token
    assert tuple(both.pixels["pixel_values_videos"].shape) == (4, 3 * 2 * 16 * 16)
    assert media_kinds([both]) == (True, True) and media_kinds([filler_sequence(config, False, True, 0)]) == (False, True)
    text = filler_sequence(config, False, False, 7)
    assert text.token_ids == [7] and not text.pixels and media_kinds([text]) == (False, False)
    assert agree_media_kinds([(True, False), (False, False)]) == [(True, False), (False, False)]   # one process


# ---------------------------------------------------------------------------------------------------------------
# Recipe checks: the packed-row options are refused for a vision-language model, naming the field and the fix

VL_RECIPE = "recipes/vl-quickstart.yaml"


@pytest.mark.unit
@pytest.mark.parametrize("override, field", [("trainer.token_budget=4096", "trainer.token_budget"),
                                             ("trainer.pad_to_multiple=64", "trainer.pad_to_multiple"),
                                             ("trainer.compile_layers=true", "trainer.compile_layers")])
def test_packed_row_options_are_refused_for_a_vision_language_model(override, field):
    from posttrain.config import RecipeError, load_recipe

    with pytest.raises(RecipeError, match="is a vision-language model") as err:
        load_recipe(os.path.join(REPO, VL_RECIPE), ["trainer.fsdp=true", override])
    assert f"`{field}`" in str(err.value) and f"drop {field}" in str(err.value)
    assert "right-padded micro-batches of trainer.micro_batch_size" in str(err.value)
    # the text model's FSDP path takes them
    load_recipe(os.path.join(REPO, "recipes", "smoke.yaml"), ["trainer.fsdp=true", override])


@pytest.mark.unit
def test_the_options_the_vl_path_honours_pass_the_recipe_check():
    from posttrain.config import load_recipe

    recipe = load_recipe(os.path.join(REPO, VL_RECIPE), [
        "trainer.fsdp=true", "trainer.keep_weights_gathered=true", "trainer.activation_checkpointing=true",
        "trainer.lm_head_store_probs=true", "trainer.optimizer_offload=true", "trainer.train_vision=false"])
    assert recipe.trainer.fsdp and not recipe.trainer.train_vision


@pytest.mark.unit
def test_trainer_settings_built_without_the_recipe_check_are_checked_too():
    from posttrain.config import vision_language_fsdp_problems
    from posttrain.trainer.worker import TrainerSettings

    settings = TrainerSettings(model_path=TOY_VL, dtype="float32", seed=0, use_gpu=False, backend="gloo",
                               torch_threads=1, reserved_cpus=0, micro_batch_size=2, logprob_chunk_size=16,
                               optimizer=None, objective=None, fsdp=True, token_budget=512)
    [problem] = vision_language_fsdp_problems(settings)
    assert problem.startswith("`trainer.token_budget` = 512") and "trainer.micro_batch_size" in problem


# ---------------------------------------------------------------------------------------------------------------
# Real runs: `posttrain run` on the VL quickstart with trainer.fsdp, 2 sharded ranks against 1, resume 1 → 2

# 8 samples a step in 2 mini-batches (the second one's π_old from the sharded trainer's own pass), 2 sequences per
# micro-batch: 2 micro-batches per mini-batch on 1 rank, 1 per rank on 2 ranks.
VL_FSDP = [VL_RECIPE, "trainer.fsdp=true", "rollout.prompts_per_step=2", "rollout.n=4", "algorithm.mini_batches=2",
           "data.eval_files=[]", "data.eval_every=0", "checkpoint.every=1", "trainer.micro_batch_size=2"]


_run, _records, _final = run_posttrain, metrics_records, final_weights


@pytest.mark.slow
def test_vl_run_on_two_sharded_ranks_matches_one_and_resumes_across_rank_counts(tmp_path):
    one, two, moved = str(tmp_path / "one"), str(tmp_path / "two"), str(tmp_path / "moved")
    _run([*VL_FSDP, "total_steps=2", "--run-dir", one])
    _run([*VL_FSDP, "total_steps=2", "trainer.num_workers=2", "--run-dir", two])
    a, b = _records(one), _records(two)
    assert [r["step"] for r in a] == [r["step"] for r in b] == [1, 2]
    # Step 1 trains on the same samples from the same weights: the same rewards, loss and gradient norm.
    assert a[0]["reward/mean"] == b[0]["reward/mean"]
    assert a[0]["loss/grad_norm"] == pytest.approx(b[0]["loss/grad_norm"], rel=1e-4)
    assert a[0]["loss/policy"] == pytest.approx(b[0]["loss/policy"], abs=1e-6)
    for r in a + b:           # the engine (vLLM) and the sharded trainer agree on an image prompt after each sync
        assert r["rollout/canary_max_abs_diff"] < 2e-3
    wa, wb = _final(one), _final(two)
    assert set(wa) == set(wb)
    for name in wa:
        torch.testing.assert_close(wb[name], wa[name], rtol=1e-4, atol=1e-5, msg=name)
    assert os.path.isfile(os.path.join(two, "final", "processor_config.json"))      # final/ is a whole VLM folder
    # Resharding: 1 rank for step 1, then its sharded checkpoint resumed on 2 ranks for step 2.
    _run([*VL_FSDP, "total_steps=1", "--run-dir", moved])
    out = _run([*VL_FSDP, "total_steps=2", "trainer.num_workers=2", "--allow-change", "total_steps",
                "--allow-change", "trainer.num_workers", "--run-dir", moved])
    assert "resuming" in out.stdout
    assert [r["step"] for r in _records(moved)] == [1, 2]
    wm = _final(moved)
    for name in wa:
        torch.testing.assert_close(wm[name], wa[name], rtol=1e-4, atol=1e-5, msg=name)
