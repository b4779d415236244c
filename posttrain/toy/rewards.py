"""Rewards of the toy arithmetic-style domains (verl signature)."""
from __future__ import annotations

import re

_ANSWER = re.compile(r"Answer:\s*(-?\d+)\s*$")


def exact_answer(data_source, solution_str, ground_truth, extra_info=None):
    """1.0 when the response ends with `Answer: N` and N equals the integer ground truth, else 0.0.

    Only the final `Answer:` line counts (no last-number fallback, which would be hackable)."""
    match = _ANSWER.search(solution_str.strip())
    if match is None:
        return {"score": 0.0, "failure": "no_answer"}
    return {"score": float(match.group(1) == str(ground_truth).strip())}
