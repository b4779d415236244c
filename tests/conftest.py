import os

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def sigkill_at_random_step(argv: list[str], run_dir: str, rng, targets: list[int]) -> int:
    """Start `posttrain <argv>` in its own process group and SIGKILL the whole group (driver, Ray, engines) at a
    random moment inside the step after a random one of `targets` — a preempted machine. Returns the last step
    logged before the kill."""
    import json
    import signal
    import subprocess
    import sys
    import time

    def records():
        path = os.path.join(run_dir, "metrics.jsonl")
        return [json.loads(line) for line in open(path) if line.strip()] if os.path.exists(path) else []

    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", *argv], cwd=REPO,
                            env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    target = rng.choice(targets)
    deadline = time.time() + 900
    while time.time() < deadline and proc.poll() is None:
        if any(r["step"] >= target for r in records()):
            break
        time.sleep(0.2)
    # Anywhere inside the next step, checkpoint writes included: a pause of up to one measured step (a fixed
    # pause could outlast the remaining steps on a fast machine, and then nothing would be tested).
    step_s = next((r["time/step_s"] for r in reversed(records()) if "time/step_s" in r), 1.0)
    time.sleep(rng.uniform(0.0, step_s))
    killed_at = max((r["step"] for r in records()), default=0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return killed_at
