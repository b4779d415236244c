"""Multimodal prompts as the engine and the trainer see them (Qwen-VL family, Qwen3-VL conventions).

The engine and the trainer must agree token for token. A prompt travels as token ids holding ONE
`<|image_pad|>` / `<|video_pad|>` per item (vLLM expands each into the item's tokens itself; ids that are
already expanded are silently wrong there), plus the media. The trainer expands the same ids the way vLLM does
(`expand_media_tokens`): an image becomes grid_t*grid_h*grid_w/merge² pads; a video becomes, per pair of frames,
`<t seconds>` (tokenised alone) + `<|vision_start|>` + pads + `<|vision_end|>`, inside the prompt's own
vision markers. The pixel tensors come from the model's own HF processor (`processor_pixels`), whose resizing
and normalisation vLLM applies too.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np

IMAGE_MARK = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_MARK = "<|vision_start|><|video_pad|><|vision_end|>"
TOKEN_TYPE = {"text": 0, "image": 1, "video": 2}       # transformers' mm_token_type_ids


@dataclasses.dataclass
class Video:
    """Decoded frames (T, H, W, 3) uint8 sampled at `fps` frames per second; `frame_indices` are the frames'
    indices in the source (0..T-1 when every frame is kept)."""
    frames: np.ndarray
    fps: float
    frame_indices: list[int] | None = None

    @property
    def indices(self) -> list[int]:
        return list(self.frame_indices) if self.frame_indices is not None else list(range(len(self.frames)))

    def metadata(self) -> dict:
        """What vLLM's Qwen3-VL processor needs beside the frames (it computes the timestamps from them)."""
        total = max(self.indices) + 1
        return {"fps": float(self.fps), "frames_indices": self.indices, "total_num_frames": total,
                "duration": total / float(self.fps), "width": int(self.frames.shape[2]),
                "height": int(self.frames.shape[1]), "video_backend": "posttrain", "do_sample_frames": False}


@dataclasses.dataclass
class MultimodalPrompt:
    """A prompt for the engine: token ids with one pad per item, and the items in prompt order per modality."""
    token_ids: list[int]
    images: list = dataclasses.field(default_factory=list)      # PIL.Image (RGB)
    videos: list[Video] = dataclasses.field(default_factory=list)


def template_messages(messages: list[dict]) -> list[dict]:
    """Chat messages with media placeholders (`<image>` / `<video>` in text, or content parts
    {"type": "image"} / {"type": "video"} / {"type": "text", "text": ...}) as plain-string messages holding the
    vision markers, in order; any string chat template then renders them."""
    out = []
    for message in messages:
        content = message["content"]
        if isinstance(content, list):
            pieces = []
            for part in content:
                kind = part.get("type")
                pieces.append(IMAGE_MARK if kind == "image" else VIDEO_MARK if kind == "video"
                              else part.get("text", ""))
            content = "".join(pieces)
        else:
            content = content.replace("<image>", IMAGE_MARK).replace("<video>", VIDEO_MARK)
        out.append({**message, "content": content})
    return out


def encode_vl_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Chat template → token ids with one pad per media item (what the engine takes)."""
    text = tokenizer.apply_chat_template(template_messages(messages), add_generation_prompt=True, tokenize=False)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def engine_multi_modal_data(prompt: MultimodalPrompt) -> dict | None:
    """vLLM's `multi_modal_data` for a TokensPrompt: images as PIL images, videos as (frames, metadata)."""
    data: dict[str, Any] = {}
    if prompt.images:
        data["image"] = list(prompt.images)
    if prompt.videos:
        data["video"] = [(v.frames, v.metadata()) for v in prompt.videos]
    return data or None


# ------------------------------------------------------------------------------------------------ trainer side
def video_timestamps(video: Video, temporal_patch_size: int) -> list[float]:
    """Seconds of each group of `temporal_patch_size` frames: the mean of its first and last frame's time (the
    last frame repeated to fill the group), as Qwen3-VL's processors compute them."""
    indices = video.indices
    indices = indices + [indices[-1]] * (-len(indices) % temporal_patch_size)
    times = [i / video.fps for i in indices]
    return [(times[i] + times[i + temporal_patch_size - 1]) / 2 for i in range(0, len(times), temporal_patch_size)]


def processor_pixels(processor, images: list, videos: list[Video]) -> dict:
    """Pixel tensors and grids from the model's HF processor: pixel_values (N_patches, C*T*P*P) and
    image_grid_thw (N_images, 3); pixel_values_videos and video_grid_thw likewise; video_timestamps per video."""
    out: dict[str, Any] = {}
    if images:
        got = processor.image_processor(images=list(images), return_tensors="pt")
        out["pixel_values"], out["image_grid_thw"] = got["pixel_values"], got["image_grid_thw"]
    if videos:
        vp = processor.video_processor
        got = vp(videos=[v.frames for v in videos], do_sample_frames=False, return_tensors="pt",
                 video_metadata=[{k: m[k] for k in ("fps", "frames_indices", "total_num_frames", "duration")}
                                 for m in (v.metadata() for v in videos)])
        out["pixel_values_videos"], out["video_grid_thw"] = got["pixel_values_videos"], got["video_grid_thw"]
        out["video_timestamps"] = [video_timestamps(v, vp.temporal_patch_size) for v in videos]
    return out


def expand_media_tokens(token_ids: list[int], tokenizer, *, image_token_id: int, video_token_id: int,
                        vision_start_id: int, vision_end_id: int, merge_size: int,
                        image_grid_thw=None, video_grid_thw=None, video_timestamps=None) -> tuple[list[int], list[int]]:
    """Engine ids (one pad per item) → (expanded ids, mm_token_type_ids), exactly as vLLM's Qwen3-VL processor
    expands them. An image pad → prod(grid_thw) / merge² image pads; a video pad → for each of its grid_t frame
    groups: tokens of f"<{t:.1f} seconds>" + vision_start + grid_h*grid_w/merge² video pads + vision_end."""
    images = iter([] if image_grid_thw is None else [tuple(int(x) for x in g) for g in image_grid_thw])
    videos = iter([] if video_grid_thw is None else [tuple(int(x) for x in g) for g in video_grid_thw])
    stamps = iter(video_timestamps or [])
    ids, types = [], []
    for tok in token_ids:
        if tok == image_token_id:
            t, h, w = _next(images, "image")
            n = t * h * w // merge_size ** 2
            ids += [image_token_id] * n
            types += [TOKEN_TYPE["image"]] * n
        elif tok == video_token_id:
            t, h, w = _next(videos, "video")
            times = _next(stamps, "video timestamps")
            per_frame = h * w // merge_size ** 2
            for seconds in times[:t]:
                stamp = tokenizer.encode(f"<{seconds:.1f} seconds>", add_special_tokens=False)
                ids += stamp + [vision_start_id] + [video_token_id] * per_frame + [vision_end_id]
                types += [0] * (len(stamp) + 1) + [TOKEN_TYPE["video"]] * per_frame + [0]
        else:
            ids.append(tok)
            types.append(0)
    for left, what in ((images, "image"), (videos, "video")):
        if next(left, None) is not None:
            raise ValueError(f"more {what} grids than {what} pad tokens in the prompt: the prompt ids must hold "
                             f"one pad per {what} (encode them with posttrain.vl.inputs.encode_vl_prompt)")
    return ids, types


def _next(it, what: str):
    item = next(it, None)
    if item is None:
        raise ValueError(f"the prompt has more {what} pad tokens than {what} items; pass one item per pad")
    return item


def special_ids(config) -> dict:
    """The token ids expand_media_tokens needs, from a Qwen-VL HF config."""
    return {"image_token_id": config.image_token_id, "video_token_id": config.video_token_id,
            "vision_start_id": config.vision_start_token_id, "vision_end_id": config.vision_end_token_id,
            "merge_size": config.vision_config.spatial_merge_size}
