"""A persistent pool of killable worker processes, for work that may never finish on hostile input.

Why not a timeout inside the caller: sympy on `9^{9^{9^{9}}}` spends minutes in C big-integer code,
where no Python-level signal or flag is ever checked, and `signal.alarm` (Math-Verify's own timeout)
only works on the main thread — verl hung on exactly this. The only interruption that always works is
killing the process doing the work. So:

* each call borrows one idle worker process (starting one when fewer than `max_workers` live),
  sends it `(task, args)` over a pipe and lets it run until it has used `timeout_s` seconds of CPU
  time, or `max_wall_s` wall-clock seconds have passed (default 5 x `timeout_s`), whichever is first.
  CPU time, not wall time, because on a busy machine (load average 5 on 2 cores) a worker waits for a
  core most of the time: a wall-clock limit of 2 s turned correct answers that need 0.3 s of CPU into
  time-outs. Input that never terminates burns CPU, so it still hits the CPU limit; a worker that gets
  no CPU at all still ends at the wall cap;
* on time-out (or a crash, or a MemoryError) the worker is SIGKILLed and forgotten; the next call
  that needs a worker starts a fresh one (~10 ms: forked from a "zygote" process that imported
  sympy and Math-Verify once);
* nothing but the calling thread waits: no dispatcher thread, no signals, so `call` works from any
  thread, from async code run in a thread, and inside Ray workers (which are ordinary processes).

An adversarial answer therefore holds one worker for at most its own limit; other callers use the
other workers, or wait for a free one at most that long. Workers get an address-space limit so a
memory bomb fails with MemoryError instead of swapping the machine.
"""
from __future__ import annotations

import atexit
import dataclasses
import importlib
import json
import os
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from multiprocessing.connection import Connection
from typing import Any, Callable

# Modules the zygote imports once, so that each new worker starts warm (~10 ms, not ~1 s).
DEFAULT_PRELOAD = ("sympy", "math_verify", "rewards.matheq")
# Run once in the zygote after the imports: a worker forked afterwards inherits warm parser
# caches (Math-Verify's first parse costs ~0.3 s, which would count against each new worker's
# time limit after every kill).
DEFAULT_WARMUP = "rewards.matheq:warm_up"
DEFAULT_MEMORY_LIMIT_MB = 3072
WORKERS_ENV = "POSTTRAIN_VERIFY_WORKERS"
# Wall-clock cap of one call, as a multiple of its CPU-time limit: how much starvation we wait out.
DEFAULT_MAX_WALL_FACTOR = 5.0


@dataclasses.dataclass
class Outcome:
    """What happened to one call: status is "ok", "error", "timeout", "memory" or "crashed";
    wall_s / cpu_s: the call's wall-clock time and its worker's CPU time (None where unmeasured)."""
    status: str
    value: Any = None
    error: str | None = None
    wall_s: float | None = None
    cpu_s: float | None = None


_CLOCK_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU seconds used so far by process `pid` (Linux /proc); None where unavailable."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat_file:
            stat = stat_file.read()
    except OSError:
        return None
    # Fields after the ")" that closes the command name: state is [0], utime [11], stime [12].
    fields = stat.rsplit(b")", 1)[-1].split()
    try:
        return (int(fields[11]) + int(fields[12])) / _CLOCK_TICKS
    except (IndexError, ValueError):
        return None


def default_worker_count() -> int:
    """Workers per process: $POSTTRAIN_VERIFY_WORKERS if set, else the CPUs this process may use."""
    env = os.environ.get(WORKERS_ENV, "").strip()
    if env:
        try:
            return max(1, int(env))
        except ValueError:
            raise ValueError(f"{WORKERS_ENV}={env!r} is not an integer; set it to the number of "
                             "verifier processes wanted (e.g. 2)") from None
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not Linux
        return max(1, os.cpu_count() or 1)


def _limit_memory(limit_mb: int | None) -> None:
    if not limit_mb:
        return
    try:
        import resource
        limit = limit_mb * 1024 * 1024
        soft, hard = resource.getrlimit(resource.RLIMIT_AS)
        if hard != resource.RLIM_INFINITY:
            limit = min(limit, hard)
        resource.setrlimit(resource.RLIMIT_AS, (limit, hard))
    except (ImportError, ValueError, OSError):
        pass  # no rlimits on this platform: the wall-clock kill still bounds the damage


def _resolve_task(task: str, cache: dict[str, Callable[..., Any]]) -> Callable[..., Any]:
    fn = cache.get(task)
    if fn is None:
        module_name, _, attr = task.partition(":")
        fn = getattr(importlib.import_module(module_name), attr)
        cache[task] = fn
    return fn


def _worker_loop(conn, memory_limit_mb: int | None) -> None:
    """Body of a worker process: run (task, args) requests until the pipe closes."""
    # Ctrl-C goes to the whole process group; the parent decides what happens, not the workers.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _limit_memory(memory_limit_mb)
    cache: dict[str, Callable[..., Any]] = {}
    while True:
        try:
            request = conn.recv()
        except (EOFError, OSError):
            return  # parent gone or pool closed
        if request is None:
            return
        task, args = request
        exit_after = False
        try:
            reply = ("ok", _resolve_task(task, cache)(*args), None)
        except MemoryError:
            reply, exit_after = ("memory", None, "MemoryError"), True
        except RecursionError:
            reply = ("error", None, "RecursionError")
        except BaseException as err:  # noqa: BLE001 - any failure of the task is reported, not fatal
            # Only the type name: str() of a sympy object built from hostile input can itself hang.
            reply = ("error", None, type(err).__name__)
        try:
            conn.send(reply)
        except Exception:  # noqa: BLE001 - e.g. an unpicklable result
            conn.send(("error", None, "unpicklable_result"))
        if exit_after:
            return  # the heap may be in a bad state after a MemoryError: let the pool replace us


class _Zygote:
    """A helper process that imported sympy/Math-Verify once and forks warm workers on request.

    Why not multiprocessing's forkserver or spawn: both re-import the caller's `__main__` in every
    worker, which re-runs a user's unguarded script (or Ray's worker entry point). The zygote is
    started with `python -c`, so no user code ever runs in it.
    """

    def __init__(self, preload: tuple[str, ...], memory_limit_mb: int | None, warmup: str | None):
        parent_end, child_end = socket.socketpair()
        bootstrap = ("import sys, json; sys.path[:0] = json.loads(sys.argv[1]); "
                     "from rewards._pool import _zygote_main; _zygote_main()")
        config = json.dumps({"fd": child_end.fileno(), "preload": list(preload),
                             "memory_limit_mb": memory_limit_mb, "warmup": warmup})
        # stdout goes nowhere: `posttrain score -o -` may be writing results there.
        self.process = subprocess.Popen(
            [sys.executable, "-c", bootstrap, json.dumps([p for p in sys.path if p]), config],
            pass_fds=[child_end.fileno()], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        child_end.close()
        self.control = parent_end
        self.lock = threading.Lock()

    def fork_worker(self) -> "_Worker":
        ours, theirs = socket.socketpair()
        try:
            with self.lock:
                socket.send_fds(self.control, [b"F"], [theirs.fileno()])
                reply = b""
                while len(reply) < 4:  # the first reply waits for the zygote's imports (~1 s)
                    chunk = self.control.recv(4 - len(reply))
                    if not chunk:
                        raise EOFError("verifier zygote exited")
                    reply += chunk
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        return _Worker(struct.unpack("!i", reply)[0], Connection(ours.detach()))

    def alive(self) -> bool:
        return self.process.poll() is None

    def close(self) -> None:
        try:
            self.control.close()  # the zygote exits on EOF
        except OSError:
            pass
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


class _Worker:
    def __init__(self, pid: int, conn: Connection):
        self.pid = pid
        self.conn = conn

    def kill(self) -> None:
        # The zygote is the parent and reaps it (SIGCHLD ignored there).
        try:
            os.kill(self.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            self.conn.close()
        except OSError:
            pass


def _set_parent_death_signal() -> None:
    """Linux: die with the zygote, so a worker stuck in C code cannot outlive its pool."""
    try:
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        libc.prctl(pr_set_pdeathsig, signal.SIGKILL)
    except (OSError, AttributeError):
        pass


def _zygote_main() -> None:
    """Entry point of the zygote process: preload, then fork one worker per request."""
    config = json.loads(sys.argv[2])
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    for module in config["preload"]:
        try:
            importlib.import_module(module)
        except Exception:  # noqa: BLE001 - a missing optional module only makes workers start slower
            pass
    if config.get("warmup"):
        try:
            _resolve_task(config["warmup"], {})()
        except Exception:  # noqa: BLE001 - warm-up is an optimisation only
            pass
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # killed workers are reaped automatically
    control = socket.socket(fileno=config["fd"])
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(control, 16, 1)
        except OSError:
            return
        if not message:
            return  # the pool's owner closed the pool or died
        if not fds:
            continue
        pid = os.fork()
        if pid == 0:
            control.close()
            signal.signal(signal.SIGCHLD, signal.SIG_DFL)
            _set_parent_death_signal()
            try:
                _worker_loop(Connection(fds[0]), config["memory_limit_mb"])
            finally:
                os._exit(0)
        os.close(fds[0])
        control.sendall(struct.pack("!i", pid))


class KillablePool:
    """A bounded set of reusable worker processes; `call` never takes longer than its wall cap
    (plus any wait for a free worker, itself bounded by the other calls' caps)."""

    def __init__(self, max_workers: int | None = None, memory_limit_mb: int | None = DEFAULT_MEMORY_LIMIT_MB,
                 preload: tuple[str, ...] = DEFAULT_PRELOAD, warmup: str | None = DEFAULT_WARMUP):
        self.max_workers = max_workers or default_worker_count()
        self.memory_limit_mb = memory_limit_mb
        self.preload = preload
        self.warmup = warmup
        self._zygote: _Zygote | None = None
        self._zygote_lock = threading.Lock()
        self._cond = threading.Condition()
        self._idle: list[_Worker] = []
        self._live = 0
        self._closed = False
        self.kills = 0  # workers killed for time-out, crash or memory: a health counter

    def call(self, task: str, args: tuple, timeout_s: float, max_wall_s: float | None = None) -> Outcome:
        """Run `task` ("module:function") on `args` in a worker; never raises for the task's sake.

        The worker is killed once it has used `timeout_s` seconds of CPU time or `max_wall_s`
        (default DEFAULT_MAX_WALL_FACTOR x timeout_s) seconds of wall time have passed. Where the
        worker's CPU time cannot be read (no /proc), wall time stands in for it."""
        max_wall_s = max(max_wall_s if max_wall_s is not None else DEFAULT_MAX_WALL_FACTOR * timeout_s, timeout_s)
        worker = self._acquire()
        healthy = False
        try:
            started, cpu_at_start = time.monotonic(), process_cpu_seconds(worker.pid)
            worker.conn.send((task, args))
            wait_s, cpu_used = timeout_s, 0.0
            while not worker.conn.poll(wait_s):
                # Sleep until the CPU budget could be spent at the earliest (it cannot run faster
                # than wall time), so an ordinary call costs no polling at all.
                wall_used = time.monotonic() - started
                cpu_now = process_cpu_seconds(worker.pid)
                cpu_used = wall_used if cpu_at_start is None or cpu_now is None else cpu_now - cpu_at_start
                if cpu_used >= timeout_s or wall_used >= max_wall_s:
                    limit = (f"{timeout_s:g}s of CPU time" if cpu_used >= timeout_s
                             else f"{max_wall_s:g}s of wall time")
                    return Outcome("timeout", error=f"no result within {limit}", wall_s=wall_used, cpu_s=cpu_used)
                wait_s = min(max(timeout_s - cpu_used, 0.02), max_wall_s - wall_used)
            status, value, error = worker.conn.recv()
            healthy = status != "memory"
            return Outcome(status, value, error, wall_s=time.monotonic() - started)
        except (EOFError, OSError) as err:
            return Outcome("crashed", error=f"worker died: {type(err).__name__}")
        finally:
            self._release(worker, healthy)

    def idle_worker_pids(self) -> list[int]:
        """Process ids of the idle workers (for health checks, and for tests that starve them)."""
        with self._cond:
            return [worker.pid for worker in self._idle]

    def close(self) -> None:
        with self._cond:
            self._closed = True
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for worker in idle:
            worker.kill()
        with self._zygote_lock:
            if self._zygote is not None:
                self._zygote.close()
                self._zygote = None

    def _start_worker(self) -> _Worker:
        with self._zygote_lock:
            for attempt in range(2):
                if self._zygote is None or not self._zygote.alive():
                    if self._zygote is not None:
                        self._zygote.close()
                    self._zygote = _Zygote(self.preload, self.memory_limit_mb, self.warmup)
                try:
                    return self._zygote.fork_worker()
                except (EOFError, OSError):
                    if attempt == 1:
                        raise
                    self._zygote.close()
                    self._zygote = None
        raise AssertionError("unreachable")

    def _acquire(self) -> _Worker:
        with self._cond:
            while True:
                if self._closed:
                    raise RuntimeError("KillablePool is closed")
                if self._idle:
                    return self._idle.pop()
                if self._live < self.max_workers:
                    self._live += 1
                    break
                self._cond.wait()
        try:
            return self._start_worker()
        except BaseException:
            with self._cond:
                self._live -= 1
                self._cond.notify()
            raise

    def _release(self, worker: _Worker, healthy: bool) -> None:
        if healthy:
            with self._cond:
                if not self._closed:
                    self._idle.append(worker)
                    self._cond.notify()
                    return
        else:
            self.kills += 1
        worker.kill()
        with self._cond:
            self._live -= 1
            self._cond.notify()


_shared_pool: KillablePool | None = None
_shared_pool_pid: int | None = None
_shared_lock = threading.Lock()


def shared_pool() -> KillablePool:
    """The process-wide pool, created on first use (and again in a forked child, which must not
    share its parent's pipes)."""
    global _shared_pool, _shared_pool_pid
    with _shared_lock:
        if _shared_pool is None or _shared_pool_pid != os.getpid():
            _shared_pool = KillablePool()
            _shared_pool_pid = os.getpid()
        return _shared_pool


@atexit.register
def _close_shared_pool() -> None:
    if _shared_pool is not None and _shared_pool_pid == os.getpid():
        _shared_pool.close()
