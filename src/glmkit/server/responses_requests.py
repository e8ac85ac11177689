"""The body of POST /v1/responses (OpenAI's Responses API) as pydantic models, and its translation
into what the chat endpoint already serves: OpenAI chat messages and a ChatCompletionRequest.

Going through the chat request is deliberate: the prompt is then built by the model's protocol
(`protocol.api_messages` + `encode_chat`, so user text never becomes special tokens), and tools,
tool_choice and response formats get exactly the checks and constraints chat completions get.
Every check that is particular to the Responses shapes (item types, content parts, the JSON text
of a call's arguments) is here, so bad input is one 400 naming the field."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, ValidationError, field_validator, model_validator

from ..chat.json_schema import loads_bounded
from .errors import APIError
from .openai_requests import ChatCompletionRequest, _Lenient

TEXT_PARTS = ("input_text", "output_text", "text")
ITEM_TYPES = ("message", "function_call", "function_call_output")


class InputPart(_Lenient):
    type: str
    text: str = ""

    @field_validator("type")
    @classmethod
    def _text_only(cls, v: str) -> str:
        if v not in TEXT_PARTS:
            raise ValueError(f"{v[:40]!r} content is not supported; send input_text or output_text parts")
        return v


def _text(content: list[InputPart] | str | None) -> str:
    if isinstance(content, list):
        return "".join(p.text for p in content)
    return content or ""


class InputItem(_Lenient):
    """One item of `input`: a message (`type` may be left out, as the SDK's easy form does), an
    earlier function_call of the model, or the function_call_output that answers it."""
    type: str = "message"
    role: Literal["user", "system", "developer", "assistant"] | None = None
    # list first: a bad part's error (not "should be a valid string") is the one reported
    content: list[InputPart] | str | None = None
    call_id: str | None = Field(None, min_length=1, max_length=128)
    name: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,64}$")
    arguments: str | None = None
    output: list[InputPart] | str | None = None

    @model_validator(mode="after")
    def _complete(self):
        if self.type not in ITEM_TYPES:
            raise ValueError(f"{self.type[:40]!r} items are not supported; send message, function_call or "
                             "function_call_output items")
        if self.type == "message" and (self.role is None or self.content is None):
            raise ValueError("a message item needs role and content")
        if self.type == "function_call":
            if self.call_id is None or self.name is None or self.arguments is None:
                raise ValueError("a function_call item needs call_id, name and arguments")
            try:
                args = loads_bounded(self.arguments) if self.arguments.strip() else {}
            except ValueError as e:
                raise ValueError(f"arguments must be the JSON text of an object ({e})") from None
            if not isinstance(args, dict):
                raise ValueError("arguments must be the JSON text of an object")
        if self.type == "function_call_output" and (self.call_id is None or self.output is None):
            raise ValueError("a function_call_output item needs call_id and output")
        return self


class FunctionTool(_Lenient):
    """A function tool in the Responses shape (flat: no nested `function`)."""
    type: Literal["function"]
    name: str = Field(pattern=r"^[A-Za-z0-9_-]{1,64}$")    # as OpenAI; it is a line of the prompt
    description: str | None = None
    parameters: dict[str, Any] | None = None              # checked by chat.json_schema before use
    strict: bool | None = None


class FunctionChoice(_Lenient):
    type: Literal["function"]
    name: str


class TextFormat(_Lenient):
    type: Literal["text", "json_object", "json_schema"] = "text"
    name: str | None = None
    description: str | None = None
    schema_: dict[str, Any] | None = Field(None, alias="schema")
    strict: bool | None = None

    @model_validator(mode="after")
    def _schema_given(self):
        if self.type == "json_schema" and self.schema_ is None:
            raise ValueError("a json_schema format needs schema (an object)")
        return self


class TextConfig(_Lenient):
    format: TextFormat = Field(default_factory=TextFormat)


class ResponsesRequest(_Lenient):
    model: str | None = None
    input: list[InputItem]      # a string is one user message (so an item's error names its path)
    instructions: str | None = None
    tools: list[FunctionTool] | None = Field(None, max_length=128)
    tool_choice: Literal["auto", "none", "required"] | FunctionChoice | None = None
    text: TextConfig | None = None
    max_output_tokens: int | None = Field(None, ge=1, le=2**31 - 1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    stream: bool = False
    store: bool = True
    previous_response_id: str | None = Field(None, min_length=1, max_length=128)
    metadata: dict[str, str] | None = Field(None, max_length=16)     # as OpenAI: 16 pairs
    parallel_tool_calls: bool | None = None
    user: str | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _text_is_a_message(cls, v):
        return [{"role": "user", "content": v}] if isinstance(v, str) else v

    def input_messages(self) -> list[dict]:
        """`input` as OpenAI chat messages: a model's function_call items join the assistant
        message before them (or make one), as chat completions lists them; outputs are `tool`
        messages.  This is also the form a response is stored in."""
        out: list[dict] = []
        for item in self.input:
            if item.type == "message":
                role = "system" if item.role == "developer" else item.role
                out.append({"role": role, "content": _text(item.content)})
            elif item.type == "function_call":
                call = {"id": item.call_id, "type": "function",
                        "function": {"name": item.name, "arguments": item.arguments}}
                last = out[-1] if out else None
                if last is not None and last["role"] == "assistant":
                    last.setdefault("tool_calls", []).append(call)
                else:
                    out.append({"role": "assistant", "content": "", "tool_calls": [call]})
            else:
                out.append({"role": "tool", "tool_call_id": item.call_id, "content": _text(item.output)})
        return out

    def chat_request(self, messages: list[dict]) -> ChatCompletionRequest:
        """The chat completion request that answers this one, given the whole conversation
        (`messages`: the stored one, then `input_messages()`); `instructions` lead as a system
        message, and only for this request (as OpenAI: they are not carried over)."""
        if self.instructions:
            messages = [{"role": "system", "content": self.instructions}, *messages]
        if not messages:
            raise APIError(400, "input is empty: send a message", param="input")
        fmt = self.text.format if self.text else None
        response_format = None
        if fmt is not None and fmt.type != "text":
            response_format = {"type": fmt.type}
            if fmt.type == "json_schema":
                response_format["json_schema"] = {"name": fmt.name, "schema": fmt.schema_, "strict": fmt.strict}
        choice = self.tool_choice
        if isinstance(choice, FunctionChoice):
            choice = {"type": "function", "function": {"name": choice.name}}
        try:
            return ChatCompletionRequest.model_validate(dict(
                model=self.model, messages=messages, temperature=self.temperature, top_p=self.top_p,
                tools=[{"type": "function", "function": t.model_dump(exclude={"type"})} for t in self.tools or []]
                or None, tool_choice=choice, response_format=response_format, stream=self.stream))
        except ValidationError as e:     # a stored conversation that no longer reads (a hand edit)
            raise APIError(400, f"the conversation cannot be continued: {e.errors()[0]['msg']}",
                           param="previous_response_id" if self.previous_response_id else "input") from None

    def max_new_tokens(self, limit: int) -> int:
        n = self.max_output_tokens or limit
        if n > limit:
            raise APIError(400, f"max_output_tokens is limited to {limit} on this server", param="max_output_tokens")
        return n
