"""Do fused projections (q‖k‖v, gate‖up) run faster than separate ones at Qwen3 shapes? forward and both backward
GEMMs, bf16, one H200.   PYTHONPATH=. python3 benchmarks/bench_gemm_fusion_gpu.py"""
import json

import torch


def timed(fn, iters=20):
    for _ in range(3):
        fn()
    begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    begin.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return begin.elapsed_time(end) / iters / 1e3


def three_gemms(x, w, dy):
    """forward y = x Wᵀ, backward dX = dY W and dW = dYᵀ x.  x [M,K], w [N,K], dy [M,N]"""
    x @ w.t()
    dy @ w
    dy.t() @ x


for hidden, ffn, heads, kv in ((2560, 9728, 32, 8), (4096, 12288, 32, 8)):
    M = 13312
    x = torch.randn(M, hidden, device="cuda", dtype=torch.bfloat16)
    row = {"M": M, "hidden": hidden}
    for name, outs in (("q,k,v", (heads * 128, kv * 128, kv * 128)), ("gate,up", (ffn, ffn)),
                       ("o", (hidden,)), ("down", (hidden,))):
        ws = [torch.randn(n, hidden if name not in ("o", "down") else (heads * 128 if name == "o" else ffn),
                          device="cuda", dtype=torch.bfloat16) for n in outs]
        xin = x if name not in ("o", "down") else torch.randn(M, ws[0].shape[1], device="cuda", dtype=torch.bfloat16)
        dys = [torch.randn(M, w.shape[0], device="cuda", dtype=torch.bfloat16) for w in ws]
        flops = sum(6 * M * w.shape[0] * w.shape[1] for w in ws)
        separate = timed(lambda: [three_gemms(xin, w, dy) for w, dy in zip(ws, dys)])
        row[name] = {"separate_tflops": round(flops / separate / 1e12, 1)}
        if len(ws) > 1:
            wf, dyf = torch.cat(ws), torch.cat(dys, 1)
            fused = timed(lambda: three_gemms(xin, wf, dyf))
            row[name]["fused_tflops"] = round(flops / fused / 1e12, 1)
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    row["8192^3_tflops"] = round(2 * 8192 ** 3 / timed(lambda: a @ a) / 1e12, 1)
    print(json.dumps(row))
