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
from dataclasses import dataclass

from .formats import ReplyEvent
from .glm3 import TOOLS_PREAMBLE
from .tool_calls import (DEPTH_ERROR, MAX_CALL_CHARS, ToolCallError, check_code, check_literal, extract_code,
                         find_fence, format_tool_call, json_int, parse_tool_call)

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


TOOL_CALL_OPEN, TOOL_CALL_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_LANGS = ("python", "py")
MAX_SCAN_CHARS = 100_000   # a call (tag or fence) must start within this much of a reply

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
        """The first <tool_call> block or ```python block of a reply.  Found with str.find, in
        linear time, and only if it starts within MAX_SCAN_CHARS; one further on is refused."""
        text = "".join(s["content"] for s in segments)
        tools = runnable - {INTERPRETER}      # code comes only as a ```python block, never as a tag
        tag = text.find(TOOL_CALL_OPEN, 0, MAX_SCAN_CHARS + len(TOOL_CALL_OPEN) - 1) if tools else -1
        fence = find_fence(text, PYTHON_LANGS, MAX_SCAN_CHARS) if INTERPRETER in runnable else None
        if fence and (tag < 0 or fence[0] < tag):
            try:
                return Call(INTERPRETER, code=check_code(fence[1]))
            except ToolCallError as e:
                return Call(INTERPRETER, error=str(e))
        if tag >= 0:
            start = tag + len(TOOL_CALL_OPEN)
            end = text.find(TOOL_CALL_CLOSE, start)     # an unclosed block runs to the end of the reply
            return self.parse(text[start:] if end < 0 else text[start:end], tools)
        if len(text) > MAX_SCAN_CHARS and ((tools and TOOL_CALL_OPEN in text[MAX_SCAN_CHARS:])
                                           or (INTERPRETER in runnable and "```py" in text[MAX_SCAN_CHARS:])):
            return Call("?", error=f"a tool call must start within the first {MAX_SCAN_CHARS} characters of a reply")
        return None

    @staticmethod
    def parse(body: str, tools: set[str]) -> Call:
        """The JSON inside <tool_call> tags, checked to name one of `tools` with object arguments
        that pass check_literal (the rule ChatGLM3's calls follow too)."""
        try:
            call = _load_json(body)
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise ToolCallError('a tool call must be a JSON object {"name": ..., "arguments": {...}}')
            name = check_literal(call["name"])
        except ToolCallError as e:
            return Call("?", error=str(e))
        try:
            args = call.get("arguments", {})
            if isinstance(args, str):      # some models send arguments as a JSON string, as OpenAI does
                args = _load_json(args)
            if name not in tools:
                raise ToolCallError(f"there is no tool named {name!r}")
            if not isinstance(args, dict):
                raise ToolCallError("arguments must be a JSON object")
            return Call(name, arguments=check_literal(args))
        except ToolCallError as e:
            return Call(name, error=str(e))


def _load_json(text: str):
    """JSON text -> Python values, refusing (ToolCallError) what json.loads would raise on."""
    if len(text) > MAX_CALL_CHARS:
        raise ToolCallError(f"tool call is longer than {MAX_CALL_CHARS} characters")
    try:
        # NaN, Infinity and 1e999 load as floats; check_literal refuses them
        return json.loads(text.strip(), parse_int=json_int)
    except json.JSONDecodeError as e:
        raise ToolCallError(f"tool call is not valid JSON ({e.msg})") from None
    except RecursionError:
        raise ToolCallError(DEPTH_ERROR) from None


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
        self.seen = 0        # in a call: how much of buf is known to hold no closing tag

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
                j = self.buf.find(TOOL_CALL_CLOSE, self.seen)   # from where the last search left off: linear
                # a body that cannot end within MAX_CALL_CHARS is refused now, not held to the end
                if j < 0 and not final and len(self.buf) < MAX_CALL_CHARS + len(TOOL_CALL_CLOSE):
                    self.seen = max(0, len(self.buf) - len(TOOL_CALL_CLOSE) + 1)
                    return out
                body = self.buf if j < 0 else self.buf[:j]
                self.buf = "" if j < 0 else self.buf[j + len(TOOL_CALL_CLOSE):]
                self.in_call, self.seen = False, 0
                out += self._call(body, closed=j >= 0)

    def _call(self, body: str, closed: bool) -> list[ReplyEvent]:
        call = TaggedProtocol.parse(body, self.tools)
        if call.error:   # shown, not run: the client sees what the model wrote and why
            close = TOOL_CALL_CLOSE if closed else ""
            return [ReplyEvent("text", f"{TOOL_CALL_OPEN}{body.strip()}{close}\n(tool call refused: {call.error})")]
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
