"""Update throughput, MFU and peak memory of the FSDP2 + packed-sequence trainer blocks on GPUs (issue #15).

    # one GPU (a world-size-1 NCCL group), Qwen3-0.6B shape, ragged 1K-token sequences, 64K tokens per step:
    PYTHONPATH=. python3 benchmarks/bench_trainer_gpu.py --size 0.6B --seq-len 1024 --out r.jsonl
    # two GPUs:
    PYTHONPATH=. torchrun --nproc-per-node 2 benchmarks/bench_trainer_gpu.py --size 8B --seq-len 1024 --ac --out r.jsonl

Random-weight models of the real Qwen3 shapes (built in fp32 = the master weights; bf16 compute through FSDP's
MixedPrecisionPolicy; fp32 gradient reduction and fp32 AdamW state). Each step: sequences with lengths uniform in
[L/2, L] until the step holds `--tokens` tokens (split round-robin over ranks), the first quarter of each a
prompt, the rest a response; packed into micro-batches of at most `--token-budget` tokens; GSPO loss on the
response log-probs (chunked LM head on response rows only); clip; one AdamW step. One warm-up step, then
`--steps` timed steps.

MFU = model FLOPs / (step time × 989e12 × GPUs), 989 TFLOP/s = H100/H200 SXM dense bf16 (datasheet). Model FLOPs
(activation-checkpoint recompute NOT counted):
    6 · T · P_layers                       every token through every decoder layer's matmuls (fwd + bwd)
  + 6 · R · V · H                          LM head on the R response rows (the only rows scored)
  + 6 · layers · heads · head_dim · Σ_i s_i(s_i+1)     causal attention scores and values, per sequence s_i
with P_layers = layers · (H·(heads+2·kv_heads)·head_dim + heads·head_dim·H + 3·H·F).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist

PEAK_BF16_FLOPS = 989e12
# hidden, layers, heads, kv heads, ffn, tied (vocab 151936, head_dim 128 for all)
SIZES = {"0.6B": (1024, 28, 16, 8, 3072, True), "1.7B": (2048, 28, 16, 8, 6144, True),
         "4B": (2560, 36, 32, 8, 9728, True), "8B": (4096, 36, 32, 8, 12288, False)}
VOCAB, HEAD_DIM = 151936, 128


def qwen3_config(size: str):
    from transformers import Qwen3Config

    hidden, layers, heads, kv, ffn, tied = SIZES[size]
    return Qwen3Config(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                       num_key_value_heads=kv, intermediate_size=ffn, head_dim=HEAD_DIM, tie_word_embeddings=tied,
                       max_position_embeddings=40960, rope_theta=1e6)


def model_flops(config, seq_lens: list[int], response_tokens: int) -> float:
    h, layers, heads, kv, ffn = (config.hidden_size, config.num_hidden_layers, config.num_attention_heads,
                                 config.num_key_value_heads, config.intermediate_size)
    d = heads * HEAD_DIM
    per_layer = h * (heads + 2 * kv) * HEAD_DIM + d * h + 3 * h * ffn
    tokens = sum(seq_lens)
    return (6 * tokens * layers * per_layer + 6 * response_tokens * config.vocab_size * h
            + 6 * layers * d * sum(s * (s + 1) for s in seq_lens))


def ragged_step(seq_len: int, tokens: int, vocab: int, generator: torch.Generator):
    """Prompts and responses whose lengths are uniform in [L/2, L], `tokens` tokens in all."""
    prompts, responses, total = [], [], 0
    while total < tokens:
        n = min(int(torch.randint(seq_len // 2, seq_len + 1, (1,), generator=generator)), tokens - total)
        n = max(n, 2)
        p = max(1, n // 4)
        ids = torch.randint(0, vocab, (n,), generator=generator).tolist()
        prompts.append(ids[:p])
        responses.append(ids[p:])
        total += n
    return prompts, responses


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--size", choices=SIZES, required=True)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--tokens", type=int, default=65536, help="tokens per optimizer step (all ranks)")
    ap.add_argument("--token-budget", type=int, default=16384, help="tokens per packed micro-batch")
    ap.add_argument("--ac", action="store_true", help="activation checkpointing")
    ap.add_argument("--ac-every", type=int, default=1)
    ap.add_argument("--compile", action="store_true", help="torch.compile each decoder layer")
    ap.add_argument("--keep-gathered", action="store_true", help="reshard_after_forward=False")
    ap.add_argument("--hold-gathered", action="store_true",
                    help="with --keep-gathered: also keep the weights gathered between micro-batches")
    ap.add_argument("--store-probs", action="store_true",
                    help="the LM head keeps p [R,V] in bf16 for the backward instead of recomputing the logits")
    ap.add_argument("--reduce-once", action="store_true",
                    help="accumulate gradients unsharded (fp32), reduce after the step's last micro-batch only")
    ap.add_argument("--attention", default="flash", help="packed-attention kernel (packing.VARLEN_BACKENDS)")
    ap.add_argument("--optim-offload", action="store_true", help="AdamW moments in pinned host memory, streamed")
    ap.add_argument("--pad-to", type=int, default=1, help="round each packed row up to a multiple (compile)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--chunk", type=int, default=4096, help="LM-head rows per chunk")
    ap.add_argument("--profile", default=None, help="after the timed steps, profile one more step: kernel table here")
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    from posttrain.trainer.fsdp import build_optimizer, shard_model
    from posttrain.trainer.packing import varlen_kernel_available
    from transformers import Qwen3ForCausalLM

    rank, world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
    dist.init_process_group("nccl", rank=rank, world_size=world)
    torch.manual_seed(0)
    config = qwen3_config(args.size)
    with torch.device("cuda"):
        model = Qwen3ForCausalLM(config)           # fp32: the master weights
    n_params = sum(p.numel() for p in model.parameters())
    shard_model(model, compute_dtype=torch.bfloat16, activation_checkpointing=args.ac,
                checkpoint_every=args.ac_every, compile_layers=args.compile,
                reshard_after_forward=not args.keep_gathered, lm_head_store_probs=args.store_probs,
                attention_backend=args.attention)
    optimizer = build_optimizer(model, lr=1e-6, offload_moments=args.optim_offload)
    model.train()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()

    gen = torch.Generator().manual_seed(1)
    times, optim_times, flops_per_step, step_tokens = [], [], [], []
    for step in range(args.steps + 1):
        batch = next_batch(args, gen, config, rank, world)
        torch.cuda.synchronize()
        dist.barrier()
        start = time.perf_counter()
        grad_norm, optim_s = train_step(model, optimizer, batch, args.chunk, args.hold_gathered, args.reduce_once)
        elapsed = time.perf_counter() - start
        if step > 0:
            times.append(elapsed)
            optim_times.append(optim_s)
            flops_per_step.append(batch.flops)
            step_tokens.append(batch.tokens)
        if rank == 0:
            print(f"step {step}: {elapsed:.2f} s, {len(batch.micro_batches)} micro-batches "
                  f"{[mb.num_tokens for mb in batch.micro_batches]}, grad_norm {grad_norm:.3f}", flush=True)
    if args.profile and rank == 0:
        profile_one_step(args.profile, lambda: train_step(model, optimizer, next_batch(args, gen, config, rank, world),
                                                          args.chunk, args.hold_gathered, args.reduce_once))
    step_s = sum(times) / len(times)
    tokens = sum(step_tokens) / len(step_tokens)
    result = {
        "size": args.size, "params": n_params, "gpus": world, "seq_len": args.seq_len, "tokens_per_step": tokens,
        "token_budget": args.token_budget, "pad_to": args.pad_to,
        "activation_checkpointing": args.ac, "ac_every": args.ac_every,
        "compile": args.compile, "keep_gathered": args.keep_gathered, "hold_gathered": args.hold_gathered,
        "store_probs": args.store_probs, "reduce_once": args.reduce_once, "optim_offload": args.optim_offload,
        "step_s": round(step_s, 3), "clip_and_adamw_s": round(sum(optim_times) / len(optim_times), 3), "tokens_per_s": round(tokens / step_s),
        "mfu": round(sum(flops_per_step) / sum(times) / (PEAK_BF16_FLOPS * world), 4),
        "peak_mem_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2),
        "peak_reserved_gib": round(torch.cuda.max_memory_reserved() / 2**30, 2),
        "attention": args.attention if varlen_kernel_available() else "sdpa per sequence",
        "torch": torch.__version__, "device": torch.cuda.get_device_name(),
    }
    if rank == 0:
        print(json.dumps(result), flush=True)
        with open(args.out, "a") as f:
            f.write(json.dumps(result) + "\n")
    dist.destroy_process_group()


@dataclass
class StepBatch:
    micro_batches: list          # this rank's packed rows
    advantages: torch.Tensor     # [this rank's sequences]
    n_global: int                # sequences over all ranks (each counts 1/n_global in the loss)
    flops: float                 # model FLOPs of the whole step (all ranks)
    tokens: int                  # tokens of the whole step (all ranks)


def next_batch(args, gen: torch.Generator, config, rank: int, world: int) -> StepBatch:
    """A fresh ragged step, this rank's share packed into token-budget rows (every rank the same row count)."""
    from posttrain.trainer.packing import agree_micro_batch_count, pack_batch, plan_micro_batches

    prompts, responses = ragged_step(args.seq_len, args.tokens, VOCAB, gen)
    n_global = len(prompts)
    seq_lens = [len(p) + len(r) for p, r in zip(prompts, responses)]
    flops = model_flops(config, seq_lens, sum(len(r) for r in responses))
    mine = list(range(rank, n_global, world))
    prompts, responses = [prompts[i] for i in mine], [responses[i] for i in mine]
    lengths = [len(p) + len(r) for p, r in zip(prompts, responses)]
    count = agree_micro_batch_count(len(plan_micro_batches(lengths, args.token_budget)), "cuda")
    micro_batches = pack_batch(prompts, responses, args.token_budget, min_micro_batches=count,
                               pad_to_multiple=args.pad_to)
    return StepBatch(micro_batches, torch.randn(len(prompts), generator=gen), n_global, flops, sum(seq_lens))


def train_step(model, optimizer, batch: StepBatch, chunk: int, hold_gathered: bool,
               reduce_once: bool = False) -> tuple[float, float]:
    """Forward/backward over every packed row, clip, AdamW: (gradient norm, seconds of clip + AdamW).
    hold_gathered: the weights stay gathered between micro-batches too (fsdp.hold_gathered_weights).
    reduce_once: gradients accumulate unsharded in fp32 and are reduced after the last micro-batch only."""
    from posttrain.algorithms.gspo import gspo_loss
    from posttrain.trainer.fsdp import clip_grad_norm, hold_gathered_weights
    from posttrain.trainer.packing import packed_response_logprobs, pad_per_sequence

    for n, mb in enumerate(batch.micro_batches):
        if hold_gathered:
            hold_gathered_weights(model, hold=n < len(batch.micro_batches) - 1)
        if reduce_once:
            model.set_requires_gradient_sync(n == len(batch.micro_batches) - 1)
        logprobs, mask = pad_per_sequence(packed_response_logprobs(model, mb, chunk), mb.response_lengths)
        loss, _ = gspo_loss(logprobs, logprobs.detach(), batch.advantages[mb.sequence_indices].cuda(), mask)
        (loss * (len(mb.sequence_indices) / batch.n_global)).backward()
    torch.cuda.synchronize()
    optim_start = time.perf_counter()
    grad_norm = clip_grad_norm(model, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    torch.cuda.synchronize()
    return float(grad_norm), time.perf_counter() - optim_start


# attention first: flash-attention kernels carry "cutlass" in their template names
KERNEL_KINDS = (("attention", ("flash", "fmha", "sdpa", "cudnn")),
                ("matmul", ("gemm", "cutlass", "nvjet", "sm90_xmma", "cublas")),
                ("compiled element-wise (triton)", ("triton_",)), ("copy / cast", ("copy", "cast", "Memcpy", "memcpy")),
                ("collective", ("nccl",)), ("reduction / softmax", ("reduce", "softmax", "logsumexp")))


def profile_one_step(path: str, step) -> None:
    """Kernel time of one step by kind (matmul, attention, compiled element-wise, ...) and the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        start = time.perf_counter()
        step()
        wall = time.perf_counter() - start
    kernels = [e for e in prof.events() if str(e.device_type).endswith("CUDA")]
    by_kind: dict[str, float] = {}
    for event in kernels:
        kind = next((k for k, keys in KERNEL_KINDS if any(key.lower() in event.name.lower() for key in keys)),
                    "other")
        by_kind[kind] = by_kind.get(kind, 0.0) + event.time_range.elapsed_us() / 1e6
    busy = sum(by_kind.values())
    lines = [f"profiled step wall {wall:.3f} s, GPU kernel time {busy:.3f} s ({busy / wall:.0%} busy)"]
    lines += [f"  {kind:34s} {t:7.3f} s  {t / wall:6.1%} of the step" for kind, t in
              sorted(by_kind.items(), key=lambda kv: -kv[1])]
    lines.append(prof.key_averages().table(sort_by="device_time_total", row_limit=40, max_name_column_width=90))
    text = "\n".join(lines)
    print(text, flush=True)
    with open(path, "w") as f:
        f.write(text)


if __name__ == "__main__":
    main()
