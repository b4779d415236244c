"""What a short run spends before its first step, phase by phase, on this machine.

    .venv/bin/python benchmarks/bench_startup.py [--phases imports,data,ray,engine,trainer,actors,smoke,run] [--out FILE]

Each phase runs in a fresh Python process, one after the other (the machine is shared: the load average is
recorded next to every phase):
  imports  `import posttrain.loops.run` (what `posttrain run` imports before anything starts), with
           `python -X importtime`: the total and the top-level packages that cost the most;
  data     what `_attempt` in posttrain/loops/run.py does before Ray: recipe load, `load_run_data` (tokenizer, rows,
           prompt token ids), `check_rewards_load`;
  ray      `posttrain.orchestration.start_ray` on recipes/smoke.yaml (the embedded cluster), a bare `ray.init`, and
           one with a `runtime_env` of env_vars (three fresh clusters): init, the first trivial actor's round trip,
           and `ray.shutdown`;
  engine   `RolloutEngine` on the toy base in-process (VLLM_ENABLE_V1_MULTIPROCESSING=0, no Ray): `import vllm`,
           `LLM(...)` construction, the first (warm-up) generate and a second one;
  trainer  what a trainer rank does in `setup`, without Ray: imports, gloo process group of one, tokenizer,
           model load, AdamW;
  actors   the smoke recipe's trainer group then its rollout group, one after the other (as `posttrain run` did
           until both were launched at once), against both started at once (their `.remote()` calls first, then one wait) — two fresh clusters;
  smoke    `posttrain run recipes/smoke.yaml` end to end: process wall, the run's own `summary.json` start-up
           breakdown (ray_init / actors_launch / data / actors / first_eval_or_restore), the first step, and the same run without its
           step-0 evaluation (`data.eval_files=[]`);
  run      the smoke run as shipped only (the before/after of a start-up change).
Writes benchmarks/startup_cpu.json unless --out is given, and prints a summary.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import textwrap
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PY = sys.executable
SMOKE = "recipes/smoke.yaml"
TOY = "posttrain/toy/assets/toy-base"
ENV = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
       "TOKENIZERS_PARALLELISM": "false"}


def run_snippet(code: str, *, extra_args: tuple = ()) -> tuple[dict, str]:
    """Runs `code` in a fresh interpreter in the repo; the snippet prints one JSON line prefixed 'RESULT '."""
    proc = subprocess.run([PY, *extra_args, "-c", textwrap.dedent(code)], cwd=REPO, env=ENV, capture_output=True,
                          text=True, timeout=900)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"snippet failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(lines[-1][len("RESULT "):]), proc.stderr


def phase_imports() -> dict:
    result, stderr = run_snippet("""
        import json, time
        t0 = time.perf_counter()
        import posttrain.loops.run
        print("RESULT " + json.dumps({"import_posttrain_loops_run_s": time.perf_counter() - t0}))
    """, extra_args=("-X", "importtime"))
    # importtime lines: "import time: self [us] | cumulative | imported package" (nested ones indented); the self
    # times summed by root package say which dependency costs what
    by_package: dict[str, float] = {}
    for line in stderr.splitlines():
        m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \| (.*)$", line)
        if m:
            root = m.group(3).strip().split(".")[0]
            by_package[root] = by_package.get(root, 0.0) + int(m.group(1)) / 1e6
    top = sorted(by_package.items(), key=lambda item: -item[1])
    cli, _ = run_snippet("""
        import json, time
        t0 = time.perf_counter()
        import posttrain.cli
        print("RESULT " + json.dumps({"import_posttrain_cli_s": time.perf_counter() - t0}))
    """)
    return {**result, **cli, "self_time_by_package_s": {k: round(v, 3) for k, v in top[:12]}}


def phase_data() -> dict:
    result, _ = run_snippet("""
        import json, time
        import posttrain.loops.run as loop
        from posttrain.config import load_recipe
        from posttrain.rewards_runner import check_rewards_load, reward_fns_from_recipe
        t0 = time.perf_counter()
        recipe = load_recipe("recipes/smoke.yaml")
        t_recipe = time.perf_counter() - t0
        t0 = time.perf_counter()
        data = loop.load_run_data(recipe)
        t_data = time.perf_counter() - t0
        t0 = time.perf_counter()
        check_rewards_load(reward_fns_from_recipe(recipe.rewards))
        print("RESULT " + json.dumps({"load_recipe_s": t_recipe, "load_run_data_s": t_data,
                                      "train_rows": len(data.train_rows),
                                      "check_rewards_load_s": time.perf_counter() - t0}))
    """)
    return result


def phase_ray() -> dict:
    code = """
        import json, time
        t0 = time.perf_counter()
        import ray
        from posttrain.config import load_recipe
        from posttrain.orchestration import start_ray
        t_import = time.perf_counter() - t0
        recipe = load_recipe("recipes/smoke.yaml")
        t0 = time.perf_counter()
        if "{variant}" == "start_ray":
            start_ray(recipe)
        else:
            ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False,
                     **({{"runtime_env": {{"env_vars": {{"TOKENIZERS_PARALLELISM": "false"}}}}}}
                        if "{variant}" == "runtime_env" else {{}}))
        t_init = time.perf_counter() - t0

        @ray.remote(num_cpus=0)
        class Ping:
            def ping(self):
                return 1

        t0 = time.perf_counter()
        ray.get(Ping.remote().ping.remote())
        t_actor = time.perf_counter() - t0
        t0 = time.perf_counter()
        ray.shutdown()
        print("RESULT " + json.dumps({{"import_ray_s": t_import, "init_s": t_init, "first_actor_s": t_actor,
                                      "shutdown_s": time.perf_counter() - t0}}))
    """
    return {"start_ray (posttrain.orchestration, as the run calls it)": run_snippet(code.format(variant="start_ray"))[0],
            "ray.init bare (no runtime_env)": run_snippet(code.format(variant="bare"))[0],
            "ray.init with runtime_env env_vars": run_snippet(code.format(variant="runtime_env"))[0]}


def phase_engine() -> dict:
    result, _ = run_snippet(f"""
        import json, time
        t0 = time.perf_counter()
        import vllm
        t_import = time.perf_counter() - t0
        from posttrain.rollout.engine import RolloutEngine
        t0 = time.perf_counter()
        engine = RolloutEngine("{TOY}")
        t_build = time.perf_counter() - t0
        prompts = [[1, 2, 3, 4, 5]] * 8
        t0 = time.perf_counter()
        engine.generate(prompts, seeds=list(range(8)), n=4, temperature=1.0, top_p=1.0, max_tokens=12)
        t_first = time.perf_counter() - t0
        t0 = time.perf_counter()
        engine.generate(prompts, seeds=list(range(8)), n=4, temperature=1.0, top_p=1.0, max_tokens=12)
        print("RESULT " + json.dumps({{"import_vllm_s": t_import, "engine_construct_s": t_build,
                                      "first_generate_s": t_first, "second_generate_s": time.perf_counter() - t0}}))
    """)
    return result


def phase_trainer() -> dict:
    result, _ = run_snippet(f"""
        import json, os, time
        t0 = time.perf_counter()
        import torch, torch.distributed as dist
        import posttrain.trainer.worker
        from transformers import AutoModelForCausalLM, AutoTokenizer
        t_import = time.perf_counter() - t0
        torch.set_num_threads(1)
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(posttrain.trainer.worker.free_port()))
        t0 = time.perf_counter()
        dist.init_process_group("gloo", rank=0, world_size=1)
        t_pg = time.perf_counter() - t0
        t0 = time.perf_counter()
        tok = AutoTokenizer.from_pretrained("{TOY}")
        model = AutoModelForCausalLM.from_pretrained("{TOY}", dtype=torch.float32)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        t_load = time.perf_counter() - t0
        dist.destroy_process_group()
        print("RESULT " + json.dumps({{"imports_s": t_import, "process_group_s": t_pg,
                                      "tokenizer_model_optimizer_s": t_load}}))
    """)
    return result


def phase_actors() -> dict:
    code = """
        import json, time
        import ray
        from posttrain.config import load_recipe
        from posttrain.loops.algorithms import make_algorithm
        from posttrain.orchestration import RolloutGroup, TrainerGroup, start_ray
        recipe = load_recipe("recipes/smoke.yaml")
        start_ray(recipe)
        objective = make_algorithm(recipe).objective()
        t0 = time.perf_counter()
        if {parallel}:
            # both groups' actors created first, then one wait: what a parallel start in loops/run.py would do
            from posttrain.rollout.engine import RolloutWorker
            from posttrain.trainer.worker import TrainerWorker, trainer_settings
            t, r = recipe.trainer, recipe.rollout
            trainer = TrainerWorker.options(num_cpus=t.cpus_per_worker).remote(0, 1, trainer_settings(recipe, objective))
            engine = RolloutWorker.options(num_cpus=r.cpus_per_worker).remote(
                recipe.model.path, dtype=recipe.model.dtype, seed=recipe.seed, kv_cache_gib=r.kv_cache_gib,
                gpu_memory_utilization=r.gpu_memory_utilization, engine_kwargs=r.engine_kwargs)
            addr, port = ray.get(trainer.node_address.remote())
            ray.get([trainer.setup.remote(addr, port), engine.ping.remote()])
            split = {{}}
        else:
            TrainerGroup(recipe, objective)
            t_trainer = time.perf_counter() - t0
            RolloutGroup(recipe)
            split = {{"trainer_group_s": t_trainer, "rollout_group_s": time.perf_counter() - t0 - t_trainer}}
        elapsed = time.perf_counter() - t0
        ray.shutdown()
        print("RESULT " + json.dumps({{"actors_s": elapsed, **split}}))
    """
    sequential, _ = run_snippet(code.format(parallel=False))
    parallel, _ = run_snippet(code.format(parallel=True))
    return {"sequential (as posttrain run)": sequential, "parallel (both created, then one wait)": parallel}


def smoke_run(overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [PY, "-m", "posttrain.cli", "run", SMOKE, *overrides, "--run-dir", run_dir, "--no-progress"]
        t0 = time.time()
        proc = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=900)
        wall = time.time() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"smoke run failed:\n{proc.stderr[-3000:]}")
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
    steps = [r for r in records if r["step"] >= 1]
    return {"command": " ".join(cmd[1:]).replace(run_dir, "RUN_DIR"), "process_wall_s": wall,
            "run_wall_s": summary["wall_s"], "startup_s": summary["startup_s"],
            "startup_breakdown_s": summary["startup_breakdown"],
            # before run(): interpreter, imports, recipe and data checks, run lock; after: Ray shutdown, exit
            "outside_run_s": wall - summary["wall_s"],
            "first_step_s": steps[0]["time/step_s"] if steps else None,
            "later_steps_s": [r["time/step_s"] for r in steps[1:]]}


def phase_smoke() -> dict:
    return {"smoke (as shipped)": smoke_run([]), "smoke without step-0 evaluation": smoke_run(["data.eval_files=[]"])}


def phase_run() -> dict:
    """The smoke run as shipped, alone: the before/after of a start-up change (~2 min)."""
    return {"smoke (as shipped)": smoke_run([])}


PHASES = {"imports": phase_imports, "data": phase_data, "ray": phase_ray, "engine": phase_engine, "trainer": phase_trainer,
          "actors": phase_actors, "smoke": phase_smoke, "run": phase_run}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--phases", default=",".join(PHASES), help=f"comma list of {', '.join(PHASES)}")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    names = [p.strip() for p in args.phases.split(",") if p.strip()]
    unknown = [p for p in names if p not in PHASES]
    if unknown:
        ap.error(f"--phases: unknown {unknown}; known: {list(PHASES)}")
    results = {"date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()), "machine_cpus": os.cpu_count()}
    for name in names:
        load_before, t0 = os.getloadavg(), time.time()
        print(f"[{name}] ...", flush=True)
        results[name] = {**PHASES[name](), "phase_wall_s": time.time() - t0, "load_avg_before": load_before,
                         "load_avg_after": os.getloadavg()}
        print(json.dumps(results[name], indent=1), flush=True)
    out = args.out or os.path.join(REPO, "benchmarks", "startup_cpu.json")
    with open(out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
