"""The trainer: one torch.distributed rank per Ray actor (gloo on CPU, NCCL on GPU), data parallel.

Each rank holds a full replica and sums gradients with all-reduce; the batch is split evenly across ranks.
The rank knows no recipe: `trainer_settings` (the builder) turns the recipe into flat, typed `TrainerSettings`,
and the algorithm hands in its `objective` — a small picklable object whose `loss(rank, prompts, responses,
arrays)` returns (loss, metrics) for one micro-batch (posttrain/trainer/objectives.py). Rank 0 serves weights
for the rollout engines and writes checkpoints.
"""
from __future__ import annotations

import dataclasses
import math
import os
import random
from typing import Any

import numpy as np
import ray
import torch
import torch.distributed as dist
from torch.distributed.constants import default_pg_timeout

from posttrain.algorithms.logprobs import sequence_token_logprobs
from posttrain.algorithms.topk import chunked_topk_and_token_logprobs

# How long the ranks' rendezvous store waits for them (torch's default for a process group, 30 min).
RENDEZVOUS_TIMEOUT = default_pg_timeout
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclasses.dataclass(frozen=True)
class OptimizerSettings:
    lr: float
    betas: tuple[float, float]
    eps: float
    weight_decay: float
    max_grad_norm: float
    schedule: str
    warmup_steps: int
    min_lr_ratio: float
    total_steps: int        # optimizer steps over the whole run (sizes the LR schedule)


# train_minibatch's count of the sequences behind its objective metrics (for the average over ranks).
SEQUENCES_KEY = "_sequences"
# optimizer_step's metrics: global (the same on every rank), not averaged over ranks.
OPTIMIZER_METRICS = ("loss/grad_norm", "loss/lr", "loss/nonfinite_skipped")


@dataclasses.dataclass(frozen=True)
class TrainerSettings:
    model_path: str
    dtype: str
    seed: int
    use_gpu: bool
    backend: str            # "auto" | "gloo" | "nccl"
    torch_threads: int      # 0: the CPUs of this node not reserved (reserved_cpus)
    reserved_cpus: float    # CPUs busy during the update (rollout engines generating, with async rollout)
    micro_batch_size: int
    logprob_chunk_size: int
    optimizer: OptimizerSettings
    objective: Any          # the algorithm's loss: posttrain.trainer.objectives
    fsdp: bool = False      # FSDP2 sharding, fp32 masters, packed micro-batches (posttrain/trainer/fsdp.py)
    token_budget: int = 16384
    activation_checkpointing: bool = False
    cpu_offload: bool = False
    optimizer_offload: bool = False
    compile_layers: bool = False
    pad_to_multiple: int = 1
    keep_weights_gathered: bool = False
    lm_head_store_probs: bool = False
    train_vision: bool = True


def trainer_settings(recipe, objective) -> TrainerSettings:
    """The builder: the recipe's trainer-relevant fields, flat and typed, plus the algorithm's objective."""
    t, opt = recipe.trainer, recipe.trainer.optimizer
    return TrainerSettings(
        model_path=recipe.model.path, dtype=recipe.model.dtype, seed=recipe.seed, use_gpu=t.gpus_per_worker > 0,
        backend=t.backend, torch_threads=t.torch_threads, micro_batch_size=t.micro_batch_size,
        reserved_cpus=(recipe.rollout.num_workers * recipe.rollout.cpus_per_worker if recipe.rollout.async_steps
                       else 0.0),
        logprob_chunk_size=t.logprob_chunk_size, objective=objective, fsdp=t.fsdp, token_budget=t.token_budget,
        activation_checkpointing=t.activation_checkpointing, cpu_offload=t.cpu_offload,
        optimizer_offload=t.optimizer_offload, compile_layers=t.compile_layers, pad_to_multiple=t.pad_to_multiple,
        keep_weights_gathered=t.keep_weights_gathered, lm_head_store_probs=t.lm_head_store_probs,
        train_vision=t.train_vision,
        optimizer=OptimizerSettings(
            lr=opt.lr, betas=tuple(opt.betas), eps=opt.eps, weight_decay=opt.weight_decay,
            max_grad_norm=opt.max_grad_norm, schedule=opt.schedule, warmup_steps=opt.warmup_steps,
            min_lr_ratio=opt.min_lr_ratio, total_steps=recipe.total_steps * recipe.optimizer_steps_per_step))


def lr_lambda(schedule: str, warmup_steps: int, total_steps: int, min_lr_ratio: float):
    """Multiplier of the base LR at optimizer step s (warm-up, then constant / cosine / linear decay)."""
    def fn(s: int) -> float:
        if warmup_steps and s < warmup_steps:
            return (s + 1) / warmup_steps
        if schedule == "constant":
            return 1.0
        progress = min(1.0, (s - warmup_steps) / max(1, total_steps - warmup_steps))
        decay = 0.5 * (1 + math.cos(math.pi * progress)) if schedule == "cosine" else 1.0 - progress
        return min_lr_ratio + (1 - min_lr_ratio) * decay
    return fn


def pack_sequences(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded [N, L] input ids and a [N, L-1] response mask aligned with next-token log-probs.

    Position t-1 of the log-prob tensor scores token t; the mask is 1 exactly on response tokens."""
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    L = max(lengths)
    ids = torch.full((len(prompts), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(prompts), L), dtype=torch.long)
    resp_mask = torch.zeros((len(prompts), L - 1), dtype=torch.float32)
    for i, (p, r) in enumerate(zip(prompts, responses)):
        ids[i, :len(p) + len(r)] = torch.tensor(p + r, dtype=torch.long)
        attn[i, :len(p) + len(r)] = 1
        resp_mask[i, len(p) - 1:len(p) - 1 + len(r)] = 1.0
    return {"input_ids": ids, "attention_mask": attn, "response_mask": resp_mask}


class TrainerRank:
    """One rank. Construction is cheap; `setup` joins the process group and loads the model, so that the group
    can first ask rank 0 for an address on *its* node (ranks may live on any node of the cluster)."""

    def __init__(self, rank: int, world_size: int, settings: TrainerSettings):
        self.rank, self.world_size, self.settings = rank, world_size, settings
        self.objective = settings.objective
        self._media: tuple[bytes, list] | None = None    # the last step's shared media: (ObjectRef id, objects)
        self._rendezvous: dist.TCPStore | None = None     # rank 0's group store, bound by node_address

    def resolve_media(self, mm_prompts) -> list | None:
        """Each sample's MultimodalPrompt (None: text) from a call's media argument: a list as is, or a SharedMedia
        handle (TrainerGroup.share_media) fetched from the object store once per step: the π_old and mini-batch
        calls of a step carry the same ref, so only the first one fetches."""
        from posttrain.orchestration import SharedMedia

        if not isinstance(mm_prompts, SharedMedia):
            return mm_prompts
        ref = mm_prompts.boxed_ref[0]
        if self._media is None or self._media[0] != ref.binary():
            self._media = (ref.binary(), ray.get(ref))    # the id, not the ref: the step's object may be freed
        objects = self._media[1]
        return [objects[j] if j >= 0 else None for j in mm_prompts.index]

    def node_address(self) -> tuple[str, int]:
        """Rank 0: the group's rendezvous, bound now — a TCPStore on a port the OS picks — and its address for the
        other ranks. (A free port probed, closed and bound later by init_process_group could be taken in between by
        any other process on the node: a Ray worker, an engine.)"""
        host = ray.util.get_node_ip_address()
        self._rendezvous = dist.TCPStore(host, 0, self.world_size, is_master=True, wait_for_workers=False,
                                         timeout=RENDEZVOUS_TIMEOUT)
        return host, self._rendezvous.port

    def fit_threads(self, engines_busy: bool) -> int:
        """torch's threads for the next pass: trainer.torch_threads, or with 0 the CPUs the pass has — all of the
        node's while the rollout engines are idle, those they do not hold while a generation is in flight
        (asynchronous rollout). Returns the count set."""
        s = self.settings
        reserved = int(s.reserved_cpus) if engines_busy else 0
        threads = s.torch_threads or max(1, len(os.sched_getaffinity(0)) - reserved)
        if threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        return threads

    def setup(self, master_addr: str, master_port: int) -> int:
        s = self.settings
        self.fit_threads(engines_busy=True)
        self.device = (torch.device("cuda", torch.cuda.current_device()) if s.use_gpu and torch.cuda.is_available()
                       else torch.device("cpu"))
        backend = s.backend if s.backend != "auto" else ("nccl" if self.device.type == "cuda" else "gloo")
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port))
        if not (dist.is_initialized() and dist.get_world_size() == self.world_size == 1):
            # (a single-rank trainer in a process that already holds a world-size-1 group — an in-process vLLM
            # engine makes one — reuses it: a second default group cannot be created)
            store = self._rendezvous
            if store is None:     # (a TrainerRank set up by hand, without node_address)
                store = dist.TCPStore(master_addr, master_port, self.world_size, is_master=self.rank == 0,
                                      wait_for_workers=False, timeout=RENDEZVOUS_TIMEOUT)
            dist.init_process_group(backend, store=store, rank=self.rank, world_size=self.world_size)
        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

        torch.manual_seed(s.seed)
        self.tokenizer = AutoTokenizer.from_pretrained(s.model_path)
        opt = s.optimizer
        self.processor = None
        if hasattr(AutoConfig.from_pretrained(s.model_path), "vision_config"):   # a vision-language model
            from posttrain.vl.logprobs import set_vision_trainable   # (imports the torchvision shim first)
            from transformers import AutoModelForImageTextToText, AutoProcessor

            self.processor = AutoProcessor.from_pretrained(s.model_path)
            if s.fsdp:
                from posttrain.config import vision_language_fsdp_problems
                from posttrain.vl.fsdp import build_trainable_optimizer, shard_vl_model

                problems = vision_language_fsdp_problems(s)
                if problems:      # (the recipe check refuses these first; settings built by hand land here)
                    raise ValueError("; ".join(problems))
                self.model = AutoModelForImageTextToText.from_pretrained(s.model_path, dtype=torch.float32).to(
                    self.device)
                set_vision_trainable(self.model, s.train_vision)   # before sharding: the shards copy requires_grad
                shard_vl_model(self.model, compute_dtype=None if s.dtype == "float32" else _DTYPES[s.dtype],
                               activation_checkpointing=s.activation_checkpointing, cpu_offload=s.cpu_offload,
                               reshard_after_forward=not s.keep_weights_gathered,
                               lm_head_store_probs=s.lm_head_store_probs)
                self.optimizer = build_trainable_optimizer(self.model, lr=opt.lr, betas=opt.betas, eps=opt.eps,
                                                           weight_decay=opt.weight_decay,
                                                           offload_moments=s.optimizer_offload)
            else:
                self.model = AutoModelForImageTextToText.from_pretrained(s.model_path, dtype=_DTYPES[s.dtype]).to(
                    self.device)
                set_vision_trainable(self.model, s.train_vision)
                self.optimizer = torch.optim.AdamW([p for p in self.model.parameters() if p.requires_grad],
                                                   lr=opt.lr, betas=opt.betas, eps=opt.eps,
                                                   weight_decay=opt.weight_decay)
        elif s.fsdp:
            from posttrain.trainer.fsdp import build_optimizer, shard_model

            # fp32 master weights (and AdamW state); model.dtype is the compute dtype of the gathered copies.
            self.model = AutoModelForCausalLM.from_pretrained(s.model_path, dtype=torch.float32).to(self.device)
            shard_model(self.model, compute_dtype=None if s.dtype == "float32" else _DTYPES[s.dtype],
                        activation_checkpointing=s.activation_checkpointing, cpu_offload=s.cpu_offload,
                        compile_layers=s.compile_layers, reshard_after_forward=not s.keep_weights_gathered,
                        lm_head_store_probs=s.lm_head_store_probs)
            self.optimizer = build_optimizer(self.model, lr=opt.lr, betas=opt.betas, eps=opt.eps,
                                             weight_decay=opt.weight_decay, offload_moments=s.optimizer_offload)
        else:
            self.model = AutoModelForCausalLM.from_pretrained(s.model_path, dtype=_DTYPES[s.dtype]).to(self.device)
            self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=opt.lr, betas=opt.betas, eps=opt.eps,
                                               weight_decay=opt.weight_decay)
        self.model.config.use_cache = False
        self.model.config.get_text_config().use_cache = False   # (a VL model's body reads its text config's flag)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lr_lambda(opt.schedule, opt.warmup_steps, opt.total_steps, opt.min_lr_ratio))
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        return self.rank

    # -- log-probs ----------------------------------------------------------------------------------------------
    def pack(self, prompts: list[list[int]], responses: list[list[int]], mm_prompts: list | None = None
             ) -> tuple[dict[str, torch.Tensor], list[int]]:
        """A right-padded batch and each sequence's prompt length in it. Vision-language: each prompt's media
        expanded into its tokens (posttrain.vl.logprobs.prepare_vl_sequence) with the pixels, as vLLM saw them."""
        if self.processor is None:
            return pack_sequences(prompts, responses, self.pad_id), [len(p) for p in prompts]
        from posttrain.vl.logprobs import pack_vl_sequences

        seqs = self.vl_sequences(prompts, responses, mm_prompts)
        return pack_vl_sequences(seqs, self.pad_id), [s.prompt_len for s in seqs]

    def vl_sequences(self, prompts: list[list[int]], responses: list[list[int]], mm_prompts: list | None) -> list:
        """Each (prompt, response) expanded with its media (posttrain.vl.logprobs.prepare_vl_sequence)."""
        from posttrain.vl.inputs import MultimodalPrompt
        from posttrain.vl.logprobs import prepare_vl_sequence

        mm_prompts = mm_prompts or [None] * len(prompts)
        return [prepare_vl_sequence(self.processor, self.model.config, mm if mm is not None else MultimodalPrompt(p),
                                    r) for p, r, mm in zip(prompts, responses, mm_prompts)]

    def logprobs(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """log πθ of every next token of a packed batch: [N, L-1] (see pack_sequences)."""
        if "mm_token_type_ids" in batch:
            from posttrain.vl.logprobs import vl_sequence_token_logprobs
            return vl_sequence_token_logprobs(self.model, batch, self.settings.logprob_chunk_size)
        return sequence_token_logprobs(self.model, batch["input_ids"].to(self.device),
                                       batch["attention_mask"].to(self.device), self.settings.logprob_chunk_size)

    def response_hidden(self, prompts: list[list[int]], responses: list[list[int]], num_tokens: int,
                        mm_prompts: list | None = None):
        """Final hidden states at the response positions: hidden [n,T,H], response ids [n,T] (0-padded), mask
        [n,T]. Position j of sequence i is response token j, predicted from hidden state P_i − 1 + j, where P_i is
        the prompt's length (for a vision-language model: after its media pads were expanded, with the pixels)."""
        if self.processor is None:
            batch = pack_sequences(prompts, responses, self.pad_id)
            ids = batch["input_ids"].to(self.device)
            attn = batch["attention_mask"].to(self.device)
            body = self.model.get_decoder()
            position_ids = (attn.cumsum(-1) - 1).clamp(min=0)
            hidden = body(input_ids=ids, attention_mask=attn, position_ids=position_ids).last_hidden_state  # [n,L,H]
            prompt_lens = [len(p) for p in prompts]
        else:
            from posttrain.vl.logprobs import vl_hidden_states
            batch, prompt_lens = self.pack(prompts, responses, mm_prompts)
            hidden = vl_hidden_states(self.model, batch)                                             # [n,L,H]
        n = len(prompts)
        index = torch.zeros((n, num_tokens), dtype=torch.long, device=self.device)
        resp_ids = torch.zeros((n, num_tokens), dtype=torch.long, device=self.device)
        mask = torch.zeros((n, num_tokens), dtype=torch.float32, device=self.device)
        for i, (p_len, r) in enumerate(zip(prompt_lens, responses)):
            index[i, :len(r)] = torch.arange(p_len - 1, p_len - 1 + len(r), device=self.device)
            resp_ids[i, :len(r)] = torch.tensor(r, dtype=torch.long, device=self.device)
            mask[i, :len(r)] = 1.0
        hidden_resp = hidden.gather(1, index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1]))          # [n,T,H]
        return hidden_resp, resp_ids, mask

    def release_gathered_weights(self) -> None:
        """trainer.keep_weights_gathered: free the gathered compute-dtype weights a no-grad pass (π_old, top-k, the
        canary) leaves behind, and before anything changes the shards (fsdp.release_gathered_weights)."""
        if self.settings.fsdp and self.settings.keep_weights_gathered:
            from posttrain.trainer.fsdp import release_gathered_weights
            release_gathered_weights(self.model)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        return self.model.get_output_embeddings().weight

    def packed_micro_batches(self, prompts: list[list[int]], responses: list[list[int]]):
        """FSDP mode: this rank's sequences packed into token-budget rows; every rank runs the same number of
        passes (FSDP's collectives must stay in step), padding with one-token dummies."""
        from posttrain.trainer.packing import agree_micro_batch_count, pack_batch, plan_micro_batches

        lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
        count = agree_micro_batch_count(len(plan_micro_batches(lengths, self.settings.token_budget)),
                                        device="cuda" if self.device.type == "cuda" else "cpu")
        return pack_batch(prompts, responses, self.settings.token_budget, min_micro_batches=count,
                          pad_to_multiple=self.settings.pad_to_multiple)

    def fsdp_micro_batches(self, prompts: list[list[int]], responses: list[list[int]], mm_prompts: list | None = None
                           ) -> list:
        """FSDP mode: this rank's micro-batches, as many as every other rank's — packed token-budget rows for a text
        model, right-padded rows of micro_batch_size sequences with their media for a vision-language model."""
        if self.processor is None:
            return self.packed_micro_batches(prompts, responses)
        from posttrain.vl.fsdp import plan_vl_micro_batches

        return plan_vl_micro_batches(self.model, self.vl_sequences(prompts, responses, mm_prompts),
                                     self.settings.micro_batch_size, self.pad_id, device=self._collective_device)

    @property
    def _collective_device(self) -> str:
        return "cuda" if self.device.type == "cuda" else "cpu"

    def packed_logprobs(self, micro_batch) -> list[torch.Tensor]:
        """log πθ of each sequence's response tokens of a `fsdp_micro_batches` micro-batch (differentiable), in its
        order."""
        if self.processor is None:
            from posttrain.trainer.packing import packed_response_logprobs
            flat = packed_response_logprobs(self.model, micro_batch, self.settings.logprob_chunk_size)
        else:
            from posttrain.vl.fsdp import vl_response_logprobs
            flat = vl_response_logprobs(self.model, micro_batch, self.settings.logprob_chunk_size)
        # A dummy row (no sequences) still ran the forward, so FSDP's collectives stayed in step; its [0] output
        # is kept so that a loss of 0·Σ still runs the backward's collectives too.
        return list(flat.split(micro_batch.response_lengths)) if micro_batch.response_lengths else [flat]

    def packed_candidate_logprobs(self, micro_batch, candidate_ids_RK: torch.Tensor) -> torch.Tensor:
        """MOPD's log πθ at K candidates per response token, then of the sampled token: [R,K+1], differentiable, on
        a `fsdp_micro_batches` micro-batch (the LM head inside FSDP's gathered forward)."""
        chunk = self.settings.logprob_chunk_size
        if self.processor is None:
            from posttrain.trainer.packing import packed_candidate_logprobs
            return packed_candidate_logprobs(self.model, micro_batch, candidate_ids_RK, chunk)
        from posttrain.vl.fsdp import vl_candidate_logprobs
        return vl_candidate_logprobs(self.model, micro_batch, candidate_ids_RK, chunk)

    def packed_topk(self, micro_batch, k: int):
        """(top-k ids [R,k], their log-probs [R,k], log π(y_t) [R]) of a `fsdp_micro_batches` micro-batch."""
        chunk = self.settings.logprob_chunk_size
        if self.processor is None:
            from posttrain.trainer.packing import packed_topk
            return packed_topk(self.model, micro_batch, k, chunk)
        from posttrain.vl.fsdp import vl_topk
        return vl_topk(self.model, micro_batch, k, chunk)

    @torch.no_grad()
    def compute_logprobs(self, prompts: list[list[int]], responses: list[list[int]], mm_prompts: list | None = None
                         ) -> list[list[float]]:
        """π_old: the trainer's own log-probs of each response token under the current weights."""
        mm_prompts = self.resolve_media(mm_prompts)
        self.model.eval()
        if self.settings.fsdp:
            out_by_index: dict[int, list[float]] = {}
            for micro_batch in self.fsdp_micro_batches(prompts, responses, mm_prompts):
                for i, lp in zip(micro_batch.sequence_indices, self.packed_logprobs(micro_batch)):
                    out_by_index[i] = lp.float().cpu().tolist()
            self.release_gathered_weights()
            return [out_by_index[i] for i in range(len(prompts))]
        out: list[list[float]] = []
        mb = self.settings.micro_batch_size
        for s in range(0, len(prompts), mb):
            batch, prompt_lens = self.pack(prompts[s:s + mb], responses[s:s + mb],
                                           mm_prompts[s:s + mb] if mm_prompts else None)
            lp = self.logprobs(batch).float().cpu()
            for i, (p_len, r) in enumerate(zip(prompt_lens, responses[s:s + mb])):
                out.append(lp[i, p_len - 1:p_len - 1 + len(r)].tolist())
        return out

    @torch.no_grad()
    def compute_topk(self, prompts: list[list[int]], responses: list[list[int]], k: int,
                     mm_prompts: list | None = None):
        """The policy's top-k (ids, log-probs) and log π(y_t) of the sampled token at every response position,
        chunked over tokens (never [T, V] logits), in the teachers' compact layout (teachers.scores).
        mm_prompts: each sample's MultimodalPrompt (None: text) for a vision-language student."""
        from teachers.scores import TeacherScores

        mm_prompts = self.resolve_media(mm_prompts)
        self.model.eval()
        mb, chunk = self.settings.micro_batch_size, self.settings.logprob_chunk_size
        if self.settings.fsdp:   # the LM head runs inside FSDP's gathered forward
            by_index = {}
            for micro_batch in self.fsdp_micro_batches(prompts, responses, mm_prompts):
                ids, lps, tok = self.packed_topk(micro_batch, k)
                ids, lps, tok = ids.cpu().numpy().astype(np.int32), lps.float().cpu().numpy(), tok.float().cpu().numpy()
                bounds = np.cumsum(micro_batch.response_lengths)[:-1]      # one transfer per row, then split
                for i, a, b, c in zip(micro_batch.sequence_indices, np.split(ids, bounds), np.split(lps, bounds),
                                      np.split(tok, bounds)):
                    by_index[i] = (a, b, c)
            self.release_gathered_weights()
            return TeacherScores.from_sequences([by_index[i] for i in range(len(prompts))], k)
        parts = []
        for s in range(0, len(prompts), mb):
            P, R = prompts[s:s + mb], responses[s:s + mb]
            hidden, resp_ids, _ = self.response_hidden(P, R, max(len(r) for r in R),
                                                       mm_prompts[s:s + mb] if mm_prompts else None)
            ids, lps, tok = chunked_topk_and_token_logprobs(hidden, self.lm_head_weight, k, resp_ids, chunk)
            ids, lps, tok = ids.cpu().numpy(), lps.float().cpu().numpy(), tok.float().cpu().numpy()
            for i, r in enumerate(R):
                parts.append((ids[i, :len(r)].astype(np.int32), lps[i, :len(r)], tok[i, :len(r)]))
        return TeacherScores.from_sequences(parts, k)

    # -- update -------------------------------------------------------------------------------------------------
    def train_minibatch(self, prompts: list[list[int]], responses: list[list[int]], arrays: dict[str, np.ndarray],
                        global_batch_size: int, mm_prompts: list | None = None) -> dict[str, float]:
        """One optimizer step on this rank's share of a mini-batch (gradient accumulation over micro-batches).

        `arrays` holds the algorithm's per-sample inputs (first axis = sample), sliced per micro-batch. The
        objective's loss is a mean over sequences; each micro-batch's loss is weighted by its share of the
        *global* mini-batch, and ranks sum their gradients (all-reduce), which gives exactly the global mean."""
        mm_prompts = self.resolve_media(mm_prompts)
        self.model.train()
        mb = self.settings.micro_batch_size
        metrics_sum: dict[str, float] = {}
        n_sequences = 0
        if self.settings.fsdp:   # micro-batches that score response rows only (the objective's packed_loss)
            parts = [(micro_batch.sequence_indices, micro_batch)
                     for micro_batch in self.fsdp_micro_batches(prompts, responses, mm_prompts)]
        else:
            parts = [(list(range(s, min(s + mb, len(prompts)))), None) for s in range(0, len(prompts), mb)]
        hold_gathered = self.settings.fsdp and self.settings.keep_weights_gathered
        if hold_gathered:
            from posttrain.trainer.fsdp import hold_gathered_weights
        for n, (idx, micro_batch) in enumerate(parts):
            if hold_gathered:
                hold_gathered_weights(self.model, hold=n < len(parts) - 1)   # freed after the last backward
            part = {k: v[idx] for k, v in arrays.items()}
            if micro_batch is not None:
                loss, metrics = self.objective.packed_loss(self, micro_batch, part)
            else:
                loss, metrics = self.objective.loss(self, [prompts[i] for i in idx], [responses[i] for i in idx],
                                                    part, [mm_prompts[i] for i in idx] if mm_prompts else None)
            (loss * (len(idx) / global_batch_size)).backward()
            # The objective's metrics are means over the micro-batch's sequences: weight them by its size, so
            # that the result is the mean over this rank's sequences (TrainerGroup then averages the ranks).
            for k, v in metrics.items():
                metrics_sum[k] = metrics_sum.get(k, 0.0) + v * len(idx)
            n_sequences += len(idx) if metrics else 0
        out = {k: v / max(n_sequences, 1) for k, v in metrics_sum.items()}
        out.update(self.optimizer_step())
        out[SEQUENCES_KEY] = n_sequences
        return out

    def optimizer_step(self) -> dict[str, float]:
        """Sum the ranks' gradients (each micro-batch loss was already scaled by its share of the global batch),
        clip, and step the optimizer and the LR schedule.

        A non-finite gradient norm (a NaN/inf loss, an overflow) skips the step: the weights, the optimizer
        state and the schedule stay as they were, and `loss/nonfinite_skipped` = 1 tells the driver, which
        stops the run after a few such steps in a row. The norm is computed after the all-reduce, so every
        rank takes the same decision."""
        if self.settings.fsdp:      # FSDP already summed the gradients (reduce-scatter) in backward
            from posttrain.trainer.fsdp import clip_grad_norm
            self.release_gathered_weights()    # the step changes the shards: no gathered copy may outlive it
            grad_norm = torch.tensor(clip_grad_norm(self.model, self.settings.optimizer.max_grad_norm))
        else:
            if self.world_size > 1:
                for p in self.model.parameters():
                    if p.grad is not None:
                        dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.settings.optimizer.max_grad_norm)
        finite = bool(torch.isfinite(grad_norm))
        if finite:
            self.optimizer.step()
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return {"loss/grad_norm": float(grad_norm) if finite else float("nan"),
                "loss/lr": float(self.scheduler.get_last_lr()[0]), "loss/nonfinite_skipped": float(not finite)}

    # -- weights, checkpoints -----------------------------------------------------------------------------------
    def named_weights(self) -> list[tuple[str, torch.Tensor]]:
        """Hugging Face names → CPU tensors for the rollout engines. Tied weights are sent under *both* names:
        vLLM's CPU backend repacks `lm_head` separately after loading, and a sync that skips it leaves the engine
        sampling from the old head (the canary caught exactly this: 1.46 nats of drift).

        FSDP mode: gathered parameter by parameter from the shards in buckets (bounded memory; a collective, so
        every rank calls it and rank 0 returns the weights), cast to the engines' dtype."""
        if self.settings.fsdp:
            from posttrain.trainer.weight_sync import iter_weight_buckets
            named = [pair for bucket in iter_weight_buckets(self.model, 256 << 20, dtype=_DTYPES[self.settings.dtype])
                     for pair in bucket]
            return named if self.rank == 0 else []
        return [(name, tensor.detach().to("cpu", copy=True)) for name, tensor in self.model.state_dict().items()]

    @torch.no_grad()
    def canary_logprobs(self, token_ids) -> list[float]:
        """The trainer's side of the weight-sync canary: log p(x_t | x_<t), t ≥ 1, of the canary sequence (a
        MultimodalPrompt for a vision-language run: positions of the expanded prompt, as the engine reports)."""
        self.model.eval()
        if self.settings.fsdp:    # every rank runs it (the forward all-gathers the shards)
            logprobs = self.packed_logprobs(self.canary_micro_batch(token_ids))[0].float().cpu().tolist()
            self.release_gathered_weights()
            return logprobs
        if self.processor is not None:
            from posttrain.vl.inputs import MultimodalPrompt
            from posttrain.vl.logprobs import vl_canary_logprobs
            prompt = token_ids if isinstance(token_ids, MultimodalPrompt) else MultimodalPrompt(list(token_ids))
            return vl_canary_logprobs(self.model, self.processor, prompt)
        batch = pack_sequences([token_ids[:1]], [token_ids[1:]], self.pad_id)
        return self.logprobs(batch)[0].float().cpu().tolist()

    def canary_micro_batch(self, token_ids):
        """FSDP mode: the canary sequence as one micro-batch scoring every position t ≥ 1 (for a vision-language
        model the positions of the expanded prompt, its media in)."""
        if self.processor is None:
            from posttrain.trainer.packing import pack_micro_batch
            return pack_micro_batch([token_ids[:1]], [token_ids[1:]], [0])
        from posttrain.vl.fsdp import plan_vl_micro_batches
        from posttrain.vl.inputs import MultimodalPrompt

        prompt = token_ids if isinstance(token_ids, MultimodalPrompt) else MultimodalPrompt(list(token_ids))
        sequence = dataclasses.replace(self.vl_sequences([prompt.token_ids], [[]], [prompt])[0], prompt_len=1)
        return plan_vl_micro_batches(self.model, [sequence], 1, self.pad_id, device=self._collective_device)[0]

    def parameter_checksum(self) -> float:
        return float(sum(p.detach().double().abs().sum() for p in self.model.parameters()))

    def save_state(self, directory: str) -> None:
        """Weights (HF safetensors), optimizer, LR schedule and RNG states of this rank. FSDP mode: every rank
        writes its shards of the weights and AdamW state (torch.distributed.checkpoint: reshardable on load)."""
        os.makedirs(directory, exist_ok=True)
        if self.settings.fsdp:
            from posttrain.trainer.dcp import save_sharded
            save_sharded(os.path.join(directory, "sharded"), self.model, self.optimizer)
            if self.rank == 0:
                torch.save({"scheduler": self.scheduler.state_dict()}, os.path.join(directory, "scheduler.pt"))
        elif self.rank == 0:
            self.model.save_pretrained(os.path.join(directory, "model"), safe_serialization=True)
            self.tokenizer.save_pretrained(os.path.join(directory, "model"))
            torch.save({"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict()},
                       os.path.join(directory, "optimizer.pt"))
        torch.save({"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate(),
                    "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None},
                   os.path.join(directory, f"rng_rank{self.rank}.pt"))
        if self.world_size > 1:
            dist.barrier()

    def load_state(self, directory: str) -> None:
        from safetensors.torch import load_file

        if self.settings.fsdp:
            from posttrain.trainer.dcp import load_sharded
            if not os.path.isdir(os.path.join(directory, "sharded")):
                raise RuntimeError(f"checkpoint {directory} was written without trainer.fsdp (no sharded/ folder); "
                                   "resume it with trainer.fsdp: false")
            self.release_gathered_weights()
            load_sharded(os.path.join(directory, "sharded"), self.model, self.optimizer)
            self.scheduler.load_state_dict(torch.load(os.path.join(directory, "scheduler.pt"))["scheduler"])
            self._load_rng(directory)
            return
        state = load_file(os.path.join(directory, "model", "model.safetensors"))
        missing, unexpected = self.model.load_state_dict(state, strict=False)
        missing = [m for m in missing if not (m == "lm_head.weight" and self.model.config.tie_word_embeddings)]
        if missing or unexpected:
            raise RuntimeError(f"checkpoint {directory} does not match the model: missing {missing}, "
                               f"unexpected {unexpected}")
        if self.model.config.tie_word_embeddings:
            self.model.tie_weights()
        opt = torch.load(os.path.join(directory, "optimizer.pt"), weights_only=False)
        self.optimizer.load_state_dict(opt["optimizer"])
        self.scheduler.load_state_dict(opt["scheduler"])
        self._load_rng(directory)

    def _load_rng(self, directory: str) -> None:
        rng_path = os.path.join(directory, f"rng_rank{self.rank}.pt")
        if os.path.exists(rng_path):  # a resume on more ranks than saved starts the extra ranks fresh
            rng = torch.load(rng_path, weights_only=False)
            torch.set_rng_state(rng["torch"])
            np.random.set_state(rng["numpy"])
            random.setstate(rng["python"])

    def save_hf(self, directory: str) -> None:
        if self.settings.fsdp:   # a collective: the full weights are gathered to rank 0, which writes them
            from posttrain.trainer.dcp import save_hf_model
            save_hf_model(self.model, directory, dtype=_DTYPES[self.settings.dtype],
                          tokenizer=self.processor or self.tokenizer)
            return
        if self.rank == 0:
            self.model.save_pretrained(directory, safe_serialization=True)
            (self.processor or self.tokenizer).save_pretrained(directory)

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()


@ray.remote
class TrainerWorker(TrainerRank):
    """TrainerRank as a Ray actor (resources from trainer.cpus_per_worker / gpus_per_worker)."""


def free_port() -> int:
    import socket
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]
