"""OpenAI chat messages and tools <-> ChatGLM3 history messages.

Roles: system/user/assistant map one to one; `tool` becomes ChatGLM3's `observation`; an
assistant message carrying `tool_calls` becomes a ToolCall per call, which the model's format
writes the way the model writes it (chat.glm3, chat.template).  OpenAI `tools` become the flat
`{name, description, parameters}` list that ChatGLM3 reads from its system message.  The way
back: `openai_tool_call` is a ToolCall as the API returns it.
"""

from __future__ import annotations

import json

from ..errors import GlmkitError
from .glm3 import TOOLS_PREAMBLE, tool_call_message
from .json_schema import loads_bounded
from .template import tool_call_text
from .tool_calls import ToolCall, new_call_id


def flat_tools(tools: list[dict] | None) -> list[dict]:
    out = []
    for i, t in enumerate(tools or []):
        fn = t.get("function") if isinstance(t, dict) else None
        if not isinstance(fn, dict) or t.get("type", "function") != "function" or not isinstance(fn.get("name"), str) \
                or not fn["name"] or not isinstance(fn.get("parameters") or {}, dict):
            raise GlmkitError(f"tools[{i}] must be {{'type': 'function', 'function': {{'name', ...}}}}")
        out.append({"name": fn["name"], "description": fn.get("description") or "",
                    "parameters": fn.get("parameters") or {"type": "object", "properties": {}}})
    return out


def _text(content) -> str:
    """OpenAI content: a string, or a list of parts of which only text parts are supported."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for p in content:
            if isinstance(p, dict) and p.get("type") == "text":
                parts.append(p.get("text", ""))
            else:
                raise GlmkitError("only text content parts are supported")
        return "".join(parts)
    raise GlmkitError("message content must be a string or a list of text parts")


def to_template_messages(messages: list[dict], tools: list[dict] | None = None) -> list[dict]:
    """OpenAI request messages (+ flat tools) -> plain {role, content} messages for a model with a
    chat template; tools and earlier calls in the tagged convention (chat.protocols)."""
    from .protocols import TaggedProtocol
    out: list[dict] = []
    if tools:
        system = next((m for m in messages if m.get("role") == "system"), None)
        out.append(TaggedProtocol().system_message(tools, False, _text(system["content"]) if system else None))
    for m in messages:
        role = m.get("role")
        if role == "system" and tools:
            continue
        content = _text(m.get("content"))
        if role == "assistant" and m.get("tool_calls"):
            calls = [tool_call_text(_call(c)) for c in m["tool_calls"]]
            content = "\n".join(([content] if content else []) + calls)
        out.append({"role": "observation" if role in ("tool", "function") else role, "content": content})
    return out


def openai_tool_call(call: ToolCall, index: int | None = None) -> dict:
    """A call as `tool_calls` lists it (a streamed delta's entries carry their `index` too)."""
    out = {"index": index} if index is not None else {}
    return {**out, "id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}


def _call(c: dict) -> ToolCall:
    """An assistant message's tool call, as data."""
    fn = c.get("function")
    if not isinstance(fn, dict) or not isinstance(fn.get("arguments") or "", str):
        raise GlmkitError("assistant tool_calls need function {name, arguments: JSON text of an object}")
    try:
        args = loads_bounded(fn.get("arguments") or "{}")
    except ValueError:   # not JSON, too deep, a number past Python's digit limit, NaN
        raise GlmkitError("assistant tool_calls arguments must be a JSON object") from None
    if not isinstance(args, dict):
        raise GlmkitError("assistant tool_calls arguments must be a JSON object")
    return ToolCall(c.get("id") or new_call_id(), fn.get("name", ""), args)


def to_glm_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """OpenAI request messages (+ flat tools) -> ChatGLM3 history messages."""
    out: list[dict] = []
    if tools:
        system = next((m for m in messages if m.get("role") == "system"), None)
        out.append({"role": "system", "content": _text(system["content"]) if system else TOOLS_PREAMBLE,
                    "tools": tools})
    for m in messages:
        role = m.get("role")
        if role == "system":
            if not tools:
                out.append({"role": "system", "content": _text(m.get("content"))})
        elif role == "user":
            out.append({"role": "user", "content": _text(m.get("content"))})
        elif role == "assistant":
            text = _text(m.get("content"))
            calls = m.get("tool_calls") or []
            if text or not calls:
                out.append({"role": "assistant", "content": text})
            out += [tool_call_message(_call(c)) for c in calls]
        elif role in ("tool", "function"):
            out.append({"role": "observation", "content": _text(m.get("content"))})
        else:
            raise GlmkitError(f"unsupported role {role!r}")
    return out
