"""`python`: a code interpreter tool with a stateful session per trajectory (ReTool-style), in the sandbox.

    python(code) -> what the code prints; the value of a final expression is printed too (like a REPL)

Variables persist across calls: each trajectory gets ONE long-lived interpreter, started by `rewards.sandbox`'s
`spawn` (no network, no host files, own uid, seccomp, rlimits) at the episode's first call (or when the episode
begins, in the background: `prestart`) and killed when the episode closes. Cells go in over its stdin as length-prefixed frames (marshal: the host writes, the sandbox reads); a cell's output (print, a final expression's
value, the exception line of a cell that raised; stderr is merged) comes back on its stdout up to an end marker
that is random per call. Each cell runs under a wall clock (`timeout_s`, enforced from the host) and a CPU limit
(the interpreter lowers its own RLIMIT_CPU to `timeout_s` more than it has used), and its output is capped
(`max_output_chars` * 4 bytes). A cell that hangs, exhausts its CPU, floods its output or kills the interpreter
(os._exit, a segfault, a signal) gets an error observation (`tool_timeout`, `tool_output_limit`, `tool_crash`)
and the interpreter is killed; the next call starts a fresh one and first re-runs the cells that completed (a
cell that raised counts: its assignments before the error persist, as in a notebook), output hidden, to restore
the state, so the failed cell is dropped as if never run. Re-running repeats those cells' side effects inside the
fresh sandbox only; `random` is seeded at start so a restore agrees with the first run. If the restore itself
fails (it gets one `timeout_s`), the session starts empty and the next observation says the state was lost
(`restore_after_restart=False`: always start empty after a failure).

No process outlives its episode: `close()` (called by the rollout for every episode) kills the sandbox; a
session that is garbage-collected or whose host process exits is killed too (a finalizer; bwrap's
--die-with-parent).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import marshal
import os
import secrets
import selectors
import signal
import struct
import sys
import threading
import time
import weakref

from envs.base import ToolEnv
from envs.tools import ToolError, tool

# The interpreter inside the sandbox. The frames come in on a private copy of stdin (fd 0 itself becomes
# /dev/null, so input() in a cell sees end of file instead of eating the next frame); stderr is merged into
# stdout so a flood on either is caught by the one cap.
_SERVER = r"""
import sys
sys.path.extend(sys.argv[1:])   # site-packages, without running the host's .pth files (started with -S)
import _ast, marshal, os, random, resource, struct   # C modules: ast, json and traceback cost ~20 ms per start
frames = os.fdopen(os.dup(0), "rb", buffering=0)
os.dup2(os.open(os.devnull, os.O_RDONLY), 0)
os.dup2(1, 2)
sys.stdin = open(os.devnull)
sys.stderr = sys.stdout
random.seed(0)
scope = {"__name__": "__main__"}

def read_exact(n):
    data = b""
    while len(data) < n:
        chunk = frames.read(n - len(data))
        if not chunk:
            os._exit(0)              # the host closed the pipe: the session is over
        data += chunk
    return data

def run(source):
    try:
        tree = compile(source, "<cell>", "exec", _ast.PyCF_ONLY_AST)
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], _ast.Expr) else None
        exec(compile(tree, "<cell>", "exec"), scope)
        if last is not None:
            value = eval(compile(_ast.Expression(last.value), "<cell>", "eval"), scope)
            if value is not None:
                print(repr(value))
    except BaseException as err:     # SystemExit too: the session goes on
        import traceback
        print("".join(traceback.format_exception_only(type(err), err)).strip())

while True:
    frame = marshal.loads(read_exact(struct.unpack(">I", read_exact(4))[0]))   # from the host only
    # This cell's CPU budget: RLIMIT_CPU counts the whole process's seconds, so the soft limit moves up by
    # cpu_s from what has been used (whole seconds, rounded up); past it the kernel sends SIGXCPU.
    used = sum(resource.getrusage(resource.RUSAGE_SELF)[:2])
    hard = resource.getrlimit(resource.RLIMIT_CPU)[1]
    soft = int(used + frame["cpu_s"]) + 1
    resource.setrlimit(resource.RLIMIT_CPU, (soft if hard == resource.RLIM_INFINITY else min(soft, hard), hard))
    for cell in frame["cells"]:
        run(cell)
    sys.stdout.flush()
    os.write(1, ("\n" + frame["end"] + "\n").encode())
"""

# Starts asked for ahead of the first call. Its threads live as long as the process: bwrap's --die-with-parent
# kills a sandbox when the THREAD that spawned it exits.
_PRESTARTER = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="posttrain-python-start")
_STARTUP_S = 10.0   # wall clock for a sandbox to start and its interpreter to read frames (a loaded machine)


def _site_packages() -> list[str]:
    """The installed packages' directories, for the interpreter started with -S: the site module and its .pth
    files (an editable install's finder, import hooks) cost tens of ms per start and serve nothing in the sandbox."""
    import site
    return [p for p in (*site.getsitepackages(), site.getusersitepackages()) if os.path.isdir(p)]


class PythonSession:
    """One trajectory's interpreter: `run(code)` returns the cell's output or raises ToolError; `close()` ends it.

    timeout_s: wall clock and CPU seconds per call; memory_mb: the interpreter's address space;
    max_output_chars: what the model reads (a cell printing more than 4x that is stopped as a flood);
    session_cpu_s: the interpreter's CPU over its whole life (the hard RLIMIT_CPU; per-cell limits sit below it).
    """

    def __init__(self, *, timeout_s: float = 5.0, memory_mb: int = 512, max_output_chars: int = 1000,
                 allow_unsafe: bool = False, restore_after_restart: bool = True, session_cpu_s: float = 600.0):
        from rewards.sandbox import SandboxLimits
        self.sandbox = None   # the process-wide default_sandbox() on first use: building demos needs no bwrap
        self.allow_unsafe = allow_unsafe
        self.timeout_s = float(timeout_s)
        self.limits = SandboxLimits(wall_s=timeout_s, cpu_s=max(session_cpu_s, timeout_s), memory_mb=memory_mb)
        self.max_output_chars = max_output_chars
        self.output_cap_bytes = 4 * max_output_chars + 4096
        self.restore_after_restart = restore_after_restart
        self.history: list[str] = []      # cells that completed: re-run only to restore state after a restart
        self.process = None               # rewards.sandbox.SandboxProcess while an interpreter is running
        self.starts = 0                   # interpreters started (1 + restarts)
        self.closed = False
        self._selector = None
        self._lock = threading.Lock()     # close() may come from another thread than run()

    # ------------------------------------------------------------------ the model's call
    def run(self, code: str) -> str:
        with self._lock:
            if self.closed:
                raise ToolError("after_end", "the python session is closed (the episode ended)")
            notice = ""
            if self.process is None:
                self._start()
                if self.history:
                    notice = self._restore()
            output, failure = self._exchange([code], self.timeout_s, self.output_cap_bytes)
            if failure is not None:
                kind, message = failure
                self._stop()
                if not self.restore_after_restart:
                    self.history.clear()
                after = ("the next call restarts the interpreter and re-runs the earlier successful cells (output "
                         "hidden) to restore their state; this cell is dropped" if self.restore_after_restart else
                         "the interpreter was restarted and the session's state is lost")
                raise ToolError(kind, f"{message}; {after}")
            self.history.append(code)
        text = output.decode(errors="replace").strip()
        if len(text) > self.max_output_chars:
            text = text[:self.max_output_chars] + f"\n... (output truncated at {self.max_output_chars} chars)"
        return notice + (text or "(no output)")

    def prestart(self) -> None:
        """Start the interpreter in the background now, so that the first call finds it running."""
        _PRESTARTER.submit(self._prestart)

    def _prestart(self) -> None:
        with self._lock:
            if self.process is None and not self.closed:
                try:
                    self._start()
                except Exception:   # noqa: BLE001 - the first call starts it again and reports what failed
                    pass

    def close(self) -> None:
        """Kill the interpreter (idempotent); later calls are refused."""
        self.closed = True
        process = self.process
        if process is not None:
            process.kill(close_pipes=False)   # a run() blocked on its output sees end of file at once
        with self._lock:
            self._stop()

    # ------------------------------------------------------------------ the interpreter's life
    def _start(self) -> None:
        from rewards.sandbox import default_sandbox
        if self.sandbox is None:
            self.sandbox = default_sandbox(self.allow_unsafe)
        self.process = self.sandbox.spawn([sys.executable, "-I", "-S", "-c", _SERVER, *_site_packages()],
                                          limits=self.limits)
        self.starts += 1
        # A session dropped without close() (an exception between make_env_group and run_multiturn's close)
        # still kills its sandbox when it is collected or when this process exits.
        self._finalizer = weakref.finalize(self, self.process.kill)
        self._selector = selectors.DefaultSelector()
        for pipe in (self.process.popen.stdout, self.process.popen.stderr):
            os.set_blocking(pipe.fileno(), False)
            self._selector.register(pipe.fileno(), selectors.EVENT_READ)
        # Wait until the interpreter reads frames (an empty one), so no cell's wall clock pays the start.
        _, failure = self._exchange([], _STARTUP_S, 4096)
        if failure is not None:
            self._stop()
            raise ToolError("tool_crash", f"the python sandbox did not start: {failure[1]}")

    def _stop(self) -> None:
        if self.process is not None:
            self.process.kill()
            self._finalizer.detach()
            self._selector.close()
            self.process = self._selector = None

    def _restore(self) -> str:
        """Re-run the completed cells in the fresh interpreter, output discarded; '' or a notice for the model."""
        _, failure = self._exchange(self.history, self.timeout_s, self.output_cap_bytes * len(self.history))
        if failure is None:
            return ""
        self._stop()
        self.history.clear()
        self._start()
        return (f"(the session's earlier state could not be restored after the restart ({failure[1]}); "
                "it starts empty)\n")

    def _exchange(self, cells: list[str], wall_s: float, cap_bytes: int) -> tuple[bytes, tuple[str, str] | None]:
        """Send one frame, read the output up to its end marker: (output, None) or (partial output, (kind,
        message)) when the wall clock passed, the output passed cap_bytes or the interpreter died."""
        process = self.process
        self._discard_pending()   # output a cell's background thread wrote after its call ended
        end = b"\n<<posttrain-cell-end-" + secrets.token_hex(8).encode() + b">>\n"
        body = marshal.dumps({"cells": cells, "end": end.decode().strip(), "cpu_s": self.timeout_s})
        deadline = time.monotonic() + wall_s
        stdout_fd = process.popen.stdout.fileno()
        buffer, stderr_tail = bytearray(), b""
        try:
            process.popen.stdin.write(struct.pack(">I", len(body)) + body)
            process.popen.stdin.flush()
        except (OSError, ValueError):      # the interpreter is gone (or close() raced us)
            return b"", self._crash(stderr_tail)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return bytes(buffer), ("tool_timeout", f"the code did not finish within {self.timeout_s:g} "
                                                       "s and was stopped")
            for key, _ in self._selector.select(timeout=remaining):
                try:
                    data = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                except OSError:
                    data = b""
                if key.fd != stdout_fd:        # bwrap's own stderr (the program's is merged into stdout)
                    stderr_tail = (stderr_tail + data)[-2000:]
                    if not data:
                        self._selector.unregister(key.fd)
                    continue
                if not data:
                    return bytes(buffer), self._crash(stderr_tail + bytes(buffer[-2000:]))
                buffer += data
                at = buffer.find(end, max(0, len(buffer) - len(data) - len(end)))
                if at >= 0:
                    return bytes(buffer[:at]), None
                if len(buffer) > cap_bytes + len(end):
                    return bytes(buffer[:cap_bytes]), ("tool_output_limit", f"the code printed more than "
                                                       f"{cap_bytes} bytes and was stopped; print less")

    def _crash(self, last_output: bytes) -> tuple[str, str]:
        status = self.process.status(wait_s=2.0)
        exit_code, killed_by = status if status is not None else (None, None)
        if killed_by == signal.SIGXCPU:
            return "tool_timeout", f"the code used more than {self.timeout_s:g} s of CPU and was stopped"
        why = (f"signal {killed_by}" if killed_by else f"exit status {exit_code}" if exit_code is not None
               else "its output closed")
        lines = last_output.decode(errors="replace").strip().splitlines()[-1:] or [""]
        return "tool_crash", f"the interpreter crashed ({why}); {lines[0][:200]}".rstrip("; ")

    def _discard_pending(self) -> None:
        for key, _ in self._selector.select(timeout=0):
            try:
                if not os.read(key.fd, 1 << 20) and key.fd != self.process.popen.stdout.fileno():
                    self._selector.unregister(key.fd)    # bwrap's stderr closed; stdout's end is a crash, seen next
            except OSError:
                pass


class PythonEnv(ToolEnv):
    """Arithmetic (or anything) with a Python interpreter. Final answer `Answer: N`, scored by `answer_reward`
    (default: the toy's exact integer match). `allow_unsafe`: where bubblewrap cannot run, execute the model's
    code as a plain rlimited subprocess (rewards.sandbox's unsafe mode; never on a shared machine). `prestart`:
    start the episode's interpreter when the episode begins rather than at its first call, so that the start
    overlaps the engine's first turn instead of the round's tool phase; it costs a sandbox (~16 MB) for every
    episode, including those that never call the tool, and on a CPU machine the starts slow the engine down more
    than they save (benchmarks/AGENT.md): off by default."""

    def __init__(self, row: dict, *, timeout_s: float = 5.0, memory_mb: int = 512, max_output_chars: int = 1000,
                 answer_reward: str = "posttrain.toy.rewards:exact_answer", allow_unsafe: bool = False,
                 restore_after_restart: bool = True, prestart: bool = False, **kwargs):
        super().__init__(row, answer_reward=answer_reward, **kwargs)
        self.session = PythonSession(timeout_s=timeout_s, memory_mb=memory_mb, max_output_chars=max_output_chars,
                                     allow_unsafe=allow_unsafe, restore_after_restart=restore_after_restart)
        self.prestart = prestart
        # The host-side wait must outlast the session's own limits (a sandbox start, a restore, then the cell),
        # which report a timeout properly.
        self.tools["python"] = dataclasses.replace(self.tools["python"], timeout_s=2 * timeout_s + _STARTUP_S + 10.0)

    @tool
    def python(self, code: str) -> str:
        """Run Python code in a persistent session; returns what it prints (a final expression's value too).

        Args:
            code: Python source to run
        """
        return self.session.run(code)

    def initial_observation(self):
        if self.prestart:   # the sandbox starts while the engine samples the first turn
            self.session.prestart()
        return super().initial_observation()

    def close(self) -> None:
        self.session.close()
