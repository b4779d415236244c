"""The reward runner: every (sample, reward function) scored off the caller, in worker processes that can be
killed, with one set of failure rules for runs (Ray tasks) and `posttrain score` (local processes).

Work goes out in units of up to `samples_per_task` samples of one reward function (a unit per sample costs
~10 ms of overhead on a small machine); a unit's worker sends each sample's result back as soon as it has it.
Each failure scores that (sample, reward) term 0 with a counted kind
(`reward/failures/<kind>`); the other terms of the sample and the other samples are unaffected:

| the reward ...                                           | kind                         |
|----------------------------------------------------------|------------------------------|
| raises                                                   | `exception:<Type>`           |
| runs `timeout_s` on one sample (its worker is killed,    | `timeout`                    |
| which stops C code too, e.g. a stuck sympy call)         |                              |
| kills its worker process (segfault, `os._exit`)          | `crash:worker_died`          |
| returns neither a number (a bool is 0/1) nor a dict      | `bad_result:<type>`,         |
| with a numeric "score"                                   | `bad_result:dict_without_score` |
| returns a score not finite in float32 (nan, inf, 1e39,   | `non_finite`                 |
| 10**400)                                                 |                              |
| reports its own reason (a dict's "failure" detail, e.g.  | that reason (its score kept) |
| math's `no_answer`)                                      |                              |

When a worker dies or is killed, the samples of its unit it had not reported are retried one per unit, first
in line, so only the culprit is charged (a sample reported done is kept and never run again). The details of a dict result travel back as plain data (numbers, strings, lists, dicts): a detail
that is anything else (an open file, a lock, an instance of a class in the user's reward file) becomes its
text (repr), and the score stands: the score is the reward's answer, a detail only a log line.

The two backends differ only in how a unit reaches a process and how that process is killed:
`RayTasks` (a streaming call per unit on reward actors kept between calls, `ray.kill`) and `LocalProcesses` (a fixed
set of worker processes on this machine, SIGKILL); planning, deadlines, retries, result normalisation and failure names are this
module's, shared.
"""
from __future__ import annotations

import collections
import dataclasses
import itertools
import math
import multiprocessing
import multiprocessing.connection
import numbers
import os
import signal
import sys
import time
from typing import Any, Callable, Iterable, Iterator

from rewards.base import RewardResult, RewardSpecError, bind_reward, call_reward, load_reward

CRASH = "crash:worker_died"
TIMEOUT = "timeout"
# Kinds that mean the reward function itself is broken (not the completion it scored): `failing_rewards`.
BROKEN_REWARD_KINDS = ("exception:", "crash:", "bad_result:", "non_finite", TIMEOUT)


@dataclasses.dataclass(frozen=True)
class RewardFn:
    name: str
    weight: float
    kwargs: tuple  # sorted (key, value) pairs, hashable and picklable
    data_sources: tuple | None

    @property
    def key(self) -> str:
        return f"{self.name}|{self.kwargs!r}"

    def applies_to(self, data_source: str) -> bool:
        return self.data_sources is None or data_source in self.data_sources


def reward_fns_from_recipe(rewards_cfg) -> list[RewardFn]:
    return [RewardFn(f.name, f.weight, tuple(sorted(f.kwargs.items())),
                     tuple(f.data_sources) if f.data_sources is not None else None) for f in rewards_cfg.functions]


def check_rewards_load(fns: list[RewardFn]) -> None:
    """Resolve every reward once on the driver, so that a bad name, a bad keyword argument or a signature that
    does not take verl's keyword arguments fails before any heavy work (RewardSpecError naming the fix)."""
    for fn in fns:
        bind_reward(fn.name, dict(fn.kwargs))


# --------------------------------------------------------------------------------- prepare / release hooks

_PREPARED: dict[str, RewardFn] = {}  # fn.key → the RewardFn with the kwargs its prepare hook returned
_RELEASES: list[Callable[[], None]] = []


def prepare_reward_servers(fns: list[RewardFn]) -> list[RewardFn]:
    """Run each reward's `prepare(kwargs)` hook (rewards.base) once, on the driver, before any sample is scored
    (e.g. the judge starts its served model here); returns the reward functions with the kwargs to call them
    with. A hook that fails stops the caller with RewardSpecError naming the reward."""
    prepared = []
    for fn in fns:
        if fn.key not in _PREPARED:
            loaded = load_reward(fn.name)
            prepare, release = getattr(loaded, "prepare", None), getattr(loaded, "release", None)
            ready = fn
            if prepare is not None:
                try:
                    kwargs = prepare(dict(fn.kwargs))
                except Exception as err:  # noqa: BLE001 - named and re-raised
                    raise RewardSpecError(f"reward {fn.name!r} could not be prepared ({type(err).__name__}: "
                                          f"{err}); check its kwargs {dict(fn.kwargs)}") from err
                ready = dataclasses.replace(fn, kwargs=tuple(sorted(kwargs.items())))
            if release is not None and release not in _RELEASES:
                _RELEASES.append(release)
            _PREPARED[fn.key] = ready
        prepared.append(_PREPARED[fn.key])
    return prepared


def release_reward_servers() -> None:
    """Run every `release()` hook of the rewards prepared in this process (the loops call it at the end)."""
    while _RELEASES:
        _RELEASES.pop()()
    _PREPARED.clear()
    _release_ray_pool()


# ------------------------------------------------------------------------------ in the worker process

_BOUND: dict[str, Callable[..., Any]] = {}  # per worker process: RewardFn.key → bound function


# A unit's results go back in batches at most this old: progress the runner sees well within any time limit,
# without one message per sample (which halved `posttrain score` throughput for cheap rewards).
RESULTS_FLUSH_S = 0.05


def score_items(fn: RewardFn, items: list[tuple]) -> Iterator[list[RewardResult]]:
    """Body of one unit: items are (data_source, solution, ground_truth, extra_info); results (plain data) are
    yielded in order, in batches no older than RESULTS_FLUSH_S, so the runner sees progress and, after a kill,
    which sample was running."""
    bound = _BOUND.get(fn.key)
    if bound is None:
        bound = _BOUND[fn.key] = bind_reward(fn.name, dict(fn.kwargs))
    batch, flushed = [], time.monotonic()
    for item in items:
        res = call_reward(bound, *item)
        batch.append(RewardResult(res.score, _plain(res.details), res.failure))
        if time.monotonic() - flushed > RESULTS_FLUSH_S:
            yield batch
            batch, flushed = [], time.monotonic()
    if batch:
        yield batch


def score_chunk(fn: RewardFn, items: list[tuple]) -> list[RewardResult]:
    """score_items, all at once (in this process)."""
    return [result for batch in score_items(fn, items) for result in batch]


def _plain(value: Any, depth: int = 0) -> Any:
    """The value as plain data (None, bool, int, float, str, lists, string-keyed dicts), so it crosses process
    boundaries and JSON; anything else becomes its text. Depth-bounded (a cyclic structure ends as text)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if depth < 8:
        if isinstance(value, dict):
            return {str(k): _plain(v, depth + 1) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [_plain(v, depth + 1) for v in value]
        if isinstance(value, numbers.Real):  # numpy / torch scalars
            try:
                return float(value)
            except Exception:  # noqa: BLE001
                pass
    try:
        return repr(value)[:200]
    except Exception:  # noqa: BLE001 - repr of a hostile object may raise
        return f"<{type(value).__name__}>"


# ----------------------------------------------------------------------------------------------- backends
#
# A backend runs units: submit(fn, items) -> handle; poll(handles, wait_s) -> events, each (handle, "items",
# [RewardResult]) for the unit's next samples, (handle, "done", None) at its end, or (handle, failure kind, None)
# when its worker died (the unit is over); kill(handle); close().

_RAY_ACTOR = None


class _RewardWorker:
    """Ray actor body: one reward worker process kept for the whole run (see RayTasks)."""

    def score(self, fn: RewardFn, items: list[tuple]) -> Iterator[list[RewardResult]]:
        yield from score_items(fn, items)

    def load(self, names: list[str]) -> None:
        """Import the rewards' modules ahead of the first unit (warm_reward_workers); a failure here is left for
        that unit to report as the reward's own."""
        for name in names:
            try:
                load_reward(name)
            except Exception:  # noqa: BLE001 - reported by the unit that calls it
                pass


# The reward actors of the Ray cluster this process is attached to: {"node": driver's node id, "idle": [actor]}.
# Kept between calls (a run scores every step), dropped when the cluster changes or by release_reward_servers.
_RAY_POOL: dict[str, Any] = {}


class RayTasks:
    """Units run as streaming calls on reward actors (no restarts, one unit at a time each), which persist between
    calls: a run's reward step reuses warm processes that already imported the reward. They reserve no CPU
    (`rewards.max_concurrency` bounds them): held for the whole run, a reservation could keep actors started later
    (MOPD's teacher engines) from being placed.
    Plain Ray tasks did not: Ray started fresh worker processes for them at every step and killed the idle ones
    during the update (two Python starts per step, the quickstart's 0.5–1 s reward step, benchmarks/VS_TRL.md).
    kill = ray.kill of that unit's actor (its process dies, C code included); a dead or killed actor is never
    reused, the next unit gets a new one."""

    def __init__(self):
        import ray
        self._ray = ray
        global _RAY_ACTOR
        if _RAY_ACTOR is None:
            _RAY_ACTOR = ray.remote(num_cpus=0, max_restarts=0, max_task_retries=0)(_RewardWorker)
        node = ray.get_runtime_context().get_node_id()
        if _RAY_POOL.get("node") != node:  # a new cluster (tests start several in one process)
            _RAY_POOL.clear()
            _RAY_POOL.update(node=node, idle=[])
        self._idle: list = _RAY_POOL["idle"]
        self._busy: dict[Any, Any] = {}  # generator → its actor
        self._fn_refs: dict[str, Any] = {}

    def submit(self, fn: RewardFn, items: list[tuple]):
        ref = self._fn_refs.get(fn.key)
        if ref is None:
            ref = self._fn_refs[fn.key] = self._ray.put(fn)
        actor = self._idle.pop() if self._idle else _RAY_ACTOR.remote()
        generator = actor.score.options(num_returns="streaming").remote(ref, items)
        self._busy[generator] = actor
        return generator

    def poll(self, handles: list, wait_s: float) -> list[tuple]:
        ray = self._ray
        ready, _ = ray.wait(handles, num_returns=1, timeout=wait_s)
        if ready:
            ready, _ = ray.wait(handles, num_returns=len(handles), timeout=0)
        events = []
        for generator in ready:
            try:
                ref = next(generator)
            except StopIteration:
                self._idle.append(self._busy.pop(generator))
                events.append((generator, "done", None))
                continue
            except Exception as err:  # noqa: BLE001 - the stream itself failed
                events.append((generator, self._failed(generator, err), None))
                continue
            try:
                events.append((generator, "items", ray.get(ref)))
            except Exception as err:  # noqa: BLE001 - named in _failed
                events.append((generator, self._failed(generator, err), None))
        return events

    def _failed(self, generator, err: Exception) -> str:
        """The failure kind of a unit whose stream raised; its actor is retired (it may be dead or mid-unit)."""
        self.kill(generator)
        ray = self._ray
        if isinstance(err, (ray.exceptions.RayActorError, ray.exceptions.WorkerCrashedError)):
            return CRASH  # the process died: a segfault, os._exit
        if isinstance(err, ray.exceptions.RayTaskError):  # the unit itself raised (not a reward: those are caught)
            return f"crash:{type(getattr(err, 'cause', None) or err).__name__}"
        return f"crash:{type(err).__name__}"  # e.g. the object was lost with its node

    def kill(self, handle) -> None:
        actor = self._busy.pop(handle, None)
        if actor is not None:
            self._ray.kill(actor, no_restart=True)

    def close(self) -> None:
        """The runner returns on a unit's last result, before the end of its stream: such an actor goes back to
        the pool once that end arrives; one still running (the caller stopped early) is killed."""
        for generator in list(self._busy):
            ready, _ = self._ray.wait([generator], timeout=2.0)
            try:
                if ready:
                    next(generator)
            except StopIteration:
                self._idle.append(self._busy.pop(generator))
                continue
            except Exception:  # noqa: BLE001 - its stream failed: killed below
                pass
            self.kill(generator)


def warm_reward_workers(fns: list[RewardFn], max_concurrency: int) -> None:
    """Start the Ray reward actors (up to `max_concurrency`) and import the rewards in them, without waiting: a run
    calls this while its trainer and engines start, so the first reward step finds its workers ready."""
    if not fns:
        return
    backend = RayTasks()
    names = sorted({fn.name for fn in fns})
    while len(backend._idle) < max_concurrency:
        actor = _RAY_ACTOR.remote()
        actor.load.remote(names)
        backend._idle.append(actor)


def _release_ray_pool() -> None:
    """Kill the kept reward actors (end of a run; Ray's shutdown would too)."""
    idle = _RAY_POOL.get("idle", [])
    if idle:
        import ray
        if ray.is_initialized():
            for actor in idle:
                try:
                    ray.kill(actor, no_restart=True)
                except Exception:  # noqa: BLE001 - already gone with its cluster
                    pass
    _RAY_POOL.clear()


class LocalProcesses:
    """`workers` reusable processes on this machine (forked from a forkserver that imported the runner once);
    a killed or dead one is replaced on the next submit. Output a reward prints goes to stderr (stdout may be
    carrying `posttrain score -o -` results)."""

    def __init__(self, workers: int, preload: Iterable[str] = ()):
        methods = multiprocessing.get_all_start_methods()
        self._ctx = multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")
        if "forkserver" in methods:
            self._ctx.set_forkserver_preload(["posttrain.rewards_runner", *preload])
        self.workers = workers
        self._idle: list[tuple[Any, Any]] = []  # (process, connection)
        self._busy: dict[int, tuple[Any, Any]] = {}
        self._ids = itertools.count()

    def submit(self, fn: RewardFn, items: list[tuple]) -> int:
        if self._idle:
            proc, conn = self._idle.pop()
        else:
            conn, child_conn = self._ctx.Pipe()
            proc = self._ctx.Process(target=_local_worker_main, args=(child_conn,), daemon=True)
            proc.start()
            child_conn.close()
        handle = next(self._ids)
        self._busy[handle] = (proc, conn)
        try:
            conn.send((fn, items))
        except (OSError, ValueError):  # died before it could take the unit: poll() reports it
            pass
        return handle

    def poll(self, handles: list, wait_s: float) -> list[tuple]:
        by_conn = {self._busy[h][1]: h for h in handles}
        events = []
        for conn in multiprocessing.connection.wait(list(by_conn), timeout=wait_s):
            handle = by_conn[conn]
            while True:  # every message already there
                try:
                    status, payload = conn.recv()
                except Exception as err:  # noqa: BLE001 - EOF: the process died mid-unit (segfault, os._exit)
                    self._stop(*self._busy.pop(handle))
                    events.append((handle, CRASH if isinstance(err, (EOFError, OSError))
                                   else f"crash:{type(err).__name__}", None))
                    break
                if status == "items":
                    events.append((handle, "items", payload))
                    if conn.poll(0):
                        continue
                    break
                self._idle.append(self._busy.pop(handle))
                events.append((handle, "done", None) if status == "done" else (handle, f"crash:{payload}", None))
                break
        return events

    def kill(self, handle: int) -> None:
        self._stop(*self._busy.pop(handle))

    def close(self) -> None:
        for proc, conn in self._idle + list(self._busy.values()):
            self._stop(proc, conn)
        self._idle, self._busy = [], {}

    @staticmethod
    def _stop(proc, conn) -> None:
        if proc.is_alive():
            try:
                os.kill(proc.pid, signal.SIGKILL)
            except ProcessLookupError:   # it died on its own (a segfaulting reward) just after the check
                pass
        proc.join()
        conn.close()


def _local_worker_main(conn) -> None:
    """Body of a LocalProcesses worker: run units until the pipe closes."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    _die_with_parent()
    os.dup2(2, 1)  # a reward's prints must not land in `posttrain score -o -` output
    sys.stdout = sys.stderr
    # Each worker already uses one CPU: one verifier process for the math reward (unless the user chose).
    os.environ.setdefault("POSTTRAIN_VERIFY_WORKERS", "1")
    while True:
        try:
            fn, items = conn.recv()
        except (EOFError, OSError):
            return
        try:
            for batch in score_items(fn, items):
                conn.send(("items", batch))
            conn.send(("done", None))
        except BaseException as err:  # noqa: BLE001 - the unit failed outside the reward (e.g. its import)
            conn.send(("error", type(err).__name__))


def _die_with_parent() -> None:
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


# ------------------------------------------------------------------------------------------------ the runner

def score_stream(fns: list[RewardFn], samples: Iterable[dict], backend, *, timeout_s: float, max_concurrency: int,
                 samples_per_task: int = 16, max_pending: int | None = None) -> Iterator[dict]:
    """samples: {data_source, solution, ground_truth, extra_info} → results in input order (see `combine`).

    Samples are read lazily, at most `max_pending` waiting for their result (None: no bound), so a file of any
    size streams through. A unit whose worker reports no result for `timeout_s` (since submission or its last
    report) is killed, so each sample has its own limit; see `charge` for who is charged."""
    sample_iter = iter(samples)
    pending: dict[int, dict] = {}  # index → sample, until its result is yielded
    terms_left: dict[int, int] = {}
    outcome: dict[int, dict[int, RewardResult]] = {}
    open_units: list[list[int]] = [[] for _ in fns]
    units: collections.deque = collections.deque()  # (reward index, [sample indices])
    in_flight: dict[Any, _Unit] = {}
    next_in = next_out = 0
    exhausted = False

    def record(i: int, j: int, result: RewardResult) -> None:
        outcome[i][j] = result
        terms_left[i] -= 1

    def charge(unit: _Unit, kind: str) -> None:
        """The unit's worker died or was killed before reporting these samples. Results come back in batches,
        so which of them it was running is not certain: a lone sample is charged, several are retried one per
        unit, first in line (a sample reported done is never run again)."""
        rest = unit.idx[unit.done:]
        if len(rest) == 1:
            record(rest[0], unit.j, RewardResult(0.0, {}, kind))
        else:
            units.extendleft((unit.j, [i]) for i in reversed(rest))

    while True:
        # Read samples until the queue can feed every free slot, then send partly filled units out rather than
        # leave a slot idle (or wait for a data source that may not come again).
        while not exhausted and len(units) < max_concurrency and (max_pending is None or len(pending) < max_pending):
            try:
                sample = next(sample_iter)
            except StopIteration:
                exhausted = True
                break
            i, next_in = next_in, next_in + 1
            pending[i], outcome[i], terms_left[i] = sample, {}, 0
            for j, fn in enumerate(fns):
                if fn.applies_to(sample["data_source"]):
                    terms_left[i] += 1
                    open_units[j].append(i)
                    if len(open_units[j]) == samples_per_task:
                        units.append((j, open_units[j]))
                        open_units[j] = []
        if exhausted or (not units and len(in_flight) < max_concurrency):
            for j, idx in enumerate(open_units):
                if idx:
                    units.append((j, idx))
            open_units = [[] for _ in fns]
        while next_out < next_in and terms_left[next_out] == 0:
            pending.pop(next_out), terms_left.pop(next_out)
            yield combine(fns, outcome.pop(next_out))
            next_out += 1
        if exhausted and next_out == next_in:
            return
        while units and len(in_flight) < max_concurrency:
            j, idx = unit = units.popleft()
            items = [(pending[i]["data_source"], pending[i]["solution"], pending[i]["ground_truth"],
                      pending[i]["extra_info"]) for i in idx]
            in_flight[backend.submit(fns[j], items)] = _Unit(j, idx, 0, time.monotonic())
        if not in_flight:
            continue

        for handle, status, payload in backend.poll(list(in_flight), 0.05):
            unit = in_flight[handle]
            if status == "items":
                for result in payload:
                    record(unit.idx[unit.done], unit.j, result)
                    unit.done += 1
                unit.last_progress = time.monotonic()
                continue
            del in_flight[handle]
            if status != "done":
                charge(unit, status)
            elif unit.done < len(unit.idx):  # a backend ending a unit early would otherwise hang the caller
                charge(unit, "crash:unit_ended_early")
        now = time.monotonic()
        for handle, unit in list(in_flight.items()):
            if now - unit.last_progress > timeout_s:  # each sample gets timeout_s of its own
                backend.kill(handle)
                del in_flight[handle]
                charge(unit, TIMEOUT)


@dataclasses.dataclass
class _Unit:
    j: int  # the reward function's index
    idx: list[int]  # the samples, in the order the worker runs them
    done: int  # how many results came back
    last_progress: float  # monotonic time of submission or of the last result


def combine(fns: list[RewardFn], terms: dict[int, RewardResult]) -> dict:
    """One sample's terms → {score: Σ weight·term, components: {reward: score}, failures: [kind],
    failures_by_reward: {reward: kind}, details: {reward: details}} (rewards not applying to it are absent)."""
    total, components, failures, by_reward, details = 0.0, {}, [], {}, {}
    for j, res in sorted(terms.items()):
        name = fns[j].name
        components[name] = res.score
        total += fns[j].weight * res.score
        details[name] = res.details
        if res.failure:
            failures.append(res.failure)
            by_reward[name] = res.failure
    return {"score": total, "components": components, "failures": failures, "failures_by_reward": by_reward,
            "details": details}


def score_batch(fns: list[RewardFn], samples: list[dict], *, timeout_s: float, max_concurrency: int,
                samples_per_task: int = 16, backend=None) -> list[dict]:
    """samples: [{data_source, solution, ground_truth, extra_info}] → [{score, components, failures, ...}] in
    order, scored on the Ray reward actors (or `backend`), after each reward's prepare hook has run once."""
    fns = prepare_reward_servers(fns)
    backend = backend or RayTasks()
    try:
        return list(score_stream(fns, samples, backend, timeout_s=timeout_s, max_concurrency=max_concurrency,
                                 samples_per_task=samples_per_task))
    finally:
        if isinstance(backend, RayTasks):
            backend.close()


# ----------------------------------------------------------------------------------------- metrics and health

def reward_metrics(results: list[dict], data_sources: list[str], prefix: str = "reward") -> dict[str, float]:
    """Means of the score overall, per data source, per reward component and per numeric detail
    (`{prefix}/detail/<reward>/<key>`), and failure counts by kind."""
    scores = [r["score"] for r in results]
    out = {f"{prefix}/mean": sum(scores) / max(len(scores), 1)}
    by_source: dict[str, list[float]] = collections.defaultdict(list)
    for r, ds in zip(results, data_sources):
        by_source[ds].append(r["score"])
    for ds, vals in sorted(by_source.items()):
        out[f"{prefix}/by_source/{ds}"] = sum(vals) / len(vals)
    comp: dict[str, list[float]] = collections.defaultdict(list)
    numeric_details: dict[str, list[float]] = collections.defaultdict(list)
    for r in results:
        for name, v in r["components"].items():
            comp[name].append(v)
        for name, details in r.get("details", {}).items():
            for key, v in details.items():
                number = _finite_float(v)
                if number is not None:
                    numeric_details[f"{name}/{key}"].append(number)
    for name, vals in sorted(comp.items()):
        out[f"{prefix}/component/{name}"] = sum(vals) / len(vals)
    for name, vals in sorted(numeric_details.items()):
        out[f"{prefix}/detail/{name}"] = sum(vals) / len(vals)
    failures = collections.Counter(f for r in results for f in r["failures"])
    for kind, count in sorted(failures.items()):
        out[f"{prefix}/failures/{kind}"] = float(count)
    out[f"{prefix}/failures/total"] = float(sum(failures.values()))
    return out


def _finite_float(value: Any) -> float | None:
    """A detail as a metric: bools and finite numbers (10**400 and nan are not); None for anything else."""
    if not isinstance(value, (int, float)):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def failing_rewards(results: list[dict], max_failure_fraction: float = 0.5) -> list[dict]:
    """The reward functions that failed on more than `max_failure_fraction` of the samples they applied to in
    one step's results, counting only kinds that mean the function is broken (BROKEN_REWARD_KINDS: it raised,
    hung, crashed, returned a non-score), not a reason the reward gave about the completion (math's
    `no_answer`). → [{reward, failed, applied, by_kind: {kind: count}}], worst first."""
    applied: collections.Counter[str] = collections.Counter()
    by_kind: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for r in results:
        applied.update(r["components"].keys())  # counts names (update(dict) would add its values)
        for name, kind in r.get("failures_by_reward", {}).items():
            if kind.startswith(BROKEN_REWARD_KINDS):
                by_kind[name][kind] += 1
    report = [{"reward": name, "failed": sum(kinds.values()), "applied": applied[name], "by_kind": dict(kinds)}
              for name, kinds in by_kind.items() if sum(kinds.values()) > max_failure_fraction * applied[name]]
    return sorted(report, key=lambda entry: -entry["failed"] / entry["applied"])
