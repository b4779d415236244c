"""Build the toy agent base and measure its multi-turn competence per agent domain (the table in docs/envs.md).

    python benchmarks/bench_toy_agent_base.py OUT_DIR [SFT_STEPS] [HABIT_RATE] [DEVICE]
    python benchmarks/bench_toy_agent_base.py runs/toy/toy-agent 2400 0.5 cuda    # 117 s build on one H200

64 held-out questions per domain, one sample each at temperature 1, at most 5 turns, rolled out by
posttrain.rollout.multiturn.run_multiturn with a transformers `generate` (no vLLM needed, so it runs on a bare
GPU machine). The python and code environments run with allow_unsafe (rlimits only) where bubblewrap is missing.
"""
import json
import sys
import time

import torch

from envs import make_env_group
from posttrain.rollout.multiturn import ChatRenderer, MultiTurnLimits, batch_metrics, run_multiturn
from posttrain.toy.build import build_toy_base
from posttrain.toy.tasks import make_rows

DOMAINS = ["python", "lookup", "tau", "codefix"]


def hf_generate_fn(model, tokenizer, device):
    """The driver's batched generate from a transformers model: left-padded batch, sampling at temperature 1."""
    eos, pad = tokenizer.eos_token_id, tokenizer.pad_token_id

    @torch.no_grad()
    def generate(prompts, seeds, max_tokens):
        torch.manual_seed(seeds[0])
        width = max(map(len, prompts))
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        attention = torch.zeros_like(ids)
        for i, p in enumerate(prompts):
            ids[i, width - len(p):], attention[i, width - len(p):] = torch.tensor(p), 1
        out = model.generate(input_ids=ids.to(device), attention_mask=attention.to(device), do_sample=True,
                             temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=max(max_tokens), eos_token_id=eos,
                             pad_token_id=pad, output_scores=True, return_dict_in_generate=True)
        new = out.sequences[:, width:].cpu()
        logprobs = torch.stack([torch.log_softmax(s.float(), -1) for s in out.scores], 1).cpu()   # (B, T, V)
        results = []
        for i in range(len(prompts)):
            tokens, lps = [], []
            for j in range(min(new.shape[1], max_tokens[i])):
                tokens.append(int(new[i, j]))
                lps.append(float(logprobs[i, j, new[i, j]]))
                if tokens[-1] == eos:
                    break
            results.append({"token_ids": tokens, "logprobs": lps,
                            "finish_reason": "stop" if tokens and tokens[-1] == eos else "length"})
        return results
    return generate


def main():
    out = sys.argv[1]
    steps = int(sys.argv[2]) if len(sys.argv) > 2 else 2400
    habit = float(sys.argv[3]) if len(sys.argv) > 3 else 0.5
    device = sys.argv[4] if len(sys.argv) > 4 else ("cuda" if torch.cuda.is_available() else "cpu")
    start = time.time()
    info = build_toy_base(out, domains=DOMAINS, sft_steps=steps, habit_rate=habit, device=device)
    print("build", json.dumps(info), f"{time.time() - start:.0f}s", flush=True)
    from transformers import AutoModelForCausalLM, AutoTokenizer
    tokenizer = AutoTokenizer.from_pretrained(out)
    model = AutoModelForCausalLM.from_pretrained(out).to(device).eval()
    generate, renderer = hf_generate_fn(model, tokenizer, device), ChatRenderer(tokenizer)
    for domain in DOMAINS:
        rows = make_rows([domain], 64, 0, "eval")
        envs = [make_env_group(r, 1, default_kwargs={"allow_unsafe": True} if domain in ("python", "codefix")
                               else None)[0] for r in rows]
        trajs = run_multiturn(envs, generate, renderer, seeds=list(range(len(rows))),
                              limits=MultiTurnLimits(max_turns=5, max_tokens_per_turn=96, max_context_tokens=1024))
        metrics = batch_metrics(trajs)
        called = sum(t.tool_calls > 0 for t in trajs) / len(trajs)
        print(domain, json.dumps({"reward": round(metrics["env/reward_mean"], 3), "called_tool_frac": round(called, 3),
                                  **{k: round(v, 3) for k, v in metrics.items() if k != "env/reward_mean"}}), flush=True)


if __name__ == "__main__":
    main()
