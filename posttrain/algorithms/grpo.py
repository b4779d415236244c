"""GRPO's token-level clipped objective (the PPO clip per token, DAPO's clip-higher bounds by default).

Differs from GSPO (posttrain.algorithms.gspo) only in the importance ratio: one ratio per *token*,
r_i,t = πθ(y_i,t) / π_old(y_i,t), instead of GSPO's length-normalised sequence ratio. Aggregation is the same
(token mean per sequence, then mean over sequences), so each sequence counts once whatever its length.
"""
from __future__ import annotations

import torch

from posttrain.algorithms.gspo import _MAX_LOG_RATIO


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor, mask: torch.Tensor,
              *, clip_low: float = 0.2, clip_high: float = 0.28) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO loss = −J, J = (1/N) Σ_i mean_t∈y_i min( r_i,t A_i , clip(r_i,t, 1−ε_low, 1+ε_high) A_i ).

    logprobs [N,T] (differentiable), old_logprobs [N,T] (detached), advantages [N], mask [N,T] (1 on policy
    tokens). Returns (loss scalar, metrics)."""
    if logprobs.shape != old_logprobs.shape or logprobs.shape != mask.shape:
        raise ValueError(f"logprobs {tuple(logprobs.shape)}, old_logprobs {tuple(old_logprobs.shape)} and mask "
                         f"{tuple(mask.shape)} must all be [N,T]")
    mask_f = mask.to(logprobs.dtype)
    log_ratio = ((logprobs - old_logprobs.detach()) * mask_f).clamp(max=_MAX_LOG_RATIO)            # [N,T]
    ratio = torch.exp(log_ratio)                                                                   # [N,T]
    adv = advantages.detach().to(logprobs.dtype).unsqueeze(-1)                                     # [N,1]
    unclipped = ratio * adv
    clipped = torch.clamp(ratio, 1.0 - clip_low, 1.0 + clip_high) * adv
    objective = torch.minimum(unclipped, clipped)                                                  # [N,T]
    lengths = mask_f.sum(-1)                                                                       # [N]
    has_tokens = (lengths > 0).to(logprobs.dtype)
    per_sequence = (objective * mask_f).sum(-1) / lengths.clamp(min=1.0)                           # [N]
    loss = -(per_sequence * has_tokens).sum() / has_tokens.sum().clamp(min=1.0)
    with torch.no_grad():
        n_tokens = mask_f.sum().clamp(min=1.0)
        metrics = {"loss/policy": float(loss.detach()),
                   "loss/clip_frac": float((((clipped < unclipped) & (mask_f > 0)).float().sum()) / n_tokens),
                   "loss/ratio_mean": float((ratio * mask_f).sum() / n_tokens)}
    return loss, metrics
