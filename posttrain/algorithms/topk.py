"""Log-probs and top-k from hidden states, chunked over tokens (docs/algorithms.md §4): the project's one LM-head
kernel. GSPO reaches it through logprobs.sequence_token_logprobs; MOPD's trainer calls it on the response positions.

Full logits are [T, V]: at T = 32K and V = 152K that is 19 GB in fp32, and autograd would keep that plus its
log-softmax for the backward pass. Everything here goes from the final hidden states h[R,H] and the LM-head
weight W[V,H] straight to what MOPD needs, one chunk of rows at a time (the idea of fused linear
cross-entropy kernels, written in plain torch):

    logits[c,V]  = h[c] @ W^T                      (upcast to fp32 before any reduction)
    lse[c]       = logsumexp_V(logits)             (full-vocabulary normalisation, temperature 1)
    logp[c,j]    = logits[c, ids[c,j]] − lse[c]

Backward (the custom autograd Function below) recomputes each chunk's logits instead of storing them, so the
extra memory in both passes is O(chunk · V), not O(T · V):

    dlogits[c,v] = Σ_j g[c,j] · (1[v = ids[c,j]] − p[c,v])      p = exp(logits − lse)
    dh[c]        = dlogits @ W          dW += dlogits^T @ h[c]

With `store_probs` (bf16/fp16 compute on a GPU with memory to spare) the forward keeps p instead, rounded to the
compute dtype ([R,V], 2 bytes an entry): the backward then skips the logits matmul (2·R·V·H FLOPs, a third of
the LM head's cost) and the exp pass; the K target entries stay exact (from the fp32 log-probs).

Conventions: `hidden` is the body's final (post-norm) hidden state; the row at position t predicts token t+1,
so callers shift ids exactly as for ordinary logits. The LM head has no bias (true of Qwen-class models).
The sampling temperature never enters here (log-probs in the losses are at temperature 1, docs/algorithms.md §0).
Leading dimensions are free: hidden [N,T,H] or [T,H] (or any [...,H]); ids carry the same leading shape.
"""
from __future__ import annotations

import functools

import torch

DEFAULT_CHUNK_SIZE = 1024


def _accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    # bf16/fp16 logits are too coarse for logsumexp over 152K entries; fp32 (or fp64 in tests) is kept.
    return torch.promote_types(dtype, torch.float32)


# On CUDA, torch.mm / torch.addmm accept out_dtype: bf16 operands, fp32 result straight from the matrix unit's
# fp32 accumulators. That skips a rounded bf16 [C,V] (or [V,H]) temporary and a conversion pass over it.
# Other backends lack these kernels; the fallback rounds to the input dtype first, as a plain `h @ W.T` would.
_out_dtype_kernels_ok = True


def _fp32_out_kernel_applies(a: torch.Tensor, out_dtype: torch.dtype) -> bool:
    return (_out_dtype_kernels_ok and a.is_cuda and a.dtype in (torch.bfloat16, torch.float16)
            and out_dtype == torch.float32)


def _matmul_to(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """a @ b with the result in out_dtype."""
    global _out_dtype_kernels_ok
    if _fp32_out_kernel_applies(a, out_dtype):
        try:
            return torch.mm(a, b, out_dtype=out_dtype)
        except (RuntimeError, TypeError):
            _out_dtype_kernels_ok = False
    return (a @ b).to(out_dtype)


def _accumulate_matmul(acc: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> None:
    """acc += a @ b, acc in fp32/fp64, a and b possibly bf16."""
    global _out_dtype_kernels_ok
    if _fp32_out_kernel_applies(a, acc.dtype):
        try:
            torch.addmm(acc, a, b, out_dtype=acc.dtype, out=acc)
            return
        except (RuntimeError, TypeError):
            _out_dtype_kernels_ok = False
    acc += (a @ b).to(acc.dtype)


def _check_ids(ids: torch.Tensor, vocab_size: int, what: str) -> None:
    if ids.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"{what} must be an integer tensor, got {ids.dtype}")
    if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab_size):
        raise ValueError(f"{what} must lie in [0, {vocab_size}) (got min {int(ids.min())}, max {int(ids.max())}); "
                         "replace padding ids with a valid id such as 0 and mask those positions out")


def chunk_logprobs(logits_CV: torch.Tensor, ids_CK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """logp[c,k] = logits[c, ids[c,k]] − lse[c],  lse[c] = logsumexp_v logits[c,v].   → (logp [C,K], lse [C])"""
    lse_C = torch.logsumexp(logits_CV, dim=-1)
    return logits_CV.gather(-1, ids_CK) - lse_C.unsqueeze(-1), lse_C


def chunk_dlogits(logits_CV: torch.Tensor, lse_C: torch.Tensor, grad_CK: torch.Tensor, ids_CK: torch.Tensor,
                  out_dtype: torch.dtype) -> torch.Tensor:
    """∂L/∂logits of one chunk, in out_dtype (the dtype of the matmuls that consume it).   → [C,V]

        dlogits[c,v] = Σ_j g[c,j] · 1[v = ids[c,j]]  −  p[c,v] · Σ_j g[c,j]        p = exp(logits − lse)

    The dense part is rounded to out_dtype straight away (one read of the fp32 logits, one write); the K
    target entries are then overwritten with their exact fp32 value rounded once. Adding g in a bf16 buffer
    instead would cancel catastrophically at confident tokens, where p → 1 and the entry g·(1 − p) → 0."""
    grad_sum_C1 = grad_CK.sum(-1, keepdim=True)
    dense_CV = ((logits_CV - lse_C.unsqueeze(-1)).exp() * -grad_sum_C1).to(out_dtype)
    logp_target_CK = logits_CV.gather(-1, ids_CK) - lse_C.unsqueeze(-1)
    return dense_CV.scatter(-1, ids_CK, _exact_target_entries(logp_target_CK, grad_CK, ids_CK).to(out_dtype))


def _exact_target_entries(logp_target_CK: torch.Tensor, grad_CK: torch.Tensor, ids_CK: torch.Tensor) -> torch.Tensor:
    """dlogits at the K targets in full precision: every g[c,j] whose id equals ids[c,k] (ids may repeat), minus
    p[c, ids[c,k]] · Σ_j g[c,j], with p from the fp32 log-prob.   → [C,K]"""
    same_id_CKK = ids_CK.unsqueeze(-1) == ids_CK.unsqueeze(-2)
    target_grad_CK = (same_id_CKK.to(grad_CK.dtype) * grad_CK.unsqueeze(-2)).sum(-1)
    return target_grad_CK - logp_target_CK.exp() * grad_CK.sum(-1, keepdim=True)


def chunk_logprobs_and_probs(logits_CV: torch.Tensor, ids_CK: torch.Tensor, probs_dtype: torch.dtype
                             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """chunk_logprobs, plus p[c,v] = exp(logits − lse) rounded to probs_dtype, for a backward without the logits
    recompute.   → (logp [C,K], lse [C], p [C,V])"""
    lse_C = torch.logsumexp(logits_CV, dim=-1)
    shifted_CV = logits_CV - lse_C.unsqueeze(-1)
    return shifted_CV.gather(-1, ids_CK), lse_C, shifted_CV.exp().to(probs_dtype)


def chunk_dlogits_from_probs(probs_CV: torch.Tensor, logprobs_CK: torch.Tensor, grad_CK: torch.Tensor,
                             ids_CK: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """chunk_dlogits from the stored (rounded) p instead of recomputed logits.   → [C,V] in out_dtype

        dlogits[c,v] = Σ_j g[c,j] · 1[v = ids[c,j]]  −  p[c,v] · Σ_j g[c,j]

    The dense part uses the stored p (one more rounding than the recompute: p itself was rounded); the K target
    entries use p = exp(logp) from the fp32 log-probs, exact as in chunk_dlogits (no cancellation at p → 1)."""
    dense_CV = (probs_CV.to(grad_CK.dtype) * -grad_CK.sum(-1, keepdim=True)).to(out_dtype)
    return dense_CV.scatter(-1, ids_CK, _exact_target_entries(logprobs_CK, grad_CK, ids_CK).to(out_dtype))


def _chunk_dlogits_in_place(logits_CV, lse_C, grad_CK, ids_CK, out_dtype):
    """chunk_dlogits for out_dtype == the logits' dtype (fp32 / fp64: no rounding to fear), built in place in the
    [C,V] buffer the caller no longer needs: three passes, no temporaries (eager CPU)."""
    dlogits_CV = logits_CV.sub_(lse_C.unsqueeze(-1)).exp_()                      # p[c,v]
    dlogits_CV.mul_(-grad_CK.sum(-1, keepdim=True))
    return dlogits_CV.scatter_add_(-1, ids_CK, grad_CK)


# On CUDA the two element-wise steps run compiled: each becomes one or two kernels that read the fp32 [C,V]
# logits once, instead of eager torch's sub / exp / mul / scatter / cast passes (and logsumexp's max / sub / exp /
# sum temporaries) — ~10% of a 0.6B update step. CPU keeps them eager (no compile wait), the backward in place.
@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True)     # on first use: importing torch._dynamo costs CPU processes start-up


def _on_device(fn, tensor: torch.Tensor):
    return _compiled(fn) if tensor.is_cuda else fn


def _logprobs_step(logits_CV: torch.Tensor):
    return _on_device(chunk_logprobs, logits_CV)


def _dlogits_step(logits_CV: torch.Tensor, out_dtype: torch.dtype):
    if logits_CV.is_cuda:
        return _compiled(chunk_dlogits)
    return _chunk_dlogits_in_place if out_dtype == logits_CV.dtype else chunk_dlogits


class _ChunkedLogprobsAt(torch.autograd.Function):
    """logp[R,K] = log_softmax(h @ W^T)[r, ids[r,k]], forward and backward chunked over rows R."""

    @staticmethod
    def forward(ctx, hidden_RH: torch.Tensor, weight_VH: torch.Tensor, ids_RK: torch.Tensor,
                chunk_size: int, store_probs: bool = False) -> torch.Tensor:
        acc_dtype = _accumulation_dtype(hidden_RH.dtype)
        num_rows = hidden_RH.shape[0]
        logprobs_RK = torch.empty(ids_RK.shape, dtype=acc_dtype, device=hidden_RH.device)
        lse_R = torch.empty(num_rows, dtype=acc_dtype, device=hidden_RH.device)
        probs_RV = (torch.empty(num_rows, weight_VH.shape[0], dtype=hidden_RH.dtype, device=hidden_RH.device)
                    if store_probs else None)
        for start in range(0, num_rows, chunk_size):
            stop = min(start + chunk_size, num_rows)
            logits_CV = _matmul_to(hidden_RH[start:stop], weight_VH.T, acc_dtype)
            if store_probs:
                logprobs_RK[start:stop], lse_R[start:stop], probs_RV[start:stop] = _on_device(
                    chunk_logprobs_and_probs, logits_CV)(logits_CV, ids_RK[start:stop], hidden_RH.dtype)
            else:
                logprobs_RK[start:stop], lse_R[start:stop] = _logprobs_step(logits_CV)(
                    logits_CV, ids_RK[start:stop])
            del logits_CV
        # Only h, W, ids and one float per row are kept (the logits are recomputed in backward), or with
        # store_probs the rounded p and the fp32 log-probs of the targets.
        ctx.save_for_backward(hidden_RH, weight_VH, ids_RK, lse_R, probs_RV, logprobs_RK if store_probs else None)
        ctx.chunk_size = chunk_size
        return logprobs_RK

    @staticmethod
    def backward(ctx, grad_RK: torch.Tensor):
        hidden_RH, weight_VH, ids_RK, lse_R, probs_RV, logprobs_RK = ctx.saved_tensors
        need_hidden, need_weight = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        acc_dtype = lse_R.dtype
        grad_hidden = torch.empty_like(hidden_RH) if need_hidden else None
        # The weight gradient sums over every chunk: accumulate in fp32 even when W is bf16.
        grad_weight_acc = (torch.zeros(weight_VH.shape, dtype=acc_dtype, device=weight_VH.device)
                           if need_weight else None)
        grad_RK = grad_RK.to(acc_dtype)
        num_rows = hidden_RH.shape[0]
        for start in range(0, num_rows, ctx.chunk_size):
            stop = min(start + ctx.chunk_size, num_rows)
            hidden_CH = hidden_RH[start:stop]
            grad_CK = grad_RK[start:stop]
            if probs_RV is not None:
                dlogits_CV = _on_device(chunk_dlogits_from_probs, grad_CK)(
                    probs_RV[start:stop], logprobs_RK[start:stop], grad_CK, ids_RK[start:stop], hidden_RH.dtype)
            else:
                logits_CV = _matmul_to(hidden_CH, weight_VH.T, acc_dtype)
                dlogits_CV = _dlogits_step(logits_CV, hidden_RH.dtype)(logits_CV, lse_R[start:stop], grad_CK,
                                                                        ids_RK[start:stop], hidden_RH.dtype)
                del logits_CV
            if need_hidden:
                grad_hidden[start:stop] = dlogits_CV @ weight_VH
            if need_weight:
                _accumulate_matmul(grad_weight_acc, dlogits_CV.T, hidden_CH)
            del dlogits_CV
        grad_weight = grad_weight_acc.to(weight_VH.dtype) if need_weight else None
        return grad_hidden, grad_weight, None, None, None


def chunked_logprobs_at(hidden: torch.Tensor, lm_head_weight: torch.Tensor, ids: torch.Tensor,
                        chunk_size: int = DEFAULT_CHUNK_SIZE, store_probs: bool = False) -> torch.Tensor:
    """Differentiable log πθ(ids) at given candidate ids, without materialising [T, V] logits.

        logp[...,k] = log_softmax(hidden @ W^T)[..., ids[...,k]]

    hidden [...,H] (e.g. [N,T,H]); lm_head_weight W [V,H]; ids long [...,K] (e.g. the student's top-k ids
    from π_old, for the MOPD loss). Returns [...,K] in fp32 (fp64 if the inputs are fp64). Gradients flow to
    hidden and W; peak extra memory in forward and backward is O(chunk_size · V). store_probs: keep p [R,V] in
    hidden's dtype from forward to backward (R·V more entries held) instead of recomputing the logits.
    """
    if ids.shape[:-1] != hidden.shape[:-1]:
        raise ValueError(f"ids leading shape {tuple(ids.shape[:-1])} must match hidden's {tuple(hidden.shape[:-1])}")
    if lm_head_weight.ndim != 2 or lm_head_weight.shape[1] != hidden.shape[-1]:
        raise ValueError(f"lm_head_weight must be [V, H={hidden.shape[-1]}], got {tuple(lm_head_weight.shape)}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    _check_ids(ids, lm_head_weight.shape[0], "ids")
    lead_shape, hidden_size, num_ids = hidden.shape[:-1], hidden.shape[-1], ids.shape[-1]
    hidden_RH = hidden.reshape(-1, hidden_size)
    ids_RK = ids.reshape(-1, num_ids).to(torch.int64)
    logprobs_RK = _ChunkedLogprobsAt.apply(hidden_RH, lm_head_weight, ids_RK, chunk_size, store_probs)
    return logprobs_RK.reshape(*lead_shape, num_ids)


def chunked_token_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, token_ids: torch.Tensor,
                           chunk_size: int = DEFAULT_CHUNK_SIZE, store_probs: bool = False) -> torch.Tensor:
    """Differentiable log πθ(y_t) of one given token per position.   hidden [...,H], token_ids [...] → [...]

    The K = 1 case of `chunked_logprobs_at` (same bounded memory in forward and backward).
    """
    return chunked_logprobs_at(hidden, lm_head_weight, token_ids.unsqueeze(-1), chunk_size, store_probs).squeeze(-1)


@torch.no_grad()
def chunked_topk(hidden: torch.Tensor, lm_head_weight: torch.Tensor, k: int,
                 chunk_size: int = DEFAULT_CHUNK_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """The k most likely next tokens and their full-vocabulary log-probs (no gradient).

        topk_ids[...,k], topk_logprobs[...,k] = TopK_k( log_softmax(hidden @ W^T) )     sorted descending

    This is S_θ of docs/algorithms.md §2.3 when called with the weights that generated the rollout (π_old).
    Returns (long [...,k], fp32 [...,k]).
    """
    ids, logprobs, _ = _topk_pass(hidden, lm_head_weight, k, None, chunk_size)
    return ids, logprobs


@torch.no_grad()
def chunked_topk_and_token_logprobs(hidden: torch.Tensor, lm_head_weight: torch.Tensor, k: int,
                                    token_ids: torch.Tensor, chunk_size: int = DEFAULT_CHUNK_SIZE
                                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One pass for the start of a MOPD update: (topk_ids[...,k], topk_logprobs[...,k], token_logprobs[...]).

    token_logprobs is log π_old(y_t) of the sampled tokens (needed for the gate, the reverse-KL metric and
    the empty-overlap fallback); computing it with the top-k saves a second LM-head pass over T.
    """
    if token_ids.shape != hidden.shape[:-1]:
        raise ValueError(f"token_ids shape {tuple(token_ids.shape)} must be hidden's leading shape "
                         f"{tuple(hidden.shape[:-1])}")
    return _topk_pass(hidden, lm_head_weight, k, token_ids, chunk_size)


def _topk_pass(hidden, lm_head_weight, k, token_ids, chunk_size):
    vocab_size, hidden_size = lm_head_weight.shape
    if hidden.shape[-1] != hidden_size:
        raise ValueError(f"lm_head_weight must be [V, H={hidden.shape[-1]}], got {tuple(lm_head_weight.shape)}")
    if not 1 <= k <= vocab_size:
        raise ValueError(f"k must be in [1, V={vocab_size}], got {k}")
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be ≥ 1, got {chunk_size}")
    lead_shape = hidden.shape[:-1]
    hidden_RH = hidden.reshape(-1, hidden_size)
    num_rows = hidden_RH.shape[0]
    acc_dtype = _accumulation_dtype(hidden.dtype)
    topk_ids_RK = torch.empty(num_rows, k, dtype=torch.int64, device=hidden.device)
    topk_logprobs_RK = torch.empty(num_rows, k, dtype=acc_dtype, device=hidden.device)
    token_logprobs_R = None
    if token_ids is not None:
        _check_ids(token_ids, vocab_size, "token_ids")
        token_ids_R = token_ids.reshape(-1).to(torch.int64)
        token_logprobs_R = torch.empty(num_rows, dtype=acc_dtype, device=hidden.device)
    for start in range(0, num_rows, chunk_size):
        stop = min(start + chunk_size, num_rows)
        logits_CV = _matmul_to(hidden_RH[start:stop], lm_head_weight.T, acc_dtype)
        lse_C = torch.logsumexp(logits_CV, dim=-1, keepdim=True)
        top_values_CK, top_ids_CK = torch.topk(logits_CV, k, dim=-1)          # sorted, largest first
        topk_ids_RK[start:stop] = top_ids_CK
        topk_logprobs_RK[start:stop] = top_values_CK - lse_C
        if token_ids is not None:
            picked = logits_CV.gather(-1, token_ids_R[start:stop].unsqueeze(-1))
            token_logprobs_R[start:stop] = (picked - lse_C).squeeze(-1)
        del logits_CV
    topk_ids = topk_ids_RK.reshape(*lead_shape, k)
    topk_logprobs = topk_logprobs_RK.reshape(*lead_shape, k)
    token_logprobs = token_logprobs_R.reshape(lead_shape) if token_logprobs_R is not None else None
    return topk_ids, topk_logprobs, token_logprobs
