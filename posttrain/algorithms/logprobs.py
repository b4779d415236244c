"""log πθ of given tokens from a causal LM: the model's body, then the one chunked LM-head kernel.

Both algorithms use the same kernel, `topk.chunked_logprobs_at` (and its K = 1 case `chunked_token_logprobs`):
the LM head and log-softmax run chunk by chunk over tokens from the final hidden states, forward and backward,
so extra memory is O(chunk_size · V) in both passes, never [N, T, V] (docs/algorithms.md §4). GSPO calls
`sequence_token_logprobs` here; MOPD's trainer calls the kernel on the response positions directly.
"""
from __future__ import annotations

import torch

from posttrain.algorithms.topk import DEFAULT_CHUNK_SIZE, chunked_logprobs_at, chunked_token_logprobs

__all__ = ["chunked_logprobs_at", "chunked_token_logprobs", "sequence_token_logprobs"]


def sequence_token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            chunk_size: int = DEFAULT_CHUNK_SIZE) -> torch.Tensor:
    """log πθ(x_t | x_<t) for t ≥ 1 of right-padded sequences, at temperature 1.   input_ids [N,L] → [N,L-1]

    Position t-1 of the result is token t. chunk_size counts tokens (rows of the flattened [N·(L-1)] batch)
    per LM-head chunk. Differentiable; fp32 (fp64 for an fp64 model).
    """
    lm_head = model.get_output_embeddings()
    if getattr(lm_head, "bias", None) is not None:
        raise ValueError("sequence_token_logprobs: the LM head has a bias, which the chunked kernel does not apply; "
                         "posttrain supports bias-free LM heads (true of Qwen-class models)")
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    return chunked_token_logprobs(hidden[:, :-1], lm_head.weight, input_ids[:, 1:], chunk_size)   # [N,L-1]
