"""What the local judge (rewards.code) and the SandboxFusion client (rewards.sandboxfusion) share:
the tests format, the limits, the comparison rules and the verdict types. Both import it; neither
imports the other at module level (rewards.code loads the SandboxFusion client only when asked to).
"""
from __future__ import annotations

import dataclasses
import json
import math
from typing import Any

DEFAULT_TIME_LIMIT_S = 2.0
DEFAULT_MEMORY_LIMIT_MB = 512
DEFAULT_OUTPUT_LIMIT_MB = 4
MAX_TIME_LIMIT_S = 60.0
MAX_TESTS = 1000
CPP_COMPILE_TIME_S = 30.0
WALL_FACTOR, WALL_SLACK_S = 1.5, 0.5
FAILURE_KINDS = ("no_code", "compile_error", "wrong_answer", "runtime_error", "time_limit",
                 "memory_limit", "output_limit", "bad_input", "sandbox_error")

# ------------------------------------------------------------------ comparison (host side)

def normalise_stdout(text: str) -> list[str]:
    """Lines with trailing whitespace removed, trailing blank lines dropped. Nothing else changes."""
    lines = [line.rstrip() for line in text.split("\n")]
    while lines and lines[-1] == "":
        lines.pop()
    return lines


def stdout_matches(actual: str, expected: str) -> bool:
    return normalise_stdout(actual) == normalise_stdout(expected)


def json_equal(a: Any, b: Any) -> bool:
    """Equality of two JSON values (as json.loads returns them); bool never equals a number."""
    if isinstance(a, bool) or isinstance(b, bool):
        return type(a) is type(b) and a == b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return a == b
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b  # str, None


# ------------------------------------------------------------------ problem description

@dataclasses.dataclass(frozen=True)
class Problem:
    mode: str                      # "stdin" or "call"
    inputs: tuple                  # stdin texts, or JSON texts of argument lists
    outputs: tuple                 # expected stdout texts, or expected JSON values (round-tripped)
    fn_name: str | None = None


class BadInput(ValueError):
    """A malformed test row or limit; becomes a zero score with failure "bad_input"."""


def parse_tests(ground_truth: Any) -> Problem:
    """Validate the tests dict (or its JSON text); raise BadInput naming what is wrong and the fix."""
    if isinstance(ground_truth, (str, bytes)):
        try:
            ground_truth = json.loads(ground_truth)
        except (ValueError, RecursionError) as err:
            raise BadInput(f"ground_truth is not valid JSON ({err}); give the tests dict") from None
    if not isinstance(ground_truth, dict):
        raise BadInput(f"ground_truth must be a dict with 'inputs' and 'outputs', got {type(ground_truth).__name__}")
    inputs, outputs = ground_truth.get("inputs"), ground_truth.get("outputs")
    if not isinstance(inputs, list) or not isinstance(outputs, list):
        raise BadInput("ground_truth needs lists 'inputs' and 'outputs'")
    if len(inputs) != len(outputs) or not inputs:
        raise BadInput(f"ground_truth has {len(inputs)} inputs and {len(outputs)} outputs; "
                       "they must be equal in number and at least 1")
    if len(inputs) > MAX_TESTS:
        raise BadInput(f"ground_truth has {len(inputs)} tests; at most {MAX_TESTS} are judged")
    fn_name = ground_truth.get("fn_name")
    if fn_name:
        if not isinstance(fn_name, str) or not fn_name.isidentifier():
            raise BadInput(f"fn_name {fn_name!r} is not a Python identifier")
        if not all(isinstance(args, list) for args in inputs):
            raise BadInput("function-call tests need each input to be a list of arguments, e.g. [[1, 2]]")
        try:
            args_texts = tuple(json.dumps(args) for args in inputs)
            expected = tuple(json.loads(json.dumps(out)) for out in outputs)
        except (TypeError, ValueError) as err:
            raise BadInput(f"function-call test values must be JSON values: {err}") from None
        return Problem("call", args_texts, expected, fn_name)
    if not all(isinstance(x, str) for x in inputs) or not all(isinstance(x, str) for x in outputs):
        raise BadInput("stdin/stdout tests need string inputs and outputs (or give 'fn_name' for "
                       "function-call tests)")
    return Problem("stdin", tuple(inputs), tuple(outputs))


@dataclasses.dataclass(frozen=True)
class JudgeLimits:
    time_limit_s: float = DEFAULT_TIME_LIMIT_S
    memory_limit_mb: int = DEFAULT_MEMORY_LIMIT_MB
    output_limit_mb: float = DEFAULT_OUTPUT_LIMIT_MB
    nproc: int = 32
    file_size_mb: int = 16

    @property
    def test_wall_s(self) -> float:
        return self.time_limit_s * WALL_FACTOR + WALL_SLACK_S

    @property
    def output_bytes(self) -> int:
        return int(self.output_limit_mb * (1 << 20))


def limits_from_extra_info(extra_info: Any) -> JudgeLimits:
    extra_info = extra_info if isinstance(extra_info, dict) else {}
    values = {}
    for key, default, low, high in (("time_limit_s", DEFAULT_TIME_LIMIT_S, 0.05, MAX_TIME_LIMIT_S),
                                    ("memory_limit_mb", DEFAULT_MEMORY_LIMIT_MB, 32, 16384),
                                    ("output_limit_mb", DEFAULT_OUTPUT_LIMIT_MB, 0.001, 256)):
        value = extra_info.get(key, default)
        if value is None:
            value = default
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise BadInput(f"extra_info.{key} must be a number, got {value!r}")
        if not low <= value <= high:
            raise BadInput(f"extra_info.{key}={value} is outside [{low}, {high}]")
        values[key] = value
    values["memory_limit_mb"] = int(values["memory_limit_mb"])
    return JudgeLimits(**values)


# ------------------------------------------------------------------ verdicts

@dataclasses.dataclass
class TestVerdict:
    index: int
    passed: bool
    kind: str | None               # None when passed, else one of FAILURE_KINDS
    detail: str = ""
    cpu_s: float = 0.0
    wall_s: float = 0.0


@dataclasses.dataclass
class JudgeResult:
    total: int
    verdicts: list[TestVerdict]
    failure: str | None = None     # kind of the first failure
    detail: str = ""

    @property
    def passed(self) -> int:
        return sum(v.passed for v in self.verdicts)

    @property
    def score(self) -> float:
        return 1.0 if self.failure is None and self.passed == self.total else 0.0

    def as_reward(self) -> dict:
        out = {"score": self.score, "passed": self.passed, "total": self.total}
        if self.score == 0.0:
            out["failure"] = self.failure or "wrong_answer"
            if self.detail:
                out["failure_detail"] = self.detail[:300]
        return out
