"""Cross-modal MOPD: vision-language teachers score the student's multimodal samples with the same images and
frames; text-only and VL teachers (different architectures, separate engines) mix in one run, routed by
data_source or by modality; a text-only teacher routed to rows with media, or a teacher with another tokenizer,
is refused at start-up naming the teacher and the fix.

Models: the committed toy VL student and its image and video teachers (one Qwen3-VL architecture, same tokenizer),
and a random tiny text-only Qwen3 with the student's tokenizer built here (its scores are noise, which is all a
mechanism test needs)."""
import json
import os
import random
import shutil
import subprocess
import sys
import time
import types

import numpy as np
import pytest

from posttrain.config import parse_recipe
from tests.helpers import REPO, sigkill_at_random_step

ASSETS = os.path.join(REPO, "posttrain", "toy", "assets")
STUDENT = os.path.join(ASSETS, "toy-vl")
IMAGE_TEACHER = os.path.join(ASSETS, "toy-vl-teacher-image")
VIDEO_TEACHER = os.path.join(ASSETS, "toy-vl-teacher-video")
DATA = os.path.join(REPO, "recipes", "data")
TOLERANCE = 2e-3   # the weight-sync canary's default tolerance


def build_text_teacher(path: str) -> str:
    """A random tiny Qwen3ForCausalLM (text only: head_dim 64 for vLLM's CPU attention, untied LM head) with the
    toy VL student's tokenizer, saved to `path`."""
    if os.path.isfile(os.path.join(path, "model.safetensors")):
        return path
    import torch
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    config = Qwen3Config(vocab_size=384, hidden_size=128, head_dim=64, num_attention_heads=2, num_key_value_heads=1,
                         num_hidden_layers=2, intermediate_size=384, max_position_embeddings=1024,
                         tie_word_embeddings=False, eos_token_id=2, pad_token_id=0)
    Qwen3ForCausalLM(config).save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "chat_template.jinja"):
        shutil.copy(os.path.join(STUDENT, name), os.path.join(path, name))
    with open(os.path.join(STUDENT, "tokenizer_config.json")) as f:
        tokenizer_config = json.load(f)
    tokenizer_config.pop("processor_class", None)          # a text model has no processor
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(tokenizer_config, f)
    return path


@pytest.fixture(scope="module")
def text_teacher(tmp_path_factory):
    return build_text_teacher(str(tmp_path_factory.mktemp("text-teacher")))


def _recipe(teachers, student=STUDENT, **mopd):
    return parse_recipe({
        "name": "t", "total_steps": 1, "model": {"path": student}, "data": {"train_files": ["x.jsonl"]},
        "rewards": {"functions": [{"name": "math"}]}, "rollout": {"prompts_per_step": 4, "n": 2},
        "algorithm": {"type": "mopd", "teachers": teachers, **mopd}})


def _rows(n_per_source: int, split: str = "eval") -> list[dict]:
    """Rows of the four committed visual sources, interleaved, media paths made absolute by the loader."""
    from posttrain.data import load_prompt_rows
    files = [os.path.join(DATA, s, f"{split}.jsonl") for s in ("vl-ground", "vl-count", "vl-ocr", "vl-video")]
    return load_prompt_rows(files, max_rows=4 * n_per_source)


def _text_rows(n: int) -> list[dict]:
    from posttrain.toy.tasks import make_rows
    return make_rows(["add"], n, 0, "train")


# ---------------------------------------------------------------------------------------------------------------
# Routing by modality, engine groups, refusals (no engine)


@pytest.mark.unit
def test_route_key_modality_labels_rows_by_their_media():
    from teachers.routing import TeacherRouter, row_modality

    rows = [{"images": ["a.png"], "videos": ["v.mp4"]}, {"images": ["a.png"]}, {"data_source": "x"},
            {"images": [], "videos": None}]
    assert [row_modality(r) for r in rows] == ["video", "image", "text", "text"]
    teachers = [types.SimpleNamespace(name="vl", labels=["image", "video"]),
                types.SimpleNamespace(name="txt", labels=["text"])]
    assert TeacherRouter(teachers, "modality").route_rows(rows) == [0, 0, 1, 1]
    ok = _recipe([{"name": "vl", "path": "p", "labels": ["image", "video"]}], route_key="modality")
    assert ok.algorithm.route_key == "modality"
    from posttrain.config import RecipeError
    with pytest.raises(RecipeError, match=r"teacher 'vl' has labels \['toy-vl/ground'\].*`image`, `video` and `text`"):
        _recipe([{"name": "vl", "path": "p", "labels": ["toy-vl/ground"]}], route_key="modality")


@pytest.mark.unit
def test_teachers_of_two_architectures_get_separate_engine_groups(text_teacher):
    from teachers.checks import TeacherConfigError, check_teachers, engines_per_group, teacher_groups

    teachers = [{"name": "image", "path": IMAGE_TEACHER, "labels": ["toy-vl/ground"]},
                {"name": "text", "path": text_teacher, "labels": ["toy/add"]},
                {"name": "video", "path": VIDEO_TEACHER, "labels": ["toy-vl/video"]}]
    recipe = _recipe(teachers, resident_engines=2)
    check_teachers(recipe)                  # a VLM and a text model with the student's tokenizer: accepted
    assert teacher_groups(recipe.algorithm.teachers) == [[0, 2], [1]]    # image and video share one architecture
    assert engines_per_group([2, 1], 2) == [1, 1] and engines_per_group([2, 1], 5) == [2, 1]
    assert engines_per_group([13], 2) == [2]
    with pytest.raises(TeacherConfigError, match=r"2 architectures \(\[image, video\] \(Qwen3VLForConditionalGeneration"
                       r"\); \[text\] \(Qwen3ForCausalLM; differs .*Set algorithm.resident_engines: 2"):
        check_teachers(_recipe(teachers, resident_engines=1))


@pytest.mark.unit
def test_pool_assigns_each_teacher_only_to_engines_of_its_architecture():
    from teachers.pool import TeacherPool

    pool = object.__new__(TeacherPool)                  # the assignment only: no engines started
    pool.names = ["image", "text", "video", "ocr"]
    pool.group_of_teacher = {0: 0, 2: 0, 3: 0, 1: 1}    # three VL teachers, one text teacher
    pool.group_of_engine = [0, 1]
    pool.engines = [None, None]
    pool.resident = ["image", "text"]
    # The text engine is idle, yet the VL teachers that are not resident queue on the VL engine (no cross swap).
    assert pool._assign([0, 1, 2, 3]) == [[0, 2, 3], [1]]
    assert pool._assign([2, 3]) == [[2, 3], []]


@pytest.mark.unit
def test_text_teacher_routed_to_rows_with_media_is_refused_at_prepare(text_teacher):
    from posttrain.loops.algorithms import MOPD
    from teachers.checks import TeacherConfigError

    rows = _rows(1) + _text_rows(2)           # ground, count, ocr, video, then two text rows
    data = types.SimpleNamespace(train_rows=rows, eval_rows=[], tokenizer=None)
    recipe = _recipe([{"name": "image", "path": IMAGE_TEACHER, "labels": ["toy-vl/ground", "toy-vl/count"]},
                      {"name": "plain", "path": text_teacher, "labels": ["toy-vl/ocr", "toy-vl/video", "toy/add"]}],
                     resident_engines=2)
    with pytest.raises(TeacherConfigError) as err:
        MOPD(recipe.algorithm).prepare(recipe, data)
    msg = str(err.value)
    assert "teacher 'plain'" in msg and "text-only model" in msg and "2 train rows with images or videos" in msg
    assert "'toy-vl/ocr' x1, 'toy-vl/video' x1" in msg and "first: train row 3" in msg
    assert "vision-language teacher" in msg
    # The same teachers routed by modality: media rows to the VLM, text rows to the text model — accepted.
    by_modality = _recipe([{"name": "image", "path": IMAGE_TEACHER, "labels": ["image", "video"]},
                           {"name": "plain", "path": text_teacher, "labels": ["text"]}],
                          resident_engines=2, route_key="modality")
    algorithm = MOPD(by_modality.algorithm)
    algorithm.prepare(by_modality, data)
    assert algorithm.row_teacher == [0, 0, 0, 0, 1, 1]


@pytest.mark.unit
def test_vl_teacher_with_another_tokenizer_is_refused(tmp_path):
    from teachers.checks import TeacherConfigError, check_teachers

    other = tmp_path / "other-tokenizer"
    shutil.copytree(VIDEO_TEACHER, other)
    tok = json.loads((other / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    a, b = list(vocab)[50:52]
    vocab[a], vocab[b] = vocab[b], vocab[a]          # same size, two ids swapped: a different tokenizer
    (other / "tokenizer.json").write_text(json.dumps(tok))
    with pytest.raises(TeacherConfigError, match=r"teacher 'video'.*tokenizer differs from the student's"):
        check_teachers(_recipe([{"name": "image", "path": IMAGE_TEACHER, "labels": ["toy-vl/ground"]},
                                {"name": "video", "path": str(other), "labels": ["toy-vl/video"]}]))


# ---------------------------------------------------------------------------------------------------------------
# A VL teacher's scores with media = the trainer's log-probs of the same model on the same media


@pytest.mark.integration
def test_vl_teacher_scores_with_media_match_the_trainer_on_image_and_video():
    """The image teacher as a vLLM teacher engine and as the trainer's student (same weights): on an image prompt
    and an 8-frame video prompt, the teacher's log-probs of the student's tokens and its top-k equal the
    trainer's (compute_topk with the pixels) at every response position — the response starts after the prompt
    as vLLM expanded it, not at len(prompt ids)."""
    from transformers import AutoTokenizer

    from posttrain.data import encode_prompt
    from posttrain.loops.algorithms import make_algorithm
    from posttrain.trainer.worker import TrainerRank, free_port, trainer_settings
    from posttrain.vl.media import multimodal_prompt
    from teachers.engine import TeacherEngine

    k = 8
    tokenizer = AutoTokenizer.from_pretrained(STUDENT)
    rows = _rows(1)
    image_row, video_row = rows[1], rows[3]                      # count (image) and video
    assert image_row["images"] and video_row["videos"]
    mm = [multimodal_prompt(tokenizer, image_row), multimodal_prompt(tokenizer, video_row), None]
    prompts = [list(mm[0].token_ids), list(mm[1].token_ids),
               encode_prompt(tokenizer, [{"role": "user", "content": "What is 2+3?"}])]
    answers = ["Answer: 3", "Answer: 1.0 to 3.0", "Answer: 5"]
    responses = [tokenizer(a, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id] for a in answers]

    engine = TeacherEngine(IMAGE_TEACHER, teacher_name="image", top_k=k, max_logprobs=k, max_model_len=512)
    teacher = engine.score(prompts, responses, k, mm)
    recipe = _recipe([{"name": "image", "path": IMAGE_TEACHER, "labels": ["x"]}], student=IMAGE_TEACHER, top_k=k)
    rank = TrainerRank(0, 1, trainer_settings(recipe, make_algorithm(recipe).objective()))
    rank.setup("127.0.0.1", free_port())
    student = rank.compute_topk(prompts, responses, k, mm)
    for i, r in enumerate(responses):
        t_ids, t_lp, t_tok = teacher.sequence(i)
        s_ids, s_lp, s_tok = student.sequence(i)
        assert t_ids.shape == (len(r), k)             # one row per response token, no more, no less
        print(f"sequence {i}: mean |teacher - trainer| log-prob {np.abs(t_tok - s_tok).mean():.2e}, "
              f"max {np.abs(t_tok - s_tok).max():.2e}; top-{k} mean {np.abs(t_lp - s_lp).mean():.2e}")
        assert float(np.abs(t_tok - s_tok).mean()) < TOLERANCE, (i, t_tok, s_tok)
        assert float(np.abs(t_lp - s_lp).mean()) < TOLERANCE, i
        assert (t_ids[:, 0] == s_ids[:, 0]).all(), i  # the teacher's best token is the student's
    # The media matter: without them the same ids (one pad per item) score differently.
    blind = engine.score(prompts[:1], responses[:1], k)
    assert float(np.abs(blind.sequence(0)[2] - teacher.sequence(0)[2]).max()) > 10 * TOLERANCE


# ---------------------------------------------------------------------------------------------------------------
# A cross-modal MOPD run: image, video and text teachers; exact resume


def _write_run_recipe(tmp_path, text_teacher: str) -> str:
    rows = _rows(2, "train")                                 # ground, count, ocr, video, ground, count, ocr, video
    text = _text_rows(4)
    mixed = [row for j in range(2) for row in (rows[4 * j:4 * j + 4] + text[2 * j:2 * j + 2])]
    train = tmp_path / "train.jsonl"
    train.write_text("".join(json.dumps(r) + "\n" for r in mixed))    # 6 rows per step: 4 with media, 2 text
    recipe = {
        "name": "vl-mopd-test", "seed": 0, "total_steps": 3, "model": {"path": STUDENT},
        "data": {"train_files": [str(train)], "shuffle": False, "eval_every": 0},
        "rollout": {"prompts_per_step": 6, "n": 2, "max_tokens": 8},
        "rewards": {"functions": [
            {"name": "iou", "kwargs": {"coords": "relative1000"}, "data_sources": ["toy-vl/ground"]},
            {"name": "posttrain.toy.rewards:exact_answer", "data_sources": ["toy-vl/count", "toy/add"]},
            {"name": "posttrain.toy.rewards:exact_string", "data_sources": ["toy-vl/ocr"]},
            {"name": "tiou", "data_sources": ["toy-vl/video"]}], "max_concurrency": 2},
        "trainer": {"optimizer": {"lr": 1e-3}},
        "algorithm": {"type": "mopd", "top_k": 8, "resident_engines": 2, "mini_batches": 1,
                      "teachers": [
                          {"name": "image", "path": IMAGE_TEACHER,
                           "labels": ["toy-vl/ground", "toy-vl/count", "toy-vl/ocr"]},
                          {"name": "video", "path": VIDEO_TEACHER, "labels": ["toy-vl/video"]},
                          {"name": "text", "path": text_teacher, "labels": ["toy/add"]}]},
        "checkpoint": {"every": 1, "keep_last": 3}, "ray": {"num_cpus": 6},
    }
    path = tmp_path / "vl-mopd.yaml"
    path.write_text(json.dumps(recipe))
    return str(path)


def _run(recipe, run_dir):
    return subprocess.run([sys.executable, "-m", "posttrain.cli", "run", recipe, "--run-dir", run_dir, "--no-progress"],
                          cwd=REPO, capture_output=True, text=True, timeout=900, env=dict(os.environ, PYTHONPATH=REPO))


def _steps(run_dir):
    with open(os.path.join(run_dir, "metrics.jsonl")) as f:
        return [r for r in map(json.loads, f) if r["step"] >= 1]


@pytest.mark.integration
@pytest.mark.slow
def test_cross_modal_mopd_run_with_image_video_and_text_teachers_resumes_exactly(tmp_path, text_teacher):
    recipe = _write_run_recipe(tmp_path, text_teacher)
    run_dir = str(tmp_path / "run")
    out = _run(recipe, run_dir)
    assert out.returncode == 0, out.stderr[-4000:]
    steps = _steps(run_dir)
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        for name in ("image", "video", "text"):     # every step routes rows to all three teachers
            assert np.isfinite(r[f"mopd/reverse_kl/{name}"]) and r[f"mopd/token_share/{name}"] > 0, (name, r)
        assert np.isfinite(r["mopd/reverse_kl"]) and np.isfinite(r["loss/loss"])
        assert r["teachers/in_batch"] == 3
        # image and video time-share one VL engine (one swap per step at least); the text teacher has its own
        assert r["teachers/swaps"] >= 1
        assert r["rollout/canary_max_abs_diff"] < TOLERANCE
    # The random text teacher is far from the student; the trained VL teachers are close to it.
    assert steps[0]["mopd/reverse_kl/text"] > steps[0]["mopd/reverse_kl/image"]

    from safetensors.torch import load_file
    reference = load_file(os.path.join(run_dir, "final", "model.safetensors"))
    killed_dir = str(tmp_path / "killed")
    rng = random.Random(int(os.environ.get("POSTTRAIN_TEST_SEED", time.time())))
    killed_at = sigkill_at_random_step(["run", recipe, "--run-dir", killed_dir, "--no-progress"], killed_dir, rng,
                                       [1])      # inside step 2: a 3-step run leaves no room after a later target
    assert killed_at < 3, "the run finished before it could be killed"
    again = _run(recipe, killed_dir)
    assert again.returncode == 0, again.stderr[-4000:]
    assert [r["step"] for r in _steps(killed_dir)] == [1, 2, 3]
    resumed = load_file(os.path.join(killed_dir, "final", "model.safetensors"))
    assert set(resumed) == set(reference)
    for name in reference:
        assert (resumed[name] == reference[name]).all(), f"{name} differs (killed after step {killed_at})"
    for a, b in zip(steps, _steps(killed_dir)):
        assert a["mopd/reverse_kl"] == b["mopd/reverse_kl"]
