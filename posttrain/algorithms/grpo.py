"""GRPO's token-level clipped objective (the PPO clip per token, DAPO's clip-higher bounds by default).

Differs from GSPO (posttrain.algorithms.gspo) only in the importance ratio: one ratio per *token*,
r_i,t = πθ(y_i,t) / π_old(y_i,t), instead of GSPO's length-normalised sequence ratio. Aggregation is the same
(`gspo.sequence_mean`: token mean per sequence, then mean over sequences), so each sequence counts once whatever
its length. docs/algorithms.md §3.
"""
from __future__ import annotations

import torch

from posttrain.algorithms.gspo import clipped_ratio_objective, sequence_mean


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              *, clip_low: float = 0.2, clip_high: float = 0.28) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO loss = −J, J = (1/N) Σ_i mean_t∈y_i min( r_i,t A_i , clip(r_i,t, 1−ε_low, 1+ε_high) A_i ).

    logprobs [N,T] (differentiable), old_logprobs [N,T] (detached), advantages [N], mask [N,T] (1 on policy
    tokens). Returns (loss scalar, metrics)."""
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} and mask "
                         f"{tuple(mask.shape)} must all be [N,T]")
    mask_f = mask.to(logprobs.dtype)
    log_ratio = (logprobs - old_logprobs.detach()) * mask_f                                        # [N,T]
    adv = advantages.detach().to(logprobs.dtype).unsqueeze(-1).expand_as(log_ratio)               # [N,T]
    objective, clipped = clipped_ratio_objective(log_ratio, adv, clip_low, clip_high)             # [N,T]
    loss = -sequence_mean(objective, mask_f)
    with torch.no_grad():
        n_tokens = mask_f.sum().clamp(min=1.0)
        metrics = {"loss/policy": float(loss.detach()),
                   "loss/clip_frac": float((clipped & (mask_f > 0)).float().sum() / n_tokens),
                   "loss/ratio_mean": float((torch.exp(log_ratio) * mask_f).sum() / n_tokens)}
    return loss, metrics
