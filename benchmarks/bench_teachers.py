"""Teacher-side costs of MOPD on this machine: scoring throughput per engine, weight-swap time, payload size,
engine memory, and (from a finished MOPD run) the share of step time spent on teachers.

    .venv/bin/python benchmarks/bench_teachers.py --student posttrain/toy/assets/toy-base-13 [--teachers 13] [--engines 1 2]
                                                  [--metrics runs/mopd-quickstart/metrics.jsonl]

Teachers: `--teacher-dirs` (real teacher folders) or, by default, N copies of the student with independently
perturbed weights (so every swap moves real, different weights; the pool does not care how they were trained).
The batch holds `--per-teacher` sequences per teacher: each domain's held-out prompts with their reference
answers as responses (prompt ids + response ids, as in a MOPD step).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import tempfile
import time


def make_teachers(student: str, n: int, root: str) -> list[str]:
    import torch
    from safetensors.torch import load_file, save_file

    weights = load_file(os.path.join(student, "model.safetensors"))
    paths = []
    for i in range(n):
        path = os.path.join(root, f"teacher{i:02d}")
        shutil.copytree(student, path)
        g = torch.Generator().manual_seed(i)
        save_file({k: v + 0.01 * torch.randn(v.shape, generator=g) for k, v in weights.items()},
                  os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
        paths.append(path)
    return paths


def batch(student: str, n_teachers: int, per_teacher: int):
    from transformers import AutoTokenizer

    from posttrain.data import encode_prompt
    from posttrain.toy.tasks import DOMAINS, make_rows

    tok = AutoTokenizer.from_pretrained(student)
    domains = sorted(DOMAINS)
    prompts, responses, teacher_index = [], [], []
    for t in range(n_teachers):
        for row in make_rows([domains[t % len(domains)]], per_teacher, t, "eval"):
            prompts.append(encode_prompt(tok, row["prompt"]))
            responses.append(tok(row["extra_info"]["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id])
            teacher_index.append(t)
    return prompts, responses, teacher_index


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--student", default="runs/toy/base")
    ap.add_argument("--teacher-dirs", nargs="*", default=None)
    ap.add_argument("--teachers", type=int, default=13)
    ap.add_argument("--engines", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--per-teacher", type=int, default=32)
    ap.add_argument("--top-k", type=int, default=16)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--metrics", default=None, help="metrics.jsonl of a MOPD run (for the teacher share of step time)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    import psutil
    import ray

    from posttrain.config import parse_recipe
    from teachers.pool import TeacherPool

    root = tempfile.mkdtemp(prefix="bench-teachers-")
    teacher_dirs = args.teacher_dirs or make_teachers(args.student, args.teachers, root)
    prompts, responses, teacher_index = batch(args.student, len(teacher_dirs), args.per_teacher)
    tokens = sum(len(r) for r in responses)
    ray.init(num_cpus=max(args.engines) + 1, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}})
    results = {"teachers": len(teacher_dirs), "sequences": len(prompts), "response_tokens": tokens,
               "top_k": args.top_k, "runs": []}
    try:
        for engines in args.engines:
            recipe = parse_recipe({
                "name": "bench", "algorithm": "mopd", "total_steps": 1, "model": {"path": args.student},
                "data": {"train_files": ["x.jsonl"]}, "rewards": {"functions": [{"name": "math"}]},
                "rollout": {"prompts_per_step": 4, "n": 2}, "gspo": {"mini_batches": 1},
                "mopd": {"top_k": args.top_k, "resident_engines": engines,
                         "teachers": [{"name": f"t{i}", "path": p, "labels": [f"d{i}"]}
                                      for i, p in enumerate(teacher_dirs)]}})
            t0 = time.perf_counter()
            pool = TeacherPool(recipe)
            start_s = time.perf_counter() - t0
            pool.score(prompts[:4], responses[:4], teacher_index[:4])      # warm-up
            walls, swaps, swap_s, per_engine_tps, payload = [], [], [], [], []
            for _ in range(args.repeats):
                _, m = pool.score(prompts, responses, teacher_index)
                walls.append(m["teachers/wall_s"])
                swaps.append(m["teachers/swaps"])
                swap_s.append(m["teachers/swap_s"] / max(m["teachers/swaps"], 1))
                per_engine_tps.append(m["teachers/tokens_per_s_per_engine"])
                payload.append(m["teachers/payload_bytes_per_token"])
            pids = ray.get([e.__ray_call__.remote(lambda self: os.getpid()) for e in pool.engines])
            rss = [psutil.Process(p).memory_info().rss / 2**30 for p in pids]
            run = {"engines": engines, "engine_start_s": start_s, "batch_wall_s": statistics.median(walls),
                   "batch_tokens_per_s": tokens / statistics.median(walls),
                   "scoring_tokens_per_s_per_engine": statistics.median(per_engine_tps),
                   "swaps_per_batch": statistics.median(swaps), "swap_s_mean": statistics.median(swap_s),
                   "payload_bytes_per_token": payload[0], "engine_rss_gib": rss,
                   "weights_in_object_store_s": pool.weights_put_s}
            print(json.dumps(run))
            results["runs"].append(run)
            pool.shutdown()
            del pool
    finally:
        ray.shutdown()
        shutil.rmtree(root, ignore_errors=True)
    if args.metrics:
        recs = [json.loads(line) for line in open(args.metrics) if line.strip()]
        steps = [r for r in recs if "time/teacher_share" in r]
        results["run_teacher_share_of_step"] = statistics.mean(r["time/teacher_share"] for r in steps)
        results["run_step_s"] = statistics.mean(r["time/step_s"] for r in steps)
        results["run_teacher_s"] = statistics.mean(r["time/teacher_s"] for r in steps)
        for key in ("time/rollout_s", "time/reward_s", "time/update_s", "time/sync_s"):
            results["run_" + key.split("/")[1]] = statistics.mean(r[key] for r in steps)
        print(json.dumps({k: v for k, v in results.items() if k.startswith("run_")}))
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
