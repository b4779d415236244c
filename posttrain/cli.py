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
        if args.check_data:
            _check_data(recipe)
    except (RecipeError, RewardSpecError) as err:
        _print_err(str(err))
        return 2
    except ValueError as err:  # DatasetError
        _print_err(str(err))
        return 2
    print(f"ok: {args.recipe} ({recipe.algorithm}, {recipe.total_steps} steps, model {recipe.model.path})")
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
    load_prompt_rows(recipe.data.train_files)
    load_prompt_rows(recipe.data.eval_files)


# --------------------------------------------------------------------------------------------------------------
def _decide_resume(recipe, run_dir: str) -> str | None:
    """Same recipe in RUN_DIR → resume from its latest checkpoint; a different recipe → refuse, naming keys."""
    from posttrain import checkpoint as ckpt
    from posttrain.config import RecipeError, recipe_to_dict
    import yaml

    cfg_path = os.path.join(run_dir, "config.yaml")
    if not os.path.exists(cfg_path):
        return None
    with open(cfg_path) as f:
        previous = yaml.safe_load(f) or {}
    current = recipe_to_dict(recipe)
    changed = sorted(_diff_keys(previous, current))
    if changed:
        raise RecipeError(f"{run_dir} holds a run of a different recipe (changed: {', '.join(changed)}). "
                          "Use another --run-dir for a new run, or restore the recipe to resume this one.")
    return ckpt.latest_checkpoint(run_dir)


def _diff_keys(a, b, prefix: str = "") -> list[str]:
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b)):
            out += _diff_keys(a.get(k), b.get(k), f"{prefix}{k}.")
        return out
    return [] if a == b else [prefix.rstrip(".")]


def cmd_run(args) -> int:
    from posttrain.config import RecipeError, dump_recipe_yaml, load_recipe
    from posttrain.data import DatasetError
    from rewards.base import RewardSpecError

    try:
        recipe = load_recipe(args.recipe, args.overrides)
        _check_rewards_resolve(recipe)
        run_dir = args.run_dir or os.path.join("runs", recipe.name)
        resume_from = _decide_resume(recipe, run_dir)
    except (RecipeError, RewardSpecError, RuntimeError) as err:
        _print_err(str(err))
        return 2
    if resume_from:
        from posttrain import checkpoint as ckpt
        done = ckpt.load_driver_state(resume_from)["step"]
        if done >= recipe.total_steps and os.path.isdir(os.path.join(run_dir, "final")):
            print(f"{run_dir}: run already finished ({done}/{recipe.total_steps} steps); nothing to do. "
                  f"Final model: {os.path.join(run_dir, 'final')}")
            return 0
        print(f"resuming {run_dir} from {resume_from} (step {done})")
    os.makedirs(run_dir, exist_ok=True)
    with open(os.path.join(run_dir, "config.yaml"), "w") as f:
        f.write(dump_recipe_yaml(recipe))

    import ray
    try:
        if recipe.algorithm == "gspo":
            from posttrain.loops.gspo import run_gspo
            summary = run_gspo(recipe, run_dir, resume_from, progress=not args.no_progress)
        else:
            from posttrain.loops.mopd import run_mopd
            summary = run_mopd(recipe, run_dir, resume_from, progress=not args.no_progress)
    except KeyboardInterrupt:
        _print_err(f"interrupted; the last complete checkpoint in {run_dir}/checkpoints is intact — "
                   "re-run the same command to resume")
        return 130
    except (DatasetError, RecipeError, RewardSpecError) as err:
        _print_err(str(err))
        return 2
    finally:
        if ray.is_initialized():
            ray.shutdown()
    _print_summary(recipe, run_dir, summary)
    return 0


def _print_summary(recipe, run_dir: str, summary: dict) -> None:
    before, after = summary.get("eval_before"), summary.get("eval_after")
    print(f"\n{recipe.name}: {summary['steps']} steps in {summary['wall_s']:.0f} s "
          f"(start-up {summary['startup_s']:.0f} s)")
    if before is not None and after is not None:
        print(f"held-out reward: {before:.3f} → {after:.3f} ({after - before:+.3f})")
    print(f"metrics: {run_dir}/metrics.jsonl  curve: {run_dir}/reward_curve.png  model: {summary['final_dir']}")
    with open(os.path.join(run_dir, "summary.json"), "w") as f:
        json.dump(summary, f, indent=1)


# --------------------------------------------------------------------------------------------------------------
def cmd_toy(args) -> int:
    if args.toy_cmd == "build":
        from posttrain.toy.build import build_toy_base
        info = build_toy_base(args.out, domains=args.domains.split(","), sft_steps=args.sft_steps, seed=args.seed,
                              hidden_size=args.hidden_size, layers=args.layers, lr=args.lr)
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
    return 2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="posttrain", description=__doc__.split("\n\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a recipe (resumes if --run-dir holds a run of the same recipe)")
    p.add_argument("recipe")
    p.add_argument("overrides", nargs="*", help="key.path=value overrides")
    p.add_argument("--run-dir", default=None, help="run directory (default: runs/<recipe name>)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=cmd_run)

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
    d = toy.add_parser("data", help="write train.jsonl / eval.jsonl of toy tasks")
    d.add_argument("--out-dir", required=True)
    d.add_argument("--domains", default="add")
    d.add_argument("--n-train", type=int, default=2000)
    d.add_argument("--n-eval", type=int, default=64)
    d.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_toy)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
