"""The `iou` reward: box IoU between the boxes a completion states and the reference boxes.

Boxes are `[x1, y1, x2, y2]` (top-left, bottom-right). Recognised in text as plain lists
`[x1, y1, x2, y2]` / `(x1, y1, x2, y2)` (so also JSON such as `{"bbox_2d": [...]}`) and as point
pairs `(x1,y1),(x2,y2)` (Qwen2-VL's `<|box_start|>(x1,y1),(x2,y2)<|box_end|>`). When the completion
has `<answer>...</answer>` blocks only the last one is read.

Several predicted boxes against several references are matched one-to-one to maximise the total
IoU (Hungarian algorithm); the score is the sum of matched IoUs / max(#predicted, #reference), so
extra or missing boxes cost, and spamming boxes cannot pay.

Coordinate mode (model families differ): `coords="absolute"` means the prediction is in the
reference's own frame; `"relative1000"` (Qwen2-VL / Qwen3-VL: [0, 1000) of the image) and
`"relative1"` (0–1) rescale the prediction to pixels with the image size from `extra_info`
(`image_size: [width, height]`, or `width`/`height`, or `image_width`/`image_height`).
"""
from __future__ import annotations

import math
import re
from typing import Any

MAX_BOXES = 100  # the matching is cubic in the number of boxes; more than this is not an answer
COORD_MODES = {"absolute": None, "relative1000": 1000.0, "relative1": 1.0}

_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_NUM = r"\s*(-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)\s*"
_BOX_RE = re.compile(
    rf"\[{_NUM},{_NUM},{_NUM},{_NUM}\]|\({_NUM},{_NUM},{_NUM},{_NUM}\)"
    rf"|\({_NUM},{_NUM}\)\s*(?:,|-|to|and)?\s*\({_NUM},{_NUM}\)")

Box = tuple[float, float, float, float]


def extract_boxes(text: str) -> list[Box]:
    """All boxes stated in `text` (restricted to its last `<answer>` block if any), in order."""
    tags = _ANSWER_TAG_RE.findall(text)
    region = tags[-1] if tags else text
    boxes = []
    for match in _BOX_RE.finditer(region):
        numbers = [float(group) for group in match.groups() if group is not None]
        boxes.append(tuple(numbers))
    return boxes


def box_is_valid(box: Box) -> bool:
    """Finite coordinates and positive width and height (degenerate or inverted boxes are not)."""
    return all(math.isfinite(v) for v in box) and box[2] > box[0] and box[3] > box[1]


def box_iou(a: Box, b: Box) -> float:
    """Area of intersection / area of union for two valid boxes."""
    width = min(a[2], b[2]) - max(a[0], b[0])
    height = min(a[3], b[3]) - max(a[1], b[1])
    intersection = max(0.0, width) * max(0.0, height)
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - intersection
    return intersection / union if union > 0 else 0.0


def max_weight_matching(weights: list[list[float]]) -> list[tuple[int, int]]:
    """Row→column pairs of a one-to-one matching maximising the total weight (Hungarian algorithm,
    O(n³), rectangular matrices padded with zeros). Weights are non-negative."""
    n_rows = len(weights)
    n_cols = len(weights[0]) if n_rows else 0
    size = max(n_rows, n_cols)
    if size == 0:
        return []
    # Minimise cost = -weight on the padded square matrix (potentials u, v; e-maxx formulation).
    cost = [[-(weights[r][c]) if r < n_rows and c < n_cols else 0.0 for c in range(size)] for r in range(size)]
    u = [0.0] * (size + 1)
    v = [0.0] * (size + 1)
    column_owner = [0] * (size + 1)  # column j (1-based) → row (1-based) matched to it
    way = [0] * (size + 1)
    for row in range(1, size + 1):
        column_owner[0] = row
        current_col = 0
        min_reduced = [math.inf] * (size + 1)
        used = [False] * (size + 1)
        while True:
            used[current_col] = True
            row_at = column_owner[current_col]
            delta, next_col = math.inf, 0
            for col in range(1, size + 1):
                if not used[col]:
                    reduced = cost[row_at - 1][col - 1] - u[row_at] - v[col]
                    if reduced < min_reduced[col]:
                        min_reduced[col], way[col] = reduced, current_col
                    if min_reduced[col] < delta:
                        delta, next_col = min_reduced[col], col
            for col in range(size + 1):
                if used[col]:
                    u[column_owner[col]] += delta
                    v[col] -= delta
                else:
                    min_reduced[col] -= delta
            current_col = next_col
            if column_owner[current_col] == 0:
                break
        while current_col:
            previous = way[current_col]
            column_owner[current_col] = column_owner[previous]
            current_col = previous
    return [(column_owner[col] - 1, col - 1) for col in range(1, size + 1)
            if column_owner[col] - 1 < n_rows and col - 1 < n_cols]


def matched_iou(predicted: list[Box], reference: list[Box]) -> float:
    """Sum of IoUs under the best one-to-one matching / max(#predicted, #reference); invalid
    predicted boxes match nothing but still count in the denominator."""
    if not predicted or not reference:
        return 0.0
    weights = [[box_iou(p, r) if box_is_valid(p) else 0.0 for r in reference] for p in predicted]
    total = sum(weights[row][col] for row, col in max_weight_matching(weights))
    return total / max(len(predicted), len(reference))


def reference_boxes(ground_truth: Any) -> list[Box] | None:
    """Reference boxes from `[x1,y1,x2,y2]`, a list of those, `{"bbox_2d": [...]}` or text."""
    if isinstance(ground_truth, str):
        boxes = extract_boxes(ground_truth)
    else:
        if isinstance(ground_truth, dict):
            ground_truth = ground_truth.get("bbox_2d", ground_truth.get("bbox"))
        if not isinstance(ground_truth, (list, tuple)) or not ground_truth:
            return None
        items = [ground_truth] if not isinstance(ground_truth[0], (list, tuple, dict)) else list(ground_truth)
        boxes = []
        for item in items:
            if isinstance(item, dict):
                item = item.get("bbox_2d", item.get("bbox"))
            if (not isinstance(item, (list, tuple)) or len(item) != 4
                    or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in item)):
                return None
            boxes.append(tuple(float(v) for v in item))
    if not boxes or len(boxes) > MAX_BOXES or not all(box_is_valid(b) for b in boxes):
        return None
    return boxes


def image_size(extra_info: dict | None) -> tuple[float, float] | None:
    """(width, height) from extra_info's `image_size`, `width`/`height` or `image_width`/`image_height`."""
    if not isinstance(extra_info, dict):
        return None
    size = extra_info.get("image_size")
    if isinstance(size, (list, tuple)) and len(size) == 2:
        width, height = size
    else:
        width = extra_info.get("width", extra_info.get("image_width"))
        height = extra_info.get("height", extra_info.get("image_height"))
    try:
        width, height = float(width), float(height)
    except (TypeError, ValueError):
        return None
    if not (math.isfinite(width) and math.isfinite(height) and width > 0 and height > 0):
        return None
    return width, height


def to_reference_frame(boxes: list[Box], coords: str, size: tuple[float, float] | None) -> list[Box]:
    """Rescale predicted boxes from a relative coordinate mode to pixels (no-op for absolute)."""
    scale = COORD_MODES[coords]
    if scale is None:
        return boxes
    width, height = size
    return [(x1 * width / scale, y1 * height / scale, x2 * width / scale, y2 * height / scale)
            for x1, y1, x2, y2 in boxes]


def compute_score(data_source: str | None, solution_str: str, ground_truth: Any, extra_info: dict | None = None,
                  coords: str = "absolute") -> dict:
    """Matched box IoU in [0, 1]. Failure kinds (score 0): bad_input, bad_ground_truth, no_box,
    too_many_boxes, invalid_box (every predicted box degenerate/inverted), missing_image_size."""
    if coords not in COORD_MODES:
        raise ValueError(f"iou: coords={coords!r} is not one of {sorted(COORD_MODES)}; pick the mode "
                         "your model family uses (Qwen2-VL/Qwen3-VL: relative1000, Qwen2.5-VL: absolute)")
    gold = reference_boxes(ground_truth)
    if gold is None:
        return {"score": 0.0, "failure": "bad_ground_truth"}
    if not isinstance(solution_str, str):
        return {"score": 0.0, "failure": "bad_input"}
    predicted = extract_boxes(solution_str)
    if not predicted:
        return {"score": 0.0, "failure": "no_box"}
    if len(predicted) > MAX_BOXES:
        return {"score": 0.0, "num_boxes": len(predicted), "failure": "too_many_boxes"}
    size = image_size(extra_info)
    if COORD_MODES[coords] is not None and size is None:
        return {"score": 0.0, "failure": "missing_image_size"}
    predicted = to_reference_frame(predicted, coords, size)
    if not any(box_is_valid(box) for box in predicted):
        return {"score": 0.0, "num_boxes": len(predicted), "failure": "invalid_box"}
    return {"score": matched_iou(predicted, gold), "num_boxes": len(predicted)}
