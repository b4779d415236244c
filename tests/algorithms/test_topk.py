"""Chunked student-side log-probs / top-k against the naive full-logits computation (float64, CPU)."""
import pytest
import torch

from posttrain.algorithms.topk import (
    chunked_logprobs_at,
    chunked_token_logprobs,
    chunked_topk,
    chunked_topk_and_token_logprobs,
)

pytestmark = pytest.mark.unit


def _inputs(n=2, t=7, h=5, v=11, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, t, h, generator=gen, dtype=dtype)
    weight = torch.randn(v, h, generator=gen, dtype=dtype)
    return hidden, weight, gen


def _naive_logprobs(hidden, weight):
    return torch.log_softmax(hidden @ weight.T, dim=-1)            # [...,V], the thing we avoid materialising


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 14, 100])        # 1 row, uneven, exact multiple, ≥ rows
def test_token_logprobs_values_and_gradients_match_naive(chunk_size):
    hidden, weight, gen = _inputs()
    token_ids = torch.randint(0, weight.shape[0], hidden.shape[:-1], generator=gen)
    upstream = torch.randn(hidden.shape[:-1], generator=gen, dtype=torch.float64)   # arbitrary dL/dlogp

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    chunked = chunked_token_logprobs(h1, w1, token_ids, chunk_size=chunk_size)
    (chunked * upstream).sum().backward()

    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    naive = _naive_logprobs(h2, w2).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    (naive * upstream).sum().backward()

    assert chunked.shape == token_ids.shape
    torch.testing.assert_close(chunked, naive, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-12, atol=1e-12)


def test_logprobs_at_candidates_including_repeated_ids_matches_naive():
    hidden, weight, gen = _inputs(n=3, t=4)
    cand_ids = torch.randint(0, weight.shape[0], (3, 4, 5), generator=gen)
    cand_ids[0, 0] = torch.tensor([2, 2, 2, 7, 7])                   # repeats: the scatter must add, not overwrite
    upstream = torch.randn(cand_ids.shape, generator=gen, dtype=torch.float64)

    h1, w1 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    (chunked_logprobs_at(h1, w1, cand_ids, chunk_size=5) * upstream).sum().backward()
    h2, w2 = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    naive = _naive_logprobs(h2, w2).gather(-1, cand_ids)
    (naive * upstream).sum().backward()

    torch.testing.assert_close(chunked_logprobs_at(hidden, weight, cand_ids, 5), naive.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(h1.grad, h2.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(w1.grad, w2.grad, rtol=1e-12, atol=1e-12)


def test_two_dimensional_hidden_and_gradcheck():
    hidden, weight, gen = _inputs(n=1, t=6, h=3, v=5)
    hidden = hidden[0].requires_grad_()                                 # [T,H]
    weight = weight.requires_grad_()
    ids = torch.randint(0, 5, (6, 2), generator=gen)
    assert torch.autograd.gradcheck(lambda h, w: chunked_logprobs_at(h, w, ids, chunk_size=4), (hidden, weight))


def test_hand_computed_single_row():
    # h = [1, 0], W rows = [0,0], [1,0], [2,0]  →  logits [0, 1, 2], lse = log(1 + e + e²)
    hidden = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
    weight = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 0.0]], dtype=torch.float64)
    lse = torch.log(torch.tensor(1 + torch.e + torch.e ** 2, dtype=torch.float64))
    got = chunked_token_logprobs(hidden, weight, torch.tensor([1]))
    torch.testing.assert_close(got, (1.0 - lse).reshape(1))
    ids, logprobs = chunked_topk(hidden, weight, k=2)
    assert ids.tolist() == [[2, 1]]
    torch.testing.assert_close(logprobs, torch.stack([2.0 - lse, 1.0 - lse]).reshape(1, 2))


@pytest.mark.parametrize("chunk_size", [1, 5, 64])
def test_topk_matches_naive_and_has_no_grad(chunk_size):
    hidden, weight, gen = _inputs(n=2, t=9, v=40)
    hidden.requires_grad_()
    ids, logprobs = chunked_topk(hidden, weight, k=6, chunk_size=chunk_size)
    naive_values, naive_ids = _naive_logprobs(hidden.detach(), weight).topk(6, dim=-1)
    assert ids.shape == (2, 9, 6) and ids.dtype == torch.int64
    assert torch.equal(ids, naive_ids)
    torch.testing.assert_close(logprobs, naive_values, rtol=0, atol=1e-12)
    assert not logprobs.requires_grad
    assert bool((logprobs[..., :-1] >= logprobs[..., 1:]).all())        # sorted descending


def test_topk_and_token_logprobs_in_one_pass():
    hidden, weight, gen = _inputs(n=2, t=5, v=30)
    token_ids = torch.randint(0, 30, (2, 5), generator=gen)
    ids, top_lp, tok_lp = chunked_topk_and_token_logprobs(hidden, weight, 4, token_ids, chunk_size=3)
    full = _naive_logprobs(hidden, weight)
    assert torch.equal(ids, full.topk(4, dim=-1).indices)
    torch.testing.assert_close(top_lp, full.topk(4, dim=-1).values, rtol=0, atol=1e-12)
    torch.testing.assert_close(tok_lp, full.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1), rtol=0, atol=1e-12)


def test_bf16_inputs_upcast_reductions_and_keep_grad_dtypes():
    hidden, weight, gen = _inputs(n=1, t=8, h=16, v=64, dtype=torch.float32)
    token_ids = torch.randint(0, 64, (1, 8), generator=gen)
    h = hidden.to(torch.bfloat16).requires_grad_()
    w = weight.to(torch.bfloat16).requires_grad_()
    got = chunked_token_logprobs(h, w, token_ids, chunk_size=3)
    assert got.dtype == torch.float32
    got.sum().backward()
    assert h.grad.dtype == torch.bfloat16 and w.grad.dtype == torch.bfloat16
    # reference: the same bf16 logits, log-softmax in fp64
    ref = torch.log_softmax((h.detach() @ w.detach().T).double(), -1).gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got.double(), ref, rtol=0, atol=1e-5)


def test_bad_ids_are_rejected_with_a_fix():
    hidden, weight, _ = _inputs()
    bad = torch.full(hidden.shape[:-1], -100)
    with pytest.raises(ValueError, match="replace padding ids"):
        chunked_token_logprobs(hidden, weight, bad)
    with pytest.raises(ValueError, match="k must be"):
        chunked_topk(hidden, weight, k=weight.shape[0] + 1)


@pytest.mark.gpu
def test_cuda_matches_cpu_float64():
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    hidden, weight, gen = _inputs(n=2, t=33, h=8, v=50)
    ids = torch.randint(0, 50, (2, 33, 3), generator=gen)
    cpu = chunked_logprobs_at(hidden, weight, ids, chunk_size=7)
    gpu = chunked_logprobs_at(hidden.cuda(), weight.cuda(), ids.cuda(), chunk_size=7).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=0, atol=1e-10)


@pytest.mark.gpu
@pytest.mark.parametrize("store_probs", [False, True])
def test_cuda_bf16_chunked_matches_fp64_reference(store_probs):
    """bf16 on CUDA (the out_dtype fast path, compiled element-wise steps) against fp64 math on the same bf16
    values, across several chunks; with the logits recomputed in backward or p stored from forward."""
    if not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    gen = torch.Generator().manual_seed(5)
    hidden = torch.randn(300, 64, generator=gen).bfloat16()
    weight = (torch.randn(1000, 64, generator=gen) / 4).bfloat16()
    ids = torch.randint(0, 1000, (300, 4), generator=gen)
    upstream = torch.randn(300, 4, generator=gen)
    h = hidden.cuda().requires_grad_()
    w = weight.cuda().requires_grad_()
    got = chunked_logprobs_at(h, w, ids.cuda(), chunk_size=64, store_probs=store_probs)
    (got * upstream.cuda()).sum().backward()
    h64, w64 = hidden.double().requires_grad_(), weight.double().requires_grad_()
    ref = torch.log_softmax(h64 @ w64.T, -1).gather(-1, ids)
    (ref * upstream.double()).sum().backward()

    def rel(a, b):
        return float((a.detach().cpu().double() - b.detach()).norm() / b.detach().norm())

    assert rel(got, ref) < 1e-3
    assert rel(h.grad, h64.grad) < 1e-2 and rel(w.grad, w64.grad) < 1e-2


def _tiny_causal_lm(tie: bool, dtype=torch.float32):
    from transformers import AutoModelForCausalLM, Qwen3Config

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=37, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, head_dim=8, tie_word_embeddings=tie)
    return AutoModelForCausalLM.from_config(config).to(dtype)


@pytest.mark.parametrize("tie", [True, False])
def test_sequence_token_logprobs_runs_on_the_one_chunked_kernel(tie):
    """GSPO's model-level log-probs are the chunked kernel's: against the frozen pre-unification version (fp32, as
    trained) they are bitwise equal when a micro-batch fits one chunk, and equal to rounding when it spans several
    chunks (the LM-head weight gradient is then summed chunk by chunk)."""
    from posttrain.algorithms.logprobs import sequence_token_logprobs
    from tests.algorithms.frozen_pre_split import old_token_logprobs_from_hidden

    model = _tiny_causal_lm(tie)
    gen = torch.Generator().manual_seed(1)
    input_ids = torch.randint(0, 37, (3, 9), generator=gen)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, 6:] = 0                                              # right padding
    upstream = torch.randn(3, 8, generator=gen)

    def old_path():
        body = model.get_decoder()
        position_ids = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        hidden = body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids).last_hidden_state
        return old_token_logprobs_from_hidden(hidden[:, :-1], model.get_output_embeddings(), input_ids[:, 1:])

    def values_and_grads(fn):
        model.zero_grad()
        logprobs = fn()
        (logprobs * upstream).sum().backward()
        return logprobs.detach(), {name: p.grad.clone() for name, p in model.named_parameters()}

    old_lp, old_grads = values_and_grads(old_path)
    one_chunk_lp, one_chunk_grads = values_and_grads(
        lambda: sequence_token_logprobs(model, input_ids, attention_mask, chunk_size=24))   # 3·8 rows: one chunk
    assert torch.equal(one_chunk_lp, old_lp)
    assert all(torch.equal(one_chunk_grads[name], old_grads[name]) for name in old_grads)
    chunked_lp, chunked_grads = values_and_grads(
        lambda: sequence_token_logprobs(model, input_ids, attention_mask, chunk_size=5))    # 5 chunks, uneven
    torch.testing.assert_close(chunked_lp, old_lp, rtol=0, atol=1e-6)
    for name in old_grads:
        torch.testing.assert_close(chunked_grads[name], old_grads[name], rtol=1e-5, atol=1e-6)


def test_sequence_token_logprobs_refuses_an_lm_head_with_bias():
    from posttrain.algorithms.logprobs import sequence_token_logprobs

    model = _tiny_causal_lm(tie=False)
    model.lm_head.bias = torch.nn.Parameter(torch.zeros(37))
    with pytest.raises(ValueError, match="bias"):
        sequence_token_logprobs(model, torch.zeros(1, 4, dtype=torch.long), torch.ones(1, 4, dtype=torch.long))


def test_chunk_dlogits_is_the_gradient_and_exact_at_confident_targets():
    """The LM head's element-wise backward: the autograd gradient of Σ g·logp (repeated ids included), and at a
    confident token (p → 1, entry g·(1 − p) → 0) in bf16 the exact value rounded once, not a cancelled sum."""
    from posttrain.algorithms.topk import chunk_dlogits, chunk_logprobs

    gen = torch.Generator().manual_seed(3)
    logits = torch.randn(6, 40, generator=gen, dtype=torch.float64) * 3
    logits[:, 7] += 15.0                          # token 7: 1 − p ≈ 1e-4..1e-3, below bf16's spacing 2^-8 at 1
    ids = torch.tensor([[7, 2, 2], [7, 0, 5], [7, 7, 1], [7, 3, 9], [7, 4, 4], [7, 39, 8]])
    grad = torch.randn(6, 3, generator=gen, dtype=torch.float64)
    leaf = logits.clone().requires_grad_()
    logp, lse = chunk_logprobs(leaf, ids)
    (logp * grad).sum().backward()
    exact = chunk_dlogits(logits, lse.detach(), grad, ids, torch.float64)
    torch.testing.assert_close(exact, leaf.grad, rtol=1e-12, atol=1e-12)

    # One id per row (GSPO's case): at token 7 the entry is g·(1 − p), far smaller than g.
    one_id, one_grad = ids[:, :1], grad[:, :1]
    leaf.grad = None
    logp, lse = chunk_logprobs(leaf, one_id)
    (logp * one_grad).sum().backward()
    args = (logits.float(), lse.detach().float(), one_grad.float(), one_id)
    rounded, in_fp32 = chunk_dlogits(*args, torch.bfloat16), chunk_dlogits(*args, torch.float32)
    # Every entry is the fp32 result rounded once to bf16 ...
    assert rounded.dtype == torch.bfloat16 and torch.equal(rounded, in_fp32.to(torch.bfloat16))
    torch.testing.assert_close(in_fp32.double(), leaf.grad, rtol=0, atol=1e-5)       # fp32 lse: ~1e-6 abs
    # ... including the confident target, g·(1 − p) ≪ g, which a bf16 sum −p·g + g would cancel to 0.
    target = leaf.grad.gather(-1, one_id)
    confident = (target.abs() < 2 ** -8 * one_grad.abs()).squeeze(-1)
    assert confident.sum() >= 4 and (rounded.gather(-1, one_id)[confident] != 0).all()
    naive = (-(logits.float() - lse.float().unsqueeze(-1)).exp() * one_grad.float()).bfloat16()
    assert (naive.scatter_add(-1, one_id, one_grad.bfloat16()).gather(-1, one_id) == 0).any()


def test_stored_probabilities_give_the_recomputed_gradients():
    """store_probs: the backward from p kept in forward instead of recomputed logits. In fp64 (p stored in fp64)
    the same values and gradients as the recompute, repeated ids included; in bf16 the gradients within the
    rounding of p, and the confident targets' entries still their exact value (from the fp32 log-probs)."""
    hidden, weight, gen = _inputs(n=3, t=5, v=23)
    ids = torch.randint(0, 23, (3, 5, 3), generator=gen)
    ids[0, 0] = torch.tensor([4, 4, 9])
    upstream = torch.randn(ids.shape, generator=gen, dtype=torch.float64)
    grads = []
    for store in (False, True):
        h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
        out = chunked_logprobs_at(h, w, ids, chunk_size=4, store_probs=store)
        (out * upstream).sum().backward()
        grads.append((out.detach(), h.grad, w.grad))
    for recomputed, stored in zip(*grads):
        torch.testing.assert_close(stored, recomputed, rtol=1e-12, atol=1e-12)

    # bf16 with confident targets (p → 1): against the recompute path (chunk_dlogits) on the same fp32 logits
    from posttrain.algorithms.topk import chunk_dlogits, chunk_dlogits_from_probs, chunk_logprobs_and_probs

    logits = torch.randn(6, 40, generator=gen, dtype=torch.float32) * 3
    logits[:, 7] += 15.0
    one_id, g = torch.full((6, 1), 7), torch.randn(6, 1, generator=gen)
    logp, lse, probs = chunk_logprobs_and_probs(logits, one_id, torch.bfloat16)
    assert probs.dtype == torch.bfloat16
    got = chunk_dlogits_from_probs(probs, logp, g, one_id, torch.bfloat16)
    recomputed = chunk_dlogits(logits, lse, g, one_id, torch.bfloat16)
    # the targets: the same fp32 value rounded once (g·(1 − p) ≪ g, not cancelled to 0) ...
    assert torch.equal(got.gather(-1, one_id), recomputed.gather(-1, one_id))
    assert (got.gather(-1, one_id) != 0).all()
    # ... the rest −g·p within one more bf16 rounding (of p itself)
    torch.testing.assert_close(got.double(), recomputed.double(), rtol=2 ** -7, atol=0)
