"""posttrain against TRL's GRPOTrainer (GSPO settings), side by side, same model, data and batch, on this machine.

    .venv/bin/python benchmarks/bench_vs_trl.py [--shape quickstart|rollout-heavy|all] [--steps N]
        [--posttrain-override KEY=VALUE ...] [--trl-threads N] [--sides posttrain,trl] [--tag NAME]

For each shape (recipes/bench/quickstart-shape.yaml, plus overrides for the rollout-heavy one) it runs, one after
the other and never at once:
  1. `posttrain run RECIPE total_steps=N [overrides]` in a fresh run directory (a subprocess of .venv), then
  2. TRL 1.16's GRPOTrainer in its OWN virtual environment (benchmarks/.trl-venv, created on first use with
     `python3.11 -m venv benchmarks/.trl-venv && benchmarks/.trl-venv/bin/pip install "torch==2.13.0" "trl==1.16.*"
     "transformers==5.19.0" datasets`; TRL is never a dependency of posttrain), configured from the same recipe:
     per_device_train_batch_size = prompts×n / mini_batches, gradient_accumulation_steps 1, steps_per_generation =
     mini_batches (one rollout batch of prompts×n samples → mini_batches optimizer steps, π_old recomputed once),
     importance_sampling_level "sequence", loss_type "grpo" (each sequence's token mean, then the batch mean: posttrain's
     `sequence_mean`), ε/ε_high = clip_low/clip_high, beta 0, transformers generation (no vLLM).
It records, per side: seconds per rollout batch + its optimizer steps (steady state: mean over steps after the first),
the wall time of the whole process to N steps (imports and start-up included), reward per step, the split of a step,
the mean answer length and the load average around each run (the machine is shared), into
benchmarks/vs_trl_<shape>[_<tag>].json, and prints a markdown table. `--posttrain-override trainer.torch_threads=2`
re-measures posttrain after a speed change without editing anything; `--trl-threads 1` gives TRL's torch one thread
(on a loaded machine two OpenMP threads are far slower than one).

Run inside the TRL venv as `--trl-worker RECIPE --steps N --result OUT.json` it is the TRL side itself (it imports
only TRL's stack and posttrain's pure-Python reward module, posttrain/toy/rewards.py).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TRL_VENV = os.path.join(REPO, "benchmarks", ".trl-venv")
TRL_PACKAGES = ["torch==2.13.0", "trl==1.16.*", "transformers==5.19.0", "datasets"]
# shape → (recipe, rollout batches, recipe overrides). The rollout-heavy shape is the quickstart shape with a larger,
# untrained toy model and 128-token answers: the model is not committed (the toy builder makes it in ~1 min).
# Untrained, it samples nearly uniformly over its 512 tokens and stops only on drawing <|im_end|> (p ≈ 1/512 per
# token), so answers run ~113 tokens on average, most of them the full 128, on both sides alike; its rewards are all
# 0 (advantages 0), which changes no work: the update's forward, backward and optimizer steps still run.
SHAPES = {"quickstart": ("recipes/bench/quickstart-shape.yaml", 6, []),
          "rollout-heavy": ("recipes/bench/quickstart-shape.yaml", 3,
                            ["model.path=runs/bench/toy-4x256", "rollout.max_tokens=128"])}
BUILD_COMMANDS = {"runs/bench/toy-4x256": ["-m", "posttrain.cli", "toy", "build", "--out", "runs/bench/toy-4x256",
                                           "--domains", "add", "--sft-steps", "0", "--layers", "4",
                                           "--hidden-size", "256"]}


def load_yaml(path: str, overrides: list[str] = ()) -> dict:
    """The recipe as a plain dict with `key.path=value` overrides applied (values parsed as YAML, as posttrain does)."""
    import yaml
    with open(path) as f:
        recipe = yaml.safe_load(f)
    for item in overrides:
        key, value = item.split("=", 1)
        *parents, leaf = key.split(".")
        node = recipe
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return recipe


def resolve(path: str, recipe_path: str) -> str:
    """posttrain's rule: relative to the working directory, else to the recipe's folder."""
    if os.path.isabs(path) or os.path.exists(path):
        return path
    return os.path.join(os.path.dirname(os.path.abspath(recipe_path)), path)


def mean(xs: list[float]) -> float | None:
    return sum(xs) / len(xs) if xs else None


def median(xs: list[float]) -> float | None:
    import statistics
    return statistics.median(xs) if xs else None


# ------------------------------------------------------------------------------------------------------------------
# TRL side (runs inside benchmarks/.trl-venv)
def trl_worker(recipe_path: str, overrides: list[str], steps: int, result_path: str, threads: int | None) -> None:
    t_process = time.time()
    import torch
    if threads:
        torch.set_num_threads(threads)
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    sys.path.insert(0, REPO)
    from posttrain.toy.rewards import exact_answer   # pure Python (re only): the very reward posttrain scores with
    t_imported = time.time()

    recipe = load_yaml(recipe_path, overrides)
    rollout, opt, algo = recipe["rollout"], recipe["trainer"]["optimizer"], recipe["algorithm"]
    fn_names = [f["name"] for f in recipe["rewards"]["functions"]]
    if fn_names != ["posttrain.toy.rewards:exact_answer"] or algo["type"] != "gspo":
        raise SystemExit(f"{recipe_path}: the TRL side mirrors GSPO with the exact_answer reward only, got "
                         f"{algo['type']} with {fn_names}")
    samples = rollout["prompts_per_step"] * rollout["n"]
    mini_batches = algo["mini_batches"]
    if samples % mini_batches or (samples // mini_batches) % rollout["n"]:
        raise SystemExit(f"{recipe_path}: prompts_per_step × n = {samples} must split into {mini_batches} "
                         f"mini-batches of whole groups of {rollout['n']}")
    rows = []
    for path in recipe["data"]["train_files"]:
        with open(resolve(path, recipe_path)) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    dataset = Dataset.from_list([{"prompt": r["prompt"], "ground_truth": str(r["reward_model"]["ground_truth"]),
                                  "data_source": r["data_source"]} for r in rows])

    reward_s = []

    def exact_answer_reward(prompts, completions, ground_truth, data_source, **_):
        t0 = time.perf_counter()
        scores = [exact_answer(ds, c[0]["content"], gt)["score"]
                  for c, gt, ds in zip(completions, ground_truth, data_source)]
        reward_s.append(time.perf_counter() - t0)
        return scores

    with tempfile.TemporaryDirectory() as out_dir:
        args = GRPOConfig(
            output_dir=out_dir, use_cpu=True, bf16=False, fp16=False, seed=recipe.get("seed", 0),
            report_to=[], save_strategy="no", logging_steps=1, disable_tqdm=True, dataloader_num_workers=0,
            # batch: one rollout batch of prompts×n samples, split into `mini_batches` optimizer steps
            per_device_train_batch_size=samples // mini_batches, gradient_accumulation_steps=1,
            steps_per_generation=mini_batches, num_generations=rollout["n"], num_iterations=1,
            max_steps=steps * mini_batches,
            # GSPO: sequence-level ratio, ε 3e-4 / 4e-4, no KL, per-sequence token mean, group-std advantages
            importance_sampling_level="sequence", loss_type="grpo", epsilon=algo.get("clip_low", 3e-4),
            epsilon_high=algo.get("clip_high", 4e-4), beta=0.0, scale_rewards="group",
            # sampling: transformers generate, no vLLM
            use_vllm=False, max_completion_length=rollout["max_tokens"], temperature=rollout.get("temperature", 1.0),
            top_p=rollout.get("top_p", 1.0), top_k=0,
            # optimizer: AdamW, warm-up then constant, gradient clipping
            learning_rate=opt["lr"], lr_scheduler_type="constant_with_warmup", warmup_steps=opt.get("warmup_steps", 0),
            max_grad_norm=opt.get("max_grad_norm", 1.0), weight_decay=opt.get("weight_decay", 0.0),
            model_init_kwargs={"dtype": torch.float32},
        )
        step_end, all_logs = [], []

        class Clock(TrainerCallback):
            def on_train_begin(self, *_, **__):
                step_end.append(time.time())

            def on_step_end(self, *_, **__):
                step_end.append(time.time())

            def on_log(self, _args, state, _control, logs=None, **__):
                all_logs.append({"global_step": state.global_step, **(logs or {})})

        t_init = time.time()
        trainer = GRPOTrainer(model=resolve(recipe["model"]["path"], recipe_path), reward_funcs=exact_answer_reward,
                              args=args, train_dataset=dataset, callbacks=[Clock()])
        t_built = time.time()
        # split of a rollout batch: generation, reward scoring, and the whole "generate and score" (generation +
        # rewards + π_old forward + advantages); the rest of the batch's time is its optimizer steps
        spans = {"generate": [], "score_and_old_logprobs": []}

        def timed(name, fn):
            def wrapper(*a, **k):
                t0 = time.perf_counter()
                out = fn(*a, **k)
                spans[name].append(time.perf_counter() - t0)
                return out
            return wrapper

        trainer._generate = timed("generate", trainer._generate)
        trainer._generate_and_score_completions = timed("score_and_old_logprobs",
                                                        trainer._generate_and_score_completions)
        trainer.train()
        t_done = time.time()

    # one rollout batch = `mini_batches` optimizer steps; step k's time runs from the end of the previous batch
    batch_s = [step_end[(k + 1) * mini_batches] - step_end[k * mini_batches] for k in range(steps)]
    # TRL logs a rollout batch's generation metrics once, at the first optimizer step that uses the batch
    first_logs = [lg for lg in all_logs if "reward" in lg and (lg["global_step"] - 1) % mini_batches == 0]
    rewards = [lg["reward"] for lg in first_logs]
    lengths = [lg.get("completions/mean_length") for lg in first_logs]
    per_step = [{"step": k + 1, "step_s": batch_s[k], "generate_s": spans["generate"][k],
                 "reward_s": reward_s[k], "rollout_reward_old_logprobs_s": spans["score_and_old_logprobs"][k],
                 "update_s": batch_s[k] - spans["score_and_old_logprobs"][k],
                 "reward_mean": rewards[k] if k < len(rewards) else None,
                 "response_len_mean": lengths[k] if k < len(lengths) else None} for k in range(steps)]
    with open(result_path, "w") as f:
        json.dump({"imports_s": t_imported - t_process, "trainer_init_s": t_built - t_init,
                   "startup_s": step_end[0] - t_process, "train_s": t_done - step_end[0],
                   "torch_threads": torch.get_num_threads(), "per_step": per_step,
                   "versions": {m: __import__(m).__version__ for m in ("trl", "transformers", "torch")}}, f)


# ------------------------------------------------------------------------------------------------------------------
# driver (runs in posttrain's .venv)
def ensure_trl_venv() -> str:
    python = os.path.join(TRL_VENV, "bin", "python")
    if not os.path.exists(python):
        print(f"creating {TRL_VENV} (TRL's own environment, not posttrain's) ...", flush=True)
        subprocess.run([sys.executable if "python3.11" in os.path.realpath(sys.executable) else "python3.11",
                        "-m", "venv", TRL_VENV], check=True)
    probe = subprocess.run([python, "-c", "import trl, transformers, datasets"], capture_output=True)
    if probe.returncode != 0:
        subprocess.run([python, "-m", "pip", "install", "-q", *TRL_PACKAGES], check=True)
    return python


def ensure_model(recipe_path: str, overrides: list[str]) -> None:
    model_path = load_yaml(recipe_path, overrides)["model"]["path"]
    if not os.path.exists(os.path.join(resolve(model_path, recipe_path), "config.json")):
        if model_path not in BUILD_COMMANDS:
            raise SystemExit(f"{recipe_path}: model.path {model_path!r} is missing and this script cannot build it")
        print(f"building {model_path} with the toy builder ...", flush=True)
        subprocess.run([sys.executable, *BUILD_COMMANDS[model_path]], check=True, cwd=REPO)


def run_posttrain(recipe_path: str, steps: int, overrides: list[str]) -> dict:
    with tempfile.TemporaryDirectory() as run_dir:
        cmd = [sys.executable, "-m", "posttrain.cli", "run", recipe_path, f"total_steps={steps}", *overrides,
               "--run-dir", run_dir, "--no-progress"]
        load_before, t0 = os.getloadavg(), time.time()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True)
        wall = time.time() - t0
        if proc.returncode != 0:
            raise SystemExit(f"posttrain run failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(os.path.join(run_dir, "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f if line.strip()]
        with open(os.path.join(run_dir, "summary.json")) as f:
            summary = json.load(f)
    per_step = [{"step": r["step"], "step_s": r["time/step_s"], "rollout_s": r.get("time/rollout_s"),
                 "reward_s": r.get("time/reward_s"), "update_s": r.get("time/update_s"), "sync_s": r.get("time/sync_s"),
                 "reward_mean": r["reward/mean"], "response_len_mean": r.get("rollout/response_len_mean")}
                for r in records if r["step"] >= 1]
    steady = per_step[1:]
    return {"command": " ".join(cmd[1:]).replace(run_dir, "RUN_DIR"), "wall_s": wall,
            "startup_s": summary.get("startup_s"), "startup_breakdown": summary.get("startup_breakdown"),
            "steady_step_s": mean([s["step_s"] for s in steady]),
            "steady_step_s_median": median([s["step_s"] for s in steady]),
            "steady_split_s": {k: mean([s[k] for s in steady if s[k] is not None])
                               for k in ("rollout_s", "reward_s", "update_s", "sync_s")},
            "per_step": per_step, "load_avg_before": load_before, "load_avg_after": os.getloadavg()}


def run_trl(python: str, recipe_path: str, overrides: list[str], steps: int, threads: int | None) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        result_path = os.path.join(tmp, "trl.json")
        cmd = [python, os.path.abspath(__file__), "--trl-worker", recipe_path, "--steps", str(steps),
               "--result", result_path, *(f"--worker-override={o}" for o in overrides),
               *(["--trl-threads", str(threads)] if threads else [])]
        load_before, t0 = os.getloadavg(), time.time()
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True,
                              env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
        wall = time.time() - t0
        if proc.returncode != 0:
            raise SystemExit(f"TRL side failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
        with open(result_path) as f:
            result = json.load(f)
    steady = result["per_step"][1:]
    return {**result, "wall_s": wall, "steady_step_s": mean([s["step_s"] for s in steady]),
            "steady_step_s_median": median([s["step_s"] for s in steady]),
            "steady_split_s": {k: mean([s[k] for s in steady])
                               for k in ("generate_s", "reward_s", "rollout_reward_old_logprobs_s", "update_s")},
            "load_avg_before": load_before, "load_avg_after": os.getloadavg()}


def fmt(x, digits=2) -> str:
    return "–" if x is None else f"{x:.{digits}f}"


def table(shape: str, result: dict) -> str:
    p, t = result.get("posttrain"), result.get("trl")
    lines = [f"| {shape} | posttrain | TRL |", "|---|---|---|"]

    def row(label, pv, tv):
        lines.append(f"| {label} | {pv} | {tv} |")

    row("s per rollout batch + updates (steady: mean, median)",
        *(f"{fmt(side['steady_step_s'])}, {fmt(side.get('steady_step_s_median'))}" if side else "–" for side in (p, t)))
    if p:
        split = p["steady_split_s"]
        ps = " / ".join(fmt(split[k]) for k in ("rollout_s", "reward_s", "update_s", "sync_s"))
    if t:
        split = t["steady_split_s"]
        rollout_rest = split["rollout_reward_old_logprobs_s"] - split["generate_s"] - split["reward_s"]
        ts = " / ".join(fmt(x) for x in (split["generate_s"], split["reward_s"], split["update_s"], rollout_rest))
    row("split: posttrain rollout / reward / update / sync; TRL generate / reward / updates / π_old+rest",
        ps if p else "–", ts if t else "–")
    row(f"wall to {result['steps']} steps (process, start-up included)", fmt(p and p["wall_s"], 1),
        fmt(t and t["wall_s"], 1))
    row("start-up before step 1", fmt(p and p["startup_s"], 1), fmt(t and t["startup_s"], 1))
    row("reward per step", ", ".join(fmt(s["reward_mean"], 3) for s in p["per_step"]) if p else "–",
        ", ".join(fmt(s["reward_mean"], 3) for s in t["per_step"]) if t else "–")
    row("mean answer tokens", fmt(p and mean([s["response_len_mean"] for s in p["per_step"]]), 1),
        fmt(t and mean([s["response_len_mean"] for s in t["per_step"] if s["response_len_mean"] is not None]), 1))
    row("load average (1 min) before → after", *(
        f"{side['load_avg_before'][0]:.1f} → {side['load_avg_after'][0]:.1f}" if side else "–" for side in (p, t)))
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", choices=[*SHAPES, "all"], default="all")
    ap.add_argument("--steps", type=int, default=None, help="rollout batches per side (default: the shape's)")
    ap.add_argument("--posttrain-override", action="append", default=[], metavar="KEY=VALUE",
                    help="recipe override passed to `posttrain run`, e.g. trainer.torch_threads=2 (repeatable)")
    ap.add_argument("--sides", default="posttrain,trl", help="comma list of posttrain, trl")
    ap.add_argument("--trl-threads", type=int, default=None,
                    help="torch threads of the TRL side (default: torch's own, one per core)")
    ap.add_argument("--tag", default="", help="suffix of the JSON file names (e.g. threads2)")
    ap.add_argument("--trl-worker", metavar="RECIPE", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    ap.add_argument("--worker-override", action="append", default=[], help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.trl_worker:
        trl_worker(args.trl_worker, args.worker_override, args.steps, args.result, args.trl_threads)
        return 0

    os.chdir(REPO)
    sides = [s.strip() for s in args.sides.split(",") if s.strip()]
    unknown = set(sides) - {"posttrain", "trl"}
    if unknown:
        ap.error(f"--sides: unknown {sorted(unknown)}; use posttrain and/or trl")
    bad = [o for o in args.posttrain_override if "=" not in o]
    if bad:
        ap.error(f"--posttrain-override needs KEY=VALUE, got {bad}")
    trl_python = ensure_trl_venv() if "trl" in sides else None
    for shape in (SHAPES if args.shape == "all" else [args.shape]):
        recipe_path, default_steps, shape_overrides = SHAPES[shape]
        steps = args.steps or default_steps
        if steps < 2:
            ap.error("--steps must be at least 2 (the steady state is the mean over steps after the first)")
        ensure_model(recipe_path, shape_overrides)
        result = {"shape": shape, "recipe": recipe_path, "shape_overrides": shape_overrides, "steps": steps,
                  "machine_cpus": os.cpu_count(), "posttrain_overrides": args.posttrain_override,
                  "trl_threads": args.trl_threads,
                  "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}
        if "posttrain" in sides:
            print(f"[{shape}] posttrain, {steps} steps ...", flush=True)
            result["posttrain"] = run_posttrain(recipe_path, steps, shape_overrides + args.posttrain_override)
        if "trl" in sides:
            print(f"[{shape}] TRL, {steps} steps ...", flush=True)
            result["trl"] = run_trl(trl_python, recipe_path, shape_overrides, steps, args.trl_threads)
        out = os.path.join("benchmarks", f"vs_trl_{shape}{'_' + args.tag if args.tag else ''}.json")
        with open(out, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {out}\n\n{table(shape, result)}\n", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
