"""The algorithms' trainer-side halves: what one micro-batch's loss is.

An objective is a small frozen (picklable: it travels to every trainer rank) object with one method,
`loss(rank, prompts, responses, arrays) -> (loss, metrics)`. `rank` gives the model passes (log-probs of a packed
batch, hidden states at the response positions, the LM head); `arrays` are the driver's per-sample inputs for
this micro-batch (numpy, first axis = sample). The math itself lives in posttrain.algorithms.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np
import torch

from posttrain.algorithms.topk import chunked_logprobs_at, chunked_token_logprobs


def _scatter_response_values(values: np.ndarray, prompts: list[list[int]], responses: list[list[int]],
                             like: torch.Tensor) -> torch.Tensor:
    """Per-response-token values [n, T] (row i valid for its first len(responses[i])) placed in the packed
    next-token layout [n, L-1] of pack_sequences: response token j of sequence i sits at P_i − 1 + j."""
    out = torch.zeros_like(like)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        out[i, len(p) - 1:len(p) - 1 + len(r)] = torch.as_tensor(values[i, :len(r)], device=like.device)
    return out


@dataclasses.dataclass(frozen=True)
class PolicyGradientObjective:
    """GSPO / GRPO: `policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=, clip_high=)`.

    arrays: old_logprobs [n,T] (π_old of each response token, 0-padded), advantages [n]."""
    policy_loss: Callable
    clip_low: float
    clip_high: float

    def loss(self, rank, prompts, responses, arrays):
        from posttrain.trainer.worker import pack_sequences

        batch = pack_sequences(prompts, responses, rank.pad_id)
        mask = batch["response_mask"].to(rank.device)                                              # [n,L-1]
        old = _scatter_response_values(arrays["old_logprobs"], prompts, responses, mask)           # [n,L-1]
        adv = torch.as_tensor(arrays["advantages"], dtype=torch.float32, device=rank.device)      # [n]
        return self.policy_loss(rank.logprobs(batch), old, adv, mask, clip_low=self.clip_low,
                                clip_high=self.clip_high)


@dataclasses.dataclass(frozen=True)
class MOPDObjective:
    """MOPD's per-candidate distillation loss (or the zero-gradient `keye_literal` ablation), with the optional
    GSPO RL mix. arrays (T = longest response of the mini-batch): cand_ids, cand_old_logprobs, cand_adv, cand_mask
    [n,T,k]; token_weights, sampled_old_logprobs, sampled_teacher_logprobs [n,T], optional gate [n,T]; loop_start
    [n]; optional outcome_advantages [n]."""
    clip_eps: float | None
    empty_overlap_fallback: bool
    repetition_penalty: float
    rl_alpha: float
    rl_clip_low: float
    rl_clip_high: float
    loss_form: str

    @property
    def needs_sampled_logprobs(self) -> bool:
        return (self.empty_overlap_fallback or self.repetition_penalty > 0 or self.rl_alpha > 0
                or self.loss_form == "keye_literal")

    def loss(self, rank, prompts, responses, arrays):
        from posttrain.algorithms.mopd import keye_literal_loss, mopd_loss

        def t(name, dtype=torch.float32):
            return torch.as_tensor(arrays[name], dtype=dtype, device=rank.device) if name in arrays else None

        T = arrays["cand_ids"].shape[1]
        chunk = rank.settings.logprob_chunk_size
        hidden, resp_ids, mask = rank.response_hidden(prompts, responses, T)
        cand_logprobs = chunked_logprobs_at(hidden, rank.lm_head_weight, t("cand_ids", torch.long), chunk)  # [n,T,k]
        sampled = (chunked_token_logprobs(hidden, rank.lm_head_weight, resp_ids, chunk)
                   if self.needs_sampled_logprobs else None)                                              # [n,T]
        if self.loss_form == "keye_literal":
            loss, metrics = keye_literal_loss(sampled, t("cand_adv"), t("token_weights"), mask, gate=t("gate"))
        else:
            loss, metrics = mopd_loss(
                cand_logprobs, t("cand_old_logprobs"), t("cand_adv"), t("cand_mask", torch.bool),
                t("token_weights"), mask, gate=t("gate"), clip_eps=self.clip_eps, sampled_logprobs=sampled,
                sampled_old_logprobs=t("sampled_old_logprobs"),
                sampled_teacher_logprobs=t("sampled_teacher_logprobs"),
                empty_overlap_fallback=self.empty_overlap_fallback, loop_start=t("loop_start", torch.long),
                repetition_penalty=self.repetition_penalty, rl_alpha=self.rl_alpha,
                outcome_advantages=t("outcome_advantages") if self.rl_alpha > 0 else None,
                rl_clip_low=self.rl_clip_low, rl_clip_high=self.rl_clip_high)
        # The optimised loss and its clip fraction; the diagnostics come from the driver at θ_old.
        renamed = {"mopd/loss": "loss/loss", "mopd/clip_frac": "loss/clip_frac",
                   "mopd_literal/loss": "loss/mopd_literal_loss"}
        return loss, {new: metrics[old] for old, new in renamed.items() if old in metrics}
