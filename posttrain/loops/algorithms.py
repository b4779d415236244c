"""Algorithms as small parts of the one loop (posttrain/loops/run.py), chosen by the recipe's `algorithm.type`.

Each part has three steps and two hooks for the console:
    prepare(recipe, data)          cheap checks before Ray starts (e.g. every row routed to a teacher)
    start(recipe, actors)          its own actors, appended to `actors` so the loop shuts them down
    update(batch, trainer, timer)  one rollout batch → optimizer steps; returns the step's metrics
    progress(record), summarize(records)
and `objective()`, the trainer-side loss it hands to the trainer ranks (posttrain/trainer/objectives.py).
Adding an algorithm = a class here + an entry in ALGORITHMS + its settings block in posttrain/config.py.
"""
from __future__ import annotations

import statistics

import numpy as np
import torch

from posttrain.algorithms.grpo import grpo_loss
from posttrain.algorithms.gspo import group_advantages, gspo_loss, truncated_importance_weights
from posttrain.orchestration import take_media
from posttrain.trainer.objectives import OLD_FROM_OWN_FORWARD, MOPDObjective, PolicyGradientObjective
from teachers.scores import TeacherScores, padded


def whole_group_minibatches(n_samples: int, mini_batches: int) -> list[list[int]]:
    """Contiguous, in-order mini-batches; the recipe check makes each hold whole prompt groups."""
    return [[int(k) for k in part] for part in np.array_split(np.arange(n_samples), mini_batches)]


class GSPO:
    """GSPO: group-normalised outcome advantages, π_old recomputed by the trainer, sequence-level clipped ratio
    (docs/algorithms.md §1)."""
    policy_loss = staticmethod(gspo_loss)

    def __init__(self, settings):
        self.settings = settings
        self.epochs = settings.epochs

    def objective(self):
        return PolicyGradientObjective(self.policy_loss, self.settings.clip_low, self.settings.clip_high)

    def prepare(self, recipe, data) -> None:
        pass

    def start(self, recipe, actors: list) -> None:
        pass

    def update(self, batch, trainer, timer) -> dict[str, float]:
        a = self.settings
        with timer.span("update"):
            advantages = group_advantages(batch.rewards, batch.group_ids, scale_by_std=a.scale_by_std, eps=a.eps)
            keep = set(range(len(batch.prompts)))
            if a.filter_equal_reward_groups:  # a group whose rewards are all equal carries no signal
                keep = {k for k in keep if bool((batch.rewards[batch.group_ids == batch.group_ids[k]]
                                                 != batch.rewards[k]).any())}
            media = trainer.share_media(batch.mm_prompts)   # the pixels travel once per step (a handle, not kept)
            parts = whole_group_minibatches(len(batch.prompts), a.mini_batches)
            # π_old is the weights at the start of the update. The first mini-batch that trains runs on exactly
            # those weights, so (synchronous rollout, one epoch) its π_old comes from its own forward, detached —
            # no separate pass for it; the others need π_old before any step (docs/algorithms.md §1.2).
            first = next(([k for k in part if k in keep] for part in parts if any(k in keep for k in part)), [])
            from_own_forward = set(first) if not batch.stale_steps and a.epochs == 1 else set()
            need = [k for k in range(len(batch.prompts)) if k not in from_own_forward]
            old_logprobs = dict(zip(need, trainer.compute_logprobs(                                  # π_old
                [batch.prompts[k] for k in need], [batch.responses[k] for k in need], take_media(media, need))
                if need else []))
            old_logprobs.update({k: [0.0] * len(batch.responses[k]) for k in from_own_forward})   # filled in the loss
            stale = {}
            if batch.stale_steps:   # sampled by μ, an older policy: reweight by π_old/μ (docs/algorithms.md §1.6)
                weights = importance_weights([old_logprobs[k] for k in range(len(batch.prompts))],
                                             batch.sampling_logprobs, batch.max_importance_weight, batch.loss_masks)
                advantages = advantages * weights
                stale = {"rollout/importance_weight_mean": float(weights.mean()),
                         "rollout/importance_weight_capped_frac":
                             float((weights >= batch.max_importance_weight).float().mean())}
            metrics = []
            for _epoch in range(a.epochs):
                for part in parts:
                    idx = [k for k in part if k in keep]
                    if not idx:
                        continue
                    T = max(len(batch.responses[k]) for k in idx)
                    arrays = {"old_logprobs": padded([np.asarray(old_logprobs[k], np.float32) for k in idx], T),
                              "advantages": advantages[idx].numpy()}
                    if from_own_forward:
                        arrays[OLD_FROM_OWN_FORWARD] = np.array([k in from_own_forward for k in idx])
                    if batch.loss_masks is not None:
                        arrays["loss_mask"] = loss_mask_array(batch.loss_masks, idx, T)
                    metrics.append(trainer.train_minibatch(
                        [batch.prompts[k] for k in idx], [batch.responses[k] for k in idx], arrays,
                        take_media(media, idx)))
        return {**mean_metrics(metrics), **stale}

    def progress(self, record: dict) -> dict[str, str]:
        return {}

    def summarize(self, records: list[dict]) -> dict:
        return {}


class GRPO(GSPO):
    """GRPO: GSPO's loop with a per-token clipped ratio (docs/algorithms.md §3). The whole difference is the loss."""
    policy_loss = staticmethod(grpo_loss)


class MOPD:
    """Multi-teacher on-policy distillation (docs/algorithms.md §2): each sample is routed to ONE teacher, which
    scores the student's own token ids; per-candidate advantages over the top-k overlap of student and teacher;
    rewards are logged and enter the loss only through the optional RL mix."""

    def __init__(self, settings):
        self.settings = settings
        self.epochs = 1

    def objective(self):
        return MOPDObjective(self.loss_settings())

    def loss_settings(self):
        from posttrain.algorithms.mopd import MOPDLossSettings
        m = self.settings
        return MOPDLossSettings(loss_form=m.loss_form, clip_eps=m.clip_eps,
                                empty_overlap_fallback=m.empty_overlap_fallback, rest_bucket=m.rest_bucket,
                                repetition_penalty=m.repetition_penalty, rl_alpha=m.rl_mix.alpha,
                                rl_clip_low=m.rl_mix.clip_low, rl_clip_high=m.rl_mix.clip_high)

    def prepare(self, recipe, data) -> None:
        from teachers.checks import check_teachers, check_teachers_see_media
        from teachers.routing import TeacherRouter

        check_teachers(recipe)                      # paths, tokenizer, vocabulary, engines for the architectures
        self.router = TeacherRouter(self.settings.teachers, self.settings.route_key)
        self.row_teacher = self.router.route_rows(data.train_rows, "train")   # unknown labels fail here
        eval_teacher = self.router.route_rows(data.eval_rows, "eval")
        # Rows with images or videos: their teacher must be a vision-language model (it scores with the media).
        check_teachers_see_media(self.settings.teachers, data.train_rows, self.row_teacher, "train")
        check_teachers_see_media(self.settings.teachers, data.eval_rows, eval_teacher, "eval")
        self.tokenizer = data.tokenizer

    def start(self, recipe, actors: list) -> None:
        from teachers.pool import TeacherPool
        self.pool = TeacherPool(recipe)
        actors.append(self.pool)

    def update(self, batch, trainer, timer) -> dict[str, float]:
        from posttrain.algorithms.token_categories import (category_weights, label_token_categories, loop_starts,
                                                           token_strings_from_ids)
        m = self.settings
        teacher_index = [self.row_teacher[i] for i in batch.row_index]
        # 1. routed teachers score the student's token ids, with the media (grouped by teacher, swaps) ---------
        with timer.span("teacher"):
            teacher_scores, teacher_metrics = self.pool.score(batch.prompts, batch.responses, teacher_index,
                                                              batch.mm_prompts)
        with timer.span("update"):
            # 2. π_old top-k; token weights, loop points and the optional RL-mix advantages (all at θ_old) -----
            media = trainer.share_media(batch.mm_prompts)   # the pixels travel once per step (a handle, not kept)
            student_scores = trainer.compute_topk(batch.prompts, batch.responses, m.top_k, media)
            raw_weights = None
            if m.category_weights:
                special = set(self.tokenizer.all_special_ids)
                raw_weights = [category_weights(label_token_categories(
                    token_strings_from_ids(resp, self.tokenizer.decode),
                    special_token_mask=[x in special for x in resp]), m.category_weights) for resp in batch.responses]
            outcome_adv = (group_advantages(batch.rewards, batch.group_ids, scale_by_std=m.rl_mix.scale_by_std,
                                            eps=m.rl_mix.eps).numpy() if m.rl_mix.alpha > 0 else None)
            starts = loop_starts(batch.responses, min_repeats=m.loop_min_repeats, min_loop_tokens=m.loop_min_tokens)

            def arrays_for(idx: list[int]) -> dict[str, np.ndarray]:
                arrays = mopd_batch(TeacherScores.from_sequences([student_scores.sequence(k) for k in idx], m.top_k),
                                  TeacherScores.from_sequences([teacher_scores.sequence(k) for k in idx], m.top_k),
                                  [batch.responses[k] for k in idx], m,
                                  rollout_logprobs=[batch.sampling_logprobs[k] for k in idx],
                                  token_weights_raw=[raw_weights[k] for k in idx] if raw_weights else None,
                                  loop_start=[starts[k] for k in idx],
                                  outcome_advantages=outcome_adv[idx] if outcome_adv is not None else None)
                if batch.loss_masks is not None:   # multi-turn: teachers scored everything, the student learns
                    arrays["loss_mask"] = loss_mask_array(batch.loss_masks, idx, arrays["mask"].shape[1])
                return arrays

            # 3. mini-batch updates (whole prompt groups per mini-batch, in order) ------------------------------
            every = list(range(len(batch.prompts)))
            whole = arrays_for(every)
            if "loss_mask" in whole:       # the diagnostics (reverse KL, overlap...) on the policy's own tokens
                whole["mask"] = whole["mask"] * whole.pop("loss_mask")
            diagnostics = step_metrics(whole, self.loss_settings(), teacher_index, self.router.names)
            updates = []
            for idx in whole_group_minibatches(len(batch.prompts), m.mini_batches):
                arrays = arrays_for(idx)
                for diagnostic_only in ("cand_teacher_logprobs", "rollout_logprobs", "mask"):   # not loss_mask
                    arrays.pop(diagnostic_only)
                updates.append(trainer.train_minibatch([batch.prompts[k] for k in idx],
                                                       [batch.responses[k] for k in idx], arrays,
                                                       take_media(media, idx)))
        return {**diagnostics, **teacher_metrics, **mean_metrics(updates)}

    def progress(self, record: dict) -> dict[str, str]:
        return {"rkl": f"{record['mopd/reverse_kl']:.3f}"}

    def summarize(self, records: list[dict]) -> dict:
        rkl = [rec["mopd/reverse_kl"] for rec in records if "mopd/reverse_kl" in rec]
        # One step's KL is one batch's; compare means over the first and last tenth of the run (at least 3 steps
        # each) so that the fall is not a single lucky batch.
        window = max(3, len(rkl) // 10)
        return {"reverse_kl_first": statistics.fmean(rkl[:window]) if rkl else None,
                "reverse_kl_last": statistics.fmean(rkl[-window:]) if rkl else None, "reverse_kl_window": window}


ALGORITHMS = {"gspo": GSPO, "grpo": GRPO, "mopd": MOPD}


def make_algorithm(recipe):
    return ALGORITHMS[recipe.algorithm.type](recipe.algorithm)


def importance_weights(old_logprobs: list[list[float]], behaviour_logprobs: list[list[float]], cap: float,
                       loss_masks: list[list[int]] | None = None) -> torch.Tensor:
    """truncated_importance_weights over ragged per-sample log-prob lists (policy tokens only) → [N]."""
    T = max(len(x) for x in old_logprobs)
    old = torch.from_numpy(padded([np.asarray(x, np.float32) for x in old_logprobs], T))
    mu = torch.from_numpy(padded([np.asarray(x, np.float32) for x in behaviour_logprobs], T))
    mask = torch.from_numpy(loss_mask_array(loss_masks, range(len(old_logprobs)), T) if loss_masks is not None
                            else padded([np.ones(len(x), np.float32) for x in old_logprobs], T))
    return truncated_importance_weights(old, mu, mask, cap)


def loss_mask_array(loss_masks: list[list[int]], idx, T: int) -> np.ndarray:
    """[len(idx), T] float32: 1 on policy-sampled tokens of multi-turn trajectories, 0 on observations/padding."""
    return padded([np.asarray(loss_masks[k], np.float32) for k in idx], T)


def mean_metrics(per_minibatch: list[dict[str, float]]) -> dict[str, float]:
    keys = per_minibatch[0] if per_minibatch else {}
    return {k: float(np.mean([m[k] for m in per_minibatch])) for k in keys}


# ---------------------------------------------------------------------------------------------------------------
# MOPD's per-batch arrays and diagnostics (pure functions of the scores)


def mopd_batch(student: TeacherScores, teacher: TeacherScores, responses: list[list[int]], m, *,
               rollout_logprobs: list[list[float]], token_weights_raw: list[list[float]] | None,
               loop_start: list[int], outcome_advantages: np.ndarray | None) -> dict[str, np.ndarray]:
    """Padded [N,T(,k)] arrays of one batch: candidates, π_old, teacher top-k → advantages, weights, gate.

    The advantages are computed here, once per step, at θ_old (they are detached by definition)."""
    from posttrain.algorithms.mopd import (candidate_advantages, normalise_token_weights, rest_bucket_advantage,
                                           teacher_logprobs_at_candidates, train_inference_gate)

    T = max(len(r) for r in responses)
    N = len(responses)
    seq = lambda scores, part: [scores.sequence(i)[part] for i in range(N)]  # noqa: E731
    cand_ids = torch.from_numpy(padded(seq(student, 0), T)).long()                       # [N,T,k] S_θ
    cand_old = torch.from_numpy(padded(seq(student, 1), T))                              # log π_old(S_θ)
    teacher_ids = torch.from_numpy(padded(seq(teacher, 0), T)).long()                    # [N,T,k] S_T
    # Padding rows: teacher ids −1 never match a student id, so padded positions have an empty Ω.
    teacher_ids[torch.from_numpy(padded([np.ones(len(r), bool) for r in responses], T)) == 0] = -1
    teacher_lp = torch.from_numpy(padded(seq(teacher, 1), T))
    # Ω and log π_T at the candidates (the advantages, the teacher-mass-on-Ω metric, the rest bucket), then a_t(v)
    cand_mask, cand_teacher = teacher_logprobs_at_candidates(cand_ids, teacher_ids, teacher_lp)
    cand_adv = candidate_advantages(cand_mask, cand_old, cand_teacher)
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
    out["cand_teacher_logprobs"] = cand_teacher.numpy()
    if m.rest_bucket:
        rest_old, rest_adv = rest_bucket_advantage(cand_mask, cand_old, cand_teacher)         # [N,T] each
        out["rest_old_logprobs"], out["rest_adv"] = rest_old.numpy(), rest_adv.numpy()
    mu = torch.from_numpy(padded([np.asarray(lp, np.float32) for lp in rollout_logprobs], T))   # μ(y_t)
    out["rollout_logprobs"] = mu.numpy()
    if m.gate_low is not None:
        out["gate"] = train_inference_gate(sampled_old, mu, low=m.gate_low, high=m.gate_high).numpy()
    if outcome_advantages is not None:
        out["outcome_advantages"] = outcome_advantages.astype(np.float32)
    return out


def step_metrics(arrays: dict[str, np.ndarray], settings, teacher_index: list[int], names: list[str]
                 ) -> dict[str, float]:
    """The batch's MOPD diagnostics at θ_old (overlap, reverse KL, gate, loops...), overall and per teacher."""
    from posttrain.algorithms.mopd import MOPDBatch, mopd_metrics

    batch = MOPDBatch.from_arrays({**arrays, "teacher_index": np.asarray(teacher_index)})
    return mopd_metrics(batch, settings, teacher_names=names)
