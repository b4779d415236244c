"""Checkpoints in RUN_DIR/checkpoints: written into a temporary folder, renamed into place, and only then
pointed at by `latest` (itself replaced atomically). A kill at any instant leaves the previous checkpoint
intact, and a partial folder is never taken for a complete one (it has no COMPLETE marker and no pointer).

    checkpoints/
      step_000010/   model/ (HF), optimizer.pt, rng_rank*.pt, driver_state.json, COMPLETE
      latest         "step_000010"
"""
from __future__ import annotations

import json
import os
import shutil

LATEST = "latest"
COMPLETE = "COMPLETE"


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def atomic_write_text(path: str, text: str) -> None:
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(os.path.dirname(os.path.abspath(path)))


def replace_dir(tmp_dir: str, final_dir: str) -> None:
    """Put a fully written folder in place of `final_dir`: marked COMPLETE, then renamed. A kill before the rename
    leaves the old folder (or none); one between removing an old folder and the rename leaves none — never a
    half-written one. Readers check `is_complete_dir`."""
    atomic_write_text(os.path.join(tmp_dir, COMPLETE), "ok\n")
    if os.path.exists(final_dir):
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
    _fsync_dir(os.path.dirname(os.path.abspath(final_dir)))


def is_complete_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, COMPLETE))


def step_dir_name(step: int) -> str:
    return f"step_{step:06d}"


def begin(run_dir: str, step: int) -> str:
    """A fresh temporary folder for the checkpoint of `step` (stale temporaries of a killed save are removed)."""
    root = os.path.join(run_dir, "checkpoints")
    os.makedirs(root, exist_ok=True)
    tmp = os.path.join(root, f".tmp_{step_dir_name(step)}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    return tmp


def commit(run_dir: str, tmp_dir: str, step: int, driver_state: dict, keep_last: int) -> str:
    with open(os.path.join(tmp_dir, "driver_state.json"), "w") as f:
        json.dump(driver_state, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    atomic_write_text(os.path.join(tmp_dir, COMPLETE), "ok\n")
    root = os.path.dirname(tmp_dir)
    final = os.path.join(root, step_dir_name(step))
    if os.path.exists(final):
        shutil.rmtree(final)
    os.replace(tmp_dir, final)
    _fsync_dir(root)
    atomic_write_text(os.path.join(root, LATEST), step_dir_name(step) + "\n")  # the pointer goes last
    _prune(root, keep_last)
    return final


def _prune(root: str, keep_last: int) -> None:
    complete = sorted(d for d in os.listdir(root) if d.startswith("step_"))
    latest = read_pointer(root)
    for d in complete[:-keep_last]:
        if d != latest:
            shutil.rmtree(os.path.join(root, d), ignore_errors=True)


def read_pointer(root: str) -> str | None:
    try:
        with open(os.path.join(root, LATEST)) as f:
            return f.read().strip() or None
    except FileNotFoundError:
        return None


def latest_checkpoint(run_dir: str) -> str | None:
    """The folder of the latest complete checkpoint, or None. A pointer to an incomplete folder is an error."""
    root = os.path.join(run_dir, "checkpoints")
    name = read_pointer(root)
    if name is None:
        return None
    path = os.path.join(root, name)
    if not os.path.isfile(os.path.join(path, COMPLETE)):
        raise RuntimeError(f"{root}/latest points at {name}, which is not a complete checkpoint; "
                           "remove the pointer to fall back to an older checkpoint")
    return path


def load_driver_state(ckpt_dir: str) -> dict:
    with open(os.path.join(ckpt_dir, "driver_state.json")) as f:
        return json.load(f)
