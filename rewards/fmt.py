"""Format rewards: required tags present and well formed, a boxed final answer, length bounds.

Each is a plain verl-signature function scoring 1.0 (conforms) or 0.0 with a failure kind that
names the broken rule; `length_reward` can also fall off linearly outside its bounds.
"""
from __future__ import annotations

import re
from typing import Any, Sequence

from rewards.matheq import last_boxed

_TAG_NAME_RE = re.compile(r"^[A-Za-z][\w\-]*$")


def _check_tag_names(tags: Sequence[str]) -> list[str]:
    if isinstance(tags, str):
        tags = [tags]
    tags = list(tags)
    bad = [tag for tag in tags if not isinstance(tag, str) or not _TAG_NAME_RE.match(tag)]
    if not tags or bad:
        raise ValueError(f"format: tags={tags!r} must be a non-empty list of tag names such as "
                         f"['think', 'answer'] (without angle brackets); bad: {bad}")
    return tags


def tag_problem(text: str, tags: Sequence[str], strict: bool = False) -> str | None:
    """Why `text` breaks the tag format, or None when it conforms.

    Conforming: every tag occurs exactly once as `<tag>...</tag>` with non-blank content, the tags
    appear in the given order without overlapping, and (strict) nothing but whitespace lies outside
    them. Problems: missing_tag:T, duplicate_tag:T, unclosed_tag:T, empty_tag:T, wrong_order,
    text_outside_tags.
    """
    spans = []
    for tag in tags:
        opens = [m.start() for m in re.finditer(rf"<{re.escape(tag)}>", text)]
        closes = [m.start() for m in re.finditer(rf"</{re.escape(tag)}>", text)]
        if not opens and not closes:
            return f"missing_tag:{tag}"
        if len(opens) > 1 or len(closes) > 1:
            return f"duplicate_tag:{tag}"
        if len(opens) != len(closes) or closes[0] < opens[0]:
            return f"unclosed_tag:{tag}"
        content_start = opens[0] + len(tag) + 2
        if not text[content_start:closes[0]].strip():
            return f"empty_tag:{tag}"
        spans.append((opens[0], closes[0] + len(tag) + 3))
    for (_, previous_end), (next_start, _) in zip(spans, spans[1:]):
        if next_start < previous_end:
            return "wrong_order"
    if strict:
        outside = text[:spans[0][0]] + "".join(text[a[1]:b[0]] for a, b in zip(spans, spans[1:])) + text[spans[-1][1]:]
        if outside.strip():
            return "text_outside_tags"
    return None


def format_reward(data_source: str | None, solution_str: str, ground_truth: Any = None,
                  extra_info: dict | None = None, tags: Sequence[str] = ("think", "answer"),
                  strict: bool = False) -> dict:
    """1.0 when every tag in `tags` appears once, well formed, non-empty and in order (and, with
    `strict`, nothing else but whitespace); else 0.0 with the broken rule as failure."""
    tags = _check_tag_names(tags)
    if not isinstance(solution_str, str):
        return {"score": 0.0, "failure": "bad_input"}
    problem = tag_problem(solution_str, tags, strict)
    if problem is not None:
        return {"score": 0.0, "failure": problem}
    return {"score": 1.0}


def boxed_format_reward(data_source: str | None, solution_str: str, ground_truth: Any = None,
                        extra_info: dict | None = None) -> dict:
    """1.0 when the completion ends its reasoning with a well-formed, non-empty `\\boxed{...}`."""
    if not isinstance(solution_str, str):
        return {"score": 0.0, "failure": "bad_input"}
    boxed = last_boxed(solution_str)
    if boxed is None:
        return {"score": 0.0, "failure": "no_boxed"}
    if not boxed.strip():
        return {"score": 0.0, "failure": "empty_boxed"}
    return {"score": 1.0}


def length_score(length: int, min_length: int, max_length: int | None, soft_margin: int) -> float:
    """1 inside [min_length, max_length]; outside, 0 — or, with soft_margin > 0, falling linearly
    from 1 at the bound to 0 at `soft_margin` units past it."""
    if length < min_length:
        distance = min_length - length
    elif max_length is not None and length > max_length:
        distance = length - max_length
    else:
        return 1.0
    if soft_margin <= 0:
        return 0.0
    return max(0.0, 1.0 - distance / soft_margin)


def length_reward(data_source: str | None, solution_str: str, ground_truth: Any = None,
                  extra_info: dict | None = None, min_length: int = 0, max_length: int | None = None,
                  unit: str = "chars", soft_margin: int = 0) -> dict:
    """Score the completion's length (`unit`: "chars" or whitespace-separated "words") against
    [min_length, max_length]; see `length_score`."""
    if unit not in ("chars", "words"):
        raise ValueError(f"length: unit={unit!r} must be 'chars' or 'words'")
    if min_length < 0 or (max_length is not None and max_length < min_length) or soft_margin < 0:
        raise ValueError(f"length: need 0 <= min_length <= max_length and soft_margin >= 0, got "
                         f"min_length={min_length}, max_length={max_length}, soft_margin={soft_margin}")
    if not isinstance(solution_str, str):
        return {"score": 0.0, "failure": "bad_input"}
    length = len(solution_str) if unit == "chars" else len(solution_str.split())
    score = length_score(length, min_length, max_length, soft_margin)
    result: dict[str, Any] = {"score": score, "length": length}
    if score == 0.0:
        result["failure"] = "too_short" if length < min_length else "too_long"
    return result
