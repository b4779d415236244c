"""Log-probs of given tokens from a causal LM, without materialising the full [N, T, V] logits at once.

The trainer needs log πθ(y_t) for the sampled tokens only. The hidden states come from the model's body; the
LM head and log-softmax run chunk by chunk over T, so peak extra memory is [N, chunk, V] instead of [N, T, V].
(The MOPD engineer's `topk.py` has the custom-autograd version whose *backward* memory is bounded too.)
"""
from __future__ import annotations

import torch


def token_logprobs_from_hidden(hidden: torch.Tensor, lm_head: torch.nn.Module, target_ids: torch.Tensor,
                               chunk_size: int = 1024) -> torch.Tensor:
    """log softmax(lm_head(hidden))[target]  at temperature 1.   hidden [N,T,H], target_ids [N,T] → [N,T]"""
    pieces = []
    for start in range(0, hidden.shape[1], chunk_size):
        logits = lm_head(hidden[:, start:start + chunk_size]).float()            # [N,c,V]
        targets = target_ids[:, start:start + chunk_size].unsqueeze(-1)          # [N,c,1]
        # log p(y) = logit(y) − logsumexp(logits): avoids keeping a full log-softmax tensor.
        picked = logits.gather(-1, targets).squeeze(-1) - torch.logsumexp(logits, dim=-1)
        pieces.append(picked)
    return torch.cat(pieces, dim=1)


def sequence_token_logprobs(model: torch.nn.Module, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                            chunk_size: int = 1024) -> torch.Tensor:
    """log πθ(x_t | x_<t) for t ≥ 1 of right-padded sequences.   input_ids [N,L] → [N,L-1] (position t-1 ↔ token t)"""
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
    return token_logprobs_from_hidden(hidden[:, :-1], model.get_output_embeddings(), input_ids[:, 1:], chunk_size)
