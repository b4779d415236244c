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


_QUOTED = re.compile(r'Answer:\s*"([^"\n]*)"\s*$')


def exact_string(data_source, solution_str, ground_truth, extra_info=None):
    """1.0 when the response ends with `Answer: "TEXT"` and TEXT equals the ground truth exactly (OCR-style)."""
    match = _QUOTED.search(solution_str.strip())
    if match is None:
        return {"score": 0.0, "failure": "no_answer"}
    return {"score": float(match.group(1) == str(ground_truth))}


_TOOL_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)


def tool_call_match(data_source, solution_str, ground_truth, extra_info=None):
    """Tool use: 1.0 when the last <tool_call> block is JSON with the expected name and arguments; 0.5 when only
    the tool name is right (so RL sees partial progress); 0.0 otherwise. ground_truth: the expected call as a
    JSON string {"name": ..., "arguments": {...}}."""
    import json

    expected = json.loads(ground_truth) if isinstance(ground_truth, str) else ground_truth
    calls = _TOOL_CALL.findall(solution_str)
    if not calls:
        return {"score": 0.0, "failure": "no_tool_call"}
    try:
        call = json.loads(calls[-1])
    except json.JSONDecodeError:
        return {"score": 0.0, "failure": "bad_json"}
    if not isinstance(call, dict) or call.get("name") != expected["name"]:
        return {"score": 0.0, "failure": "wrong_tool"}
    return {"score": 1.0 if call.get("arguments") == expected["arguments"] else 0.5}
