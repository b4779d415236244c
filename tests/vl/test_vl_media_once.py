"""A step's media go to the trainer ranks once, through Ray's object store (TrainerGroup.share_media), not again
with every call (π_old, each mini-batch) and every rank."""
import os
import pickle

import numpy as np
import pytest
import ray
import torch

from tests.helpers import REPO  # noqa: E402 — the repository root, wherever this file sits under tests/

pytestmark = pytest.mark.integration

STUDENT = os.path.join(REPO, "posttrain", "toy", "assets", "toy-vl")
GROUND = os.path.join(REPO, "recipes", "data", "vl-ground", "eval.jsonl")


def _recipe(mini_batches: int = 2):
    from posttrain.config import parse_recipe
    return parse_recipe({
        "name": "t", "total_steps": 1, "model": {"path": STUDENT}, "data": {"train_files": ["x.jsonl"]},
        "rewards": {"functions": [{"name": "iou"}]}, "rollout": {"prompts_per_step": 2, "n": 2},
        "algorithm": {"type": "gspo", "mini_batches": mini_batches}})


@pytest.fixture(scope="module")
def vl_batch():
    """Two grounding prompts × n=2 (the two samples of a prompt share one MultimodalPrompt) and a text sample."""
    from transformers import AutoTokenizer

    from posttrain.data import encode_prompt, load_prompt_rows
    from posttrain.vl.media import multimodal_prompt

    tokenizer = AutoTokenizer.from_pretrained(STUDENT)
    rows = load_prompt_rows([GROUND], max_rows=2)
    shared = [multimodal_prompt(tokenizer, row) for row in rows]
    mm = [shared[0], shared[0], shared[1], shared[1], None]
    prompts = [list(m.token_ids) for m in mm[:4]] + [encode_prompt(tokenizer, [{"role": "user",
                                                                                "content": "What is 2+3?"}])]
    answers = [rows[0]["extra_info"]["answer"], "Answer: [1, 2, 3, 4]", rows[1]["extra_info"]["answer"],
               "Answer: [5, 6]", "Answer: 5"]
    responses = [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for a in answers]
    return prompts, responses, mm


@pytest.fixture(scope="module")
def local_ray():
    started = not ray.is_initialized()
    if started:
        ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    if started:
        ray.shutdown()


def test_a_rank_given_the_handle_computes_the_log_probs_of_the_list(vl_batch, local_ray, monkeypatch):
    import torch.distributed as dist

    from posttrain.loops.algorithms import make_algorithm
    from posttrain.orchestration import SharedMedia, TrainerGroup, take_media
    from posttrain.trainer.worker import TrainerRank, free_port, trainer_settings

    prompts, responses, mm = vl_batch
    recipe = _recipe()
    rank = TrainerRank(0, 1, trainer_settings(recipe, make_algorithm(recipe).objective()))
    created = not dist.is_initialized()
    rank.setup("127.0.0.1", free_port())
    try:
        handle = TrainerGroup.share_media(mm)
        assert handle.index == [0, 0, 1, 1, -1]              # the two distinct prompts stored once, text: -1
        by_list = rank.compute_logprobs(prompts, responses, mm)
        fetches = []
        real_get = ray.get
        monkeypatch.setattr(ray, "get", lambda ref: fetches.append(ref) or real_get(ref))
        assert rank.compute_logprobs(prompts, responses, handle) == by_list     # exactly, not approximately
        # The next calls of the step (mini-batches, here a slice) reuse the fetched media.
        assert rank.compute_logprobs(prompts[2:], responses[2:], take_media(handle, [2, 3, 4])) == by_list[2:]
        assert len(fetches) == 1
        # The indices matter: sample 0 given prompt 1's media scores differently.
        assert rank.compute_logprobs(prompts[:1], responses[:1], SharedMedia(handle.boxed_ref, [1])) != by_list[:1]
        assert TrainerGroup.share_media(None) is None and TrainerGroup.share_media([None]) is not None
    finally:
        if created:
            dist.destroy_process_group()


def test_one_gspo_update_puts_the_media_once_and_calls_carry_no_pixels(vl_batch, local_ray, monkeypatch):
    from posttrain.loops.algorithms import make_algorithm
    from posttrain.loops.run import RolloutBatch
    from posttrain.metrics import StepTimer
    from posttrain.orchestration import TrainerGroup
    from posttrain.vl.inputs import MultimodalPrompt

    prompts, responses, mm = vl_batch
    prompts, responses, mm = prompts[:4], responses[:4], mm[:4]
    recipe = _recipe(mini_batches=2)
    algorithm = make_algorithm(recipe)
    trainer = TrainerGroup(recipe, algorithm.objective())
    call_bytes: list[tuple[str, int]] = []

    class RecordingRank:        # the real rank actor; each call's arguments are pickled to count their bytes
        def __init__(self, actor):
            self.actor = actor

        def __getattr__(self, method):
            remote = getattr(self.actor, method).remote

            class Method:
                @staticmethod
                def remote(*args):
                    call_bytes.append((method, len(pickle.dumps(args))))
                    return remote(*args)
            return Method

    puts = []
    real_put = ray.put
    monkeypatch.setattr(ray, "put", lambda value, **kw: puts.append(value) or real_put(value, **kw))
    try:
        trainer.ranks = [RecordingRank(r) for r in trainer.ranks]
        batch = RolloutBatch(row_index=[0, 0, 1, 1], group_ids=torch.tensor([0, 0, 1, 1]), prompts=prompts,
                             responses=responses, sampling_logprobs=[[0.0] * len(r) for r in responses],
                             texts=[""] * 4, finish_reasons=["stop"] * 4, rewards=torch.tensor([1.0, 0.0, 0.5, 0.0]),
                             mm_prompts=mm)
        metrics = algorithm.update(batch, trainer, StepTimer())
    finally:
        trainer.shutdown()
    assert np.isfinite(metrics["loss/grad_norm"])
    media_puts = [v for v in puts if isinstance(v, list) and v and isinstance(v[0], MultimodalPrompt)]
    assert len(media_puts) == 1 and [id(m) for m in media_puts[0]] == [id(mm[0]), id(mm[2])]
    assert all(m is mm[i] for i, m in enumerate(batch.mm_prompts))   # the batch (checkpointed) keeps the objects
    assert [name for name, _ in call_bytes] == ["compute_logprobs", "train_minibatch", "train_minibatch"]
    pixel_bytes = len(pickle.dumps(mm[0]))
    print(f"media per prompt {pixel_bytes} B pickled; per-call arguments {call_bytes}")
    assert all(size < pixel_bytes for _, size in call_bytes), (pixel_bytes, call_bytes)
