"""Padding-free micro-batches: ragged sequences packed end to end into one row, attention kept inside each sequence.

Right-padding a batch of ragged sequences spends compute on pad tokens (half of it when lengths are uniform in
[L/2, L]). Here each micro-batch is ONE row of concatenated tokens under a token budget (dynamic batch size):

    input_ids     [1,T]   s_0 ‖ s_1 ‖ … ‖ s_{S-1}                      T = Σ_i |s_i| ≤ token_budget
    position_ids  [1,T]   0..|s_0|-1, 0..|s_1|-1, …                     (RoPE restarts in every sequence)
    cu_seq_lens   [S+1]   0, |s_0|, |s_0|+|s_1|, …, T                   (int32, the flash-attention convention)

Attention never crosses sequences: the model runs with the attention implementation registered below
(`VARLEN_ATTENTION`), which takes `cu_seq_lens_q/k` and `max_length_q/k` (the keyword names transformers'
flash-attention path uses) and computes causal attention per sequence: PyTorch's flash-attention-2 varlen kernel
on CUDA (`varlen_causal_attention`; grouped-query K/V read in place), one `scaled_dot_product_attention(
is_causal=True)` per sequence elsewhere (exact, the CPU reference). No [T,T] mask is ever built.

Only response tokens are scored: the hidden state at position t predicts token t+1, so the log-prob rows are the
positions just before each response token, and the LM head + log-softmax runs on those rows only, chunk by chunk
(`posttrain.algorithms.topk.chunked_token_logprobs`; never [T,V] logits).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F

from posttrain.algorithms.topk import (DEFAULT_CHUNK_SIZE, chunked_logprobs_at, chunked_token_logprobs,
                                      chunked_topk_and_token_logprobs)

VARLEN_ATTENTION = "posttrain_varlen"
# The name under which an FSDP-sharded model carries `packed_response_logprobs` as an FSDP forward method (fsdp.py
# registers it, so that the root's parameters - embeddings, final norm, LM head - are gathered around the call).
PACKED_FORWARD_METHOD = "posttrain_packed_response_logprobs"
HEAD_LOGPROBS_METHOD = "posttrain_lm_head_outputs"     # on an LM head that is an FSDP unit of its own
# Set True on the LM head (fsdp.shard_model's lm_head_store_probs): its differentiable passes keep p [R,V] in the
# compute dtype for the backward instead of recomputing the logits (topk.chunked_logprobs_at's store_probs).
LM_HEAD_STORES_PROBS = "posttrain_lm_head_stores_probs"


# -- planning -----------------------------------------------------------------------------------------------------
def plan_micro_batches(lengths: list[int], token_budget: int, *, min_micro_batches: int = 0) -> list[list[int]]:
    """Sequence indices per micro-batch: the fewest bins of at most `token_budget` tokens, their loads balanced.

    First-fit decreasing (FFD) gives a bin count; then, for n from the lower bound ⌈Σ lengths / budget⌉ up to that
    count, longest-first into the least-loaded bin that has room (LPT) is tried, and the first n that holds every
    sequence wins. Why not FFD alone: it fills bins to the brim and leaves the rest to a last, near-empty bin (a
    64K-token step at a 16K budget: 4 full bins + 517 tokens), a whole extra pass of every layer (FSDP's gathers and
    reduces included) for a few tokens; balanced bins also bound the peak activation memory by the largest bin, and
    give a compiled model fewer distinct row lengths. FFD's bins are the fallback when LPT needs more of them.

    Deterministic (ties broken by index; bins ordered by their first index; indices ascending inside a bin).
    `min_micro_batches`: FSDP ranks must run the same number of forward/backward passes, so a rank with fewer
    bins than the others splits its fullest multi-sequence bins (and, with fewer sequences than bins, adds
    empty ones, which `pack_micro_batch` turns into a zero-loss dummy). Agree on the count with
    `agree_micro_batch_count`.
    """
    if token_budget <= 0:
        raise ValueError(f"token_budget must be positive, got {token_budget}")
    too_long = [(i, n) for i, n in enumerate(lengths) if n > token_budget]
    if too_long:
        i, n = too_long[0]
        raise ValueError(f"sequence {i} has {n} tokens, more than the micro-batch token budget {token_budget}; "
                         f"raise the token budget to at least the longest sequence ({max(lengths)})")
    longest_first = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins = _first_fit_decreasing(longest_first, lengths, token_budget)
    for count in range(-(-sum(lengths) // token_budget), len(bins) + 1):
        balanced = _least_loaded_first(longest_first, lengths, token_budget, count)
        if balanced is not None:
            bins = balanced
            break
    while len(bins) < min_micro_batches:
        splittable = [b for b in bins if len(b) > 1]
        if not splittable:
            bins.append([])
            continue
        fullest = max(splittable, key=lambda b: (sum(lengths[i] for i in b), -min(b)))
        bins.remove(fullest)
        bins += [fullest[0::2], fullest[1::2]]
    bins = [sorted(b) for b in bins]
    return sorted(bins, key=lambda b: (not b, b[0] if b else 0))


def _first_fit_decreasing(order: list[int], lengths: list[int], token_budget: int) -> list[list[int]]:
    bins: list[list[int]] = []
    room: list[int] = []
    for i in order:
        target = next((b for b, r in enumerate(room) if r >= lengths[i]), None)
        if target is None:
            bins.append([])
            room.append(token_budget)
            target = len(bins) - 1
        bins[target].append(i)
        room[target] -= lengths[i]
    return bins


def _least_loaded_first(order: list[int], lengths: list[int], token_budget: int, count: int
                        ) -> list[list[int]] | None:
    """Each sequence (longest first) into the least-loaded of `count` bins that has room; None if one fits nowhere."""
    bins: list[list[int]] = [[] for _ in range(count)]
    load = [0] * count
    for i in order:
        target = min((b for b in range(count) if load[b] + lengths[i] <= token_budget),
                     key=lambda b: (load[b], b), default=None)
        if target is None:
            return None
        bins[target].append(i)
        load[target] += lengths[i]
    return bins


def agree_micro_batch_count(local_count: int, device: torch.device | str = "cpu") -> int:
    """The largest micro-batch count over all ranks (every FSDP rank must run that many passes)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return local_count
    count = torch.tensor([local_count], dtype=torch.long, device=device)
    dist.all_reduce(count, op=dist.ReduceOp.MAX)
    return int(count.item())


# -- packing ------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PackedMicroBatch:
    """One row of concatenated sequences. S sequences, T tokens, R response tokens."""
    sequence_indices: list[int]            # [S] the caller's index of each packed sequence, in packed order
    input_ids: torch.Tensor                # long[1,T]
    position_ids: torch.Tensor             # long[1,T], restarting at 0 in every sequence
    cu_seq_lens: torch.Tensor              # int32[S+1]
    max_seq_len: int
    response_positions: torch.Tensor       # long[R] row t whose hidden state predicts response token t+1
    response_targets: torch.Tensor         # long[R] = input_ids[0, response_positions + 1]
    response_lengths: list[int]            # [S] |y_i|; the R log-probs split into these, in packed order
    num_tokens: int                        # T, dummy token included

    def to(self, device: torch.device | str) -> "PackedMicroBatch":
        move = {k: getattr(self, k).to(device) for k in
                ("input_ids", "position_ids", "cu_seq_lens", "response_positions", "response_targets")}
        return PackedMicroBatch(**{**self.__dict__, **move})


def pack_micro_batch(prompts: list[list[int]], responses: list[list[int]], indices: list[int], *,
                     pad_to_multiple: int = 1) -> PackedMicroBatch:
    """Concatenate prompt‖response of the sequences `indices` into one row.

    An empty `indices` (a rank with fewer sequences than the agreed micro-batch count) gives a one-token dummy
    with no response tokens: its loss is 0 but it still runs every layer, so FSDP's collectives stay in step.
    pad_to_multiple: round the row's length up with a filler segment (token 0, its own sequence, never scored),
    so that a compiled model sees few distinct shapes (torch.compile recompiles on new length ranges)."""
    for i in indices:
        if not responses[i]:
            raise ValueError(f"sequence {i} has an empty response; drop it before packing (nothing to score)")
        if not prompts[i]:
            raise ValueError(f"sequence {i} has an empty prompt; the first response token needs a position "
                             "before it to be predicted from (prepend a BOS token)")
    rows = [prompts[i] + responses[i] for i in indices] or [[0]]
    lengths = [len(r) for r in rows]
    ids, positions, resp_pos = [], [], []
    start = 0
    for k, i in enumerate(indices):
        ids += rows[k]
        positions += range(lengths[k])
        first = start + len(prompts[i]) - 1          # predicts the first response token
        resp_pos += range(first, first + len(responses[i]))
        start += lengths[k]
    if not indices:
        ids, positions = [0], [0]
    filler = -len(ids) % pad_to_multiple
    if filler:
        ids, positions, rows = ids + [0] * filler, positions + list(range(filler)), rows + [[0] * filler]
        lengths.append(filler)
    input_ids = torch.tensor([ids], dtype=torch.long)
    response_positions = torch.tensor(resp_pos, dtype=torch.long)
    cu = torch.zeros(len(rows) + 1, dtype=torch.int32)
    cu[1:] = torch.tensor(lengths).cumsum(0)
    return PackedMicroBatch(
        sequence_indices=list(indices), input_ids=input_ids,
        position_ids=torch.tensor([positions], dtype=torch.long), cu_seq_lens=cu, max_seq_len=max(lengths),
        response_positions=response_positions, response_targets=input_ids[0, response_positions + 1],
        response_lengths=[len(responses[i]) for i in indices], num_tokens=len(ids))


def pack_batch(prompts: list[list[int]], responses: list[list[int]], token_budget: int, *,
               min_micro_batches: int = 0, pad_to_multiple: int = 1) -> list[PackedMicroBatch]:
    """plan_micro_batches + pack_micro_batch for a whole (per-rank) batch."""
    if len(prompts) != len(responses):
        raise ValueError(f"{len(prompts)} prompts but {len(responses)} responses")
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    return [pack_micro_batch(prompts, responses, b, pad_to_multiple=pad_to_multiple)
            for b in plan_micro_batches(lengths, token_budget, min_micro_batches=min_micro_batches)]


# -- per-sequence tensors -----------------------------------------------------------------------------------------
def pad_per_sequence(flat_R: torch.Tensor, lengths: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """Split packed values [R,...] by sequence into right-padded [S,Tmax,...] plus a float mask [S,Tmax] (1 on real
    tokens).

    The GSPO loss wants [N,T] log-probs and a mask: `gspo_loss(*pad_per_sequence(lp, lengths)…)` keeps every
    sequence counting once. Differentiable (a scatter into zeros)."""
    if flat_R.shape[0] != sum(lengths):
        raise ValueError(f"{flat_R.shape[0]} packed values but the lengths sum to {sum(lengths)}")
    width = max(lengths, default=0)
    row = torch.repeat_interleave(torch.arange(len(lengths), device=flat_R.device),
                                  torch.tensor(lengths, device=flat_R.device))
    starts = torch.tensor([0] + lengths[:-1], device=flat_R.device).cumsum(0) if lengths else row
    col = torch.arange(flat_R.shape[0], device=flat_R.device) - starts[row]
    padded = flat_R.new_zeros(len(lengths), width, *flat_R.shape[1:]).index_put((row, col), flat_R)
    mask = torch.zeros(len(lengths), width, device=flat_R.device)
    mask[row, col] = 1.0
    return padded, mask


# -- model side ---------------------------------------------------------------------------------------------------
def _packed_forward(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                    cu_seq_lens: torch.Tensor, max_seq_len: int, response_positions: torch.Tensor,
                    response_targets: torch.Tensor, chunk_size: int, candidate_ids: torch.Tensor | None = None,
                    top_k: int = 0):
    """One packed row: body → the rows before response tokens → the chunked LM head (`_lm_head_outputs`)."""
    if model.config._attn_implementation != VARLEN_ATTENTION:
        raise ValueError(f"the model uses attention '{model.config._attn_implementation}', which lets packed "
                         f"sequences attend to each other; call posttrain.trainer.packing.use_varlen_attention(model)")
    hidden_1TH = model.get_decoder()(
        input_ids=input_ids, position_ids=position_ids, use_cache=False,
        cu_seq_lens_q=cu_seq_lens, cu_seq_lens_k=cu_seq_lens, max_length_q=max_seq_len, max_length_k=max_seq_len,
    ).last_hidden_state
    hidden_RH = hidden_1TH[0].index_select(0, response_positions)
    head = model.get_output_embeddings()
    if hasattr(head, HEAD_LOGPROBS_METHOD):      # an LM head sharded as its own FSDP unit (fsdp.shard_model)
        return getattr(head, HEAD_LOGPROBS_METHOD)(hidden_RH, response_targets, chunk_size, candidate_ids, top_k)
    return _lm_head_outputs(head, hidden_RH, response_targets, chunk_size, candidate_ids, top_k)


def _lm_head_outputs(head: torch.nn.Module, hidden_RH: torch.Tensor, targets_R: torch.Tensor, chunk_size: int,
                     candidate_ids_RK: torch.Tensor | None = None, top_k: int = 0):
    """What the chunked LM head computes on the R response rows (log softmax(h @ Wᵀ), never [R,V] at once):

        default          log π(y_t)                                       → [R] fp32, differentiable
        candidate_ids    log π(c_tk) for the K candidates, then log π(y_t) → [R,K+1], differentiable (MOPD loss)
        top_k            (top-k ids [R,k], their log-probs [R,k], log π(y_t) [R]), no gradient (MOPD's S_θ)
    """
    # Fresh tensors, not views: FSDP hooks the outputs for backward, and a view invites in-place edits.
    if top_k:
        with torch.no_grad():
            return chunked_topk_and_token_logprobs(hidden_RH, head.weight, top_k, targets_R, chunk_size)
    store_probs = getattr(head, LM_HEAD_STORES_PROBS, False) and torch.is_grad_enabled()   # no backward: no use
    if candidate_ids_RK is not None:
        ids_RK1 = torch.cat([candidate_ids_RK, targets_R.unsqueeze(-1)], dim=-1)     # one LM-head pass for both
        return chunked_logprobs_at(hidden_RH, head.weight, ids_RK1, chunk_size, store_probs).clone()
    return chunked_token_logprobs(hidden_RH, head.weight, targets_R, chunk_size, store_probs).clone()


def _forward_packed(model: torch.nn.Module, micro_batch: PackedMicroBatch, chunk_size: int, **head_request):
    mb = micro_batch.to(next(model.parameters()).device)
    forward = getattr(model, PACKED_FORWARD_METHOD, None)   # FSDP-registered: gathers the weights around it
    args = (mb.input_ids, mb.position_ids, mb.cu_seq_lens, mb.max_seq_len, mb.response_positions,
            mb.response_targets, chunk_size)
    return (forward or partial(_packed_forward, model))(*args, **head_request)


def packed_response_logprobs(model: torch.nn.Module, micro_batch: PackedMicroBatch,
                             chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """log πθ(y_t) of every response token of the micro-batch, fp32 [R], in packed order.

    Split per sequence with `micro_batch.response_lengths` (`pad_per_sequence`). Works on a plain HF causal LM
    and on one sharded by `posttrain.trainer.fsdp.shard_model` (which routes the call through FSDP's hooks)."""
    return _forward_packed(model, micro_batch, chunk_size)


def packed_candidate_logprobs(model: torch.nn.Module, micro_batch: PackedMicroBatch, candidate_ids_RK: torch.Tensor,
                              chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """log πθ at K candidate ids per response token, and of the sampled token last: fp32 [R,K+1], differentiable
    (MOPD's loss). candidate_ids_RK: long [R,K] in packed order."""
    if candidate_ids_RK.shape[0] != micro_batch.response_positions.shape[0]:
        raise ValueError(f"{candidate_ids_RK.shape[0]} rows of candidate ids for "
                         f"{micro_batch.response_positions.shape[0]} response tokens")
    device = next(model.parameters()).device
    return _forward_packed(model, micro_batch, chunk_size, candidate_ids=candidate_ids_RK.to(device))


@torch.no_grad()
def packed_topk(model: torch.nn.Module, micro_batch: PackedMicroBatch, k: int, chunk_size: int = DEFAULT_CHUNK_SIZE):
    """(top-k ids long [R,k], their log-probs [R,k], log π(y_t) [R]) at every response token, in packed order."""
    return _forward_packed(model, micro_batch, chunk_size, top_k=k)


# -- attention ----------------------------------------------------------------------------------------------------
try:  # PyTorch's public varlen wrapper (flash attention; K/V repeated to the query heads where it lacks GQA)
    from torch.nn.attention.varlen import varlen_attn as _varlen_attn
    _VARLEN_PARAMS = frozenset(inspect.signature(_varlen_attn).parameters)
except ImportError:
    _varlen_attn, _VARLEN_PARAMS = None, frozenset()

# The CUDA kernels packed attention can run on (benchmarks/bench_attention_gpu.py compares them on ragged rows):
#   "flash"        aten's flash-attention-2 varlen kernel called directly: grouped-query K/V are read as they are
#                  (Qwen3-4B shapes on an H200: forward + backward 1.95 ms per 13K-token row, 5.5 GiB less peak)
#   "torch_varlen" torch.nn.attention.varlen.varlen_attn, the same kernel behind a wrapper that (before torch 2.12)
#                  has no grouped-query support, so K/V are first repeated to every query head (2.2 ms)
# cuDNN's ragged attention (aten._cudnn_attention_forward with offsets) was measured too and is not offered: with
# grouped-query heads it ran at 1.4 TFLOP/s and its gradients did not match the reference
# (benchmarks/attention_h200.json).
VARLEN_BACKENDS = ("flash", "torch_varlen")
DEFAULT_VARLEN_BACKEND = "flash"
VARLEN_BACKEND_ATTR = "posttrain_varlen_backend"     # set on each attention module by use_varlen_attention


def varlen_kernel_available() -> bool:
    return hasattr(torch.ops.aten, "_flash_attention_forward") or _varlen_attn is not None


def varlen_causal_attention(q_THD: torch.Tensor, k_THD: torch.Tensor, v_THD: torch.Tensor, cu: torch.Tensor,
                            max_len: int, scale: float, backend: str = DEFAULT_VARLEN_BACKEND) -> torch.Tensor:
    """Causal attention within each [cu[i], cu[i+1]) segment on CUDA.  q [T,Hq,D], k/v [T,Hkv,D] → [T,Hq,D]

    aten's flash kernel is differentiable (its backward is registered with autograd) and traceable by
    torch.compile; cu is int32 on the device."""
    if backend == "flash":
        return torch.ops.aten._flash_attention_forward(q_THD, k_THD, v_THD, cu, cu, max_len, max_len, 0.0, True,
                                                       False, scale=scale)[0]
    if backend != "torch_varlen":
        raise ValueError(f"unknown packed-attention backend {backend!r}; one of {VARLEN_BACKENDS}")
    kwargs = {"is_causal": True} if "is_causal" in _VARLEN_PARAMS else {"window_size": (-1, 0)}  # (-1, 0) = causal
    if "scale" in _VARLEN_PARAMS:
        kwargs["scale"] = scale
    elif scale != q_THD.shape[-1] ** -0.5:
        raise ValueError("this torch's varlen_attn has no scale argument and the model's scale is not 1/sqrt(d)")
    if k_THD.shape[1] != q_THD.shape[1]:
        if "enable_gqa" in _VARLEN_PARAMS:
            kwargs["enable_gqa"] = True
        else:
            groups = q_THD.shape[1] // k_THD.shape[1]
            k_THD, v_THD = k_THD.repeat_interleave(groups, 1), v_THD.repeat_interleave(groups, 1)
    return _varlen_attn(q_THD, k_THD, v_THD, cu, cu, max_len, max_len, **kwargs)


def varlen_attention_forward(module, query, key, value, attention_mask, scaling=None, dropout=0.0,
                             sliding_window=None, cu_seq_lens_q=None, max_length_q=None, **kwargs):
    """Causal attention inside each packed sequence.  query [1,Hq,T,D], key/value [1,Hkv,T,D] → ([1,T,Hq,D], None)"""
    if cu_seq_lens_q is None or max_length_q is None:
        raise ValueError(f"attention '{VARLEN_ATTENTION}' needs cu_seq_lens_q and max_length_q: run packed "
                         "micro-batches through posttrain.trainer.packing.packed_response_logprobs")
    if query.shape[0] != 1 or sliding_window is not None or (dropout and module.training):
        raise ValueError("packed attention supports one packed row, no sliding window and no attention dropout")
    scale = scaling if scaling is not None else query.shape[-1] ** -0.5
    q_THD, k_THD, v_THD = (t[0].transpose(0, 1) for t in (query, key, value))
    if q_THD.is_cuda and q_THD.dtype in (torch.bfloat16, torch.float16) and varlen_kernel_available():
        out_THD = varlen_causal_attention(q_THD, k_THD, v_THD, cu_seq_lens_q.to(torch.int32), int(max_length_q),
                                          scale, getattr(module, VARLEN_BACKEND_ATTR, DEFAULT_VARLEN_BACKEND))
    else:
        bounds = cu_seq_lens_q.tolist()
        pieces = [F.scaled_dot_product_attention(query[:, :, s:e], key[:, :, s:e], value[:, :, s:e], is_causal=True,
                                                 scale=scale, enable_gqa=key.shape[1] != query.shape[1])
                  for s, e in zip(bounds[:-1], bounds[1:])]
        out_THD = torch.cat(pieces, dim=2)[0].transpose(0, 1)
    return out_THD.unsqueeze(0), None


def register_varlen_attention() -> None:
    """Make `attn_implementation="posttrain_varlen"` known to transformers (no mask is built for it)."""
    from transformers import AttentionInterface

    # No mask function is registered on purpose: transformers then builds no mask for this implementation.
    AttentionInterface.register(VARLEN_ATTENTION, varlen_attention_forward)


def use_varlen_attention(model: torch.nn.Module, backend: str = DEFAULT_VARLEN_BACKEND) -> torch.nn.Module:
    """Switch a loaded HF model to packed-sequence attention (in place); returns it. backend: the CUDA kernel
    (VARLEN_BACKENDS; CPU always computes per sequence)."""
    if backend not in VARLEN_BACKENDS:
        raise ValueError(f"unknown packed-attention backend {backend!r}; one of {VARLEN_BACKENDS}")
    register_varlen_attention()
    model.set_attn_implementation(VARLEN_ATTENTION)
    for module in model.modules():
        if hasattr(module, "is_causal") and hasattr(module, "scaling"):      # an attention module
            setattr(module, VARLEN_BACKEND_ATTR, backend)
    return model
