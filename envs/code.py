"""`code`: multi-turn coding with the online judge's feedback: submit, read the failing test, fix.

`submit(code)` runs the program against the row's tests (reward_model.ground_truth, the `code` reward's format)
with `rewards.code.judge` in the sandbox. All tests pass: the episode ends with reward 1. Otherwise the model
reads the first failing test (input, expected output, what went wrong) and may submit again, up to
`max_submissions`; a turn without a call ends the episode with the last submission's score.
"""
from __future__ import annotations

import json

from envs.base import ToolEnv
from envs.tools import ToolError, tool


class CodeEnv(ToolEnv):
    def __init__(self, row: dict, *, max_submissions: int = 3, language: str = "python", allow_unsafe: bool = False,
                 **kwargs):
        """allow_unsafe: judge without bubblewrap where it cannot run (as the `code` reward's kwarg)."""
        super().__init__(row, **kwargs)
        from rewards.code import BadInput, limits_from_extra_info, parse_tests
        try:
            self.problem = parse_tests(row["reward_model"]["ground_truth"])
            self.limits = limits_from_extra_info(row.get("extra_info"))
        except BadInput as err:
            raise ValueError(f"code env: row's tests are malformed: {err}") from err
        self.language, self.max_submissions, self.submissions, self.last_score = language, max_submissions, 0, 0.0
        self.allow_unsafe = allow_unsafe

    @tool
    def submit(self, code: str) -> str:
        """Run a program against the hidden tests; returns the first failing test or success.

        Args:
            code: the complete program
        """
        from rewards.code import judge
        from rewards.sandbox import default_sandbox
        if self.submissions >= self.max_submissions:
            raise ToolError("after_end", f"no submissions left (at most {self.max_submissions})")
        self.submissions += 1
        result = judge(code, self.problem, self.limits, language=self.language,
                       sandbox=default_sandbox(self.allow_unsafe))
        self.last_score = result.score
        if result.score == 1.0:
            self.finish(1.0)
            return f"All {result.total} tests passed."
        failed = next((v for v in result.verdicts if not v.passed), None)
        if failed is None:   # the judge itself failed (compile error before any test, sandbox error)
            return f"Failed: {result.failure}: {result.detail[:300]}"
        shown_input = (f"{self.problem.fn_name}({', '.join(map(json.dumps, json.loads(self.problem.inputs[failed.index])))})"
                       if self.problem.mode == "call" else repr(self.problem.inputs[failed.index]))
        expected = self.problem.outputs[failed.index]
        left = self.max_submissions - self.submissions
        return (f"Failed {failed.kind} on {shown_input}: expected {json.dumps(expected)}; "
                f"{failed.detail.split(': ', 1)[-1][:200]}. {left} submission(s) left.")

    def final_reward(self, answer: str) -> float:
        return self.last_score
