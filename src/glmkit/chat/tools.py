"""Tools the model may call: definitions from Python functions or schema files, and running them.

`@glmkit.tool` turns a typed function into a tool: its name, the first paragraph of its docstring
as description, and a JSON Schema built from the type hints (`Annotated[str, "description"]`,
`Literal[...]` enums, defaults make a parameter optional).  Running a tool validates the arguments
against that schema first and applies a timeout; whatever happens, the result is an observation
the model can read (JSON), never an exception that escapes.
"""

from __future__ import annotations

import concurrent.futures
import inspect
import json
import types
import typing
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from ..errors import GlmkitError
from .tool_calls import ToolCallError, validate_arguments

MAX_OBSERVATION_CHARS = 4000
_JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", list: "array", dict: "object",
               type(None): "null"}


@dataclass
class Tool:
    name: str
    description: str
    parameters: dict
    function: Callable[..., Any] | None = None   # None: schema only (manual mode, API clients)
    timeout: float = 30.0

    def spec(self) -> dict:
        """The flat {name, description, parameters} entry ChatGLM3 reads from its system message."""
        return {"name": self.name, "description": self.description, "parameters": self.parameters}


def _schema_for(annotation) -> dict:
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        base, *meta = typing.get_args(annotation)
        schema = _schema_for(base)
        desc = next((m for m in meta if isinstance(m, str)), None)
        if desc:
            schema["description"] = desc
        return schema
    if origin is typing.Literal:
        values = list(typing.get_args(annotation))
        schema = {"enum": values}
        kinds = {type(v) for v in values}
        if len(kinds) == 1 and next(iter(kinds)) in _JSON_TYPES:
            schema["type"] = _JSON_TYPES[next(iter(kinds))]
        return schema
    if origin in (typing.Union, types.UnionType):
        options = [_schema_for(a) for a in typing.get_args(annotation)]
        return {"anyOf": options}
    if origin in (list, tuple, set):
        args = typing.get_args(annotation)
        schema = {"type": "array"}
        if args and args[0] is not Ellipsis:
            schema["items"] = _schema_for(args[0])
        return schema
    if origin is dict:
        return {"type": "object"}
    if annotation in _JSON_TYPES:
        return {"type": _JSON_TYPES[annotation]}
    if annotation is inspect.Parameter.empty or annotation is Any:
        return {}
    raise GlmkitError(f"cannot describe type {annotation!r} as JSON Schema")


def tool(fn: Callable | None = None, *, name: str | None = None, timeout: float = 30.0):
    """Decorator: make a typed Python function a tool (usable bare or with arguments)."""
    def make(f: Callable) -> Callable:
        hints = typing.get_type_hints(f, include_extras=True)
        props, required = {}, []
        for pname, p in inspect.signature(f).parameters.items():
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD):
                raise GlmkitError(f"tool {f.__name__}: *args/**kwargs cannot be described to the model")
            props[pname] = _schema_for(hints.get(pname, p.annotation))
            if p.default is p.empty:
                required.append(pname)
            else:
                props[pname]["default"] = p.default
        doc = inspect.getdoc(f) or ""
        f.__glmkit_tool__ = Tool(name or f.__name__, doc.split("\n\n")[0].strip(),
                                 {"type": "object", "properties": props, "required": required}, f, timeout)
        return f
    return make(fn) if fn is not None else make


def as_tool(obj) -> Tool:
    if isinstance(obj, Tool):
        return obj
    t = getattr(obj, "__glmkit_tool__", None)
    if t is None and callable(obj):
        t = tool(obj).__glmkit_tool__
    if t is None:
        raise GlmkitError(f"{obj!r} is not a tool")
    return t


def load_tools(spec: str | None) -> list[Tool]:
    """A --tools argument: 'builtin', or a tools file (see load_tool_file); None: no tools."""
    if not spec:
        return []
    if spec == "builtin":
        from .builtin_tools import BUILTIN
        return [as_tool(t) for t in BUILTIN]
    return load_tool_file(spec)


def load_tool_file(path: str | Path) -> list[Tool]:
    """Tools from a .py module (functions decorated with @glmkit.tool: importing the user's own
    module is the user's choice, like any plugin) or schemas from a .json/.yaml file."""
    path = Path(path)
    if not path.is_file():
        raise GlmkitError(f"{path}: no such tools file")
    if path.suffix == ".py":
        import importlib.util
        spec = importlib.util.spec_from_file_location(f"glmkit_user_tools_{path.stem}", path)
        module = importlib.util.module_from_spec(spec)
        try:
            spec.loader.exec_module(module)
        except Exception as e:
            raise GlmkitError(f"{path}: importing the tools module failed: {type(e).__name__}: {e}") from None
        tools = [v.__glmkit_tool__ for v in vars(module).values() if hasattr(v, "__glmkit_tool__")]
        if not tools:
            raise GlmkitError(f"{path}: no function is decorated with @glmkit.tool")
        return tools
    text = path.read_text(encoding="utf-8")
    try:
        if path.suffix in (".yaml", ".yml"):
            import yaml
            data = yaml.safe_load(text)
        else:
            data = json.loads(text)
    except Exception as e:
        raise GlmkitError(f"{path}: not valid {path.suffix.lstrip('.').upper()} ({e})") from None
    items = data.get("tools", data) if isinstance(data, dict) else data
    if not isinstance(items, list):
        raise GlmkitError(f"{path}: expected a list of tool schemas")
    out = []
    for i, t in enumerate(items):
        t = t.get("function", t) if isinstance(t, dict) else t
        if not isinstance(t, dict) or not isinstance(t.get("name"), str):
            raise GlmkitError(f"{path}: tool {i} needs a name")
        out.append(Tool(t["name"], t.get("description", ""), t.get("parameters") or {"type": "object", "properties": {}}))
    return out


@dataclass
class ToolResult:
    ok: bool
    observation: str                       # JSON text fed back to the model
    value: Any = None
    error: str | None = None


def _truncate(text: str, limit: int = MAX_OBSERVATION_CHARS) -> str:
    if len(text) <= limit:
        return text
    return text[:limit] + f"… [truncated {len(text) - limit} characters]"


_pool = concurrent.futures.ThreadPoolExecutor(max_workers=4, thread_name_prefix="glmkit-tool")


def run_tool(t: Tool, arguments: dict) -> ToolResult:
    """Validate, run with a timeout, and turn the outcome into an observation."""
    def fail(msg: str) -> ToolResult:
        return ToolResult(False, json.dumps({"error": msg}, ensure_ascii=False), error=msg)
    try:
        validate_arguments(arguments, t.parameters)
    except ToolCallError as e:
        return fail(str(e))
    if t.function is None:
        return fail(f"tool {t.name} has no implementation here")
    future = _pool.submit(t.function, **arguments)
    try:
        value = future.result(timeout=t.timeout)
    except concurrent.futures.TimeoutError:
        return fail(f"tool {t.name} did not finish within {t.timeout:g} s")
    except Exception as e:  # the tool's own bug: reported to the model, not raised
        return fail(f"tool {t.name} raised {type(e).__name__}: {e}")
    try:
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = str(value)
    return ToolResult(True, _truncate(text), value=value)
