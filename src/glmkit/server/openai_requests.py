"""The OpenAI-compatible API's request bodies as pydantic models (validation errors become 400s).

Every field the server acts on is typed and bounded here, and every check of a request's
parameters is here too, so bad input is one 400 naming the field, the same for a plain request
and a glmkit_run_tools one; `to_sampling_params` builds a request's SamplingParams once.  The
console's settings take their types and bounds from SamplingFields."""

from __future__ import annotations

from typing import Any, Literal

import jsonschema
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ..chat.json_schema import MAX_CONTAINERS, SchemaRefused, check_schema, loads_bounded
from ..chat.json_schema import validate as validate_json
from ..chat.openai_compat import flat_tools
from ..engine.requests import SamplingParams
from .errors import APIError

MAX_STOPS = 4             # as OpenAI
MAX_STOP_CHARS = 256      # per stop sequence: matching holds back at most this much text
INT64 = dict(ge=-2**63, le=2**63 - 1)


def bounded_stops(v):
    """A request's stop sequences (one string or a list), refused beyond OpenAI's bounds (the
    OpenAI-shaped APIs and Ollama's share this)."""
    stops = [v] if isinstance(v, str) else v or []
    if len(stops) > MAX_STOPS:
        raise ValueError(f"at most {MAX_STOPS} stop sequences")
    if any(len(s) > MAX_STOP_CHARS for s in stops):
        raise ValueError(f"a stop sequence is at most {MAX_STOP_CHARS} characters")
    return v


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

    def schema(self) -> dict | None:
        """The JSON schema the reply must match (json_object: any object), or None for text."""
        if self.type == "text":
            return None
        return self.json_schema.schema_ if self.type == "json_schema" and self.json_schema else {"type": "object"}

    def checker(self):
        """A function that says what is wrong with a reply (None when it is acceptable), or None
        for plain text.  Decoding is constrained to the schema where the engine can do it; the
        check stays for replies it could not constrain (a tool call instead, a forced prefix)."""
        if self.type == "text":
            return None
        if self.type == "json_schema" and self.json_schema is None:
            raise APIError(400, "response_format json_schema needs json_schema.schema (an object)",
                           param="response_format.json_schema")
        kind, schema = self.type, self.json_schema.schema_ if self.type == "json_schema" else None

        def check(content: str) -> str | None:
            try:
                value = loads_bounded(content)
            except ValueError as e:
                return f"the model's reply is not valid JSON ({e})"
            if kind == "json_object" and not isinstance(value, dict):
                return "the model's reply is JSON but not an object"
            if schema is not None:
                try:
                    validate_json(value, schema)
                except jsonschema.ValidationError as e:
                    return f"the model's reply does not match the schema: {e.message}"
            return None
        return check


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

    @field_validator("presence_penalty", "frequency_penalty")
    @classmethod
    def _no_penalty(cls, v):
        if v:      # 0 is what OpenAI means by "off"; anything else would be silently ignored
            raise ValueError("not supported; use repetition_penalty")
        return v

    @field_validator("stop")
    @classmethod
    def _bounded_stops(cls, v):
        return bounded_stops(v)

    def to_sampling_params(self, defaults: dict) -> SamplingParams:
        """The request's sampling over the model's `defaults` (a field left out: the default),
        checked by SamplingParams itself.  Choice i of n > 1 samples with seed + i."""
        fields = dict(temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                      repetition_penalty=self.repetition_penalty, seed=self.seed)
        return SamplingParams(**{**defaults, **{k: v for k, v in fields.items() if v is not None}})

    def max_new_tokens(self, limit: int) -> int:
        """Tokens a reply may have: the request's max_completion_tokens or max_tokens, at most
        the server's --max-tokens (`limit`, also the default)."""
        n = self.max_completion_tokens or self.max_tokens or limit
        if n > limit:
            raise APIError(400, f"max_tokens is limited to {limit} on this server", param="max_tokens")
        return n

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


class KnowledgeRequest(_Lenient):
    """glmkit extension: answer the last user message from a knowledge base of the request's
    owner (its API key), citing passages as [n]."""
    kb: str = Field(min_length=1, max_length=64)
    top_k: int = Field(5, ge=1, le=20)
    mode: Literal["hybrid", "lexical", "dense"] = "hybrid"


class ChatCompletionRequest(SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    tools: list[ToolDef] | None = Field(None, max_length=128)
    tool_choice: Literal["auto", "none", "required"] | NamedToolChoice | None = None
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=20)
    response_format: ResponseFormat | None = None
    # glmkit extension: run the server's registered tools / code interpreter in an agent loop
    glmkit_run_tools: bool = False
    # glmkit extension: answer from a knowledge base (server.knowledge); the reply's citations
    # come back in glmkit_citations
    glmkit_knowledge: KnowledgeRequest | None = None

    def message_dicts(self) -> list[dict]:
        return [m.model_dump(exclude_none=True) for m in self.messages]

    def flat_tools(self) -> list[dict]:
        """The tools as the chat layer lists them: {name, description, parameters}."""
        return flat_tools([t.model_dump() for t in self.tools or []])

    def json_checker(self):
        return self.response_format.checker() if self.response_format else None

    def check_schemas(self) -> None:
        """Every client schema of the request, before any use: bounded (one budget for all of
        them), well-formed, and with local references only (chat.json_schema).  Slow (the
        meta-schema check): run it in a worker thread."""
        items = [(f"tools[{i}].function.parameters", t.function.parameters) for i, t in enumerate(self.tools or [])
                 if t.function.parameters is not None]
        fmt = self.response_format
        if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None:
            items.append(("response_format.json_schema.schema", fmt.json_schema.schema_))
        budget = MAX_CONTAINERS
        for param, schema in items:
            try:
                budget -= check_schema(schema, budget)
            except SchemaRefused as e:
                raise APIError(400, f"{param}: {e}", param=param) from None

    def strict_tool(self, name: str) -> bool:
        """Whether the tool `name` asks for arguments that always match its schema (strict)."""
        return any(t.function.name == name and t.function.strict for t in self.tools or [])

    def forced_tool(self, tools: list[dict]) -> str | None:
        """The tool whose call the reply must be (tool_choice 'required' or named), or None."""
        choice = self.tool_choice
        if choice in (None, "auto", "none"):
            return None
        names = [t["name"] for t in tools]
        if choice == "required":
            if len(names) == 1:
                return names[0]
            raise APIError(400, "tool_choice 'required' needs exactly one tool here; name the function instead",
                           param="tool_choice")
        if choice.function.name not in names:
            raise APIError(400, f"tool_choice names {choice.function.name!r}, which is not among the tools",
                           param="tool_choice")
        return choice.function.name


MAX_BATCH_PROMPTS = 16       # prompts in one /v1/completions request (each its own n choices)
MAX_STOP_TOKEN_IDS = 64


class CompletionRequest(SamplingFields):
    # OpenAI's text or texts, or vLLM's token ids: one list of ids, or a list of them (a batch)
    prompt: str | list[str] | list[int] | list[list[int]]
    logprobs: int | None = Field(None, ge=0, le=20)
    echo: bool = False
    # vLLM's extensions, with vLLM's meaning (a client written for vLLM speaks to glmkit too):
    # -1 is vLLM's "top_k off", as 0 is ours
    top_k: int | None = Field(None, ge=-1, le=2**31 - 1)
    stop_token_ids: list[int] | None = Field(None, max_length=MAX_STOP_TOKEN_IDS)
    ignore_eos: bool = False              # do not stop at end-of-sequence (stop_token_ids still stop)
    return_tokens_as_token_ids: bool = False   # logprobs name tokens "token_id:<id>", not by their text

    @field_validator("top_k")
    @classmethod
    def _vllm_top_k_off(cls, v):
        return 0 if v == -1 else v

    @field_validator("prompt")
    @classmethod
    def _bounded_prompts(cls, v):
        if isinstance(v, list):
            if not v:
                raise ValueError("the prompt is empty")
            if isinstance(v[0], (str, list)) and len(v) > MAX_BATCH_PROMPTS:
                raise ValueError(f"at most {MAX_BATCH_PROMPTS} prompts in one request")
        return v

    def prompt_batch(self) -> list[str | list[int]]:
        """The request's prompts: each a text or a list of token ids."""
        p = self.prompt
        if isinstance(p, str) or (p and isinstance(p[0], int)):
            return [p]
        return list(p)


class EmbeddingRequest(_Lenient):
    model: str | None = None
    input: str | list[str]
    encoding_format: Literal["float", "base64"] = "float"


class TokenizeRequest(_Lenient):
    """llama.cpp server's /tokenize: text -> ids (as ordinary text: never special tokens)."""
    content: str = Field(max_length=1_000_000)
    with_pieces: bool = False


class DetokenizeRequest(_Lenient):
    """llama.cpp server's /detokenize: ids -> the text users would see (special tokens dropped)."""
    tokens: list[int] = Field(max_length=1_000_000)
