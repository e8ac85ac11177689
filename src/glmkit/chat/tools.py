"""Tools the model may call: loading them (the builtin demo tools, a tools file) and running them.

Running a tool validates the arguments against its schema first, then runs it in a worker process
with a timeout (a call past it is killed); whatever happens, the result is an observation the model
can read (JSON), never an exception that escapes.
"""

from __future__ import annotations

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


MAX_WORKERS = 4      # tool calls running at once, each in its own worker process


class _Workers:
    """Where Python tools run: a worker process per call, at most MAX_WORKERS at a time.

    A process, not a thread, so that a call past its timeout can be killed (Python cannot stop a
    thread) and a tool that crashes the interpreter (os._exit, a segfault in an extension) takes
    only its own process with it.  Each is forked fresh from this process, so it has every tool as
    loaded here (a tools file, a function defined in a notebook) without pickling the function,
    and no call sees what an earlier one left behind.  Arguments and results cross as pickles."""

    def __init__(self, size: int = MAX_WORKERS):
        import threading
        self._slots = threading.BoundedSemaphore(size)

    def call(self, fn, arguments: dict, timeout: float):
        """fn(**arguments) in a worker: its value, or TimeoutError (the worker killed), or
        ToolCrashed / the exception the tool raised (as _ToolRaised)."""
        import multiprocessing
        ctx = multiprocessing.get_context("fork")
        with self._slots:
            receive, send = ctx.Pipe(duplex=False)
            proc = ctx.Process(target=_work, args=(send, fn, arguments), daemon=True, name="glmkit-tool")
            proc.start()
            send.close()                     # the child's end: EOF here once the child is gone
            try:
                if not receive.poll(timeout):
                    raise TimeoutError
                try:
                    kind, payload = receive.recv()
                except EOFError:             # the child died without a word
                    proc.join(5)
                    raise ToolCrashed(f"its process ended with exit code {proc.exitcode}") from None
            finally:
                receive.close()
                if proc.is_alive():
                    proc.kill()              # a timeout: the call is stopped, not abandoned
                proc.join(5)
        if kind == "ok":
            return payload
        raise _ToolRaised(*payload)


class ToolCrashed(Exception):
    """A tool's worker process died without an answer."""


class _ToolRaised(Exception):
    """What a tool raised in its worker: (type name, message)."""


def _work(send, fn, arguments):
    """In the worker: run the tool, send back ("ok", value) or ("error", (type, message))."""
    import sys
    if "torch" in sys.modules:           # a forked child must not enter the parent's OpenMP pool
        sys.modules["torch"].set_num_threads(1)
    try:
        value = fn(**arguments)
        try:
            send.send(("ok", value))
        except Exception:                    # a value that does not pickle: its text instead
            send.send(("ok", str(value)))
    except BaseException as e:
        send.send(("error", (type(e).__name__, str(e))))
    finally:
        send.close()


_workers = _Workers()


def run_tool(t: Tool, arguments: dict) -> ToolResult:
    """Validate, run in a worker process with a timeout, and turn the outcome into an observation."""
    def fail(msg: str) -> ToolResult:
        return ToolResult(False, json.dumps({"error": msg}, ensure_ascii=False), error=msg)
    try:
        validate_arguments(arguments, t.parameters)
    except ToolCallError as e:
        return fail(str(e))
    if t.function is None:
        return fail(f"tool {t.name} has no implementation here")
    try:
        value = _workers.call(t.function, arguments, t.timeout)
    except TimeoutError:
        return fail(f"tool {t.name} did not finish within {t.timeout:g} s (it was stopped)")
    except ToolCrashed as e:
        return fail(f"tool {t.name} crashed: {e}")
    except _ToolRaised as e:             # the tool's own bug: reported to the model, not raised
        kind, message = e.args
        return fail(f"tool {t.name} raised {kind}: {message}")
    try:
        text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    except (TypeError, ValueError):
        text = str(value)
    return ToolResult(True, _truncate(text), value=value)
