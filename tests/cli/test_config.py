"""Recipes: every shipped recipe validates; malformed ones get errors naming field, value and fix."""
import glob
import os
import subprocess
import sys

import pytest

from posttrain.config import RecipeError, load_recipe
from tests.helpers import REPO

pytestmark = pytest.mark.unit

SHIPPED = sorted(glob.glob(os.path.join(REPO, "recipes", "*.yaml"))   # + the toy teachers and MOPD baselines
                 + glob.glob(os.path.join(REPO, "recipes", "*", "*.yaml")))


def test_there_are_shipped_recipes():
    names = {os.path.basename(p) for p in SHIPPED}
    assert {"quickstart.yaml", "smoke.yaml", "add.yaml", "code.yaml", "mixed-13.yaml"} <= names


# Recipes whose models are built by a documented command (MOPD teachers: scripts/toy_teachers.sh) validate
# their schema everywhere; on a fresh clone their file check must name exactly the missing models.
# Recipes whose model or teachers are built by a documented command (not committed): the missing input is named.
BUILT_BY_COMMAND = {"mopd-quickstart.yaml": "algorithm.teachers[", "mopd-13.yaml": "algorithm.teachers[",
                    "agent-quickstart.yaml": "`model.path`",
                    "sequential-13.yaml": "`data.train_files[0]`"}   # scripts/mopd_showcase.sh writes its data


@pytest.mark.parametrize("path", SHIPPED, ids=os.path.basename)
def test_every_shipped_recipe_validates_via_cli(path):
    out = subprocess.run([sys.executable, "-m", "posttrain.cli", "validate", path], cwd=REPO,
                         capture_output=True, text=True)
    if out.returncode != 0 and os.path.basename(path) in BUILT_BY_COMMAND:
        load_recipe(path, check_files=False)  # the schema itself is valid
        assert "missing inputs" in out.stderr and BUILT_BY_COMMAND[os.path.basename(path)] in out.stderr, out.stderr
        return
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith("ok:")


def test_validate_imports_no_torch_ray_or_vllm():
    code = ("import sys; from posttrain.cli import main; rc = main(['validate', 'recipes/quickstart.yaml']); "
            "heavy = [m for m in ('torch', 'ray', 'vllm') if m in sys.modules]; print('HEAVY', heavy); sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert "HEAVY []" in out.stdout


def _write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return str(p)


BASE = f"""
name: t
total_steps: 2
model: {{path: {REPO}/posttrain/toy/assets/toy-base}}
data: {{train_files: [{REPO}/recipes/data/add/train.jsonl]}}
rewards: {{functions: [{{name: "posttrain.toy.rewards:exact_answer"}}]}}
"""


def test_unknown_key_suggests_the_right_one(tmp_path):
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, BASE + "rollout: {temprature: 0.7}\n"))
    assert "`rollout.temprature`" in str(err.value) and "did you mean `rollout.temperature`" in str(err.value)


def test_wrong_type_names_field_and_value(tmp_path):
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, BASE + "rollout: {n: many}\n"))
    assert "`rollout.n`" in str(err.value) and '"many"' in str(err.value)


def test_missing_required_field(tmp_path):
    with pytest.raises(RecipeError, match=r"`total_steps`: required field is missing"):
        load_recipe(_write(tmp_path, BASE.replace("total_steps: 2\n", "")))


def test_batch_not_divisible_by_minibatches(tmp_path):
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, BASE + "rollout: {prompts_per_step: 6, n: 3}\nalgorithm: {type: gspo, mini_batches: 4}\n"))
    assert "algorithm.mini_batches" in str(err.value) and "divisible" in str(err.value)


def test_missing_model_and_data_files(tmp_path):
    text = BASE.replace(f"{REPO}/posttrain/toy/assets/toy-base", "/nonexistent/model").replace(
        f"{REPO}/recipes/data/add/train.jsonl", "/nonexistent/train.jsonl")
    with pytest.raises(RecipeError) as err:
        load_recipe(_write(tmp_path, text))
    assert "`model.path`" in str(err.value) and "`data.train_files[0]`" in str(err.value)


def test_dotted_overrides_change_fields_and_bad_ones_are_named(tmp_path):
    recipe = load_recipe(_write(tmp_path, BASE), ["rollout.n=4", "trainer.optimizer.lr=0.5"])
    assert recipe.rollout.n == 4 and recipe.trainer.optimizer.lr == 0.5
    with pytest.raises(RecipeError, match="key.path=value"):
        load_recipe(_write(tmp_path, BASE), ["rollout.n"])
    with pytest.raises(RecipeError, match="did you mean `rollout.max_tokens`"):
        load_recipe(_write(tmp_path, BASE), ["rollout.max_token=3"])


def test_unknown_reward_is_named_by_validate(tmp_path):
    path = _write(tmp_path, BASE.replace("posttrain.toy.rewards:exact_answer", "no_such_module:fn"))
    out = subprocess.run([sys.executable, "-m", "posttrain.cli", "validate", path], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "rewards.functions[0].name" in out.stderr and "no_such_module" in out.stderr


def test_malformed_dataset_row_is_named(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": [{"role": "user", "content": "hi"}], "data_source": "x", '
                   '"reward_model": {"ground_truth": "1"}}\n'
                   '{"prompt": "not a list", "data_source": "x", "reward_model": {"ground_truth": "1"}}\n')
    path = _write(tmp_path, BASE.replace(f"{REPO}/recipes/data/add/train.jsonl", str(bad)))
    out = subprocess.run([sys.executable, "-m", "posttrain.cli", "validate", "--check-data", path], cwd=REPO,
                         capture_output=True, text=True)
    assert out.returncode == 2
    assert "row 2" in out.stderr and "`prompt`" in out.stderr


def test_the_canary_tolerance_defaults_by_model_dtype_and_an_explicit_one_wins():
    from posttrain.config import CANARY_TOLERANCE, canary_tolerance

    smoke = os.path.join(REPO, "recipes", "smoke.yaml")
    assert canary_tolerance(load_recipe(smoke)) == CANARY_TOLERANCE["float32"] == 2e-3
    for dtype in ("bfloat16", "float16"):
        recipe = load_recipe(smoke, [f"model.dtype={dtype}", "trainer.fsdp=true"])
        assert canary_tolerance(recipe) == CANARY_TOLERANCE[dtype] > 2e-3
    explicit = load_recipe(smoke, ["model.dtype=bfloat16", "trainer.fsdp=true", "rollout.canary_tolerance=0.01"])
    assert canary_tolerance(explicit) == 0.01
    with pytest.raises(RecipeError, match="canary_tolerance"):
        load_recipe(smoke, ["rollout.canary_tolerance=0"])
