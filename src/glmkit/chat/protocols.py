"""How a model asks for a tool or for code to run, and how the answer goes back to it.

ChatGLM3 was trained with its own protocol: a tool call is an assistant segment whose metadata
line names the tool (its content a `tool_call(...)` literal), code is a segment named
`interpreter`, and results come back in the observation role.  GLM-4 keeps the segments and
the observation role; its calls hold JSON arguments and its code segment is named `python`.

Models without that protocol (the Llama-family default model, anything with a chat template) get
the convention most open chat models are tuned on: the system prompt lists the tools as JSON, the
model answers `<tool_call>{"name": ..., "arguments": {...}}</tool_call>`, and for code it writes a
```python block.  Results come back in the template's `tool` role.

Either way a call is parsed as data (JSON, or ast literals only) straight into a ToolCall,
CodeCall or RefusedCall (chat.tool_calls), and never executed; running it is the agent's job,
after validation.  A reply may hold several calls; all are returned, in the order written, up to
MAX_CALLS_PER_REPLY.

Two ways in: `find_calls` reads a finished reply (the agent), and `call_parser` wraps a reply
parser so that calls come out of the token stream as they close (the API's `tool_calls` deltas),
the text around them streamed as it comes."""

from __future__ import annotations

import json

from . import glm3, glm4
from .formats import ReplyEvent
from .openai_compat import to_plain_messages, to_segment_messages
from .template import TOOL_CALL_CLOSE, TOOL_CALL_OPEN, tool_call_text
from .tool_calls import (DEPTH_ERROR, INTERPRETER, MAX_CALL_CHARS, Call, CodeCall, RefusedCall, ToolCall,
                         ToolCallError, check_code, check_literal, extract_code, find_fence, json_int, new_call_id,
                         parse_tool_call, validate_arguments)

# ChatGLM3's own code-interpreter system prompt (what the model was trained with)
GLM3_INTERPRETER_SYSTEM = ("你是一位智能AI助手，你叫ChatGLM，你连接着一台电脑，但请注意不能联网。在使用Python解决任务时，"
                           "你可以运行代码并得到结果，如果运行结果有错误，你需要尽可能对代码进行改进。"
                           "你可以处理用户上传到电脑上的文件，文件默认存储路径是/mnt/data/。")

MAX_CALLS_PER_REPLY = 16   # more are refused: each costs a tool run, and a reply is cheap to fill with them
TOO_MANY_CALLS = f"a reply may make at most {MAX_CALLS_PER_REPLY} calls; the rest were not run"

StreamItem = str | ToolCall | RefusedCall   # what a call parser makes of a reply: text to show, or a call


def segment_heading(name: str, after_text: bool) -> str:
    """How a ChatGLM3 segment named after no tool of the caller's is shown: its content under
    `[name]` (the one rule for the Python API, the terminal, the API and the console)."""
    return f"\n[{name}]\n" if after_text else f"[{name}]\n"


class GLM3Protocol:
    observation_role = "observation"
    native = True          # the model was trained to call tools this way
    json_prefix = "\n"     # a JSON answer is a plain segment: its metadata line comes first, empty
    call_suffix = None     # a call's arguments are Python-like `tool_call(...)`, not JSON: not constrained

    def system_message(self, tools: list[dict], interpreter: bool, system: str | None) -> dict | None:
        if tools:
            return {"role": "system", "content": system or glm3.TOOLS_PREAMBLE, "tools": tools}
        if interpreter:
            return {"role": "system", "content": system or GLM3_INTERPRETER_SYSTEM}
        return {"role": "system", "content": system} if system else None

    def api_messages(self, messages: list[dict], tools: list[dict]) -> list[dict]:
        """An OpenAI request's messages and flat tools as this model's history."""
        return to_segment_messages(messages, tools, glm3.TOOLS_PREAMBLE, glm3.tool_call_message)

    @staticmethod
    def forced_start(name: str) -> str:
        """How a reply that must call `name` begins (tool_choice naming a function)."""
        return f"{name}\n"

    @staticmethod
    def call_name(metadata: str, runnable) -> str:
        """What a segment's metadata line names, as glmkit calls it (the interpreter included)."""
        return metadata

    def visible_text(self, events, tools: set[str]):
        """The reply's answer text.  A segment named after one of `tools` (what the caller runs,
        the interpreter included) is a call being written, not text; a segment with another name
        is shown under its name, as the API shows it (segment_heading)."""
        in_call, shown_any = False, False
        for ev in events:
            if ev.kind == "segment":
                in_call = self.call_name(ev.metadata, tools) in tools
                if ev.metadata and not in_call:
                    yield segment_heading(ev.metadata, shown_any)
                    shown_any = True
            elif ev.kind == "text" and not in_call and ev.text:
                shown_any = True
                yield ev.text

    def find_calls(self, segments: list[dict], runnable: set[str]) -> list[Call]:
        """One call per segment named after a runnable tool (or the interpreter), in order."""
        names = [self.call_name(s.get("metadata", "").strip(), runnable) for s in segments]
        named = [(n, s) for n, s in zip(names, segments) if n in runnable]
        calls = [self._call(n, s["content"]) for n, s in named[:MAX_CALLS_PER_REPLY]]
        if len(named) > MAX_CALLS_PER_REPLY:
            calls.append(RefusedCall(new_call_id(), "?", TOO_MANY_CALLS))
        return calls

    def _call(self, name: str, content: str) -> Call:
        try:
            if name == INTERPRETER:
                return CodeCall(new_call_id(), extract_code(content))
            return ToolCall(new_call_id(), name, self.parse_arguments(content))
        except ToolCallError as e:
            return RefusedCall(new_call_id(), name, str(e))

    parse_arguments = staticmethod(parse_tool_call)    # a call segment's content -> its arguments

    def call_parser(self, reply_parser, tools: dict[str, dict | None]) -> "SegmentCallParser":
        return SegmentCallParser(reply_parser, tools, self.parse_arguments)


class GLM4Protocol(GLM3Protocol):
    """GLM-4's calls: the same segments, JSON arguments, code under `python` (chat.glm4)."""
    call_suffix = ""       # after the forced name line, the arguments are the whole segment

    def system_message(self, tools: list[dict], interpreter: bool, system: str | None) -> dict | None:
        listed = list(tools) + ([{"type": glm4.PYTHON}] if interpreter else [])
        if listed:
            return {"role": "system", "content": system or "", "tools": listed}
        return {"role": "system", "content": system} if system else None

    def api_messages(self, messages: list[dict], tools: list[dict]) -> list[dict]:
        return to_segment_messages(messages, tools, "", glm4.tool_call_message)

    @staticmethod
    def call_name(metadata: str, runnable) -> str:
        # `python` is the interpreter, unless the caller has a tool of that name and no interpreter
        if metadata == glm4.PYTHON and INTERPRETER in runnable and glm4.PYTHON not in runnable:
            return INTERPRETER
        return metadata

    @staticmethod
    def parse_arguments(content: str) -> dict:
        args = _load_json(content)
        if not isinstance(args, dict):
            raise ToolCallError("tool call arguments must be a JSON object")
        return check_literal(args)


class SegmentCallParser:
    """ChatGLM3 / GLM-4 reply parser events -> text, and a ToolCall (or RefusedCall) for each
    segment named after one of `tools` ({name: parameters schema}) once it ends, its content read
    by `parse_arguments`.  A segment with another name is shown as text under a `[name]`
    heading: the client has no such tool to call."""

    def __init__(self, inner, tools: dict[str, dict | None], parse_arguments=parse_tool_call):
        self.inner, self.tools = inner, tools
        self.parse_arguments = parse_arguments
        self.tool: str | None = None      # the tool whose call is being written
        self.parts: list[str] = []
        self.shown_any = False

    def feed(self, token_id: int) -> list[StreamItem]:
        return self._items(self.inner.feed(token_id))

    def finish(self) -> list[StreamItem]:
        return self._items(self.inner.finish()) + self._close()

    def messages(self) -> list[dict]:
        return self.inner.messages()

    def _items(self, events: list[ReplyEvent]) -> list[StreamItem]:
        out: list[StreamItem] = []
        for e in events:
            if e.kind == "segment":
                out += self._close()
                self.tool = e.metadata if e.metadata in self.tools else None
                if e.metadata and self.tool is None:
                    out.append(self._text(segment_heading(e.metadata, self.shown_any)))
            elif self.tool is not None:
                self.parts.append(e.text)
            elif e.text:
                out.append(self._text(e.text))
        return out

    def _text(self, text: str) -> str:
        self.shown_any = True
        return text

    def _close(self) -> list[StreamItem]:
        name, text = self.tool, "".join(self.parts)
        self.tool, self.parts = None, []
        if name is None:
            return []
        try:
            call = ToolCall(new_call_id(), name, self.parse_arguments(text))
            validate_arguments(call.arguments, self.tools[name])
            return [call]
        except ToolCallError as e:
            return [RefusedCall(new_call_id(), name, str(e), written=self._text(f"[{name}] {text.strip()}"))]


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
    native = False                     # a convention the model may or may not have been tuned on
    json_prefix = ""                   # a JSON answer is the whole reply
    call_suffix = f"}}\n{TOOL_CALL_CLOSE}"   # after forced_start's `"arguments": `, the object, then the close

    def api_messages(self, messages: list[dict], tools: list[dict]) -> list[dict]:
        """An OpenAI request's messages and flat tools as plain messages."""
        return to_plain_messages(messages, tools, lambda t, system: self.system_message(t, False, system),
                                 tool_call_text)

    @staticmethod
    def forced_start(name: str) -> str:
        return f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(name)}, "arguments": '

    def system_message(self, tools: list[dict], interpreter: bool, system: str | None) -> dict | None:
        parts = [system] if system else []
        if tools:
            listing = "\n".join(json.dumps({"type": "function", "function": t}, ensure_ascii=False) for t in tools)
            parts.append(TAGGED_TOOLS_SYSTEM.format(tools=listing))
        if interpreter:
            parts.append(TAGGED_INTERPRETER_SYSTEM)
        return {"role": "system", "content": "\n\n".join(parts)} if parts else None

    def visible_text(self, events, tools: set[str]):
        """The reply's text with its <tool_call> blocks taken out (they are steps, not answer text).
        ```python blocks stay: for these models code is part of the answer."""
        hide = TaggedCallParser(None, dict.fromkeys(tools - {INTERPRETER}))   # code comes as ```python, never a tag
        for ev in events:
            yield from (item for item in hide.filter([ev]) if isinstance(item, str))
        yield from (item for item in hide.filter([], final=True) if isinstance(item, str))

    def find_calls(self, segments: list[dict], runnable: set[str]) -> list[Call]:
        """Every <tool_call> block and ```python block of a reply, in order, if it starts within
        MAX_SCAN_CHARS (one further on is refused).  Linear time: each kind is searched for again
        only once the scan has passed the last one found, from there."""
        text = "".join(s["content"] for s in segments)
        tools = runnable - {INTERPRETER}      # code comes only as a ```python block, never as a tag
        code = INTERPRETER in runnable

        def next_tag(pos):
            return text.find(TOOL_CALL_OPEN, pos, MAX_SCAN_CHARS + len(TOOL_CALL_OPEN) - 1) if tools else -1

        def next_fence(pos):
            return find_fence(text, PYTHON_LANGS, MAX_SCAN_CHARS, start=pos) if code else None

        calls: list[Call] = []
        pos, tag, fence = 0, next_tag(0), next_fence(0)
        while tag >= 0 or fence:
            if len(calls) == MAX_CALLS_PER_REPLY:
                calls.append(RefusedCall(new_call_id(), "?", TOO_MANY_CALLS))
                return calls
            if fence and (tag < 0 or fence[0] < tag):
                # the block runs to the next ``` (find_fence's rule; none is left on the opener's line)
                pos = text.find("```", fence[0] + 3) + 3
                try:
                    calls.append(CodeCall(new_call_id(), check_code(fence[1])))
                except ToolCallError as e:
                    calls.append(RefusedCall(new_call_id(), INTERPRETER, str(e)))
            else:
                start = tag + len(TOOL_CALL_OPEN)
                end = text.find(TOOL_CALL_CLOSE, start)     # an unclosed block runs to the end of the reply
                pos = len(text) if end < 0 else end + len(TOOL_CALL_CLOSE)
                calls.append(self.parse(text[start:] if end < 0 else text[start:end], tools))
            if 0 <= tag < pos:        # found, but used up or inside the block just read
                tag = next_tag(pos)
            if fence and fence[0] < pos:
                fence = next_fence(pos)
        rest = max(pos, MAX_SCAN_CHARS)
        if (tools and text.find(TOOL_CALL_OPEN, rest) >= 0) or (code and text.find("```py", rest) >= 0):
            calls.append(RefusedCall(new_call_id(), "?", f"a tool call must start within the first "
                                                         f"{MAX_SCAN_CHARS} characters of a reply"))
        return calls

    @staticmethod
    def parse(body: str, tools) -> ToolCall | RefusedCall:
        """The JSON inside <tool_call> tags, checked to name one of `tools` with object arguments
        that pass check_literal (the rule ChatGLM3's calls follow too)."""
        try:
            call = _load_json(body)
            if not isinstance(call, dict) or not isinstance(call.get("name"), str):
                raise ToolCallError('a tool call must be a JSON object {"name": ..., "arguments": {...}}')
            name = check_literal(call["name"])
        except ToolCallError as e:
            return RefusedCall(new_call_id(), "?", str(e))
        try:
            args = call.get("arguments", {})
            if isinstance(args, str):      # some models send arguments as a JSON string, as OpenAI does
                args = _load_json(args)
            if name not in tools:
                raise ToolCallError(f"there is no tool named {name!r}")
            if not isinstance(args, dict):
                raise ToolCallError("arguments must be a JSON object")
            return ToolCall(new_call_id(), name, check_literal(args))
        except ToolCallError as e:
            return RefusedCall(new_call_id(), name, str(e))

    def call_parser(self, reply_parser, tools: dict[str, dict | None]) -> "TaggedCallParser":
        return TaggedCallParser(reply_parser, tools)


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


class TaggedCallParser:
    """A template model's reply parser with its <tool_call> blocks taken out of the text: each
    becomes a ToolCall, checked against its tool's schema ({name: parameters} in `tools`), or a
    RefusedCall holding what the model wrote.  Text that might be the start of a tag is held
    back until it is not.  Without tools a reply is all text."""

    def __init__(self, inner, tools: dict[str, dict | None]):
        self.inner, self.tools = inner, tools
        self.buf, self.in_call = "", False
        self.seen = 0        # in a call: how much of buf is known to hold no closing tag

    def feed(self, token_id: int) -> list[StreamItem]:
        return self.filter(self.inner.feed(token_id))

    def finish(self) -> list[StreamItem]:
        return self.filter(self.inner.finish(), final=True)

    def messages(self) -> list[dict]:
        return self.inner.messages()

    def filter(self, events: list[ReplyEvent], final: bool = False) -> list[StreamItem]:
        """Reply events in; the text, with each <tool_call> block replaced by its call, out."""
        text = "".join(e.text for e in events if e.kind == "text")
        if not self.tools:
            return [text] if text else []
        self.buf += text
        out: list[StreamItem] = []
        while True:
            if not self.in_call:
                i = self.buf.find(TOOL_CALL_OPEN)
                if i < 0:
                    keep = 0 if final else _prefix_overlap(self.buf, TOOL_CALL_OPEN)
                    text, self.buf = self.buf[:len(self.buf) - keep], self.buf[len(self.buf) - keep:]
                    return out + ([text] if text else [])
                if i:
                    out.append(self.buf[:i])
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
                out.append(self._call(body, closed=j >= 0))

    def _call(self, body: str, closed: bool) -> ToolCall | RefusedCall:
        call = TaggedProtocol.parse(body, self.tools)
        if isinstance(call, ToolCall):
            try:
                validate_arguments(call.arguments, self.tools[call.name])
                return call
            except ToolCallError as e:
                call = RefusedCall(call.id, call.name, str(e))
        # shown, not run: the client sees what the model wrote and why
        written = f"{TOOL_CALL_OPEN}{body.strip()}{TOOL_CALL_CLOSE if closed else ''}"
        return RefusedCall(call.id, call.name, call.reason, written=written)


def _prefix_overlap(text: str, tag: str) -> int:
    """Length of the longest end of `text` that is a start of `tag`."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if text.endswith(tag[:n]):
            return n
    return 0


def protocol_for(chat_format):
    """ChatGLM3's and GLM-4's formats have their own protocols; every other model (template
    models, ChatGLM2) gets the tagged one."""
    if isinstance(chat_format, glm4.GLM4Format):
        return GLM4Protocol()
    return GLM3Protocol() if isinstance(chat_format, glm3.GLM3Format) else TaggedProtocol()
