"""Checkpoint atomicity: a kill or a full disk during a save never damages the previous checkpoint, a partial
checkpoint is never taken for a complete one, and the pointer is written last."""
import errno
import json
import os

import pytest

from posttrain import checkpoint as ckpt

pytestmark = pytest.mark.unit


def _save(run_dir, step, keep_last=2, payload="w"):
    tmp = ckpt.begin(run_dir, step)
    with open(os.path.join(tmp, "weights.bin"), "w") as f:
        f.write(payload)
    return ckpt.commit(run_dir, tmp, step, {"step": step}, keep_last)


def test_latest_pointer_and_pruning(tmp_path):
    run = str(tmp_path)
    assert ckpt.latest_checkpoint(run) is None
    for step in (1, 2, 3):
        _save(run, step)
    latest = ckpt.latest_checkpoint(run)
    assert latest.endswith("step_000003")
    assert ckpt.load_driver_state(latest) == {"step": 3}
    assert sorted(d for d in os.listdir(tmp_path / "checkpoints") if d.startswith("step_")) == \
        ["step_000002", "step_000003"]


def test_kill_between_begin_and_commit_leaves_previous_checkpoint(tmp_path):
    run = str(tmp_path)
    _save(run, 1, payload="good")
    tmp = ckpt.begin(run, 2)                      # the process "dies" here, mid-write
    with open(os.path.join(tmp, "weights.bin"), "w") as f:
        f.write("partial")
    latest = ckpt.latest_checkpoint(run)
    assert latest.endswith("step_000001")
    assert open(os.path.join(latest, "weights.bin")).read() == "good"
    # The next save of that step starts from a clean temporary folder.
    _save(run, 2, payload="new")
    assert open(os.path.join(ckpt.latest_checkpoint(run), "weights.bin")).read() == "new"
    assert not any(d.startswith(".tmp_") for d in os.listdir(tmp_path / "checkpoints"))


def test_full_disk_during_commit_keeps_previous(tmp_path, monkeypatch):
    run = str(tmp_path)
    _save(run, 1, payload="good")

    def no_space(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(json, "dump", no_space)
    with pytest.raises(OSError):
        _save(run, 2)
    monkeypatch.undo()
    latest = ckpt.latest_checkpoint(run)
    assert latest.endswith("step_000001") and open(os.path.join(latest, "weights.bin")).read() == "good"


def test_kill_after_rename_before_pointer_uses_previous(tmp_path):
    run = str(tmp_path)
    _save(run, 1)
    # A complete step_2 folder exists but the pointer was not updated yet: the pointer is the truth.
    tmp = ckpt.begin(run, 2)
    os.replace(tmp, os.path.join(run, "checkpoints", "step_000002"))
    assert ckpt.latest_checkpoint(run).endswith("step_000001")


def test_pointer_to_incomplete_checkpoint_is_a_clear_error(tmp_path):
    run = str(tmp_path)
    _save(run, 1)
    os.remove(os.path.join(run, "checkpoints", "step_000001", ckpt.COMPLETE))
    with pytest.raises(RuntimeError, match="not a complete checkpoint"):
        ckpt.latest_checkpoint(run)
