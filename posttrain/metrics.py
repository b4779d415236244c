"""metrics.jsonl (one JSON object per step, namespaced keys) and the reward-curve plot."""
from __future__ import annotations

import json
import os


class MetricsLog:
    def __init__(self, path: str):
        self.path = path

    def write(self, record: dict) -> None:
        with open(self.path, "a") as f:
            f.write(json.dumps(record, sort_keys=True) + "\n")
            f.flush()

    def truncate_after(self, step: int) -> None:
        """On resume, drop records of steps after the checkpoint (they will be recomputed): no step twice."""
        if not os.path.exists(self.path):
            return
        kept = [line for line in read_metrics(self.path) if line.get("step", 0) <= step]
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            for rec in kept:
                f.write(json.dumps(rec, sort_keys=True) + "\n")
        os.replace(tmp, self.path)


def read_metrics(path: str) -> list[dict]:
    out = []
    with open(path) as f:
        for line in f:
            line = line.strip()
            if line:
                try:
                    out.append(json.loads(line))
                except json.JSONDecodeError:
                    continue  # a line cut by a kill mid-write
    return out


def plot_rewards(metrics_path: str, out_png: str, title: str = "") -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    records = read_metrics(metrics_path)
    train = [(r["step"], r["reward/mean"]) for r in records if "reward/mean" in r]
    evals = [(r["step"], r["eval/reward/mean"]) for r in records if "eval/reward/mean" in r]
    fig, ax = plt.subplots(figsize=(6.4, 3.8), dpi=110)
    if train:
        ax.plot(*zip(*train), label="train reward (rollout mean)", alpha=0.6)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out reward", color="tab:red")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png
