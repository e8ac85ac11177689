"""How a model asks for a tool or for code to run, and how the answer goes back to it.

ChatGLM3 was trained with its own protocol: a tool call is an assistant segment whose metadata
line names the tool (its content a `tool_call(...)` literal), code is a segment named
`interpreter`, and results come back in the observation role.

Models without that protocol (the Llama-family default model, anything with a chat template) get
the convention most open chat models are tuned on: the system prompt lists the tools as JSON, the
model answers `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, and for code it writes a
```python block.  Results come back in the template's `tool` role.

Either way a call is parsed as data (JSON, or ast literals only) and never executed; running it
is the agent's job, after validation."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from .formats import ReplyEvent
from .glm3 import TOOLS_PREAMBLE
from .tool_calls import MAX_CALL_CHARS, ToolCallError, extract_code, format_tool_call, parse_tool_call

# ChatGLM3's own code-interpreter system prompt (what the model was trained with)
GLM3_INTERPRETER_SYSTEM = ("你是一位智能AI助手，你叫ChatGLM，你连接着一台电脑，但请注意不能联网。在使用Python解决任务时，"
                           "你可以运行代码并得到结果，如果运行结果有错误，你需要尽可能对代码进行改进。"
                           "你可以处理用户上传到电脑上的文件，文件默认存储路径是/mnt/data/。")

INTERPRETER = "interpreter"


@dataclass
class Call:
    """One request from the model: a tool with arguments, or code for the interpreter."""
    name: str                    # tool name, or "interpreter"
    arguments: dict | None = None
    code: str | None = None
    error: str | None = None     # why the call cannot be accepted (shown to the model)


class GLM3Protocol:
    observation_role = "observation"

    def reply_filter(self, tools: set[str]):
        return None        # calls are already segments

    def system_message(self, tools: list[dict], interpreter: bool, system: str | None) -> dict | None:
        if tools:
            return {"role": "system", "content": system or TOOLS_PREAMBLE, "tools": tools}
        if interpreter:
            return {"role": "system", "content": system or GLM3_INTERPRETER_SYSTEM}
        return {"role": "system", "content": system} if system else None

    def find_call(self, segments: list[dict], runnable: set[str]) -> Call | None:
        seg = next((s for s in segments if s.get("metadata", "").strip() in runnable), None)
        if seg is None:
            return None
        name = seg["metadata"].strip()
        try:
            if name == INTERPRETER:
                return Call(name, code=extract_code(seg["content"]))
            return Call(name, arguments=parse_tool_call(seg["content"]))
        except ToolCallError as e:
            return Call(name, error=str(e))


_TAGGED_CALL = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)
_PYTHON_FENCE = re.compile(r"```[ \t]*(?:python|py)[ \t]*\n(.*?)\n?[ \t]*```", re.DOTALL)

TAGGED_TOOLS_SYSTEM = (
    "You can call functions to help answer. The functions are listed below as JSON schemas.\n"
    "<tools>\n{tools}\n</tools>\n"
    "To call one, reply with only this, then stop and wait for the result:\n"
    '<tool_call>\n{{"name": "<function name>", "arguments": {{<arguments as a JSON object>}}}}\n</tool_call>')

TAGGED_INTERPRETER_SYSTEM = (
    "You are connected to a computer with Python (no internet). To run code, write it in a single "
    "```python block and stop; its output comes back to you, and you then answer. Files the user "
    "uploads are in /mnt/data/.")


class TaggedProtocol:
    observation_role = "observation"   # the template format renders it as its `tool` role

    def reply_filter(self, tools: set[str]):
        """Hides <tool_call> blocks from the streamed text (they become call segments)."""
        return TaggedCallParser(None, tools) if tools else None

    def system_message(self, tools: list[dict], interpreter: bool, system: str | None) -> dict | None:
        parts = [system] if system else []
        if tools:
            listing = "\n".join(json.dumps({"type": "function", "function": t}, ensure_ascii=False) for t in tools)
            parts.append(TAGGED_TOOLS_SYSTEM.format(tools=listing))
        if interpreter:
            parts.append(TAGGED_INTERPRETER_SYSTEM)
        return {"role": "system", "content": "\n\n".join(parts)} if parts else None

    def find_call(self, segments: list[dict], runnable: set[str]) -> Call | None:
        text = "".join(s["content"] for s in segments)
        tools = runnable - {INTERPRETER}      # code comes only as a ```python block, never as a tag
        tag = _TAGGED_CALL.search(text) if tools else None
        fence = _PYTHON_FENCE.search(text) if INTERPRETER in runnable else None
        if fence and (tag is None or fence.start() < tag.start()):
            return Call(INTERPRETER, code=fence.group(1).strip())
        if tag is None:
            return None
        return self.parse(tag.group(1), tools)

    @staticmethod
    def parse(body: str, tools: set[str]) -> Call:
        """The JSON inside <tool_call> tags, checked to name one of `tools` with object arguments."""
        if len(body) > MAX_CALL_CHARS:
            return Call("?", error=f"tool call is longer than {MAX_CALL_CHARS} characters")
        try:
            call = json.loads(body)
        except json.JSONDecodeError as e:
            return Call("?", error=f"tool call is not valid JSON ({e.msg})")
        except RecursionError:
            return Call("?", error="tool call is nested too deeply")
        if not isinstance(call, dict) or not isinstance(call.get("name"), str):
            return Call("?", error='a tool call must be a JSON object {"name": ..., "arguments": {...}}')
        name, args = call["name"], call.get("arguments", {})
        if isinstance(args, str):      # some models send arguments as a JSON string, as OpenAI does
            try:
                args = json.loads(args)
            except (json.JSONDecodeError, RecursionError):
                return Call(name, error="arguments must be a JSON object")
        if name not in tools:
            return Call(name, error=f"there is no tool named {name!r}")
        if not isinstance(args, dict):
            return Call(name, error="arguments must be a JSON object")
        return Call(name, arguments=args)


TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"


def tagged_call_text(name: str, arguments: dict) -> str:
    """How a template model is shown its own earlier call (an API client's assistant tool_calls)."""
    return f"{TOOL_CALL_OPEN}\n{json.dumps({'name': name, 'arguments': arguments}, ensure_ascii=False)}\n{TOOL_CALL_CLOSE}"


class TaggedCallParser:
    """A template model's reply parser for API tool calls: each <tool_call> block becomes a
    segment named after the tool, its arguments rewritten as ChatGLM3's `tool_call(...)` text,
    so the server's one tool-call path (literal parse, schema check, `tool_calls` deltas) serves
    both protocols.  Text that might be the start of a tag is held back until it is not."""

    def __init__(self, inner, tools: set[str]):
        self.inner, self.tools = inner, set(tools)
        self.buf, self.in_call = "", False

    def feed(self, token_id: int) -> list[ReplyEvent]:
        return self.filter(self.inner.feed(token_id))

    def finish(self) -> list[ReplyEvent]:
        return self.filter(self.inner.finish(), final=True)

    def messages(self) -> list[dict]:
        return self.inner.messages()

    def filter(self, events, final: bool = False) -> list[ReplyEvent]:
        """Reply events in, the same with <tool_call> blocks turned into call segments."""
        out = [e for e in events if e.kind != "text"]
        self.buf += "".join(e.text for e in events if e.kind == "text")
        while True:
            if not self.in_call:
                i = self.buf.find(TOOL_CALL_OPEN)
                if i < 0:
                    keep = 0 if final else _prefix_overlap(self.buf, TOOL_CALL_OPEN)
                    text, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                    return out + ([ReplyEvent("text", text)] if text else [])
                if i:
                    out.append(ReplyEvent("text", self.buf[:i]))
                self.buf, self.in_call = self.buf[i + len(TOOL_CALL_OPEN):], True
            else:
                j = self.buf.find(TOOL_CALL_CLOSE)
                if j < 0 and not final:
                    return out
                body = self.buf if j < 0 else self.buf[:j]
                self.buf = "" if j < 0 else self.buf[j + len(TOOL_CALL_CLOSE):]
                self.in_call = False
                out += self._call(body.strip())

    def _call(self, body: str) -> list[ReplyEvent]:
        call = TaggedProtocol.parse(body, self.tools)
        if call.error:   # shown, not run: the client sees what the model wrote and why
            return [ReplyEvent("text", f"{TOOL_CALL_OPEN}{body}{TOOL_CALL_CLOSE}\n(tool call refused: {call.error})")]
        return [ReplyEvent("segment", metadata=call.name), ReplyEvent("text", format_tool_call(call.arguments)),
                ReplyEvent("segment", metadata="")]


def _prefix_overlap(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def protocol_for(chat_format):
    """ChatGLM3's format has its own protocol; every template model gets the tagged one."""
    from .glm3 import GLM3Format
    return GLM3Protocol() if isinstance(chat_format, GLM3Format) else TaggedProtocol()
