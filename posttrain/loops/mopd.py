"""The MOPD loop, top to bottom: prompts → student rollouts (vLLM) → rewards (logged; optional RL mix) →
routed teacher scoring (vLLM prompt log-probs, top-k) → π_old top-k → per-candidate advantages over the top-k
overlap → mini-batch updates → weight sync (+ canary) → metrics → evaluation → checkpoint.

The lockstep sibling of posttrain.loops.gspo (same seeds, checkpoint, resume, canary and evaluation). The math
is in posttrain.algorithms.mopd (ALGORITHMS.md §2.2); routing, teacher engines and the weight-swapping pool in
teachers/; the student-side passes in posttrain.trainer.mopd.

Each sample is routed to exactly ONE teacher by its row's `mopd.route_key` (default data_source); every row of
the train and eval sets is routed at start-up, so an unknown label stops the run before any engine starts.
A resumed run reloads trainer state, data cursor and step, pushes the checkpoint's weights into the rollout
engine and continues with the same per-prompt sampling seeds; the teacher pool holds no training state.
"""
from __future__ import annotations

import os
import statistics
import time

import numpy as np
import ray
import torch

from posttrain.algorithms.gspo import group_advantages
from posttrain.algorithms.mopd import mopd_loss, normalise_token_weights, overlap_advantages, train_inference_gate
from posttrain.algorithms.token_categories import (category_weights, label_token_categories, loop_starts,
                                                   token_strings_from_ids)
from posttrain.config import Recipe
from posttrain.data import DataCursor, load_prompt_rows
from posttrain.loops.gspo import (check_canary, evaluate, finish_run, prepare_prompts, restore_state,
                                  run_with_restarts, sampling_seed, save_checkpoint, score_rewards)
from posttrain.metrics import MetricsLog
from posttrain.orchestration import RolloutGroup, start_ray
from posttrain.reward_pool import check_rewards_load, reward_fns_from_recipe, reward_metrics
from teachers.scores import TeacherScores, padded


def mopd_batch(student: TeacherScores, teacher: TeacherScores, responses: list[list[int]], recipe: Recipe, *,
               rollout_logprobs: list[list[float]], token_weights_raw: list[list[float]] | None,
               loop_start: list[int], outcome_advantages: np.ndarray | None) -> dict[str, np.ndarray]:
    """Padded [N,T(,k)] arrays of one batch: candidates, π_old, teacher top-k → advantages, weights, gate.

    The advantages are computed here, once per step, at θ_old (they are detached by definition)."""
    m = recipe.mopd
    T = max(len(r) for r in responses)
    N = len(responses)
    seq = lambda scores, part: [scores.sequence(i)[part] for i in range(N)]  # noqa: E731
    cand_ids = torch.from_numpy(padded(seq(student, 0), T)).long()                       # [N,T,k] S_θ
    cand_old = torch.from_numpy(padded(seq(student, 1), T))                              # log π_old(S_θ)
    teacher_ids = torch.from_numpy(padded(seq(teacher, 0), T)).long()                    # [N,T,k] S_T
    # Padding rows: teacher ids −1 never match a student id, so padded positions have an empty Ω.
    teacher_ids[torch.from_numpy(padded([np.ones(len(r), bool) for r in responses], T)) == 0] = -1
    teacher_lp = torch.from_numpy(padded(seq(teacher, 1), T))
    cand_mask, cand_adv = overlap_advantages(cand_ids, cand_old, teacher_ids, teacher_lp)  # Ω and a_t(v)
    mask = torch.from_numpy(padded([np.ones(len(r), np.float32) for r in responses], T))
    sampled_old = torch.from_numpy(padded(seq(student, 2), T))                           # log π_old(y_t)
    sampled_teacher = torch.from_numpy(padded(seq(teacher, 2), T))                       # log π_T(y_t)
    token_weights = (normalise_token_weights(torch.from_numpy(padded(
        [np.asarray(w, np.float32) for w in token_weights_raw], T)), mask) if token_weights_raw is not None
        else torch.ones_like(mask))
    out = {"cand_ids": cand_ids.numpy(), "cand_old_logprobs": cand_old.numpy(), "cand_adv": cand_adv.numpy(),
           "cand_mask": cand_mask.numpy(), "token_weights": token_weights.numpy(),
           "sampled_old_logprobs": sampled_old.numpy(), "sampled_teacher_logprobs": sampled_teacher.numpy(),
           "loop_start": np.asarray(loop_start, np.int64), "mask": mask.numpy()}
    # log π_T at the candidates, for the teacher-mass-on-Ω metric only.
    same = cand_ids.unsqueeze(-1) == teacher_ids.unsqueeze(-2)
    out["cand_teacher_logprobs"] = torch.where(cand_mask, teacher_lp.gather(-1, same.to(torch.uint8).argmax(-1)),
                                               torch.zeros_like(cand_old)).numpy()
    if m.gate_low is not None:
        mu = torch.from_numpy(padded([np.asarray(lp, np.float32) for lp in rollout_logprobs], T))
        out["gate"] = train_inference_gate(sampled_old, mu, low=m.gate_low, high=m.gate_high).numpy()
    if outcome_advantages is not None:
        out["outcome_advantages"] = outcome_advantages.astype(np.float32)
    return out


def step_metrics(batch: dict[str, np.ndarray], recipe: Recipe, teacher_index: list[int], names: list[str]
                 ) -> dict[str, float]:
    """The batch's MOPD metrics at θ_old, overall and per teacher: mopd_loss evaluated with θ = θ_old."""
    m = recipe.mopd
    t = {k: torch.from_numpy(v) for k, v in batch.items()}
    _, metrics = mopd_loss(
        t["cand_old_logprobs"], t["cand_old_logprobs"], t["cand_adv"], t["cand_mask"], t["token_weights"], t["mask"],
        gate=t.get("gate"), sampled_logprobs=t["sampled_old_logprobs"], sampled_old_logprobs=t["sampled_old_logprobs"],
        sampled_teacher_logprobs=t["sampled_teacher_logprobs"], empty_overlap_fallback=m.empty_overlap_fallback,
        loop_start=t["loop_start"], repetition_penalty=m.repetition_penalty, cand_teacher_logprobs=t["cand_teacher_logprobs"],
        teacher_index=torch.tensor(teacher_index), teacher_names=names)
    # loss values at θ_old are not the optimised loss (that is loss/*, from the trainer); keep the diagnostics.
    return {k: v for k, v in metrics.items() if not k.startswith("mopd/loss")}


def run_mopd(recipe: Recipe, run_dir: str, resume_from: str | None = None, progress: bool = True) -> dict:
    return run_with_restarts(_mopd_attempt, recipe, run_dir, resume_from, progress)


def _mopd_attempt(recipe: Recipe, run_dir: str, resume_from: str | None, progress: bool, actors: list) -> dict:
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from posttrain.trainer.mopd import MOPDTrainerGroup
    from teachers.checks import check_teachers
    from teachers.pool import TeacherPool
    from teachers.routing import TeacherRouter

    t_start = time.time()
    m, r = recipe.mopd, recipe.rollout
    check_teachers(recipe)                                      # paths, tokenizer, vocabulary, architecture
    tokenizer = AutoTokenizer.from_pretrained(recipe.model.path)
    train_rows = load_prompt_rows(recipe.data.train_files)
    eval_rows = load_prompt_rows(recipe.data.eval_files)[:recipe.data.eval_max_prompts]
    router = TeacherRouter(m.teachers, m.route_key)
    train_teacher = router.route_rows(train_rows, "train")      # every row routed now: unknown labels fail here
    router.route_rows(eval_rows, "eval")
    train_ids = prepare_prompts(train_rows, tokenizer, recipe.data.max_prompt_tokens, "train")
    eval_ids = prepare_prompts(eval_rows, tokenizer, recipe.data.max_prompt_tokens, "eval")
    reward_fns = reward_fns_from_recipe(recipe.rewards)
    check_rewards_load(reward_fns)
    cursor = DataCursor(len(train_rows), recipe.seed, recipe.data.shuffle)
    metrics_log = MetricsLog(os.path.join(run_dir, "metrics.jsonl"))
    canary_ids = (eval_ids or train_ids)[0] + tokenizer("Answer: 12345", add_special_tokens=False)["input_ids"]
    special_ids = set(tokenizer.all_special_ids)

    timings = {"load_data_s": time.time() - t_start}
    t = time.time()
    start_ray(recipe)
    timings["ray_init_s"] = time.time() - t
    t = time.time()
    trainer = MOPDTrainerGroup(recipe)
    actors.append(trainer)
    rollout = RolloutGroup(recipe)
    actors.append(rollout)
    pool = TeacherPool(recipe)
    actors.append(pool)
    timings["actors_s"] = time.time() - t
    t = time.time()
    start_step = restore_state(recipe, resume_from, trainer, rollout, cursor, metrics_log, canary_ids)
    if not resume_from and eval_rows:
        metrics_log.write({"step": 0, **evaluate(recipe, rollout, reward_fns, eval_rows, eval_ids)})
    timings["first_eval_or_restore_s"] = time.time() - t
    startup_s = time.time() - t_start

    bar = tqdm(range(start_step + 1, recipe.total_steps + 1), desc=recipe.name, unit="step", disable=not progress,
               initial=start_step, total=recipe.total_steps, dynamic_ncols=True)
    for step in bar:
        t0 = time.perf_counter()
        # 1. prompts and student rollouts -------------------------------------------------------------------------
        rows_idx = cursor.next_indices(r.prompts_per_step)
        seeds = [sampling_seed(recipe.seed, step, j) for j in range(len(rows_idx))]
        groups = rollout.generate([train_ids[i] for i in rows_idx], seeds, n=r.n, temperature=r.temperature,
                                  top_p=r.top_p, max_tokens=r.max_tokens)
        prompts, responses, mu, group_ids, teacher_index, samples, sources = [], [], [], [], [], [], []
        for gid, (i, group) in enumerate(zip(rows_idx, groups)):
            row = train_rows[i]
            for s in group:
                prompts.append(train_ids[i])
                responses.append(s["token_ids"])
                mu.append(s["logprobs"])
                group_ids.append(gid)
                teacher_index.append(train_teacher[i])
                samples.append({"data_source": row["data_source"], "solution": s["text"],
                                "ground_truth": row["reward_model"]["ground_truth"], "extra_info": row["extra_info"]})
                sources.append(row["data_source"])
        t1 = time.perf_counter()
        # 2. rewards (logged; they enter the loss only through the optional RL mix α) -----------------------------
        results = score_rewards(recipe, reward_fns, samples)
        rewards = torch.tensor([res["score"] for res in results], dtype=torch.float32)
        t2 = time.perf_counter()
        # 3. routed teachers score the student's token ids (grouped by teacher, engines swap weights) -------------
        teacher_scores, teacher_metrics = pool.score(prompts, responses, teacher_index)
        t3 = time.perf_counter()
        # 4. π_old top-k, then per-candidate advantages over the overlap (pure functions) -------------------------
        student_scores = trainer.compute_old_topk(prompts, responses, m.top_k)
        raw_weights = None
        if m.category_weights:
            raw_weights = [category_weights(label_token_categories(
                token_strings_from_ids(resp, tokenizer.decode), special_token_mask=[x in special_ids for x in resp]),
                m.category_weights) for resp in responses]
        outcome_adv = (group_advantages(rewards, torch.tensor(group_ids), scale_by_std=recipe.gspo.scale_by_std,
                                        eps=recipe.gspo.eps).numpy() if m.rl_alpha > 0 else None)
        starts = loop_starts(responses, min_repeats=m.loop_min_repeats, min_loop_tokens=m.loop_min_tokens)
        # 5. mini-batch updates (whole prompt groups per mini-batch, in order) ------------------------------------
        update_metrics, batch_metrics = [], {}
        parts = np.array_split(np.arange(len(prompts)), m.mini_batches)
        for part in parts:
            idx = [int(k) for k in part]
            batch = mopd_batch(TeacherScores.from_sequences([student_scores.sequence(k) for k in idx], m.top_k),
                               TeacherScores.from_sequences([teacher_scores.sequence(k) for k in idx], m.top_k),
                               [responses[k] for k in idx], recipe, rollout_logprobs=[mu[k] for k in idx],
                               token_weights_raw=[raw_weights[k] for k in idx] if raw_weights else None,
                               loop_start=[starts[k] for k in idx],
                               outcome_advantages=outcome_adv[idx] if outcome_adv is not None else None)
            if len(parts) == 1:
                batch_metrics = step_metrics(batch, recipe, [teacher_index[k] for k in idx], router.names)
            batch.pop("cand_teacher_logprobs")
            batch.pop("mask")
            update_metrics.append(trainer.train_minibatch_mopd([prompts[k] for k in idx],
                                                               [responses[k] for k in idx], batch))
        if len(parts) > 1:  # metrics over the whole step's batch, not one mini-batch
            whole = mopd_batch(student_scores, teacher_scores, responses, recipe, rollout_logprobs=mu,
                               token_weights_raw=raw_weights, loop_start=starts, outcome_advantages=outcome_adv)
            batch_metrics = step_metrics(whole, recipe, teacher_index, router.names)
        t4 = time.perf_counter()
        # 6. weight sync + canary ---------------------------------------------------------------------------------
        sync_s = rollout.update_weights(ray.put(trainer.call_rank0("named_weights")), step)
        canary_diff = check_canary(recipe, trainer, rollout, canary_ids, step)
        t5 = time.perf_counter()
        # 7. metrics ----------------------------------------------------------------------------------------------
        n_tokens = sum(len(x) for x in responses)
        step_s = t5 - t0
        record = {"step": step, **reward_metrics(results, sources), **batch_metrics, **teacher_metrics,
                  "time/step_s": step_s, "time/rollout_s": t1 - t0, "time/reward_s": t2 - t1,
                  "time/teacher_s": t3 - t2, "time/update_s": t4 - t3, "time/sync_s": t5 - t4,
                  "time/engine_load_s": sync_s, "time/teacher_share": (t3 - t2) / step_s,
                  "throughput/tokens_per_s": n_tokens / step_s,
                  "rollout/response_len_mean": n_tokens / len(responses),
                  "rollout/truncated_frac": sum(s["finish_reason"] == "length" for g in groups for s in g) / len(responses),
                  "rollout/canary_max_abs_diff": canary_diff, "data/epoch": cursor.epoch}
        for key in update_metrics[0] if update_metrics else []:
            record[key] = float(np.mean([u[key] for u in update_metrics]))
        # 8. evaluation and checkpoint ----------------------------------------------------------------------------
        if eval_rows and ((recipe.data.eval_every and step % recipe.data.eval_every == 0) or step == recipe.total_steps):
            record.update(evaluate(recipe, rollout, reward_fns, eval_rows, eval_ids))
        metrics_log.write(record)
        if step % recipe.checkpoint.every == 0 or step == recipe.total_steps:
            save_checkpoint(recipe, run_dir, step, trainer, cursor)
        bar.set_postfix(rkl=f"{record['mopd/reverse_kl']:.3f}", reward=f"{record['reward/mean']:.3f}",
                        **({"eval": f"{record['eval/reward/mean']:.3f}"} if "eval/reward/mean" in record else {}))
    bar.close()

    summary, records = finish_run(recipe, run_dir, trainer, metrics_log)
    rkl = [rec["mopd/reverse_kl"] for rec in records if "mopd/reverse_kl" in rec]
    # One step's KL is one batch's; the summary compares means over the first and last tenth of the run
    # (at least 3 steps each) so that the fall is not a single lucky batch.
    window = max(3, len(rkl) // 10)
    return {**summary, "reverse_kl_first": statistics.fmean(rkl[:window]) if rkl else None,
            "reverse_kl_last": statistics.fmean(rkl[-window:]) if rkl else None, "reverse_kl_window": window,
            "startup_s": startup_s, "startup_breakdown": timings, "wall_s": time.time() - t_start}
