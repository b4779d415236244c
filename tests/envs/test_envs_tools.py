"""Tools and the environment contract: schemas from signatures, the model's calls parsed, every kind of bad call
answered with a counted error observation, tools that hang / crash / flood contained, the python session's state,
and naming environments like rewards."""
import json
import textwrap
import time

import pytest

from envs import EnvSpecError, ToolEnv, load_env, make_env_group, parse_tool_calls, tool
from envs.tools import Tool, argument_problem, run_tool_call


def call(name, **arguments):
    return f"<tool_call>{json.dumps({'name': name, 'arguments': arguments})}</tool_call>"


@pytest.mark.unit
def test_schema_from_type_hints_and_docstring():
    @tool
    def search(query: str, k: int = 3, tags: list[str] | None = None) -> str:
        """Search the document store.

        Args:
            query: words to look for,
                over two lines
            k: how many documents
            tags: optional filters

        Returns:
            the documents
        """
    assert search.schema() == {"type": "function", "function": {
        "name": "search", "description": "Search the document store.",
        "parameters": {"type": "object", "required": ["query"], "properties": {
            "query": {"type": "string", "description": "words to look for, over two lines"},
            "k": {"type": "integer", "description": "how many documents"},
            "tags": {"type": "array", "items": {"type": "string"}, "description": "optional filters"}}}}}
    explicit = tool(lambda **kw: "x", name="f", description="d", parameters={"type": "object", "properties": {}})
    assert explicit.schema()["function"] == {"name": "f", "description": "d",
                                             "parameters": {"type": "object", "properties": {}}}
    with pytest.raises(TypeError, match="no type hint"):
        tool(lambda x: x)


@pytest.mark.unit
def test_parse_calls_in_the_hermes_format():
    text = "thinking... " + call("a", x=1) + " and " + '<tool_call>{"name": "b", "arguments": "{\\"y\\": 2}"}</tool_call>'
    calls = parse_tool_calls(text)
    assert [(c.name, c.arguments, c.error) for c in calls] == [("a", {"x": 1}, None), ("b", {"y": 2}, None)]
    assert parse_tool_calls("Answer: 3") == []
    assert [c.error for c in parse_tool_calls('<tool_call>{"name": "a"')] == ["bad_json"]
    assert [c.error for c in parse_tool_calls('<tool_call>[1, 2]</tool_call>')] == ["bad_json"]


@pytest.mark.unit
@pytest.mark.parametrize("arguments,problem", [
    ({"a": 1, "b": 2}, None),
    ({"a": 1}, "missing required argument(s) ['b']"),
    ({"a": 1, "b": 2, "c": 3}, "unknown argument(s) ['c']"),
    ({"a": "1", "b": 2}, "argument 'a' must be of type integer"),
    ({"a": True, "b": 2}, "argument 'a' must be of type integer"),
    ([1, 2], "arguments must be a JSON object"),
])
def test_argument_checks(arguments, problem):
    @tool
    def mul(a: int, b: int) -> int:
        return a * b
    found = argument_problem(mul.parameters, arguments)
    assert (found is None) if problem is None else found.startswith(problem)


class Calculator(ToolEnv):
    @tool
    def mul(self, a: int, b: int) -> str:
        """Multiply two integers."""
        return str(a * b)

    @tool(timeout_s=0.3)
    def slow(self) -> str:
        """Never answers in time."""
        time.sleep(3)
        return "late"

    @tool
    def broken(self) -> str:
        """Raises."""
        raise KeyError("nope")

    def final_reward(self, answer):
        return float(answer.strip() == "Answer: 6")


ROW = {"prompt": [{"role": "user", "content": "What is 2*3?"}]}


@pytest.mark.unit
@pytest.mark.parametrize("action,kind,says", [
    ("<tool_call>{name: mul}</tool_call>", "bad_json", "not valid JSON"),
    ('<tool_call>{"name": "mul", "arguments": {"a": 2, "b": 3}', "bad_json", "never closed"),
    (call("div", a=1, b=2), "unknown_tool", "unknown tool 'div'"),
    (call("mul", a="2", b=3), "bad_arguments", "must be of type integer"),
    (call("mul", a=2), "bad_arguments", "missing required argument"),
    (call("slow"), "tool_timeout", "did not finish within 0.3 s"),
    (call("broken"), "tool_exception", "raised KeyError"),
    (call("mul", a=1, b=1) * 5, "too_many_calls", "at most 4 tool calls"),
])
def test_bad_calls_become_counted_error_observations(action, kind, says):
    env = Calculator(ROW)
    start = time.monotonic()
    result = env.step(action)
    assert time.monotonic() - start < 2.0
    assert not result.done and result.reward == 0.0
    assert kind in result.info["errors"]
    assert any(says in m["content"] for m in result.messages), result.messages
    assert all(m["role"] == "tool" for m in result.messages)
    # the episode goes on: a good call and a right answer still work
    assert env.step(call("mul", a=2, b=3)).messages == [{"role": "tool", "content": "6"}]
    assert env.step("Answer: 6").reward == 1.0


@pytest.mark.unit
def test_calls_after_the_end_and_missing_calls():
    env = Calculator(ROW)
    assert env.step("Answer: 6").done
    late = env.step(call("mul", a=2, b=3))
    assert late.done and late.info["errors"] == ["after_end"] and late.reward == 0.0
    strict = Calculator(ROW, require_tool_call=True)
    refused = strict.step("Answer: 6")
    assert not refused.done and refused.info["errors"] == ["missing_tool_call"]
    assert "answer only after calling a tool" in refused.messages[0]["content"]
    strict.step(call("mul", a=2, b=3))
    assert strict.step("Answer: 6").reward == 1.0


UNTRUSTED = textwrap.dedent('''
    import os, time
    from envs import tool

    @tool(untrusted=True, timeout_s=1.5)
    def hang(seconds: float) -> str:
        """Sleeps."""
        time.sleep(seconds)
        return "woke"

    @tool(untrusted=True, timeout_s=5, max_output_chars=1000)
    def flood() -> str:
        """Prints forever."""
        while True:
            print("x" * 10000)

    @tool(untrusted=True, timeout_s=5)
    def crash() -> str:
        """Dies."""
        os._exit(9)

    @tool(untrusted=True, timeout_s=5)
    def where(path: str) -> dict:
        """What it can see."""
        return {"sees_path": os.path.exists(path), "cwd": os.getcwd(), "uid": os.getuid()}
''')


@pytest.mark.integration
def test_untrusted_tools_run_sandboxed_and_hang_crash_flood_are_contained(tmp_path):
    import importlib.util
    path = tmp_path / "mytools.py"
    path.write_text(UNTRUSTED)
    spec = importlib.util.spec_from_file_location("mytools", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    tools = {t.name: t for t in vars(module).values() if isinstance(t, Tool)}
    run = lambda name, **args: run_tool_call(parse_tool_calls(call(name, **args))[0], tools)   # noqa: E731

    assert run("hang", seconds=0.1).content == "woke"
    start = time.monotonic()
    hung = run("hang", seconds=60)
    assert hung.error == "tool_timeout" and time.monotonic() - start < 5
    assert run("flood").error == "tool_output_limit"
    crashed = run("crash")
    assert crashed.error == "tool_crash" and "exit status 9" in crashed.content
    seen = json.loads(run("where", path=str(path)).content)
    assert seen["cwd"] == "/sandbox" and seen["sees_path"] is False and seen["uid"] != 0   # no host files


@pytest.mark.integration
def test_python_session_keeps_state_and_survives_bad_cells():
    from envs.python import PythonSession
    session = PythonSession(timeout_s=2)
    assert session.run("x = 6 * 7") == "(no output)"
    assert session.run("y = x + 1\nprint(y)\nx") == "43\n42"
    assert session.run("z = 1\n1 / 0").endswith("ZeroDivisionError: division by zero")
    assert session.run("z + x") == "43"                       # assignments before the error persist
    start = time.monotonic()
    from envs.tools import ToolError
    with pytest.raises(ToolError) as hang:
        session.run("x = 0\nwhile True: pass")
    assert hang.value.kind == "tool_timeout" and time.monotonic() - start < 6
    with pytest.raises(ToolError) as flood:
        session.run("print('a' * 10**7)")
    assert flood.value.kind == "tool_output_limit"
    with pytest.raises(ToolError) as crash:
        session.run("import os; os._exit(3)")
    assert crash.value.kind == "tool_crash"
    assert session.run("x") == "42"                           # a killed cell is dropped: x was never set to 0
    assert session.run("import socket\ntry:\n    socket.create_connection(('1.1.1.1', 53), 1)\nexcept OSError as e:\n"
                       "    print('offline')") == "offline"


@pytest.mark.unit
def test_envs_are_named_like_rewards(tmp_path):
    from envs.python import PythonEnv
    assert load_env("python") is PythonEnv and load_env("envs.tau:TauEnv").__name__ == "TauEnv"
    path = tmp_path / "my_env.py"
    path.write_text("from envs import Env\nclass Mine(Env):\n    def __init__(self, row, level=1): self.level = level\n"
                    "    def initial_observation(self): pass\n    def step(self, action): pass\n")
    group = make_env_group({"prompt": [], "extra_info": {"env": {"name": f"{path}:Mine", "kwargs": {"level": 3}}}}, 4)
    assert len(group) == 4 and len({id(e) for e in group}) == 4 and group[0].level == 3
    assert make_env_group({"prompt": []}, 2, default=f"{path}:Mine")[1].level == 1
    with pytest.raises(EnvSpecError, match="neither a built-in name"):
        load_env("pyhton")
    with pytest.raises(EnvSpecError, match="does not exist"):
        load_env("nowhere.py:Mine")
    with pytest.raises(EnvSpecError, match="no Env subclass 'Other'"):
        load_env(f"{path}:Other")
    with pytest.raises(EnvSpecError, match="rejected its kwargs"):
        make_env_group({"prompt": []}, 1, default=f"{path}:Mine", default_kwargs={"levle": 2})
    with pytest.raises(EnvSpecError, match="no default environment"):
        make_env_group({"prompt": []}, 1)
