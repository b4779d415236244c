"""A sandbox for untrusted programs (model-written code, tool calls), built on bubblewrap + rlimits.

What a sandboxed run gets (mechanism "bwrap"):
  * its own mount namespace: the system (/usr, /etc, the Python prefix) read-only and `nosuid`, a
    private size-capped tmpfs as the writable work dir (/sandbox, the cwd) and another as /tmp; no host
    home, no repository, no host /tmp. Nothing it writes reaches the host's disk.
  * no network (own network namespace: only a down loopback), own PID, IPC and UTS namespaces.
  * its own unprivileged uid. As root we drop each run to a uid of its own (a "slot", taken with a
    file lock so concurrent runs on one machine never share one) — RLIMIT_NPROC counts per real uid
    and root is exempt from it, so this is what makes the process cap real. As a normal user bwrap
    makes a user namespace and the cap counts per namespace.
  * rlimits set inside, after the namespaces exist and before the program's exec: CPU seconds,
    address space, processes, file size, open files, no core dumps; `no_new_privs`. CPU and memory
    limits are per process here (the code judge's harness adds up CPU over all of a test's processes).
  * a seccomp filter (rewards/_seccomp.py, x86_64): no new namespaces, no mounts, no ptrace / bpf /
    io_uring / keyrings / module loading, no SysV IPC or message queues, sockets only AF_UNIX/INET/INET6.
    As a normal user bwrap also gets `--disable-userns`, so no nested user namespace is possible.
  * a wall-clock limit enforced from the host: killing bwrap kills the PID namespace's init
    (`--die-with-parent`), and the kernel then kills every process in it — no background child
    outlives a run. stdout/stderr are capped; a run that overflows them is killed.

Where bwrap is missing or cannot create namespaces, `Sandbox()` raises `SandboxUnavailable` with the
fix, unless the caller passes `allow_unsafe=True`: then programs run as plain subprocesses with the
rlimits only (no namespaces, no filesystem or network isolation) — for a laptop, never for a cluster.

Two ways to run:
  * `run(argv)`: an untrusted command; it is dropped to the slot uid and limited before exec.
  * `run(argv, trusted_supervisor=True)`: a trusted supervisor (the code judge's harness) that keeps
    CAP_SETUID/SETGID/KILL inside the namespaces and drops each child it starts by itself; it learns
    the slot uid from $POSTTRAIN_SANDBOX_UID. Untrusted code never runs with those capabilities.
  * `spawn(argv)`: an untrusted command started and left running (a `SandboxProcess`: pipes and `kill()`),
    for a long-lived program the caller feeds over its pipes under its own time and output limits (the
    python tool's per-trajectory interpreter, envs/python.py).
"""
from __future__ import annotations

import dataclasses
import fcntl
import functools
import os
import random
import selectors
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from typing import Callable, Mapping, Sequence

from rewards import _seccomp

WORK_DIR = "/sandbox"
SUPERVISOR_UID_ENV = "POSTTRAIN_SANDBOX_UID"
SUPERVISOR_PIDNS_ENV = "POSTTRAIN_SANDBOX_PIDNS"
SLOT_UID_BASE = 2_000_000_000  # far above any real account, below 2**31 (signed-uid tools)
SLOT_COUNT = 4096
SLOT_LOCK_DIR = os.path.join(tempfile.gettempdir(), "posttrain-sandbox-slots")
NOBODY_UID = 65534


class SandboxUnavailable(RuntimeError):
    """No isolation mechanism works here, and the caller did not opt into unsafe local mode."""


@dataclasses.dataclass(frozen=True)
class SandboxLimits:
    """Limits of one sandboxed run. Memory, CPU and file size are per process; nproc per sandbox."""
    wall_s: float = 20.0           # whole run, host-enforced: everything in the sandbox is killed
    cpu_s: float = 10.0            # RLIMIT_CPU of each process (seconds of CPU)
    memory_mb: int = 512           # RLIMIT_AS of each process
    nproc: int = 32                # processes + threads the sandbox user may have at once
    file_size_mb: int = 16         # RLIMIT_FSIZE: largest file a process may write
    open_files: int = 256          # RLIMIT_NOFILE
    stdout_bytes: int = 8 << 20    # beyond this the run is killed and flagged output_limited
    stderr_bytes: int = 1 << 20
    tmpfs_mb: int = 64             # size of /sandbox and of /tmp each (tmpfs lives in RAM)

    def __post_init__(self):
        for field in dataclasses.fields(self):
            value = getattr(self, field.name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not value > 0:
                raise ValueError(f"SandboxLimits.{field.name} must be a positive number, got {value!r}")

    def rlimit_args(self) -> list[str]:
        """`prlimit` options (soft:hard) for these limits."""
        cpu = max(1, int(-(-self.cpu_s // 1)))  # RLIMIT_CPU has whole seconds; round up
        mem = int(self.memory_mb) << 20
        fsize = int(self.file_size_mb) << 20
        return [f"--cpu={cpu}:{cpu + 1}", f"--as={mem}:{mem}", f"--nproc={self.nproc}:{self.nproc}",
                f"--fsize={fsize}:{fsize}", f"--nofile={self.open_files}:{self.open_files}",
                "--core=0:0"]


@dataclasses.dataclass
class SandboxResult:
    exit_code: int | None          # None when the process died of a signal
    signal: int | None             # the signal that ended it (SIGKILL when we killed it)
    stdout: bytes
    stderr: bytes
    wall_s: float
    timed_out: bool = False        # hit limits.wall_s
    output_limited: bool = False   # stdout or stderr exceeded its cap
    stopped: bool = False          # the caller's on_stdout callback asked to stop
    mechanism: str = "bwrap"

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not (self.timed_out or self.output_limited or self.stopped)


def _is_root() -> bool:
    return os.geteuid() == 0


def _uid_mappable(uid: int) -> bool:
    """True when `uid` exists in our user namespace (inside a container only a range may be mapped)."""
    try:
        with open("/proc/self/uid_map") as fh:
            for line in fh:
                inside, _outside, count = (int(x) for x in line.split())
                if inside <= uid < inside + count:
                    return True
    except OSError:
        return False
    return False


class _UidSlot:
    """An unprivileged uid held exclusively (flock) for one run, so RLIMIT_NPROC counts only that run."""

    def __init__(self):
        self.uid = NOBODY_UID
        self._fh = None
        if not _uid_mappable(SLOT_UID_BASE + SLOT_COUNT - 1):
            return  # shared 'nobody': the process cap then counts every sandbox on the machine
        os.makedirs(SLOT_LOCK_DIR, mode=0o700, exist_ok=True)
        start = random.randrange(SLOT_COUNT)
        for k in range(SLOT_COUNT):
            slot = (start + k) % SLOT_COUNT
            fh = open(os.path.join(SLOT_LOCK_DIR, str(slot)), "a")
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:
                fh.close()
                continue
            self.uid, self._fh = SLOT_UID_BASE + slot, fh
            return
        raise SandboxUnavailable(f"all {SLOT_COUNT} sandbox uid slots in {SLOT_LOCK_DIR} are in use")

    def release(self):
        if self._fh is not None:
            self._fh.close()  # closing drops the flock
            self._fh = None


def _python_prefixes() -> list[str]:
    """Directories the sandboxed Python needs besides /usr (pyenv, conda and venv prefixes)."""
    paths = {os.path.realpath(p) for p in (sys.prefix, sys.base_prefix, sys.exec_prefix)}
    paths.add(os.path.dirname(os.path.dirname(os.path.realpath(sys.executable))))
    return sorted(p for p in paths if p and not p.startswith("/usr/") and p != "/usr" and os.path.isdir(p))


def _ancestors(path: str) -> list[str]:
    parts = path.strip("/").split("/")[:-1]
    return ["/" + "/".join(parts[:i + 1]) for i in range(len(parts))]


class Sandbox:
    """Runs commands isolated by bubblewrap (see module docstring). Thread-safe; one per process is enough.

    extra_ro_binds: host paths to expose read-only at the same path (e.g. a tool environment's data).
    """

    def __init__(self, limits: SandboxLimits | None = None, *, allow_unsafe: bool = False,
                 extra_ro_binds: Sequence[str] = ()):
        self.limits = limits or SandboxLimits()
        self.extra_ro_binds = tuple(os.path.realpath(p) for p in extra_ro_binds)
        problem = probe_bwrap(self.extra_ro_binds)
        if problem is None:
            self.mechanism = "bwrap"
        elif allow_unsafe:
            self.mechanism = "unsafe"
        else:
            raise SandboxUnavailable(
                f"cannot isolate untrusted code here: {problem}. Install bubblewrap "
                "(`apt-get install bubblewrap`; scripts/setup.sh does it) on a kernel that allows "
                "namespaces, or opt into running it WITHOUT isolation with allow_unsafe=True "
                "(recipe: reward kwargs allow_unsafe: true) — only for trusted code on your own machine.")
        self.privileged = _is_root()

    # ---------------------------------------------------------------- command line
    def _bwrap_argv(self, limits: SandboxLimits, files_fds: Mapping[str, int], trusted_supervisor: bool,
                    uid: int, seccomp_fd: int | None = None) -> list[str]:
        argv = ["bwrap", "--die-with-parent", "--new-session", "--unshare-net", "--unshare-pid",
                "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try", "--clearenv"]
        if seccomp_fd is not None:
            argv += ["--seccomp", str(seccomp_fd)]
        if not self.privileged:
            # unprivileged: the user namespace is what lets us make the others; nothing inside may make
            # another one (a nested one would hold every capability over its own mounts and network)
            argv += ["--unshare-user", "--disable-userns", "--cap-drop", "ALL"]
        elif trusted_supervisor:
            argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID",
                     "--cap-add", "CAP_KILL"]
        else:
            argv += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        argv += ["--ro-bind", "/usr", "/usr", "--ro-bind", "/etc", "/etc"]
        for top in ("bin", "sbin", "lib", "lib32", "lib64", "libx32"):
            host = "/" + top
            if os.path.islink(host):
                argv += ["--symlink", os.readlink(host), host]
            elif os.path.isdir(host):
                argv += ["--ro-bind", host, host]
        # The private /tmp and work dir are mounted BEFORE the interpreter's prefixes: a venv that lives under
        # /tmp (a CI checkout in /tmp, say) must be bound on top of the tmpfs, not hidden by it.
        tmpfs_bytes = str(int(limits.tmpfs_mb) << 20)
        argv += ["--dev", "/dev", "--proc", "/proc",
                 "--perms", "1777", "--size", tmpfs_bytes, "--tmpfs", "/tmp",
                 "--perms", "1777", "--size", tmpfs_bytes, "--tmpfs", WORK_DIR]
        made = {"/usr", "/etc", "/tmp", WORK_DIR}
        for path in [*_python_prefixes(), *self.extra_ro_binds]:
            for parent in _ancestors(path):
                if parent not in made:
                    argv += ["--perms", "0755", "--dir", parent]  # bwrap would make them 0700
                    made.add(parent)
            argv += ["--ro-bind", path, path]
        for name, fd in files_fds.items():
            argv += ["--perms", "0644", "--file", str(fd), f"{WORK_DIR}/{name}"]
        argv += ["--chdir", WORK_DIR]
        return argv

    @staticmethod
    def _env(env: Mapping[str, str] | None, home: str) -> dict[str, str]:
        base = {"PATH": "/usr/local/bin:/usr/bin:/bin", "HOME": home, "TMPDIR": "/tmp", "LANG": "C.UTF-8",
                "PYTHONDONTWRITEBYTECODE": "1", "PYTHONIOENCODING": "utf-8",
                # one thread per numeric library: threads count against the process cap
                "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
        base.update(env or {})
        return base

    # ---------------------------------------------------------------- run
    def run(self, argv: Sequence[str], *, stdin: bytes = b"", files: Mapping[str, bytes] | None = None,
            env: Mapping[str, str] | None = None, limits: SandboxLimits | None = None,
            trusted_supervisor: bool = False,
            on_stdout: Callable[[bytes], bool] | None = None) -> SandboxResult:
        """Run argv in a fresh sandbox; `files` are written into the work dir first (names without '/').

        on_stdout(new_bytes) is called as stdout arrives; returning False kills the run early
        (the code judge uses it to stop at the first wrong answer).
        """
        limits = limits or self.limits
        files = dict(files or {})
        for name in files:
            if not name or "/" in name or name in (".", ".."):
                raise ValueError(f"sandbox file name {name!r} must be a plain file name (no '/')")
        if self.mechanism == "unsafe":
            return self._run_unsafe(argv, stdin, files, env, limits, trusted_supervisor, on_stdout)
        slot = _UidSlot() if self.privileged else None
        memfds = {}
        seccomp_fd = None
        try:
            for name, content in files.items():
                fd = os.memfd_create(f"sandbox-{name}")
                os.write(fd, content) if len(content) < (1 << 16) else _write_all(fd, content)
                os.lseek(fd, 0, os.SEEK_SET)
                memfds[name] = fd
            seccomp_fd = _seccomp_memfd(trusted_supervisor)
            uid = slot.uid if slot else os.getuid()
            cmd = self._command(argv, memfds, env, limits, trusted_supervisor, uid, seccomp_fd)
            pass_fds = (*memfds.values(), *([seccomp_fd] if seccomp_fd is not None else []))
            return _communicate(cmd, stdin, limits, on_stdout, pass_fds=pass_fds, mechanism="bwrap")
        finally:
            for fd in (*memfds.values(), *([seccomp_fd] if seccomp_fd is not None else [])):
                os.close(fd)
            if slot:
                slot.release()

    def _command(self, argv, memfds, env, limits, trusted_supervisor, uid, seccomp_fd) -> list[str]:
        """The full bwrap command line running argv (dropped to `uid` and rlimited unless a trusted supervisor)."""
        cmd = self._bwrap_argv(limits, memfds, trusted_supervisor, uid, seccomp_fd)
        run_env = self._env(env, WORK_DIR)
        if trusted_supervisor:
            run_env[SUPERVISOR_UID_ENV] = str(uid)
            run_env[SUPERVISOR_PIDNS_ENV] = "1"  # it may kill(-1): only ever inside a PID namespace
        for key, value in run_env.items():
            cmd += ["--setenv", key, value]
        cmd += ["--"]
        if not trusted_supervisor:
            if self.privileged:
                cmd += ["setpriv", f"--reuid={uid}", f"--regid={uid}", "--clear-groups",
                        "--inh-caps=-all", "--no-new-privs", "--"]
            cmd += ["prlimit", *limits.rlimit_args(), "--"]
        return cmd + list(argv)

    def spawn(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
              limits: SandboxLimits | None = None) -> "SandboxProcess":
        """Start argv in a fresh sandbox (same isolation as `run`) and return at once: a long-lived program the
        caller talks to over its pipes (the python tool's interpreter). The caller enforces time and output
        limits (limits.wall_s and the output caps are not applied here; rlimits and the tmpfs are) and must
        `kill()` it; it dies with the thread that spawned it too (bwrap --die-with-parent: a prctl death
        signal), so it cannot outlive this process."""
        limits = limits or self.limits
        pipes = dict(stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                     start_new_session=True, close_fds=True)
        if self.mechanism == "unsafe":
            work = tempfile.mkdtemp(prefix="posttrain-unsafe-")
            run_env = self._env(env, work)
            run_env["POSTTRAIN_SANDBOX_WORK_DIR"] = work
            popen = subprocess.Popen(["prlimit", *limits.rlimit_args(), "--", *argv], cwd=work, env=run_env,
                                     **pipes)
            return SandboxProcess(popen, "unsafe", lambda: shutil.rmtree(work, ignore_errors=True))
        slot = _UidSlot() if self.privileged else None
        seccomp_fd = None
        try:
            seccomp_fd = _seccomp_memfd(False)
            cmd = self._command(argv, {}, env, limits, False, slot.uid if slot else os.getuid(), seccomp_fd)
            popen = subprocess.Popen(cmd, pass_fds=(seccomp_fd,) if seccomp_fd is not None else (), env={},
                                     **pipes)
        except BaseException:
            if slot:
                slot.release()
            raise
        finally:
            if seccomp_fd is not None:
                os.close(seccomp_fd)   # bwrap holds its own copy
        return SandboxProcess(popen, "bwrap", slot.release if slot else (lambda: None))

    def _run_unsafe(self, argv, stdin, files, env, limits, trusted_supervisor, on_stdout) -> SandboxResult:
        work = tempfile.mkdtemp(prefix="posttrain-unsafe-")
        try:
            for name, content in files.items():
                with open(os.path.join(work, name), "wb") as fh:
                    fh.write(content)
            cmd = list(argv) if trusted_supervisor else ["prlimit", *limits.rlimit_args(), "--", *argv]
            run_env = self._env(env, work)
            run_env["POSTTRAIN_SANDBOX_WORK_DIR"] = work
            return _communicate(cmd, stdin, limits, on_stdout, cwd=work, env=run_env, mechanism="unsafe")
        finally:
            shutil.rmtree(work, ignore_errors=True)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def _communicate(cmd: list[str], stdin: bytes, limits: SandboxLimits,
                 on_stdout: Callable[[bytes], bool] | None, *, pass_fds=(), cwd=None, env=None,
                 mechanism: str) -> SandboxResult:
    """Start cmd in its own session, feed stdin, collect capped output, enforce the wall clock."""
    start = time.monotonic()
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            pass_fds=pass_fds, cwd=cwd, env=env if env is not None else {},
                            start_new_session=True, close_fds=True)
    deadline = start + limits.wall_s
    proc_stdout_fd, proc_stderr_fd = proc.stdout.fileno(), proc.stderr.fileno()
    caps = {proc_stdout_fd: limits.stdout_bytes, proc_stderr_fd: limits.stderr_bytes}
    chunks: dict[int, list[bytes]] = {fd: [] for fd in caps}
    sizes = {fd: 0 for fd in caps}
    timed_out = output_limited = stopped = False
    sel = selectors.DefaultSelector()
    for pipe in (proc.stdout, proc.stderr):
        os.set_blocking(pipe.fileno(), False)
        sel.register(pipe.fileno(), selectors.EVENT_READ)
    pending = memoryview(stdin)
    stdin_fd = proc.stdin.fileno()
    if pending:
        os.set_blocking(proc.stdin.fileno(), False)
        sel.register(proc.stdin.fileno(), selectors.EVENT_WRITE)
    else:
        proc.stdin.close()
    open_reads = 2
    try:
        while open_reads:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                timed_out = True
                break
            for key, _ in sel.select(timeout=min(remaining, 0.5)):
                fd = key.fd
                if fd == stdin_fd:
                    try:
                        pending = pending[os.write(fd, pending[:1 << 16]):]
                    except (BrokenPipeError, OSError):
                        pending = pending[:0]
                    if not pending:
                        sel.unregister(fd)
                        proc.stdin.close()
                    continue
                try:
                    data = os.read(fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not data:
                    sel.unregister(fd)
                    open_reads -= 1
                    continue
                sizes[fd] += len(data)
                if sizes[fd] > caps[fd]:
                    keep = caps[fd] - (sizes[fd] - len(data))
                    chunks[fd].append(data[:max(keep, 0)])
                    output_limited = True
                    break
                chunks[fd].append(data)
                if on_stdout is not None and fd == proc_stdout_fd:
                    if not on_stdout(data):
                        stopped = True
                        break
            if output_limited or stopped:
                break
    finally:
        if timed_out or output_limited or stopped:
            _kill_group(proc)
        try:
            proc.wait(timeout=max(0.1, deadline - time.monotonic()) + 1.0)
        except subprocess.TimeoutExpired:
            timed_out = True
            _kill_group(proc)
            proc.wait()
        sel.close()
        for pipe in (proc.stdin, proc.stdout, proc.stderr):
            if not pipe.closed:
                pipe.close()
    exit_code, killed_by = _exit_status(proc.returncode, mechanism)
    return SandboxResult(
        exit_code=exit_code, signal=killed_by,
        stdout=b"".join(chunks[proc_stdout_fd]), stderr=b"".join(chunks[proc_stderr_fd]),
        wall_s=time.monotonic() - start, timed_out=timed_out, output_limited=output_limited,
        stopped=stopped, mechanism=mechanism)


def _exit_status(code: int, mechanism: str) -> tuple[int | None, int | None]:
    """(exit code, signal) of a finished sandboxed program; exactly one is None."""
    if mechanism == "bwrap" and code > 128:
        code = 128 - code  # bwrap reports a program killed by signal N as exit status 128 + N
    return (code, None) if code >= 0 else (None, -code)


def _seccomp_memfd(trusted_supervisor: bool) -> int | None:
    """A memfd holding the seccomp filter for bwrap's --seccomp (None where there is no filter for this arch)."""
    program = _seccomp.filter_program(protect_supervisor=trusted_supervisor)
    if program is None:
        return None
    fd = os.memfd_create("sandbox-seccomp")
    _write_all(fd, program)
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


class SandboxProcess:
    """A long-lived program started by `Sandbox.spawn`: `popen` (its stdin, stdout, stderr pipes) and its end.
    `kill()` ends everything in its sandbox, waits for it and frees its uid slot; idempotent, thread-safe."""

    def __init__(self, popen: subprocess.Popen, mechanism: str, release: Callable[[], None]):
        self.popen, self.mechanism = popen, mechanism
        self._release = release
        self._lock = threading.Lock()
        self.killed = False

    def status(self, wait_s: float = 0.0) -> tuple[int | None, int | None] | None:
        """(exit code, signal) once it has ended (waiting up to wait_s), else None."""
        try:
            code = self.popen.wait(timeout=wait_s) if wait_s > 0 else self.popen.poll()
        except subprocess.TimeoutExpired:
            return None
        return None if code is None else _exit_status(code, self.mechanism)

    def kill(self, close_pipes: bool = True) -> None:
        """close_pipes=False from a thread other than the one reading them: closing an fd that another thread
        waits on in select/epoll would hide the end of file it should see."""
        with self._lock:
            if not self.killed:
                self.killed = True
                _kill_group(self.popen)
                self.popen.wait()
                self._release()
            if close_pipes:
                for pipe in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
                    try:
                        pipe.close()
                    except OSError:
                        pass


def _kill_group(proc: subprocess.Popen) -> None:
    # bwrap leads its own process group (start_new_session); when it dies, --die-with-parent kills the
    # namespace's init and with it every process in the sandbox.
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


_probe_lock = threading.Lock()


@functools.lru_cache(maxsize=None)
def _probe_cached(extra_ro_binds: tuple[str, ...]) -> str | None:
    if shutil.which("bwrap") is None:
        return "bubblewrap (`bwrap`) is not installed"
    for tool in ("prlimit", "setpriv") if _is_root() else ("prlimit",):
        if shutil.which(tool) is None:
            return f"`{tool}` (util-linux) is not installed"
    sandbox = Sandbox.__new__(Sandbox)
    sandbox.limits = SandboxLimits(wall_s=20.0)
    sandbox.extra_ro_binds = extra_ro_binds
    sandbox.mechanism = "bwrap"
    sandbox.privileged = _is_root()
    try:
        result = sandbox.run([sys.executable, "-I", "-S", "-c", "import os; print(os.getuid())"])
    except OSError as err:
        return f"starting bwrap failed: {err}"
    if result.exit_code != 0 or not result.stdout.strip().isdigit():
        return ("bwrap could not start a sandbox (are user namespaces disabled?): "
                + result.stderr.decode(errors="replace").strip()[-300:])
    if sandbox.privileged and int(result.stdout) == 0:
        return "the sandboxed program still ran as root"
    return None


def probe_bwrap(extra_ro_binds: tuple[str, ...] = ()) -> str | None:
    """None when bwrap sandboxes work on this machine, else the reason they do not (cached per process)."""
    with _probe_lock:
        return _probe_cached(tuple(extra_ro_binds))


@functools.lru_cache(maxsize=None)
def default_sandbox(allow_unsafe: bool = False) -> Sandbox:
    """A process-wide Sandbox with default limits (created on first use)."""
    return Sandbox(allow_unsafe=allow_unsafe)
