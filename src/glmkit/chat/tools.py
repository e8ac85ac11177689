"""Tools the model may call: loading them (the builtin demo tools, a tools file) and running them.

Running a tool validates the arguments against its schema first and applies a timeout; whatever
happens, the result is an observation the model can read (JSON), never an exception that escapes.
"""

from __future__ import annotations

import concurrent.futures
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..errors import GlmkitError
from .builtin_tools import BUILTIN
from .tool_calls import ToolCallError, validate_arguments
from .tool_definitions import Tool, as_tool

MAX_OBSERVATION_CHARS = 4000


def load_tools(spec: str | None) -> list[Tool]:
    """A --tools argument: 'builtin', or a tools file (see load_tool_file); None: no tools."""
    if not spec:
        return []
    if spec == "builtin":
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
