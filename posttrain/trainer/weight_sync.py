"""Weights for the rollout engines, in buckets, straight from FSDP-sharded parameters.

Every rank walks the state dict in the same order and all-gathers one parameter at a time (DTensor.full_tensor),
casts it to the engine's dtype and moves it to `device`; a bucket is yielded as soon as adding the next tensor
would pass `bucket_bytes`. Memory stays bounded: one gathered parameter plus one bucket, never the whole model.

Tied weights are yielded under *both* names (lm_head.weight and model.embed_tokens.weight), gathered once: vLLM's
CPU backend repacks lm_head separately after loading, and a sync that skips it leaves the engine sampling from the
old head.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Iterator

import torch

from posttrain.trainer.fsdp import full_parameter

# Wrappers that may sit between the HF model and its parameters (activation checkpointing, torch.compile).
_WRAPPER_PREFIXES = ("_checkpoint_wrapped_module.", "_orig_mod.")


def hf_name(name: str) -> str:
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def iter_weight_buckets(model: torch.nn.Module, bucket_bytes: int, *, dtype: torch.dtype | None = None,
                        device: torch.device | str = "cpu") -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Yield lists of (HF name, full tensor) of at most `bucket_bytes` each (a single larger tensor gets a bucket
    of its own). dtype: the engine's dtype (None keeps the stored one). A collective: call it on EVERY rank and
    consume it to the end (ranks that send nothing drop the buckets). The tensors never alias the live parameters."""
    if bucket_bytes <= 0:
        raise ValueError(f"bucket_bytes must be positive, got {bucket_bytes}")
    bucket: list[tuple[str, torch.Tensor]] = []
    size = 0
    state = model.state_dict(keep_vars=True)
    uses = Counter(id(t) for t in state.values())
    tied: dict[int, torch.Tensor] = {}              # id(parameter) → full tensor, kept only for tied weights
    for name, tensor in state.items():
        key = id(tensor)
        if key in tied:
            full = tied[key]
        else:
            local = tensor.to_local() if hasattr(tensor, "to_local") else tensor
            full = full_parameter(tensor.detach()).to(dtype=dtype or tensor.dtype).to(device)
            if full.untyped_storage().data_ptr() == local.untyped_storage().data_ptr():
                full = full.clone()     # one rank, same dtype and device: no all-gather copy was made
            if uses[key] > 1:
                tied[key] = full
        nbytes = full.numel() * full.element_size()
        if bucket and size + nbytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((hf_name(name), full))
        size += nbytes
    if bucket:
        yield bucket


def gather_full_state_dict(model: torch.nn.Module, *, dtype: torch.dtype | None = None,
                           bucket_bytes: int = 1 << 30) -> dict[str, torch.Tensor] | None:
    """The whole HF state dict on rank 0 in CPU memory (None elsewhere). A collective: call it on every rank."""
    import torch.distributed as dist

    rank = dist.get_rank() if dist.is_initialized() else 0
    state: dict[str, torch.Tensor] = {}
    for bucket in iter_weight_buckets(model, bucket_bytes, dtype=dtype, device="cpu"):
        if rank == 0:
            state.update(bucket)
    return state if rank == 0 else None
