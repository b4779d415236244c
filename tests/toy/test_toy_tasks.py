"""The toy domains' bad habits: what the supervised warm-up demonstrates wrongly, for RL teachers to fix."""
import json

import pytest

from posttrain.toy.build import teach_bad_habits
from posttrain.toy.tasks import DOMAINS, make_rows

ALL = sorted(DOMAINS)

pytestmark = pytest.mark.unit


def test_every_domain_has_a_habit_and_it_is_wrong():
    rows = make_rows(ALL, 13 * 200, 0, "sft", with_habits=True)
    for d in ALL:
        mine = [r for r in rows if r["data_source"] == f"toy/{d}"]
        with_habit = [r for r in mine if r["extra_info"]["habit"] is not None]
        assert with_habit, f"toy/{d} has no bad habit"
        same = [r for r in with_habit if r["extra_info"]["habit"] == r["extra_info"]["answer"]]
        # The only coincidences: an event starting at 0 s (its end is its duration), a box at the origin.
        assert all(r["extra_info"]["answer"].startswith(("Answer: 0 to", "Answer: [0, 0,")) for r in same), same
        assert len(same) < 0.05 * len(with_habit), d


@pytest.mark.parametrize("question,answer,habit", [
    ("What is 47+8?", "Answer: 55", "Answer: 45"),
    ("What is 77-29?", "Answer: 48", "Answer: 58"),
    ("What is 3*16?", "Answer: 48", "Answer: 38"),
])
def test_arithmetic_habits_by_hand(question, answer, habit):
    rows = [r for r in make_rows(["add", "sub", "mul"], 3000, 0, "sft", with_habits=True)
            if r["prompt"][0]["content"] == question]
    assert rows, question
    assert rows[0]["extra_info"]["answer"] == answer and rows[0]["extra_info"]["habit"] == habit


def test_habit_rate_changes_only_demonstrations():
    rows = make_rows(ALL, 2600, 0, "sft", with_habits=True)
    taught = teach_bad_habits(rows, 0.6, seed=0)
    applicable = [i for i, r in enumerate(rows) if r["extra_info"]["habit"] is not None]
    changed = [i for i in applicable if taught[i]["extra_info"]["answer"] == rows[i]["extra_info"]["habit"]]
    assert 0.5 < len(changed) / len(applicable) < 0.7
    for a, b in zip(rows, taught):
        assert a["reward_model"] == b["reward_model"] and a["prompt"] == b["prompt"]   # ground truth stays right
        if a["extra_info"]["habit"] is None:
            assert a == b
    assert teach_bad_habits(rows, 0.0, seed=0) == rows


def test_habits_never_reach_data_files():
    # Recipes' data carry no habit field: it exists only for the warm-up.
    rows = make_rows(["box"], 4, 0, "train")
    assert "habit" not in rows[0]["extra_info"]
    assert "habit" not in json.loads(open("recipes/data/box/train.jsonl").readline())["extra_info"]


@pytest.mark.parametrize("source", ["trained here", "toy-base", "toy-base-13"])
def test_structural_tags_survive_detokenisation(source):
    # vLLM detokenises with skip_special_tokens=True: a tag marked special never reaches the reward
    # ("<think>26+26</think><answer>52</answer>" would arrive as "26+2652" and the think domain would score 0).
    from transformers import AutoTokenizer

    from posttrain.toy.build import corpus_for_tokenizer, train_tokenizer
    tok = (train_tokenizer(corpus_for_tokenizer(n=300)) if source == "trained here"
           else AutoTokenizer.from_pretrained(f"posttrain/toy/assets/{source}"))
    text = '<think>26+26</think><answer>52</answer><tool_call>{"name": "time"}</tool_call>'
    ids = tok(text + "<|im_end|>", add_special_tokens=False)["input_ids"]
    assert tok.convert_tokens_to_ids("<think>") in ids                 # still one token each
    assert tok.decode(ids, skip_special_tokens=True) == text            # the tags stay, the end-of-turn goes
