"""Multimodal rows (images / videos beside the prompt): accepted when right, each bad input a clear error naming
the row, the item and the file, with the fix — at load time, which `posttrain validate --check-data` and a run's
start both go through (posttrain.data.load_prompt_rows). PIL / OpenCV only: no torch, no torchvision."""
import json
import os
import struct
import subprocess
import sys
import zlib

import numpy as np
import pytest
from PIL import Image

from posttrain.data import DatasetError, load_prompt_rows
from posttrain.vl.media import MediaLimits, check_row_media, load_image, load_video

pytestmark = pytest.mark.unit
from tests.helpers import REPO  # noqa: E402 — the repository root, wherever this file sits under tests/


def _row(content="<image>What is shown?", **media):
    return {"prompt": [{"role": "user", "content": content}], "data_source": "vl/test",
            "reward_model": {"ground_truth": "x"}, **media}


def _write(tmp_path, rows, name="train.jsonl"):
    path = tmp_path / name
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def _png(path, size=(32, 32), colour=(200, 30, 30)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_relative_image_paths_resolve_against_the_data_file_and_load(tmp_path):
    _png(tmp_path / "media" / "a.png")
    rows = load_prompt_rows([_write(tmp_path, [_row(images=["media/a.png"])])])
    assert rows[0]["images"] == [str(tmp_path / "media" / "a.png")]
    assert load_image(rows[0]["images"][0]).size == (32, 32)


def test_content_parts_count_as_placeholders(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    parts = [{"type": "image"}, {"type": "text", "text": "Which differs from"}, {"type": "image"}]
    rows = load_prompt_rows([_write(tmp_path, [_row(parts, images=["a.png", "b.png"])])])
    assert len(rows[0]["images"]) == 2


def test_missing_image_file_names_row_item_and_file(tmp_path):
    path = _write(tmp_path, [_row(images=["media/nope.png"])])
    with pytest.raises(DatasetError) as err:
        load_prompt_rows([path])
    msg = str(err.value)
    assert "row 1" in msg and "`images[0]`" in msg and "nope.png does not exist" in msg
    assert "relative to the data file's folder" in msg


def test_corrupt_png_is_named(tmp_path):
    _png(tmp_path / "ok.png")
    good = (tmp_path / "ok.png").read_bytes()
    (tmp_path / "bad.png").write_bytes(good[:40] + b"\x00" * 30)     # header intact, pixel data destroyed
    with pytest.raises(DatasetError) as err:
        load_prompt_rows([_write(tmp_path, [_row(images=["ok.png"]), _row(images=["bad.png"])])])
    msg = str(err.value)
    assert "row 2" in msg and "bad.png is not a readable image" in msg and "re-export" in msg


def test_zero_byte_video_is_named(tmp_path):
    (tmp_path / "clip.mp4").write_bytes(b"")
    with pytest.raises(DatasetError) as err:
        load_prompt_rows([_write(tmp_path, [_row("<video>When?", videos=["clip.mp4"])])])
    assert "`videos[0]`" in str(err.value) and "clip.mp4 is empty (0 bytes)" in str(err.value)


def test_too_many_images_in_a_row(tmp_path):
    for i in range(9):
        _png(tmp_path / f"{i}.png")
    row = _row("<image>" * 9 + "Count them.", images=[f"{i}.png" for i in range(9)])
    with pytest.raises(DatasetError, match=r"row 1: `images` has 9 items, more than the limit of 8"):
        load_prompt_rows([_write(tmp_path, [row])])


def _png_claiming_size(path, width, height):
    """A valid 1x1 PNG whose header claims width x height (CRC fixed): opening it reads the claim; decoding
    would try to allocate width*height pixels."""
    _png(path, (1, 1))
    data = bytearray(open(path, "rb").read())
    ihdr = 8 + 8   # signature, then length + "IHDR"
    data[ihdr:ihdr + 8] = struct.pack(">II", width, height)
    data[ihdr + 13:ihdr + 17] = struct.pack(">I", zlib.crc32(bytes(data[12:ihdr + 13])) & 0xFFFFFFFF)
    open(path, "wb").write(bytes(data))


def test_huge_image_refused_from_its_header_before_decoding(tmp_path):
    _png_claiming_size(str(tmp_path / "big.png"), 8_000, 8_000)       # 64 MP: decoding = 192 MB
    _png_claiming_size(str(tmp_path / "huge.png"), 50_000, 50_000)    # 2.5 gigapixels: PIL refuses to open it
    with pytest.raises(DatasetError) as err:
        load_prompt_rows([_write(tmp_path, [_row(images=["big.png"])])])
    assert "row 1: `images[0]`" in str(err.value)
    assert "big.png is 8000x8000 (64.0 MP), over the limit of 16.8 MP; downscale it" in str(err.value)
    with pytest.raises(DatasetError, match=r"huge.png is far over the limit of 16.8 MP .*2500000000 pixels"):
        load_prompt_rows([_write(tmp_path, [_row(images=["huge.png"])])])


def test_file_over_the_byte_limit(tmp_path):
    _png(tmp_path / "a.png", (64, 64))
    with pytest.raises(DatasetError, match=r"a.png is .* MiB, over the 0 MiB limit"):
        check_row_media(_row(images=["a.png"]), "t.jsonl row 1", str(tmp_path), MediaLimits(max_file_bytes=10))


def test_placeholder_count_must_match_media_count(tmp_path):
    _png(tmp_path / "a.png")
    with pytest.raises(DatasetError) as err:
        load_prompt_rows([_write(tmp_path, [_row("Describe <image> and <image>.", images=["a.png"])])])
    assert "row 1: the prompt has 2 <image> mark(s) but `images` has 1 item(s)" in str(err.value)
    with pytest.raises(DatasetError, match=r"0 <video> mark\(s\) but `videos` has 1"):
        check_row_media(_row("No mark here.", videos=[{"frames": ["a.png"], "fps": 2}]), "r", str(tmp_path))


def test_frames_without_fps_are_refused(tmp_path):
    _png(tmp_path / "f0.png")
    with pytest.raises(DatasetError, match=r"`videos\[0\]`: `fps` must be a number .* got None"):
        check_row_media(_row("<video>When?", videos=[{"frames": ["f0.png"]}]), "r", str(tmp_path))


def test_mp4_video_loads_with_its_frame_rate(tmp_path):
    from posttrain.vl.toy import write_video
    frames = [Image.new("RGB", (64, 64), (20 * i, 0, 0)) for i in range(8)]
    write_video(frames, 2.0, str(tmp_path / "clip.mp4"))
    rows = load_prompt_rows([_write(tmp_path, [_row("<video>When?", videos=["clip.mp4"])])])
    video = load_video(rows[0]["videos"][0])
    assert video.frames.shape == (8, 64, 64, 3) and video.fps == 2.0 and video.indices == list(range(8))
    # Sampled at 1 frame per second: 4 frames, indices still in the file's 2-fps frame numbering.
    half = load_video({"video": rows[0]["videos"][0]["video"], "fps": 1.0})
    assert len(half.frames) == 4 and half.fps == 2.0 and half.indices[0] == 0 and half.indices[-1] == 7


def test_validate_check_data_names_the_bad_media(tmp_path):
    """The CLI path: `posttrain validate --check-data` exits 2 with the row and file named."""
    _png(tmp_path / "ok.png")
    data = _write(tmp_path, [_row(images=["ok.png"]), _row(images=["gone.png"])])
    recipe = open(os.path.join(REPO, "recipes", "smoke.yaml")).read()
    (tmp_path / "r.yaml").write_text(recipe)
    proc = subprocess.run([sys.executable, "-m", "posttrain.cli", "validate", str(tmp_path / "r.yaml"),
                           f"data.train_files=[{data}]", f"data.eval_files=[{data}]",
                           f"model.path={os.path.join(REPO, 'posttrain', 'toy', 'assets', 'toy-base')}",
                           "--check-data"],
                          capture_output=True, text=True, cwd=REPO, env=dict(os.environ, PYTHONPATH=REPO))
    assert proc.returncode == 2, proc.stderr
    assert "row 2: `images[0]`" in proc.stderr and "gone.png does not exist" in proc.stderr
