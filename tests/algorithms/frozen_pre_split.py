"""FROZEN copies of the loss and log-prob functions as they were before the MOPD loss was split into terms
(posttrain/algorithms/{mopd,gspo,logprobs}.py at commit 5280457). Test oracles only: tests/algorithms/test_mopd_math.py,
tests/algorithms/test_gspo.py and tests/algorithms/test_topk.py check that the new compositions give bitwise the same losses and
gradients. Do not edit (the point is that they do not change); delete once nothing compares against them.
"""
# flake8: noqa
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from posttrain.algorithms.mopd import per_teacher_metrics

_MAX_LOG_RATIO = 10.0


def _old_sequence_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log s_i = (1/|y_i|) Σ_t mask·(log πθ − log π_old).   [N,T] x3 → [N]"""
    mask = mask.to(logprobs.dtype)
    lengths = mask.sum(-1).clamp(min=1.0)
    return ((logprobs - old_logprobs) * mask).sum(-1) / lengths


def old_gspo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              *, clip_low: float = 3e-4, clip_high: float = 4e-4) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO loss = −J, J = (1/N) Σ_i  mean_t∈y_i  min( s_i,t A_i,t , clip(s_i,t, 1−ε_low, 1+ε_high) A_i,t ).

    logprobs [N,T] (differentiable, log πθ of the sampled tokens), old_logprobs [N,T] (π_old, detached),
    mask [N,T] (1 on policy-generated tokens), advantages [N] (sequence) or [N,T] (per token).

    Written in the GSPO-token form, s_i,t = sg[s_i] · πθ(y_i,t) / sg[πθ(y_i,t)]: its value is s_i at every
    token, and with A_i,t = A_i its gradient equals sequence-level GSPO's; it also accepts per-token advantages
    (MOPD mixed with outcome rewards). Each sequence counts once whatever its length (token mean per sequence,
    then mean over sequences).
    Returns (loss scalar, metrics dict of floats).
    """
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} and mask "
                         f"{tuple(mask.shape)} must all be [N,T]")
    mask_f = mask.to(logprobs.dtype)
    old_logprobs = old_logprobs.detach()
    log_seq_ratio = _old_sequence_log_ratio(logprobs, old_logprobs, mask_f).clamp(max=_MAX_LOG_RATIO)   # [N]
    # GSPO-token: value log s_i, gradient ∇log πθ(y_i,t) at every token.
    log_token_ratio = logprobs - logprobs.detach() + log_seq_ratio.detach().unsqueeze(-1)          # [N,T]
    ratio = torch.exp(log_token_ratio)                                                             # [N,T]
    adv = advantages.detach().to(logprobs.dtype)
    adv = adv.unsqueeze(-1).expand_as(ratio) if adv.ndim == 1 else adv                             # [N,T]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    objective = torch.minimum(unclipped, clipped)                                                  # [N,T]
    lengths = mask_f.sum(-1).clamp(min=1.0)
    per_sequence = (objective * mask_f).sum(-1) / lengths                                          # [N]
    has_tokens = (mask_f.sum(-1) > 0).to(logprobs.dtype)
    loss = -(per_sequence * has_tokens).sum() / has_tokens.sum().clamp(min=1.0)

    with torch.no_grad():
        seq_ratio = torch.exp(log_seq_ratio)
        # A token is clipped when the clipped branch is the active (smaller) one and differs from the unclipped.
        clipped_tok = (clipped < unclipped) & (mask_f > 0)
        seq_adv = (adv * mask_f).sum(-1) / lengths
        valid = has_tokens > 0
        n_valid = max(int(valid.sum()), 1)
        metrics = {
            "loss/policy": float(loss.detach()),
            "loss/clip_frac": float(clipped_tok.any(-1)[valid].float().sum() / n_valid),
            "loss/clip_frac_low": float(((seq_ratio < 1 - clip_low) & (seq_adv < 0))[valid].float().sum() / n_valid),
            "loss/clip_frac_high": float(((seq_ratio > 1 + clip_high) & (seq_adv > 0))[valid].float().sum() / n_valid),
            "loss/seq_ratio_mean": float(seq_ratio[valid].mean()) if valid.any() else 1.0,
            "loss/seq_ratio_max": float(seq_ratio[valid].max()) if valid.any() else 1.0,
        }
    return loss, metrics


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


def old_mopd_loss(cand_logprobs: torch.Tensor, cand_old_logprobs: torch.Tensor, cand_adv: torch.Tensor,
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
    """MOPD loss of docs/algorithms.md §2 (per-candidate form), with its optional terms. Returns (loss, metrics).

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
                                        s_i,t = sg[s_i]·πθ(y_t)/sg[πθ(y_t)]  (GSPO-token, docs/algorithms.md §1)
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


def old_keye_literal_loss(sampled_logprobs: torch.Tensor, cand_adv: torch.Tensor, token_weights: torch.Tensor | None,
                      mask: torch.Tensor, *, gate: torch.Tensor | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """ABLATION ONLY — the Keye-VL-2.0 report's formula taken literally. ZERO EXPECTED GRADIENT: do not train with it.

        Â_i,t = Σ_{v∈Ω} a_t(v)                                   (state-only, detached)
        L     = −(1/N) Σ_i (1/|M_i|) Σ_{t∈M_i} b·c·Â_i,t · log πθ(y_i,t)

    Â depends on the state, not on the sampled token, and E_{y~πθ}[∇ log πθ(y)] = 0, so the expected
    gradient is exactly zero: the student learns nothing from the teacher, only noise (docs/algorithms.md §2).
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


def old_token_logprobs_from_hidden(hidden: torch.Tensor, lm_head: torch.nn.Module, target_ids: torch.Tensor,
                               chunk_size: int = 1024) -> torch.Tensor:
    """log softmax(lm_head(hidden))[target]  at temperature 1.   hidden [N,T,H], target_ids [N,T] → [N,T]"""
    pieces = []
    for start in range(0, hidden.shape[1], chunk_size):
        logits = lm_head(hidden[:, start:start + chunk_size]).float()            # [N,c,V]
        targets = target_ids[:, start:start + chunk_size].unsqueeze(-1)          # [N,c,1]
        # log p(y) = logit(y) − logsumexp(logits): avoids keeping a full log-softmax tensor.
        picked = logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        pieces.append(picked)
    return torch.cat(pieces, dim=1)
