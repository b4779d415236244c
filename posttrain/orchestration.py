"""Ray plumbing: start or attach to a cluster, and the two actor groups the loops drive.

The driver holds no model. `RolloutGroup` fans prompts out over the vLLM rollout actors; `TrainerGroup` is a set
of torch.distributed ranks (Ray actors) that split every batch evenly. The embedded default (local Ray, CPU
vLLM, tiny model) and a GPU cluster use exactly this code; only the recipe's resources differ.
"""
from __future__ import annotations

import os
from typing import Any, Callable

import ray

from posttrain.config import Recipe


# Child processes this driver had before it started an embedded cluster (a multiprocessing forkserver, a
# notebook's helpers): stop_ray kills what the cluster left behind, never these.
_children_before_ray: set[int] = set()


def start_ray(recipe: Recipe) -> None:
    global _children_before_ray
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
              + getattr(recipe.algorithm, "resident_engines", 0) * getattr(recipe.algorithm, "engine_cpus", 0))
    num_cpus = recipe.ray.num_cpus or max(int(needed + 0.999), os.cpu_count() or 1)
    # The embedded cluster serves this machine only, so nothing of it listens beyond loopback: with Ray's
    # "no multi-node cluster" switch (the macOS/Windows default) the node IP is 127.0.0.1 and the GCS, raylet,
    # worker, agent and remaining metrics servers all bind it (Ray reads the switch at import, hence the module
    # attribute as well as the environment its processes inherit; both are put back after start-up so a later
    # ray.init(address=...) in this process resolves its node IP normally). The per-node Prometheus exporter,
    # which nothing here reads, is not started. Token authentication stays as Ray starts a new local cluster: on
    # (RAY_AUTH_MODE=disabled in the environment is the user's explicit choice). ray.address (attaching to a
    # cluster) keeps that cluster's own settings.
    from ray._private import ray_constants
    loopback_env = {"RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "RAY_enable_metrics_collection": "0"}
    saved_env = {k: os.environ.get(k) for k in loopback_env}
    saved_switch = ray_constants.ENABLE_RAY_CLUSTER
    os.environ.update(loopback_env)
    ray_constants.ENABLE_RAY_CLUSTER = False
    # No runtime_env for the embedded cluster: its raylet and workers inherit this process's environment, and
    # skipping Ray's runtime-env agent saves seconds at init and at every worker start (benchmarks/STARTUP.md).
    os.environ.update(env_vars)
    import psutil
    _children_before_ray = {p.pid for p in psutil.Process().children(recursive=True)}
    try:
        ray.init(num_cpus=num_cpus, include_dashboard=False, log_to_driver=False, configure_logging=False)
    finally:
        ray_constants.ENABLE_RAY_CLUSTER = saved_switch
        for key, value in saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def stop_ray(grace_s: float = 5.0) -> None:
    """Shut Ray down so that no process of the run outlives it. An embedded cluster's processes (GCS, raylet,
    workers) descend from this driver; a worker kept alive by a reward's non-daemon thread ignores Ray's shutdown
    (its interpreter waits for the thread), so whatever is left after `grace_s` is killed. An attached cluster
    (ray.address) is not ours: only the connection is closed."""
    if not ray.is_initialized():
        return
    import psutil

    embedded = ray._private.worker.global_worker.node is not None and \
        ray._private.worker.global_worker.node.is_head()
    ours = [p for p in psutil.Process().children(recursive=True)
            if p.pid not in _children_before_ray] if embedded else []
    ray.shutdown()
    _, alive = psutil.wait_procs(ours, timeout=grace_s)
    for proc in alive:
        try:
            proc.kill()
        except psutil.NoSuchProcess:
            pass
    psutil.wait_procs(alive, timeout=grace_s)


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
    """The rollout engines. `wait=False` returns as soon as they are launched, so the caller can do other start-up
    work while they load; `wait_started()` then waits for them (both groups start at once: `posttrain run`)."""

    def __init__(self, recipe: Recipe, model_path: str | None = None, wait: bool = True):
        from posttrain.rollout.engine import RolloutWorker

        r = recipe.rollout
        self.workers = [
            RolloutWorker.options(num_cpus=r.cpus_per_worker, num_gpus=r.gpus_per_worker).remote(
                model_path or recipe.model.path, dtype=recipe.model.dtype, seed=recipe.seed + i,
                kv_cache_gib=r.kv_cache_gib, gpu_memory_utilization=r.gpu_memory_utilization,
                engine_kwargs=r.engine_kwargs)
            for i in range(r.num_workers)]
        self._recipe, self._started = recipe, [w.ping.remote() for w in self.workers]
        if wait:
            self.wait_started()

    def wait_started(self) -> "RolloutGroup":
        if self._started:
            _await_start(self._started, f"{len(self.workers)} rollout worker(s)", self._recipe)
            self._started = []
        return self

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

    def weight_versions(self) -> list[int]:
        """The weights version each engine last loaded (the trainer step of its update_weights)."""
        return ray.get([w.ping.remote() for w in self.workers])


def merge_rank_metrics(per_rank: list[dict[str, float]]) -> dict[str, float]:
    """One mini-batch's metrics from every rank's: the objective's (per-rank means over that rank's sequences)
    averaged with the ranks' sequence counts as weights; the optimizer's (the global gradient norm, the learning
    rate, the skip flag), the same on every rank, taken from rank 0."""
    from posttrain.trainer.worker import OPTIMIZER_METRICS, SEQUENCES_KEY

    counts = [r.get(SEQUENCES_KEY, 0) for r in per_rank]
    total = sum(counts)
    merged = {k: v for k, v in per_rank[0].items() if k != SEQUENCES_KEY}
    objective_keys = {k for r in per_rank for k in r} - set(OPTIMIZER_METRICS) - {SEQUENCES_KEY}
    for key in objective_keys:
        merged[key] = sum(r.get(key, 0.0) * n for r, n in zip(per_rank, counts)) / max(total, 1)
    return merged


class SharedMedia:
    """A step's media in Ray's object store (TrainerGroup.share_media): the distinct MultimodalPrompts, put once,
    and each sample's index into them (-1: a text sample). The ObjectRef is boxed in a list so that a Ray call
    passes it through unresolved; each rank fetches it once per step (TrainerRank.resolve_media). A per-call
    argument only: never stored in anything that is checkpointed (an ObjectRef does not outlive the cluster)."""

    def __init__(self, boxed_ref: list, index: list[int]):
        self.boxed_ref, self.index = boxed_ref, index

    def __len__(self) -> int:
        return len(self.index)

    def take(self, idx: list[int]) -> "SharedMedia":
        return SharedMedia(self.boxed_ref, [self.index[i] for i in idx])


def take_media(mm_prompts, idx: list[int]):
    """The samples `idx` of a per-sample media argument: a list of MultimodalPrompt / None, a SharedMedia, or None
    (a text batch)."""
    if isinstance(mm_prompts, SharedMedia):
        return mm_prompts.take(idx)
    return [mm_prompts[i] for i in idx] if mm_prompts else None


class TrainerGroup:
    """The trainer ranks (Ray actors over torch.distributed). Every batch is split evenly and in order over the
    ranks; per-sample arrays are sliced with it."""

    def __init__(self, recipe: Recipe, objective, wait: bool = True):
        from posttrain.trainer.worker import TrainerWorker, trainer_settings

        t = recipe.trainer
        self.fsdp = t.fsdp
        settings = trainer_settings(recipe, objective)
        self.ranks = [TrainerWorker.options(num_cpus=t.cpus_per_worker, num_gpus=t.gpus_per_worker).remote(
            rank, t.num_workers, settings) for rank in range(t.num_workers)]
        self.rank0 = self.ranks[0]
        self._recipe, self._address = recipe, self.rank0.node_address.remote()
        # With torch_threads 0 and asynchronous rollout, the ranks' threads follow the engines: the driver sets
        # `engines_busy` (is a generation in flight?) and each pass first fits the threads to it.
        self.engines_busy: Callable[[], bool] = lambda: False
        self._adaptive_threads = t.torch_threads == 0 and bool(recipe.rollout.async_steps)
        self._busy_state: bool | None = None
        if wait:
            self.wait_started()

    def wait_started(self) -> "TrainerGroup":
        """Wait for the ranks launched by the constructor (`wait=False`), then join them into one group."""
        if self._address is not None:
            # The rendezvous lives on rank 0's node, wherever Ray placed it.
            (addr, port), = _await_start([self._address], "trainer rank 0", self._recipe)
            _await_start([r.setup.remote(addr, port) for r in self.ranks], f"{len(self.ranks)} trainer rank(s)",
                         self._recipe)
            self._address = None
        return self

    def shutdown(self) -> None:
        kill_actors(self.ranks)

    def _shares(self, n: int) -> list[list[int]]:
        return [idx for idx in _split(list(range(n)), len(self.ranks))]

    @staticmethod
    def share_media(mm_prompts: list | None) -> SharedMedia | None:
        """Put a step's media into the object store once; pass the handle to the methods below instead of the list,
        so that the pixels do not travel again with every call (π_old, each mini-batch) and every rank. The n
        samples of one prompt share one MultimodalPrompt: it is stored once. None (a text batch) stays None."""
        if not mm_prompts:
            return None
        distinct: dict[int, int] = {}       # id(MultimodalPrompt) -> its position in the stored list
        objects = []
        for mm in mm_prompts:
            if mm is not None and id(mm) not in distinct:
                distinct[id(mm)] = len(objects)
                objects.append(mm)
        return SharedMedia([ray.put(objects)], [distinct[id(mm)] if mm is not None else -1 for mm in mm_prompts])

    def _fit_threads(self) -> None:
        """Give the ranks the cores the engines left (one Ray round trip, only when the engines' state changed)."""
        if not self._adaptive_threads:
            return
        busy = bool(self.engines_busy())
        if busy != self._busy_state:
            self.call_all("fit_threads", busy)
            self._busy_state = busy

    def compute_logprobs(self, prompts: list[list[int]], responses: list[list[int]],
                         mm_prompts: list | SharedMedia | None = None) -> list[list[float]]:
        self._fit_threads()
        refs = [r.compute_logprobs.remote([prompts[i] for i in idx], [responses[i] for i in idx],
                                          take_media(mm_prompts, idx))
                for r, idx in zip(self.ranks, self._shares(len(prompts))) if idx]
        return [lp for part in ray.get(refs) for lp in part]

    def compute_topk(self, prompts: list[list[int]], responses: list[list[int]], k: int,
                     mm_prompts: list | SharedMedia | None = None):
        """π's top-k and sampled-token log-probs of every sample (teachers.scores layout), with its media."""
        from teachers.scores import TeacherScores

        self._fit_threads()
        refs = [r.compute_topk.remote([prompts[i] for i in idx], [responses[i] for i in idx], k,
                                      take_media(mm_prompts, idx))
                for r, idx in zip(self.ranks, self._shares(len(prompts))) if idx]
        parts = ray.get(refs)
        return TeacherScores.from_sequences([p.sequence(i) for p in parts for i in range(p.num_sequences)], k)

    def train_minibatch(self, prompts, responses, arrays: dict[str, Any], mm_prompts: list | SharedMedia | None = None
                        ) -> dict[str, float]:
        """One optimizer step over the mini-batch; every rank sees the global size (loss weights), returns rank
        0's metrics."""
        self._fit_threads()
        refs = [r.train_minibatch.remote([prompts[i] for i in idx], [responses[i] for i in idx],
                                         {k: v[idx[0]:idx[-1] + 1] for k, v in arrays.items()}, len(prompts),
                                         take_media(mm_prompts, idx))
                for r, idx in zip(self.ranks, self._shares(len(prompts))) if idx]
        return merge_rank_metrics(ray.get(refs))

    def weights_ref(self) -> tuple[ray.ObjectRef, list[ray.ObjectRef]]:
        """The full weights as an ObjectRef the engines resolve themselves from Ray's object store, so that they
        never pass through the driver (at 8B, 16 GB in and out of the driver's memory every step); plus the
        other ranks' share of the collective, to be awaited (`ray.get`) once the engines have loaded."""
        refs = self.call_collective_async("named_weights")
        return refs[0], refs[1:]

    def call_collective(self, method: str, *args):
        """Rank 0's result of a method that, with sharded weights, every rank must run (it all-gathers)."""
        return ray.get(self.call_collective_async(method, *args))[0]

    def call_collective_async(self, method: str, *args) -> list[ray.ObjectRef]:
        """call_collective without waiting: [rank 0's ref, the other ranks' refs (FSDP only)]."""
        ranks = self.ranks if self.fsdp else [self.rank0]
        return [getattr(r, method).remote(*args) for r in ranks]

    def call_all(self, method: str, *args) -> list:
        return ray.get([getattr(r, method).remote(*args) for r in self.ranks])

    def call_rank0(self, method: str, *args):
        return ray.get(getattr(self.rank0, method).remote(*args))
