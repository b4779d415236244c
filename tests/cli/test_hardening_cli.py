"""Hostile or careless input to the CLI: YAML bombs and huge recipes, malformed overrides, non-finite numbers,
undecodable dataset rows, run directories that are not runs or not writable, `score -o INPUT`, and what the
embedded Ray cluster exposes on the network. Each gets a one-line error naming what to fix, never a traceback,
a hang or lost data."""
import os
import subprocess
import sys
import time

import pytest
import yaml

from posttrain.config import RecipeError, load_recipe
from tests.helpers import REPO

BASE = f"""
name: t
total_steps: 2
model: {{path: {REPO}/posttrain/toy/assets/toy-base}}
data: {{train_files: [{REPO}/recipes/data/add/train.jsonl]}}
rewards: {{functions: [{{name: "posttrain.toy.rewards:exact_answer"}}]}}
"""

# "Billion laughs": nine levels of nine aliases each, 9^9 ≈ 387 million strings from about 700 bytes.
_LAUGHS = "".join(f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi"))
ALIAS_BOMB = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + _LAUGHS


def _write(tmp_path, text, name="r.yaml"):
    p = tmp_path / name
    p.write_text(text)
    return str(p)


def _cli(*argv, timeout=120, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "posttrain.cli", *argv], cwd=cwd, capture_output=True, text=True,
                          timeout=timeout, env=dict(os.environ, PYTHONPATH=REPO))


def _one_error_line(out) -> str:
    assert out.returncode == 2, (out.returncode, out.stderr)
    assert "Traceback" not in out.stderr, out.stderr
    lines = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, out.stderr
    return lines[0]


# ---------------------------------------------------------------------------------------------------------------
# Item 8: YAML alias bombs and huge recipes

@pytest.mark.unit
def test_alias_bomb_recipe_is_refused_at_once(tmp_path):
    path = _write(tmp_path, ALIAS_BOMB.replace("i: &i", "junk: &i") + "name: *i\n")
    assert os.path.getsize(path) < 1300
    started = time.perf_counter()
    out = _cli("validate", path, timeout=60)  # the old loader hangs here (then TimeoutExpired fails the test)
    line = _one_error_line(out)
    assert "expands to more than" in line and path in line
    assert time.perf_counter() - started < 30


@pytest.mark.unit
def test_alias_bomb_in_an_override_is_refused_at_once(tmp_path):
    bomb = "{" + ALIAS_BOMB.strip().replace("\n", ", ") + "}"
    out = _cli("validate", _write(tmp_path, BASE), f"rollout.engine_kwargs={bomb}", timeout=60)
    line = _one_error_line(out)
    assert "`rollout.engine_kwargs`" in line and "expands to more than" in line


@pytest.mark.unit
def test_recursive_alias_and_deep_nesting_are_refused(tmp_path):
    with pytest.raises(RecipeError, match="contains it"):
        load_recipe(_write(tmp_path, BASE + "rollout: {engine_kwargs: &x {loop: *x}}\n"))
    deep = "[" * 500 + "]" * 500
    with pytest.raises(RecipeError, match="nests deeper"):
        load_recipe(_write(tmp_path, BASE + f"rollout: {{engine_kwargs: {{x: {deep}}}}}\n"))


@pytest.mark.unit
def test_oversized_recipe_is_refused_before_parsing(tmp_path):
    path = _write(tmp_path, BASE + ("# padding\n" * 120_000))  # 1.2 MB, otherwise a valid recipe
    with pytest.raises(RecipeError) as err:
        load_recipe(path)
    assert f"{os.path.getsize(path):,} bytes" in str(err.value) and "1,048,576" in str(err.value)


@pytest.mark.unit
def test_recipes_are_parsed_by_libyaml_when_available(tmp_path):
    from posttrain import config
    if yaml.__with_libyaml__:
        assert issubclass(config._BoundedLoader, yaml.CSafeLoader)
    recipe = load_recipe(_write(tmp_path, BASE + "rollout: {n: 4}\n"), ["rollout.temperature=0.5"])
    assert recipe.rollout.n == 4 and recipe.rollout.temperature == 0.5


# ---------------------------------------------------------------------------------------------------------------
# Item 9: malformed overrides, non-finite numbers, unwritable run dirs, undecodable dataset rows

@pytest.mark.unit
@pytest.mark.parametrize("override, field", [("rollout.n=[", "rollout.n"), ("name=*x", "name"),
                                             ("rollout.n={a: [}", "rollout.n")])
def test_malformed_override_is_one_line_naming_the_field(tmp_path, override, field):
    line = _one_error_line(_cli("validate", _write(tmp_path, BASE), override))
    assert f"`{field}`" in line and "not valid YAML" in line and "quote it" in line


@pytest.mark.unit
@pytest.mark.parametrize("override", ["a..b=1", "=3", ".n=2"])
def test_override_with_an_empty_key_part_is_named(tmp_path, override):
    with pytest.raises(RecipeError, match="empty part"):
        load_recipe(_write(tmp_path, BASE), [override])


@pytest.mark.unit
@pytest.mark.parametrize("override, field", [("trainer.optimizer.lr=.inf", "trainer.optimizer.lr"),
                                             ("rewards.timeout_s=.inf", "rewards.timeout_s"),
                                             ("rollout.temperature=.nan", "rollout.temperature"),
                                             ("rewards.timeout_s=-.inf", "rewards.timeout_s")])
def test_non_finite_numbers_are_refused(tmp_path, override, field):
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, BASE), [override])
    assert f"`{field}`" in str(err.value) and "must be a finite number" in str(err.value)


@pytest.mark.unit
@pytest.mark.parametrize("where, named", [(b'"hi"', "row 3"), (b'"data_source"', "line 3")])  # a value, a key
def test_non_utf8_dataset_row_is_named(tmp_path, where, named):
    from posttrain.data import DatasetError, load_prompt_rows
    good = b'{"prompt": [{"role": "user", "content": "hi"}], "data_source": "x", "reward_model": {"ground_truth": "1"}}\n'
    bad = good.replace(where, where[:2] + b"\xff\xfe" + where[2:])
    path = tmp_path / "latin.jsonl"
    path.write_bytes(good + good + bad + good)
    with pytest.raises(DatasetError) as err:
        load_prompt_rows([str(path)])
    assert f"{path} {named}" in str(err.value) and "not valid UTF-8" in str(err.value)


@pytest.mark.unit
def test_unusable_run_dir_is_one_line(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    line = _one_error_line(_cli("run", _write(tmp_path, BASE), "--run-dir", str(blocker / "run"), "--no-progress"))
    assert str(blocker / "run") in line and "writ" in line


# ---------------------------------------------------------------------------------------------------------------
# Item 10: a run dir that is not a run of this recipe

def _decide(recipe_path, run_dir, allowed=()):
    from posttrain.cli import _decide_resume
    return _decide_resume(load_recipe(recipe_path), str(run_dir), list(allowed))


@pytest.mark.unit
def test_foreign_folder_is_refused_and_left_untouched(tmp_path):
    run_dir = tmp_path / "mine"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text('{"precious": 1}')
    (run_dir / "notes.txt").write_text("keep")
    out = _cli("run", _write(tmp_path, BASE), "--run-dir", str(run_dir), "--no-progress", timeout=300)
    line = _one_error_line(out)
    assert "holds no posttrain run" in line and "notes.txt, summary.json" in line and "--run-dir" in line
    assert sorted(os.listdir(run_dir)) == ["notes.txt", "summary.json"]
    assert (run_dir / "summary.json").read_text() == '{"precious": 1}'


@pytest.mark.unit
def test_only_new_empty_or_lock_only_folders_start_fresh(tmp_path):
    recipe_path = _write(tmp_path, BASE)
    assert _decide(recipe_path, tmp_path / "new") is None
    (tmp_path / "empty").mkdir()
    assert _decide(recipe_path, tmp_path / "empty") is None
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "run.lock").write_text("")
    (tmp_path / "locked" / "run.pid").write_text('{"pid": 1}')
    assert _decide(recipe_path, tmp_path / "locked") is None
    (tmp_path / "locked" / "metrics.jsonl").write_text('{"step": 1}\n')  # no config.yaml: not a run
    with pytest.raises(RecipeError, match=r"not empty and holds no posttrain run \(it has metrics.jsonl\)"):
        _decide(recipe_path, tmp_path / "locked")


@pytest.mark.unit
def test_run_of_this_recipe_resumes_and_of_another_is_refused(tmp_path):
    from posttrain import checkpoint as ckpt
    from posttrain.cli import _decide_resume
    from posttrain.config import dump_recipe_yaml, recipe_to_dict
    recipe_path = _write(tmp_path, BASE)
    recipe, changed = load_recipe(recipe_path), load_recipe(recipe_path, ["rollout.temperature=0.5"])
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    # Stopped before its first checkpoint: config.yaml says which recipe it is.
    (run_dir / "config.yaml").write_text(dump_recipe_yaml(recipe))
    (run_dir / "metrics.jsonl").write_text('{"step": 0}\n')
    assert _decide(recipe_path, run_dir) is None  # same recipe: start again from scratch
    with pytest.raises(RecipeError, match=r"different recipe \(changed: rollout.temperature\)"):
        _decide_resume(changed, str(run_dir), [])
    # With a checkpoint: resume from it.
    final = ckpt.commit(str(run_dir), ckpt.begin(str(run_dir), 1), 1, {"step": 1, "recipe": recipe_to_dict(recipe)}, 2)
    assert _decide(recipe_path, run_dir) == final
    with pytest.raises(RecipeError, match="different recipe"):
        _decide_resume(changed, str(run_dir), [])


# ---------------------------------------------------------------------------------------------------------------
# Item 11: score -o INPUT

def _score(tmp_path, *argv):
    return _cli("score", "--reward", "posttrain.toy.rewards:exact_answer", "--workers", "1", "--no-progress", *argv,
                cwd=str(tmp_path), timeout=120)


SCORE_INPUT = '{"completion": "Answer: 3", "ground_truth": "3"}\n{"completion": "no", "ground_truth": "3"}\n'


@pytest.mark.unit
@pytest.mark.parametrize("spelling", ["same", "relative", "symlink"])
def test_score_refuses_to_overwrite_its_input(tmp_path, spelling):
    (tmp_path / "in.jsonl").write_text(SCORE_INPUT)
    os.symlink("in.jsonl", tmp_path / "link.jsonl")
    output = {"same": "in.jsonl", "relative": f"../{tmp_path.name}/./in.jsonl", "symlink": "link.jsonl"}[spelling]
    out = _score(tmp_path, "in.jsonl", "-o", output)
    assert out.returncode == 2 and "is the input file" in out.stderr and "Traceback" not in out.stderr
    assert (tmp_path / "in.jsonl").read_text() == SCORE_INPUT


SLOW_REWARD = """import time
def slow(data_source, solution_str, ground_truth, extra_info=None):
    time.sleep(0.2)
    return {"score": 0.5}
"""


@pytest.mark.unit
def test_score_killed_midway_leaves_the_previous_output_whole(tmp_path):
    import signal
    (tmp_path / "slow.py").write_text(SLOW_REWARD)
    (tmp_path / "in.jsonl").write_text(SCORE_INPUT * 50)  # 100 lines x 0.2 s: killed long before the end
    (tmp_path / "out.jsonl").write_text("previous\n")
    proc = subprocess.Popen([sys.executable, "-m", "posttrain.cli", "score", "--reward", "slow.py:slow", "--workers",
                             "1", "--no-progress", "in.jsonl", "-o", "out.jsonl"], cwd=str(tmp_path),
                            env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, start_new_session=True)
    deadline = time.time() + 60
    while time.time() < deadline and proc.poll() is None:  # until the writing has started
        if any(n.endswith(".tmp") for n in os.listdir(tmp_path)) or (tmp_path / "out.jsonl").read_text() != "previous\n":
            break
        time.sleep(0.1)
    time.sleep(0.5)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert (tmp_path / "out.jsonl").read_text() == "previous\n"
    # Run to the end: the output replaces the old one whole, with the usual permissions, no temporary left.
    (tmp_path / "in.jsonl").write_text(SCORE_INPUT)
    for name in os.listdir(tmp_path):
        if name.endswith(".tmp"):  # the killed run's (SIGKILL leaves no chance to clean up)
            os.unlink(tmp_path / name)
    out = _score(tmp_path, "in.jsonl", "-o", "out.jsonl")
    assert out.returncode == 0, out.stderr
    lines = (tmp_path / "out.jsonl").read_text().splitlines()
    assert len(lines) == 2 and '"score": 1.0' in lines[0]
    assert sorted(os.listdir(tmp_path)) == ["in.jsonl", "out.jsonl", "slow.py"]
    assert (tmp_path / "out.jsonl").stat().st_mode & 0o777 != 0o600  # not mkstemp's private mode
    # A named pipe (like /dev/stdout or /dev/null) is written in place, never renamed over.
    import stat
    import threading
    os.mkfifo(tmp_path / "pipe")
    received = []
    reader = threading.Thread(target=lambda: received.append(open(tmp_path / "pipe").read()))
    reader.start()
    out = _score(tmp_path, "in.jsonl", "-o", "pipe")
    reader.join(timeout=60)
    assert out.returncode == 0, out.stderr
    assert stat.S_ISFIFO(os.stat(tmp_path / "pipe").st_mode) and len(received[0].splitlines()) == 2


# ---------------------------------------------------------------------------------------------------------------
# Item 17: the embedded Ray cluster listens on loopback only, with token authentication

def _listening_sockets(procs) -> list[tuple[str, str, int]]:
    import psutil
    found = []
    for proc in procs:
        try:
            found += [(proc.name(), c.laddr.ip, c.laddr.port) for c in proc.net_connections(kind="inet")
                      if c.status == psutil.CONN_LISTEN]
        except psutil.Error:  # a worker that exited meanwhile
            pass
    return found


@pytest.mark.integration
def test_embedded_ray_listens_on_loopback_only_with_token_auth(tmp_path):
    import ipaddress

    import psutil
    import ray

    from posttrain.orchestration import start_ray
    from ray._raylet import AuthenticationMode, get_authentication_mode

    from ray._private import ray_constants

    if ray.is_initialized():
        ray.shutdown()
    switch_before = ray_constants.ENABLE_RAY_CLUSTER
    recipe = load_recipe(_write(tmp_path, BASE + "ray: {num_cpus: 2}\n"))
    start_ray(recipe)
    try:
        @ray.remote
        def worker_pid() -> int:
            return os.getpid()

        assert ray.get(worker_pid.remote(), timeout=120) != os.getpid()  # workers connect
        time.sleep(2)  # agents and metrics servers come up after the first task
        me = psutil.Process()
        sockets = _listening_sockets([me, *me.children(recursive=True)])
        names = {name for name, _, _ in sockets}
        assert any("gcs_server" in n for n in names) and any("raylet" in n for n in names), sockets
        exposed = [s for s in sockets if not ipaddress.ip_address(s[1].removeprefix("::ffff:")).is_loopback]
        assert not exposed, f"listening beyond loopback: {exposed}"
        assert get_authentication_mode() == AuthenticationMode.TOKEN
    finally:
        ray.shutdown()
    # Ray's multi-node switch is put back: a later ray.init(address=...) in this process finds its node IP.
    assert ray_constants.ENABLE_RAY_CLUSTER == switch_before
