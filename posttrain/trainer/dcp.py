"""Sharded, reshardable checkpoints with torch.distributed.checkpoint (DCP), and the full HF model for `final/`.

Each rank writes only its own shards (no gather to rank 0, no full copy in any one memory); the files carry the
global shapes, so a checkpoint written by N ranks loads on M ranks (DCP reshards on load). The model and
optimizer state dicts come from torch.distributed.checkpoint.state_dict, which names optimizer state by
parameter FQN (not by position), so the layout of the param groups does not matter either.

Small, rank-independent state (LR schedule, data cursor, RNG) stays with the trainer's own checkpoint code; pass
it as `extra` to store it in the same DCP directory.
"""
from __future__ import annotations

import os

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict

from posttrain.trainer.weight_sync import gather_full_state_dict


def save_sharded(directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 extra: dict | None = None) -> None:
    """Write model + optimizer shards of every rank into `directory` (a collective: call on every rank)."""
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    if extra is not None:
        state["extra"] = extra
    dcp.save(state, checkpoint_id=directory)


def load_sharded(directory: str, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                 extra: dict | None = None) -> dict | None:
    """Load a `save_sharded` checkpoint written on any number of ranks into this (sharded) model and optimizer.

    `extra`: a template with the same keys as the saved `extra` (its values are replaced); returned loaded."""
    if not os.path.exists(os.path.join(directory, ".metadata")):
        raise FileNotFoundError(f"{directory} holds no DCP checkpoint (no .metadata); was it written by "
                                "save_sharded and completed?")
    model_state, optim_state = get_state_dict(model, optimizer)
    state = {"model": model_state, "optimizer": optim_state}
    if extra is not None:
        state["extra"] = extra
    dcp.load(state, checkpoint_id=directory)
    set_state_dict(model, optimizer, model_state_dict=state["model"], optim_state_dict=state["optimizer"])
    return state.get("extra")


def save_hf_model(model: torch.nn.Module, directory: str, *, dtype: torch.dtype | None = None,
                  tokenizer=None) -> None:
    """Gather the full weights on rank 0 and write a Hugging Face model folder there (config, safetensors,
    tokenizer if given). A collective: call on every rank. dtype: the saved dtype (e.g. bf16 for serving)."""
    import torch.distributed as dist

    state = gather_full_state_dict(model, dtype=dtype)
    if state is not None:
        model.save_pretrained(directory, state_dict=state, safe_serialization=True)
        _fix_saved_config(os.path.join(directory, "config.json"), model, dtype)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)
    if dist.is_initialized():
        dist.barrier()


def _fix_saved_config(path: str, model: torch.nn.Module, dtype: torch.dtype | None) -> None:
    """save_pretrained records type(model) as the architecture: under FSDP2 that is the generated subclass
    `FSDP<Name>`, which no loader knows. Record the HF class, and the dtype the files actually hold."""
    import json

    with open(path) as f:
        config = json.load(f)
    hf_class = next(c for c in type(model).__mro__ if not c.__name__.startswith("FSDP"))
    config["architectures"] = [hf_class.__name__]
    if dtype is not None:
        config["dtype"] = str(dtype).removeprefix("torch.")
    with open(path, "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
