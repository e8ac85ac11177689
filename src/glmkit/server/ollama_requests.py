"""Ollama's API request bodies (/api/chat, /api/generate, /api/show) as pydantic models.

As with the OpenAI bodies (openai_requests), every field the server acts on is typed and bounded
here and fields we do not know are ignored; what Ollama has but glmkit cannot do (images, a
Go template, `suffix`, thinking) is refused by name rather than silently dropped.  Messages and
tools leave here in the OpenAI shapes the chat layer already reads (chat.openai_compat), and
`format` as a ResponseFormat, so constraining and checking a reply is the OpenAI route's code."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import Field, field_validator

from ..chat.json_schema import MAX_CONTAINERS, SchemaRefused, check_schema, containers
from ..chat.openai_compat import flat_tools
from ..engine.requests import SamplingParams
from .errors import APIError
from .openai_requests import INT64, JSONSchemaFormat, ResponseFormat, ToolDef, _Lenient, bounded_stops

MAX_NAME_CHARS = 256      # a model name: compared with the served id, echoed back


# Fields Ollama has and glmkit cannot honour: fine when empty, else one 400 that says so
UNSUPPORTED = {"images": "images", "think": "thinking", "suffix": "suffix (fill in the middle)",
               "template": "a template (send raw: true with the prompt formatted)",
               "context": "context (send the conversation to /api/chat)"}


def _refuse(value, info):
    if value:
        raise ValueError(f"{UNSUPPORTED[info.field_name]} is not supported by this server")
    return value


class Options(_Lenient):
    """The options glmkit acts on.  Ollama's others (num_ctx, num_gpu, mirostat, ...) tune Ollama's
    own runner and are ignored: the server's context and batch are fixed when it starts."""
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)
    repeat_penalty: float | None = Field(None, gt=0)
    seed: int | None = Field(None, **INT64)
    # Ollama: -1 generates until the model stops, -2 until the context is full; here both mean
    # "up to the server's --max-tokens"
    num_predict: int | None = Field(None, ge=-2, le=2**31 - 1)
    stop: str | list[str] | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None

    @field_validator("num_predict")
    @classmethod
    def _not_zero(cls, v):
        if v == 0:
            raise ValueError("must be at least 1, or -1 (no limit but the server's)")
        return v

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v):
        if v:      # 0 is "off"; anything else would be silently ignored
            raise ValueError("not supported; use repeat_penalty")
        return v

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, v):
        return bounded_stops(v)

    def sampling_params(self, defaults: dict) -> SamplingParams:
        """The options over the model's `defaults`.  A negative seed is Ollama's "random"."""
        fields = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                      repetition_penalty=self.repeat_penalty,
                      seed=self.seed if self.seed is not None and self.seed >= 0 else None)
        return SamplingParams(**{**defaults, **{k: v for k, v in fields.items() if v is not None}})

    def max_new_tokens(self, limit: int) -> int:
        if self.num_predict is None or self.num_predict < 0:
            return limit
        if self.num_predict > limit:
            raise APIError(400, f"options.num_predict is limited to {limit} on this server")
        return self.num_predict

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class FunctionCall(_Lenient):
    name: str = Field(min_length=1, max_length=64)
    arguments: dict[str, Any] = Field(default_factory=dict)    # an object, not JSON text (unlike OpenAI)

    @field_validator("arguments")
    @classmethod
    def _bounded(cls, v):
        containers(v)       # as deep as the chat layer reads arguments (ValueError: a 400), never a RecursionError
        return v


class ToolCall(_Lenient):
    function: FunctionCall


class Message(_Lenient):
    role: Literal["system", "user", "assistant", "tool"]
    content: str | None = None
    tool_calls: list[ToolCall] | None = Field(None, max_length=64)
    tool_name: str | None = Field(None, max_length=64)     # a tool message: the tool that answered
    images: list[Any] | None = None

    _images = field_validator("images")(_refuse)

    def openai_dict(self) -> dict:
        """The message as the chat layer reads OpenAI's: arguments as JSON text (it parses them
        back under its own bounds), the tool's name as `name`."""
        out: dict = {"role": self.role, "content": self.content or ""}
        if self.tool_calls:
            out["tool_calls"] = [{"type": "function", "function": {"name": c.function.name,
                                                                   "arguments": json.dumps(c.function.arguments)}}
                                 for c in self.tool_calls]
        if self.tool_name:
            out["name"] = self.tool_name
        return out


class _Generation(_Lenient):
    model: str = Field(min_length=1, max_length=MAX_NAME_CHARS)
    # "json": any JSON object; an object: a JSON schema the reply must match
    format: Literal["", "json"] | dict[str, Any] | None = None
    options: Options = Field(default_factory=Options)
    stream: bool = True                 # Ollama streams unless told not to
    keep_alive: float | str | None = None   # accepted and ignored: the one model stays loaded
    think: bool | str | None = None

    _think = field_validator("think")(_refuse)

    @field_validator("options", mode="before")
    @classmethod
    def _null_options(cls, v):
        return {} if v is None else v

    def response_format(self) -> ResponseFormat | None:
        if not self.format:
            return None
        if self.format == "json":
            return ResponseFormat(type="json_object")
        return ResponseFormat(type="json_schema", json_schema=JSONSchemaFormat(schema=self.format))

    def check_schemas(self, tools: list[ToolDef] = ()) -> None:
        """Every client schema, before any use: bounded (one budget for all), well-formed, local
        references only (chat.json_schema).  Slow (the meta-schema check): run it in a thread."""
        items = [(f"tools[{i}].function.parameters", t.function.parameters) for i, t in enumerate(tools)
                 if t.function.parameters is not None]
        if isinstance(self.format, dict):
            items.append(("format", self.format))
        budget = MAX_CONTAINERS
        for param, schema in items:
            try:
                budget -= check_schema(schema, budget)
            except SchemaRefused as e:
                raise APIError(400, f"{param}: {e}", param=param) from None


class ChatRequest(_Generation):
    messages: list[Message] = Field(default_factory=list)     # none: Ollama's way to load a model
    tools: list[ToolDef] | None = Field(None, max_length=128)

    def message_dicts(self) -> list[dict]:
        return [m.openai_dict() for m in self.messages]

    def flat_tools(self) -> list[dict]:
        return flat_tools([t.model_dump() for t in self.tools or []])


class GenerateRequest(_Generation):
    prompt: str = ""                   # empty: Ollama's way to load a model
    system: str | None = None
    raw: bool = False                  # the prompt as is: no chat format (and so no system message)
    suffix: str | None = None
    template: str | None = None
    context: list[int] | None = None   # Ollama's deprecated conversation memory
    images: list[Any] | None = None

    _unsupported = field_validator("suffix", "template", "context", "images")(_refuse)


class ShowRequest(_Lenient):
    model: str | None = Field(None, max_length=MAX_NAME_CHARS)
    name: str | None = Field(None, max_length=MAX_NAME_CHARS)     # older clients' field

    def model_name(self) -> str:
        if not (self.model or self.name):
            raise APIError(400, "model is required")
        return self.model or self.name
