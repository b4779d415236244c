"""rewards.sandbox: isolation really holds (network, filesystem, processes, limits), and refusal is clear.

Every hostile program here runs under small limits so that a containment bug cannot hurt the shared
machine: process caps of 8-16, a few seconds of wall clock, a few MB of output.
"""
from __future__ import annotations

import http.server
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
import uuid

import pytest

from rewards import sandbox as sandbox_mod
from rewards.sandbox import Sandbox, SandboxLimits, SandboxUnavailable
from tests.helpers import surviving

PY = [sys.executable, "-I", "-S", "-c"]


def wait_no_survivors(marker: str, within_s: float = 2.0) -> list[int]:
    deadline = time.monotonic() + within_s
    while (left := surviving(marker)) and time.monotonic() < deadline:
        time.sleep(0.05)
    return left


@pytest.fixture(scope="module")
def sandbox() -> Sandbox:
    return Sandbox(SandboxLimits(wall_s=10, nproc=16, memory_mb=256, stdout_bytes=1 << 16))


# ------------------------------------------------------------------ unit

@pytest.mark.unit
def test_limits_reject_nonpositive_values():
    with pytest.raises(ValueError, match="nproc"):
        SandboxLimits(nproc=0)
    with pytest.raises(ValueError, match="wall_s"):
        SandboxLimits(wall_s=-1)


@pytest.mark.unit
def test_rlimit_args_round_cpu_up():
    args = SandboxLimits(cpu_s=1.2, memory_mb=100, nproc=7, file_size_mb=2).rlimit_args()
    assert "--cpu=2:3" in args and f"--as={100 << 20}:{100 << 20}" in args and "--nproc=7:7" in args
    assert f"--fsize={2 << 20}:{2 << 20}" in args


@pytest.mark.unit
def test_refuses_without_mechanism_unless_unsafe_opt_in(monkeypatch):
    monkeypatch.setattr(sandbox_mod, "probe_bwrap", lambda binds=(): "bubblewrap (`bwrap`) is not installed")
    with pytest.raises(SandboxUnavailable) as err:
        Sandbox()
    message = str(err.value)
    assert "apt-get install bubblewrap" in message and "allow_unsafe=True" in message
    unsafe = Sandbox(allow_unsafe=True)
    assert unsafe.mechanism == "unsafe"
    result = unsafe.run(PY + ["print(6 * 7)"])
    assert result.ok and result.stdout == b"42\n" and result.mechanism == "unsafe"


@pytest.mark.unit
def test_file_names_must_be_plain(sandbox):
    with pytest.raises(ValueError, match="plain file name"):
        sandbox.run(["true"], files={"../escape": b"x"})


# ------------------------------------------------------------------ isolation

@pytest.mark.integration
def test_runs_unprivileged_in_private_work_dir_with_files(sandbox):
    code = ("import os; st = open('/proc/self/status').read();"
            "print(os.getuid(), os.getcwd(), open('in.txt').read(),"
            " st.split('CapEff:')[1].split()[0], st.split('NoNewPrivs:')[1].split()[0])")
    result = sandbox.run(PY + [code], files={"in.txt": b"hello"})
    uid, cwd, content, cap_eff, no_new_privs = result.stdout.split()
    assert result.ok, result.stderr
    assert int(uid) != 0 and cwd == b"/sandbox" and content == b"hello"
    assert int(cap_eff, 16) == 0 and no_new_privs == b"1"


@pytest.mark.integration
def test_stdin_is_fed_and_large_output_streams(sandbox):
    data = os.urandom(1 << 15)
    result = sandbox.run(["cat"], stdin=data)
    assert result.ok and result.stdout == data


@pytest.mark.integration
def test_no_network_not_even_host_loopback(sandbox):
    hits = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self):  # noqa: N802 - http.server API
            hits.append(self.path)
            self.send_response(200)
            self.end_headers()

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    port = server.server_address[1]
    try:
        code = ("import socket\n"
                f"for host in [('127.0.0.1', {port}), ('1.1.1.1', 80), ('8.8.8.8', 53)]:\n"
                "    try:\n"
                "        socket.create_connection(host, timeout=1).close(); print('CONNECTED', host)\n"
                "    except OSError as err: print('blocked', err.errno)\n")
        result = sandbox.run(PY + [code])
        # the host server is reachable from here, so the sandbox must really be cut off
        with socket.create_connection(("127.0.0.1", port), timeout=2) as conn:
            conn.sendall(b"GET /from-host HTTP/1.0\r\n\r\n")
            conn.recv(100)
    finally:
        server.shutdown()
        server.server_close()
    assert result.ok, result.stderr
    assert b"CONNECTED" not in result.stdout and result.stdout.count(b"blocked") == 3
    assert hits == ["/from-host"]


@pytest.mark.integration
def test_filesystem_read_only_outside_private_tmpfs(sandbox, tmp_path):
    host_target = tmp_path / "written_by_sandbox"
    marker = f"posttrain-sbx-{uuid.uuid4().hex}"
    code = (
        "import os\n"
        f"targets = ['/etc/{marker}', '/usr/{marker}', {str(host_target)!r}, '{os.path.abspath(__file__)}',"
        f" '{sys.prefix}/{marker}']\n"
        "for path in targets:\n"
        "    try:\n"
        "        open(path, 'a').write('x'); print('WROTE', path)\n"
        "    except OSError as err: print('denied', err.errno)\n"
        f"open('/tmp/{marker}', 'w').write('private'); open('/sandbox/{marker}', 'w').write('private')\n"
        "print(sorted(os.listdir('/root')), os.path.exists('/work/main/rewards'))\n")
    result = sandbox.run(PY + [code])
    assert result.ok, result.stderr
    out = result.stdout.decode()
    assert "WROTE" not in out and out.count("denied") == 5
    assert "['.pyenv']" in out or "[]" in out  # the host's home is not there, only the Python prefix
    assert "False" in out  # the repository is invisible
    assert not host_target.exists()
    assert not os.path.exists(f"/tmp/{marker}") and not os.path.exists(f"/etc/{marker}")


@pytest.mark.integration
def test_tmpfs_and_file_size_are_capped(sandbox):
    code = ("import os\n"
            "try:\n    open('big', 'wb').write(b'x' * (3 << 20)); print('big ok')\n"
            "except OSError as err: print('big', err.errno)\n"
            "n = 0\n"
            "try:\n"
            "    while n < 100:\n"
            "        open(f'f{n}', 'wb').write(b'x' * (1 << 20)); n += 1\n"
            "except OSError as err: print('full', err.errno, n)\n")
    result = sandbox.run(PY + [code], limits=SandboxLimits(file_size_mb=2, tmpfs_mb=8))
    out = result.stdout.decode().split()
    assert out[:2] == ["big", "27"]            # EFBIG: RLIMIT_FSIZE
    assert out[2:4] == ["full", "28"] and int(out[4]) <= 8  # ENOSPC: the tmpfs is 8 MB


# ------------------------------------------------------------------ kernel attack surface

ESCAPES = (
    # What was seen before the seccomp filter: unshare(CLONE_NEWUSER | CLONE_NEWNS) worked, the new user
    # namespace held every capability, a tmpfs of any size could be mounted, a netfilter socket opened.
    "import ctypes, errno, os, socket\n"
    "libc = ctypes.CDLL(None, use_errno=True)\n"
    "def call(name, *args):\n"
    "    ok = getattr(libc, name)(*args) >= 0\n"
    "    return 'OK' if ok else errno.errorcode[ctypes.get_errno()]\n"
    "print('unshare_userns', call('unshare', 0x10000000 | 0x00020000))\n"
    "print('unshare_netns', call('unshare', 0x40000000))\n"
    "print('mount', call('mount', b'none', b'/tmp', b'tmpfs', 0, b'size=1g'))\n"
    "print('setns', call('setns', os.open('/proc/self/ns/net', os.O_RDONLY), 0))\n"
    "print('clone3', call('syscall', 435, None, 0))\n"
    "print('keyctl', call('syscall', 250, 0, 0, 0, 0, 0))\n"
    "print('bpf', call('syscall', 321, 0, None, 0))\n"
    "print('ptrace', call('syscall', 101, 16, 1, 0, 0))\n"
    "print('io_uring', call('syscall', 425, 1, None))\n"
    "for family, kind, proto in ((16, socket.SOCK_RAW, 12), (17, socket.SOCK_RAW, 0), (38, socket.SOCK_SEQPACKET, 0)):\n"
    "    try:\n"
    "        socket.socket(family, kind, proto).close(); print('socket', family, 'OK')\n"
    "    except OSError as err:\n"
    "        print('socket', family, errno.errorcode[err.errno])\n"
    "socket.socket(socket.AF_UNIX).close(); socket.socket(socket.AF_INET6).close()\n"
    "print('pid_ok', os.fork() if False else 'fork-allowed')\n"
    "status = dict(l.split(':', 1) for l in open('/proc/self/status').read().splitlines())\n"
    "print('seccomp', status['Seccomp'].strip(), 'inh', status['CapInh'].strip(), 'amb', status['CapAmb'].strip())\n")


def check_escapes_blocked(out: str) -> None:
    lines = dict(line.split(" ", 1) for line in out.strip().splitlines())
    assert lines["unshare_userns"] == "EPERM" and lines["unshare_netns"] == "EPERM", out
    assert lines["mount"] == "EPERM" and lines["setns"] == "EPERM", out
    assert lines["clone3"] == "ENOSYS", out  # so that libc falls back to clone, whose flags are checked
    assert all(lines[name] == "EPERM" for name in ("keyctl", "bpf", "ptrace", "io_uring")), out
    assert out.count("EAFNOSUPPORT") == 3 and "socket 16 OK" not in out, out
    assert lines["seccomp"] == "2 inh 0000000000000000 amb 0000000000000000", out


@pytest.mark.integration
def test_no_namespaces_mounts_or_dangerous_syscalls(sandbox):
    result = sandbox.run(PY + [ESCAPES])
    assert result.ok, result.stderr
    check_escapes_blocked(result.stdout.decode())


@pytest.mark.integration
def test_seccomp_also_binds_the_trusted_supervisor(sandbox):
    # The judge's harness keeps CAP_SETUID/SETGID/KILL, never the right to make namespaces or mount.
    result = sandbox.run(PY + [ESCAPES.replace("'inh', status['CapInh'].strip(), 'amb', status['CapAmb'].strip()",
                                               "'inh 0000000000000000 amb 0000000000000000'")],
                         trusted_supervisor=True)
    assert result.ok, result.stderr
    check_escapes_blocked(result.stdout.decode())


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0 or not os.path.exists("/usr/bin/python3") or shutil.which("setpriv") is None,
                    reason="runs the unprivileged path as 'nobody' with the system Python; needs root to switch")
def test_unprivileged_path_blocks_nested_user_namespaces():
    # As a normal user bwrap makes a user namespace; --disable-userns and the filter forbid another.
    repo = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    script = ("import sys\n"
              f"sys.path.insert(0, {repo!r})\n"
              "from rewards.sandbox import Sandbox\n"
              "box = Sandbox()\n"
              f"result = box.run([sys.executable, '-I', '-S', '-c', {ESCAPES!r}])\n"
              "sys.stdout.write(result.stdout.decode() + result.stderr.decode())\n")
    proc = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "--inh-caps=-all",
                           "/usr/bin/python3", "-I", "-c", script], capture_output=True, text=True, timeout=60,
                          cwd="/", env={"PATH": "/usr/bin:/bin", "HOME": "/"})
    if "cannot isolate" in proc.stderr or not os.access(repo, os.R_OK):
        pytest.skip(f"no unprivileged bwrap here: {proc.stderr[-200:]}")
    assert proc.returncode == 0, proc.stderr
    check_escapes_blocked(proc.stdout)


# ------------------------------------------------------------------ processes and limits

@pytest.mark.integration
def test_fork_bomb_is_capped_by_nproc_and_nothing_survives(sandbox):
    marker = f"posttrain-bomb-{uuid.uuid4().hex}"
    code = (f"# {marker}\n"
            "import os, time\n"
            "made = 0\n"
            "for _ in range(200):\n"
            "    try:\n"
            "        if os.fork() == 0:\n"
            "            time.sleep(60); os._exit(0)\n"
            "        made += 1\n"
            "    except OSError:\n"
            "        break\n"
            "print(made, flush=True)\n"
            "time.sleep(60)\n")
    result = sandbox.run(PY + [code], limits=SandboxLimits(wall_s=3, nproc=8))
    assert result.timed_out and result.signal is not None
    assert 0 < int(result.stdout) < 8  # the cap counts this sandbox's own processes only
    assert wait_no_survivors(marker) == []


@pytest.mark.integration
def test_unbounded_fork_bomb_dies_with_the_sandbox(sandbox):
    marker = f"posttrain-bomb-{uuid.uuid4().hex}"
    code = f"# {marker}\nimport os\nwhile True:\n    try: os.fork()\n    except OSError: pass\n"
    start = time.monotonic()
    result = sandbox.run(PY + [code], limits=SandboxLimits(wall_s=1.5, nproc=12))
    assert result.timed_out and time.monotonic() - start < 5
    assert wait_no_survivors(marker) == []


@pytest.mark.integration
def test_wall_clock_kills_background_children_too(sandbox):
    marker = f"posttrain-bg-{uuid.uuid4().hex}"
    sleeper = f"import os, time; os.setsid(); time.sleep(60)  # {marker}"
    script = f"{sys.executable} -I -S -c '{sleeper}' & {sys.executable} -I -S -c '{sleeper}' & wait"
    result = sandbox.run(["sh", "-c", script], limits=SandboxLimits(wall_s=1))
    assert result.timed_out and result.wall_s < 3
    assert wait_no_survivors(marker) == []


@pytest.mark.integration
def test_children_left_behind_at_normal_exit_are_killed(sandbox):
    marker = f"posttrain-orphan-{uuid.uuid4().hex}"
    code = (f"# {marker}\nimport os, time\n"
            "if os.fork() == 0:\n    os.setsid(); time.sleep(60); os._exit(0)\n"
            "print('parent done')\n")
    result = sandbox.run(PY + [code])
    assert result.ok and result.stdout == b"parent done\n" and result.wall_s < 5
    assert wait_no_survivors(marker) == []


@pytest.mark.integration
def test_memory_limit(sandbox):
    code = "try:\n    x = bytearray(1 << 30)\n    print('allocated')\nexcept MemoryError:\n    print('MemoryError')\n"
    result = sandbox.run(PY + [code], limits=SandboxLimits(memory_mb=128))
    assert result.stdout == b"MemoryError\n"


@pytest.mark.integration
def test_cpu_limit_kills_spinning_program(sandbox):
    result = sandbox.run(PY + ["while True: pass"], limits=SandboxLimits(cpu_s=1, wall_s=10))
    assert result.signal is not None and not result.timed_out and result.wall_s < 5  # SIGXCPU / SIGKILL


@pytest.mark.integration
def test_output_cap_kills_a_flood(sandbox):
    start = time.monotonic()
    result = sandbox.run(PY + ["import sys\nwhile True: sys.stdout.write('x' * 65536)"],
                         limits=SandboxLimits(stdout_bytes=100_000))
    assert result.output_limited and len(result.stdout) == 100_000 and time.monotonic() - start < 5


@pytest.mark.integration
def test_on_stdout_can_stop_a_run(sandbox):
    seen = []

    def stop_at_first_line(chunk: bytes) -> bool:
        seen.append(chunk)
        return b"\n" not in chunk

    result = sandbox.run(PY + ["import time\nprint('first', flush=True)\ntime.sleep(30)"],
                         on_stdout=stop_at_first_line)
    assert result.stopped and result.stdout == b"first\n" and result.wall_s < 5


@pytest.mark.integration
@pytest.mark.skipif(os.geteuid() != 0, reason="uid slots are used when running as root; as a user the "
                                                "user namespace gives each sandbox its own count")
def test_concurrent_runs_get_distinct_uids(sandbox):
    results = [None] * 4

    def one(k):
        results[k] = sandbox.run(PY + ["import os, time; time.sleep(0.3); print(os.getuid())"])

    threads = [threading.Thread(target=one, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    uids = {int(r.stdout) for r in results}
    assert len(uids) == 4 and all(u >= sandbox_mod.SLOT_UID_BASE for u in uids)
