"""GSPO: Group Sequence Policy Optimization (Zheng et al., Qwen team, 2025) — docs/algorithms.md §1.

What it is: PPO-style clipped policy gradient whose importance ratio is the *per-sequence* geometric mean of
the token ratios, with GRPO group-normalised outcome advantages and no value model. Because the ratio is a
geometric mean over |y| tokens, the clip range is tiny (3e-4 / 4e-4) compared with PPO's 0.2.

The pieces are public because MOPD's RL mix (posttrain.algorithms.mopd) reuses them:
  sequence_log_ratio → gspo_token_log_ratio → clipped_ratio_objective → gspo_token_loss (per token)
  → sequence_mean.
`gspo_loss` composes them and adds the metrics.

Pure torch, no I/O. Shapes: N sequences, T padded response length.
"""
from __future__ import annotations

import math

import torch

# verl clamps the log-ratio before exp so that a wild sequence cannot overflow; the clip makes it irrelevant
# to the value of the objective whenever |log s| < 10.
_MAX_LOG_RATIO = 10.0


def group_advantages(rewards: torch.Tensor, group_ids: torch.Tensor, *, scale_by_std: bool = True,
                     eps: float = 1e-6) -> torch.Tensor:
    """GRPO outcome advantage per sequence.

        A_i = (r_i - mean_g(r)) / (std_g(r) + eps)      (scale_by_std=False: Dr.GRPO, no division)

    rewards: float[N]; group_ids: long[N] (equal id = same prompt). std is the *unbiased* group std (as verl);
    a singleton group gets mean 0 and std 1 (so A_i = r_i), as in verl. Groups with equal rewards get A = 0.
    Returns float[N].
    """
    if rewards.ndim != 1 or group_ids.shape != rewards.shape:
        raise ValueError(f"rewards and group_ids must both be [N]; got {tuple(rewards.shape)} and "
                         f"{tuple(group_ids.shape)}")
    rewards = rewards.to(torch.float64)
    _, group_index = torch.unique(group_ids, return_inverse=True)          # [N] in 0..G-1
    num_groups = int(group_index.max()) + 1 if rewards.numel() else 0
    counts = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_index, torch.ones_like(rewards))
    sums = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_index, rewards)
    means = sums / counts                                                    # [G]
    sq_dev = (rewards - means[group_index]) ** 2                             # [N]
    sq_sums = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, group_index, sq_dev)
    stds = torch.sqrt(sq_sums / (counts - 1).clamp(min=1))                   # [G] unbiased
    singleton = counts[group_index] == 1                                     # [N]
    group_mean = torch.where(singleton, torch.zeros_like(rewards), means[group_index])
    group_std = torch.where(singleton, torch.ones_like(rewards), stds[group_index])
    centred = rewards - group_mean
    advantages = centred / (group_std + eps) if scale_by_std else centred
    return advantages.to(torch.float32)


def truncated_importance_weights(old_logprobs: torch.Tensor, behaviour_logprobs: torch.Tensor, mask: torch.Tensor,
                                 cap: float) -> torch.Tensor:
    """Per-sequence importance weight of a batch sampled by an older policy μ (asynchronous rollout):

        w_i = min( exp( (1/|y_i|) Σ_t (log π_old(y_i,t) − log μ(y_i,t)) ), C )         [N,T] x3 → [N]

    length-normalised like GSPO's own ratio (a product over hundreds of tokens would explode), truncated at C
    (truncated IS: bounded variance, a small bias). Multiplying A_i by w_i ≥ 0 scales both branches of GSPO's
    min(s·A, clip(s)·A) alike, so it is exactly the importance-weighted objective."""
    return torch.exp(sequence_log_ratio(old_logprobs, behaviour_logprobs, mask)).clamp(max=cap)


def sequence_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log s_i = (1/|y_i|) Σ_t mask·(log πθ − log π_old).   [N,T] x3 → [N]"""
    mask = mask.to(logprobs.dtype)
    lengths = mask.sum(-1).clamp(min=1.0)
    return ((logprobs - old_logprobs) * mask).sum(-1) / lengths


def gspo_token_log_ratio(logprobs: torch.Tensor, old_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """GSPO-token:  log s_i,t = sg[log s_i] + log πθ(y_i,t) − sg[log πθ(y_i,t)].   [N,T] x3 → [N,T]

    Its value is log s_i at every token (clamped at 10 so that a wild sequence cannot overflow exp); its
    gradient is ∇log πθ(y_i,t), so with A_i,t = A_i the gradient equals sequence-level GSPO's.
    """
    log_seq_ratio = sequence_log_ratio(logprobs, old_logprobs.detach(), mask).clamp(max=_MAX_LOG_RATIO)   # [N]
    return logprobs - logprobs.detach() + log_seq_ratio.detach().unsqueeze(-1)                         # [N,T]


def clipped_ratio_objective(log_ratio: torch.Tensor, advantages: torch.Tensor, clip_low: float | None,
                            clip_high: float | None) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's pessimistic objective, elementwise:  min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A),  ρ = exp(log_ratio).

    log_ratio and advantages of one shape (e.g. [N,T] or [N,T,k]); a None bound is no bound on that side
    (both None: no clip). Returns (objective, clipped) where clipped marks the elements whose clipped branch
    is the active (smaller) one and differs from the unclipped.
    """
    ratio = torch.exp(log_ratio.clamp(max=_MAX_LOG_RATIO))
    unclipped = ratio * advantages
    if clip_low is None and clip_high is None:
        return unclipped, torch.zeros_like(unclipped, dtype=torch.bool)
    low = 1.0 - (clip_low if clip_low is not None else math.inf)
    high = 1.0 + (clip_high if clip_high is not None else math.inf)
    clipped = torch.clamp(ratio, min=low, max=high) * advantages
    return torch.minimum(unclipped, clipped), clipped < unclipped


def gspo_token_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                    mask: torch.Tensor, *, clip_low: float = 3e-4, clip_high: float = 4e-4) -> torch.Tensor:
    """Per-token GSPO loss  ℓ_i,t = −min( s_i,t A_i,t , clip(s_i,t, 1−ε_low, 1+ε_high) A_i,t ).   → [N,T]

    logprobs [N,T] (differentiable), old_logprobs [N,T] (π_old), mask [N,T], advantages [N] or [N,T].
    Aggregate with `sequence_mean`; positions outside the mask hold values that the mean ignores.
    """
    advantages = advantages.detach().to(logprobs.dtype)
    if advantages.ndim == 1:
        advantages = advantages.unsqueeze(-1).expand_as(logprobs)                                   # [N,T]
    objective, _ = clipped_ratio_objective(gspo_token_log_ratio(logprobs, old_logprobs, mask), advantages,
                                           clip_low, clip_high)
    return -objective


def sequence_mean(per_token: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(1/N') Σ_i (1/|M_i|) Σ_{t∈M_i} per_token[i,t]: each sequence counts once, whatever its length.  [N,T] → []

    N' counts the sequences with at least one masked token (a fully masked row carries nothing).
    """
    mask_f = mask.to(per_token.dtype)
    lengths = mask_f.sum(-1)                                                                   # [N]
    per_sequence = (per_token * mask_f).sum(-1) / lengths.clamp(min=1.0)                      # [N]
    has_tokens = (lengths > 0).to(per_token.dtype)
    return (per_sequence * has_tokens).sum() / has_tokens.sum().clamp(min=1.0)


def gspo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              *, clip_low: float = 3e-4, clip_high: float = 4e-4) -> tuple[torch.Tensor, dict[str, float]]:
    """GSPO loss = −J, J = (1/N) Σ_i  mean_t∈y_i  min( s_i,t A_i,t , clip(s_i,t, 1−ε_low, 1+ε_high) A_i,t ).

    logprobs [N,T] (differentiable, log πθ of the sampled tokens), old_logprobs [N,T] (π_old, detached),
    mask [N,T] (1 on policy-generated tokens), advantages [N] (sequence) or [N,T] (per token).

    Written in the GSPO-token form (`gspo_token_log_ratio`): its value is s_i at every token, and with
    A_i,t = A_i its gradient equals sequence-level GSPO's; it also accepts per-token advantages (MOPD mixed
    with outcome rewards). Each sequence counts once whatever its length (`sequence_mean`).
    Returns (loss scalar, metrics dict of floats).
    """
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} and mask "
                         f"{tuple(mask.shape)} must all be [N,T]")
    loss = sequence_mean(gspo_token_loss(logprobs, old_logprobs, advantages, mask, clip_low=clip_low,
                                         clip_high=clip_high), mask)
    return loss, gspo_metrics(logprobs, old_logprobs, advantages, mask, loss, clip_low=clip_low, clip_high=clip_high)


@torch.no_grad()
def gspo_metrics(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
                 loss: torch.Tensor, *, clip_low: float = 3e-4, clip_high: float = 4e-4) -> dict[str, float]:
    """The clip fractions and sequence-ratio statistics of one GSPO mini-batch (inputs as `gspo_loss`)."""
    mask_f = mask.to(logprobs.dtype)
    log_seq_ratio = sequence_log_ratio(logprobs, old_logprobs, mask_f).clamp(max=_MAX_LOG_RATIO)      # [N]
    adv = advantages.detach().to(logprobs.dtype)
    adv = adv.unsqueeze(-1).expand_as(logprobs) if adv.ndim == 1 else adv                          # [N,T]
    _, clipped = clipped_ratio_objective(gspo_token_log_ratio(logprobs, old_logprobs, mask_f), adv,
                                         clip_low, clip_high)
    seq_ratio = torch.exp(log_seq_ratio)
    lengths = mask_f.sum(-1).clamp(min=1.0)
    seq_adv = (adv * mask_f).sum(-1) / lengths
    valid = mask_f.sum(-1) > 0
    n_valid = max(int(valid.sum()), 1)
    # A sequence counts as clipped when any of its tokens takes the clipped branch.
    clipped_seq = (clipped & (mask_f > 0)).any(-1)
    return {
        "loss/policy": float(loss.detach()),
        "loss/clip_frac": float(clipped_seq[valid].float().sum() / n_valid),
        "loss/clip_frac_low": float(((seq_ratio < 1 - clip_low) & (seq_adv < 0))[valid].float().sum() / n_valid),
        "loss/clip_frac_high": float(((seq_ratio > 1 + clip_high) & (seq_adv > 0))[valid].float().sum() / n_valid),
        "loss/seq_ratio_mean": float(seq_ratio[valid].mean()) if valid.any() else 1.0,
        "loss/seq_ratio_max": float(seq_ratio[valid].max()) if valid.any() else 1.0,
    }
