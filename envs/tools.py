"""Tools: plain Python functions with JSON-schema signatures, the model's tool calls parsed and run safely.

    @tool
    def search(query: str, k: int = 3) -> str:
        \"\"\"Search the document store.

        Args:
            query: words to look for
            k: how many documents to return
        \"\"\"

`search.schema()` is the OpenAI function-calling entry `{"type": "function", "function": {name, description,
parameters}}` that `tokenizer.apply_chat_template(messages, tools=[...])` renders; the schema comes from the type
hints and the docstring's `Args:` section, or is declared explicitly (`@tool(parameters={...})`).

Calls are parsed from the model's own text in the Qwen3 / Hermes format
`<tool_call>{"name": ..., "arguments": {...}}</tool_call>`. Whatever goes wrong (malformed JSON, an unknown tool,
wrong argument types, a tool that raises, hangs or floods its output) becomes a `ToolOutcome` whose `error` names
the kind (counted as `env/tool_errors/<kind>`) and whose `content` tells the model what was wrong; nothing raises.

Trusted tools run in a thread with a wall-clock limit (a hung one is abandoned, its thread leaks until it
returns: mark a tool that may hang `untrusted`). Untrusted tools run in `rewards.sandbox` (no network, no host
files, rlimits, killed at the wall-clock limit): a module-level function whose module source is copied into the
sandbox and imported there (stdlib and installed packages only; `from envs import tool` works), one fresh
sandbox per call. A tool that needs per-episode state is a trusted method that itself calls the sandbox (as
envs/python.py's session does).
"""
from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
import json
import re
import sys
import time
import typing
from typing import Any, Callable

ERROR_KINDS = ("bad_json", "unknown_tool", "bad_arguments", "too_many_calls", "missing_tool_call", "after_end",
               "tool_exception", "tool_timeout", "tool_crash", "tool_output_limit")
DEFAULT_TIMEOUT_S = 10.0
DEFAULT_MAX_OUTPUT_CHARS = 2000

_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object"}
_CALL = re.compile(r"<tool_call>(.*?)</tool_call>", re.S)
_OPEN_CALL = re.compile(r"<tool_call>(?!.*</tool_call>)", re.S)


@dataclasses.dataclass(frozen=True)
class Tool:
    name: str
    description: str
    parameters: dict                         # JSON schema of the arguments object
    fn: Callable[..., Any]
    untrusted: bool = False                  # run in rewards.sandbox instead of this process
    timeout_s: float = DEFAULT_TIMEOUT_S     # wall clock per call
    max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS

    def schema(self) -> dict:
        return {"type": "function",
                "function": {"name": self.name, "description": self.description, "parameters": self.parameters}}

    def __call__(self, *args, **kwargs):    # the decorated function stays callable as itself
        return self.fn(*args, **kwargs)


def tool(fn: Callable | None = None, *, name: str | None = None, description: str | None = None,
         parameters: dict | None = None, untrusted: bool = False, timeout_s: float = DEFAULT_TIMEOUT_S,
         max_output_chars: int = DEFAULT_MAX_OUTPUT_CHARS):
    """Decorator (bare or with options) turning a function into a Tool; see the module docstring."""
    def wrap(f: Callable) -> Tool:
        doc_description, doc_parameters = schema_from_signature(f)
        return Tool(name or f.__name__, description if description is not None else doc_description,
                    parameters if parameters is not None else doc_parameters, f, untrusted, timeout_s,
                    max_output_chars)
    return wrap(fn) if fn is not None else wrap


def _json_type(annotation: Any) -> dict:
    origin = typing.get_origin(annotation)
    if annotation in _JSON_TYPES:
        return {"type": _JSON_TYPES[annotation]}
    if origin in (list, tuple):
        args = typing.get_args(annotation)
        return {"type": "array", **({"items": _json_type(args[0])} if args else {})}
    if origin is dict:
        return {"type": "object"}
    if origin is typing.Literal:
        values = list(typing.get_args(annotation))
        return {**_json_type(type(values[0])), "enum": values}
    if origin in (typing.Union, getattr(__import__("types"), "UnionType", None)):
        options = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(options) == 1:
            return _json_type(options[0])
    raise TypeError(f"cannot derive a JSON-schema type from annotation {annotation!r}; "
                    "declare the tool's parameters explicitly with @tool(parameters={...})")


_ARG_SECTIONS = ("Args:", "Arguments:", "Parameters:")
_OTHER_SECTIONS = ("Returns:", "Return:", "Raises:", "Yields:", "Examples:", "Example:", "Notes:", "Note:")


def _docstring_parts(doc: str) -> tuple[str, dict[str, str]]:
    """(description, {arg: text}) from a Google-style docstring: the text before the first section, and the
    `name: text` entries of its `Args:` section (deeper-indented lines continue an entry)."""
    description, args, section, current, arg_indent = [], {}, "description", None, None
    for line in inspect.cleandoc(doc or "").splitlines():
        stripped, indent = line.strip(), len(line) - len(line.lstrip())
        if indent == 0 and stripped in _ARG_SECTIONS + _OTHER_SECTIONS:
            section = "args" if stripped in _ARG_SECTIONS else "other"
            continue
        if section == "description":
            description.append(stripped)
        elif section == "args" and stripped:
            match = re.match(r"^(\w+)\s*(?:\([^)]*\))?\s*:\s*(.*)$", stripped)
            if match and (arg_indent is None or indent <= arg_indent):
                arg_indent, current = indent, match.group(1)
                args[current] = match.group(2)
            elif current is not None:
                args[current] += " " + stripped
    return " ".join(" ".join(description).split()), args


def schema_from_signature(fn: Callable) -> tuple[str, dict]:
    """(description, parameters JSON schema) from fn's type hints and docstring. Every parameter needs a hint."""
    description, arg_docs = _docstring_parts(fn.__doc__ or "")
    hints = typing.get_type_hints(fn)
    properties, required = {}, []
    for index, (pname, param) in enumerate(inspect.signature(fn).parameters.items()):
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or (index == 0 and pname == "self"):
            continue
        if pname not in hints:
            raise TypeError(f"tool {fn.__name__}: parameter {pname!r} has no type hint; add one "
                            "(str, int, float, bool, list[...], dict) or declare parameters explicitly")
        prop = _json_type(hints[pname])
        if pname in arg_docs:
            prop["description"] = arg_docs[pname]
        properties[pname] = prop
        if param.default is param.empty:
            required.append(pname)
    return description, {"type": "object", "properties": properties, "required": required}


# ------------------------------------------------------------------ parsing the model's calls

@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str | None          # None when the call could not be parsed
    arguments: Any
    error: str | None = None  # "bad_json" when the block is not a {"name", "arguments"} object
    detail: str = ""


def parse_tool_calls(text: str) -> list[ToolCall]:
    """Every <tool_call>...</tool_call> block of `text`, in order. An unclosed block is a bad_json call."""
    calls = []
    for body in _CALL.findall(text):
        try:
            obj = json.loads(body)
        except (json.JSONDecodeError, RecursionError) as err:
            calls.append(ToolCall(None, None, "bad_json", f"the tool call is not valid JSON ({err})"))
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("name"), str):
            calls.append(ToolCall(None, None, "bad_json",
                                  'a tool call must be a JSON object {"name": ..., "arguments": {...}}'))
            continue
        arguments = obj.get("arguments", {})
        if isinstance(arguments, str):            # some models emit the arguments object as a JSON string
            try:
                arguments = json.loads(arguments)
            except json.JSONDecodeError:
                pass
        calls.append(ToolCall(obj["name"], arguments))
    if _OPEN_CALL.search(text):
        calls.append(ToolCall(None, None, "bad_json", "a <tool_call> block was opened but never closed"))
    return calls


def argument_problem(schema: dict, arguments: Any) -> str | None:
    """None when `arguments` fits the parameters schema (required keys, no unknown keys, basic JSON types)."""
    if not isinstance(arguments, dict):
        return f"arguments must be a JSON object, got {type(arguments).__name__}"
    properties = schema.get("properties", {})
    missing = [k for k in schema.get("required", []) if k not in arguments]
    if missing:
        return f"missing required argument(s) {missing}"
    unknown = [k for k in arguments if k not in properties]
    if unknown and schema.get("additionalProperties", False) is not True:
        return f"unknown argument(s) {unknown}; the parameters are {sorted(properties)}"
    for key, value in arguments.items():
        expected = properties.get(key, {}).get("type")
        if expected and not _is_json_type(value, expected):
            return f"argument {key!r} must be of type {expected}, got {type(value).__name__} {value!r:.40}"
        enum = properties.get(key, {}).get("enum")
        if enum is not None and value not in enum:
            return f"argument {key!r} must be one of {enum}, got {value!r:.40}"
    return None


def _is_json_type(value: Any, expected: str | list) -> bool:
    if isinstance(expected, list):
        return any(_is_json_type(value, e) for e in expected)
    checks = {"string": lambda v: isinstance(v, str), "boolean": lambda v: isinstance(v, bool),
              "integer": lambda v: isinstance(v, int) and not isinstance(v, bool),
              "number": lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
              "array": lambda v: isinstance(v, list), "object": lambda v: isinstance(v, dict),
              "null": lambda v: v is None}
    return checks.get(expected, lambda v: True)(value)


# ------------------------------------------------------------------ running a call

class ToolError(Exception):
    """Raised by a tool to report a failure of a known kind (e.g. "tool_timeout" from a sandboxed session):
    the model reads the message, the kind is counted."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


@dataclasses.dataclass
class ToolOutcome:
    name: str | None
    content: str              # what the model reads (a tool message); an error message when error is set
    error: str | None = None  # one of ERROR_KINDS, or None
    latency_s: float = 0.0


_THREADS = concurrent.futures.ThreadPoolExecutor(max_workers=64, thread_name_prefix="posttrain-tool")


def run_tool_call(call: ToolCall, tools: dict[str, Tool]) -> ToolOutcome:
    """Validate and run one parsed call; never raises."""
    if call.error:
        return ToolOutcome(None, f"Error: {call.detail}", call.error)
    tool_ = tools.get(call.name)
    if tool_ is None:
        return ToolOutcome(call.name, f"Error: unknown tool {call.name!r}; the tools are {sorted(tools)}",
                           "unknown_tool")
    problem = argument_problem(tool_.parameters, call.arguments)
    if problem:
        return ToolOutcome(call.name, f"Error: {call.name}: {problem}", "bad_arguments")
    start = time.monotonic()
    if tool_.untrusted:
        content, error = _run_sandboxed(tool_, call.arguments)
    else:
        content, error = _run_in_thread(tool_, call.arguments)
    if error is None and len(content) > tool_.max_output_chars:
        content = content[:tool_.max_output_chars] + f"\n... (output truncated at {tool_.max_output_chars} chars)"
    return ToolOutcome(call.name, content, error, time.monotonic() - start)


def _as_text(value: Any) -> str:
    if isinstance(value, str):
        return value
    try:
        return json.dumps(value)
    except (TypeError, ValueError):
        return repr(value)


def _run_in_thread(tool_: Tool, arguments: dict) -> tuple[str, str | None]:
    future = _THREADS.submit(tool_.fn, **arguments)
    try:
        return _as_text(future.result(timeout=tool_.timeout_s)), None
    except concurrent.futures.TimeoutError:
        return f"Error: {tool_.name} did not finish within {tool_.timeout_s:g} s", "tool_timeout"
    except ToolError as err:
        return f"Error: {err}", err.kind
    except Exception as err:  # noqa: BLE001 - a tool's failure is the model's observation, not a crash
        return f"Error: {tool_.name} raised {type(err).__name__}: {str(err)[:300]}", "tool_exception"


# Runs inside the sandbox: import the tool's module (its source copied into the work dir), call the function,
# print a marked JSON result. `envs` there is a one-file stand-in whose `tool` decorator returns the function, so
# the module's `from envs import tool` works without exposing the host's packages.
_SANDBOX_RUNNER = r"""
import json, sys
sys.path.insert(0, "")
spec = json.loads(sys.stdin.read())
import posttrain_tool_module as module
fn = getattr(module, spec["function"])
try:
    value = fn(**spec["arguments"])
    out = {"ok": True, "value": value if isinstance(value, str) else json.dumps(value, default=repr)}
except Exception as err:
    out = {"ok": False, "value": type(err).__name__ + ": " + str(err)[:300]}
sys.stdout.write("\n<<posttrain-tool-result>>" + json.dumps(out))
"""
_ENVS_STAND_IN = b"""
def tool(fn=None, **options):
    return fn if fn is not None else (lambda f: f)

class ToolError(Exception):
    def __init__(self, kind, message):
        super().__init__(message)
        self.kind = kind
"""
_MARK = b"\n<<posttrain-tool-result>>"


def _run_sandboxed(tool_: Tool, arguments: dict) -> tuple[str, str | None]:
    from rewards.sandbox import SandboxLimits, default_sandbox
    with open(inspect.getfile(tool_.fn), "rb") as fh:
        source = fh.read()
    limits = SandboxLimits(wall_s=tool_.timeout_s, cpu_s=tool_.timeout_s,
                           stdout_bytes=max(4 * tool_.max_output_chars, 1 << 16))
    result = default_sandbox().run(
        [sys.executable, "-I", "-c", _SANDBOX_RUNNER], limits=limits,
        stdin=json.dumps({"function": tool_.fn.__name__, "arguments": arguments}).encode(),
        files={"posttrain_tool_module.py": source, "envs.py": _ENVS_STAND_IN})
    return sandbox_outcome(tool_.name, result, tool_.timeout_s)


def sandbox_outcome(name: str, result, timeout_s: float) -> tuple[str, str | None]:
    """(content, error kind) of a SandboxResult that ran _SANDBOX_RUNNER."""
    if result.timed_out:
        return f"Error: {name} did not finish within {timeout_s:g} s and was killed", "tool_timeout"
    if result.output_limited:
        return f"Error: {name} printed more output than allowed and was killed", "tool_output_limit"
    head, marker, tail = result.stdout.rpartition(_MARK)
    if not marker:
        why = f"signal {result.signal}" if result.signal else f"exit status {result.exit_code}"
        stderr = result.stderr.decode(errors="replace").strip().splitlines()[-1:] or [""]
        return f"Error: {name} crashed ({why}) {stderr[0][:300]}".rstrip(), "tool_crash"
    out = json.loads(tail)
    return (out["value"], None) if out["ok"] else (f"Error: {name} raised {out['value']}", "tool_exception")
