"""The toy visual domains score their ideal answers 1 and their habits less with the library's rewards (in the
right coordinate frame), the shipped vl-* datasets load and validate, and the trainer's expansion of engine ids
is token for token the HF processor's."""
import os
import random

import numpy as np
import pytest

from posttrain.vl.toy import VL_DOMAINS, make_vl_examples

pytestmark = pytest.mark.unit
from tests.helpers import REPO  # noqa: E402 — the repository root, wherever this file sits under tests/


@pytest.mark.parametrize("name", sorted(VL_DOMAINS))
def test_ideal_answers_score_one_and_habits_less(name):
    from rewards.base import bind_reward

    domain = VL_DOMAINS[name]
    reward = bind_reward(domain.reward, domain.reward_kwargs)

    def score(text, ex):
        out = reward(data_source=f"toy-vl/{name}", solution_str=text, ground_truth=ex.ground_truth,
                     extra_info=ex.extra_info)
        return out["score"] if isinstance(out, dict) else out

    habits = 0
    for _, ex in make_vl_examples([name], 40, 0, "check"):
        assert score(ex.answer_text, ex) > 0.97, (ex.answer_text, ex.ground_truth)   # ground: 0-1000 rounding
        if ex.habit_text is not None:
            habits += 1
            assert score(ex.habit_text, ex) < 0.9, (ex.habit_text, ex.ground_truth)
        assert ex.question.count("<image>") == len(ex.images) and ex.question.count("<video>") == len(ex.videos)
    assert habits >= 10


def test_grounding_answer_is_relative_and_reference_in_pixels():
    from rewards.iou import compute_score

    _, ex = make_vl_examples(["ground"], 1, 0, "check")[0]
    width, height = ex.extra_info["image_size"]
    assert all(0 <= v <= max(width, height) for v in ex.ground_truth)       # pixels of the image file
    # Read in the wrong frame (absolute) the same answer is far off: the coordinate mode matters.
    assert compute_score("g", ex.answer_text, ex.ground_truth, ex.extra_info, coords="absolute")["score"] < 0.2


def test_shipped_vl_datasets_validate():
    from posttrain.data import load_prompt_rows

    for name in ("vl-ground", "vl-count", "vl-ocr", "vl-video"):
        for split, n in (("train", 256), ("eval", 64)):
            rows = load_prompt_rows([os.path.join(REPO, "recipes", "data", name, f"{split}.jsonl")])
            assert len(rows) == n
            media = rows[0].get("images") or [v["video"] for v in rows[0]["videos"]]
            assert all(os.path.isabs(m) and os.path.exists(m) for m in media)


def test_template_messages_place_one_marker_per_item():
    from posttrain.vl.inputs import IMAGE_MARK, VIDEO_MARK, template_messages

    parts = [{"type": "video"}, {"type": "text", "text": "and"}, {"type": "image"}]
    assert template_messages([{"role": "user", "content": parts}])[0]["content"] == VIDEO_MARK + "and" + IMAGE_MARK
    assert template_messages([{"role": "user", "content": "<image>x<video>"}])[0]["content"] == IMAGE_MARK + "x" + VIDEO_MARK


def test_expansion_matches_the_hf_processor(tmp_path):
    """expand_media_tokens (what the trainer does to the engine's one-pad-per-item ids) gives the ids and
    mm_token_type_ids that Qwen3VLProcessor produces from the text, for two images and an 8-frame video."""
    import posttrain.vl  # noqa: F401
    from posttrain.vl.inputs import (MultimodalPrompt, Video, encode_vl_prompt, expand_media_tokens,
                                     processor_pixels, template_messages)
    from posttrain.vl.toy import VIDEO_FPS, build_vl_model, vl_processor, vl_tokenizer

    tokenizer = vl_tokenizer(vocab_size=320)
    processor = vl_processor(tokenizer)
    config = build_vl_model(tokenizer, layers=1, vision_depth=1).config
    rng = random.Random(0)
    a, b, v = VL_DOMAINS["ground"].make(rng), VL_DOMAINS["ocr"].make(rng), VL_DOMAINS["video"].make(rng)
    messages = [{"role": "user", "content": "<image>then<image>and<video>What?"}]
    video = Video(np.stack([np.asarray(f) for f in v.videos[0]]), VIDEO_FPS)
    prompt = MultimodalPrompt(encode_vl_prompt(tokenizer, messages), images=a.images + b.images, videos=[video])
    pixels = processor_pixels(processor, prompt.images, prompt.videos)
    ids, types = expand_media_tokens(
        prompt.token_ids, tokenizer, image_token_id=config.image_token_id, video_token_id=config.video_token_id,
        vision_start_id=config.vision_start_token_id, vision_end_id=config.vision_end_token_id, merge_size=2,
        image_grid_thw=pixels["image_grid_thw"], video_grid_thw=pixels["video_grid_thw"],
        video_timestamps=pixels["video_timestamps"])
    text = tokenizer.apply_chat_template(template_messages(messages), add_generation_prompt=True, tokenize=False)
    reference = processor(text=[text], images=prompt.images, videos=[video.frames],
                          video_metadata=[{"fps": VIDEO_FPS, "frames_indices": list(range(8)), "total_num_frames": 8,
                                           "duration": 4.0}], return_tensors="pt")
    assert ids == reference["input_ids"][0].tolist()
    assert types == reference["mm_token_type_ids"][0].tolist()
    with pytest.raises(ValueError, match="more image pad tokens than image items"):
        expand_media_tokens(prompt.token_ids, tokenizer, image_token_id=config.image_token_id,
                            video_token_id=config.video_token_id, vision_start_id=config.vision_start_token_id,
                            vision_end_id=config.vision_end_token_id, merge_size=2,
                            image_grid_thw=pixels["image_grid_thw"][:1], video_grid_thw=pixels["video_grid_thw"],
                            video_timestamps=pixels["video_timestamps"])


def test_committed_toy_vl_loads_and_has_partial_competence():
    """The committed asset is one HF folder (model, tokenizer, processor); greedy answers on held-out examples
    are sometimes right (partial competence: RL has signal)."""
    import posttrain.vl  # noqa: F401
    import torch
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    from posttrain.vl.toy import evaluate_vl

    path = os.path.join(REPO, "posttrain", "toy", "assets", "toy-vl")
    processor = AutoProcessor.from_pretrained(path)
    model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32)
    assert model.config.vision_config.depth == 2 and model.config.text_config.num_hidden_layers == 2
    scores = evaluate_vl(model, processor, sorted(VL_DOMAINS), n=8, temperature=0.0)
    assert sum(scores.values()) > 0.2, scores


def test_build_vl_continue_from_adds_text_domains_through_the_cli(tmp_path):
    """`posttrain toy build-vl --continue-from VLM --domains count` writes a loadable VLM folder (the cross-modal
    student's build) whose weights moved; combining it with --text-teacher is refused."""
    import subprocess
    import sys

    from safetensors.torch import load_file

    source = os.path.join(REPO, "posttrain", "toy", "assets", "toy-vl")
    out = tmp_path / "mixed"
    cmd = [sys.executable, "-m", "posttrain.cli", "toy", "build-vl", "--continue-from", source, "--domains", "count",
           "--sft-steps", "2", "--out", str(out)]
    done = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    for name in ("config.json", "model.safetensors", "processor_config.json", "tokenizer.json"):
        assert (out / name).is_file(), name
    before, after = load_file(os.path.join(source, "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert set(before) == set(after)
    assert any(not (before[k] == after[k]).all() for k in before)
    refused = subprocess.run(cmd + ["--text-teacher"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "pick one" in refused.stderr
