"""`posttrain` command line: run, validate, score, toy.

    posttrain run RECIPE.yaml [key.path=value ...] [--run-dir DIR]
    posttrain validate RECIPE.yaml [key.path=value ...]
    posttrain score --reward NAME_OR_DOTPATH [--reward-kwargs JSON] INPUT.jsonl [-o OUT.jsonl]
    posttrain toy build|data ...

`validate` imports no torch, Ray or vLLM.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _print_err(msg: str) -> None:
    print(f"error: {msg}", file=sys.stderr)


# --------------------------------------------------------------------------------------------------------------
def cmd_validate(args) -> int:
    from posttrain.config import RecipeError, load_recipe
    from rewards.base import RewardSpecError

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        _check_rewards_resolve(recipe)
        if recipe.algorithm.type == "mopd":
            from teachers.checks import check_teachers
            check_teachers(recipe)
        if args.check_data:
            _check_data(recipe)
    except (RecipeError, RewardSpecError) as err:
        _print_err(str(err))
        return 2
    except ValueError as err:  # DatasetError
        _print_err(str(err))
        return 2
    print(f"ok: {args.recipe} ({recipe.algorithm.type}, {recipe.total_steps} steps, model {recipe.model.path})")
    return 0


def _check_rewards_resolve(recipe) -> None:
    from rewards.base import bind_reward
    for i, fn in enumerate(recipe.rewards.functions):
        try:
            bind_reward(fn.name, fn.kwargs)
        except Exception as err:
            from posttrain.config import RecipeError
            raise RecipeError(f"`rewards.functions[{i}].name`: {err}") from None


def _check_data(recipe) -> None:
    from posttrain.data import load_prompt_rows
    rows = {"train": load_prompt_rows(recipe.data.train_files), "eval": load_prompt_rows(recipe.data.eval_files)}
    if recipe.algorithm.type == "mopd":
        from teachers.routing import check_dataset_routing
        check_dataset_routing(recipe, rows)


# --------------------------------------------------------------------------------------------------------------
# Keys that may differ from the checkpoint's recipe when the user says so (--allow-change KEY): they change how
# much or where the run goes, never what one step computes.
SAFE_TO_CHANGE = ("total_steps", "checkpoint.", "data.eval_every", "data.eval_max_prompts", "log_every", "ray.",
                  "rollout.num_workers", "rollout.cpus_per_worker", "rollout.gpus_per_worker", "rollout.kv_cache_gib",
                  "rollout.gpu_memory_utilization", "trainer.num_workers", "trainer.cpus_per_worker",
                  "trainer.gpus_per_worker", "trainer.micro_batch_size", "rewards.timeout_s",
                  "rewards.max_concurrency", "rewards.samples_per_task", "algorithm.resident_engines", "algorithm.engine_cpus",
                  "algorithm.engine_gpus", "trainer.max_nonfinite_steps", "rewards.max_failure_fraction",
                  "rewards.max_failing_steps")


def _is_safe(key: str) -> bool:
    return any(key == s or (s.endswith(".") and key.startswith(s)) for s in SAFE_TO_CHANGE)


def _decide_resume(recipe, run_dir: str, allowed: list[str]) -> str | None:
    """Same recipe in RUN_DIR → resume from its latest complete checkpoint. A changed recipe is refused, naming
    the changed keys, unless every changed key is safe and allowed with --allow-change. A run stopped before its
    first checkpoint is checked the same way (against its config.yaml), and a folder that is not a run is refused:
    a run would overwrite its config.yaml, metrics.jsonl and summary.json."""
    from posttrain import checkpoint as ckpt
    from posttrain.config import RecipeError, recipe_to_dict

    latest = ckpt.latest_checkpoint(run_dir) if os.path.isdir(run_dir) else None
    previous = ckpt.load_driver_state(latest).get("recipe", {}) if latest else _recipe_before_checkpoint(run_dir)
    if previous is None:
        return None
    changed = sorted(_diff_keys(previous, recipe_to_dict(recipe)))
    refused = [k for k in changed if not (_is_safe(k) and any(k == a or k.startswith(a + ".") for a in allowed))]
    if refused:
        unsafe = [k for k in refused if not _is_safe(k)]
        hint = (f"keys that change what a step computes cannot change mid-run ({', '.join(unsafe)}): use another "
                "--run-dir for a new run, or restore them to resume" if unsafe else
                "if the change is intended, repeat the command with " +
                " ".join(f"--allow-change {k}" for k in refused))
        raise RecipeError(f"{run_dir} holds a run of a different recipe (changed: {', '.join(refused)}); {hint}")
    return latest


# What a folder may hold and still count as empty: the lock files of a start refused or killed before writing.
_LOCK_FILES = ("run.lock", "run.pid")


def _recipe_before_checkpoint(run_dir: str) -> dict | None:
    """The recipe of a run in RUN_DIR that has no checkpoint yet (its config.yaml); None for a new or empty
    folder. Raises RecipeError for a folder that holds something else."""
    from posttrain.config import RecipeError, safe_load_yaml

    if not os.path.lexists(run_dir):
        return None
    if not os.path.isdir(run_dir):
        raise RecipeError(f"--run-dir {run_dir} is a file, not a folder; pass a new or empty folder")
    found = sorted(set(os.listdir(run_dir)) - set(_LOCK_FILES))
    if not found:
        return None
    try:
        with open(os.path.join(run_dir, "config.yaml"), "rb") as f:
            previous = safe_load_yaml(f.read())
    except (OSError, ValueError):  # no config.yaml, or not one written by posttrain (yaml.YAMLError is a ValueError)
        previous = None
    if not isinstance(previous, dict) or "algorithm" not in previous:
        shown = ", ".join(found[:5]) + (f" and {len(found) - 5} more" if len(found) > 5 else "")
        raise RecipeError(f"--run-dir {run_dir} is not empty and holds no posttrain run (it has {shown}); a run "
                          "would overwrite files there: pass a new or empty folder as --run-dir")
    return previous


def _diff_keys(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def cmd_run(args) -> int:
    from posttrain.config import RecipeError, load_recipe
    from rewards.base import RewardSpecError

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        _check_rewards_resolve(recipe)
        run_dir = args.run_dir or os.path.join("runs", recipe.name)
        resume_from = _decide_resume(recipe, run_dir, args.allow_change)
    except (RecipeError, RewardSpecError, RuntimeError) as err:
        _print_err(str(err))
        return 2
    except OSError as err:
        _print_err(_run_dir_problem(run_dir, err))
        return 2
    from posttrain.runlock import RunLock, RunLockedError
    try:
        os.makedirs(run_dir, exist_ok=True)
        lock = RunLock(run_dir)
    except RunLockedError as err:
        _print_err(str(err))
        return 2
    except OSError as err:
        _print_err(_run_dir_problem(run_dir, err))
        return 2
    with lock:
        return _run_locked(args, recipe, run_dir, resume_from)


def _run_dir_problem(run_dir: str, err: OSError) -> str:
    where = f" ({err.filename})" if err.filename and err.filename != run_dir else ""
    return (f"cannot use --run-dir {run_dir}: {err.strerror or err}{where}; pass a folder you can write to, "
            "e.g. --run-dir runs/NAME")


def _run_locked(args, recipe, run_dir: str, resume_from: str | None) -> int:
    from posttrain.config import RecipeError, dump_recipe_yaml
    from posttrain.data import DatasetError
    from posttrain.loops.run import RewardsBroken, RunInterrupted, StaleWeightsError
    from rewards.base import RewardSpecError

    if resume_from:
        from posttrain import checkpoint as ckpt
        done = ckpt.load_driver_state(resume_from)["step"]
        if done >= recipe.total_steps and run_is_finished(run_dir):
            print(f"{run_dir}: run already finished ({done}/{recipe.total_steps} steps); nothing to do. "
                  f"Final model: {os.path.join(run_dir, 'final')}")
            return 0
        print(f"resuming {run_dir} from {resume_from} (step {done})")
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(dump_recipe_yaml(recipe))

    from posttrain.orchestration import stop_ray
    try:
        from posttrain.loops.run import run
        summary = run(recipe, run_dir, resume_from, progress=not args.no_progress)
    except KeyboardInterrupt:
        _print_err(f"interrupted; the last complete checkpoint in {run_dir}/checkpoints is intact — "
                   "re-run the same command to resume")
        return 130
    except (DatasetError, RecipeError, RewardSpecError) as err:
        _print_err(str(err))
        return 2
    except (RunInterrupted, StaleWeightsError, RewardsBroken) as err:
        _print_err(str(err))
        return 3
    finally:
        stop_ray()
    _print_summary(recipe, run_dir, summary)
    return 0


def _print_summary(recipe, run_dir: str, summary: dict) -> None:
    before, after = summary.get("eval_before"), summary.get("eval_after")
    print(f"\n{recipe.name}: {summary['steps']} steps in {summary['wall_s']:.0f} s "
          f"(start-up {summary['startup_s']:.0f} s)")
    if before is not None and after is not None:
        print(f"held-out reward: {before:.3f} → {after:.3f} ({after - before:+.3f})")
    first, last = summary.get("reverse_kl_first"), summary.get("reverse_kl_last")
    if first and last is not None:
        print(f"reverse KL to the teachers (mean of the first / last {summary['reverse_kl_window']} steps): "
              f"{first:.4f} → {last:.4f} ({100 * (last - first) / first:+.0f}%)")
    print(f"metrics: {run_dir}/metrics.jsonl  curve: {run_dir}/reward_curve.png  model: {summary['final_dir']}")
    from posttrain.checkpoint import atomic_write_text
    # Written last: a run is finished when final/ is complete AND this file exists (run_is_finished).
    atomic_write_text(os.path.join(run_dir, "summary.json"), json.dumps(summary, indent=1))


def run_is_finished(run_dir: str) -> bool:
    """final/ complete (written atomically) and summary.json written: a kill anywhere before that leaves a run that
    the same command completes (it resumes from the last checkpoint and writes the end again)."""
    from posttrain.checkpoint import is_complete_dir
    return is_complete_dir(os.path.join(run_dir, "final")) and os.path.isfile(os.path.join(run_dir, "summary.json"))


def cmd_status(args) -> int:
    from posttrain.runlock import run_status
    try:
        status = run_status(args.run_dir)
    except FileNotFoundError as err:
        _print_err(str(err))
        return 2
    if args.json:
        print(json.dumps(status, indent=1))
        return 0
    print(f"run dir:     {status['run_dir']}  ({status['name']}, {status['algorithm']})")
    print(f"state:       {status['state']}" + (f" (pid {status['pid']} on {status['host']})" if status["alive"] else ""))
    print(f"step:        {status['step']} / {status['total_steps']}")
    print(f"checkpoint:  {status['latest_checkpoint'] or 'none yet'}")
    last = status["last_metrics"]
    if last:
        keys = [k for k in ("reward/mean", "eval/reward/mean", "time/step_s", "throughput/tokens_per_s",
                            "mopd/reverse_kl") if k in last]
        print("last step:   " + ", ".join(f"{k} {last[k]:.4g}" for k in keys))
    if status["last_eval"]:
        print(f"last eval:   step {status['last_eval'][0]}: eval/reward/mean {status['last_eval'][1]:.4f}")
    return 0


# --------------------------------------------------------------------------------------------------------------
def cmd_toy(args) -> int:
    if args.toy_cmd == "build":
        from posttrain.toy.build import build_toy_base
        info = build_toy_base(args.out, domains=args.domains.split(","), sft_steps=args.sft_steps, seed=args.seed,
                              hidden_size=args.hidden_size, layers=args.layers, lr=args.lr,
                              habit_rate=args.habit_rate, device=args.device)
        print(json.dumps(info))
        return 0
    if args.toy_cmd == "data":
        from posttrain.toy.tasks import make_rows, write_jsonl
        os.makedirs(args.out_dir, exist_ok=True)
        domains = args.domains.split(",")
        for split, n in (("train", args.n_train), ("eval", args.n_eval)):
            path = os.path.join(args.out_dir, f"{split}.jsonl")
            write_jsonl(make_rows(domains, n, args.seed, split), path)
            print(f"wrote {n} rows to {path}")
        return 0
    if args.toy_cmd in ("build-vl", "data-vl"):
        return _cmd_toy_vl(args)
    return 2


def _cmd_toy_vl(args) -> int:
    """The toy vision-language model and its visual datasets (posttrain/vl/toy.py)."""
    import posttrain.vl  # noqa: F401 — torchvision's operator schemas before any processor import
    from posttrain.vl import toy
    domains = args.domains.split(",")
    if args.toy_cmd == "build-vl" and args.text_teacher and args.continue_from:
        print("error: --text-teacher and --continue-from are two different builds; pick one", file=sys.stderr)
        return 2
    if args.toy_cmd == "build-vl" and args.text_teacher:
        info = toy.build_vl_text_teacher(args.out, domains=domains, sft_steps=args.sft_steps, sft_rows=args.sft_rows,
                                         seed=args.seed, lr=args.lr or 3e-3, device=args.device)
        print(json.dumps(info))
        return 0
    if args.toy_cmd == "build-vl" and args.continue_from:
        info = toy.add_text_domains(args.continue_from, args.out, text_domains=domains, sft_steps=args.sft_steps,
                                    habit_rate=args.habit_rate, seed=args.seed, lr=args.lr or 1e-3,
                                    batch_size=args.batch_size or 32, device=args.device)
        print(json.dumps(info))
        return 0
    if args.toy_cmd == "build-vl":
        info = toy.build_toy_vl(args.out, domains=domains, sft_steps=args.sft_steps, sft_rows=args.sft_rows,
                                habit_rate=args.habit_rate, seed=args.seed, lr=args.lr or 3e-3,
                                batch_size=args.batch_size or 64, device=args.device)
        print(json.dumps(info))
        return 0
    for domain in domains:
        for split, n in (("train", args.n_train), ("eval", args.n_eval)):
            path = toy.write_vl_dataset(os.path.join(args.out_dir, f"vl-{domain}"), domain, n, args.seed, split)
            print(f"wrote {n} rows (and their media) to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a recipe (resumes if --run-dir holds a run of the same recipe)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    p.add_argument("--run-dir", default=None, help="run directory (default: runs/<recipe name>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--allow-change", action="append", default=[], metavar="KEY",
                   help="resume although this (safe) recipe key differs from the checkpoint's, e.g. total_steps")
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("status", help="a run's step, latest checkpoint, liveness and last metrics")
    p.add_argument("run_dir")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("validate", help="check a recipe without starting anything heavy")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*")
    p.add_argument("--check-data", action="store_true", help="also read and check every dataset row")
    p.set_defaults(func=cmd_validate)

    from posttrain import score as score_mod
    score_mod.add_parser(sub)

    p = sub.add_parser("toy", help="make the project's own toy data and tiny models")
    toy = p.add_subparsers(dest="toy_cmd", required=True)
    b = toy.add_parser("build", help="tokenizer + tiny Qwen3 model + supervised warm-up")
    b.add_argument("--out", required=True)
    b.add_argument("--domains", default="add")
    b.add_argument("--sft-steps", type=int, default=300)
    b.add_argument("--hidden-size", type=int, default=256)
    b.add_argument("--layers", type=int, default=2)
    b.add_argument("--lr", type=float, default=3e-3)
    b.add_argument("--seed", type=int, default=0)
    b.add_argument("--habit-rate", type=float, default=0.0,
                   help="fraction of the demonstrations that show the domain's bad habit (e.g. add: the carry "
                        "dropped; box: xywh for corners) for RL to find and fix; see toy/tasks.py")
    b.add_argument("--device", default="cpu", help="where the warm-up trains, e.g. cuda (the result is the same "
                   "kind of model, not bit-identical to a CPU build)")
    d = toy.add_parser("data", help="write train.jsonl / eval.jsonl of toy tasks")
    d.add_argument("--out-dir", required=True)
    d.add_argument("--domains", default="add")
    d.add_argument("--n-train", type=int, default=2000)
    d.add_argument("--n-eval", type=int, default=64)
    d.add_argument("--seed", type=int, default=0)
    v = toy.add_parser("build-vl", help="tokenizer + processor + tiny Qwen3-VL + supervised warm-up on the visual "
                       "domains (ground, count, ocr, video); see docs/vision.md")
    v.add_argument("--out", required=True)
    v.add_argument("--domains", default="ground,count,ocr,video")
    v.add_argument("--sft-steps", type=int, default=600)
    v.add_argument("--sft-rows", type=int, default=4000)
    v.add_argument("--habit-rate", type=float, default=0.5)
    v.add_argument("--lr", type=float, default=None, help="3e-3 (1e-3 with --continue-from)")
    v.add_argument("--batch-size", type=int, default=None, help="64 (32 with --continue-from)")
    v.add_argument("--seed", type=int, default=0)
    v.add_argument("--device", default="cpu")
    v.add_argument("--text-teacher", action="store_true",
                   help="build instead a text-only Qwen3 teacher with the toy VLM's tokenizer, warmed up on the TEXT "
                        "toy domains named by --domains (e.g. tspan): the text teacher of cross-modal MOPD")
    v.add_argument("--continue-from", default=None, metavar="VLM_DIR",
                   help="continue this toy VLM's warm-up with the TEXT toy domains named by --domains, mixed half "
                        "and half with its visual domains (habits at --habit-rate): the student of cross-modal MOPD")
    vd = toy.add_parser("data-vl", help="write OUT_DIR/vl-DOMAIN/{train,eval}.jsonl and their images/videos")
    vd.add_argument("--out-dir", required=True)
    vd.add_argument("--domains", default="ground,count,ocr,video")
    vd.add_argument("--n-train", type=int, default=256)
    vd.add_argument("--n-eval", type=int, default=64)
    vd.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_toy)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
