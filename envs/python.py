"""`python`: a code interpreter tool with a stateful session per trajectory (ReTool-style), in the sandbox.

    python(code) -> what the code prints; the value of a final expression is printed too (like a REPL)

Variables persist across calls. Each call runs in a fresh `rewards.sandbox` run (no network, rlimits, killed at
the wall clock) that first REPLAYS the session's earlier cells with their output discarded, then runs the new cell:
state persists without a long-lived process outside the sandbox's control. Consequences, by design: a cell
that timed out or crashed is dropped from the session (as if never run); a cell that raised is kept (the
assignments before the error persist, as in a notebook); `random` is seeded so replays agree; a call costs
the sandbox start (~70 ms) plus the replay of earlier cells. A hang is killed at `timeout_s`, a flood at
`max_output_chars` * 4 bytes, a crash (memory limit, os._exit) is reported: each an error observation
(`tool_timeout`, `tool_output_limit`, `tool_crash`), never a stalled run.
"""
from __future__ import annotations

import dataclasses
import json
import sys

from envs.base import ToolEnv
from envs.tools import ToolError, tool

_MARK = "<<posttrain-cell-output>>"
_RUNNER = r"""
import ast, json, random, sys, traceback
spec = json.loads(sys.stdin.read())
random.seed(0)
scope = {"__name__": "__main__"}

class _Discard:
    def write(self, s): return len(s)
    def flush(self): pass

def run(source):
    try:
        tree = ast.parse(source, "<cell>")
        last = tree.body.pop() if tree.body and isinstance(tree.body[-1], ast.Expr) else None
        exec(compile(tree, "<cell>", "exec"), scope)
        if last is not None:
            value = eval(compile(ast.Expression(last.value), "<cell>", "eval"), scope)
            if value is not None:
                print(repr(value))
    except BaseException as err:   # SystemExit too: the session goes on
        print("".join(traceback.format_exception_only(type(err), err)).strip())

real_out, real_err = sys.stdout, sys.stderr
sys.stdout = sys.stderr = _Discard()
for cell in spec["history"]:
    run(cell)
sys.stdout, sys.stderr = real_out, real_out
print(spec["mark"], flush=True)
run(spec["code"])
"""


class PythonSession:
    """One trajectory's interpreter: `run(code)` returns the cell's output or raises ToolError."""

    def __init__(self, *, timeout_s: float = 5.0, memory_mb: int = 512, max_output_chars: int = 1000,
                 allow_unsafe: bool = False):
        from rewards.sandbox import SandboxLimits
        self.sandbox = None   # the process-wide default_sandbox() on first use: building demos needs no bwrap
        self.allow_unsafe = allow_unsafe
        self.limits = SandboxLimits(wall_s=timeout_s, cpu_s=timeout_s, memory_mb=memory_mb,
                                    stdout_bytes=4 * max_output_chars + 4096, stderr_bytes=64 << 10)
        self.max_output_chars = max_output_chars
        self.history: list[str] = []

    def run(self, code: str) -> str:
        if self.sandbox is None:
            from rewards.sandbox import default_sandbox
            self.sandbox = default_sandbox(self.allow_unsafe)
        spec = {"history": self.history, "code": code, "mark": _MARK}
        result = self.sandbox.run([sys.executable, "-I", "-c", _RUNNER], stdin=json.dumps(spec).encode(),
                                  limits=self.limits)
        if result.timed_out:
            raise ToolError("tool_timeout", f"the code did not finish within {self.limits.wall_s:g} s and was "
                                            "stopped; the session keeps its earlier state")
        if result.output_limited:
            raise ToolError("tool_output_limit", f"the code printed more than {self.limits.stdout_bytes} bytes and "
                                                 "was stopped; print less")
        text = result.stdout.decode(errors="replace")
        head, mark, output = text.partition(_MARK + "\n")
        if not mark or result.exit_code != 0:
            why = f"signal {result.signal}" if result.signal else f"exit status {result.exit_code}"
            last_err = result.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
            raise ToolError("tool_crash", f"the interpreter crashed ({why}); {last_err[0][:200]}".rstrip("; "))
        self.history.append(code)
        output = output.strip()
        if len(output) > self.max_output_chars:
            output = output[:self.max_output_chars] + f"\n... (output truncated at {self.max_output_chars} chars)"
        return output or "(no output)"


class PythonEnv(ToolEnv):
    """Arithmetic (or anything) with a Python interpreter. Final answer `Answer: N`, scored by `answer_reward`
    (default: the toy's exact integer match). `allow_unsafe`: where bubblewrap cannot run, execute the model's
    code as a plain rlimited subprocess (rewards.sandbox's unsafe mode; never on a shared machine)."""

    def __init__(self, row: dict, *, timeout_s: float = 5.0, memory_mb: int = 512, max_output_chars: int = 1000,
                 answer_reward: str = "posttrain.toy.rewards:exact_answer", allow_unsafe: bool = False, **kwargs):
        super().__init__(row, answer_reward=answer_reward, **kwargs)
        self.session = PythonSession(timeout_s=timeout_s, memory_mb=memory_mb, max_output_chars=max_output_chars,
                                     allow_unsafe=allow_unsafe)
        # The host-side wait must outlast the sandbox's own wall clock, which reports the timeout properly.
        self.tools["python"] = dataclasses.replace(self.tools["python"], timeout_s=timeout_s + 10.0)

    @tool
    def python(self, code: str) -> str:
        """Run Python code in a persistent session; returns what it prints (a final expression's value too).

        Args:
            code: Python source to run
        """
        return self.session.run(code)
