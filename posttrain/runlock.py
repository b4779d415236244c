"""One live run per run directory, and what `posttrain status` reports about a run.

RUN_DIR/run.lock is held with flock for the life of `posttrain run` (the kernel drops it when the process
dies, even by SIGKILL, so a stale lock never blocks a resume); RUN_DIR/run.pid says who holds it.
"""
from __future__ import annotations

import fcntl
import json
import os
import socket


class RunLockedError(RuntimeError):
    pass


class RunLock:
    def __init__(self, run_dir: str):
        self.path = os.path.join(run_dir, "run.lock")
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self.fd)
            holder = _read_pid(run_dir)
            raise RunLockedError(f"{run_dir} is in use by a live run (pid {holder.get('pid')} on "
                                 f"{holder.get('host')}); wait for it, stop it, or use another --run-dir") from None
        with open(os.path.join(run_dir, "run.pid"), "w") as f:
            json.dump({"pid": os.getpid(), "host": socket.gethostname()}, f)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        fcntl.flock(self.fd, fcntl.LOCK_UN)
        os.close(self.fd)


def _read_pid(run_dir: str) -> dict:
    try:
        with open(os.path.join(run_dir, "run.pid")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return {}


def is_alive(run_dir: str) -> bool:
    path = os.path.join(run_dir, "run.lock")
    if not os.path.exists(path):
        return False
    fd = os.open(path, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    else:
        fcntl.flock(fd, fcntl.LOCK_UN)
        return False
    finally:
        os.close(fd)


def run_status(run_dir: str) -> dict:
    import yaml

    from posttrain import checkpoint as ckpt
    from posttrain.metrics import read_metrics

    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(cfg_path):
        raise FileNotFoundError(f"{run_dir} holds no run (no config.yaml); pass the --run-dir of a run")
    with open(cfg_path) as f:
        cfg = yaml.safe_load(f) or {}
    metrics_path = os.path.join(run_dir, "metrics.jsonl")
    records = read_metrics(metrics_path) if os.path.exists(metrics_path) else []
    evals = [(r["step"], r["eval/reward/mean"]) for r in records if "eval/reward/mean" in r]
    try:
        latest = ckpt.latest_checkpoint(run_dir)
    except RuntimeError as err:
        latest = f"BROKEN: {err}"
    alive = is_alive(run_dir)
    step = records[-1]["step"] if records else 0
    from posttrain.cli import run_is_finished
    finished = run_is_finished(run_dir) and step >= cfg.get("total_steps", 0)
    holder = _read_pid(run_dir) if alive else {}
    return {"run_dir": run_dir, "name": cfg.get("name"), "algorithm": (cfg.get("algorithm") or {}).get("type") if isinstance(cfg.get("algorithm"), dict)
            else cfg.get("algorithm"),
            "total_steps": cfg.get("total_steps"), "step": step, "latest_checkpoint": latest, "alive": alive,
            "state": "running" if alive else ("finished" if finished else "stopped (resumable)"),
            "pid": holder.get("pid"), "host": holder.get("host"),
            "last_metrics": records[-1] if records else None, "last_eval": evals[-1] if evals else None}
