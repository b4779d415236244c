"""The training loop, top to bottom, for every algorithm:

    prompts → vLLM rollouts → rewards → the algorithm's update (advantages / teacher scoring, mini-batch steps)
    → weight sync (+ canary) → metrics → evaluation → checkpoint

The algorithm (posttrain/loops/algorithms.py: GSPO, GRPO, MOPD) is a small part with three steps: `prepare`
(cheap checks before anything heavy starts), `start` (its own actors, e.g. MOPD's teacher engines) and `update`
(one rollout batch → optimizer steps). Everything else — seeds, data cursor, rewards, weight sync, canary,
evaluation, checkpoints, resume, restarts — is written once, here.

A resumed run reloads trainer state, data cursor and step, pushes the checkpoint's weights into the engines, and
continues: per-prompt sampling seeds are derived from (seed, step, prompt), so the rows and samples after a resume
are the ones an uninterrupted run would have drawn.
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import os
import pickle
import sys
import time

import numpy as np
import ray
import torch

from posttrain import checkpoint as ckpt
from posttrain.config import Recipe, canary_tolerance, recipe_hash, recipe_to_dict
from posttrain.data import DataCursor, DatasetError, encode_prompt, load_prompt_rows
from posttrain.metrics import MetricsLog, StepTimer, plot_rewards, read_metrics
from posttrain.orchestration import RolloutGroup, TrainerGroup, start_ray
from posttrain.rewards_runner import (check_rewards_load, failing_rewards, release_reward_servers,
                                      reward_fns_from_recipe, reward_metrics, score_batch, warm_reward_workers)


class StaleWeightsError(RuntimeError):
    """The engines generate with weights other than the trainer's (the canary), or the update diverged."""


class RunInterrupted(RuntimeError):
    """The run stopped with its checkpoint intact; the message says how to continue."""


class RewardsBroken(RuntimeError):
    """A reward function failed on most samples for several steps in a row: training on its zeros is pointless."""


@dataclasses.dataclass
class RunData:
    """What a run reads before anything heavy starts: tokenizer, rows, their prompt token ids and, for rows with
    images or videos, the multimodal prompts (ids with one pad per item + the decoded media; None for text rows)."""
    tokenizer: object
    train_rows: list[dict]
    eval_rows: list[dict]
    train_ids: list[list[int]]
    eval_ids: list[list[int]]
    train_mm: list | None = None
    eval_mm: list | None = None

    def engine_prompts(self, split: str, indices) -> list:
        """What the engine gets: a MultimodalPrompt for a row with media, else the token ids."""
        ids, mm = (self.train_ids, self.train_mm) if split == "train" else (self.eval_ids, self.eval_mm)
        return [mm[i] if mm and mm[i] is not None else ids[i] for i in indices]


@dataclasses.dataclass
class RolloutBatch:
    """One step's samples, flat (sample j belongs to prompt group group_ids[j] of dataset row row_index[j])."""
    row_index: list[int]
    group_ids: torch.Tensor               # [N]
    prompts: list[list[int]]
    responses: list[list[int]]
    sampling_logprobs: list[list[float]]  # μ: the engine's log-probs of the sampled tokens
    texts: list[str]
    finish_reasons: list[str]
    rewards: torch.Tensor | None = None   # [N], after scoring
    mm_prompts: list | None = None              # vision-language: each sample's MultimodalPrompt (None: text)
    loss_masks: list[list[int]] | None = None   # multi-turn: 1 on policy-sampled tokens, 0 on observations
    env_rewards: list[float] | None = None      # multi-turn: the environment's reward per trajectory
    env_metrics: dict | None = None             # multi-turn: env/turns_mean, env/tool_calls_mean, ...
    trajectories: list | None = None            # multi-turn: for the trajectory dumps
    stale_steps: int = 0                  # how many weight versions behind the trainer its sampling policy μ is
    max_importance_weight: float = 1.0    # truncation of π_old/μ when stale (rollout.max_importance_weight)


def sampling_seed(seed: int, step: int, index: int, stream: int = 0) -> int:
    """Per-request sampling seed; a pure function of (run seed, step, prompt index, stream) for exact resume."""
    return int(np.random.SeedSequence([seed, stream, step, index]).generate_state(1)[0] & 0x7FFFFFFF)


def run(recipe: Recipe, run_dir: str, resume_from: str | None = None, progress: bool = True) -> dict:
    from posttrain.loops.algorithms import make_algorithm
    return run_with_restarts(lambda *args: _attempt(make_algorithm(recipe), *args), recipe, run_dir, resume_from,
                             progress)


def _attempt(algorithm, recipe: Recipe, run_dir: str, resume_from: str | None, progress: bool, actors: list) -> dict:
    from tqdm import tqdm

    t_start = time.time()
    reward_fns = reward_fns_from_recipe(recipe.rewards)
    check_rewards_load(reward_fns)
    startup = StepTimer()
    with startup.span("ray_init"):
        start_ray(recipe)
    # The trainer ranks, the engines and the reward workers start at once, and the driver loads the data (tokenizer,
    # prompts) while they do: each waits mostly on its own process's imports (benchmarks/STARTUP.md).
    with startup.span("actors_launch"):
        trainer = TrainerGroup(recipe, algorithm.objective(), wait=False)
        actors.append(trainer)
        rollout = RolloutGroup(recipe, wait=False)
        actors.append(rollout)
        warm_reward_workers(reward_fns, recipe.rewards.max_concurrency)
    with startup.span("data"):
        data = load_run_data(recipe)
        algorithm.prepare(recipe, data)
        cursor = DataCursor(len(data.train_rows), recipe.seed, recipe.data.shuffle)
        metrics_log = MetricsLog(os.path.join(run_dir, "metrics.jsonl"))
        canary_ids = canary_prompt(data)
    with startup.span("actors"):
        trainer.wait_started()
        rollout.wait_started()
        algorithm.start(recipe, actors)
    with startup.span("first_eval_or_restore"):
        start_step = restore_state(recipe, resume_from, trainer, rollout, cursor, metrics_log, canary_ids)
        if not resume_from and data.eval_rows:
            metrics_log.write({"step": 0, **evaluate(recipe, rollout, reward_fns, data, run_dir, 0)})
    startup_s = time.time() - t_start

    r = recipe.rollout
    timer, nonfinite_steps, failing_steps = StepTimer(), 0, 0
    # One-step-off rollout: the next batch is generated in a driver thread while this step updates. The engines
    # run their calls in order, so that generation finishes (with the old weights) before the next weight sync.
    generator = concurrent.futures.ThreadPoolExecutor(max_workers=1, thread_name_prefix="posttrain-rollout")
    actors.append(generator)                                      # shut down with the actors, whatever happens
    pending = pending_from_checkpoint(resume_from)
    trainer.engines_busy = lambda: pending is not None and not pending.done()   # trainer.torch_threads 0

    def launch(step: int) -> concurrent.futures.Future:
        rows_idx = cursor.next_indices(r.prompts_per_step)       # drawn here, in order: the cursor stays exact
        seeds = [sampling_seed(recipe.seed, step, j) for j in range(len(rows_idx))]
        return generator.submit(generate_batch, rollout, recipe, rows_idx, seeds, data)
    bar = tqdm(range(start_step + 1, recipe.total_steps + 1), desc=recipe.name, unit="step", disable=not progress,
               initial=start_step, total=recipe.total_steps, dynamic_ncols=True)
    for step in bar:
        timer.start_step()
        # 1. prompts and rollouts -----------------------------------------------------------------------------
        with timer.span("rollout"):
            batch = (pending or launch(step)).result()
            pending = launch(step + 1) if r.async_steps and step < recipe.total_steps else None
        # 2. rewards ------------------------------------------------------------------------------------------
        with timer.span("reward"):
            samples = [reward_sample(data.train_rows[i], text) for i, text in zip(batch.row_index, batch.texts)]
            results = with_env_rewards(score_rewards(recipe, reward_fns, samples), batch.env_rewards)
            batch.rewards = torch.tensor([res["score"] for res in results], dtype=torch.float32)
        failing_steps = check_failing_rewards(recipe, run_dir, step, results, failing_steps)
        # 3. the algorithm's update (advantages or teacher scoring, then mini-batch optimizer steps) ------------
        update_metrics = algorithm.update(batch, trainer, timer)
        nonfinite_steps = nonfinite_steps + 1 if update_metrics.get("loss/nonfinite_skipped", 0) > 0 else 0
        if nonfinite_steps >= recipe.trainer.max_nonfinite_steps:
            raise StaleWeightsError(
                f"step {step}: the loss or gradient norm was not finite in {nonfinite_steps} steps in a row (the "
                f"updates were skipped, the weights are those of the last good step); check the rewards "
                f"(reward/ metrics) and the learning rate. The latest checkpoint is intact.")
        # 4. weight sync + canary -----------------------------------------------------------------------------
        with timer.span("sync"):
            engine_load_s, canary_diff = sync_weights(recipe, trainer, rollout, canary_ids, step)
        # 5. metrics ------------------------------------------------------------------------------------------
        n_tokens = sum(len(x) for x in batch.responses)
        record = {"step": step, **reward_metrics(results, [data.train_rows[i]["data_source"] for i in batch.row_index]),
                  **update_metrics, **timer.metrics(), "time/engine_load_s": engine_load_s,
                  "throughput/tokens_per_s": n_tokens / timer.elapsed(),
                  "throughput/rollout_tokens_per_s": n_tokens / timer.spans["rollout"],
                  "throughput/trainer_tokens_per_s": n_tokens * algorithm.epochs / timer.spans["update"],
                  "rollout/response_len_mean": n_tokens / len(batch.responses),
                  "rollout/truncated_frac": sum(f == "length" for f in batch.finish_reasons) / len(batch.responses),
                  "rollout/equal_reward_group_frac": equal_reward_group_frac(batch.rewards, batch.group_ids),
                  "rollout/canary_max_abs_diff": canary_diff, "data/epoch": cursor.epoch, **(batch.env_metrics or {})}
        # 6. evaluation and checkpoint ------------------------------------------------------------------------
        if data.eval_rows and ((recipe.data.eval_every and step % recipe.data.eval_every == 0)
                               or step == recipe.total_steps):
            record.update(evaluate(recipe, rollout, reward_fns, data, run_dir, step))
        metrics_log.write(record)
        if step % recipe.checkpoint.every == 0 or step == recipe.total_steps:
            # The batch in flight is part of the state: it was sampled from weights no checkpoint holds.
            save_checkpoint(recipe, run_dir, step, trainer, cursor, pending.result() if pending else None)
        bar.set_postfix(**algorithm.progress(record), reward=f"{record['reward/mean']:.3f}",
                        tok_s=f"{record['throughput/tokens_per_s']:.0f}",
                        **({"eval": f"{record['eval/reward/mean']:.3f}"} if "eval/reward/mean" in record else {}))
    bar.close()

    summary, records = finish_run(recipe, run_dir, trainer, metrics_log)
    return {**summary, **algorithm.summarize(records), "startup_s": startup_s,
            "startup_breakdown": {k.removeprefix("time/"): v for k, v in startup.metrics().items()
                                  if k.endswith("_s") and k != "time/step_s"},
            "wall_s": time.time() - t_start}


# ---------------------------------------------------------------------------------------------------------------
# The pieces of a step


def load_run_data(recipe: Recipe) -> RunData:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(recipe.model.path)
    train_rows = load_prompt_rows(recipe.data.train_files)
    eval_rows = load_prompt_rows(recipe.data.eval_files, max_rows=recipe.data.eval_max_prompts)
    train_mm, eval_mm = multimodal_prompts(train_rows, tokenizer), multimodal_prompts(eval_rows, tokenizer)
    return RunData(tokenizer, train_rows, eval_rows,
                   prepare_prompts(train_rows, tokenizer, recipe.data.max_prompt_tokens, "train", train_mm),
                   prepare_prompts(eval_rows, tokenizer, recipe.data.max_prompt_tokens, "eval", eval_mm),
                   train_mm, eval_mm)


def multimodal_prompts(rows: list[dict], tokenizer) -> list | None:
    """Rows with images/videos → MultimodalPrompt (media decoded once, here); None when no row has media."""
    from posttrain.vl.media import has_media, multimodal_prompt
    if not any(has_media(row) for row in rows):
        return None
    return [multimodal_prompt(tokenizer, row) if has_media(row) else None for row in rows]


def canary_prompt(data: RunData):
    """The weight-sync canary's fixed sequence: the first held-out prompt (with its image or video, if any) plus a
    stretch of ordinary tokens."""
    split = "eval" if data.eval_rows else "train"
    prompt = data.engine_prompts(split, [0])[0]
    tail = data.tokenizer("Answer: 12345", add_special_tokens=False)["input_ids"]
    if isinstance(prompt, list):
        return prompt + tail
    return dataclasses.replace(prompt, token_ids=list(prompt.token_ids) + tail)


def prepare_prompts(rows: list[dict], tokenizer, max_tokens: int, what: str, mm: list | None = None
                    ) -> list[list[int]]:
    ids = []
    for i, row in enumerate(rows):
        p = list(mm[i].token_ids) if mm and mm[i] is not None else encode_prompt(tokenizer, row["prompt"])
        if len(p) > max_tokens:
            raise DatasetError(f"{what} row {i + 1}: prompt is {len(p)} tokens, over data.max_prompt_tokens = "
                               f"{max_tokens}; shorten it or raise the limit")
        ids.append(p)
    return ids


def generate_batch(rollout: RolloutGroup, recipe: Recipe, rows_idx: list[int], seeds: list[int], data: RunData,
                   *, n: int | None = None, temperature: float | None = None) -> RolloutBatch:
    """n samples per prompt (default rollout.n): one engine call, or multi-turn episodes with the recipe's
    environment (seeds then seed each trajectory's turns)."""
    r = recipe.rollout
    n, temperature = n or r.n, r.temperature if temperature is None else temperature
    if recipe.environment:
        batch = generate_episodes(rollout, recipe, rows_idx, seeds, data, n=n, temperature=temperature)
    else:
        groups = rollout.generate(data.engine_prompts("train", rows_idx), seeds, n=n, temperature=temperature,
                                  top_p=r.top_p, max_tokens=r.max_tokens)
        batch = flatten_groups(rows_idx, groups, data.train_ids)
        if data.train_mm:
            batch.mm_prompts = [data.train_mm[i] for i in batch.row_index]
    batch.stale_steps, batch.max_importance_weight = r.async_steps, r.max_importance_weight
    return batch


def generate_episodes(rollout: RolloutGroup, recipe: Recipe, rows_idx: list[int], seeds: list[int], data: RunData,
                      *, n: int, temperature: float, rows: list[dict] | None = None) -> RolloutBatch:
    """Multi-turn rollouts (posttrain/rollout/multiturn.py): n environments per row, every live trajectory's next
    turn in one batched engine call per round, observations appended as token ids (never re-tokenised)."""
    from envs import make_env_group
    from posttrain.rollout.multiturn import (ChatRenderer, MultiTurnLimits, batch_metrics, engine_generate_fn,
                                             run_multiturn)
    e, rows = recipe.environment, rows or data.train_rows
    envs, traj_seeds, row_of, group_of = [], [], [], []
    for gid, (i, seed) in enumerate(zip(rows_idx, seeds)):
        envs += make_env_group(rows[i], n, e.name, e.kwargs)
        traj_seeds += [int(np.random.SeedSequence([seed, s]).generate_state(1)[0] & 0x7FFFFFFF) for s in range(n)]
        row_of += [i] * n
        group_of += [gid] * n
    limits = MultiTurnLimits(max_turns=e.max_turns, max_tokens_per_turn=e.max_tokens_per_turn,
                             max_completion_tokens=e.max_completion_tokens, max_context_tokens=e.max_context_tokens,
                             env_workers=e.env_workers)
    generate = engine_generate_fn(rollout.generate, temperature=temperature, top_p=recipe.rollout.top_p)
    trajectories = run_multiturn(envs, generate, ChatRenderer(data.tokenizer, chat_template_of(e)), traj_seeds,
                                 limits)
    return RolloutBatch(
        row_index=row_of, group_ids=torch.tensor(group_of), prompts=[t.prompt_ids for t in trajectories],
        responses=[t.completion_ids for t in trajectories], sampling_logprobs=[t.logprobs for t in trajectories],
        texts=[next((m["content"] for m in reversed(t.messages) if m["role"] == "assistant"), "")
               for t in trajectories],
        finish_reasons=["length" if t.end_reason not in (None, "done") else "stop" for t in trajectories],
        loss_masks=[t.loss_mask for t in trajectories], env_rewards=[t.reward for t in trajectories],
        env_metrics=batch_metrics(trajectories), trajectories=trajectories)


def chat_template_of(environment) -> str | None:
    """The environment's chat template: None (the tokenizer's), `toy`, or the text of a .jinja file."""
    if environment.chat_template is None:
        return None
    if environment.chat_template == "toy":
        from posttrain.toy.build import CHAT_TEMPLATE
        return CHAT_TEMPLATE
    with open(environment.chat_template) as f:
        return f.read()


def with_env_rewards(results: list[dict], env_rewards: list[float] | None) -> list[dict]:
    """The environment's reward joins each sample's reward as the component `env` (added to the functions' sum)."""
    if env_rewards is None:
        return results
    if not results:
        results = [{"score": 0.0, "components": {}, "failures": []} for _ in env_rewards]
    return [{**res, "score": res["score"] + reward, "components": {**res["components"], "env": reward}}
            for res, reward in zip(results, env_rewards)]


def flatten_groups(rows_idx: list[int], groups: list[list[dict]], prompt_ids: list[list[int]]) -> RolloutBatch:
    """The engine's [prompt][sample] output as one flat batch, in order (a group's samples stay together)."""
    flat = [(gid, i, s) for gid, (i, group) in enumerate(zip(rows_idx, groups)) for s in group]
    return RolloutBatch(row_index=[i for _, i, _ in flat], group_ids=torch.tensor([gid for gid, _, _ in flat]),
                        prompts=[prompt_ids[i] for _, i, _ in flat], responses=[s["token_ids"] for _, _, s in flat],
                        sampling_logprobs=[s["logprobs"] for _, _, s in flat], texts=[s["text"] for _, _, s in flat],
                        finish_reasons=[s["finish_reason"] for _, _, s in flat])


def reward_sample(row: dict, text: str) -> dict:
    return {"data_source": row["data_source"], "solution": text, "ground_truth": row["reward_model"]["ground_truth"],
            "extra_info": row["extra_info"]}


def score_rewards(recipe: Recipe, reward_fns, samples: list[dict]) -> list[dict]:
    """score_batch with the recipe's limits (`rewards.timeout_s`, `max_concurrency`, `samples_per_task`)."""
    r = recipe.rewards
    return score_batch(reward_fns, samples, timeout_s=r.timeout_s, max_concurrency=r.max_concurrency,
                       samples_per_task=r.samples_per_task)


def evaluate(recipe: Recipe, rollout: RolloutGroup, reward_fns, data: RunData, run_dir: str, step: int
             ) -> dict[str, float]:
    """Held-out reward: eval_n samples per prompt at eval_temperature with fixed seeds (the same every time, so
    evaluations differ only through the weights). Multi-turn runs also dump a few trajectories as text."""
    r = recipe.rollout
    seeds = [sampling_seed(recipe.seed, 0, i, stream=1) for i in range(len(data.eval_rows))]
    if recipe.environment:
        batch = generate_episodes(rollout, recipe, list(range(len(data.eval_rows))), seeds, data, n=r.eval_n,
                                  temperature=r.eval_temperature, rows=data.eval_rows)
        dump_trajectories(run_dir, step, batch.trajectories[:recipe.environment.dump_trajectories], data.tokenizer)
        pairs = [(data.eval_rows[i], text) for i, text in zip(batch.row_index, batch.texts)]
        results = with_env_rewards(score_rewards(recipe, reward_fns, [reward_sample(row, t) for row, t in pairs]),
                                   batch.env_rewards)
        return {**reward_metrics(results, [row["data_source"] for row, _ in pairs], prefix="eval/reward"),
                **{f"eval/{k}": v for k, v in batch.env_metrics.items()}}
    # vLLM clamps temperatures below 0.01; 0 means greedy there.
    groups = rollout.generate(data.engine_prompts("eval", range(len(data.eval_rows))), seeds, n=r.eval_n,
                              temperature=r.eval_temperature, top_p=1.0, max_tokens=r.max_tokens)
    pairs = [(row, s["text"]) for row, group in zip(data.eval_rows, groups) for s in group]
    results = score_rewards(recipe, reward_fns, [reward_sample(row, text) for row, text in pairs])
    return reward_metrics(results, [row["data_source"] for row, _ in pairs], prefix="eval/reward")


def dump_trajectories(run_dir: str, step: int, trajectories: list, tokenizer) -> None:
    """RUN_DIR/trajectories/step_NNNNNN.txt: whole trajectories as text, loss-free spans inside ⟦ ⟧."""
    if not trajectories:
        return
    from posttrain.rollout.multiturn import render_trajectory
    folder = os.path.join(run_dir, "trajectories")
    os.makedirs(folder, exist_ok=True)
    text = "\n\n".join(render_trajectory(t, tokenizer) for t in trajectories)
    ckpt.atomic_write_text(os.path.join(folder, f"step_{step:06d}.txt"), text + "\n")


def sync_weights(recipe: Recipe, trainer: TrainerGroup, rollout: RolloutGroup, canary_ids: list[int],
                 step: int) -> tuple[float, float]:
    """The trainer's weights into every engine (straight from the trainer through Ray's object store), then the
    canary. The trainer computes its side of the canary while the engines load. Returns (engine load s, canary
    max |Δ log p|)."""
    weights_ref, other_ranks = trainer.weights_ref()
    reference_refs = trainer.call_collective_async("canary_logprobs", canary_ids)   # queued after the weights
    engine_load_s = rollout.update_weights(weights_ref, step)
    ray.get(other_ranks)
    return engine_load_s, check_canary(recipe, trainer, rollout, canary_ids, step, ray.get(reference_refs)[0])


def check_canary(recipe: Recipe, trainer: TrainerGroup, rollout: RolloutGroup, canary_ids: list[int],
                 step: int, reference: list[float] | None = None) -> float:
    """Stale-weights checks after every sync: each engine reports the weights version it loaded, which must be
    `step` (exact in any dtype), and engine and trainer log-probs of a fixed sequence must agree (catches weights
    that arrived wrong: a bad name mapping, a partial load, non-finite values). A NaN anywhere fails it (NaN
    compares false with everything, so the test is `not diff <= tolerance`).
    reference: the trainer's log-probs, if already computed (else asked for here)."""
    for w, version in enumerate(rollout.weight_versions()):
        if version != step:
            raise StaleWeightsError(
                f"weight-sync check failed at step {step}: rollout worker {w} holds weights version {version}, the "
                f"trainer's are version {step}. The engine would generate with stale weights; the run stops rather "
                "than train on them.")
    reference = np.array(trainer.call_collective("canary_logprobs", canary_ids) if reference is None else reference)
    tolerance = canary_tolerance(recipe)
    worst = 0.0
    for w, engine_lp in enumerate(rollout.canary(canary_ids)):
        diff = float(np.max(np.abs(np.array(engine_lp) - reference)))
        worst = max(worst, diff)
        if not diff <= tolerance:
            raise StaleWeightsError(
                f"weight-sync canary failed at step {step}: rollout worker {w}'s log-probs differ from the "
                f"trainer's by {diff:.2e} (> rollout.canary_tolerance = {tolerance:g}; NaN "
                "means non-finite weights). The engine is generating with stale or corrupted weights; the run "
                "stops rather than train on them.")
    return worst


def check_failing_rewards(recipe: Recipe, run_dir: str, step: int, results: list[dict], failing_steps: int) -> int:
    """A reward that raises, hangs or crashes on most samples is loud at once (stderr and events.log) and stops
    the run after `rewards.max_failing_steps` such steps in a row. Returns the updated count of such steps."""
    failing = failing_rewards(results, recipe.rewards.max_failure_fraction)
    if not failing:
        return 0
    for f in failing:
        log_event(run_dir, f"step {step}: reward {f['reward']!r} FAILED on {f['failed']}/{f['applied']} samples "
                           f"({', '.join(f'{k}: {n}' for k, n in sorted(f['by_kind'].items()))}); they score 0")
    failing_steps += 1
    if failing_steps >= recipe.rewards.max_failing_steps:
        names = ", ".join(repr(f["reward"]) for f in failing)
        raise RewardsBroken(
            f"reward {names} failed on more than {recipe.rewards.max_failure_fraction:.0%} of its samples in "
            f"{failing_steps} steps in a row (rewards.max_failing_steps = {recipe.rewards.max_failing_steps}); "
            f"see {os.path.join(run_dir, 'events.log')} for the failure kinds, and check it with `posttrain score "
            f"--reward NAME` on a few completions. The latest checkpoint is intact.")
    return failing_steps


def equal_reward_group_frac(rewards: torch.Tensor, gids: torch.Tensor) -> float:
    groups = gids.unique()
    equal = sum(bool((rewards[gids == gid] == rewards[gids == gid][0]).all()) for gid in groups)
    return equal / max(len(groups), 1)


# ---------------------------------------------------------------------------------------------------------------
# Start, end, checkpoints, restarts


def finish_run(recipe: Recipe, run_dir: str, trainer: TrainerGroup, metrics_log: MetricsLog) -> tuple[dict, list]:
    """The end of every run: the model in Hugging Face format in RUN_DIR/final (written into a temporary folder
    and renamed, so a kill leaves no half-written final/), the reward curve, and the held-out reward before →
    after. Returns (summary, all metrics records)."""
    final_dir = os.path.join(run_dir, "final")
    partial = os.path.join(run_dir, f".final.tmp-{os.getpid()}")
    trainer.call_collective("save_hf", partial)
    ckpt.replace_dir(partial, final_dir)
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
    begin afresh. Returns the step to continue after."""
    if not resume_from:
        metrics_log.truncate_after(-1)  # a fresh start (or a restart before the first checkpoint)
        return 0
    state = ckpt.load_driver_state(resume_from)
    trainer.call_all("load_state", resume_from)
    cursor.load_state_dict(state["cursor"])
    start_step = state["step"]
    metrics_log.truncate_after(start_step)
    sync_weights(recipe, trainer, rollout, canary_ids, start_step)
    return start_step


def save_checkpoint(recipe: Recipe, run_dir: str, step: int, trainer: TrainerGroup, cursor: DataCursor,
                    pending: RolloutBatch | None = None) -> None:
    """Every rank writes its state into the temporary folder; the driver adds its own (and, with asynchronous
    rollout, the next step's batch, already sampled) and commits atomically."""
    tmp = ckpt.begin(run_dir, step)
    trainer.call_all("save_state", tmp)
    if pending is not None:
        with open(os.path.join(tmp, PENDING_BATCH), "wb") as f:
            pickle.dump(dataclasses.asdict(pending), f)
    driver_state = {"step": step, "cursor": cursor.state_dict(), "recipe_hash": recipe_hash(recipe),
                    "recipe": recipe_to_dict(recipe)}
    ckpt.commit(run_dir, tmp, step, driver_state, recipe.checkpoint.keep_last)


PENDING_BATCH = "pending_batch.pkl"


def pending_from_checkpoint(resume_from: str | None) -> concurrent.futures.Future | None:
    """The in-flight batch an asynchronous run saved with its checkpoint, as a finished future (None: none)."""
    path = os.path.join(resume_from, PENDING_BATCH) if resume_from else None
    if not path or not os.path.exists(path):
        return None
    with open(path, "rb") as f:
        done: concurrent.futures.Future = concurrent.futures.Future()
        done.set_result(RolloutBatch(**pickle.load(f)))
    return done


LOST_WORKER_ERRORS = (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError,
                      ray.exceptions.NodeDiedError, ray.exceptions.ObjectLostError,
                      ray.exceptions.ActorUnavailableError)


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
            log_event(run_dir, f"lost a Ray worker ({type(err).__name__}); restart {restarts}/"
                               f"{recipe.ray.max_restarts} from {where}")
            resume_from = latest
        except ActorStartError as err:
            raise RunInterrupted(str(err)) from None
        finally:
            for group in actors:
                group.shutdown()
            release_reward_servers()


def log_event(run_dir: str, message: str) -> None:
    line = f"[{time.strftime('%Y-%m-%d %H:%M:%S')}] {message}"
    print(line, file=sys.stderr, flush=True)
    with open(os.path.join(run_dir, "events.log"), "a") as f:
        f.write(line + "\n")
