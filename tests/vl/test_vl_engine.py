"""Engine (vLLM) and trainer (transformers) agree on a vision-language model: the same image prompt and the same
8-frame video prompt give the same response log-probs (within the canary tolerance), and after a weight sync with
perturbed weights a multimodal request still runs and matches the NEW trainer weights (the engine's encoder cache
of the same image is invalidated, not reused). A tiny random Qwen3-VL with init std 0.2, so that a wrong position
or a stale vision embedding moves log-probs far beyond the tolerance."""
import random

import numpy as np
import pytest

pytestmark = pytest.mark.integration
TOLERANCE = 2e-3   # the weight-sync canary's default tolerance


@pytest.fixture(scope="module")
def vl(tmp_path_factory):
    import posttrain.vl  # noqa: F401 — torchvision's operator schemas, before any processor import
    import torch
    from transformers import AutoProcessor, Qwen3VLForConditionalGeneration

    from posttrain.rollout.engine import RolloutEngine
    from posttrain.vl.toy import build_vl_model, save_vl_model, vl_processor, vl_tokenizer

    path = str(tmp_path_factory.mktemp("toy-vl-random"))
    tokenizer = vl_tokenizer(vocab_size=320)
    save_vl_model(build_vl_model(tokenizer, init_std=0.2), tokenizer, vl_processor(tokenizer), path)
    processor = AutoProcessor.from_pretrained(path)
    model = Qwen3VLForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    engine = RolloutEngine(path, max_model_len=512,
                           engine_kwargs={"limit_mm_per_prompt": {"image": 2, "video": 1}})
    yield engine, model, processor


def _prompts(tokenizer):
    from posttrain.vl.inputs import MultimodalPrompt, Video, encode_vl_prompt
    from posttrain.vl.toy import VIDEO_FPS, VL_DOMAINS

    rng = random.Random(3)
    image_ex, video_ex = VL_DOMAINS["ground"].make(rng), VL_DOMAINS["video"].make(rng)
    image = MultimodalPrompt(encode_vl_prompt(tokenizer, [{"role": "user", "content": image_ex.question}]),
                             images=image_ex.images)
    frames = np.stack([np.asarray(f) for f in video_ex.videos[0]])
    assert frames.shape[0] == 8
    video = MultimodalPrompt(encode_vl_prompt(tokenizer, [{"role": "user", "content": video_ex.question}]),
                             videos=[Video(frames, VIDEO_FPS)])
    return [(image, tokenizer.encode(image_ex.answer_text)), (video, tokenizer.encode(video_ex.answer_text))]


def _response_gap(engine, model, processor, prompt, response) -> float:
    """max |engine − trainer| log-prob over the response tokens."""
    from posttrain.vl.inputs import MultimodalPrompt
    from posttrain.vl.logprobs import pack_vl_sequences, prepare_vl_sequence, vl_sequence_token_logprobs
    import torch

    full = MultimodalPrompt(prompt.token_ids + response, prompt.images, prompt.videos)
    engine_lp = torch.tensor(engine.prompt_token_logprobs(full))
    seq = prepare_vl_sequence(processor, model.config, prompt, response)
    batch = pack_vl_sequences([seq], processor.tokenizer.pad_token_id)
    with torch.no_grad():
        trainer_lp = vl_sequence_token_logprobs(model, batch)[0]
    assert engine_lp.shape == trainer_lp.shape       # the engine expanded the pads exactly as the trainer did
    mask = batch["response_mask"][0].bool()
    assert int(mask.sum()) == len(response)
    return float((engine_lp[mask] - trainer_lp[mask]).abs().max())


def test_engine_and_trainer_logprobs_agree_on_image_and_video(vl):
    engine, model, processor = vl
    for prompt, response in _prompts(processor.tokenizer):
        assert _response_gap(engine, model, processor, prompt, response) < TOLERANCE
        # Generation with media runs and returns tokens with their sampling log-probs.
        (samples,) = engine.generate([prompt], n=2, temperature=1.0, top_p=1.0, max_tokens=6, seeds=[7])
        assert len(samples) == 2 and all(len(s["token_ids"]) == len(s["logprobs"]) > 0 for s in samples)


def test_after_a_weight_sync_multimodal_requests_match_the_new_weights(vl):
    import torch

    from posttrain.vl.inputs import MultimodalPrompt
    from posttrain.vl.logprobs import vl_canary_logprobs

    engine, model, processor = vl
    pairs = _prompts(processor.tokenizer)
    image_prompt, _ = pairs[0]
    before = torch.tensor(engine.prompt_token_logprobs(image_prompt))   # fills the encoder cache for this image
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "visual" in name:                  # only the vision tower: a stale image embedding would show
                p.add_(0.05 * torch.randn_like(p))
    named = [(n, t.detach().clone()) for n, t in model.state_dict().items()]
    engine.update_weights(named, version=1)
    after = torch.tensor(engine.prompt_token_logprobs(image_prompt))
    trainer = torch.tensor(vl_canary_logprobs(model, processor, image_prompt))
    assert float((after - before).abs().max()) > 10 * TOLERANCE           # the perturbation is visible
    assert float((after - trainer).abs().max()) < TOLERANCE               # and the engine sees the new tower
    for prompt, response in pairs:
        assert _response_gap(engine, model, processor, prompt, response) < TOLERANCE
    assert isinstance(image_prompt, MultimodalPrompt)
