"""Request bodies of the OpenAI-compatible API (pydantic: validation errors become 400s).

Every field the server acts on is typed and bounded here, so bad input is a 400 naming the
field rather than an exception deeper down."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..chat.json_schema import loads_bounded

MAX_STOPS = 4             # as OpenAI
MAX_STOP_CHARS = 256      # per stop sequence: matching holds back at most this much text
INT64 = dict(ge=-2**63, le=2**63 - 1)


class _Lenient(BaseModel):
    # Clients send fields we do not know (new OpenAI parameters); ignore rather than fail,
    # but a known field of the wrong type is a 400.  NaN and Infinity are never numbers here.
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)


class StreamOptions(_Lenient):
    include_usage: bool = False


class JSONSchemaFormat(_Lenient):
    model_config = ConfigDict(populate_by_name=True)
    name: str | None = None
    schema_: dict[str, Any] = Field(alias="schema")   # checked by chat.json_schema before use
    strict: bool | None = None


class ResponseFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"] = "text"
    json_schema: JSONSchemaFormat | None = None   # required for type json_schema


class SamplingFields(_Lenient):
    model: str | None = None
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    top_k: int | None = Field(None, ge=0, le=2**31 - 1)
    repetition_penalty: float | None = Field(None, gt=0)
    presence_penalty: float | None = Field(None, ge=-2, le=2)
    frequency_penalty: float | None = Field(None, ge=-2, le=2)
    max_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    max_completion_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    stop: str | list[str] | None = None
    seed: int | None = Field(None, **INT64)   # torch seeds take int64 (+ n - 1 still fits uint64)
    n: int = Field(1, ge=1, le=16)
    stream: bool = False
    stream_options: StreamOptions | None = None
    user: str | None = None

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, v):
        stops = [v] if isinstance(v, str) else v or []
        if len(stops) > MAX_STOPS:
            raise ValueError(f"at most {MAX_STOPS} stop sequences")
        if any(len(s) > MAX_STOP_CHARS for s in stops):
            raise ValueError(f"a stop sequence is at most {MAX_STOP_CHARS} characters")
        return v

    def stops(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])


class FunctionCall(_Lenient):
    name: str = Field(max_length=64)
    arguments: str = ""           # JSON text of an object, as OpenAI sends it

    @field_validator("arguments")
    @classmethod
    def _json_object(cls, v: str) -> str:
        try:
            value = loads_bounded(v) if v.strip() else {}
        except ValueError as e:
            raise ValueError(f"must be the JSON text of an object ({e})") from None
        if not isinstance(value, dict):
            raise ValueError("must be the JSON text of an object")
        return v


class ToolCall(_Lenient):
    id: str | None = None
    type: Literal["function"] = "function"
    function: FunctionCall


class ContentPart(_Lenient):
    type: str
    text: str | None = None


class ChatMessage(_Lenient):
    role: Literal["system", "developer", "user", "assistant", "tool", "function"]
    content: str | list[ContentPart] | None = None
    name: str | None = None
    tool_calls: list[ToolCall] | None = None
    tool_call_id: str | None = None

    @field_validator("role")
    @classmethod
    def _developer_is_system(cls, role: str) -> str:
        return "system" if role == "developer" else role     # OpenAI's newer name for the system message


class FunctionDef(_Lenient):
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")    # as OpenAI; it is a line of the prompt
    description: str = ""
    parameters: dict[str, Any] | None = None              # checked by chat.json_schema before use
    strict: bool | None = None


class ToolDef(_Lenient):
    type: Literal["function"] = "function"
    function: FunctionDef


class _Named(_Lenient):
    name: str


class NamedToolChoice(_Lenient):
    type: Literal["function"] = "function"
    function: _Named


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDef] | None = Field(None, max_length=128)
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    # glmkit extension: run the server's registered tools / code interpreter in an agent loop
    glmkit_run_tools: bool = False


class CompletionRequest(SamplingFields):
    prompt: str | list[str]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False


class EmbeddingRequest(_Lenient):
    model: str | None = None
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"
