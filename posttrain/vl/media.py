"""Images and videos of verl-style multimodal rows: checked up front, loaded for the rollout.

A row carries `images` and/or `videos` beside `prompt`; the prompt marks where each item goes with `<image>` /
`<video>` in its text or with content parts ({"type": "image"}, {"type": "video"}, {"type": "text", "text": ...}),
one mark per item, in order. Items:

- image: a path (relative to the data file's folder, or absolute), raw bytes, {"bytes": ..., "path": ...} (how
  Hugging Face `datasets` stores an Image column in Parquet) or {"image": path};
- video: a video file path (decoded with OpenCV) or {"video": path, "fps": F} (F: frames kept per second), or
  pre-sampled frames {"frames": [image items], "fps": F} (F: frames per second of the list).

`check_row_media` runs on every row when a dataset is loaded (`posttrain validate --check-data` and a run's
start): a missing or unreadable file, a corrupt image, an empty video, too many items in a row, an item too large
(bytes, pixels, frames) or a placeholder count that differs from the item count is an error naming the row, the
item and the file, with the fix. No torch import: PIL and numpy (and OpenCV for video files) only.
"""
from __future__ import annotations

import dataclasses
import io
import os

import numpy as np

from posttrain.data import DatasetError


class MediaError(DatasetError):
    pass


@dataclasses.dataclass(frozen=True)
class MediaLimits:
    """Per-row and per-item bounds. The processor shrinks large images anyway; these catch mistakes (a 100-MP
    scan, a whole film) before they cost memory and time in every rollout."""
    max_images_per_row: int = 8
    max_videos_per_row: int = 2
    max_image_pixels: int = 4096 * 4096
    max_file_bytes: int = 64 * 1024 * 1024
    max_video_frames: int = 256


DEFAULT_LIMITS = MediaLimits()
VIDEO_FILE_EXTENSIONS = (".mp4", ".avi", ".mov", ".mkv", ".webm", ".m4v")


def count_placeholders(prompt: list[dict]) -> tuple[int, int]:
    """(#image marks, #video marks) in the chat messages: `<image>`/`<video>` in text, or content parts."""
    images = videos = 0
    for message in prompt:
        content = message.get("content") if isinstance(message, dict) else None
        if isinstance(content, str):
            images, videos = images + content.count("<image>"), videos + content.count("<video>")
        elif isinstance(content, list):
            for part in content:
                kind = part.get("type") if isinstance(part, dict) else None
                images, videos = images + (kind == "image"), videos + (kind == "video")
    return images, videos


def has_media(row: dict) -> bool:
    return row.get("images") is not None or row.get("videos") is not None


# --------------------------------------------------------------------------------------------------- checking
def check_row_media(row: dict, where: str, base_dir: str | None, limits: MediaLimits = DEFAULT_LIMITS) -> dict:
    """Check a row's media; return it with relative paths made absolute (against `base_dir`, the data file's
    folder). Raises MediaError naming the row, the item and the file, with the fix."""
    images, videos = row.get("images") or [], row.get("videos") or []
    for field, items in (("images", images), ("videos", videos)):
        if not isinstance(items, list):
            raise MediaError(f"{where}: `{field}` must be a list (one item per <{field[:-1]}> mark), got "
                             f"{type(items).__name__}; write it as [item, ...]")
    if len(images) > limits.max_images_per_row:
        raise MediaError(f"{where}: `images` has {len(images)} items, more than the limit of "
                         f"{limits.max_images_per_row} per row; split the row or raise the limit")
    if len(videos) > limits.max_videos_per_row:
        raise MediaError(f"{where}: `videos` has {len(videos)} items, more than the limit of "
                         f"{limits.max_videos_per_row} per row; split the row or raise the limit")
    marks_image, marks_video = count_placeholders(row.get("prompt") or [])
    for kind, marks, items in (("image", marks_image, images), ("video", marks_video, videos)):
        if marks != len(items):
            raise MediaError(f"{where}: the prompt has {marks} <{kind}> mark(s) but `{kind}s` has {len(items)} "
                             f"item(s); put exactly one <{kind}> (or a {{\"type\": \"{kind}\"}} content part) where "
                             f"each {kind} goes, in the order of `{kind}s`")
    out = dict(row)
    if images:
        out["images"] = [_check_image(item, f"{where}: `images[{i}]`", base_dir, limits)
                         for i, item in enumerate(images)]
    if videos:
        out["videos"] = [_check_video(item, f"{where}: `videos[{i}]`", base_dir, limits)
                         for i, item in enumerate(videos)]
    return out


def _resolve(path: str, base_dir: str | None) -> str:
    return path if os.path.isabs(path) or base_dir is None else os.path.normpath(os.path.join(base_dir, path))


def _image_source(item, what: str, base_dir: str | None):
    """(path or None, bytes or None, the item with its path made absolute)."""
    if isinstance(item, dict):
        if item.get("bytes") is not None:
            return None, item["bytes"], {"bytes": item["bytes"]}
        item = item.get("path") or item.get("image")
    if isinstance(item, (bytes, bytearray)):
        return None, bytes(item), bytes(item)
    if isinstance(item, str) and item:
        path = _resolve(item, base_dir)
        return path, None, path
    raise MediaError(f"{what} must be a file path, raw bytes or {{\"bytes\": ..., \"path\": ...}}, got "
                     f"{type(item).__name__}; give the image's path relative to the data file's folder")


def _read_file(path: str, what: str, limits: MediaLimits, kind: str) -> bytes:
    if not os.path.exists(path):
        raise MediaError(f"{what}: file {path} does not exist; paths are relative to the data file's folder — "
                         "fix the path or add the file")
    size = os.path.getsize(path)
    if size == 0:
        raise MediaError(f"{what}: file {path} is empty (0 bytes); re-export the {kind} or remove the row")
    if size > limits.max_file_bytes:
        raise MediaError(f"{what}: file {path} is {size / 2**20:.1f} MiB, over the {limits.max_file_bytes / 2**20:.0f} "
                         f"MiB limit per item; downscale or re-encode the {kind}")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as err:
        raise MediaError(f"{what}: cannot read {path}: {err.strerror}; check its permissions") from None


def _decode_image(data: bytes, what: str, source: str, limits: MediaLimits):
    """A fully decoded RGB PIL image; the pixel count is checked from the header BEFORE decoding."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_file_bytes:
        raise MediaError(f"{what}: {source} is {len(data) / 2**20:.1f} MiB, over the "
                         f"{limits.max_file_bytes / 2**20:.0f} MiB limit per item; downscale or re-encode it")
    try:
        image = Image.open(io.BytesIO(data))
        width, height = image.size
        if width * height > limits.max_image_pixels:
            raise MediaError(f"{what}: {source} is {width}x{height} ({width * height / 1e6:.1f} MP), over the "
                             f"limit of {limits.max_image_pixels / 1e6:.1f} MP; downscale it (the processor "
                             "resizes to a few hundred tokens anyway)")
        image.load()
        return image.convert("RGB")
    except MediaError:
        raise
    except Image.DecompressionBombError as err:   # PIL refuses to even open an image this large
        raise MediaError(f"{what}: {source} is far over the limit of {limits.max_image_pixels / 1e6:.1f} MP "
                         f"({err}); downscale it") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as err:
        raise MediaError(f"{what}: {source} is not a readable image ({type(err).__name__}: {str(err)[:120]}); "
                         "re-export it as PNG or JPEG, or remove the row") from None


def _check_image(item, what: str, base_dir: str | None, limits: MediaLimits):
    path, data, resolved = _image_source(item, what, base_dir)
    if path is not None:
        data = _read_file(path, what, limits, "image")
    _decode_image(data, what, path or "the image bytes", limits)
    return resolved


def _check_video(item, what: str, base_dir: str | None, limits: MediaLimits):
    if isinstance(item, dict) and "frames" in item:
        frames, fps = item["frames"], item.get("fps")
        if not isinstance(frames, list) or not frames:
            raise MediaError(f"{what}: `frames` must be a non-empty list of images; give the frames' paths")
        if len(frames) > limits.max_video_frames:
            raise MediaError(f"{what}: {len(frames)} frames, over the limit of {limits.max_video_frames}; sample "
                             "fewer frames (e.g. 2 per second)")
        _check_fps(fps, what)
        return {"frames": [_check_image(f, f"{what}.frames[{j}]", base_dir, limits) for j, f in enumerate(frames)],
                "fps": float(fps)}
    if isinstance(item, dict):
        path, fps = item.get("video") or item.get("path"), item.get("fps")
        if fps is not None:
            _check_fps(fps, what)
    else:
        path, fps = item, None
    if not isinstance(path, str) or not path:
        raise MediaError(f"{what} must be a video file path, {{\"video\": path, \"fps\": F}} or "
                         f"{{\"frames\": [...], \"fps\": F}}, got {type(item).__name__}")
    path = _resolve(path, base_dir)
    _read_file(path, what, limits, "video")
    _decode_video(path, what, fps, limits)
    return {"video": path, **({"fps": float(fps)} if fps is not None else {})}


def _check_fps(fps, what: str) -> None:
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not (0 < fps <= 240):
        raise MediaError(f"{what}: `fps` must be a number of frames per second in (0, 240], got {fps!r}; frames "
                         "without an fps have no timestamps")


# ---------------------------------------------------------------------------------------------------- loading
def _decode_video(path: str, what: str, sample_fps: float | None, limits: MediaLimits):
    """(frames (T, H, W, 3) uint8 RGB, the file's fps, the kept frames' indices in the file). With `sample_fps`,
    about that many frames per second are kept (uniformly over the clip)."""
    import cv2

    capture = cv2.VideoCapture(path)
    try:
        if not capture.isOpened():
            raise MediaError(f"{what}: {path} is not a readable video; re-encode it (e.g. H.264 MP4) or give its "
                             "frames as {\"frames\": [...], \"fps\": F}")
        file_fps = capture.get(cv2.CAP_PROP_FPS) or 0.0
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT) or 0)
        if file_fps <= 0 or total <= 0:
            raise MediaError(f"{what}: {path} has no frame rate or no frames; re-encode it or give its frames as "
                             "{\"frames\": [...], \"fps\": F}")
        keep = total if sample_fps is None else max(1, int(round(total / file_fps * sample_fps)))
        indices = np.linspace(0, total - 1, min(keep, total)).round().astype(int).tolist()
        if len(indices) > limits.max_video_frames:
            raise MediaError(f"{what}: {path} would give {len(indices)} frames, over the limit of "
                             f"{limits.max_video_frames}; set a lower \"fps\" in the item ({{\"video\": path, "
                             "\"fps\": 2}}) or cut the clip")
        wanted, frames, i = set(indices), [], 0
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            if i in wanted:
                width, height = frame.shape[1], frame.shape[0]
                if width * height > limits.max_image_pixels:
                    raise MediaError(f"{what}: {path} frames are {width}x{height}, over the limit of "
                                     f"{limits.max_image_pixels / 1e6:.1f} MP; downscale the video")
                frames.append(cv2.cvtColor(frame, cv2.COLOR_BGR2RGB))
            i += 1
        if not frames:
            raise MediaError(f"{what}: no frame of {path} could be decoded; re-encode it")
        return np.stack(frames), float(file_fps), indices[:len(frames)]
    finally:
        capture.release()


def load_image(item):
    """An item of a checked row (absolute path or bytes) → RGB PIL image."""
    path, data, _ = _image_source(item, "image", None)
    if path is not None:
        with open(path, "rb") as f:
            data = f.read()
    return _decode_image(data, "image", path or "the image bytes", MediaLimits(max_file_bytes=2**62,
                                                                               max_image_pixels=2**62))


def load_video(item):
    """An item of a checked row → posttrain.vl.inputs.Video (frames, fps, frame indices)."""
    from posttrain.vl.inputs import Video

    if isinstance(item, dict) and "frames" in item:
        frames = np.stack([np.asarray(load_image(f)) for f in item["frames"]])
        return Video(frames, float(item["fps"]))
    path, fps = (item.get("video") or item.get("path"), item.get("fps")) if isinstance(item, dict) else (item, None)
    frames, file_fps, indices = _decode_video(path, "video", fps, MediaLimits(max_image_pixels=2**62,
                                                                              max_video_frames=2**31))
    # Indices in the file at its own rate: index / fps is each kept frame's time, as the timestamps need.
    return Video(frames, file_fps, indices)


def multimodal_prompt(tokenizer, row: dict):
    """A checked row → posttrain.vl.inputs.MultimodalPrompt for the engine (ids with one pad per item + media)."""
    from posttrain.vl.inputs import MultimodalPrompt, encode_vl_prompt

    return MultimodalPrompt(encode_vl_prompt(tokenizer, row["prompt"]),
                            images=[load_image(i) for i in row.get("images") or []],
                            videos=[load_video(v) for v in row.get("videos") or []])
