"""Benchmark of the GSPO step on this machine, for the quickstart model.

    .venv/bin/python benchmarks/bench_gspo.py [--steps 10] [--out benchmarks/GSPO.md-fragment.json]

Runs the quickstart recipe for a few steps through the real stack (Ray, vLLM, torch trainer) and reports:
rollout tokens/s, trainer tokens/s, the step-time split (rollout / rewards / update / weight sync), weight-sync
time, and peak resident memory of the driver plus every Ray actor/worker process (sampled every 0.2 s).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import threading
import time

import numpy as np
import psutil

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class PeakRSS(threading.Thread):
    """Peak of the summed RSS of this process and all its descendants (Ray's raylet spawns the actors)."""

    def __init__(self):
        super().__init__(daemon=True)
        self.peak_total = 0
        self.peak_single: dict[str, int] = {}
        self.stop = threading.Event()

    def run(self):
        me = psutil.Process()
        while not self.stop.is_set():
            total = 0
            for p in [me, *me.children(recursive=True)]:
                try:
                    rss = p.memory_info().rss
                    name = " ".join(p.cmdline()[:3])[-60:]
                except (psutil.NoSuchProcess, psutil.AccessDenied):
                    continue
                total += rss
                self.peak_single[name] = max(self.peak_single.get(name, 0), rss)
            self.peak_total = max(self.peak_total, total)
            time.sleep(0.2)


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    sys.path.insert(0, REPO)
    os.chdir(REPO)
    from posttrain.config import load_recipe
    from posttrain.loops.run import run
    from posttrain.metrics import read_metrics

    recipe = load_recipe("recipes/quickstart.yaml", [f"total_steps={args.steps}", "data.eval_every=0",
                                                     "data.eval_files=[]", f"checkpoint.every={args.steps}"])
    monitor = PeakRSS()
    monitor.start()
    with tempfile.TemporaryDirectory() as run_dir:
        t0 = time.time()
        summary = run(recipe, run_dir, progress=False)
        wall = time.time() - t0
        records = [r for r in read_metrics(os.path.join(run_dir, "metrics.jsonl")) if r["step"] >= 2]
    monitor.stop.set()
    import ray
    ray.shutdown()

    def mean(key):
        return float(np.mean([r[key] for r in records]))

    result = {
        "steps_measured": len(records), "samples_per_step": recipe.rollout.prompts_per_step * recipe.rollout.n,
        "rollout_tokens_per_s": mean("throughput/rollout_tokens_per_s"),
        "trainer_tokens_per_s": mean("throughput/trainer_tokens_per_s"),
        "end_to_end_tokens_per_s": mean("throughput/tokens_per_s"),
        "step_s": mean("time/step_s"),
        "split_s": {k: mean(f"time/{k}_s") for k in ("rollout", "reward", "update", "sync")},
        "weight_load_into_engine_s": mean("time/engine_load_s"),
        "peak_rss_total_gib": monitor.peak_total / 2**30,
        "peak_rss_top_processes_mib": dict(sorted(((k, v / 2**20) for k, v in monitor.peak_single.items()),
                                                  key=lambda kv: -kv[1])[:5]),
        "startup_s": summary["startup_s"], "startup_breakdown": summary.get("startup_breakdown"),
        "wall_s": wall,
    }
    print(json.dumps(result, indent=1))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
