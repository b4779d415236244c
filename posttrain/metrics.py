"""metrics.jsonl (one JSON object per step, namespaced keys) and the reward-curve plot."""
from __future__ import annotations

import json
import os
import statistics


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
    rkl = [(r["step"], r["mopd/reverse_kl"]) for r in records if "mopd/reverse_kl" in r]
    # A distillation run gets a second panel: the reverse KL to the teachers is the number that should fall.
    fig, axes = plt.subplots(1, 2 if rkl else 1, figsize=(11, 3.8) if rkl else (6.4, 3.8), dpi=110, squeeze=False)
    ax = axes[0][0]
    if train:
        ax.plot(*zip(*train), label="train reward (rollout mean)", alpha=0.6)
    if evals:
        ax.plot(*zip(*evals), "o-", label="held-out reward", color="tab:red")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    if rkl:
        kl_ax = axes[0][1]
        steps, values = zip(*rkl)
        kl_ax.plot(steps, values, alpha=0.4, color="tab:purple", label="per step")
        width = max(1, len(values) // 10)   # a trailing running mean: the trend shows through the per-batch noise
        smooth = [statistics.fmean(values[max(0, i - width + 1):i + 1]) for i in range(len(values))]
        kl_ax.plot(steps, smooth, color="tab:purple", label=f"mean of last {width}")
        kl_ax.set_xlabel("step")
        kl_ax.set_ylabel("reverse KL to the routed teacher (nats/token)")
        kl_ax.set_title("mopd/reverse_kl")
        kl_ax.grid(alpha=0.3)
        kl_ax.legend(loc="upper right")
    fig.tight_layout()
    fig.savefig(out_png)
    plt.close(fig)
    return out_png


class StepTimer:
    """Named wall-clock spans of one step, without hand-kept t0…t5:

        timer.start_step()
        with timer.span("rollout"): ...
        with timer.span("update"): ...
        timer.metrics()  →  {"time/step_s", "time/rollout_s", "time/update_s", "time/rollout_share", ...}

    A span entered twice in a step adds up; spans do not nest (each phase is timed by whoever runs it: the loop,
    or an algorithm part for its own phases, such as MOPD's teacher scoring)."""

    def __init__(self) -> None:
        import time
        self._clock = time.perf_counter
        self._start = self._clock()
        self.spans: dict[str, float] = {}

    def start_step(self) -> None:
        self._start = self._clock()
        self.spans = {}

    def span(self, name: str):
        import contextlib

        @contextlib.contextmanager
        def timed():
            began = self._clock()
            try:
                yield
            finally:
                self.spans[name] = self.spans.get(name, 0.0) + self._clock() - began
        return timed()

    def elapsed(self) -> float:
        return self._clock() - self._start

    def metrics(self) -> dict[str, float]:
        step_s = self.elapsed()
        out = {"time/step_s": step_s}
        for name, seconds in self.spans.items():
            out[f"time/{name}_s"] = seconds
            out[f"time/{name}_share"] = seconds / step_s if step_s > 0 else 0.0
        return out
