"""Judge reward throughput and cache hit rate for a run's worth of completions against a real `vllm serve`.

    .venv/bin/python benchmarks/bench_judge.py                      # builds a tiny random Qwen3 judge, serves it
    .venv/bin/python benchmarks/bench_judge.py --model-path DIR     # any model folder vLLM can load
    .venv/bin/python benchmarks/bench_judge.py --base-url http://127.0.0.1:8000/v1   # a server you run

What it measures, for 256 completions of which 25% repeat an earlier one (a GRPO-style batch where
several samples of a prompt come out identical):
- cold pass: a fresh on-disk cache; completions/s, HTTP requests/s, and the cache hit rate (cache + in-flight
  hits over all requests needed: the duplicates are answered once);
- warm pass: the same batch again (as a second `posttrain score` call or a re-scored eval set would be);
- the same cold pass at max_concurrency 1 (one request at a time), to show what concurrency buys.
Results print as a markdown table; benchmarks/JUDGE.md records them.
"""
from __future__ import annotations

import argparse
import os
import platform
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from rewards import judge  # noqa: E402
from rewards.judge_server import VllmServer  # noqa: E402

WORDS = ("a person walks to the left of the frame while the camera pans slowly and a dog follows them into the "
         "park where children play near the fountain then the scene cuts to a kitchen someone chops onions on "
         "a wooden board the light is warm and the video ends with a close up of a smiling face").split()


def build_tiny_judge(path: str) -> None:
    """posttrain.toy.build.build_random_chat_model (as tests/rewards/test_judge_vllm.py) on caption-like text."""
    from posttrain.toy.build import build_random_chat_model

    rng = random.Random(0)
    build_random_chat_model(path, [" ".join(rng.choice(WORDS) for _ in range(30)) + f" Rating: [[{rng.randint(1, 10)}]]"
                                   for _ in range(3000)])


def make_batch(n: int, duplicate_fraction: float, seed: int = 0) -> list[str]:
    """n completions (~60–120 words each), of which duplicate_fraction repeat one of the others."""
    rng = random.Random(seed)
    n_unique = n - int(n * duplicate_fraction)
    unique = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(60, 120))) + f" (#{i})" for i in range(n_unique)]
    batch = unique + [rng.choice(unique) for _ in range(n - n_unique)]
    rng.shuffle(batch)
    return batch


def run_pass(completions: list[str], kwargs: dict) -> dict:
    judge.close_judge_runtime()  # fresh counters; the on-disk cache is what carries over between passes
    started = time.perf_counter()
    outs = judge.compute_score_batch(["video_caption"] * len(completions), completions,
                                     ["a person and a dog walk in a park"] * len(completions),
                                     [{"question": "Describe the video."}] * len(completions), **kwargs)
    seconds = time.perf_counter() - started
    stats = judge.judge_stats()
    return {"seconds": seconds, "completions_per_s": len(completions) / seconds,
            "requests": stats["requests"], "requests_per_s": stats["requests"] / seconds,
            "cache_hit_rate": stats["cache_hit_rate"], "failures": stats["failures"],
            "scored": sum(1 for o in outs if "failure" not in o), "n": len(outs)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model-path", help="judge model folder (default: build a tiny random Qwen3)")
    parser.add_argument("--base-url", help="use this running server instead of starting one")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--duplicates", type=float, default=0.25)
    parser.add_argument("--max-tokens", type=int, default=16, help="verdict length cap")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--constrained", action="store_true",
                        help="force the [[N]] format with vLLM structured outputs (a random model then always "
                             "gives a parseable rating)")
    args = parser.parse_args()

    workdir = tempfile.mkdtemp(prefix="bench-judge-")
    server = None
    if args.base_url:
        base_url, model = args.base_url, None
    else:
        model_path = args.model_path
        if model_path is None:
            model_path = os.path.join(workdir, "tiny-judge")
            build_tiny_judge(model_path)
        server = VllmServer(model_path, extra_args=["--max-model-len", "4096"])
        started = time.perf_counter()
        server.start()
        print(f"vllm serve ready in {time.perf_counter() - started:.1f}s at {server.base_url}", file=sys.stderr)
        base_url, model = server.base_url, server.model_name
    try:
        completions = make_batch(args.n, args.duplicates)
        common = dict(base_url=base_url, model=model, max_tokens=args.max_tokens, timeout_s=120)
        if args.constrained:
            common["extra_body"] = {"structured_outputs": {"regex": r"\[\[(10|[1-9])\]\]"}}
        # Warm the server (its first requests are slower) with completions not in the batch, no cache.
        judge.compute_score_batch(["w"] * 8, [f"warm-up {i}" for i in range(8)], ["r"] * 8, None, cache=False,
                                  **common)
        cache_dir = os.path.join(workdir, "cache")
        cold = run_pass(completions, {**common, "cache_dir": cache_dir, "max_concurrency": args.concurrency})
        warm = run_pass(completions, {**common, "cache_dir": cache_dir, "max_concurrency": args.concurrency})
        serial = run_pass(completions, {**common, "cache_dir": os.path.join(workdir, "cache-serial"),
                                        "max_concurrency": 1})
    finally:
        if server is not None:
            server.shutdown()
        judge.close_judge_runtime()

    print(f"\n{args.n} completions, {args.duplicates:.0%} duplicates, verdict max_tokens={args.max_tokens}, "
          f"{'constrained [[N]]' if args.constrained else 'free-form'} verdicts; "
          f"{platform.machine()}, {os.cpu_count()} CPUs\n")
    print("| pass | max_concurrency | wall s | completions/s | HTTP requests | requests/s | cache hit rate | "
          "parsed / fallback |")
    print("|---|---|---|---|---|---|---|---|")
    for name, result, conc in (("cold cache", cold, args.concurrency), ("warm cache (same batch again)", warm,
                                                                        args.concurrency),
                               ("cold cache, one at a time", serial, 1)):
        fallback = ", ".join(f"{k} {v}" for k, v in result["failures"].items()) or "none"
        print(f"| {name} | {conc} | {result['seconds']:.2f} | {result['completions_per_s']:.1f} | "
              f"{result['requests']} | {result['requests_per_s']:.1f} | {result['cache_hit_rate']:.1%} | "
              f"{result['scored']} / {fallback} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
