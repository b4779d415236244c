"""The MOPD student: TrainerRank plus the two student-side passes of ALGORITHMS.md §2.2.

1. `compute_old_topk` — at the start of the update, with the weights that generated the rollout: the student's
   top-k ids and log-probs (π_old, the candidates S_θ) and log π_old(y_t) of the sampled tokens, for every
   response token. Chunked over tokens from the final hidden states (posttrain.algorithms.topk): never [T, V]
   logits. Returned in the same compact binary layout as the teachers' scores (teachers.scores.TeacherScores).
2. `train_minibatch_mopd` — one optimizer step: log πθ at the candidates (differentiable, chunked), then
   `mopd_loss` (or the zero-gradient `keye_literal_loss` ablation) with the driver's advantages and weights.

Rows are laid out per response token: [n, T] / [n, T, k] with T the longest response of the mini-batch; position
j of sequence i is response token j, predicted from hidden state P_i − 1 + j.
"""
from __future__ import annotations

import numpy as np
import ray
import torch

from posttrain.algorithms.mopd import keye_literal_loss, mopd_loss
from posttrain.algorithms.topk import chunked_logprobs_at, chunked_token_logprobs, chunked_topk_and_token_logprobs
from posttrain.orchestration import TrainerGroup, _split
from posttrain.trainer.worker import TrainerRank, lr_lambda, pack_sequences
from teachers.scores import TeacherScores


class MOPDTrainerRank(TrainerRank):
    def setup(self, master_addr: str, master_port: int) -> int:
        rank = super().setup(master_addr, master_port)
        recipe = self.cfg
        # The LR schedule counts MOPD's optimizer steps (mopd.mini_batches per step), not GSPO's.
        opt = recipe["trainer"]["optimizer"]
        total = recipe["total_steps"] * recipe["mopd"]["mini_batches"]
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(opt["schedule"], opt["warmup_steps"], total, opt["min_lr_ratio"]))
        return rank

    def _response_hidden(self, prompts: list[list[int]], responses: list[list[int]], num_tokens: int):
        """Final hidden states at the response positions: hidden [n,T,H], response ids [n,T] (0-padded), mask."""
        batch = pack_sequences(prompts, responses, self.pad_id)
        ids = batch["input_ids"].to(self.device)
        attn = batch["attention_mask"].to(self.device)
        body = self.model.get_decoder()
        position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
        hidden = body(input_ids=ids, attention_mask=attn, position_ids=position_ids).last_hidden_state   # [n,L,H]
        n = len(prompts)
        index = torch.zeros((n, num_tokens), dtype=torch.long, device=self.device)
        resp_ids = torch.zeros((n, num_tokens), dtype=torch.long, device=self.device)
        mask = torch.zeros((n, num_tokens), dtype=torch.float32, device=self.device)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            index[i, :len(r)] = torch.arange(len(p) - 1, len(p) - 1 + len(r), device=self.device)
            resp_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long, device=self.device)
            mask[i, :len(r)] = 1.0
        hidden_resp = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))          # [n,T,H]
        return hidden_resp, resp_ids, mask

    @property
    def _lm_head_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    @torch.no_grad()
    def compute_old_topk(self, prompts: list[list[int]], responses: list[list[int]], k: int) -> TeacherScores:
        """π_old: the student's top-k (ids, log-probs) and log π_old(y_t) for every response token."""
        self.model.eval()
        chunk = self.cfg["trainer"]["logprob_chunk_size"]
        mb = self.cfg["trainer"]["micro_batch_size"]
        parts = []
        for s in range(0, len(prompts), mb):
            P, R = prompts[s:s + mb], responses[s:s + mb]
            T = max(len(r) for r in R)
            hidden, resp_ids, _ = self._response_hidden(P, R, T)
            ids, lps, tok = chunked_topk_and_token_logprobs(hidden, self._lm_head_weight, k, resp_ids, chunk)
            ids, lps, tok = ids.cpu().numpy(), lps.float().cpu().numpy(), tok.float().cpu().numpy()
            for i, r in enumerate(R):
                parts.append((ids[i, :len(r)].astype(np.int32), lps[i, :len(r)], tok[i, :len(r)]))
        return TeacherScores.from_sequences(parts, k)

    def train_minibatch_mopd(self, prompts: list[list[int]], responses: list[list[int]], arrays: dict[str, np.ndarray],
                             global_batch_size: int) -> dict[str, float]:
        """One optimizer step on this rank's share of a mini-batch.

        arrays (numpy, from the driver; T = longest response of the mini-batch):
          cand_ids, cand_old_logprobs, cand_adv, cand_mask [n,T,k]; token_weights, gate, sampled_old_logprobs,
          sampled_teacher_logprobs [n,T]; loop_start [n]; outcome_advantages [n]. gate / outcome_advantages may
          be absent (gate off, pure MOPD).
        mopd_loss is a mean over sequences; each micro-batch is weighted by its share of the GLOBAL mini-batch and
        ranks sum gradients, which gives exactly the global mean (as in TrainerRank.train_minibatch)."""
        self.model.train()
        m = self.cfg["mopd"]
        chunk = self.cfg["trainer"]["logprob_chunk_size"]
        mb = self.cfg["trainer"]["micro_batch_size"]
        rl_alpha = m["rl_alpha"]
        need_sampled = (m["empty_overlap_fallback"] or m["repetition_penalty"] > 0 or rl_alpha > 0
                        or m["loss_form"] == "keye_literal")
        T = arrays["cand_ids"].shape[1]
        metrics_sum: dict[str, float] = {}
        n_micro = 0
        for s in range(0, len(prompts), mb):
            sl = slice(s, s + mb)

            def t(name, dtype=torch.float32):
                return torch.as_tensor(arrays[name][sl], dtype=dtype, device=self.device) if name in arrays else None

            hidden, resp_ids, mask = self._response_hidden(prompts[sl], responses[sl], T)
            cand_ids = t("cand_ids", torch.long)
            cand_logprobs = chunked_logprobs_at(hidden, self._lm_head_weight, cand_ids, chunk)            # [n,T,k]
            sampled = chunked_token_logprobs(hidden, self._lm_head_weight, resp_ids, chunk) if need_sampled else None
            if m["loss_form"] == "keye_literal":
                loss, metrics = keye_literal_loss(sampled, t("cand_adv"), t("token_weights"), mask, gate=t("gate"))
            else:
                loss, metrics = mopd_loss(
                    cand_logprobs, t("cand_old_logprobs"), t("cand_adv"), t("cand_mask", torch.bool),
                    t("token_weights"), mask, gate=t("gate"), clip_eps=m["clip_eps"], sampled_logprobs=sampled,
                    sampled_old_logprobs=t("sampled_old_logprobs"),
                    sampled_teacher_logprobs=t("sampled_teacher_logprobs"),
                    empty_overlap_fallback=m["empty_overlap_fallback"], loop_start=t("loop_start", torch.long),
                    repetition_penalty=m["repetition_penalty"], rl_alpha=rl_alpha,
                    outcome_advantages=t("outcome_advantages") if rl_alpha > 0 else None,
                    rl_clip_low=self.cfg["gspo"]["clip_low"], rl_clip_high=self.cfg["gspo"]["clip_high"])
            (loss * (mask.shape[0] / global_batch_size)).backward()
            for key in ("mopd/loss", "mopd/clip_frac", "mopd_literal/loss"):
                if key in metrics:
                    metrics_sum[key] = metrics_sum.get(key, 0.0) + metrics[key]
            n_micro += 1
        out = {("loss/" + k.split("/", 1)[1] if k.startswith("mopd/") else "loss/" + k.replace("/", "_")):
               v / max(n_micro, 1) for k, v in metrics_sum.items()}
        out.update(self.optimizer_step())
        return out


@ray.remote
class MOPDTrainerWorker(MOPDTrainerRank):
    """MOPDTrainerRank as a Ray actor (resources from trainer.cpus_per_worker / gpus_per_worker)."""


class MOPDTrainerGroup(TrainerGroup):
    """TrainerGroup whose ranks are MOPD students; batches are split evenly over ranks, order preserved."""

    def __init__(self, recipe):
        super().__init__(recipe, worker_cls=MOPDTrainerWorker)

    def compute_old_topk(self, prompts, responses, k: int) -> TeacherScores:
        chunks = _split(list(range(len(prompts))), len(self.ranks))
        refs = [r.compute_old_topk.remote([prompts[i] for i in idx], [responses[i] for i in idx], k)
                for r, idx in zip(self.ranks, chunks) if idx]
        parts = ray.get(refs)
        return TeacherScores.from_sequences([p.sequence(i) for p in parts for i in range(p.num_sequences)], k)

    def train_minibatch_mopd(self, prompts, responses, arrays: dict[str, np.ndarray]) -> dict[str, float]:
        chunks = _split(list(range(len(prompts))), len(self.ranks))
        refs = [r.train_minibatch_mopd.remote([prompts[i] for i in idx], [responses[i] for i in idx],
                                              {k: v[idx[0]:idx[-1] + 1] for k, v in arrays.items()}, len(prompts))
                for r, idx in zip(self.ranks, chunks) if idx]
        return ray.get(refs)[0]
