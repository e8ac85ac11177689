"""OpenAI chat messages and tools <-> the history messages a chat format reads.

Roles: system/user/assistant map one to one; `tool` becomes the `observation` role; an
assistant message carrying `tool_calls` becomes a ToolCall per call, which the model's protocol
writes the way the model writes it (chat.glm3, chat.glm4, chat.template).  OpenAI `tools` become
the flat `{name, description, parameters}` list that a system message carries.  Which of the two
shapes below a model gets is its protocol's choice (chat.protocols).  The way back:
`openai_tool_call` is a ToolCall as the API returns it.
"""

from __future__ import annotations

import json

from ..errors import GlmkitError
from collections.abc import Callable

from .json_schema import loads_bounded
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


def content_text(content) -> str:
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


def to_plain_messages(messages: list[dict], tools: list[dict], system_message: Callable[[list[dict], str | None], dict],
                      call_text: Callable[[ToolCall], str]) -> list[dict]:
    """OpenAI request messages (+ flat tools) -> plain {role, content} messages, for a model whose
    calls are text inside its answer: `system_message(tools, system text)` lists the tools,
    `call_text` writes an earlier call."""
    out: list[dict] = []
    if tools:
        system = next((m for m in messages if m.get("role") == "system"), None)
        out.append(system_message(tools, content_text(system["content"]) if system else None))
    for m in messages:
        role = m.get("role")
        if role == "system" and tools:
            continue
        content = content_text(m.get("content"))
        if role == "assistant" and m.get("tool_calls"):
            calls = [call_text(_call(c)) for c in m["tool_calls"]]
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


def to_segment_messages(messages: list[dict], tools: list[dict], preamble: str,
                        call_message: Callable[[ToolCall], dict]) -> list[dict]:
    """OpenAI request messages (+ flat tools) -> history messages for a model whose calls are
    segments of their own (ChatGLM3, GLM-4): the tools ride on the system message (its text, or
    `preamble` when the request has none), `call_message` writes an earlier call."""
    out: list[dict] = []
    if tools:
        system = next((m for m in messages if m.get("role") == "system"), None)
        out.append({"role": "system", "content": content_text(system["content"]) if system else preamble,
                    "tools": tools})
    for m in messages:
        role = m.get("role")
        if role == "system":
            if not tools:
                out.append({"role": "system", "content": content_text(m.get("content"))})
        elif role == "user":
            out.append({"role": "user", "content": content_text(m.get("content"))})
        elif role == "assistant":
            text = content_text(m.get("content"))
            calls = m.get("tool_calls") or []
            if text or not calls:
                out.append({"role": "assistant", "content": text})
            out += [call_message(_call(c)) for c in calls]
        elif role in ("tool", "function"):
            out.append({"role": "observation", "content": content_text(m.get("content"))})
        else:
            raise GlmkitError(f"unsupported role {role!r}")
    return out
