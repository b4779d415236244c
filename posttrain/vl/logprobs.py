"""Trainer-side log πθ of response tokens of a vision-language model (Qwen3-VL family) with pixel inputs.

The engine sees a prompt as ids with ONE pad per media item; the HF model needs them expanded, with the pixel
tensors, the grids, `mm_token_type_ids` (without them transformers silently falls back to 1-D positions for
Qwen2.5-VL) and multimodal rotary positions. `prepare_vl_sequence` builds one sequence exactly as vLLM expands it
(posttrain.vl.inputs.expand_media_tokens); `pack_vl_sequences` right-pads a batch like
posttrain.trainer.worker.pack_sequences (same keys and response mask, plus the pixel keys);
`vl_sequence_token_logprobs` runs the model's body with EXPLICIT 3-D position ids (get_rope_index on the padded
batch: no reliance on the model's cached `rope_deltas` state) and the chunked LM-head kernel the text path uses.

    seq = prepare_vl_sequence(processor, model.config, prompt, response_ids)     # per sample, once per step
    batch = pack_vl_sequences([seq, ...], pad_id)
    logp = vl_sequence_token_logprobs(model, batch)                               # [N, L-1], differentiable
    masked = logp * batch["response_mask"]

`set_vision_trainable(model, False)` freezes the vision tower (its outputs still flow; no gradient, no AdamW
state is needed for it).
"""
from __future__ import annotations

import dataclasses

import torch

from posttrain.algorithms.topk import DEFAULT_CHUNK_SIZE, chunked_token_logprobs
from posttrain.vl.inputs import MultimodalPrompt, expand_media_tokens, processor_pixels, special_ids

PIXEL_KEYS = ("pixel_values", "image_grid_thw", "pixel_values_videos", "video_grid_thw")


@dataclasses.dataclass
class VLSequence:
    """One expanded sequence: ids and mm_token_type_ids of prompt + response, the expanded prompt length, and its
    pixel tensors (pixel_values [P, C·t·p·p], image_grid_thw [I, 3], pixel_values_videos, video_grid_thw)."""
    token_ids: list[int]
    token_types: list[int]
    prompt_len: int
    pixels: dict


def prepare_vl_sequence(processor, config, prompt: MultimodalPrompt, response_ids: list[int]) -> VLSequence:
    """A rollout's (prompt, response) → the model's inputs, token for token what vLLM computed on."""
    pixels = processor_pixels(processor, prompt.images, prompt.videos)
    ids, types = expand_media_tokens(prompt.token_ids, processor.tokenizer, **special_ids(config),
                                     image_grid_thw=pixels.get("image_grid_thw"),
                                     video_grid_thw=pixels.get("video_grid_thw"),
                                     video_timestamps=pixels.get("video_timestamps"))
    return VLSequence(ids + list(response_ids), types + [0] * len(response_ids), len(ids),
                      {k: pixels[k] for k in PIXEL_KEYS if k in pixels})


def pack_vl_sequences(seqs: list[VLSequence], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded input_ids / attention_mask / mm_token_type_ids [N, L], response_mask [N, L-1] (1 exactly on
    response tokens, aligned with next-token log-probs) and the batch's pixels concatenated in row order."""
    L = max(len(s.token_ids) for s in seqs)
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), L), dtype=torch.long)
    types = torch.zeros((len(seqs), L), dtype=torch.long)
    resp_mask = torch.zeros((len(seqs), L - 1), dtype=torch.float32)
    for i, s in enumerate(seqs):
        n = len(s.token_ids)
        ids[i, :n] = torch.tensor(s.token_ids, dtype=torch.long)
        types[i, :n] = torch.tensor(s.token_types, dtype=torch.long)
        attn[i, :n] = 1
        resp_mask[i, s.prompt_len - 1:n - 1] = 1.0
    batch = {"input_ids": ids, "attention_mask": attn, "mm_token_type_ids": types, "response_mask": resp_mask}
    for key in PIXEL_KEYS:
        parts = [s.pixels[key] for s in seqs if key in s.pixels]
        if parts:
            batch[key] = torch.cat(parts, dim=0)
    return batch


def vl_position_ids(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Multimodal rotary positions [3, N, L] (temporal, height, width) computed from the whole padded batch.
    Text-only batches get 1-D positions repeated on the three axes (what M-RoPE reduces to for text)."""
    attn = batch["attention_mask"]
    if "image_grid_thw" not in batch and "video_grid_thw" not in batch:
        return (attn.long().cumsum(-1) - 1).clamp(min=0).unsqueeze(0).expand(3, -1, -1)
    body = model.model
    position_ids, _ = body.get_rope_index(batch["input_ids"], mm_token_type_ids=batch["mm_token_type_ids"],
                                          image_grid_thw=batch.get("image_grid_thw"),
                                          video_grid_thw=batch.get("video_grid_thw"), attention_mask=attn)
    return position_ids


def vl_hidden_states(model, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The VLM body's final hidden states [N, L, H] of a pack_vl_sequences batch: its pixels in the LM head's dtype
    and explicit 3-D rotary positions (vl_position_ids), so that the engine's positions are reproduced. The
    vision tower runs inside the body; whether it gets gradients is set_vision_trainable's business."""
    from torch.distributed.fsdp import FSDPModule

    if isinstance(model, FSDPModule):
        # The body called directly runs none of the root unit's hooks: its parameters would be the shards.
        raise TypeError("vl_hidden_states calls the body of an unsharded model; for a model sharded by "
                        "posttrain.vl.fsdp.shard_vl_model use posttrain.vl.fsdp's passes (vl_response_logprobs, "
                        "vl_candidate_logprobs, vl_topk), which run inside FSDP's gathered forward")
    lm_head = model.get_output_embeddings()
    inputs = {k: v.to(lm_head.weight.device) for k, v in batch.items() if k != "response_mask"}
    for key in ("pixel_values", "pixel_values_videos"):
        if key in inputs:
            inputs[key] = inputs[key].to(lm_head.weight.dtype)
    return model.model(input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"],
                       position_ids=vl_position_ids(model, inputs), mm_token_type_ids=inputs["mm_token_type_ids"],
                       **{k: inputs[k] for k in PIXEL_KEYS if k in inputs}).last_hidden_state


def vl_sequence_token_logprobs(model, batch: dict[str, torch.Tensor],
                               chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """log πθ(x_t | x_<t) for t ≥ 1 of right-padded multimodal sequences.   input_ids [N, L] → [N, L-1]

    Position t-1 of the result scores token t (as posttrain.algorithms.logprobs.sequence_token_logprobs)."""
    hidden = vl_hidden_states(model, batch)                                                     # [N,L,H]
    input_ids = batch["input_ids"].to(hidden.device)
    return chunked_token_logprobs(hidden[:, :-1], model.get_output_embeddings().weight, input_ids[:, 1:], chunk_size)


def set_vision_trainable(model, trainable: bool) -> int:
    """Freeze (False) or unfreeze the vision tower (patch embedding, blocks, merger). Returns its parameter count.
    Build the optimizer AFTER freezing, over parameters that require grad."""
    visual = model.model.visual
    for p in visual.parameters():
        p.requires_grad_(trainable)
    return sum(p.numel() for p in visual.parameters())


@torch.no_grad()
def vl_canary_logprobs(model, processor, prompt: MultimodalPrompt) -> list[float]:
    """log p(x_t | x_<t) for t ≥ 1 of the EXPANDED prompt: the trainer's side of the weight-sync canary, to
    compare with RolloutEngine.prompt_token_logprobs(prompt) position by position."""
    model.eval()
    seq = prepare_vl_sequence(processor, model.config, prompt, [])
    batch = pack_vl_sequences([seq], processor.tokenizer.pad_token_id)
    return vl_sequence_token_logprobs(model, batch)[0].float().cpu().tolist()
