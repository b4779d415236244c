"""Packed causal attention on one GPU: which kernel the trainer should call for ragged RL micro-batches (issue #15).

    PYTHONPATH=. python3 benchmarks/bench_attention_gpu.py --out attn.jsonl            # Qwen3-4B and 8B shapes
    PYTHONPATH=. python3 benchmarks/bench_attention_gpu.py --heads 16 --kv-heads 8 --out attn.jsonl   # 0.6B

One packed row as the trainer builds it: sequences with lengths uniform in [L/2, L] up to `--tokens` tokens,
q [T, Hq, D], k/v [T, Hkv, D] (grouped-query: Hq/Hkv query heads share a key/value head), causal inside each
sequence. For each backend (packing.VARLEN_BACKENDS): forward and forward+backward time (CUDA events, median of
`--iters`), TFLOP/s in the model-FLOPs convention of bench_trainer_gpu.py (forward 2·Hq·D·Σ s(s+1), backward
twice that), and the largest difference of the output and of dq/dk/dv from an fp32 per-sequence reference
(torch's math attention) on the first sequences.
"""
from __future__ import annotations

import argparse
import json
import time
from functools import partial
import torch
import torch.nn.functional as F

from posttrain.trainer import packing


def ragged_lengths(seq_len: int, tokens: int, generator: torch.Generator) -> list[int]:
    lengths, total = [], 0
    while total < tokens:
        n = min(int(torch.randint(seq_len // 2, seq_len + 1, (1,), generator=generator)), tokens - total)
        lengths.append(max(n, 2))
        total += lengths[-1]
    return lengths


def reference(q, k, v, grad_out, lengths, n_check):
    """fp32 causal attention per sequence (the first n_check sequences) with its gradients."""
    outs, grads = [], []
    start = 0
    for n in lengths[:n_check]:
        qs, ks, vs = (t[start:start + n].float().detach().requires_grad_() for t in (q, k, v))
        out = F.scaled_dot_product_attention(qs.transpose(0, 1)[None], ks.transpose(0, 1)[None],
                                             vs.transpose(0, 1)[None], is_causal=True, enable_gqa=True)
        out = out[0].transpose(0, 1)
        out.backward(grad_out[start:start + n].float())
        outs.append(out.detach())
        grads.append((qs.grad, ks.grad, vs.grad))
        start += n
    return outs, grads


def flex_variants(lengths: list[int], device, scale: float) -> dict:
    """FlexAttention (Triton, compiled) over the packed row with a document-causal block mask, [T,H,D] in and out."""
    from torch.nn.attention.flex_attention import create_block_mask, flex_attention

    doc = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths)).to(device)
    T = doc.numel()

    def document_causal(b, h, q_idx, kv_idx):
        return (doc[q_idx] == doc[kv_idx]) & (q_idx >= kv_idx)

    torch.cuda.synchronize()
    begin = time.perf_counter()
    block_mask = create_block_mask(document_causal, None, None, T, T, device=device)
    torch.cuda.synchronize()
    print(json.dumps({"flex_block_mask_s": time.perf_counter() - begin}))
    compiled = torch.compile(flex_attention, dynamic=False)
    variants = {}
    for name, options in (("flex", None), ("flex_128x64_w8", {"BLOCK_M": 128, "BLOCK_N": 64, "num_warps": 8,
                                                              "num_stages": 3})):
        def attend(q, k, v, options=options):
            out = compiled(q.transpose(0, 1)[None], k.transpose(0, 1)[None], v.transpose(0, 1)[None],
                           block_mask=block_mask, scale=scale, enable_gqa=True, kernel_options=options)
            return out[0].transpose(0, 1)
        variants[name] = attend
    return variants


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--heads", type=int, default=32)
    ap.add_argument("--kv-heads", type=int, default=8)
    ap.add_argument("--head-dim", type=int, default=128)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=13312)
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--flex", action="store_true", help="also FlexAttention with a document-causal block mask")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    device = torch.device("cuda")
    gen = torch.Generator().manual_seed(0)
    lengths = ragged_lengths(args.seq_len, args.tokens, gen)
    T, Hq, Hkv, D = sum(lengths), args.heads, args.kv_heads, args.head_dim
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device=device)
    max_len = max(lengths)
    torch.manual_seed(0)
    q = torch.randn(T, Hq, D, device=device, dtype=torch.bfloat16)
    k = torch.randn(T, Hkv, D, device=device, dtype=torch.bfloat16)
    v = torch.randn(T, Hkv, D, device=device, dtype=torch.bfloat16)
    grad_out = torch.randn(T, Hq, D, device=device, dtype=torch.bfloat16) * 0.01
    causal_pairs = sum(s * (s + 1) for s in lengths)
    fwd_flops = 2 * Hq * D * causal_pairs          # QKᵀ and PV over the causal half, 2 FLOPs per MAC
    n_check = 3
    ref_out, ref_grads = reference(q, k, v, grad_out, lengths, n_check)
    info = {"T": T, "sequences": len(lengths), "heads": Hq, "kv_heads": Hkv, "head_dim": D, "max_len": max_len,
            "torch": torch.__version__, "gpu": torch.cuda.get_device_name(), "cudnn": torch.backends.cudnn.version()}
    print(json.dumps(info))
    results = []
    attend = {backend: partial(packing.varlen_causal_attention, cu=cu, max_len=max_len, scale=D ** -0.5,
                               backend=backend) for backend in packing.VARLEN_BACKENDS}
    if args.flex:
        attend.update(flex_variants(lengths, device, D ** -0.5))
    for backend, attention in attend.items():
        def run(backward: bool):
            qq, kk, vv = (t.detach().requires_grad_(backward) for t in (q, k, v))
            out = attention(qq, kk, vv)
            if backward:
                out.backward(grad_out)
                return out, (qq.grad, kk.grad, vv.grad)
            return out, None

        row = {"backend": backend, **info}
        try:
            out, grads = run(True)
            start, errs = 0, {"out": 0.0, "dq": 0.0, "dk": 0.0, "dv": 0.0}
            for i, n in enumerate(lengths[:n_check]):
                errs["out"] = max(errs["out"], (out[start:start + n].float() - ref_out[i]).abs().max().item())
                for name, g, rg in zip(("dq", "dk", "dv"), grads, ref_grads[i]):
                    errs[name] = max(errs[name], (g[start:start + n].float() - rg).abs().max().item())
                start += n
            row["max_abs_err"] = errs
            for label, backward in (("fwd", False), ("fwd_bwd", True)):
                times = []
                for i in range(args.iters + 3):
                    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                    begin.record()
                    run(backward)
                    end.record()
                    torch.cuda.synchronize()
                    if i >= 3:
                        times.append(begin.elapsed_time(end) / 1e3)
                times.sort()
                row[f"{label}_s"] = times[len(times) // 2]
            row["fwd_tflops"] = fwd_flops / row["fwd_s"] / 1e12
            row["fwd_bwd_tflops_3x"] = 3 * fwd_flops / row["fwd_bwd_s"] / 1e12
        except Exception as exc:                       # a backend this torch/GPU lacks: recorded, not fatal
            row["error"] = f"{type(exc).__name__}: {str(exc)[:300]}"
        print(json.dumps(row))
        results.append(row)
    with open(args.out, "a") as f:
        for row in results:
            f.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
