"""FSDP2 sharding of a vision-language model (Qwen3-VL family) and its log-prob passes on right-padded micro-batches.

    fully_shard(block) for every vision block and every decoder layer (the classes the model declares in
    `_no_split_modules`), an untied embedding and LM head each a unit of their own, then fully_shard(model) for the
    rest (patch embedding, position embedding, mergers, final norm; a tied LM head/embedding stays one parameter).

Precision and reduction are the text path's (posttrain.trainer.fsdp.shard_model): fp32 master weights and AdamW
state, `compute_dtype` for the all-gathered copies, gradients reduced in fp32 and SUMMED over ranks. A frozen vision
tower (trainer.train_vision: false, set before sharding) is sharded like the rest; FSDP2 reduce-scatters only the
parameters that have a gradient, and no rank has one for the tower.

The passes: the body (`model.model`) and the LM head are called directly, not through `model(...)`, so they run as
an FSDP forward method of the root (`VL_FORWARD_METHOD`), which gathers the root's parameters around them. Only the
positions before response tokens reach the LM head (packing._lm_head_outputs, as on the text path): log π(y_t) [R],
MOPD's candidates and sampled token [R, K+1], or the top-k. Sequences stay right-padded ([N, L] rows, the pixels of
the batch concatenated): packing them padding-free is not done for vision-language models.

Collectives in step: FSDP all-gathers a unit each time it runs and reduce-scatters its gradients in backward, so
every rank must run the same units in the same order. The vision tower runs once per modality a micro-batch holds
(its images, then its videos) and not at all without media; so the ranks first agree on their number of
micro-batches and on each one's modalities (two small all-reduces per pass), and a rank whose micro-batch lacks a
modality that another rank's has gets a filler row holding one minimal item of it (a merge² patch grid of zero
pixels: one placeholder token). A rank with fewer micro-batches runs filler-only ones. A filler row is never scored:
its gradient is exactly zero, and it is there only so that its rank runs the same units as the others.
"""
from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from types import MethodType

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard, register_fsdp_forward_method

from posttrain.algorithms.topk import DEFAULT_CHUNK_SIZE
from posttrain.trainer.fsdp import (checked_mesh, decoder_layers, shard_untied_embedding_and_head,
                                    sum_gradients_over_ranks)
from posttrain.trainer.packing import HEAD_LOGPROBS_METHOD, LM_HEAD_STORES_PROBS, _lm_head_outputs
from posttrain.vl.logprobs import PIXEL_KEYS, VLSequence, pack_vl_sequences, vl_position_ids

# The name under which a sharded vision-language model carries `_vl_forward` as an FSDP forward method.
VL_FORWARD_METHOD = "posttrain_vl_response_outputs"


def shard_vl_model(model: torch.nn.Module, *, mesh: DeviceMesh | None = None, compute_dtype: torch.dtype | None = None,
                   activation_checkpointing: bool = False, cpu_offload: bool = False,
                   reshard_after_forward: bool = True, lm_head_store_probs: bool = False) -> torch.nn.Module:
    """Shard a Hugging Face vision-language model in place with FSDP2 over `mesh` (default: every rank of the
    default group); returns it (now an FSDPModule). The options mean what they mean for fsdp.shard_model:
    compute_dtype (None: the stored dtype), activation_checkpointing (recompute every vision block and decoder
    layer in backward), cpu_offload, reshard_after_forward=False (trainer.keep_weights_gathered),
    lm_head_store_probs. Freeze the vision tower (logprobs.set_vision_trainable) BEFORE sharding: FSDP copies
    requires_grad into the sharded parameters."""
    mesh = checked_mesh(model, compute_dtype, mesh)
    model.config.use_cache = False
    model.config.get_text_config().use_cache = False   # the flag the body reads: no K/V cache built in training passes
    if activation_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy = {"mp_policy": MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32),
              "reshard_after_forward": reshard_after_forward}
    if cpu_offload:
        policy["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for block in decoder_layers(model):          # vision blocks and decoder layers alike
        fully_shard(block, mesh=mesh, **policy)
    shard_untied_embedding_and_head(model, mesh=mesh, **policy)
    fully_shard(model, mesh=mesh, **policy)
    sum_gradients_over_ranks(model)
    setattr(model.get_output_embeddings(), LM_HEAD_STORES_PROBS, lm_head_store_probs)
    setattr(model, VL_FORWARD_METHOD, MethodType(_vl_forward, model))
    register_fsdp_forward_method(model, VL_FORWARD_METHOD)
    return model


def build_trainable_optimizer(model: torch.nn.Module, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                              weight_decay: float = 0.0, offload_moments: bool = False) -> torch.optim.Optimizer:
    """fsdp.build_optimizer over the parameters that train only: a frozen vision tower gets no AdamW state (nor
    host memory for it with offload_moments)."""
    params = [p for p in model.parameters() if p.requires_grad]
    if offload_moments:
        from posttrain.trainer.offload_adamw import OffloadedAdamW

        return OffloadedAdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    on_gpu = params[0].is_cuda
    return torch.optim.AdamW(params, lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                             fused=on_gpu or None, foreach=None if on_gpu else True)


# -- micro-batches ------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class VLMicroBatch:
    """S right-padded vision-language sequences (plus a filler row, maybe) scored on their R response tokens.
    The attribute names the objectives read are packing.PackedMicroBatch's."""
    sequence_indices: list[int]            # [S] the caller's index of each sequence, in row order
    inputs: dict[str, torch.Tensor]        # the body's inputs: input_ids, attention_mask, mm_token_type_ids [N,L],
    #                                        position_ids [3,N,L], the pixel keys present (logprobs.PIXEL_KEYS)
    response_positions: torch.Tensor       # long[R] flat index n·L + t of the hidden state predicting a response token
    response_targets: torch.Tensor         # long[R] the response tokens
    response_lengths: list[int]            # [S] |y_i|; the R outputs split into these, in row order

    def to(self, device: torch.device | str) -> "VLMicroBatch":
        return VLMicroBatch(self.sequence_indices, {k: v.to(device) for k, v in self.inputs.items()},
                            self.response_positions.to(device), self.response_targets.to(device),
                            self.response_lengths)


def media_kinds(seqs: list[VLSequence]) -> tuple[bool, bool]:
    """(holds an image, holds a video): which vision-tower passes the body runs on these sequences."""
    return (any("image_grid_thw" in s.pixels for s in seqs), any("video_grid_thw" in s.pixels for s in seqs))


def filler_sequence(config, images: bool, videos: bool, pad_id: int) -> VLSequence:
    """A never-scored row with one minimal image and/or video (a merge × merge grid of patches, zero pixels: one
    placeholder token each), or a one-token text row if it needs neither. `config`: the model's HF config."""
    vision = config.vision_config
    merge = vision.spatial_merge_size
    patch_numel = vision.in_channels * vision.temporal_patch_size * vision.patch_size ** 2
    ids, types, pixels = [], [], {}
    for wanted, token, kind, (values_key, grid_key) in (
            (images, config.image_token_id, 1, ("pixel_values", "image_grid_thw")),
            (videos, config.video_token_id, 2, ("pixel_values_videos", "video_grid_thw"))):
        if wanted:
            ids += [config.vision_start_token_id, token, config.vision_end_token_id]
            types += [0, kind, 0]
            pixels[values_key] = torch.zeros(merge * merge, patch_numel)
            pixels[grid_key] = torch.tensor([[1, merge, merge]])
    if not ids:
        ids, types = [pad_id], [0]
    return VLSequence(ids, types, len(ids), pixels)


def build_vl_micro_batch(model, seqs: list[VLSequence], indices: list[int], pad_id: int,
                         filler: VLSequence | None = None) -> VLMicroBatch:
    """Right-pad `seqs` (the caller's sequences `indices`) and the filler, if any, as the last row; explicit 3-D
    rotary positions (logprobs.vl_position_ids) and the flat response positions and targets."""
    rows = seqs + ([filler] if filler is not None else [])
    batch = pack_vl_sequences(rows, pad_id)
    width = batch["input_ids"].shape[1]
    positions: list[int] = []
    for row, s in enumerate(seqs):
        start = row * width + s.prompt_len - 1          # the hidden state that predicts the first response token
        positions += range(start, start + len(s.token_ids) - s.prompt_len)
    response_positions = torch.tensor(positions, dtype=torch.long)
    inputs = {k: v for k, v in batch.items() if k != "response_mask"}
    inputs["position_ids"] = vl_position_ids(model, batch)
    return VLMicroBatch(list(indices), inputs, response_positions,
                        batch["input_ids"].flatten()[response_positions + 1],
                        [len(s.token_ids) - s.prompt_len for s in seqs])


def agree_media_kinds(kinds: list[tuple[bool, bool]], device: torch.device | str = "cpu") -> list[tuple[bool, bool]]:
    """Each micro-batch's (images, videos) OR-ed over the ranks: what every rank's n-th micro-batch must run.
    A collective when several ranks exist (every rank passes the same number of micro-batches)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1 or not kinds:
        return list(kinds)
    flags = torch.tensor(kinds, dtype=torch.long, device=device)       # [M, 2]
    dist.all_reduce(flags, op=dist.ReduceOp.MAX)
    return [(bool(i), bool(v)) for i, v in flags.tolist()]


def plan_vl_micro_batches(model, seqs: list[VLSequence], micro_batch_size: int, pad_id: int,
                          device: torch.device | str = "cpu") -> list[VLMicroBatch]:
    """This rank's sequences in order, `micro_batch_size` per micro-batch, as many micro-batches as the rank with
    the most, each running the vision tower for every modality any rank's micro-batch at that place holds (filler
    rows where this rank's lacks it). A collective when several ranks exist."""
    from posttrain.trainer.packing import agree_micro_batch_count

    groups = [list(range(s, min(s + micro_batch_size, len(seqs)))) for s in range(0, len(seqs), micro_batch_size)]
    groups += [[] for _ in range(agree_micro_batch_count(len(groups), device) - len(groups))]
    own = [media_kinds([seqs[i] for i in g]) for g in groups]
    out = []
    for group, mine, agreed in zip(groups, own, agree_media_kinds(own, device)):
        missing = (agreed[0] and not mine[0], agreed[1] and not mine[1])
        filler = filler_sequence(model.config, *missing, pad_id) if any(missing) or not group else None
        out.append(build_vl_micro_batch(model, [seqs[i] for i in group], group, pad_id, filler))
    return out


# -- the passes ---------------------------------------------------------------------------------------------------
def _vl_forward(model: torch.nn.Module, inputs: dict[str, torch.Tensor], response_positions: torch.Tensor,
                response_targets: torch.Tensor, chunk_size: int, candidate_ids: torch.Tensor | None = None,
                top_k: int = 0):
    """One right-padded micro-batch: body → the hidden states before response tokens → the chunked LM head
    (packing._lm_head_outputs: log π(y_t) [R]; with candidate_ids [R,K+1]; with top_k the top-k and log π(y_t))."""
    hidden_NLH = model.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                             position_ids=inputs["position_ids"], mm_token_type_ids=inputs["mm_token_type_ids"],
                             **{k: inputs[k] for k in PIXEL_KEYS if k in inputs}).last_hidden_state
    hidden_RH = hidden_NLH.flatten(0, 1).index_select(0, response_positions)
    head = model.get_output_embeddings()
    if hasattr(head, HEAD_LOGPROBS_METHOD):      # an LM head sharded as its own FSDP unit
        return getattr(head, HEAD_LOGPROBS_METHOD)(hidden_RH, response_targets, chunk_size, candidate_ids, top_k)
    return _lm_head_outputs(head, hidden_RH, response_targets, chunk_size, candidate_ids, top_k)


def _forward_vl(model: torch.nn.Module, micro_batch: VLMicroBatch, chunk_size: int, **head_request):
    mb = micro_batch.to(next(model.parameters()).device)
    forward = getattr(model, VL_FORWARD_METHOD, None)   # FSDP-registered: gathers the root's weights around it
    return (forward or partial(_vl_forward, model))(mb.inputs, mb.response_positions, mb.response_targets,
                                                     chunk_size, **head_request)


def vl_response_logprobs(model: torch.nn.Module, micro_batch: VLMicroBatch,
                         chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """log πθ(y_t) of every response token of the micro-batch, fp32 [R] in row order, differentiable. Works on a
    plain model and on one sharded by shard_vl_model."""
    return _forward_vl(model, micro_batch, chunk_size)


def vl_candidate_logprobs(model: torch.nn.Module, micro_batch: VLMicroBatch, candidate_ids_RK: torch.Tensor,
                          chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """log πθ at K candidate ids per response token, and of the sampled token last: fp32 [R,K+1], differentiable
    (MOPD's loss). candidate_ids_RK: long [R,K] in row order."""
    if candidate_ids_RK.shape[0] != micro_batch.response_positions.shape[0]:
        raise ValueError(f"{candidate_ids_RK.shape[0]} rows of candidate ids for "
                         f"{micro_batch.response_positions.shape[0]} response tokens")
    device = next(model.parameters()).device
    return _forward_vl(model, micro_batch, chunk_size, candidate_ids=candidate_ids_RK.to(device))


@torch.no_grad()
def vl_topk(model: torch.nn.Module, micro_batch: VLMicroBatch, k: int, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """(top-k ids long [R,k], their log-probs [R,k], log π(y_t) [R]) at every response token, in row order."""
    return _forward_vl(model, micro_batch, chunk_size, top_k=k)
