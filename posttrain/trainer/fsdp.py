"""FSDP2 sharding of a Hugging Face causal LM: parameters, gradients and AdamW state split across ranks.

    fully_shard(layer) for every decoder layer, then fully_shard(model) for the rest (embeddings, final norm and
    the LM head - one unit, so a tied LM head/embedding stays one parameter).

Precision (the "updates vanish" fix): the sharded parameters - the master weights the optimizer updates - stay
in the dtype the model was built in (fp32); `compute_dtype=bfloat16` makes FSDP all-gather bf16 copies for the
forward/backward (MixedPrecisionPolicy(param_dtype=bf16, reduce_dtype=fp32)), so gradients are reduced and
accumulated in fp32 and AdamW's update lands on fp32 weights. An lr-1e-6 update is ~1e-6 relative: below bf16's
2^-8 spacing it rounds away, in fp32 (2^-23) it does not.

Gradients are SUMMED over ranks (divide factor 1), matching the trainer's convention: scale each micro-batch's
loss by its share of the global mini-batch and the summed gradient is the global mean.
"""
from __future__ import annotations

from types import MethodType

import torch
import torch.distributed as dist
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.fsdp import (CPUOffloadPolicy, FSDPModule, MixedPrecisionPolicy, fully_shard,
                                    register_fsdp_forward_method)
from torch.distributed.tensor import DTensor

from posttrain.trainer.packing import (DEFAULT_VARLEN_BACKEND, HEAD_LOGPROBS_METHOD, LM_HEAD_STORES_PROBS,
                                       PACKED_FORWARD_METHOD, _lm_head_outputs, _packed_forward, use_varlen_attention)


def decoder_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The repeated blocks, found by the class names the model itself declares unsplittable (`_no_split_modules`)."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    # fully_shard swaps each class for a generated FSDP<Name> subclass: match anywhere in the class's MRO.
    layers = [m for m in model.modules() if any(c.__name__ in names for c in type(m).__mro__)]
    if not layers:
        raise ValueError(f"{type(model).__name__} declares no decoder-layer classes (_no_split_modules={names}); "
                         "FSDP needs one unit per repeated block")
    return layers


def shard_model(model: torch.nn.Module, *, mesh: DeviceMesh | None = None, compute_dtype: torch.dtype | None = None,
                activation_checkpointing: bool = False, checkpoint_every: int = 1, cpu_offload: bool = False,
                reshard_after_forward: bool = True, compile_layers: bool = False,
                lm_head_store_probs: bool = False, attention_backend: str = DEFAULT_VARLEN_BACKEND) -> torch.nn.Module:
    """Shard `model` in place with FSDP2 over `mesh` (default: all ranks of the default process group).

    compute_dtype: dtype of the all-gathered parameters used in forward/backward (None: the stored dtype, e.g.
    fp32 everywhere on CPU). Gradients reduce in fp32. activation_checkpointing: recompute decoder layers in
    backward (keeps only their inputs); checkpoint_every=k recomputes every k-th layer only (less recompute,
    more memory). cpu_offload: sharded parameters, gradients and the optimizer step live
    in CPU memory (fully_shard's CPUOffloadPolicy; the optimizer then runs on CPU). reshard_after_forward=False
    keeps each layer gathered from forward to backward (faster, + one bf16 copy of the model per rank).
    compile_layers: torch.compile each decoder layer (fuses the norms, RoPE and SwiGLU element-wise kernels; the
    layers share one compiled graph; FSDP's hooks stay eager). lm_head_store_probs: the LM head keeps the
    response tokens' probabilities [R,V] in the compute dtype from forward to backward instead of recomputing the
    logits (R·V·2 more bytes per micro-batch in bf16; a third of the LM head's FLOPs saved).
    attention_backend: the CUDA kernel of packed attention (packing.VARLEN_BACKENDS).
    Also switches the model to packed-sequence attention (packing.py) and registers the packed log-prob forward
    as an FSDP forward method. Returns the model (now an FSDPModule)."""
    mesh = checked_mesh(model, compute_dtype, mesh)
    model.config.use_cache = False
    use_varlen_attention(model, attention_backend)
    if activation_checkpointing:
        # Non-reentrant checkpointing inside each layer's __call__; FSDP's hooks gather the layer again on recompute.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        for index, layer in enumerate(decoder_layers(model)):
            layer.gradient_checkpointing = index % checkpoint_every == 0
    policy = {"mp_policy": MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)}
    if cpu_offload:
        policy["offload_policy"] = CPUOffloadPolicy(pin_memory=torch.cuda.is_available())
    for layer in decoder_layers(model):
        fully_shard(layer, mesh=mesh, reshard_after_forward=reshard_after_forward, **policy)
    shard_untied_embedding_and_head(model, mesh=mesh, reshard_after_forward=reshard_after_forward, **policy)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward, **policy)
    if compile_layers:
        for layer in decoder_layers(model):
            layer.compile(dynamic=True)      # packed micro-batches vary in length: one dynamic-shape graph
    sum_gradients_over_ranks(model)
    setattr(model.get_output_embeddings(), LM_HEAD_STORES_PROBS, lm_head_store_probs)
    setattr(model, PACKED_FORWARD_METHOD, MethodType(_packed_forward, model))
    register_fsdp_forward_method(model, PACKED_FORWARD_METHOD)
    return model


def checked_mesh(model: torch.nn.Module, compute_dtype: torch.dtype | None, mesh: DeviceMesh | None) -> DeviceMesh:
    """The mesh to shard over (default: every rank of the default group), once the stored weights are known to be
    fp32 masters when a lower compute dtype is asked for."""
    if model.dtype != torch.float32 and compute_dtype is not None:
        raise ValueError(f"the model's stored weights are {model.dtype}: load it in float32 so that the optimizer "
                         f"updates fp32 master weights (compute_dtype={compute_dtype} is used for the forward)")
    if mesh is None:
        device_type = "cuda" if next(model.parameters()).is_cuda else "cpu"
        mesh = init_device_mesh(device_type, (dist.get_world_size(),))
    return mesh


def shard_untied_embedding_and_head(model: torch.nn.Module, **fully_shard_kwargs) -> None:
    """An untied embedding and LM head become units of their own: each is gathered only around its use and its
    gradient reduced (in fp32) as soon as it is complete. Left in the root unit, their bf16 copies and gradients
    live through the whole backward and are reduced together at its end — at 8B 2 × 622 M parameters, the ~7 GiB
    that kept one H200's peak above 75 GiB. A tied pair stays in the root (one parameter)."""
    embedding, head = model.get_input_embeddings(), model.get_output_embeddings()
    if head is None or head.weight is embedding.weight:
        return
    fully_shard(embedding, **fully_shard_kwargs)
    fully_shard(head, **fully_shard_kwargs)
    setattr(head, HEAD_LOGPROBS_METHOD, MethodType(_lm_head_outputs, head))
    register_fsdp_forward_method(head, HEAD_LOGPROBS_METHOD)   # FSDP gathers W around the chunked LM head


def sum_gradients_over_ranks(model: torch.nn.Module) -> None:
    """Every FSDP unit reduces gradients as a plain SUM (divide factor 1): the trainer scales each micro-batch's
    loss by its share of the global mini-batch, so the sum is the global mean. (gloo has no pre-multiplied sum;
    dividing by 1 afterwards is free.)"""
    for module in model.modules():
        if hasattr(module, "set_gradient_divide_factor"):
            module.set_gradient_divide_factor(1.0)
            module.set_force_sum_reduction_for_comms(True)


def hold_gathered_weights(model: torch.nn.Module, hold: bool) -> None:
    """For a model sharded with reshard_after_forward=False (trainer.keep_weights_gathered): whether the coming
    backward leaves every unit's compute-dtype weights gathered for the next micro-batch's forward (hold=True) or
    frees them (False: the step's last micro-batch, so that the optimizer updates the shards and the next forward
    gathers the new weights). Holding saves a gather and a cast of every layer per micro-batch; the memory is what
    reshard_after_forward=False already needs at the end of each forward (one compute-dtype copy of the model)."""
    model.set_reshard_after_backward(not hold)


def release_gathered_weights(model: torch.nn.Module) -> None:
    """Free any gathered weights (a no-grad forward with reshard_after_forward=False leaves them gathered, as no
    backward follows to free them). Call before the weights change — an optimizer step or a checkpoint load — so
    that no forward runs on a stale gathered copy; a no-op for units already sharded."""
    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def build_optimizer(model: torch.nn.Module, *, lr: float, betas=(0.9, 0.999), eps: float = 1e-8,
                    weight_decay: float = 0.0, offload_moments: bool = False) -> torch.optim.Optimizer:
    """AdamW over the sharded (DTensor) parameters; its state is sharded like them and kept in their dtype (fp32).
    Fused kernels on GPU (one launch for all parameters), foreach elsewhere. offload_moments: the two moments in
    pinned host memory, streamed through the GPU for the update (offload_adamw.py; 8 instead of 16 B/param on
    the GPU)."""
    if offload_moments:
        from posttrain.trainer.offload_adamw import OffloadedAdamW

        return OffloadedAdamW(model.parameters(), lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    on_gpu = next(model.parameters()).is_cuda
    return torch.optim.AdamW(model.parameters(), lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                             fused=on_gpu or None, foreach=None if on_gpu else True)


def clip_grad_norm(model: torch.nn.Module, max_norm: float) -> float:
    """Clip the global gradient norm of a sharded model; returns the norm before clipping.

    torch.nn.utils.clip_grad_norm_ works on DTensor gradients: the per-shard norms are reduced across the mesh
    (the result is a replicated DTensor), and every shard is scaled by the same factor."""
    norm = torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.grad is not None], max_norm)
    if isinstance(norm, DTensor):
        norm = norm.full_tensor()
    return float(norm)


def full_parameter(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor of a (possibly) sharded parameter; a collective: every rank must call it."""
    return tensor.full_tensor() if isinstance(tensor, DTensor) else tensor
