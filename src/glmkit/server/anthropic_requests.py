"""The Anthropic Messages API's request bodies (POST /v1/messages and /v1/messages/count_tokens)
as pydantic models, and their way into the chat layer.

A request is checked here (bad input: one 400 naming the field, in Anthropic's error shape, see
server.errors) and then turned into the OpenAI-style message dicts that every model's protocol
already reads (chat.openai_compat): a `tool_use` block becomes an assistant `tool_calls` entry,
a `tool_result` block a `tool` message.  So the prompt is built by the same code as for
/v1/chat/completions, and user text never becomes special tokens."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, field_validator, model_validator

from ..chat.json_schema import MAX_CONTAINERS, SchemaRefused, check_schema
from ..engine.requests import SamplingParams
from .errors import APIError
from .openai_requests import MAX_STOP_CHARS, _Lenient

# Anthropic sets no small limit; matching costs per character and stop string, so bound it anyway
MAX_STOP_SEQUENCES = 16
_NEEDS = {"text": ("text",), "tool_use": ("id", "name", "input"), "tool_result": ("tool_use_id",)}


def _as_blocks(value):
    """Content given as a string means one text block (as Anthropic has it)."""
    return [{"type": "text", "text": value}] if isinstance(value, str) else value


class Block(_Lenient):
    """One content block: text, tool_use or tool_result (whose content is text blocks).  One
    model with a check per type rather than a union, so that a wrong block is one readable
    error, not one per union member."""
    type: str
    text: str | None = None
    id: str | None = Field(None, max_length=256)       # tool_use
    name: str | None = Field(None, max_length=64)
    input: dict[str, Any] | None = None
    tool_use_id: str | None = Field(None, max_length=256)   # tool_result
    content: list[Block] | None = None
    is_error: bool = False

    _blocks = field_validator("content", mode="before")(_as_blocks)

    @model_validator(mode="after")
    def _known(self):
        if self.type in ("image", "document"):
            raise ValueError(f"{self.type} blocks are not supported: this server's models read text only")
        if self.type not in _NEEDS:
            raise ValueError(f"unsupported content block type {self.type!r} (text, tool_use and tool_result are)")
        missing = [f for f in _NEEDS[self.type] if getattr(self, f) is None]
        if missing:
            raise ValueError(f"a {self.type} block needs {' and '.join(missing)}")
        if self.type == "tool_result" and any(b.type != "text" for b in self.content or ()):
            raise ValueError("a tool_result's content must be a string or text blocks")
        return self

    def plain_text(self) -> str:
        """A text block's text, or a tool_result's content as text."""
        return self.text if self.type == "text" else "".join(b.text for b in self.content or ())


class Message(_Lenient):
    role: Literal["user", "assistant"]
    content: list[Block]

    _blocks = field_validator("content", mode="before")(_as_blocks)

    @model_validator(mode="after")
    def _blocks_fit_role(self):
        wrong = "tool_result" if self.role == "assistant" else "tool_use"
        if any(b.type == wrong for b in self.content):
            raise ValueError(f"{wrong} blocks belong in {'user' if wrong == 'tool_result' else 'assistant'} messages")
        return self


class Tool(_Lenient):
    type: Literal["custom"] | None = None      # client tools only: the server runs none of Anthropic's
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")   # it is a line of the prompt
    description: str = ""
    input_schema: dict[str, Any]               # checked by chat.json_schema before use
    strict: bool | None = None                 # a forced call's arguments are decoded under the schema


class ToolChoice(_Lenient):
    type: Literal["auto", "any", "tool", "none"]
    name: str | None = None
    disable_parallel_tool_use: bool = False    # accepted; a reply holds the calls the model writes


class CountTokensRequest(_Lenient):
    """What makes a prompt: the fields /v1/messages/count_tokens reads."""
    model: str = Field(min_length=1)           # any name: server.anthropic_api says why
    messages: list[Message] = Field(min_length=1)
    system: list[Block] | None = None
    tools: list[Tool] | None = Field(None, max_length=128)
    tool_choice: ToolChoice | None = None

    _system = field_validator("system", mode="before")(_as_blocks)

    @field_validator("system")
    @classmethod
    def _system_is_text(cls, v):
        if any(b.type != "text" for b in v or ()):
            raise ValueError("the system prompt must be a string or text blocks")
        return v

    @model_validator(mode="after")
    def _ends_with_user(self):
        # a trailing assistant message is a prefill: Anthropic continues it, which the chat
        # formats cannot express (their prompt ends with a fresh assistant turn); refuse, not guess
        if self.messages[-1].role != "user":
            raise ValueError("the last message must be from the user (prefilling the reply is not supported)")
        return self

    def flat_tools(self) -> list[dict]:
        """The tools as the chat layer lists them; none with tool_choice none."""
        if self.tool_choice and self.tool_choice.type == "none":
            return []
        return [{"name": t.name, "description": t.description, "parameters": t.input_schema} for t in self.tools or []]

    def check_schemas(self) -> None:
        """Every input_schema bounded (one budget for all), well-formed, local references only.
        Slow (the meta-schema check): run it in a worker thread."""
        budget = MAX_CONTAINERS
        for i, t in enumerate(self.tools or []):
            try:
                budget -= check_schema(t.input_schema, budget)
            except SchemaRefused as e:
                raise APIError(400, f"tools[{i}].input_schema: {e}", param=f"tools[{i}].input_schema") from None

    def forced_tool(self, tools: list[dict]) -> str | None:
        """The tool whose call the reply must be (tool_choice any or tool), or None."""
        choice = self.tool_choice
        if choice is None or choice.type in ("auto", "none"):
            return None
        names = [t["name"] for t in tools]
        if choice.type == "any":
            if len(names) == 1:
                return names[0]
            # a call is forced by writing its start, which needs the tool's name
            raise APIError(400, "tool_choice 'any' needs exactly one tool here; use {'type': 'tool', 'name': ...}",
                           param="tool_choice")
        if choice.name not in names:
            raise APIError(400, f"tool_choice names {choice.name!r}, which is not among the tools", param="tool_choice")
        return choice.name

    def strict_tool(self, name: str) -> bool:
        return any(t.name == name and t.strict for t in self.tools or [])

    def message_dicts(self) -> list[dict]:
        """The conversation as OpenAI-style messages (what protocol.api_messages reads)."""
        out = []
        if self.system:
            out.append({"role": "system", "content": "".join(b.text for b in self.system)})
        for m in self.messages:
            if m.role == "assistant":
                text = "".join(b.text for b in m.content if b.type == "text")
                calls = [{"id": b.id, "type": "function",
                          "function": {"name": b.name, "arguments": json.dumps(b.input, ensure_ascii=False)}}
                         for b in m.content if b.type == "tool_use"]
                out.append({"role": "assistant", "content": text, **({"tool_calls": calls} if calls else {})})
                continue
            # a user message: each tool_result is a tool message, text between them a user message
            text: list[str] = []
            for b in m.content:
                if b.type == "text":
                    text.append(b.text)
                    continue
                if text:
                    out.append({"role": "user", "content": "".join(text)})
                    text = []
                # the formats have no flag for a failed call: the model reads that it failed
                result = b.plain_text()
                out.append({"role": "tool", "tool_call_id": b.tool_use_id,
                            "content": f"Error: {result}" if b.is_error else result})
            if text:
                out.append({"role": "user", "content": "".join(text)})
        return out


class MessagesRequest(CountTokensRequest):
    max_tokens: int = Field(ge=1, le=2**31 - 1)     # required, as Anthropic has it
    stop_sequences: list[str] | None = Field(None, max_length=MAX_STOP_SEQUENCES)
    temperature: float | None = Field(None, ge=0, le=1)     # Anthropic's range
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)
    stream: bool = False
    metadata: dict[str, Any] | None = None     # accepted and ignored (user_id)

    @field_validator("stop_sequences")
    @classmethod
    def _bounded_stops(cls, v):
        if any(len(s) > MAX_STOP_CHARS for s in v or ()):
            raise ValueError(f"a stop sequence is at most {MAX_STOP_CHARS} characters")
        return v

    def to_sampling_params(self, defaults: dict) -> SamplingParams:
        """The request's sampling over the model's `defaults` (a field left out: the default)."""
        fields = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)
        return SamplingParams(**{**defaults, **{k: v for k, v in fields.items() if v is not None}})
