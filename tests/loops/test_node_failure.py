"""A multi-node Ray cluster on this machine (`ray start --head` plus worker nodes with their own resources):
killing the raylet of the node that hosts the rollout engine mid-run does not lose the run — the driver
recreates the lost actors on the remaining node and continues from the last checkpoint."""
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid

import psutil
import pytest

from tests.helpers import REPO

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _free_port():
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class LocalCluster:
    def __init__(self):
        self.temp_dir = os.path.join(tempfile.gettempdir(), f"ray_mn_{uuid.uuid4().hex[:8]}")
        self.port = _free_port()
        self.address = f"127.0.0.1:{self.port}"
        self.env = dict(os.environ, RAY_AUTH_MODE="disabled", RAY_USAGE_STATS_ENABLED="0", PYTHONPATH=REPO)
        self.node_ports = []
        ray_bin = os.path.join(os.path.dirname(sys.executable), "ray")
        try:
            # The head holds 1 CPU (the trainer); each worker node 2 CPUs, so the rollout engine lands on one of them.
            self._ray(ray_bin, "start", "--head", f"--port={self.port}", "--num-cpus=1",
                      f"--temp-dir={self.temp_dir}", "--include-dashboard=true", "--dashboard-port=0")
            for _ in range(2):
                nm = _free_port()
                self.node_ports.append(nm)
                self._ray(ray_bin, "start", f"--address={self.address}", "--num-cpus=2", f"--node-manager-port={nm}")
        except BaseException:
            self.stop()  # a half-started cluster must not outlive the test
            raise

    def _ray(self, *args):
        out = subprocess.run(list(args), env=self.env, capture_output=True, text=True, timeout=180)
        assert out.returncode == 0, out.stderr[-2000:]

    def raylet_for_port(self, node_manager_port):
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "raylet" in cmd and f"--node_manager_port={node_manager_port}" in cmd:
                return p
        return None

    def stop(self):
        # Only this cluster's processes (other Ray sessions on the machine are left alone).
        for p in psutil.process_iter(["cmdline"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if self.temp_dir in cmd or any(f"--node_manager_port={nm}" in cmd for nm in self.node_ports) or \
                    f"--gcs-address={self.address}" in cmd or f"--gcs_address={self.address}" in cmd:
                try:
                    p.kill()
                except psutil.NoSuchProcess:
                    pass


def _rollout_node_manager_port(address, env):
    code = (
        "import ray, json; from ray.util.state import list_actors\n"
        f"ray.init(address='{address}', log_to_driver=False)\n"
        # The address is named: with another Ray instance on the machine, list_actors would not know which.
        f"acts = list_actors(address='{address}', filters=[('class_name', '=', 'RolloutWorker'), ('state', '=', 'ALIVE')])\n"
        "nodes = {n['NodeID']: n['NodeManagerPort'] for n in ray.nodes() if n['Alive']}\n"
        "print(json.dumps([nodes.get(a.node_id) for a in acts]))\n")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_losing_the_rollout_node_restarts_from_checkpoint(tmp_path):
    cluster = LocalCluster()
    try:
        run_dir = str(tmp_path / "run")
        proc = subprocess.Popen(
            [sys.executable, "-m", "posttrain.cli", "run", "recipes/smoke.yaml", "total_steps=20",
             "data.eval_files=[]", f"ray.address={cluster.address}", "ray.actor_start_timeout_s=180",
             "rewards.max_concurrency=2", "--run-dir", run_dir, "--no-progress"],
            cwd=REPO, env=cluster.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        metrics = os.path.join(run_dir, "metrics.jsonl")
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if os.path.exists(metrics) and sum(1 for _ in open(metrics)) >= 2:
                break
            time.sleep(0.5)
        ports = _rollout_node_manager_port(cluster.address, cluster.env)
        assert ports and ports[0] in cluster.node_ports, ports
        raylet = cluster.raylet_for_port(ports[0])
        assert raylet is not None
        raylet.send_signal(signal.SIGKILL)                    # the node is gone
        # (Actor calls go worker to worker, so the engine's process keeps answering until it notices its raylet
        # is dead; the run is long enough after the kill for that to happen mid-run.)
        stdout, stderr = proc.communicate(timeout=900)
        assert proc.returncode == 0, stderr[-4000:]
        with open(os.path.join(run_dir, "events.log")) as f:
            events = f.read()
        assert "restart 1/" in events
        with open(metrics) as f:
            steps = [json.loads(line)["step"] for line in f]
        assert steps == list(range(1, 21))
        assert os.path.exists(os.path.join(run_dir, "final", "model.safetensors"))
    finally:
        cluster.stop()
