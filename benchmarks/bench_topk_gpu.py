"""Peak memory and time: chunked (posttrain.algorithms.topk) vs naive full-logits student log-probs on a GPU.

    PYTHONPATH=. python3 benchmarks/bench_topk_gpu.py --out results.json        # results go to TOPK.md

Realistic sizes: H = 4096, V = 151936 (Qwen vocabulary), bf16 hidden states and LM-head weight, one sequence
of T tokens. Three operations, each chunked and naive:
  token_fwd_bwd    log πθ(y_t) of the sampled tokens, forward + backward (dh and dW)
  topk_nograd      π_old top-16 ids and log-probs, no grad (start of a MOPD update)
  cand_fwd_bwd     log πθ at 16 candidate ids per token, forward + backward (the MOPD loss input)
"Naive" is what a trainer does without chunking: logits = (h @ W^T).float(), log_softmax, gather/topk, and
autograd keeps [T, V] tensors for backward. Peak memory is measured above what the inputs already hold.
"chunked" uses CUDA's bf16→fp32 `out_dtype` matmuls (no rounded bf16 [C,V] / [V,H] temporaries);
"chunked_plain" is the same code with those kernels turned off (`h @ W.T` then `.float()`), for comparison.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from posttrain.algorithms import topk as topk_module
from posttrain.algorithms.topk import chunked_logprobs_at, chunked_token_logprobs, chunked_topk

HIDDEN, VOCAB, K = 4096, 151936, 16


def naive_logprobs_at(hidden, weight, ids):
    return torch.log_softmax((hidden @ weight.T).float(), dim=-1).gather(-1, ids)


def naive_topk(hidden, weight, k):
    with torch.no_grad():
        values, ids = torch.log_softmax((hidden @ weight.T).float(), dim=-1).topk(k, dim=-1)
    return ids, values


def make_ops(chunk_size):
    def token_fwd_bwd(h, w, tok, cand, naive):
        h.grad = w.grad = None
        lp = naive_logprobs_at(h, w, tok.unsqueeze(-1)).squeeze(-1) if naive else \
            chunked_token_logprobs(h, w, tok, chunk_size)
        lp.sum().backward()

    def topk_nograd(h, w, tok, cand, naive):
        naive_topk(h, w, K) if naive else chunked_topk(h, w, K, chunk_size)

    def cand_fwd_bwd(h, w, tok, cand, naive):
        h.grad = w.grad = None
        lp = naive_logprobs_at(h, w, cand) if naive else chunked_logprobs_at(h, w, cand, chunk_size)
        (lp * 0.01).sum().backward()

    return {"token_fwd_bwd": token_fwd_bwd, "topk_nograd": topk_nograd, "cand_fwd_bwd": cand_fwd_bwd}


def measure(fn, args, iters):
    """(median ms, peak bytes above the starting allocation) or raises OutOfMemoryError."""
    torch.cuda.synchronize()
    fn(*args)                                                     # warm-up (also the first peak)
    torch.cuda.synchronize()
    args[0].grad = args[1].grad = None                            # gradients count as part of the op's peak
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    times = []
    for _ in range(iters):
        start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn(*args)
        stop.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(stop))
    return statistics.median(times), torch.cuda.max_memory_allocated() - base


def check_correctness(device):
    """Chunked vs naive at T = 2048 in bf16, and vs an fp64 reference for the values."""
    gen = torch.Generator(device=device).manual_seed(0)
    t = 2048
    h = torch.randn(t, HIDDEN, device=device, generator=gen).bfloat16().requires_grad_()
    w = (torch.randn(VOCAB, HIDDEN, device=device, generator=gen) * (2 / HIDDEN ** 0.5)).bfloat16().requires_grad_()
    ids = torch.randint(0, VOCAB, (t, K), device=device, generator=gen)
    g = torch.randn(t, K, device=device, generator=gen)
    out = chunked_logprobs_at(h, w, ids, 512)
    (out * g).sum().backward()
    gh, gw = h.grad.clone(), w.grad.clone()
    h.grad = w.grad = None
    ref = naive_logprobs_at(h, w, ids)
    (ref * g).sum().backward()
    h64, w64 = h.detach().double().requires_grad_(), w.detach().double().requires_grad_()
    ref64 = torch.log_softmax(h64 @ w64.T, -1).gather(-1, ids)
    (ref64 * g.double()).sum().backward()

    def rel(a, b):
        return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm())

    top_ids, top_lp = chunked_topk(h.detach(), w.detach(), K, 512)
    naive_ids, naive_lp = naive_topk(h.detach(), w.detach(), K)
    return {
        "logprob_rel_err_vs_naive": rel(out, ref), "logprob_rel_err_vs_fp64": rel(out, ref64),
        "naive_logprob_rel_err_vs_fp64": rel(ref, ref64),
        "grad_hidden_rel_err_vs_naive": rel(gh, h.grad), "grad_weight_rel_err_vs_naive": rel(gw, w.grad),
        "grad_hidden_rel_err_vs_fp64": rel(gh, h64.grad), "naive_grad_hidden_rel_err_vs_fp64": rel(h.grad, h64.grad),
        "grad_weight_rel_err_vs_fp64": rel(gw, w64.grad), "naive_grad_weight_rel_err_vs_fp64": rel(w.grad, w64.grad),
        "topk_ids_match_frac": float((top_ids == naive_ids).float().mean()),
        "topk_logprob_max_abs_diff": float((top_lp - naive_lp).abs().max()),
    }


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, nargs="+", default=[8192, 16384, 32768])
    parser.add_argument("--chunk-sizes", type=int, nargs="+", default=[1024, 4096])
    parser.add_argument("--iters", type=int, default=3)
    parser.add_argument("--out", default="topk_bench.json")
    args = parser.parse_args()
    device = torch.device("cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    results = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "H": HIDDEN, "V": VOCAB,
               "k": K, "dtype": "bfloat16", "iters": args.iters, "rows": []}
    for use_out_dtype in (True, False):
        topk_module._out_dtype_kernels_ok = use_out_dtype
        check = check_correctness(device)
        check["out_dtype_kernels_used"] = topk_module._out_dtype_kernels_ok
        results[f"correctness_out_dtype_{use_out_dtype}"] = check
        print(json.dumps(check, indent=1), flush=True)
    gen = torch.Generator(device=device).manual_seed(1)
    weight = (torch.randn(VOCAB, HIDDEN, device=device, generator=gen) * (2 / HIDDEN ** 0.5)).bfloat16()
    weight.requires_grad_()
    for num_tokens in args.tokens:
        hidden = torch.randn(num_tokens, HIDDEN, device=device, generator=gen).bfloat16().requires_grad_()
        tok = torch.randint(0, VOCAB, (num_tokens,), device=device, generator=gen)
        cand = torch.randint(0, VOCAB, (num_tokens, K), device=device, generator=gen)
        variants = ([("naive", None)] + [("chunked", c) for c in args.chunk_sizes]
                    + [("chunked_plain", args.chunk_sizes[-1])])
        for op_name in ("token_fwd_bwd", "topk_nograd", "cand_fwd_bwd"):
            for impl, chunk in variants:
                fn = make_ops(chunk or 1)[op_name]
                row = {"T": num_tokens, "op": op_name, "impl": impl, "chunk": chunk}
                t0 = time.time()
                topk_module._out_dtype_kernels_ok = impl != "chunked_plain"
                try:
                    ms, peak = measure(fn, (hidden, weight, tok, cand, impl == "naive"), args.iters)
                    row.update(ms=round(ms, 2), peak_gib=round(peak / 2 ** 30, 2))
                except torch.OutOfMemoryError:
                    row.update(ms=None, peak_gib="OOM")
                if impl != "naive":
                    row["out_dtype_kernels"] = topk_module._out_dtype_kernels_ok
                hidden.grad = weight.grad = None
                torch.cuda.empty_cache()
                row["wall_s"] = round(time.time() - t0, 1)
                results["rows"].append(row)
                print(json.dumps(row), flush=True)
        del hidden
        torch.cuda.empty_cache()
    with open(args.out, "w") as f:
        json.dump(results, f, indent=1)
    print(f"\n{'T':>6} {'op':<14} {'impl':<13} {'chunk':>6} {'ms':>9} {'peak GiB':>9}")
    for r in results["rows"]:
        print(f"{r['T']:>6} {r['op']:<14} {r['impl']:<13} {str(r['chunk'] or '-'):>6} {str(r['ms']):>9} "
              f"{str(r['peak_gib']):>9}")


if __name__ == "__main__":
    main()
