"""The project's own tiny vision-language model and its visual domains, rendered with PIL.

    posttrain toy build-vl --out posttrain/toy/assets/toy-vl --sft-steps 600
    posttrain toy data-vl --out-dir recipes/data --domains ground,count,ocr,video

Model: Qwen3-VL architecture (vLLM and transformers place positions after a video identically for Qwen3-VL, not
for Qwen2.5-VL), vision depth 2 / hidden 128, text 2 layers / hidden 128, head_dim 64 (vLLM's CPU attention needs
it). Tokenizer: the toy BPE of posttrain.toy.build plus Qwen's vision tokens. Processor: Qwen3VLProcessor with
small pixel budgets, so an image costs a few tokens (a 96x96 image is 3x3 patches of 32 px after the 2x2 merge:
9 tokens; an 8-frame 64x64 video at 2 fps is 4 groups of 2x2: 16 tokens plus 4 timestamps).

Domains (each a verifiable reward from the library; boxes in Qwen3-VL's relative [0, 1000) frame, so the
processor's resizing never changes an answer):
- ground: "Where is the red square?" → `[x1, y1, x2, y2]` (iou, coords=relative1000); habit: xywh for corners.
- count: "How many circles?" → `Answer: N` (exact_answer); habit: the last circle missed.
- ocr: three rendered letters → `Answer: "ABC"` (exact_string); habit: the last letter dropped.
- video: "When is the square red?" on 8 frames at 2 fps → `Answer: 1.0 to 3.0` seconds (tiou); habit: the end
  given as the duration.
Shapes sit on the 32-pixel cells that the vision tokens see (with some jitter), so a 2-layer model can learn them.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import random
from typing import Callable

VL_SPECIAL_TOKENS = ["<|vision_start|>", "<|vision_end|>", "<|image_pad|>", "<|video_pad|>"]
IMAGE_SIZE = 96              # pixels; 3x3 merged cells of 32 px
VIDEO_SIZE = 64              # pixels per frame; 2x2 merged cells
VIDEO_FRAMES, VIDEO_FPS = 8, 2.0
CELL = 32                    # patch 16 x merge 2: what one vision token covers
COLOURS = {"red": (220, 40, 40), "blue": (40, 80, 220), "green": (40, 170, 60)}
LETTERS = "ABCDEHKMNPRTXZ"


# ----------------------------------------------------------------------------------------------- visual domains
@dataclasses.dataclass
class VisualExample:
    question: str                  # holds one <image> / <video> placeholder per item
    answer_text: str
    ground_truth: object
    images: list = dataclasses.field(default_factory=list)        # PIL images
    videos: list = dataclasses.field(default_factory=list)        # lists of PIL frames (at VIDEO_FPS)
    habit_text: str | None = None
    extra_info: dict = dataclasses.field(default_factory=dict)


def _canvas(size: int):
    from PIL import Image
    return Image.new("RGB", (size, size), (245, 245, 245))


def _cell_box(rng: random.Random, cells: int, size_px: int) -> tuple[int, int, int, int]:
    """A box inside one random cell (or a 2x1 / 1x2 pair), shrunk by a few jittered pixels."""
    cx, cy = rng.randrange(cells), rng.randrange(cells)
    w_cells = 2 if cx + 1 < cells and rng.random() < 0.3 else 1
    h_cells = 2 if cy + 1 < cells and w_cells == 1 and rng.random() < 0.3 else 1
    x1, y1 = cx * CELL + rng.randint(2, 6), cy * CELL + rng.randint(2, 6)
    x2, y2 = (cx + w_cells) * CELL - rng.randint(2, 6), (cy + h_cells) * CELL - rng.randint(2, 6)
    return x1, y1, min(x2, size_px), min(y2, size_px)


def _to_1000(v: float, size: int) -> int:
    return int(round(1000 * v / size))


def _ground(rng: random.Random) -> VisualExample:
    from PIL import ImageDraw
    image = _canvas(IMAGE_SIZE)
    draw = ImageDraw.Draw(image)
    cells = IMAGE_SIZE // CELL
    target = _cell_box(rng, cells, IMAGE_SIZE)
    # One distractor of another colour in another cell.
    colour = rng.choice(sorted(COLOURS))
    other = rng.choice([c for c in sorted(COLOURS) if c != colour])
    for _ in range(20):
        distractor = _cell_box(rng, cells, IMAGE_SIZE)
        if distractor[2] <= target[0] or distractor[0] >= target[2] or distractor[3] <= target[1] or distractor[1] >= target[3]:
            draw.rectangle(distractor, fill=COLOURS[other])
            break
    draw.rectangle(target, fill=COLOURS[colour])
    box = [_to_1000(target[0], IMAGE_SIZE), _to_1000(target[1], IMAGE_SIZE),
           _to_1000(target[2], IMAGE_SIZE), _to_1000(target[3], IMAGE_SIZE)]
    xywh = [box[0], box[1], box[2] - box[0], box[3] - box[1]]
    # The answer is in Qwen3-VL's relative frame; the reference stays in the image's pixels (the iou reward
    # rescales the answer with extra_info.image_size, coords=relative1000).
    return VisualExample(f"<image>Where is the {colour} box?", f"Answer: {box}", list(target), images=[image],
                         habit_text=f"Answer: {xywh}",
                         extra_info={"image_size": [IMAGE_SIZE, IMAGE_SIZE]})


def _count(rng: random.Random) -> VisualExample:
    from PIL import ImageDraw
    image = _canvas(IMAGE_SIZE)
    draw = ImageDraw.Draw(image)
    cells = [(x, y) for x in range(IMAGE_SIZE // CELL) for y in range(IMAGE_SIZE // CELL)]
    n = rng.randint(1, 5)
    chosen = rng.sample(cells, n + rng.randint(0, 2))        # circles, then a square or two as distractors
    for i, (cx, cy) in enumerate(chosen):
        x1, y1 = cx * CELL + rng.randint(3, 7), cy * CELL + rng.randint(3, 7)
        x2, y2 = x1 + rng.randint(18, 22), y1 + rng.randint(18, 22)
        colour = COLOURS[rng.choice(sorted(COLOURS))]
        (draw.ellipse if i < n else draw.rectangle)((x1, y1, x2, y2), fill=colour)
    # The habit: one circle missed (as a model that stops scanning early would).
    return VisualExample("<image>How many circles?", f"Answer: {n}", str(n), images=[image],
                         habit_text=f"Answer: {n - 1}" if n > 1 else None)


def _ocr(rng: random.Random) -> VisualExample:
    from PIL import Image, ImageDraw
    text = "".join(rng.choice(LETTERS) for _ in range(3))
    image = Image.new("RGB", (3 * CELL, CELL), (255, 255, 255))
    draw = ImageDraw.Draw(image)
    font = _font(24)
    for i, letter in enumerate(text):
        draw.text((i * CELL + 8 + rng.randint(-2, 2), 3 + rng.randint(-2, 2)), letter, fill=(0, 0, 0), font=font)
    return VisualExample("<image>Read the text.", f'Answer: "{text}"', text, images=[image],
                         habit_text=f'Answer: "{text[:-1]}"')


def _font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)     # FreeType's bundled font (Pillow >= 10.1)
    except (TypeError, OSError):
        return ImageFont.load_default()


def _video(rng: random.Random) -> VisualExample:
    """A square that turns red for a while: the span in seconds, from frame indices and fps. Spans start and end
    on even frames (the vision tower merges frames in pairs) and the frames are 0.5 s apart."""
    from PIL import ImageDraw
    start = 2 * rng.randrange(0, VIDEO_FRAMES // 2 - 1)
    end = 2 * rng.randrange(start // 2 + 1, VIDEO_FRAMES // 2 + 1)
    cells = VIDEO_SIZE // CELL
    box = _cell_box(rng, cells, VIDEO_SIZE)
    frames = []
    for i in range(VIDEO_FRAMES):
        frame = _canvas(VIDEO_SIZE)
        ImageDraw.Draw(frame).rectangle(box, fill=COLOURS["red"] if start <= i < end else COLOURS["blue"])
        frames.append(frame)
    t0, t1 = start / VIDEO_FPS, end / VIDEO_FPS
    return VisualExample("<video>When is the square red?", f"Answer: {t0:.1f} to {t1:.1f}", [t0, t1],
                         videos=[frames], habit_text=f"Answer: {t0:.1f} to {t1 - t0:.1f}" if t0 > 0 else None)   # right by luck at 0 s


@dataclasses.dataclass(frozen=True)
class VisualDomain:
    name: str
    make: Callable[[random.Random], VisualExample]
    reward: str
    reward_kwargs: dict = dataclasses.field(default_factory=dict)


VL_DOMAINS: dict[str, VisualDomain] = {
    "ground": VisualDomain("ground", _ground, "iou", {"coords": "relative1000"}),
    "count": VisualDomain("count", _count, "posttrain.toy.rewards:exact_answer"),
    "ocr": VisualDomain("ocr", _ocr, "posttrain.toy.rewards:exact_string"),
    "video": VisualDomain("video", _video, "tiou"),
}


def make_vl_examples(domains: list[str], n: int, seed: int, split: str) -> list[tuple[str, VisualExample]]:
    """n (domain, example) pairs, domains round-robin, reproducible; "eval" draws from another seed stream."""
    unknown = [d for d in domains if d not in VL_DOMAINS]
    if unknown:
        raise ValueError(f"unknown visual toy domain(s) {unknown}; known: {sorted(VL_DOMAINS)}")
    rng = random.Random(f"vl-{seed}-{split}")
    return [(domains[i % len(domains)], VL_DOMAINS[domains[i % len(domains)]].make(rng)) for i in range(n)]


def write_vl_dataset(out_dir: str, domain: str, n: int, seed: int, split: str) -> str:
    """`out_dir/SPLIT.jsonl` plus its media under `out_dir/media/SPLIT/`: verl-style rows whose `images` are PNG
    paths and whose `videos` are MP4 paths (2 fps), relative to the data file's folder."""
    media_dir = os.path.join(out_dir, "media", split)
    os.makedirs(media_dir, exist_ok=True)
    path = os.path.join(out_dir, f"{split}.jsonl")
    with open(path, "w") as f:
        for i, (name, ex) in enumerate(make_vl_examples([domain], n, seed, split)):
            images, videos = [], []
            for k, image in enumerate(ex.images):
                rel = os.path.join("media", split, f"{i:05d}_{k}.png")
                image.save(os.path.join(out_dir, rel), optimize=True)
                images.append(rel)
            for k, frames in enumerate(ex.videos):
                rel = os.path.join("media", split, f"{i:05d}_{k}.mp4")
                write_video(frames, VIDEO_FPS, os.path.join(out_dir, rel))
                videos.append(rel)
            row = {"prompt": [{"role": "user", "content": ex.question}], "data_source": f"toy-vl/{name}",
                   "reward_model": {"style": "rule", "ground_truth": ex.ground_truth},
                   "extra_info": {"split": split, "index": i, "answer": ex.answer_text, **ex.extra_info}}
            if images:
                row["images"] = images
            if videos:
                row["videos"] = videos
            f.write(json.dumps(row) + "\n")
    return path


def write_video(frames: list, fps: float, path: str) -> None:
    """PIL frames → an MP4 file (MPEG-4 part 2, OpenCV's bundled encoder: no system codec needed)."""
    import cv2
    import numpy as np

    width, height = frames[0].size
    writer = cv2.VideoWriter(path, cv2.VideoWriter_fourcc(*"mp4v"), fps, (width, height))
    try:
        for frame in frames:
            writer.write(cv2.cvtColor(np.asarray(frame.convert("RGB")), cv2.COLOR_RGB2BGR))
    finally:
        writer.release()


# ---------------------------------------------------------------------------------------------- the toy VLM
def vl_tokenizer(seed: int = 0, vocab_size: int = 384):
    """The toy BPE (posttrain.toy.build.train_tokenizer) trained on the visual domains' text, plus Qwen's vision
    tokens as special tokens and the timestamps Qwen3-VL writes before each pair of video frames."""
    from posttrain.toy.build import SPECIAL_TOKENS, train_tokenizer

    texts = []
    for _, ex in make_vl_examples(sorted(VL_DOMAINS), 2000, seed, "tokenizer"):
        texts += [ex.question.replace("<image>", "").replace("<video>", ""), ex.answer_text]
    texts += [f"<{t / 2:.1f} seconds>" for t in range(64)] * 10 + ["user", "assistant", "system"] * 50
    return train_tokenizer(texts, vocab_size, special_tokens=SPECIAL_TOKENS + VL_SPECIAL_TOKENS)


def vl_processor(tokenizer):
    """Qwen3VLProcessor with the toy's pixel budgets: images keep up to 128x128 pixels (16 tokens), videos up to
    16 frames of 64x64; image and video normalisation equal (vLLM normalises videos with the image's mean/std)."""
    from transformers import Qwen2VLImageProcessor, Qwen3VLProcessor, Qwen3VLVideoProcessor

    mean, std = [0.5, 0.5, 0.5], [0.5, 0.5, 0.5]
    image_processor = Qwen2VLImageProcessor(
        patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=mean, image_std=std,
        size={"shortest_edge": CELL * CELL, "longest_edge": 128 * 128})
    video_processor = Qwen3VLVideoProcessor(
        patch_size=16, temporal_patch_size=2, merge_size=2, image_mean=mean, image_std=std,
        size={"shortest_edge": 2 * CELL * CELL, "longest_edge": 16 * VIDEO_SIZE * VIDEO_SIZE},
        do_sample_frames=False, fps=VIDEO_FPS, cap_pixels_per_frame=False)
    return Qwen3VLProcessor(image_processor=image_processor, tokenizer=tokenizer, video_processor=video_processor,
                            chat_template=tokenizer.chat_template)


def build_vl_model(tokenizer, *, hidden_size: int = 128, layers: int = 2, vision_depth: int = 2, seed: int = 0,
                   init_std: float = 0.02, max_positions: int = 1024):
    """A randomly initialised Qwen3-VL sized for the CPU. `init_std` 0.2 makes log-prob comparisons sensitive
    enough to catch position bugs (tests); the warm-up starts from 0.02."""
    import torch
    from transformers import Qwen3VLConfig, Qwen3VLForConditionalGeneration

    torch.manual_seed(seed)
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in VL_SPECIAL_TOKENS}
    vocab = int(math.ceil(len(tokenizer) / 64) * 64)
    eos, pad = tokenizer.convert_tokens_to_ids("<|im_end|>"), tokenizer.convert_tokens_to_ids("<|endoftext|>")
    config = Qwen3VLConfig(
        text_config=dict(vocab_size=vocab, hidden_size=hidden_size, intermediate_size=3 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=hidden_size // 64, num_key_value_heads=1,
                         head_dim=64, max_position_embeddings=max_positions, initializer_range=init_std,
                         rope_parameters={"rope_type": "default", "rope_theta": 10000.0,
                                          "mrope_section": [16, 8, 8], "mrope_interleaved": True},
                         eos_token_id=eos, pad_token_id=pad, bos_token_id=None),
        vision_config=dict(depth=vision_depth, hidden_size=128, intermediate_size=256, num_heads=2, patch_size=16,
                           spatial_merge_size=2, temporal_patch_size=2, out_hidden_size=hidden_size,
                           num_position_embeddings=256, deepstack_visual_indexes=[vision_depth - 1],
                           initializer_range=init_std),
        image_token_id=ids["<|image_pad|>"], video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"], vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=True, eos_token_id=eos, pad_token_id=pad,
    )
    model = Qwen3VLForConditionalGeneration(config).float()
    model.generation_config.eos_token_id = eos
    model.generation_config.pad_token_id = pad
    return model


def save_vl_model(model, tokenizer, processor, out_dir: str) -> None:
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)


def _example_prompt(tokenizer, ex: VisualExample):
    import numpy as np

    from posttrain.vl.inputs import MultimodalPrompt, Video, encode_vl_prompt
    return MultimodalPrompt(encode_vl_prompt(tokenizer, [{"role": "user", "content": ex.question}]),
                            images=list(ex.images),
                            videos=[Video(np.stack([np.asarray(f) for f in frames]), VIDEO_FPS) for frames in ex.videos])


def vl_supervised_warmup(model, processor, examples: list[VisualExample], *, steps: int, batch_size: int = 32,
                         lr: float = 3e-3, seed: int = 0, device: str = "cpu", log_every: int = 25) -> list[float]:
    """Cross-entropy on the demonstrated answers, through the same expansion and log-prob path as RL
    (posttrain.vl.logprobs). Returns the loss curve; the model comes back on the CPU in eval mode."""
    import torch
    from tqdm import tqdm

    from posttrain.vl.logprobs import pack_vl_sequences, prepare_vl_sequence, vl_sequence_token_logprobs

    tokenizer = processor.tokenizer
    rng = random.Random(seed)
    torch.manual_seed(seed)
    encoded: dict[int, object] = {}

    def encode(i: int):
        if i not in encoded:
            ex = examples[i]
            response = tokenizer(ex.answer_text, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
            encoded[i] = prepare_vl_sequence(processor, model.config, _example_prompt(tokenizer, ex), response)
        return encoded[i]

    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / 20) * 0.5 * (1 + math.cos(math.pi * s / steps)))
    model.to(device).train()
    losses = []
    bar = tqdm(range(steps), desc="supervised warm-up (VL)", unit="step")
    for step in bar:
        batch = pack_vl_sequences([encode(i) for i in rng.sample(range(len(examples)), min(batch_size, len(examples)))],
                                  tokenizer.pad_token_id)
        mask = batch["response_mask"].to(device)
        logp = vl_sequence_token_logprobs(model, batch)
        loss = -(logp * mask).sum() / mask.sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
        if step % log_every == 0:
            bar.set_postfix(loss=f"{losses[-1]:.3f}")
    model.to("cpu").eval()
    return losses


def build_toy_vl(out_dir: str, *, domains: list[str] = tuple(VL_DOMAINS), sft_steps: int = 600,
                 sft_rows: int = 4000, habit_rate: float = 0.5, seed: int = 0, lr: float = 3e-3,
                 batch_size: int = 64, device: str = "cpu") -> dict:
    """Tokenizer + processor + Qwen3-VL model + supervised warm-up on the visual domains, saved as one Hugging
    Face folder (transformers and vLLM load it). In a fraction `habit_rate` of the demonstrations where the
    domain's bad habit applies, the demonstrated answer is the habit's (xywh for corners, a circle missed, the
    last letter dropped, the duration for the end): partial competence that a verifiable reward can improve."""
    tokenizer = vl_tokenizer(seed)
    processor = vl_processor(tokenizer)
    model = build_vl_model(tokenizer, seed=seed)
    habit_rng = random.Random(f"{seed}-vl-habits")
    examples = []
    for _, ex in make_vl_examples(list(domains), sft_rows, seed, "sft"):
        if habit_rate > 0 and ex.habit_text is not None and habit_rng.random() < habit_rate:
            ex = dataclasses.replace(ex, answer_text=ex.habit_text)
        examples.append(ex)
    losses = vl_supervised_warmup(model, processor, examples, steps=sft_steps, lr=lr, seed=seed, device=device,
                                  batch_size=batch_size) if sft_steps else []
    save_vl_model(model, tokenizer, processor, out_dir)
    return {"final_sft_loss": losses[-1] if losses else None, "params": sum(p.numel() for p in model.parameters()),
            "loss_curve_every_50": losses[::50]}


def add_text_domains(model_dir: str, out_dir: str, *, text_domains: list[str], sft_steps: int = 300,
                     rows_per_domain: int = 2000, visual_rows: int = 2000, habit_rate: float = 0.5, seed: int = 0,
                     lr: float = 1e-3, batch_size: int = 32, device: str = "cpu") -> dict:
    """Continue a toy VLM's warm-up with TEXT toy domains (posttrain.toy.tasks, e.g. tspan), mixed half and half
    with its visual domains (replayed, so they are not forgotten), habits at `habit_rate` as in the visual
    warm-up. The result answers text-only prompts too: the student of cross-modal MOPD, whose text samples a
    text-only teacher scores. A short continuation runs on the CPU (text rows carry no pixels)."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    from posttrain.toy.tasks import make_rows

    processor = AutoProcessor.from_pretrained(model_dir)
    model = AutoModelForImageTextToText.from_pretrained(model_dir)
    habit_rng = random.Random(f"{seed}-vl-text-habits")
    examples = []
    for row in make_rows(list(text_domains), rows_per_domain * len(text_domains), seed, "sft", with_habits=True):
        info = row["extra_info"]
        answer = info["habit"] if info.get("habit") and habit_rng.random() < habit_rate else info["answer"]
        examples.append(VisualExample(row["prompt"][-1]["content"], answer, row["reward_model"]["ground_truth"]))
    for _, ex in make_vl_examples(sorted(VL_DOMAINS), visual_rows, seed, "sft"):
        if habit_rate > 0 and ex.habit_text is not None and habit_rng.random() < habit_rate:
            ex = dataclasses.replace(ex, answer_text=ex.habit_text)
        examples.append(ex)
    losses = vl_supervised_warmup(model, processor, examples, steps=sft_steps, lr=lr, seed=seed, device=device,
                                  batch_size=batch_size)
    save_vl_model(model, processor.tokenizer, processor, out_dir)
    return {"final_sft_loss": losses[-1], "loss_curve_every_50": losses[::50]}


def build_vl_text_teacher(out_dir: str, *, domains: list[str], sft_steps: int = 600, sft_rows: int = 4000,
                          hidden_size: int = 128, seed: int = 0, lr: float = 3e-3, device: str = "cpu") -> dict:
    """A text-only teacher for cross-modal MOPD: a Qwen3 causal LM (text architecture, no vision tower) with the
    toy VLM's tokenizer and vocabulary, warmed up on text toy domains (posttrain.toy.tasks, no bad habits), so it
    can score the VL student's text-only samples. Same ids as the student: the tokenizer is rebuilt by
    vl_tokenizer(seed), which is deterministic; `posttrain validate` checks the fingerprint against the student."""
    from posttrain.toy.build import build_model, supervised_warmup
    from posttrain.toy.tasks import make_rows

    tokenizer = vl_tokenizer(seed)
    model = build_model(tokenizer, hidden_size=hidden_size, layers=2, seed=seed)
    rows = make_rows(list(domains), sft_rows, seed, "sft")
    losses = supervised_warmup(model, tokenizer, rows, steps=sft_steps, seed=seed, lr=lr, device=device) \
        if sft_steps else []
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    tokenizer.save_pretrained(out_dir)
    return {"final_sft_loss": losses[-1] if losses else None, "params": sum(p.numel() for p in model.parameters())}


def evaluate_vl(model, processor, domains: list[str], *, n: int = 64, seed: int = 0, temperature: float = 1.0,
                max_new_tokens: int = 24, device: str = "cpu") -> dict[str, float]:
    """Mean reward per domain on `n` held-out ("eval" split) examples each, one sample per example, generated
    with transformers (no vLLM needed) from the same inputs the trainer builds."""
    import torch

    from posttrain.vl.logprobs import PIXEL_KEYS, pack_vl_sequences, prepare_vl_sequence
    from rewards.base import bind_reward

    tokenizer = processor.tokenizer
    torch.manual_seed(seed)
    model.to(device).eval()
    scores: dict[str, float] = {}
    for name in domains:
        domain = VL_DOMAINS[name]
        reward = bind_reward(domain.reward, domain.reward_kwargs)
        total = 0.0
        for _, ex in make_vl_examples([name], n, seed, "eval"):
            seq = prepare_vl_sequence(processor, model.config, _example_prompt(tokenizer, ex), [])
            batch = {k: v.to(device) for k, v in pack_vl_sequences([seq], tokenizer.pad_token_id).items()
                     if k != "response_mask"}
            with torch.no_grad():
                out = model.generate(**{k: batch[k] for k in ("input_ids", "attention_mask", "mm_token_type_ids")},
                                     **{k: batch[k] for k in PIXEL_KEYS if k in batch},
                                     max_new_tokens=max_new_tokens, do_sample=temperature > 0,
                                     temperature=temperature if temperature > 0 else None, top_p=1.0, top_k=0)
            text = tokenizer.decode(out[0, batch["input_ids"].shape[1]:], skip_special_tokens=True)
            result = reward(data_source=f"toy-vl/{name}", solution_str=text, ground_truth=ex.ground_truth,
                            extra_info=ex.extra_info)
            total += float(result["score"] if isinstance(result, dict) else result)
        scores[name] = total / n
    model.to("cpu")
    return scores
