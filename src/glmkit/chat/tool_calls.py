"""ChatGLM3 tool calls, parsed as data.

The model writes a call as a fenced block holding `tool_call(name=value, ...)` under a segment
whose metadata line names the tool.  The official code hands that text to the `eval` builtin,
so anyone who can steer the model can run Python on the host.  Here it is parsed with `ast`: only keyword arguments
whose values are literals (strings, numbers, booleans, None, lists, tuples, dicts) are accepted;
anything else is refused with a reason the model can read in an observation.  Nothing is ever
evaluated.
"""

from __future__ import annotations

import ast
import json
import math
import re

MAX_CALL_CHARS = 20_000
MAX_DEPTH = 32

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[ \t]*\n(.*?)\n?[ \t]*```", re.DOTALL)


class ToolCallError(ValueError):
    """A tool call that cannot be accepted; the message is safe to show to the model and user."""


def extract_code(content: str) -> str:
    """The code inside the first fenced block (or the bare text if there is no fence)."""
    if len(content) > MAX_CALL_CHARS:
        raise ToolCallError(f"tool call is longer than {MAX_CALL_CHARS} characters")
    m = _FENCE.search(content)
    if m:
        return m.group(2).strip()
    if "```" in content:
        raise ToolCallError("tool call has an unterminated code fence")
    return content.strip()


def _depth(node: ast.AST, limit: int) -> int:
    best, stack = 0, [(node, 1)]
    while stack:
        n, d = stack.pop()
        if d > limit:
            raise ToolCallError(f"tool call arguments are nested deeper than {limit} levels")
        best = max(best, d)
        stack.extend((c, d + 1) for c in ast.iter_child_nodes(n))
    return best


def _plain(value):
    """Literal -> JSON value: tuples become lists; bytes, sets, complex and non-finite numbers are refused."""
    if value is None or isinstance(value, (bool, str)):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ToolCallError("tool call arguments must be finite numbers")
        return value
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        out = {}
        for k, v in value.items():
            if not isinstance(k, str):
                raise ToolCallError("tool call dictionary keys must be strings")
            out[k] = _plain(v)
        return out
    raise ToolCallError(f"tool call arguments may not contain {type(value).__name__} values")


def parse_tool_call(content: str) -> dict:
    """`tool_call(a=1, b="x")` (possibly fenced) -> {"a": 1, "b": "x"}; ToolCallError otherwise."""
    code = extract_code(content)
    if not code:
        raise ToolCallError("tool call is empty")
    try:
        tree = ast.parse(code, mode="eval")
    except (SyntaxError, ValueError) as e:
        raise ToolCallError(f"tool call is not valid syntax ({e.msg if isinstance(e, SyntaxError) else e})") from None
    except (RecursionError, MemoryError):
        raise ToolCallError("tool call is nested too deeply") from None
    call = tree.body
    if not isinstance(call, ast.Call) or not isinstance(call.func, ast.Name) or call.func.id != "tool_call":
        raise ToolCallError("expected exactly one call of the form tool_call(name=value, ...)")
    if call.args:
        raise ToolCallError("tool_call takes keyword arguments only")
    _depth(call, MAX_DEPTH)
    args = {}
    for kw in call.keywords:
        if kw.arg is None:
            raise ToolCallError("tool_call does not accept **kwargs")
        if kw.arg in args:
            raise ToolCallError(f"argument {kw.arg!r} is given twice")
        try:
            value = ast.literal_eval(kw.value)   # literals only: never runs code
        except (ValueError, TypeError, SyntaxError, RecursionError, MemoryError):
            raise ToolCallError(f"argument {kw.arg!r} is not a literal value "
                                f"(only strings, numbers, booleans, None, lists and dicts)") from None
        args[kw.arg] = _plain(value)
    return args


def format_tool_call(arguments: dict) -> str:
    """The text ChatGLM3 writes for a call: used when an API client sends back an assistant
    message with tool_calls, so the prompt shows the model its own convention."""
    parts = ", ".join(f"{k}={_py_literal(v)}" for k, v in arguments.items())
    return f" ```python\ntool_call({parts})\n```"  # the leading space is how the official examples write it


def _py_literal(v) -> str:
    if isinstance(v, bool) or v is None:
        return repr(v)
    if isinstance(v, (int, float, str)):
        return json.dumps(v, ensure_ascii=False) if isinstance(v, str) else repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_py_literal(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {_py_literal(x)}" for k, x in v.items()) + "}"
    return json.dumps(v, ensure_ascii=False)


def validate_arguments(arguments: dict, schema: dict | None) -> None:
    """Check arguments against a tool's JSON Schema (ToolCallError naming the first problem)."""
    if not schema:
        return
    import jsonschema
    try:
        jsonschema.validate(arguments, schema)
    except jsonschema.ValidationError as e:
        where = "/".join(map(str, e.absolute_path)) or "arguments"
        raise ToolCallError(f"invalid arguments at {where}: {e.message}") from None
    except jsonschema.SchemaError as e:
        raise ToolCallError(f"the tool's parameter schema is invalid: {e.message}") from None
