"""The algorithms' trainer-side halves: what one micro-batch's loss is.

An objective is a small frozen (picklable: it travels to every trainer rank) object with one method,
`loss(rank, prompts, responses, arrays) -> (loss, metrics)`. `rank` gives the model passes (log-probs of a packed
batch, hidden states at the response positions, the LM head); `arrays` are the driver's per-sample inputs for
this micro-batch (numpy, first axis = sample). The math itself lives in posttrain.algorithms.
"""
from __future__ import annotations

import dataclasses
from typing import TYPE_CHECKING, Callable

import numpy as np
import torch

from posttrain.algorithms.topk import chunked_logprobs_at, chunked_token_logprobs

if TYPE_CHECKING:
    from posttrain.algorithms.mopd import MOPDLossSettings


def _scatter_response_values(values: np.ndarray, prompt_lens: list[int], responses: list[list[int]],
                             like: torch.Tensor) -> torch.Tensor:
    """Per-response-token values [n, T] (row i valid for its first len(responses[i])) placed in the packed
    next-token layout [n, L-1] of pack_sequences: response token j of sequence i sits at P_i − 1 + j."""
    out = torch.zeros_like(like)
    for i, (p_len, r) in enumerate(zip(prompt_lens, responses)):
        out[i, p_len - 1:p_len - 1 + len(r)] = torch.as_tensor(values[i, :len(r)], device=like.device)
    return out


# arrays key (bool [n]): this sequence's π_old is the training forward's own log-probs, detached (GSPO.update).
OLD_FROM_OWN_FORWARD = "old_from_own_forward"


@dataclasses.dataclass(frozen=True)
class PolicyGradientObjective:
    """GSPO / GRPO: `policy_loss(logprobs, old_logprobs, advantages, mask, clip_low=, clip_high=)`.

    arrays: old_logprobs [n,T] (π_old of each response token, 0-padded), advantages [n], for multi-turn
    trajectories loss_mask [n,T] (1 on policy-sampled tokens: observations carry no loss), and optionally
    OLD_FROM_OWN_FORWARD [n] (bool): sequences whose π_old is this forward's log-probs, detached — the step's first
    mini-batch, which runs on the very weights π_old denotes (no separate π_old pass for it)."""
    policy_loss: Callable
    clip_low: float
    clip_high: float

    def loss(self, rank, prompts, responses, arrays, mm_prompts=None):
        batch, prompt_lens = rank.pack(prompts, responses, mm_prompts)
        mask = batch["response_mask"].to(rank.device)                                              # [n,L-1]
        if "loss_mask" in arrays:
            mask = mask * _scatter_response_values(arrays["loss_mask"], prompt_lens, responses, mask)
        old = _scatter_response_values(arrays["old_logprobs"], prompt_lens, responses, mask)       # [n,L-1]
        return self._loss(rank.logprobs(batch), old, mask, arrays, rank.device)

    def packed_loss(self, rank, micro_batch, arrays):
        """The same loss on one FSDP micro-batch (rank.fsdp_micro_batches: a packed text row, or right-padded
        vision-language rows): per-sequence log-probs padded to [S,T] in its order; `arrays` are already in that
        order. Each sequence still counts once."""
        from posttrain.trainer.packing import pad_per_sequence

        lengths = micro_batch.response_lengths
        flat = torch.cat(rank.packed_logprobs(micro_batch))                                        # [R]
        if not lengths:   # a dummy row that keeps FSDP's collectives in step: zero loss, zero gradients
            return flat.sum() * 0.0, {}
        logprobs, mask = pad_per_sequence(flat, lengths)                                           # [S,T]
        T = logprobs.shape[1]
        old = torch.as_tensor(arrays["old_logprobs"][:, :T], dtype=torch.float32, device=rank.device)
        if "loss_mask" in arrays:
            mask = mask * torch.as_tensor(arrays["loss_mask"][:, :T], dtype=mask.dtype, device=mask.device)
        return self._loss(logprobs, old, mask.to(logprobs.device), arrays, rank.device)

    def _loss(self, logprobs, old, mask, arrays, device):
        """logprobs, old, mask [n,T] aligned; the advantages and the own-forward π_old rows from `arrays`."""
        if OLD_FROM_OWN_FORWARD in arrays:
            own = torch.as_tensor(arrays[OLD_FROM_OWN_FORWARD], dtype=torch.bool, device=logprobs.device)
            old = torch.where(own.unsqueeze(-1), logprobs.detach(), old.to(logprobs.device))
        adv = torch.as_tensor(arrays["advantages"], dtype=torch.float32, device=device)            # [n]
        return self.policy_loss(logprobs, old, adv, mask, clip_low=self.clip_low, clip_high=self.clip_high)


@dataclasses.dataclass(frozen=True)
class MOPDObjective:
    """MOPD's per-candidate distillation loss (or the zero-gradient `keye_literal` ablation), with the optional
    GSPO RL mix: `mopd_objective` over the driver's arrays (posttrain.algorithms.mopd.MOPDBatch fields; T = longest
    response of the mini-batch): cand_ids, cand_old_logprobs, cand_adv, cand_mask [n,T,k]; token_weights,
    sampled_old_logprobs, sampled_teacher_logprobs, optional gate [n,T]; loop_start [n]; optional
    outcome_advantages [n]. mm_prompts: each sample's MultimodalPrompt (None: text) for a vision-language student,
    whose hidden states are taken at the response positions after the media pads' expansion."""
    settings: "MOPDLossSettings"

    def loss(self, rank, prompts, responses, arrays, mm_prompts=None):
        chunk = rank.settings.logprob_chunk_size
        hidden, resp_ids, mask = rank.response_hidden(prompts, responses, arrays["cand_ids"].shape[1], mm_prompts)
        batch = self._batch(rank, arrays, mask)
        cand_logprobs = chunked_logprobs_at(hidden, rank.lm_head_weight, batch.cand_ids, chunk)     # [n,T,k]
        sampled = (chunked_token_logprobs(hidden, rank.lm_head_weight, resp_ids, chunk)
                   if self.settings.needs_sampled_logprobs else None)                                # [n,T]
        return self._loss(batch, cand_logprobs, sampled)

    def packed_loss(self, rank, micro_batch, arrays):
        """The same loss on one FSDP micro-batch (rank.fsdp_micro_batches): the candidates' and the sampled
        tokens' log-probs from one LM-head pass inside FSDP's gathered forward, padded back to [S,T,k] / [S,T] in its
        order; `arrays` are already in that order. Each sequence still counts once."""
        from posttrain.trainer.packing import pad_per_sequence

        lengths = micro_batch.response_lengths
        k = arrays["cand_ids"].shape[-1]
        cand_ids_RK = torch.as_tensor(np.concatenate([arrays["cand_ids"][s, :n] for s, n in enumerate(lengths)])
                                      if lengths else np.zeros((0, k), dtype=np.int64), dtype=torch.long)
        logprobs_RK1 = rank.packed_candidate_logprobs(micro_batch, cand_ids_RK)                        # [R,k+1]
        if not lengths:   # a dummy row that keeps FSDP's collectives in step: zero loss, zero gradients
            return logprobs_RK1.sum() * 0.0, {}
        cand_logprobs, mask = pad_per_sequence(logprobs_RK1[:, :k], lengths)                           # [S,T,k]
        sampled = pad_per_sequence(logprobs_RK1[:, k], lengths)[0] if self.settings.needs_sampled_logprobs else None
        T = mask.shape[1]
        arrays = {name: (v[:, :T] if v.ndim >= 2 else v) for name, v in arrays.items()}
        return self._loss(self._batch(rank, arrays, mask), cand_logprobs, sampled)

    @staticmethod
    def _batch(rank, arrays, mask):
        """The driver's arrays as an MOPDBatch on the rank's device, with the response mask [n,T]."""
        from posttrain.algorithms.mopd import MOPDBatch

        arrays = dict(arrays)
        if "loss_mask" in arrays:   # multi-turn: the student is distilled on its own tokens only
            mask = mask * torch.as_tensor(arrays.pop("loss_mask"), dtype=mask.dtype, device=mask.device)
        return MOPDBatch.from_arrays({**arrays, "mask": mask}, device=rank.device)

    def _loss(self, batch, cand_logprobs, sampled):
        from posttrain.algorithms.mopd import mopd_metrics, mopd_objective

        loss, terms = mopd_objective(batch, self.settings, cand_logprobs=cand_logprobs, sampled_logprobs=sampled)
        # The optimised loss and its clip fraction; the other diagnostics come from the driver at θ_old.
        metrics = mopd_metrics(batch, self.settings, token_losses=terms, cand_logprobs=cand_logprobs)
        return loss, {"loss/loss": float(loss.detach()), "loss/clip_frac": metrics.get("mopd/clip_frac", 0.0)}
