"""MOPD: multi-teacher on-policy distillation, the pure math (ALGORITHMS.md §2).

What it is. The student samples y ~ πθ; the routed teacher π_T scores the same token ids and returns its
top-k. At each response position the candidates are the student's top-k ids (from π_old, the student at
the start of the update); Ω is the subset the teacher also ranks in its top-k. Each candidate in Ω gets

    π̄(v) = π_old(v) / Σ_{u∈Ω} π_old(u)            (detached; renormalised over Ω)
    δ(v) = log π_T(v) − log π_old(v)              (NOT renormalised: renormalising both sides makes k = 1
                                                   identically zero)
    a(v) = π̄(v) · δ(v)

and the loss keeps ONE TERM PER CANDIDATE:

    L = −(1/N) Σ_i (1/|M_i|) Σ_{t∈M_i} w_i,t Σ_{v∈Ω} a_t(v) · ρ_t(v),   ρ = exp(log πθ(v) − log π_old(v))

At θ = θ_old its gradient is the generalised KL on Ω divided by the detached student mass on Ω, so its only
stationary point is πθ = π_T on Ω (tests/test_mopd_math.py checks this identity).

How it differs from the Keye-VL-2.0 report. The report writes a state-only advantage Â_t = Σ_v a_t(v)
multiplied by ∇log πθ(y_t) of the sampled token; since E_{y~π}[∇log π(y)] = 0 that gradient has zero mean
and the student learns nothing from the teacher. That literal form is kept only as the labelled ablation
`keye_literal_loss`, documented as zero-gradient. Readings we chose where the report is silent:
  - b (undefined in the report) is the train/inference gate of GSPO's §1, IcePop-style bounds on
    π_old(y_t)/μ(y_t) of the sampled token (`train_inference_gate`); off by default.
  - c, the token-category weights, are normalised to mean 1 over the batch's masked tokens
    (`normalise_token_weights`); the report gives no values; all 1 by default.
  - Empty Ω: no distillation term (the report's choice); optional MiMo-style fallback on the sampled token
    with advantage sg[log π_T(y_t) − log π_old(y_t)].
  - Localised repetition penalty: for t ≥ τ_i (where the response starts looping) the distillation term is
    replaced by +λ_rep · b · log πθ(y_t) in the loss. Off by default (λ_rep = 0).
  - Optional RL mix: + α · (GSPO-token loss with the outcome advantage A_i); α = 0 by default.

Shapes: N sequences, T padded response length, k student top-k width, k_T teacher top-k width.
Everything is pure torch, no I/O. Metric keys carry the `mopd/` namespace of metrics.jsonl.
"""
from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch

# Ratios are exp(log πθ − log π_old); a wild candidate far outside the clip range could overflow exp.
# Same cap as gspo.py: it changes nothing while |log ρ| < 10.
_MAX_LOG_RATIO = 10.0

# ---------------------------------------------------------------------------------------------------------
# Advantages over the top-k overlap
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def teacher_logprobs_at_candidates(student_topk_ids: torch.Tensor, teacher_topk_ids: torch.Tensor,
                                   teacher_topk_logprobs: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Which student candidates the teacher also ranks, and the teacher's log-prob there.

    student_topk_ids [N,T,k]; teacher_topk_ids, teacher_topk_logprobs [N,T,k_T] (k_T may differ from k).
    Returns cand_mask [N,T,k] bool (v ∈ Ω = S_θ ∩ S_T) and cand_teacher_logprobs [N,T,k]
    (log π_T(v) for v ∈ Ω, 0 elsewhere).
    """
    if teacher_topk_ids.shape != teacher_topk_logprobs.shape:
        raise ValueError(f"teacher_topk_ids {tuple(teacher_topk_ids.shape)} and teacher_topk_logprobs "
                         f"{tuple(teacher_topk_logprobs.shape)} must have the same shape")
    if student_topk_ids.shape[:-1] != teacher_topk_ids.shape[:-1]:
        raise ValueError(f"student top-k {tuple(student_topk_ids.shape)} and teacher top-k "
                         f"{tuple(teacher_topk_ids.shape)} must share the [N,T] positions; the teacher scores "
                         "must be aligned token for token with the student's response")
    # same[N,T,k,k_T] = (student id j == teacher id l): k·k_T = 256 bytes per token at k = 16, the only
    # 4-D temporary (a float one would be 4× that on a batch of millions of tokens).
    same = student_topk_ids.unsqueeze(-1) == teacher_topk_ids.unsqueeze(-2)
    cand_mask = same.any(-1)                                                                # [N,T,k]
    teacher_slot = same.to(torch.uint8).argmax(-1)                                          # [N,T,k] l of the match
    teacher_lp = teacher_topk_logprobs.gather(-1, teacher_slot)                             # [N,T,k]
    cand_teacher_logprobs = torch.where(cand_mask, teacher_lp, torch.zeros_like(teacher_lp))
    return cand_mask, cand_teacher_logprobs


@torch.no_grad()
def candidate_advantages(cand_mask: torch.Tensor, cand_old_logprobs: torch.Tensor,
                         cand_teacher_logprobs: torch.Tensor) -> torch.Tensor:
    """a_t(v) = π̄(v) · δ(v) on Ω, 0 elsewhere.   All [N,T,k].

        π̄(v) = π_old(v) / Σ_{u∈Ω} π_old(u)     (softmax of log π_old restricted to Ω: stable in log space)
        δ(v) = log π_T(v) − log π_old(v)
    """
    neg_inf = torch.full_like(cand_old_logprobs, -math.inf)
    old_on_omega = torch.where(cand_mask, cand_old_logprobs, neg_inf)
    log_mass_on_omega = torch.logsumexp(old_on_omega, dim=-1, keepdim=True)               # [N,T,1]; −inf if Ω = ∅
    student_share = torch.exp(old_on_omega - log_mass_on_omega)                           # π̄ [N,T,k]
    delta = cand_teacher_logprobs - cand_old_logprobs                                      # δ [N,T,k]
    cand_adv = student_share * delta
    # Empty Ω gives −inf − (−inf) = NaN above; outside Ω the advantage is 0 by definition.
    return torch.where(cand_mask, cand_adv, torch.zeros_like(cand_adv))


@torch.no_grad()
def overlap_advantages(student_topk_ids: torch.Tensor, student_topk_logprobs: torch.Tensor,
                       teacher_topk_ids: torch.Tensor, teacher_topk_logprobs: torch.Tensor
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-candidate MOPD advantages over the top-k overlap (ALGORITHMS.md §2.2).

    student_topk_ids, student_topk_logprobs: [N,T,k], the student's top-k under π_old (the candidates, in
    the given order); teacher_topk_ids, teacher_topk_logprobs: [N,T,k_T], the routed teacher's top-k.
    Returns cand_mask [N,T,k] bool (v ∈ Ω) and cand_adv [N,T,k] = π̄(v)·(log π_T(v) − log π_old(v)) on Ω,
    0 elsewhere. Detached.
    """
    if student_topk_ids.shape != student_topk_logprobs.shape:
        raise ValueError(f"student_topk_ids {tuple(student_topk_ids.shape)} and student_topk_logprobs "
                         f"{tuple(student_topk_logprobs.shape)} must have the same shape")
    cand_mask, cand_teacher_logprobs = teacher_logprobs_at_candidates(
        student_topk_ids, teacher_topk_ids, teacher_topk_logprobs)
    cand_adv = candidate_advantages(cand_mask, student_topk_logprobs.detach(), cand_teacher_logprobs)
    return cand_mask, cand_adv


# ---------------------------------------------------------------------------------------------------------
# Token weights: the train/inference gate b and the category weights c
# ---------------------------------------------------------------------------------------------------------


@torch.no_grad()
def train_inference_gate(old_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, *,
                         low: float = 0.5, high: float = 2.0) -> torch.Tensor:
    """IcePop-style gate on the sampled token:  b[N,T] = 1[ low ≤ π_old(y_t) / μ(y_t) ≤ high ].

    old_logprobs: the trainer's log π_old(y_t); rollout_logprobs: the inference engine's sampling log-prob
    log μ(y_t) (same token ids). Tokens where trainer and engine disagree too much get weight 0.
    Returns float [N,T] of 0/1 in old_logprobs' dtype.
    """
    if not 0.0 < low <= 1.0 <= high:
        raise ValueError(f"gate bounds must satisfy 0 < low ≤ 1 ≤ high, got low={low}, high={high}")
    log_ratio = old_logprobs - rollout_logprobs                                            # log(π_old/μ)
    keep = (log_ratio >= math.log(low)) & (log_ratio <= math.log(high))
    return keep.to(old_logprobs.dtype)


@torch.no_grad()
def normalise_token_weights(raw_weights: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """c[N,T] = raw · (|M| / Σ_{masked} raw): mean 1 over the masked tokens of the batch.

    Normalising keeps the loss scale (and so the learning rate) independent of the chosen category weights;
    only their ratios matter. Values at unmasked positions are scaled too but never used.
    """
    if raw_weights.shape != mask.shape:
        raise ValueError(f"raw_weights {tuple(raw_weights.shape)} and mask {tuple(mask.shape)} must both be [N,T]")
    if bool((raw_weights < 0).any()):
        raise ValueError("token category weights must be ≥ 0")
    mask_f = mask.to(raw_weights.dtype)
    num_tokens = mask_f.sum()
    total = (raw_weights * mask_f).sum()
    if num_tokens == 0:
        return torch.ones_like(raw_weights)
    if total <= 0:
        raise ValueError("every masked token has category weight 0, so nothing would be trained; give at least "
                         "one category present in the batch a positive weight")
    return raw_weights * (num_tokens / total)


# ---------------------------------------------------------------------------------------------------------
# The loss
# ---------------------------------------------------------------------------------------------------------


def _masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    count = mask.sum()
    return float((values * mask).sum() / count) if count > 0 else 0.0


def _sequence_token_mean(per_token: torch.Tensor, mask_f: torch.Tensor) -> torch.Tensor:
    """(1/N') Σ_i (1/|M_i|) Σ_t per_token[i,t]: each sequence counts once whatever its length.

    N' counts sequences with at least one masked token (a fully masked row carries nothing; same as gspo.py).
    """
    lengths = mask_f.sum(-1)
    per_sequence = (per_token * mask_f).sum(-1) / lengths.clamp(min=1.0)                  # [N]
    has_tokens = (lengths > 0).to(per_token.dtype)
    return (per_sequence * has_tokens).sum() / has_tokens.sum().clamp(min=1.0)


def _ppo_objective(advantage: torch.Tensor, log_ratio: torch.Tensor, clip_low: float | None,
                   clip_high: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """min(ρ·a, clip(ρ, 1−ε_low, 1+ε_high)·a) and where the clipped branch is active.  Elementwise."""
    ratio = torch.exp(log_ratio.clamp(max=_MAX_LOG_RATIO))
    unclipped = ratio * advantage
    if clip_low is None and clip_high is None:
        return unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    low = 1.0 - (clip_low if clip_low is not None else math.inf)
    high = 1.0 + (clip_high if clip_high is not None else math.inf)
    clipped = torch.clamp(ratio, min=low, max=high) * advantage
    return torch.minimum(unclipped, clipped), clipped < unclipped


def _require(name: str, value, reason: str):
    if value is None:
        raise ValueError(f"mopd_loss: {name} is required when {reason}")
    return value


def mopd_loss(cand_logprobs: torch.Tensor, cand_old_logprobs: torch.Tensor, cand_adv: torch.Tensor,
              cand_mask: torch.Tensor, token_weights: torch.Tensor | None, mask: torch.Tensor, *,
              gate: torch.Tensor | None = None,
              clip_eps: float | None = None,
              sampled_logprobs: torch.Tensor | None = None,
              sampled_old_logprobs: torch.Tensor | None = None,
              sampled_teacher_logprobs: torch.Tensor | None = None,
              empty_overlap_fallback: bool = False,
              loop_start: torch.Tensor | None = None,
              repetition_penalty: float = 0.0,
              rl_alpha: float = 0.0,
              outcome_advantages: torch.Tensor | None = None,
              rl_clip_low: float = 3e-4,
              rl_clip_high: float = 4e-4,
              cand_teacher_logprobs: torch.Tensor | None = None,
              teacher_index: torch.Tensor | None = None,
              teacher_names: Sequence[str] | None = None,
              ) -> tuple[torch.Tensor, dict[str, float]]:
    """MOPD loss of ALGORITHMS.md §2.2 (per-candidate form), with its optional terms. Returns (loss, metrics).

    Required (the candidates are the student's top-k ids under π_old):
      cand_logprobs [N,T,k]      log πθ(v) at the candidates, differentiable (topk.chunked_logprobs_at)
      cand_old_logprobs [N,T,k]  log π_old(v) at the candidates (the student's top-k log-probs)
      cand_adv, cand_mask        from `overlap_advantages`
      token_weights [N,T]        c_i,t, the category weights (`normalise_token_weights`); None = all 1.
                                 (Passing the full w = b·c here with gate=None is equivalent for the
                                 distillation term, but then the gate metrics and the repetition term see b = 1.)
      mask [N,T]                 1 on policy-generated response tokens

    Per token t of sequence i, with w = b·c and ρ(v) = exp(log πθ(v) − log π_old(v)):
      distillation (t < τ_i, Ω ≠ ∅):   loss_t = −w · Σ_{v∈Ω} a(v)·ρ(v)
                                        (clip_eps: −w · Σ min(a·ρ, a·clip(ρ, 1−ε, 1+ε)), PPO per candidate)
      empty Ω, t < τ_i, fallback on:   loss_t = −w · A_y·ρ(y_t),  A_y = sg[log π_T(y_t) − log π_old(y_t)]
      repetition (t ≥ τ_i, λ_rep > 0):  loss_t = +λ_rep · b · log πθ(y_t)      (replaces distillation there)
      RL mix (α > 0, every t):          loss_t += −α · b · min(s_i,t A_i, clip(s_i,t, 1−ε_lo, 1+ε_hi) A_i),
                                        s_i,t = sg[s_i]·πθ(y_t)/sg[πθ(y_t)]  (GSPO-token, ALGORITHMS.md §1)
      loss = (1/N) Σ_i (1/|M_i|) Σ_{t∈M_i} loss_t

    Options (all off by default):
      gate [N,T]                  b_i,t from `train_inference_gate`; None = 1.
      clip_eps                    per-candidate PPO clip ε (None = no clip). At θ = θ_old nothing is clipped.
      sampled_logprobs [N,T]      log πθ(y_t), differentiable: needed by the fallback, repetition and RL terms.
      sampled_old_logprobs [N,T]  log π_old(y_t): needed by the fallback and RL terms and the reverse-KL metric.
      sampled_teacher_logprobs    log π_T(y_t) [N,T] (vLLM's prompt_logprobs returns it next to the top-k):
                                  needed by the fallback and the reverse-KL metric.
      empty_overlap_fallback      use the sampled-token reverse-KL advantage where Ω is empty.
      loop_start [N] long         τ_i (token_categories.find_loop_start); τ_i ≥ T or τ_i < 0 means no loop.
      repetition_penalty          λ_rep ≥ 0; with 0, loop_start only feeds the metrics.
      rl_alpha, outcome_advantages [N]   α and the GSPO outcome advantage A_i (gspo.group_advantages).
      rl_clip_low, rl_clip_high   GSPO's clip range for the RL term.
      cand_teacher_logprobs [N,T,k]      only for the teacher-mass-on-Ω metric.
      teacher_index [N] long, teacher_names   per-teacher metrics (`per_teacher_metrics`).
    """
    num_seqs, num_tokens, k = cand_logprobs.shape
    for name, tensor in (("cand_old_logprobs", cand_old_logprobs), ("cand_adv", cand_adv), ("cand_mask", cand_mask)):
        if tensor.shape != cand_logprobs.shape:
            raise ValueError(f"{name} {tuple(tensor.shape)} must match cand_logprobs {tuple(cand_logprobs.shape)}")
    if mask.shape != (num_seqs, num_tokens):
        raise ValueError(f"mask {tuple(mask.shape)} must be [N,T] = {(num_seqs, num_tokens)}")
    dtype = cand_logprobs.dtype
    mask_f = mask.to(dtype)
    category_weight = torch.ones_like(mask_f) if token_weights is None else token_weights.detach().to(dtype)
    gate_b = torch.ones_like(mask_f) if gate is None else gate.detach().to(dtype)
    weight = gate_b * category_weight                                                    # w = b·c [N,T]
    cand_mask = cand_mask.bool()
    cand_old = cand_old_logprobs.detach().to(dtype)
    cand_adv = cand_adv.detach().to(dtype)

    # Distillation: one term per candidate in Ω.  cand_obj[N,T,k] = a(v)·ρ(v) (or its PPO-clipped min).
    # Outside Ω the log-ratio is zeroed before exp so that no inf/NaN can leak into the gradient.
    cand_log_ratio = torch.where(cand_mask, cand_logprobs - cand_old, torch.zeros_like(cand_old))
    if clip_eps is not None and not clip_eps > 0:
        raise ValueError(f"clip_eps must be > 0 (or None for no clip), got {clip_eps}")
    clip = clip_eps
    cand_obj, cand_clipped = _ppo_objective(cand_adv, cand_log_ratio, clip, clip)
    cand_obj = torch.where(cand_mask, cand_obj, torch.zeros_like(cand_obj))
    distill_obj = cand_obj.sum(-1)                                                       # [N,T]
    empty_omega = ~cand_mask.any(-1)                                                     # [N,T]

    # Where the response loops (t ≥ τ_i), distillation gives way to the repetition penalty.
    positions = torch.arange(num_tokens, device=mask.device)
    past_loop = torch.zeros_like(mask_f, dtype=torch.bool)
    if loop_start is not None:
        if loop_start.shape != (num_seqs,):
            raise ValueError(f"loop_start must be [N] = ({num_seqs},), got {tuple(loop_start.shape)}")
        starts = loop_start.to(positions.device).long()
        past_loop = (positions.unsqueeze(0) >= starts.unsqueeze(-1)) & (starts >= 0).unsqueeze(-1)
    penalise_loop = repetition_penalty > 0 and loop_start is not None
    if repetition_penalty < 0:
        raise ValueError(f"repetition_penalty must be ≥ 0 (it pushes looping tokens down), got {repetition_penalty}")
    distill_active = ~past_loop if penalise_loop else torch.ones_like(past_loop)

    distill_loss_tok = -weight * torch.where(distill_active, distill_obj, torch.zeros_like(distill_obj))

    fallback_loss_tok = torch.zeros_like(mask_f)
    fallback_used = torch.zeros_like(past_loop)
    if empty_overlap_fallback:
        reason = "empty_overlap_fallback=True"
        lp_y = _require("sampled_logprobs", sampled_logprobs, reason)
        old_y = _require("sampled_old_logprobs", sampled_old_logprobs, reason).detach().to(dtype)
        teacher_y = _require("sampled_teacher_logprobs", sampled_teacher_logprobs, reason).detach().to(dtype)
        fallback_used = empty_omega & distill_active
        fallback_adv = torch.where(fallback_used, teacher_y - old_y, torch.zeros_like(old_y))   # A_y [N,T]
        fallback_log_ratio = torch.where(fallback_used, lp_y - old_y, torch.zeros_like(old_y))
        fallback_obj, _ = _ppo_objective(fallback_adv, fallback_log_ratio, clip, clip)
        fallback_loss_tok = -weight * torch.where(fallback_used, fallback_obj, torch.zeros_like(fallback_obj))

    repetition_loss_tok = torch.zeros_like(mask_f)
    if penalise_loop:
        lp_y = _require("sampled_logprobs", sampled_logprobs, "repetition_penalty > 0")
        # +λ_rep · b · log πθ(y_t): minimising it lowers the probability of the looping tokens.
        repetition_loss_tok = torch.where(past_loop, repetition_penalty * gate_b * lp_y, torch.zeros_like(mask_f))

    rl_loss_tok = torch.zeros_like(mask_f)
    rl_clipped = torch.zeros_like(past_loop)
    if rl_alpha < 0:
        raise ValueError(f"rl_alpha must be ≥ 0, got {rl_alpha}")
    if rl_alpha > 0:
        reason = "rl_alpha > 0"
        lp_y = _require("sampled_logprobs", sampled_logprobs, reason)
        old_y = _require("sampled_old_logprobs", sampled_old_logprobs, reason).detach().to(dtype)
        adv_i = _require("outcome_advantages", outcome_advantages, reason).detach().to(dtype)
        if adv_i.shape != (num_seqs,):
            raise ValueError(f"outcome_advantages must be [N] = ({num_seqs},), got {tuple(adv_i.shape)}")
        # GSPO-token: log s_i,t = sg[log s_i] + log πθ(y_t) − sg[log πθ(y_t)]; value s_i, per-token gradient.
        log_seq_ratio = ((lp_y - old_y) * mask_f).sum(-1) / mask_f.sum(-1).clamp(min=1.0)   # [N]
        log_token_ratio = lp_y - lp_y.detach() + log_seq_ratio.detach().unsqueeze(-1)       # [N,T]
        rl_obj, rl_clipped = _ppo_objective(adv_i.unsqueeze(-1).expand_as(mask_f), log_token_ratio,
                                            rl_clip_low, rl_clip_high)
        rl_loss_tok = -rl_alpha * gate_b * rl_obj

    loss_tok = distill_loss_tok + fallback_loss_tok + repetition_loss_tok + rl_loss_tok   # [N,T]
    loss = _sequence_token_mean(loss_tok, mask_f)

    with torch.no_grad():
        valid = mask_f > 0
        cand_valid = cand_mask & valid.unsqueeze(-1)
        old_probs = torch.exp(cand_old)
        per_token = {
            "overlap_ratio": cand_mask.to(dtype).sum(-1) / k,                            # |Ω|/k
            "empty_overlap_frac": empty_omega.to(dtype),
            "student_mass_on_overlap": torch.where(cand_mask, old_probs, torch.zeros_like(old_probs)).sum(-1),
            "adv_mean": cand_adv.sum(-1),                                                 # the report's Â_t
        }
        if cand_teacher_logprobs is not None:
            teacher_probs = torch.exp(cand_teacher_logprobs.detach().to(dtype))
            per_token["teacher_mass_on_overlap"] = torch.where(
                cand_mask, teacher_probs, torch.zeros_like(teacher_probs)).sum(-1)
        if sampled_old_logprobs is not None and sampled_teacher_logprobs is not None:
            # sg[log π_old(y_t) − log π_T(y_t)]: single-sample estimate of KL(π_old ‖ π_T); should fall.
            per_token["reverse_kl"] = (sampled_old_logprobs.detach() - sampled_teacher_logprobs.detach()).to(dtype)

        metrics = {f"mopd/{name}": _masked_mean(value, mask_f) for name, value in per_token.items()}
        seq_has_tokens = valid.any(-1)
        num_valid_seqs = max(int(seq_has_tokens.sum()), 1)
        metrics.update({
            "mopd/loss": float(loss.detach()),
            "mopd/loss_distill": float(_sequence_token_mean(distill_loss_tok + fallback_loss_tok, mask_f)),
            "mopd/loss_repetition": float(_sequence_token_mean(repetition_loss_tok, mask_f)),
            "mopd/loss_rl": float(_sequence_token_mean(rl_loss_tok, mask_f)),
            "mopd/gate_drop_frac": _masked_mean((gate_b == 0).to(dtype), mask_f),
            "mopd/clip_frac": (float((cand_clipped & cand_valid).sum() / cand_valid.sum())
                               if cand_valid.any() else 0.0),
            "mopd/fallback_token_frac": _masked_mean(fallback_used.to(dtype), mask_f),
            "mopd/loop_token_frac": _masked_mean(past_loop.to(dtype), mask_f),
            # a sequence is "past τ" when at least one of its response tokens lies at or after τ_i
            "mopd/loop_seq_frac": float((past_loop & valid).any(-1).sum()) / num_valid_seqs,
            "mopd/weight_mean": _masked_mean(weight, mask_f),
        })
        if rl_alpha > 0:
            metrics["mopd/rl_clip_frac"] = _masked_mean(rl_clipped.to(dtype), mask_f)
        if teacher_index is not None:
            metrics.update(per_teacher_metrics(per_token, mask_f, teacher_index, teacher_names))
    return loss, metrics


def per_teacher_metrics(per_token: Mapping[str, torch.Tensor], mask: torch.Tensor, teacher_index: torch.Tensor,
                        teacher_names: Sequence[str] | None = None, prefix: str = "mopd/") -> dict[str, float]:
    """Token means of each per-token quantity, split by the teacher each sequence was routed to.

    per_token: name → [N,T] (e.g. "reverse_kl", "adv_mean", "overlap_ratio"); mask [N,T];
    teacher_index long [N] (position in teacher_names; ids are used as names when teacher_names is None).
    Returns {f"{prefix}{name}/{teacher}": mean over that teacher's masked tokens} plus
    {f"{prefix}token_share/{teacher}": its share of the batch's masked tokens}. Teachers with no token in
    the batch are left out (a 0 would read as a measurement).
    """
    if teacher_index.shape != mask.shape[:1]:
        raise ValueError(f"teacher_index must be [N] = ({mask.shape[0]},), got {tuple(teacher_index.shape)}")
    mask_f = mask.to(torch.float64)
    total_tokens = float(mask_f.sum())
    metrics: dict[str, float] = {}
    for index in sorted({int(i) for i in teacher_index.tolist()}):
        if teacher_names is not None:
            if not 0 <= index < len(teacher_names):
                raise ValueError(f"teacher_index {index} is outside teacher_names (length {len(teacher_names)})")
            name = teacher_names[index]
        else:
            name = str(index)
        rows = (teacher_index == index).to(mask_f.device)
        teacher_mask = mask_f * rows.unsqueeze(-1).to(mask_f.dtype)
        count = float(teacher_mask.sum())
        if count == 0:
            continue
        metrics[f"{prefix}token_share/{name}"] = count / total_tokens
        for key, values in per_token.items():
            metrics[f"{prefix}{key}/{name}"] = float((values.to(torch.float64) * teacher_mask).sum() / count)
    return metrics


# ---------------------------------------------------------------------------------------------------------
# Ablation only
# ---------------------------------------------------------------------------------------------------------


def keye_literal_loss(sampled_logprobs: torch.Tensor, cand_adv: torch.Tensor, token_weights: torch.Tensor | None,
                      mask: torch.Tensor, *, gate: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """ABLATION ONLY — the Keye-VL-2.0 report's formula taken literally. ZERO EXPECTED GRADIENT: do not train with it.

        Â_i,t = Σ_{v∈Ω} a_t(v)                                   (state-only, detached)
        L     = −(1/N) Σ_i (1/|M_i|) Σ_{t∈M_i} b·c·Â_i,t · log πθ(y_i,t)

    Â depends on the state, not on the sampled token, and E_{y~πθ}[∇ log πθ(y)] = 0, so the expected
    gradient is exactly zero: the student learns nothing from the teacher, only noise (ALGORITHMS.md §2.1).
    Kept to reproduce that finding; `mopd_loss` is the objective to use.
    sampled_logprobs [N,T] differentiable; cand_adv [N,T,k]; token_weights, mask, gate [N,T].
    """
    dtype = sampled_logprobs.dtype
    mask_f = mask.to(dtype)
    weight = torch.ones_like(mask_f) if token_weights is None else token_weights.detach().to(dtype)
    if gate is not None:
        weight = weight * gate.detach().to(dtype)
    state_adv = cand_adv.detach().to(dtype).sum(-1)                                        # Â [N,T]
    loss = _sequence_token_mean(-weight * state_adv * sampled_logprobs, mask_f)
    return loss, {"mopd_literal/loss": float(loss.detach()), "mopd_literal/adv_mean": _masked_mean(state_adv, mask_f)}
