"""What a tool is (`Tool`: a name, a description and a JSON Schema of its arguments, and maybe
the function that runs it), and `@glmkit.tool`, which makes one from a typed Python function.

The decorator takes the name, the first paragraph of the docstring as description, and a JSON
Schema built from the type hints (`Annotated[str, "description"]`, `Literal[...]` enums, defaults
make a parameter optional).
"""

from __future__ import annotations

import inspect
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import GlmkitError

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
