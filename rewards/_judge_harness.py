"""The code judge's trusted harness: runs INSIDE the sandbox, one per problem (stdlib only).

rewards/code.py starts it as `python -I -S -c <this file's text>` in a bubblewrap sandbox with the
payload (program, test inputs, limits; never expected outputs) on stdin. It keeps CAP_SETUID/SETGID/
KILL, is non-dumpable and, as root, runs as another uid than the tests, so test processes can neither
signal it nor open its descriptors; the sandbox's seccomp filter also forbids signalling it (pid 2).

For each test it forks a child that drops to the sandbox's unprivileged uid, sets its limits and runs
the program with the test's input. The child gets four descriptors:
  0 stdin (a memfd with the input), 1 stdout, 2 stderr,
  3 the SETUP channel: written only before any program code runs (compile errors, harness errors)
    and closed before the program starts (close-on-exec for compiled programs), so nothing the
    program does can write to it;
  4 the ANSWER channel (Python only): the returned value of a function test, or how the program
    ended. The program can write here, so the host trusts it no more than stdout: it may only carry
    what the program itself could have caused (a value, an exception, an exit).
The verdict channel is this process's stdout, which no test process can reach. On it, per test, one
frame: a JSON header line (a few hundred bytes, every field bounded here), then `stdout_len` raw bytes
of the test's stdout, then `answer_len` raw bytes of its answer channel; both are capped at the
output limit, and the host rejects any frame over its bounds.

CPU time counts the whole test, not one process: the harness is a child subreaper, so orphaned
descendants are reparented to it and reaped here (RUSAGE_CHILDREN then includes them), and every
50 ms it adds up the CPU time of every live process of the sandbox from /proc (which also sees
children that a program reaps by ignoring SIGCHLD, whose time the kernel never reports). A test
whose total passes the limit is killed and reported as cpu_limit.

Between tests every process is killed and reaped, and every file the test left in the writable
places (/sandbox, /tmp, /dev/shm, /dev) is removed, so each test starts from the same clean state.
A C++ program is compiled once (source on the compiler's stdin); its binary is kept in a sealed memfd
of the harness and each test executes that, so no test can replace it for the next one.
"""
import builtins, fcntl, io, json, os, resource, select, shutil, signal, sys, time, traceback, types

PR_SET_DUMPABLE, PR_SET_CHILD_SUBREAPER, PR_SET_NO_NEW_PRIVS = 4, 36, 38
PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 47, 4
SYS_CAPSET, LINUX_CAPABILITY_VERSION_3 = 126, 0x20080522
SETUP_FD, ANSWER_FD, BINARY_FD = 3, 4, 5
SETUP_CAP = 4096               # bytes of the setup channel (written by harness code only)
STDERR_KEEP = 4096             # bytes of stderr kept (the host sees the last 1000)
TICK_S = 0.05                  # how often the CPU time of the whole test is added up
CLK_TCK = os.sysconf("SC_CLK_TCK")

try:
    import ctypes
    _libc = ctypes.CDLL(None, use_errno=True)
    _prctl = _libc.prctl
except Exception:
    _libc = _prctl = None


def write_all(fd, data):
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]


def emit(header, stdout=b"", answer=b""):
    header["stdout_len"], header["answer_len"] = len(stdout), len(answer)
    write_all(1, json.dumps(header).encode() + b"\n" + stdout + answer)


def clear_inheritable_caps():
    """Ambient and inheritable capabilities survive a uid change; the test must have none."""
    if _libc is None:
        return
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, 0, 0, 0)
    header = (ctypes.c_uint32 * 2)(LINUX_CAPABILITY_VERSION_3, 0)
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable (x2 words): all zero
    _libc.syscall(SYS_CAPSET, header, data)


def main():
    cfg = json.loads(sys.stdin.buffer.read())
    if _prctl is not None:
        _prctl(PR_SET_DUMPABLE, 0, 0, 0, 0)
    uid = int(os.environ.get("POSTTRAIN_SANDBOX_UID", "-1"))
    can_drop = os.getuid() == 0 and uid > 0
    # Killing every other process is only safe as pid 2 of a PID namespace (bwrap is pid 1).
    in_pidns = os.environ.get("POSTTRAIN_SANDBOX_PIDNS") == "1" and os.getpid() == 2
    if in_pidns and _prctl is not None:
        _prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)
    work = os.environ.get("POSTTRAIN_SANDBOX_WORK_DIR", "/sandbox")
    lang = cfg["language"]
    # Where a test could leave files; the names there now are the sandbox's own and stay.
    scratch = {root: set(os.listdir(root)) for root in
               ([work, "/tmp", "/dev/shm", "/dev"] if in_pidns else [work]) if os.path.isdir(root)}

    def limits(cpu_s, mem_mb, fsize_mb, nproc):
        cpu = int(cpu_s) + 1
        for res, val in ((resource.RLIMIT_CPU, (cpu, cpu + 1)),
                         (resource.RLIMIT_AS, (mem_mb << 20,) * 2),
                         (resource.RLIMIT_FSIZE, (fsize_mb << 20,) * 2),
                         (resource.RLIMIT_NPROC, (nproc, nproc)),
                         (resource.RLIMIT_NOFILE, (256, 256)),
                         (resource.RLIMIT_CORE, (0, 0))):
            resource.setrlimit(res, val)
        try:
            hard = resource.getrlimit(resource.RLIMIT_STACK)[1]
            want = min(256 << 20, mem_mb << 20)
            resource.setrlimit(resource.RLIMIT_STACK, (want if hard == resource.RLIM_INFINITY else min(want, hard), hard))
        except (ValueError, OSError):
            pass

    def drop_privileges():
        if _prctl is not None:
            _prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)
        if can_drop:
            os.setgroups([])
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
        clear_inheritable_caps()

    def sandbox_processes():
        """(pid, cpu ticks, start time) of every process of the sandbox but bwrap and this harness."""
        me, out = os.getpid(), []
        for entry in os.listdir("/proc"):
            if not entry.isdigit() or int(entry) in (1, me):
                continue
            try:
                with open(f"/proc/{entry}/stat", "rb") as fh:
                    fields = fh.read().rsplit(b")", 1)[1].split()
            except (OSError, IndexError):
                continue  # exited meanwhile
            out.append((int(entry), int(fields[11]) + int(fields[12]), int(fields[19])))
        return out

    def children_cpu():
        usage = resource.getrusage(resource.RUSAGE_CHILDREN)
        return usage.ru_utime + usage.ru_stime

    def end_test(pid, statuses):
        """Kill and reap every process of the test; `statuses` collects what wait4 said per pid."""
        if not in_pidns:  # local unsafe mode: only our own process group is ours to kill
            try:
                os.killpg(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            if pid not in statuses:
                _, status, _ = os.wait4(pid, 0)
                statuses[pid] = status
            return
        while True:
            for other, _, _ in sandbox_processes():
                try:
                    os.kill(other, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            try:
                reaped, status, _ = os.wait4(-1, 0)
            except ChildProcessError:
                return  # no descendant left (orphans come back to us: we are the subreaper)
            statuses[reaped] = status

    def reap_finished(statuses):
        while True:
            try:
                reaped, status, _ = os.wait4(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if reaped == 0:
                return
            statuses[reaped] = status

    def run_child(target, stdin_bytes, cpu_s, wall_s, mem_mb, out_cap, binary_fd=None):
        in_fd = os.memfd_create("stdin")
        write_all(in_fd, stdin_bytes)
        os.lseek(in_fd, 0, 0)
        out_r, out_w = os.pipe()
        err_r, err_w = os.pipe()
        setup_r, setup_w = os.pipe()
        answer_r, answer_w = os.pipe()
        cpu_before = children_cpu()
        start = time.monotonic()
        pid = os.fork()
        if pid == 0:
            code = 121
            try:
                os.setsid()
                for fd, target_fd in ((in_fd, 0), (out_w, 1), (err_w, 2), (setup_w, SETUP_FD), (answer_w, ANSWER_FD)):
                    os.dup2(fd, target_fd)
                if binary_fd is not None:
                    os.dup2(binary_fd, BINARY_FD, inheritable=False)  # fexecve'd; closed by the exec
                os.closerange(BINARY_FD + 1 if binary_fd is not None else ANSWER_FD + 1, 1 << 16)
                os.set_inheritable(SETUP_FD, False)  # an exec'd program never holds the setup channel
                limits(cpu_s, mem_mb, cfg["file_size_mb"], cfg["nproc"])
                drop_privileges()
                code = target()
            except BaseException as err:
                try:
                    os.write(SETUP_FD, json.dumps({"kind": "harness_error", "detail": repr(err)[:300]}).encode())
                except BaseException:
                    pass
            os._exit(code)
        for fd in (in_fd, out_w, err_w, setup_w, answer_w):
            os.close(fd)
        pidfd = os.pidfd_open(pid)
        poller = select.poll()
        caps = {out_r: out_cap, err_r: out_cap, setup_r: SETUP_CAP, answer_r: out_cap}
        bufs = {fd: [] for fd in caps}
        sizes = dict.fromkeys(caps, 0)
        for fd in caps:
            poller.register(fd, select.POLLIN)
        poller.register(pidfd, select.POLLIN)
        open_fds, statuses, seen_cpu = set(caps), {}, {}
        status, exited = "ok", False
        deadline, next_tick = start + wall_s, start + TICK_S
        while open_fds or not exited:
            now = time.monotonic()
            if now >= deadline:
                status = "timeout"
                break
            if in_pidns and now >= next_tick:
                next_tick = now + TICK_S
                reap_finished(statuses)
                live = sandbox_processes()
                for other, ticks, started in live:
                    seen_cpu[(other, started)] = ticks / CLK_TCK
                running = sum(ticks for _, ticks, _ in live) / CLK_TCK
                if children_cpu() - cpu_before + running > cpu_s:
                    status = "cpu_limit"
                    break
            timeout = min(deadline, next_tick if in_pidns else deadline) - now
            for fd, _ev in poller.poll(max(timeout, 0.0) * 1000):
                if fd == pidfd:
                    exited = True
                    poller.unregister(pidfd)
                    end_test(pid, statuses)  # background children would hold the pipes open
                    continue
                data = os.read(fd, 1 << 16)
                if not data:
                    poller.unregister(fd)
                    open_fds.discard(fd)
                    continue
                sizes[fd] += len(data)
                if sizes[fd] > caps[fd]:
                    status = "output_limit"
                    break
                if fd != err_r or sizes[fd] <= STDERR_KEEP:
                    bufs[fd].append(data)
            if status != "ok":
                break
        wall = time.monotonic() - start
        end_test(pid, statuses)
        for fd in (out_r, err_r, setup_r, answer_r, pidfd):
            os.close(fd)
        # Whole-test CPU: everything reaped into this process, or seen alive, whichever is larger.
        cpu = max(children_cpu() - cpu_before, sum(seen_cpu.values()))
        wstatus = statuses.get(pid, 0)
        setup = None
        raw_setup = b"".join(bufs[setup_r])
        if raw_setup:
            try:
                setup = json.loads(raw_setup)
            except (ValueError, RecursionError):
                setup = {"kind": "harness_error", "detail": "garbled setup report"}
        rec = {"status": status, "cpu_s": cpu, "wall_s": wall, "setup": setup,
               "stderr": b"".join(bufs[err_r])[-1000:].decode("utf-8", "replace"),
               "exit_code": os.WEXITSTATUS(wstatus) if os.WIFEXITED(wstatus) else None,
               "signal": os.WTERMSIG(wstatus) if os.WIFSIGNALED(wstatus) else None}
        return rec, b"".join(bufs[out_r]), b"".join(bufs[answer_r])

    def clean_scratch():
        """Remove whatever the test left in the writable places (as the test's uid: its files are its)."""
        leftovers = [os.path.join(root, name) for root, keep in scratch.items()
                     for name in os.listdir(root) if name not in keep]
        if not leftovers:
            return
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                drop_privileges()
                for path in leftovers:
                    if os.path.isdir(path) and not os.path.islink(path):
                        # any depth, any permissions the test set on its own directories
                        for argv in (["chmod", "-R", "u+rwX", "--", path], ["rm", "-rf", "--", path]):
                            child = os.fork()
                            if child == 0:
                                os.execv(shutil.which(argv[0], path="/usr/bin:/bin"), argv)
                            os.waitpid(child, 0)
                    else:
                        os.unlink(path)
                code = 0
            except BaseException:
                pass
            os._exit(code)
        os.waitpid(pid, 0)
        still = [os.path.join(root, name) for root, keep in scratch.items()
                 for name in os.listdir(root) if name not in keep]
        if still:
            raise RuntimeError(f"could not remove what a test left behind: {still[:3]}")

    def report(obj):
        write_all(ANSWER_FD, json.dumps(obj).encode())

    def python_target(test_input):
        def target():
            try:
                code = compile(cfg["source"], "solution.py", "exec")
            except (SyntaxError, ValueError, MemoryError, RecursionError, OverflowError) as err:
                write_all(SETUP_FD, json.dumps({"kind": "compile_error",
                                                "detail": f"{type(err).__name__}: {err}"[:300]}).encode())
                return 1
            os.close(SETUP_FD)  # from here on program code runs: it must not reach the setup channel
            sys.stdin = io.TextIOWrapper(io.BufferedReader(io.FileIO(0, "r", closefd=False)), encoding="utf-8", errors="replace")
            sys.stdout = io.TextIOWrapper(io.BufferedWriter(io.FileIO(1, "w", closefd=False)), encoding="utf-8", errors="replace")
            sys.stderr = io.TextIOWrapper(io.BufferedWriter(io.FileIO(2, "w", closefd=False)), encoding="utf-8", errors="backslashreplace", line_buffering=True)
            sys.__stdin__, sys.__stdout__, sys.__stderr__ = sys.stdin, sys.stdout, sys.stderr
            sys.argv = ["solution.py"]
            sys.setrecursionlimit(100000)
            module = types.ModuleType("__main__" if cfg["mode"] == "stdin" else "solution")
            module.__builtins__ = builtins
            sys.modules[module.__name__] = module
            exit_code = 0
            try:
                exec(code, module.__dict__)
                if cfg["mode"] == "call":
                    name = cfg["fn_name"]
                    fn = module.__dict__.get(name)
                    if not callable(fn) and isinstance(module.__dict__.get("Solution"), type):
                        fn = getattr(module.__dict__["Solution"](), name, None)
                    if not callable(fn):
                        report({"kind": "no_function", "detail": f"no function or Solution method named {name!r}"})
                        return 1
                    value = fn(*json.loads(test_input))
                    try:
                        text = json.dumps(value, allow_nan=False)
                    except (TypeError, ValueError, RecursionError):
                        report({"kind": "bad_return", "detail": type(value).__name__})
                        return 1
                    report({"kind": "returned", "value": text})
            except SystemExit as err:
                c = err.code
                exit_code = 0 if c is None else c if isinstance(c, int) else 1
                if not isinstance(c, (int, type(None))):
                    print(c, file=sys.stderr)
                if cfg["mode"] == "call":
                    report({"kind": "exited", "code": exit_code})
            except MemoryError:
                report({"kind": "memory_limit"})
                exit_code = 1
            except BaseException as err:
                traceback.print_exc()
                report({"kind": "runtime_error", "detail": f"{type(err).__name__}: {err}"[:300]})
                exit_code = 1
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            except BaseException:
                return exit_code or 1
            return exit_code & 0xFF
        return target

    def exec_target(argv):
        def target():
            os.close(ANSWER_FD)  # compiled programs answer on stdout only
            for sig in (signal.SIGPIPE, signal.SIGXFSZ, signal.SIGXCPU):
                signal.signal(sig, signal.SIG_DFL)  # Python ignores some; compiled programs must not
            if argv[0] == BINARY_FD:  # the sealed binary: execveat(fd, "", AT_EMPTY_PATH)
                os.execve(BINARY_FD, ["solution", *argv[1:]], os.environ)
            os.execv(argv[0], argv)
        return target

    tl = float(cfg["time_limit_s"])
    if lang == "cpp":
        # The source goes in on stdin; the binary is then kept in a sealed memfd of the harness, which
        # every test executes and none can change or delete (not even one sharing the harness's uid).
        built = os.path.join(work, "solution")
        rec, _, _ = run_child(exec_target(["/usr/bin/g++", "-O2", "-std=gnu++17", "-pipe", "-x", "c++",
                                           "-o", built, "-"]),
                              cfg["source"].encode("utf-8", "surrogateescape"), cfg["compile_wall_s"],
                              cfg["compile_wall_s"], 2048, 1 << 20)
        ok = rec["status"] == "ok" and rec["exit_code"] == 0 and os.path.exists(built)
        if ok:
            binary_fd = os.memfd_create("solution", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
            with open(built, "rb") as fh:
                write_all(binary_fd, fh.read())
            fcntl.fcntl(binary_fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK
                        | fcntl.F_SEAL_GROW | fcntl.F_SEAL_WRITE)
            # far above 0..5, which each test's child fills with dup2 before it copies this one
            high = fcntl.fcntl(binary_fd, fcntl.F_DUPFD_CLOEXEC, 64)
            os.close(binary_fd)
            binary_fd = high
        clean_scratch()  # the compiler's output goes too: tests start from an empty work dir
        emit({"event": "compile", "status": "ok" if ok else "error",
              "stderr": rec["stderr"][-1000:] or str(rec["status"])})
        if not ok:
            emit({"event": "done"})
            return
    for i, test_input in cfg["tests"]:
        binary = None
        if lang == "cpp":
            target, stdin, binary = exec_target([BINARY_FD]), test_input.encode(), binary_fd
        elif cfg["mode"] == "stdin":
            target, stdin = python_target(None), test_input.encode("utf-8", "surrogateescape")
        else:
            target, stdin = python_target(test_input), b""
        rec, out, answer = run_child(target, stdin, tl, cfg["wall_s"], cfg["memory_mb"], cfg["output_bytes"],
                                     binary)
        clean_scratch()  # before the verdict leaves: the next test starts from the same clean state
        rec["i"] = i
        emit(rec, out, answer)
        try:
            answer_kind = json.loads(answer).get("kind") if answer else None
        except (ValueError, RecursionError, AttributeError):
            answer_kind = "garbled"
        bad = (rec["status"] != "ok" or rec["signal"] is not None or rec["setup"] is not None or rec["cpu_s"] > tl
               or answer_kind not in (None, "returned")
               or (cfg["mode"] == "stdin" and rec["exit_code"] != 0))
        if bad and (cfg["fail_fast"] or (rec["setup"] or {}).get("kind") == "compile_error"):
            break
    emit({"event": "done"})


main()
