"""The GSPO loop, top to bottom: prompts → vLLM rollouts → rewards → group advantages → π_old → mini-batch
updates → weight sync (+ canary) → metrics → evaluation → checkpoint.

One function, one pass per step; the math lives in posttrain.algorithms.gspo, the plumbing in
posttrain.orchestration. A resumed run reloads trainer state, data cursor and step, pushes the checkpoint's
weights into the engines, and continues: per-prompt sampling seeds are derived from (seed, step, prompt), so the
rows and samples after a resume are the ones an uninterrupted run would have drawn.
"""
from __future__ import annotations

import os
import time

import numpy as np
import ray
import torch

from posttrain import checkpoint as ckpt
from posttrain.algorithms.gspo import group_advantages
from posttrain.config import Recipe, recipe_hash, recipe_to_dict
from posttrain.data import DataCursor, encode_prompt, load_prompt_rows
from posttrain.metrics import MetricsLog, plot_rewards, read_metrics
from posttrain.orchestration import RolloutGroup, TrainerGroup, start_ray
from posttrain.reward_pool import (check_rewards_load, release_reward_servers, reward_fns_from_recipe, reward_metrics,
                                   score_batch)


class StaleWeightsError(RuntimeError):
    pass


def sampling_seed(seed: int, step: int, index: int, stream: int = 0) -> int:
    """Per-request sampling seed; a pure function of (run seed, step, prompt index, stream) for exact resume."""
    return int(np.random.SeedSequence([seed, stream, step, index]).generate_state(1)[0] & 0x7FFFFFFF)


def prepare_prompts(rows: list[dict], tokenizer, max_tokens: int, what: str) -> list[list[int]]:
    from posttrain.data import DatasetError
    ids = []
    for i, row in enumerate(rows):
        p = encode_prompt(tokenizer, row["prompt"])
        if len(p) > max_tokens:
            raise DatasetError(f"{what} row {i + 1}: prompt is {len(p)} tokens, over data.max_prompt_tokens = "
                               f"{max_tokens}; shorten it or raise the limit")
        ids.append(p)
    return ids


def evaluate(recipe: Recipe, rollout: RolloutGroup, reward_fns, rows, prompt_ids) -> dict[str, float]:
    """Held-out reward: eval_n samples per prompt at eval_temperature with fixed seeds (the same every time, so
    evaluations differ only through the weights)."""
    r = recipe.rollout
    seeds = [sampling_seed(recipe.seed, 0, i, stream=1) for i in range(len(rows))]
    # vLLM clamps temperatures below 0.01; 0 means greedy there.
    groups = rollout.generate(prompt_ids, seeds, n=r.eval_n, temperature=r.eval_temperature,
                              top_p=1.0, max_tokens=r.max_tokens)
    samples, sources = [], []
    for row, group in zip(rows, groups):
        for s in group:
            samples.append({"data_source": row["data_source"], "solution": s["text"],
                            "ground_truth": row["reward_model"]["ground_truth"], "extra_info": row["extra_info"]})
            sources.append(row["data_source"])
    return reward_metrics(score_rewards(recipe, reward_fns, samples), sources, prefix="eval/reward")


def score_rewards(recipe: Recipe, reward_fns, samples: list[dict]) -> list[dict]:
    """score_batch with the recipe's limits (`rewards.timeout_s`, `max_concurrency`, `samples_per_task`)."""
    r = recipe.rewards
    return score_batch(reward_fns, samples, timeout_s=r.timeout_s, max_concurrency=r.max_concurrency,
                       samples_per_task=r.samples_per_task)


def check_canary(recipe: Recipe, trainer: TrainerGroup, rollout: RolloutGroup, canary_ids: list[int],
                 step: int) -> float:
    """Stale-weights canary: engine and trainer log-probs of a fixed sequence must agree after every sync."""
    reference = np.array(trainer.call_rank0("canary_logprobs", canary_ids))
    worst = 0.0
    for w, engine_lp in enumerate(rollout.canary(canary_ids)):
        diff = float(np.max(np.abs(np.array(engine_lp) - reference)))
        worst = max(worst, diff)
        if diff > recipe.rollout.canary_tolerance:
            raise StaleWeightsError(
                f"weight-sync canary failed at step {step}: rollout worker {w}'s log-probs differ from the "
                f"trainer's by {diff:.2e} (> rollout.canary_tolerance = {recipe.rollout.canary_tolerance:g}). "
                "The engine is generating with stale or corrupted weights; the run stops rather than train on them.")
    return worst


def run_gspo(recipe: Recipe, run_dir: str, resume_from: str | None = None, progress: bool = True) -> dict:
    return run_with_restarts(_gspo_attempt, recipe, run_dir, resume_from, progress)


def _gspo_attempt(recipe: Recipe, run_dir: str, resume_from: str | None, progress: bool, actors: list) -> dict:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    t_start = time.time()
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.path)
    train_rows = load_prompt_rows(recipe.data.train_files)
    eval_rows = load_prompt_rows(recipe.data.eval_files)[:recipe.data.eval_max_prompts]
    train_ids = prepare_prompts(train_rows, tokenizer, recipe.data.max_prompt_tokens, "train")
    eval_ids = prepare_prompts(eval_rows, tokenizer, recipe.data.max_prompt_tokens, "eval")
    reward_fns = reward_fns_from_recipe(recipe.rewards)
    check_rewards_load(reward_fns)
    cursor = DataCursor(len(train_rows), recipe.seed, recipe.data.shuffle)
    metrics_log = MetricsLog(os.path.join(run_dir, "metrics.jsonl"))
    r, g = recipe.rollout, recipe.gspo
    # Fixed canary sequence: a prompt plus a stretch of ordinary tokens.
    canary_ids = (eval_ids or train_ids)[0] + tokenizer("Answer: 12345", add_special_tokens=False)["input_ids"]

    timings = {"load_data_s": time.time() - t_start}
    t = time.time()
    start_ray(recipe)
    timings["ray_init_s"] = time.time() - t
    t = time.time()
    trainer = TrainerGroup(recipe)
    actors.append(trainer)
    rollout = RolloutGroup(recipe)
    actors.append(rollout)
    timings["actors_s"] = time.time() - t
    t = time.time()
    start_step = restore_state(recipe, resume_from, trainer, rollout, cursor, metrics_log, canary_ids)
    if not resume_from and eval_rows:
        record = {"step": 0, **evaluate(recipe, rollout, reward_fns, eval_rows, eval_ids)}
        metrics_log.write(record)
    timings["first_eval_or_restore_s"] = time.time() - t
    startup_s = time.time() - t_start

    bar = tqdm(range(start_step + 1, recipe.total_steps + 1), desc=recipe.name, unit="step", disable=not progress,
               initial=start_step, total=recipe.total_steps, dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        # 1. prompts and rollouts -----------------------------------------------------------------------------
        rows_idx = cursor.next_indices(r.prompts_per_step)
        seeds = [sampling_seed(recipe.seed, step, j) for j in range(len(rows_idx))]
        groups = rollout.generate([train_ids[i] for i in rows_idx], seeds, n=r.n, temperature=r.temperature,
                                  top_p=r.top_p, max_tokens=r.max_tokens)
        prompts, responses, group_ids, samples, sources = [], [], [], [], []
        for gid, (i, group) in enumerate(zip(rows_idx, groups)):
            row = train_rows[i]
            for s in group:
                prompts.append(train_ids[i])
                responses.append(s["token_ids"])
                group_ids.append(gid)
                samples.append({"data_source": row["data_source"], "solution": s["text"],
                                "ground_truth": row["reward_model"]["ground_truth"], "extra_info": row["extra_info"]})
                sources.append(row["data_source"])
        t1 = time.perf_counter()
        # 2. rewards ------------------------------------------------------------------------------------------
        results = score_rewards(recipe, reward_fns, samples)
        rewards = torch.tensor([res["score"] for res in results], dtype=torch.float32)
        t2 = time.perf_counter()
        # 3. advantages (pure function) -----------------------------------------------------------------------
        gids = torch.tensor(group_ids)
        advantages = group_advantages(rewards, gids, scale_by_std=g.scale_by_std, eps=g.eps)
        keep = list(range(len(prompts)))
        if g.filter_equal_reward_groups:
            keep = [k for k in keep if bool((rewards[gids == gids[k]] != rewards[k]).any())]
        # 4. π_old, then mini-batch updates (whole groups per mini-batch, in order) ----------------------------
        old_logprobs = trainer.compute_logprobs(prompts, responses)
        update_metrics: list[dict] = []
        keep_set = set(keep)
        for _epoch in range(g.epochs):
            for part in np.array_split(np.arange(len(prompts)), g.mini_batches):
                idx = [int(k) for k in part if int(k) in keep_set]
                if not idx:
                    continue
                update_metrics.append(trainer.train_minibatch(
                    [prompts[k] for k in idx], [responses[k] for k in idx], [old_logprobs[k] for k in idx],
                    [float(advantages[k]) for k in idx]))
        t3 = time.perf_counter()
        # 5. weight sync + canary -----------------------------------------------------------------------------
        weights_ref = ray.put(trainer.call_rank0("named_weights"))
        sync_s = rollout.update_weights(weights_ref, step)
        canary_diff = check_canary(recipe, trainer, rollout, canary_ids, step)
        t4 = time.perf_counter()
        # 6. metrics ------------------------------------------------------------------------------------------
        n_tokens = sum(len(x) for x in responses)
        step_s = t4 - t0
        record = {"step": step, **reward_metrics(results, sources),
                  "time/step_s": step_s, "time/rollout_s": t1 - t0, "time/reward_s": t2 - t1,
                  "time/update_s": t3 - t2, "time/sync_s": t4 - t3, "time/engine_load_s": sync_s,
                  "throughput/tokens_per_s": n_tokens / step_s, "throughput/rollout_tokens_per_s": n_tokens / (t1 - t0),
                  "throughput/trainer_tokens_per_s": n_tokens * g.epochs / (t3 - t2),
                  "rollout/response_len_mean": n_tokens / len(responses),
                  "rollout/truncated_frac": sum(s["finish_reason"] == "length" for gr in groups for s in gr) / len(responses),
                  "rollout/equal_reward_group_frac": _equal_group_frac(rewards, gids),
                  "rollout/canary_max_abs_diff": canary_diff, "data/epoch": cursor.epoch}
        for key in update_metrics[0] if update_metrics else []:
            record[key] = float(np.mean([m[key] for m in update_metrics]))
        # 7. evaluation and checkpoint ------------------------------------------------------------------------
        if eval_rows and ((recipe.data.eval_every and step % recipe.data.eval_every == 0) or step == recipe.total_steps):
            record.update(evaluate(recipe, rollout, reward_fns, eval_rows, eval_ids))
        metrics_log.write(record)
        if step % recipe.checkpoint.every == 0 or step == recipe.total_steps:
            save_checkpoint(recipe, run_dir, step, trainer, cursor)
        bar.set_postfix(reward=f"{record['reward/mean']:.3f}", tok_s=f"{record['throughput/tokens_per_s']:.0f}",
                        **({"eval": f"{record['eval/reward/mean']:.3f}"} if "eval/reward/mean" in record else {}))
    bar.close()

    summary, _ = finish_run(recipe, run_dir, trainer, metrics_log)
    return {**summary, "startup_s": startup_s, "startup_breakdown": timings, "wall_s": time.time() - t_start}


def finish_run(recipe: Recipe, run_dir: str, trainer: TrainerGroup,
               metrics_log: MetricsLog) -> tuple[dict, list]:
    """The end of every loop: the model in Hugging Face format in RUN_DIR/final, the reward curve, and the
    held-out reward before → after. Returns (summary, all metrics records)."""
    final_dir = os.path.join(run_dir, "final")
    trainer.call_rank0("save_hf", final_dir)
    trainer.call_all("shutdown")
    records = read_metrics(metrics_log.path)
    plot_rewards(metrics_log.path, os.path.join(run_dir, "reward_curve.png"), title=recipe.name)
    evals = [rec["eval/reward/mean"] for rec in records if "eval/reward/mean" in rec]
    summary = {"eval_before": evals[0] if evals else None, "eval_after": evals[-1] if evals else None,
               "steps": recipe.total_steps, "final_dir": final_dir}
    return summary, records


def restore_state(recipe: Recipe, resume_from: str | None, trainer: TrainerGroup, rollout: RolloutGroup,
                  cursor: DataCursor, metrics_log: MetricsLog, canary_ids: list[int]) -> int:
    """Continue from a checkpoint (trainer weights, optimizer, schedule, RNG; data cursor; metrics after it
    dropped, so no step is counted twice; engines given the checkpoint's weights and checked by the canary), or
    begin afresh. Returns the step to continue after. Shared by every loop, so resume behaves the same in each."""
    if not resume_from:
        metrics_log.truncate_after(-1)  # a fresh start (or a restart before the first checkpoint)
        return 0
    state = ckpt.load_driver_state(resume_from)
    trainer.call_all("load_state", resume_from)
    cursor.load_state_dict(state["cursor"])
    start_step = state["step"]
    metrics_log.truncate_after(start_step)
    rollout.update_weights(ray.put(trainer.call_rank0("named_weights")), start_step)
    check_canary(recipe, trainer, rollout, canary_ids, start_step)
    return start_step


def save_checkpoint(recipe: Recipe, run_dir: str, step: int, trainer: TrainerGroup, cursor: DataCursor) -> None:
    """Every rank writes its state into the temporary folder; the driver adds its own and commits atomically."""
    tmp = ckpt.begin(run_dir, step)
    trainer.call_all("save_state", tmp)
    ckpt.commit(run_dir, tmp, step, driver_state(recipe, step, cursor), recipe.checkpoint.keep_last)


def driver_state(recipe: Recipe, step: int, cursor: DataCursor) -> dict:
    """What the driver itself must persist: the step, the data cursor, and the recipe that produced them."""
    return {"step": step, "cursor": cursor.state_dict(), "recipe_hash": recipe_hash(recipe),
            "recipe": recipe_to_dict(recipe)}


def run_with_restarts(attempt, recipe: Recipe, run_dir: str, resume_from: str | None, progress: bool) -> dict:
    """Run `attempt`; when an actor or a whole node is lost, tear the actors down, and start again from the
    latest checkpoint (at most ray.max_restarts times, each logged). Beyond that, or when the actors cannot be
    placed again, exit with a clear message and the checkpoint intact, so that the same command resumes."""
    from posttrain.orchestration import ActorStartError

    restarts = 0
    while True:
        actors: list = []
        try:
            return attempt(recipe, run_dir, resume_from, progress, actors)
        except LOST_WORKER_ERRORS as err:
            latest = ckpt.latest_checkpoint(run_dir)
            where = latest or "the beginning (no checkpoint yet)"
            if restarts >= recipe.ray.max_restarts:
                raise RunInterrupted(
                    f"lost a Ray worker ({type(err).__name__}: {str(err).splitlines()[0][:200]}) and "
                    f"ray.max_restarts = {recipe.ray.max_restarts} restarts are used up; the latest checkpoint "
                    f"({where}) is intact: re-run the same command to resume") from None
            restarts += 1
            _log_event(run_dir, f"lost a Ray worker ({type(err).__name__}); restart {restarts}/"
                                f"{recipe.ray.max_restarts} from {where}")
            resume_from = latest
        except ActorStartError as err:
            raise RunInterrupted(str(err)) from None
        finally:
            for group in actors:
                group.shutdown()
            release_reward_servers()


class RunInterrupted(RuntimeError):
    """The run stopped with its checkpoint intact; the message says how to continue."""


LOST_WORKER_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                      ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError,
                      ray.exceptions.ActorUnavailableError)


def _log_event(run_dir: str, message: str) -> None:
    import sys
    line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}"
    print(line, file=sys.stderr, flush=True)
    with open(os.path.join(run_dir, "events.log"), "a") as f:
        f.write(line + "\n")


def _equal_group_frac(rewards: torch.Tensor, gids: torch.Tensor) -> float:
    groups = gids.unique()
    equal = sum(bool((rewards[gids == gid] == rewards[gids == gid][0]).all()) for gid in groups)
    return equal / max(len(groups), 1)
