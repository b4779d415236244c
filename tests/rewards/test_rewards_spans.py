"""The `tiou` and `iou` rewards: parsing tables, invalid spans/boxes, matching, coordinate modes."""
from __future__ import annotations

import itertools
import random

import pytest

from rewards import call_reward, load_reward
from rewards.iou import box_iou, compute_score as iou_score, extract_boxes, matched_iou, max_weight_matching
from rewards.tiou import compute_score as tiou_score, extract_span, parse_time, temporal_iou

# --------------------------------------------------------------------------- tIoU


@pytest.mark.unit
@pytest.mark.parametrize("token, seconds", [
    ("12", 12.0), ("12.5", 12.5), ("12.5s", 12.5), ("3 sec", 3.0), ("1:05", 65.0), ("01:02:03.5", 3723.5),
    ("1.5 min", 90.0), ("2 hours", 7200.0), ("-3", -3.0), ("1:75", None), ("abc", None),
])
def test_parse_time(token, seconds):
    assert parse_time(token) == seconds


@pytest.mark.unit
@pytest.mark.parametrize("text, span", [
    ("The event happens at 12.5 - 20.0 seconds.", (12.5, 20.0)),
    ("from 3 to 7", (3.0, 7.0)),
    ("[4.2, 9]", (4.2, 9.0)),
    ("between 1:05 and 1:30", (65.0, 90.0)),
    ("0:01:00 - 0:01:30", (60.0, 90.0)),
    ("start: 2.5, end: 8", (2.5, 8.0)),
    ('{"start_time": 1, "end_time": 4}', (1.0, 4.0)),
    ("12s–15s", (12.0, 15.0)),
    ("first guess 1 - 2, final 5 to 9", (5.0, 9.0)),  # the last span stated
    ("<answer>3 - 4</answer> later I said 10 - 20", (3.0, 4.0)),  # the answer tag wins
    ("<answer>1-2</answer><answer>6 to 8</answer>", (6.0, 8.0)),  # the last answer tag
])
def test_extract_span(text, span):
    assert extract_span(text) == span


@pytest.mark.unit
@pytest.mark.parametrize("text", ["tomato", "I like tomatoes and potatoes", "at 5 seconds", "", "to - to",
                                  "\x00\xff" * 500, "5 tomatoes 10"])
def test_text_without_a_span_never_parses(text):
    assert extract_span(text) is None


@pytest.mark.unit
@pytest.mark.parametrize("completion, gold, expected", [
    ("2 - 8", [2, 8], 1.0),
    ("0 - 10", [5, 15], 5 / 15),
    ("0 to 4", [6, 9], 0.0),
    ("[1:00, 1:30]", [60, 90], 1.0),
    ("<answer>start: 3, end: 6</answer>", [0, 6], 0.5),
    ("4 - 8", "[4, 8]", 1.0),
    ("4 - 8", {"start": 4, "end": 8}, 1.0),
])
def test_tiou_values(completion, gold, expected):
    assert tiou_score("video", completion, gold)["score"] == pytest.approx(expected)


@pytest.mark.unit
@pytest.mark.parametrize("completion, gold, failure", [
    ("8 - 2", [2, 8], "invalid_span:end_not_after_start"),
    ("5 - 5", [2, 8], "invalid_span:end_not_after_start"),
    ("[-3, 5]", [2, 8], "invalid_span:negative"),
    ("tomato", [2, 8], "no_span"),
    ("x" * 50_000, [2, 8], "no_span"),
    (None, [2, 8], "bad_input"),
    ("2 - 8", [8, 2], "bad_ground_truth"),
    ("2 - 8", [float("nan"), 3], "bad_ground_truth"),
    ("2 - 8", "tomato", "bad_ground_truth"),
    ("2 - 8", [1, 2, 3], "bad_ground_truth"),
    ("2 - 8", None, "bad_ground_truth"),
])
def test_tiou_invalid_inputs(completion, gold, failure):
    result = tiou_score("video", completion, gold)
    assert result["score"] == 0.0 and result["failure"] == failure


@pytest.mark.unit
def test_temporal_iou_is_symmetric_and_bounded():
    rng = random.Random(0)
    for _ in range(200):
        a = sorted(rng.uniform(0, 100) for _ in range(2))
        b = sorted(rng.uniform(0, 100) for _ in range(2))
        value = temporal_iou(tuple(a), tuple(b))
        assert 0.0 <= value <= 1.0
        assert value == pytest.approx(temporal_iou(tuple(b), tuple(a)))


# --------------------------------------------------------------------------- box IoU


@pytest.mark.unit
@pytest.mark.parametrize("text, boxes", [
    ("[10, 20, 30, 40]", [(10, 20, 30, 40)]),
    ('{"bbox_2d": [1.5, 2, 3, 4.5], "label": "cat"}', [(1.5, 2, 3, 4.5)]),
    ("<|box_start|>(10,20),(30,40)<|box_end|>", [(10, 20, 30, 40)]),
    ("(1, 2) to (3, 4)", [(1, 2, 3, 4)]),
    ('[{"bbox_2d": [0,0,10,10]}, {"bbox_2d": [20,20,30,30]}]', [(0, 0, 10, 10), (20, 20, 30, 30)]),
    ("(5, 6, 7, 8)", [(5, 6, 7, 8)]),
    ("<answer>[1,1,2,2]</answer> ... [0,0,9,9]", [(1, 1, 2, 2)]),
    ("<answer>[1,1,2,2]</answer><answer>[3,3,4,4]</answer>", [(3, 3, 4, 4)]),
    ("no box, just [1, 2, 3] and (4, 5)", []),
])
def test_extract_boxes(text, boxes):
    assert extract_boxes(text) == [tuple(float(v) for v in box) for box in boxes]


@pytest.mark.unit
def test_box_iou_values():
    assert box_iou((0, 0, 10, 10), (0, 0, 10, 10)) == 1.0
    assert box_iou((0, 0, 10, 10), (5, 0, 15, 10)) == pytest.approx(50 / 150)
    assert box_iou((0, 0, 1, 1), (2, 2, 3, 3)) == 0.0


def best_total_by_brute_force(weights):
    n_rows, n_cols = len(weights), len(weights[0])
    if n_rows <= n_cols:
        return max(sum(weights[r][c] for r, c in enumerate(cols))
                   for cols in itertools.permutations(range(n_cols), n_rows))
    return max(sum(weights[r][c] for c, r in enumerate(rows))
               for rows in itertools.permutations(range(n_rows), n_cols))


@pytest.mark.unit
def test_hungarian_matches_brute_force():
    rng = random.Random(1)
    for n_rows, n_cols in [(1, 1), (2, 3), (3, 2), (4, 4), (5, 3)]:
        for _ in range(20):
            weights = [[rng.random() for _ in range(n_cols)] for _ in range(n_rows)]
            matching = max_weight_matching(weights)
            assert len({r for r, _ in matching}) == len(matching) == min(n_rows, n_cols)
            assert len({c for _, c in matching}) == len(matching)
            total = sum(weights[r][c] for r, c in matching)
            assert total == pytest.approx(best_total_by_brute_force(weights))


@pytest.mark.unit
def test_several_boxes_are_matched_one_to_one():
    reference = [(0, 0, 10, 10), (20, 20, 30, 30)]
    # Order does not matter.
    assert matched_iou([(20, 20, 30, 30), (0, 0, 10, 10)], reference) == 1.0
    # Repeating one correct box cannot collect the other's credit.
    assert matched_iou([(0, 0, 10, 10), (0, 0, 10, 10)], reference) == pytest.approx(0.5)
    # Extra boxes dilute: divided by max(#predicted, #reference).
    assert matched_iou([(0, 0, 10, 10), (20, 20, 30, 30), (50, 50, 60, 60), (70, 70, 80, 80)],
                       reference) == pytest.approx(0.5)
    # A missing box costs.
    assert matched_iou([(0, 0, 10, 10)], reference) == pytest.approx(0.5)


@pytest.mark.unit
@pytest.mark.parametrize("completion, gold, kwargs, extra, expected", [
    ("[0, 0, 10, 10]", [0, 0, 10, 10], {}, None, 1.0),
    ("[0, 0, 10, 10]", [[0, 0, 10, 10]], {}, None, 1.0),
    ("[0, 0, 10, 10]", {"bbox_2d": [0, 0, 10, 10]}, {}, None, 1.0),
    ("[0, 0, 10, 10]", "[0, 0, 10, 20]", {}, None, 0.5),
    # relative [0, 1000) of a 200×100 image → pixels
    ("[0, 0, 500, 500]", [0, 0, 100, 50], {"coords": "relative1000"}, {"image_size": [200, 100]}, 1.0),
    ("[0, 0, 0.5, 0.5]", [0, 0, 100, 50], {"coords": "relative1"}, {"width": 200, "height": 100}, 1.0),
    ("[0, 0, 500, 500]", [0, 0, 100, 50], {"coords": "absolute"}, {"image_size": [200, 100]}, 100 * 50 / 500 ** 2),
])
def test_iou_values(completion, gold, kwargs, extra, expected):
    assert iou_score("grounding", completion, gold, extra, **kwargs)["score"] == pytest.approx(expected)


@pytest.mark.unit
@pytest.mark.parametrize("completion, gold, kwargs, extra, failure", [
    ("[10, 10, 10, 20]", [0, 0, 10, 10], {}, None, "invalid_box"),   # zero width
    ("[10, 10, 0, 0]", [0, 0, 10, 10], {}, None, "invalid_box"),     # inverted
    ("there is a cat", [0, 0, 10, 10], {}, None, "no_box"),
    ("[0,0,1,1]" * 101, [0, 0, 10, 10], {}, None, "too_many_boxes"),
    ("[0, 0, 500, 500]", [0, 0, 10, 10], {"coords": "relative1000"}, None, "missing_image_size"),
    ("[0, 0, 500, 500]", [0, 0, 10, 10], {"coords": "relative1000"}, {"image_size": [0, 5]}, "missing_image_size"),
    ("[0, 0, 10, 10]", [5, 5, 1, 1], {}, None, "bad_ground_truth"),
    ("[0, 0, 10, 10]", "no box", {}, None, "bad_ground_truth"),
    ("[0, 0, 10, 10]", [0, 0, 10], {}, None, "bad_ground_truth"),
    ("[0, 0, 10, 10]", None, {}, None, "bad_ground_truth"),
    (None, [0, 0, 10, 10], {}, None, "bad_input"),
])
def test_iou_invalid_inputs(completion, gold, kwargs, extra, failure):
    result = iou_score("grounding", completion, gold, extra, **kwargs)
    assert result["score"] == 0.0 and result["failure"] == failure


@pytest.mark.unit
def test_one_bad_box_among_good_ones_only_costs_its_share():
    result = iou_score("g", "[0,0,10,10] [30,30,20,20]", [[0, 0, 10, 10]])
    assert result["score"] == pytest.approx(0.5) and "failure" not in result


@pytest.mark.unit
def test_unknown_coordinate_mode_is_a_clear_error():
    outcome = call_reward(lambda *a: iou_score(*a, coords="pixels"), "g", "[0,0,1,1]", [0, 0, 1, 1])
    assert outcome.score == 0.0 and outcome.failure == "exception:ValueError"
    assert "relative1000" in outcome.details["error"]


@pytest.mark.unit
def test_long_hostile_completions_are_fast_and_zero():
    for text in ["[" * 50_000, "(1," * 20_000, "1 - " * 20_000 + "tomato"]:
        assert iou_score("g", text, [0, 0, 1, 1])["score"] == 0.0
    assert tiou_score("v", "[" * 50_000, [0, 1])["score"] == 0.0


@pytest.mark.unit
def test_registered_builtins():
    assert call_reward(load_reward("iou"), "g", "[0,0,2,2]", [0, 0, 2, 2]).score == 1.0
    assert call_reward(load_reward("tiou"), "v", "1 to 3", [1, 3]).score == 1.0
