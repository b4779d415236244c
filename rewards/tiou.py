"""The `tiou` reward: temporal IoU between the span a completion states and the reference span.

Reads the prediction from the last `<answer>...</answer>` block when the completion has one (text
outside it is ignored), else from the whole completion. Spans are recognised as
`start: 12.5, end: 20` (also `"start_time": ...`), or the last `A - B`, `A to B`, `[A, B]`,
`from A until B`, where each time is seconds (`12.5`, `12.5s`, `3 sec`), `mm:ss`, `h:mm:ss`,
or carries a unit (`1.5 min`, `2 h`). Separators are whole words or punctuation between two times,
so `tomato` (or any text without two times) never reads as a span.
"""
from __future__ import annotations

import math
import re
from typing import Any

_ANSWER_TAG_RE = re.compile(r"<answer>(.*?)</answer>", re.IGNORECASE | re.DOTALL)
_UNIT = r"(?:hours?|hrs?|h|minutes?|mins?|m|seconds?|secs?|s)"
_TIME = rf"-?\d+(?::\d+){{0,2}}(?:\.\d+)?(?:\s*{_UNIT}\b)?"
_SEPARATOR = r"(?:-|–|—|~|,|\bto\b|\buntil\b|\btill\b|\bthrough\b|\band\b)"
_SPAN_RE = re.compile(rf"(?<![\w.:])(?P<start>{_TIME})\s*{_SEPARATOR}\s*(?P<end>{_TIME})(?![\w:])", re.IGNORECASE)
_KEYED_RE = re.compile(
    rf"start(?:[ _]?time)?[\"']?\s*[:=]\s*[\"']?(?P<start>{_TIME})"
    rf"[^\d\-]{{0,40}}?end(?:[ _]?time)?[\"']?\s*[:=]\s*[\"']?(?P<end>{_TIME})(?![\w:])",
    re.IGNORECASE)
_TOKEN_RE = re.compile(rf"^(-?)(\d+(?::\d+){{0,2}}(?:\.\d+)?)\s*({_UNIT})?$", re.IGNORECASE)
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0}


def parse_time(token: str) -> float | None:
    """Seconds for `12.5`, `12.5s`, `1:05`, `01:02:03.5`, `1.5 min`; negative values are returned
    as such (the caller rejects them); None for malformed clocks such as `1:75`."""
    match = _TOKEN_RE.match(token.strip())
    if not match:
        return None
    sign, clock, unit = match.groups()
    parts = clock.split(":")
    if any(float(part) >= 60 for part in parts[1:]):
        return None  # `1:75` is not a time
    seconds = 0.0
    for part in parts:
        seconds = seconds * 60 + float(part)
    if unit and len(parts) == 1:
        seconds *= _UNIT_SECONDS[unit[0].lower()]
    return -seconds if sign else seconds


def extract_span(completion: str) -> tuple[float, float] | None:
    """(start, end) in seconds as the completion states them (not yet validated), or None."""
    tags = _ANSWER_TAG_RE.findall(completion)
    region = tags[-1] if tags else completion
    match = None
    for match in _KEYED_RE.finditer(region):
        pass
    if match is None:
        for match in _SPAN_RE.finditer(region):
            pass
    if match is None:
        return None
    start, end = parse_time(match.group("start")), parse_time(match.group("end"))
    if start is None or end is None:
        return None
    return start, end


def span_problem(span: tuple[float, float]) -> str | None:
    """Why a span is unusable (non-finite, negative, end not after start), or None if valid."""
    start, end = span
    if not (math.isfinite(start) and math.isfinite(end)):
        return "non_finite"
    if start < 0 or end < 0:
        return "negative"
    if end <= start:
        return "end_not_after_start"
    return None


def temporal_iou(pred: tuple[float, float], gold: tuple[float, float]) -> float:
    """|pred ∩ gold| / |pred ∪ gold| for valid spans (end > start)."""
    intersection = max(0.0, min(pred[1], gold[1]) - max(pred[0], gold[0]))
    union = (pred[1] - pred[0]) + (gold[1] - gold[0]) - intersection
    return intersection / union if union > 0 else 0.0


def reference_span(ground_truth: Any) -> tuple[float, float] | None:
    """The reference as (start, end) from `[s, e]`, `{"start": s, "end": e}` or a string; None if unusable."""
    if isinstance(ground_truth, dict):
        ground_truth = [ground_truth.get("start"), ground_truth.get("end")]
    if isinstance(ground_truth, str):
        span = extract_span(ground_truth)
    elif isinstance(ground_truth, (list, tuple)) and len(ground_truth) == 2:
        if not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in ground_truth):
            return None
        span = (float(ground_truth[0]), float(ground_truth[1]))
    else:
        return None
    if span is None or span_problem(span) is not None:
        return None
    return span


def compute_score(data_source: str | None, solution_str: str, ground_truth: Any,
                  extra_info: dict | None = None) -> dict:
    """tIoU in [0, 1]. Failure kinds (score 0): bad_input, bad_ground_truth, no_span,
    invalid_span:{non_finite|negative|end_not_after_start}."""
    gold = reference_span(ground_truth)
    if gold is None:
        return {"score": 0.0, "failure": "bad_ground_truth"}
    if not isinstance(solution_str, str):
        return {"score": 0.0, "failure": "bad_input"}
    span = extract_span(solution_str)
    if span is None:
        return {"score": 0.0, "failure": "no_span"}
    problem = span_problem(span)
    if problem is not None:
        return {"score": 0.0, "pred_span": list(span), "failure": f"invalid_span:{problem}"}
    return {"score": temporal_iou(span, gold), "pred_span": list(span)}
