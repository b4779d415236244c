"""Teachers for MOPD: routing, start-up checks, the binary payload, and real vLLM teacher engines whose scores
line up position by position with the student's tokens (also across in-memory weight swaps)."""
import json
import os
import shutil

import numpy as np
import pytest

from posttrain.config import parse_recipe
from teachers.checks import TeacherConfigError, check_teachers
from teachers.routing import RoutingError, TeacherRouter
from teachers.scores import TeacherScores


def _recipe(student, teachers, **mopd):
    return parse_recipe({
        "name": "t", "total_steps": 1, "model": {"path": student},
        "data": {"train_files": ["x.jsonl"]}, "rewards": {"functions": [{"name": "math"}]},
        "rollout": {"prompts_per_step": 4, "n": 2},
        "algorithm": {"type": "mopd", "teachers": teachers, **mopd}})


# ---------------------------------------------------------------------------------------------------------------
# Routing


class _T:
    def __init__(self, name, labels):
        self.name, self.labels = name, labels


@pytest.mark.unit
def test_routing_picks_exactly_one_teacher_by_row_field():
    router = TeacherRouter([_T("math", ["toy/add", "toy/sub"]), _T("ground", ["toy/box"])])
    rows = [{"data_source": "toy/sub"}, {"data_source": "toy/box"}, {"data_source": "toy/add"}]
    assert router.route_rows(rows) == [0, 1, 0]
    nested = TeacherRouter([_T("a", ["x"]), _T("b", ["y"])], route_key="extra_info.domain")
    assert nested.route({"data_source": "z", "extra_info": {"domain": "y"}}) == 1


@pytest.mark.unit
def test_unknown_labels_are_all_reported_at_once_with_the_fix():
    router = TeacherRouter([_T("math", ["toy/add"])])
    rows = [{"data_source": "toy/add"}, {"data_source": "toy/ocr"}, {"data_source": "toy/ocr"},
            {"data_source": "toy/box"}]
    with pytest.raises(RoutingError) as err:
        router.route_rows(rows, "train")
    msg = str(err.value)
    assert "'toy/ocr' (2 rows, first: train row 2)" in msg and "'toy/box' (1 row, first: train row 4)" in msg
    assert "labels" in msg and "never falls back" in msg


@pytest.mark.unit
def test_missing_route_field_and_duplicate_labels_are_errors():
    router = TeacherRouter([_T("a", ["x"])], route_key="extra_info.domain")
    with pytest.raises(RoutingError, match="no `extra_info.domain` field"):
        router.route_rows([{"data_source": "x", "extra_info": {}}])
    with pytest.raises(RoutingError, match="served by both teacher 'a' and 'b'"):
        TeacherRouter([_T("a", ["x"]), _T("b", ["x"])])


@pytest.mark.integration
def test_run_refuses_a_dataset_with_an_unrouted_label_before_starting_anything(tmp_path, tiny_family):
    """posttrain run with a label no teacher serves fails at start-up (exit 2) naming the label, no Ray started."""
    import subprocess
    import sys

    from tests.helpers import REPO

    data = tmp_path / "train.jsonl"
    rows = [{"prompt": [{"role": "user", "content": "What is 1+2?"}], "data_source": src,
             "reward_model": {"ground_truth": "3"}} for src in ("toy/add", "toy/sub", "toy/tool")]
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = tmp_path / "r.yaml"
    recipe.write_text(json.dumps({
        "name": "bad-route", "total_steps": 1, "model": {"path": tiny_family["student"]},
        "data": {"train_files": [str(data)]}, "rewards": {"functions": [{"name": "posttrain.toy.rewards:exact_answer"}]},
        "rollout": {"prompts_per_step": 4, "n": 2},
        "algorithm": {"type": "mopd", "teachers": [{"name": "add", "path": tiny_family["add"], "labels": ["toy/add"]},
                              {"name": "sub", "path": tiny_family["sub"], "labels": ["toy/sub"]}]}}))
    out = subprocess.run([sys.executable, "-m", "posttrain.cli", "run", str(recipe), "--run-dir", str(tmp_path / "run"),
                          "--no-progress"], cwd=REPO, capture_output=True, text=True, timeout=300,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 2, out.stderr[-2000:]
    assert "'toy/tool' (1 row, first: train row 3)" in out.stderr
    assert "Traceback" not in out.stderr


# ---------------------------------------------------------------------------------------------------------------
# Start-up checks of teacher folders


@pytest.mark.integration
def test_teacher_checks_name_the_teacher_and_the_fix(tmp_path, tiny_family):
    student = tiny_family["student"]
    ok = _recipe(student, [{"name": "add", "path": tiny_family["add"], "labels": ["toy/add"]}])
    check_teachers(ok)  # same tokenizer, vocabulary, architecture: passes

    missing = _recipe(student, [{"name": "ghost", "path": str(tmp_path / "nope"), "labels": ["a"]}])
    with pytest.raises(TeacherConfigError, match=r"teacher 'ghost'.*not a model folder.*train the teacher"):
        check_teachers(missing)

    other_vocab = tmp_path / "other_vocab"
    shutil.copytree(tiny_family["add"], other_vocab)
    cfg = json.loads((other_vocab / "config.json").read_text())
    cfg["vocab_size"] = 1024
    (other_vocab / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(TeacherConfigError, match=r"teacher 'big'.*vocabulary size 1024 differs.*student's tokenizer"):
        check_teachers(_recipe(student, [{"name": "big", "path": str(other_vocab), "labels": ["a"]}]))

    other_tok = tmp_path / "other_tok"
    shutil.copytree(tiny_family["add"], other_tok)
    tok = json.loads((other_tok / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[100:102]
    vocab[a], vocab[b] = vocab[b], vocab[a]          # same size, two ids swapped: a different tokenizer
    (other_tok / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(TeacherConfigError, match=r"teacher 'swapped'.*tokenizer differs"):
        check_teachers(_recipe(student, [{"name": "swapped", "path": str(other_tok), "labels": ["a"]}]))

    other_arch = tmp_path / "other_arch"
    shutil.copytree(tiny_family["add"], other_arch)
    cfg = json.loads((other_arch / "config.json").read_text())
    cfg["num_hidden_layers"] = 3
    (other_arch / "config.json").write_text(json.dumps(cfg))
    # Another architecture gets its own engine group: accepted with an engine for each, refused with one.
    two_archs = [{"name": "add", "path": tiny_family["add"], "labels": ["a"]},
                 {"name": "deep", "path": str(other_arch), "labels": ["b"]}]
    check_teachers(_recipe(student, two_archs, resident_engines=2))
    with pytest.raises(TeacherConfigError, match=r"2 architectures \(\[add\] .*\[deep\] .*num_hidden_layers.*"
                                                  r"Set algorithm.resident_engines: 2"):
        check_teachers(_recipe(student, two_archs))


@pytest.mark.unit
def test_k_above_the_logprob_cap_is_a_recipe_error():
    from posttrain.config import RecipeError
    with pytest.raises(RecipeError, match=r"algorithm.top_k = 32 exceeds .* algorithm.max_logprobs = 20"):
        _recipe("s", [{"name": "a", "path": "p", "labels": ["x"]}], top_k=32)


# ---------------------------------------------------------------------------------------------------------------
# The payload


@pytest.mark.unit
def test_scores_payload_is_binary_and_compact():
    rng = np.random.default_rng(0)
    parts = [(rng.integers(0, 500, (n, 16)).astype(np.int32), rng.normal(size=(n, 16)).astype(np.float32),
              rng.normal(size=n).astype(np.float32)) for n in (3, 0, 5)]
    scores = TeacherScores.from_sequences(parts, 16)
    assert scores.num_sequences == 3 and scores.offsets.tolist() == [0, 3, 3, 8]
    assert scores.nbytes == 8 * (16 * 4 + 16 * 4 + 4) + 4 * 8            # 132 B per token + offsets
    for i, part in enumerate(parts):
        for got, want in zip(scores.sequence(i), part):
            np.testing.assert_array_equal(got, want)
    regrouped = TeacherScores.gather([scores], [(0, 2), (0, 0)], 16)
    np.testing.assert_array_equal(regrouped.sequence(0)[0], parts[2][0])
    with pytest.raises(TypeError):
        TeacherScores(scores.topk_ids.astype(np.int64), scores.topk_logprobs, scores.token_logprobs, scores.offsets)


# ---------------------------------------------------------------------------------------------------------------
# Real engines


def _sequences(tokenizer):
    from posttrain.data import encode_prompt
    texts = [("What is 27+2?", "Answer: 29"), ("Largest of 1 2 3 99?", "Answer: 99 and then some more words"),
             ("Hi", "x")]
    prompts = [encode_prompt(tokenizer, [{"role": "user", "content": q}]) for q, _ in texts]
    responses = [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for _, a in texts]
    return prompts, responses


@pytest.mark.integration
def test_teacher_scores_line_up_with_the_student_tokens_and_survive_weight_swaps(tiny_family):
    """A vLLM teacher engine in a Ray actor vs the student trainer on the same weights: at every response
    position the teacher's top-k ids equal the trainer's and the log-probs agree; after swapping another teacher's
    weights in memory and back, the scores are those of a fresh engine of that teacher."""
    import ray
    from transformers import AutoTokenizer

    from posttrain.loops.algorithms import make_algorithm
    from posttrain.orchestration import TrainerGroup
    from teachers.pool import TeacherPool

    tokenizer = AutoTokenizer.from_pretrained(tiny_family["student"])
    prompts, responses = _sequences(tokenizer)
    # teacher "add" first: the single resident engine starts as "add", so scoring "sub" forces a swap.
    recipe = _recipe(tiny_family["add"], [{"name": "add", "path": tiny_family["add"], "labels": ["toy/add"]},
                                          {"name": "sub", "path": tiny_family["sub"], "labels": ["toy/sub"]}],
                     resident_engines=1, top_k=8)
    ray.init(num_cpus=3, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"VLLM_ENABLE_V1_MULTIPROCESSING": "0", "VLLM_CPU_KVCACHE_SPACE": "1"}})
    try:
        pool = TeacherPool(recipe)
        trainer = TrainerGroup(recipe, make_algorithm(recipe).objective())  # student = the "add" teacher's weights
        student = trainer.compute_topk(prompts, responses, 8)
        by_add, m1 = pool.score(prompts, responses, [0, 0, 0])
        assert m1["teachers/swaps"] == 0
        for i, r in enumerate(responses):
            s_ids, s_lp, s_tok = student.sequence(i)
            t_ids, t_lp, t_tok = by_add.sequence(i)
            assert t_ids.shape == (len(r), 8)                # one row per response token, no more, no less
            np.testing.assert_array_equal(t_ids, s_ids)
            np.testing.assert_allclose(t_lp, s_lp, atol=2e-4)
            np.testing.assert_allclose(t_tok, s_tok, atol=2e-4)
        assert by_add.topk_ids.dtype == np.int32 and by_add.topk_logprobs.dtype == np.float32

        # Mixed batch: the engine holds "add", so the pool scores add first, swaps to "sub", scores it.
        mixed, m2 = pool.score(prompts, responses, [1, 0, 1])
        assert m2["teachers/swaps"] == 1 and m2["teachers/payload_bytes_per_token"] < 8 * 8 + 4 + 8  # + offsets
        np.testing.assert_allclose(mixed.sequence(1)[1], by_add.sequence(1)[1], atol=1e-5)
        # Swapping "sub" in memory gives the scores of an engine that loaded "sub" from disk.
        sub_recipe = _recipe(tiny_family["sub"], [{"name": "sub", "path": tiny_family["sub"], "labels": ["toy/sub"]}],
                             top_k=8)
        fresh = TeacherPool(sub_recipe)
        by_sub, _ = fresh.score(prompts, responses, [0, 0, 0])
        for i in (0, 2):
            np.testing.assert_array_equal(mixed.sequence(i)[0], by_sub.sequence(i)[0])
            np.testing.assert_allclose(mixed.sequence(i)[1], by_sub.sequence(i)[1], atol=2e-4)
        assert not np.allclose(by_sub.sequence(0)[2], by_add.sequence(0)[2], atol=1e-3)  # the teachers differ
        trainer.call_all("shutdown")
    finally:
        ray.shutdown()


@pytest.mark.integration
def test_k_above_the_engine_cap_fails_at_engine_start(tiny_family):
    """An engine whose real cap (engine_kwargs.max_logprobs) is below k refuses at start-up, naming the teacher."""
    from teachers.engine import TeacherEngine, TeacherScoringError

    with pytest.raises(TeacherScoringError, match=r"teacher engine for 'add' cannot return top_k = 8.*algorithm.top_k"):
        TeacherEngine(tiny_family["add"], teacher_name="add", top_k=8, max_logprobs=8,
                      engine_kwargs={"max_logprobs": 4})
