"""The teacher pool: M routed teachers served by E ≤ M resident vLLM engines that swap weights in memory.

Thirteen 30B teachers do not fit next to a student; thirteen toy teachers would not fit this 24 GiB box either
if each had its own engine process (~1.5 GiB each). Teachers of one architecture can share an engine: every
teacher's weights sit once in Ray's object store (host shared memory), and an engine takes a teacher's weights
in memory (vLLM `reload_weights`, no disk) before scoring that teacher's samples. Teachers of different
architectures (a text-only and a vision-language teacher, say) fall into separate groups
(teachers.checks.teacher_groups); each group has its own engines and weights move only within a group.

Per step the batch is grouped by teacher, each teacher's group goes to one engine of its architecture, and
engines work in parallel. Teachers already resident on an engine are scored there first (no swap); the others
go to the least busy engine of their group, so a step costs at most (teachers in the batch − engines) swaps.
The step's images and videos are put in Ray's object store once and shared by every scoring call of the step.
"""
from __future__ import annotations

import collections
import glob
import os
import time

import numpy as np
import ray

from teachers.scores import TeacherScores


def load_teacher_weights(path: str) -> list[tuple[str, np.ndarray]]:
    """[(hf_name, array)] of a teacher folder's safetensors (numpy: zero-copy in Ray's object store)."""
    from safetensors.numpy import load_file

    named: list[tuple[str, np.ndarray]] = []
    for file in sorted(glob.glob(os.path.join(path, "*.safetensors"))):
        named.extend(load_file(file).items())
    return named


class TeacherPool:
    def __init__(self, recipe, *, kv_cache_gib: float | None = None, max_model_len: int = 1024):
        from posttrain.orchestration import _await_start
        from teachers.checks import engines_per_group, teacher_groups
        from teachers.engine import TeacherWorker

        m = recipe.algorithm
        self.names = [t.name for t in m.teachers]
        self.top_k = m.top_k
        t0 = time.perf_counter()
        self.weights = {t.name: ray.put(load_teacher_weights(t.path)) for t in m.teachers}
        self.weights_put_s = time.perf_counter() - t0
        groups = teacher_groups(m.teachers)
        # Engine e of a group starts as the group's teacher e (built from that teacher's folder: no first swap).
        starts = [(g, group[e]) for g, (group, count) in enumerate(zip(groups, engines_per_group(
            [len(group) for group in groups], m.resident_engines))) for e in range(count)]
        self.group_of_teacher = {t: g for g, group in enumerate(groups) for t in group}
        self.group_of_engine = [g for g, _ in starts]
        self.engines = [
            TeacherWorker.options(num_cpus=m.engine_cpus, num_gpus=m.engine_gpus).remote(
                m.teachers[t].path, teacher_name=m.teachers[t].name, top_k=m.top_k, max_logprobs=m.max_logprobs,
                dtype=recipe.model.dtype, kv_cache_gib=kv_cache_gib or recipe.rollout.kv_cache_gib,
                gpu_memory_utilization=recipe.rollout.gpu_memory_utilization, max_model_len=max_model_len,
                engine_kwargs=m.engine_kwargs)
            for _, t in starts]
        self.resident = _await_start([w.resident.remote() for w in self.engines],
                                     f"{len(self.engines)} teacher engine(s)", recipe)

    def shutdown(self) -> None:
        from posttrain.orchestration import kill_actors
        kill_actors(self.engines)

    def _assign(self, teachers_in_batch: list[int]) -> list[list[int]]:
        """Teacher indices per engine, resident teachers first (no swap), the rest to the shortest queue among
        the engines of their architecture group."""
        queues: list[list[int]] = [[] for _ in self.engines]
        rest = []
        for t in teachers_in_batch:
            name = self.names[t]
            if name in self.resident:
                queues[self.resident.index(name)].insert(0, t)
            else:
                rest.append(t)
        for t in rest:  # the shortest queue of the teacher's group takes the next teacher
            group = self.group_of_teacher[t]
            min((queues[e] for e, g in enumerate(self.group_of_engine) if g == group), key=len).append(t)
        return queues

    def score(self, prompts: list[list[int]], responses: list[list[int]], teacher_index: list[int],
              mm_prompts: list | None = None) -> tuple[TeacherScores, dict[str, float]]:
        """Scores of every sequence by its routed teacher, in input order, plus timing metrics. mm_prompts: each
        sequence's MultimodalPrompt (None for a text sequence); its media go to the teacher with the ids."""
        start = time.perf_counter()
        # One object per step for every call (a prompt's n samples share one MultimodalPrompt: stored once).
        step_mm = ray.put(mm_prompts) if mm_prompts and any(mm is not None for mm in mm_prompts) else None
        by_teacher: dict[int, list[int]] = collections.defaultdict(list)
        for i, t in enumerate(teacher_index):
            by_teacher[t].append(i)
        queues = self._assign(sorted(by_teacher))
        refs, where = [], []
        for engine, queue in zip(self.engines, queues):
            for t in queue:  # an actor runs its calls in submission order: its queue is processed in turn
                idx = by_teacher[t]
                refs.append(engine.score_as.remote(self.names[t], [self.weights[self.names[t]]],
                                                   [prompts[i] for i in idx], [responses[i] for i in idx],
                                                   self.top_k, *((step_mm, idx) if step_mm is not None else ())))
                where.append(t)
        results = ray.get(refs)
        batches = [r[0] for r in results]
        position = {}  # sequence → (batch, row in batch)
        for b, t in enumerate(where):
            for row, i in enumerate(by_teacher[t]):
                position[i] = (b, row)
        scores = TeacherScores.gather(batches, [position[i] for i in range(len(prompts))], self.top_k)
        for e, queue in enumerate(queues):
            if queue:
                self.resident[e] = self.names[queue[-1]]
        tokens = int(scores.offsets[-1])
        engine_busy = collections.defaultdict(float)
        for (b_scores, info), t in zip(results, where):
            engine_busy[next(e for e, q in enumerate(queues) if t in q)] += info["swap_s"] + info["score_s"]
        wall = time.perf_counter() - start
        metrics = {
            "teachers/swaps": float(sum(r[1]["swap_s"] > 0 for r in results)),
            "teachers/swap_s": float(sum(r[1]["swap_s"] for r in results)),
            "teachers/score_s": float(sum(r[1]["score_s"] for r in results)),
            "teachers/wall_s": wall,
            "teachers/tokens_per_s_per_engine": tokens / max(max(engine_busy.values(), default=0.0), 1e-9),
            "teachers/payload_bytes_per_token": scores.nbytes / max(tokens, 1),
            "teachers/in_batch": float(len(by_teacher)),
        }
        return scores, metrics
