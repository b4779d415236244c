"""Format and length rewards, weighted composition, and custom rewards through the contract."""
from __future__ import annotations

import pytest

from rewards import RewardSpecError, bind_reward, call_reward, load_reward
from rewards.compose import compose, compute_score as compose_score
from rewards.fmt import boxed_format_reward, format_reward, length_reward, length_score, tag_problem

GOOD = "<think>2+2 is 4</think>\n<answer>4</answer>"


@pytest.mark.unit
@pytest.mark.parametrize("text, strict, problem", [
    (GOOD, False, None),
    (GOOD, True, None),
    ("Sure! " + GOOD, False, None),
    ("Sure! " + GOOD, True, "text_outside_tags"),
    ("<think>a</think> middle <answer>4</answer>", True, "text_outside_tags"),
    ("<answer>4</answer>", False, "missing_tag:think"),
    ("<think>a</think>", False, "missing_tag:answer"),
    ("<think>a</think><answer>4</answer><answer>5</answer>", False, "duplicate_tag:answer"),
    ("<think>a<answer>4</answer>", False, "unclosed_tag:think"),
    ("<think>a</think></answer>4<answer>", False, "unclosed_tag:answer"),
    ("<think>a</think><answer>  </answer>", False, "empty_tag:answer"),
    ("<answer>4</answer><think>a</think>", False, "wrong_order"),
    ("<think>a<answer>4</answer></think>", False, "wrong_order"),  # nested, not sequential
    ("", False, "missing_tag:think"),
    ("<think>" * 10_000, False, "duplicate_tag:think"),
])
def test_tag_format_rules(text, strict, problem):
    assert tag_problem(text, ["think", "answer"], strict) == problem
    result = format_reward("x", text, None, None, strict=strict)
    assert result["score"] == (1.0 if problem is None else 0.0)
    assert result.get("failure") == problem


@pytest.mark.unit
def test_custom_tags_and_bad_tag_names():
    assert format_reward("x", "<reasoning>r</reasoning><final>1</final>", None, None,
                         tags=["reasoning", "final"])["score"] == 1.0
    with pytest.raises(ValueError, match="tags"):
        format_reward("x", GOOD, None, None, tags=["<think>"])
    assert format_reward("x", None, None)["failure"] == "bad_input"


@pytest.mark.unit
def test_boxed_format():
    assert boxed_format_reward("x", r"so \boxed{\frac{1}{2}}")["score"] == 1.0
    assert boxed_format_reward("x", r"so \boxed{ }")["failure"] == "empty_boxed"
    assert boxed_format_reward("x", r"so \boxed{5")["failure"] == "no_boxed"


@pytest.mark.unit
@pytest.mark.parametrize("length, low, high, margin, expected", [
    (50, 10, 100, 0, 1.0), (10, 10, 100, 0, 1.0), (100, 10, 100, 0, 1.0),
    (101, 10, 100, 0, 0.0), (5, 10, 100, 0, 0.0),
    (150, 10, 100, 100, 0.5), (250, 10, 100, 100, 0.0), (5, 10, 100, 10, 0.5), (500, 0, None, 0, 1.0),
])
def test_length_score(length, low, high, margin, expected):
    assert length_score(length, low, high, margin) == pytest.approx(expected)


@pytest.mark.unit
def test_length_reward_units_and_errors():
    assert length_reward("x", "one two three", max_length=3, unit="words")["score"] == 1.0
    result = length_reward("x", "a" * 20, max_length=10)
    assert result == {"score": 0.0, "length": 20, "failure": "too_long"}
    with pytest.raises(ValueError, match="unit"):
        length_reward("x", "abc", unit="tokens")
    with pytest.raises(ValueError, match="min_length"):
        length_reward("x", "abc", min_length=10, max_length=5)


# --------------------------------------------------------------------------- composition

COMPONENTS = [
    {"name": "accuracy", "reward": "math", "weight": 1.0},
    {"name": "format", "reward": "format", "weight": 0.5},
    {"name": "length", "reward": "length", "weight": 0, "kwargs": {"max_length": 10}},
]


@pytest.mark.unit
def test_weighted_sum_and_every_component_logged():
    reward = compose(COMPONENTS)
    result = reward("math", GOOD, "4")
    assert result["score"] == pytest.approx(1.5)   # the length component (weight 0) only logs
    assert result["accuracy"] == 1.0 and result["format"] == 1.0 and result["length"] == 0.0
    assert result["length/failure"] == "too_long" and result["length/length"] == len(GOOD)
    assert result["accuracy/method"] == "answer_tag"
    assert "failure" not in result  # a weight-0 component's failure is logged, not reported


@pytest.mark.unit
def test_weighted_component_failure_is_reported_and_counted():
    outcome = call_reward(compose(COMPONENTS), "math", "no tags at all\njust text", "4")
    assert outcome.score == 0.0
    assert outcome.failure == "component:accuracy:no_answer"
    assert outcome.details["format/failure"] == "missing_tag:think"


@pytest.mark.unit
def test_components_can_read_their_own_ground_truth():
    reward = compose([{"name": "answer", "reward": "math", "ground_truth_key": "answer"},
                      {"name": "span", "reward": "tiou", "weight": 2.0, "ground_truth_key": "span"}])
    result = reward("x", "<answer>From 2 to 4, so the answer is 7.</answer>", {"answer": "7", "span": [2, 6]})
    assert result["answer"] == 1.0 and result["span"] == pytest.approx(0.5)
    assert result["score"] == pytest.approx(2.0)
    assert reward("x", "1 to 2", "7")["answer/failure"] == "missing_ground_truth_key"


@pytest.mark.unit
@pytest.mark.parametrize("components, message", [
    ([], "non-empty list"),
    ([{"reward": "math", "weight": "high"}], r"components\[0\].weight"),
    ([{"reward": "math"}, {"reward": "math"}], "used twice"),
    ([{"reward": "math", "wieght": 1}], "unknown key"),
    ([{"reward": "no_such_reward"}], "neither a built-in"),
    ([{"reward": "length", "kwargs": {"max_len": 3}}], "no keyword argument"),
])
def test_bad_components_name_the_field(components, message):
    with pytest.raises(RewardSpecError, match=message):
        compose(components)


@pytest.mark.unit
def test_compose_as_a_registered_reward_with_kwargs():
    fn = bind_reward("compose", {"components": COMPONENTS})
    assert call_reward(fn, "math", GOOD, "4").score == pytest.approx(1.5)


# --------------------------------------------------------------------------- custom rewards


@pytest.mark.unit
def test_custom_file_reward_sync_and_async(tmp_path):
    path = tmp_path / "my_reward.py"
    path.write_text(
        "import asyncio\n"
        "def compute_score(data_source, solution_str, ground_truth, extra_info=None, bonus=0.0):\n"
        "    return {'score': float(solution_str == ground_truth) + bonus, 'source': data_source}\n"
        "async def async_score(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    await asyncio.sleep(0)\n"
        "    return len(solution_str)\n"
        "def broken(data_source, solution_str, ground_truth, extra_info=None):\n"
        "    raise KeyError('oops')\n")
    fn = bind_reward(f"{path}:compute_score", {"bonus": 0.5})
    outcome = call_reward(fn, "src", "a", "a", None)
    assert outcome.score == 1.5 and outcome.details == {"source": "src"}
    assert call_reward(load_reward(f"{path}:async_score"), "s", "abcd", None).score == 4.0
    broken = call_reward(load_reward(f"{path}:broken"), "s", "x", None)
    assert broken.score == 0.0 and broken.failure == "exception:KeyError"
    composite = compose([{"name": "mine", "reward": f"{path}:compute_score", "weight": 2}])
    assert composite("s", "a", "a")["score"] == 2.0
