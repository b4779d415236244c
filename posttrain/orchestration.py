"""Ray plumbing: start or attach to a cluster, and the two actor groups the loops drive.

The driver holds no model. `RolloutGroup` fans prompts out over the vLLM rollout actors; `TrainerGroup` is a set
of torch.distributed ranks (Ray actors) that split every batch evenly. The embedded default (local Ray, CPU
vLLM, tiny model) and a GPU cluster use exactly this code; only the recipe's resources differ.
"""
from __future__ import annotations

import os
from typing import Any

import ray

from posttrain.config import Recipe, recipe_to_dict


def start_ray(recipe: Recipe) -> None:
    if ray.is_initialized():
        return
    env_vars = {"TOKENIZERS_PARALLELISM": "false", "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
                "VLLM_CPU_KVCACHE_SPACE": str(max(1, int(round(recipe.rollout.kv_cache_gib)))),
                "PYTHONPATH": os.pathsep.join(p for p in [os.getcwd(), os.environ.get("PYTHONPATH", "")] if p)}
    if recipe.ray.address:
        ray.init(address=recipe.ray.address, runtime_env={"env_vars": env_vars}, log_to_driver=False)
        return
    needed = (recipe.rollout.num_workers * recipe.rollout.cpus_per_worker
              + recipe.trainer.num_workers * recipe.trainer.cpus_per_worker + recipe.rewards.max_concurrency * 0.5
              + (recipe.mopd.resident_engines * recipe.mopd.engine_cpus if recipe.mopd else 0))
    num_cpus = recipe.ray.num_cpus or max(int(needed + 0.999), os.cpu_count() or 1)
    ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": env_vars}, configure_logging=False)


def _split(items: list, parts: int) -> list[list]:
    """Contiguous, as-even-as-possible split (keeps a prompt's group on one worker, order preserved)."""
    k, r = divmod(len(items), parts)
    out, start = [], 0
    for i in range(parts):
        end = start + k + (1 if i < r else 0)
        out.append(items[start:end])
        start = end
    return out


class ActorStartError(RuntimeError):
    """Actors could not be placed or started within ray.actor_start_timeout_s (e.g. too few resources left)."""


def _await_start(refs: list, what: str, recipe: Recipe) -> list:
    try:
        return ray.get(refs, timeout=recipe.ray.actor_start_timeout_s)
    except ray.exceptions.GetTimeoutError:
        raise ActorStartError(
            f"{what} did not start within ray.actor_start_timeout_s = {recipe.ray.actor_start_timeout_s:g} s; the "
            f"cluster probably lacks the resources the recipe asks for (ray status shows what is free). Lower "
            f"the workers or their cpus/gpus, or add nodes, then re-run the same command to resume.") from None


def kill_actors(actors: list) -> None:
    for actor in actors:
        try:
            ray.kill(actor, no_restart=True)
        except Exception:  # noqa: BLE001 — already dead
            pass


class RolloutGroup:
    def __init__(self, recipe: Recipe, model_path: str | None = None):
        from posttrain.rollout.engine import RolloutWorker

        r = recipe.rollout
        self.workers = [
            RolloutWorker.options(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker).remote(
                model_path or recipe.model.path, dtype=recipe.model.dtype, seed=recipe.seed + i,
                kv_cache_gib=r.kv_cache_gib, gpu_memory_utilization=r.gpu_memory_utilization,
                engine_kwargs=r.engine_kwargs)
            for i in range(r.num_workers)]
        _await_start([w.ping.remote() for w in self.workers], f"{r.num_workers} rollout worker(s)", recipe)

    def shutdown(self) -> None:
        kill_actors(self.workers)

    def generate(self, prompts: list[list[int]], seeds: list[int], *, n: int, temperature: float, top_p: float,
                 max_tokens: int) -> list[list[dict]]:
        chunks = _split(list(range(len(prompts))), len(self.workers))
        refs = [w.generate.remote([prompts[i] for i in idx], n=n, temperature=temperature, top_p=top_p,
                                  max_tokens=max_tokens, seeds=[seeds[i] for i in idx])
                for w, idx in zip(self.workers, chunks) if idx]
        return [group for part in ray.get(refs) for group in part]

    def update_weights(self, named_weights_ref: Any, version: int) -> float:
        return max(ray.get([w.update_weights.remote(named_weights_ref, version) for w in self.workers]))

    def canary(self, token_ids: list[int]) -> list[list[float]]:
        return ray.get([w.prompt_token_logprobs.remote(token_ids) for w in self.workers])


class TrainerGroup:
    def __init__(self, recipe: Recipe, worker_cls=None):
        from posttrain.trainer.worker import TrainerWorker

        worker_cls = worker_cls or TrainerWorker
        t = recipe.trainer
        cfg = recipe_to_dict(recipe)
        self.ranks = [worker_cls.options(num_cpus=t.cpus_per_worker, num_gpus=t.gpus_per_worker).remote(
            rank, t.num_workers, cfg) for rank in range(t.num_workers)]
        self.rank0 = self.ranks[0]
        # The rendezvous lives on rank 0's node, wherever Ray placed it.
        (addr, port), = _await_start([self.rank0.node_address.remote()], "trainer rank 0", recipe)
        _await_start([r.setup.remote(addr, port) for r in self.ranks], f"{t.num_workers} trainer rank(s)", recipe)

    def shutdown(self) -> None:
        kill_actors(self.ranks)

    def compute_logprobs(self, prompts: list[list[int]], responses: list[list[int]]) -> list[list[float]]:
        chunks = _split(list(range(len(prompts))), len(self.ranks))
        refs = [r.compute_logprobs.remote([prompts[i] for i in idx], [responses[i] for i in idx])
                for r, idx in zip(self.ranks, chunks)]
        return [lp for part in ray.get(refs) for lp in part]

    def train_minibatch(self, prompts, responses, old_logprobs, advantages) -> dict[str, float]:
        chunks = _split(list(range(len(prompts))), len(self.ranks))
        refs = [r.train_minibatch.remote([prompts[i] for i in idx], [responses[i] for i in idx],
                                         [old_logprobs[i] for i in idx], [advantages[i] for i in idx], len(prompts))
                for r, idx in zip(self.ranks, chunks)]
        return ray.get(refs)[0]

    def call_all(self, method: str, *args) -> list:
        return ray.get([getattr(r, method).remote(*args) for r in self.ranks])

    def call_rank0(self, method: str, *args):
        return ray.get(getattr(self.rank0, method).remote(*args))
