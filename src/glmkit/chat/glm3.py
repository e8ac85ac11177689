"""ChatGLM3's chat protocol, at the level of token ids (as the original tokenizer and chat() build it).

Prompt: [gMASK] sop, then per message: role id, sp(metadata + "\\n"), sp(content); then a bare
<|assistant|>.  Reply: one or more segments separated by the <|assistant|> *id*; the first line
of each segment is its metadata (a tool name, "interpreter", or blank for plain text).
"""

from __future__ import annotations

import json

from ..tokenizers.streaming import IncrementalDecoder
from .formats import ReplyEvent
from .messages import validate_messages
from .tool_calls import ToolCall

TOOLS_PREAMBLE = "Answer the following questions as best as you can. You have access to the following tools:"
TRAINING_TIME = ("[[训练时间]]", "2023年")  # placeholder the model was trained to emit
_MAX_METADATA_CHARS = 200  # a "metadata" line longer than this is treated as plain text


def tools_text(tools: list) -> str:
    return json.dumps(tools, indent=4, ensure_ascii=False)


def tool_call_message(call: ToolCall) -> dict:
    """A call as ChatGLM3 writes it in its history (for an API client's assistant `tool_calls`):
    a segment named after the tool, holding a fenced `tool_call(...)` of Python literals."""
    parts = ", ".join(f"{k}={_py_literal(v)}" for k, v in call.arguments.items())
    # the leading space is how the official examples write it
    return {"role": "assistant", "metadata": call.name, "content": f" ```python\ntool_call({parts})\n```"}


def _py_literal(v) -> str:
    if isinstance(v, bool) or v is None:
        return repr(v)
    if isinstance(v, str):
        return json.dumps(v, ensure_ascii=False)
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, list):
        return "[" + ", ".join(_py_literal(x) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{json.dumps(k, ensure_ascii=False)}: {_py_literal(x)}" for k, x in v.items()) + "}"
    return json.dumps(v, ensure_ascii=False)


class GLM3Format:
    name = "chatglm3"

    def __init__(self, tokenizer):
        self.tok = tokenizer
        self.role_ids = {r: tokenizer.special_id(f"<|{r}|>") for r in ("system", "user", "assistant", "observation")}
        self.prefix = [tokenizer.special_id("[gMASK]"), tokenizer.special_id("sop")]
        self.stop_ids = frozenset({tokenizer.eos_id, self.role_ids["user"], self.role_ids["observation"]})

    def encode_message(self, role: str, content: str, metadata: str = "") -> list[int]:
        return [self.role_ids[role]] + self.tok.encode(f"{metadata}\n") + self.tok.encode(content)

    def encode_turn(self, m: dict) -> list[int]:
        """One checked history message (validate_messages): a system message's tools are listed
        after its content.  The fine-tuning data (glmkit.finetune) is built from these too."""
        content = m["content"]
        if m["role"] == "system" and "tools" in m:
            content = content + "\n" + tools_text(m["tools"])
        return self.encode_message(m["role"], content, m.get("metadata", ""))

    def encode(self, messages: list[dict]) -> list[int]:
        ids = list(self.prefix)
        for m in validate_messages(messages):
            ids += self.encode_turn(m)
        return ids + [self.role_ids["assistant"]]

    def reply_parser(self) -> "GLM3ReplyParser":
        return GLM3ReplyParser(self.tok, self.role_ids["assistant"])


class _Segment:
    def __init__(self, tok):
        self.decoder = IncrementalDecoder(tok, strip_leading_space=getattr(tok, "strip_leading_space", False))
        self.head = ""            # text before the first newline: the metadata line
        self.metadata: str | None = None
        self.parts: list[str] = []  # raw content, as history keeps it (a list: appending stays linear)
        self.shown_any = False    # plain segments: leading whitespace is not shown
        self.held = ""            # plain segments: trailing whitespace / partial placeholder
        self.tokens = 0

    @property
    def content(self) -> str:
        return "".join(self.parts)

    @property
    def plain(self) -> bool:
        return not (self.metadata or "").strip()


class GLM3ReplyParser:
    def __init__(self, tokenizer, assistant_id: int):
        self.tok = tokenizer
        self.assistant_id = assistant_id
        self.segments: list[_Segment] = [_Segment(tokenizer)]

    # -- streaming ---------------------------------------------------------------------
    def feed(self, token_id: int) -> list[ReplyEvent]:
        if token_id == self.assistant_id:
            events = self._close(self.segments[-1])
            self.segments.append(_Segment(self.tok))
            return events
        seg = self.segments[-1]
        seg.tokens += 1
        if self.tok.is_special(token_id):
            return []
        return self._text(seg, seg.decoder.feed(token_id))

    def finish(self) -> list[ReplyEvent]:
        return self._close(self.segments[-1])

    def _text(self, seg: _Segment, text: str) -> list[ReplyEvent]:
        if not text:
            return []
        if seg.metadata is None:
            seg.head += text
            if "\n" in seg.head:
                meta, rest = seg.head.split("\n", 1)
            elif len(seg.head) > _MAX_METADATA_CHARS:
                meta, rest = "", seg.head
            else:
                return []
            seg.metadata = meta
            return [ReplyEvent("segment", metadata=meta.strip())] + self._content(seg, rest)
        return self._content(seg, text)

    def _content(self, seg: _Segment, text: str) -> list[ReplyEvent]:
        seg.parts.append(text)
        if not seg.plain:
            return [ReplyEvent("text", text)] if text else []
        if text.isspace():      # only held: re-stripping the whole held run per token would be quadratic
            seg.held += text
            return []
        # plain text is shown stripped, with the training-time placeholder filled in
        if not seg.shown_any:
            text = text.lstrip()
        buf = seg.held + text
        body = buf.rstrip()
        trailing_ws = buf[len(body):]          # shown only once more text follows it
        ph, value = TRAINING_TIME
        body = body.replace(ph, value)
        keep = next((k for k in range(len(ph) - 1, 0, -1) if body.endswith(ph[:k])), 0)
        seg.held = body[len(body) - keep:] + trailing_ws if keep else trailing_ws
        body = body[:len(body) - keep]
        if body:
            seg.shown_any = True
            return [ReplyEvent("text", body)]
        return []

    def _close(self, seg: _Segment) -> list[ReplyEvent]:
        events = self._text(seg, seg.decoder.flush())
        if seg.metadata is None:
            if not seg.head and seg.tokens == 0:
                return events
            seg.metadata = ""
            events += [ReplyEvent("segment", metadata="")] + self._content(seg, seg.head)
        if seg.plain:
            tail = seg.held.rstrip()
            seg.held = ""
            if tail:
                events.append(ReplyEvent("text", tail))
        return events

    # -- result --------------------------------------------------------------------------
    def messages(self) -> list[dict]:
        out = []
        for seg in self.segments:
            if seg.metadata is None:
                continue
            content = seg.content.strip() if seg.plain else seg.content
            out.append({"role": "assistant", "metadata": seg.metadata, "content": content})
        return out
