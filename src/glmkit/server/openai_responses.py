"""The OpenAI-compatible API's response bodies as pydantic models: what the routes return and
stream, and the error body every refusal has (server.errors), in OpenAI's shapes.  A field that
OpenAI leaves out when it is empty is left out here too."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, Field


def _omitted_if_none(default=None):
    return Field(default, exclude_if=lambda v: v is None)


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None = None
    code: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorDetail


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class FunctionCallOut(BaseModel):
    name: str
    arguments: str                # JSON text of an object


class ToolCallOut(BaseModel):
    index: int | None = _omitted_if_none()      # in a streamed delta only
    id: str
    type: Literal["function"] = "function"
    function: FunctionCallOut


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None = None


class TokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChoiceLogprobs(BaseModel):
    content: list[TokenLogprob] | None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str | None
    tool_calls: list[ToolCallOut] | None = _omitted_if_none()


class ChatChoice(BaseModel):
    index: int
    message: AssistantMessage
    finish_reason: Literal["stop", "length", "tool_calls"] | None
    logprobs: ChoiceLogprobs | None = None


class ToolStep(BaseModel):
    """glmkit_steps: a server tool run (arguments None: the call was refused)."""
    type: Literal["tool"] = "tool"
    name: str
    arguments: dict[str, Any] | None
    ok: bool
    observation: str


class CodeStep(BaseModel):
    """glmkit_steps: a code run in the sandbox (code None: the segment was refused)."""
    type: Literal["code"] = "code"
    code: str | None
    ok: bool
    output: str
    images: list[str]             # PNG, base64


class KnowledgePassage(BaseModel):
    """A passage of a knowledge base: what the reply cites as [n] (glmkit_citations), or what
    the model was given (glmkit_knowledge.passages, with its retrieval score)."""
    n: int
    document: str
    position: str                 # "page 3, § Leave, line 12", as `glmkit kb search` shows it
    text: str
    page: int | None = None
    heading: str | None = None
    line: int | None = None
    paragraph: int | None = None
    score: float | None = _omitted_if_none()


class KnowledgeInfo(BaseModel):
    """glmkit_knowledge: the knowledge base a reply was given passages from, and how."""
    kb: str
    mode: Literal["hybrid", "lexical", "dense"]
    note: str | None = _omitted_if_none()      # why retrieval was not what was asked (no embedder)
    passages: list[KnowledgePassage]


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage
    glmkit_steps: list[ToolStep | CodeStep] | None = _omitted_if_none()    # glmkit_run_tools only
    # glmkit_knowledge requests only: the passages the reply cites, and all it was given
    glmkit_citations: list[KnowledgePassage] | None = _omitted_if_none()
    glmkit_knowledge: KnowledgeInfo | None = _omitted_if_none()


class Delta(BaseModel):
    role: Literal["assistant"] | None = _omitted_if_none()
    content: str | None = _omitted_if_none()
    tool_calls: list[ToolCallOut] | None = _omitted_if_none()


class ChunkChoice(BaseModel):
    index: int
    delta: Delta
    finish_reason: Literal["stop", "length", "tool_calls"] | None = None
    logprobs: ChoiceLogprobs | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    choices: list[ChunkChoice]
    usage: Usage | None = None      # sent (null until the last chunk) only with stream_options.include_usage


class CompletionLogprobs(BaseModel):
    """OpenAI's legacy shape as vLLM fills it: text_offset is where each token starts in the
    choice's text (counted, as vLLM counts it, by the lengths of the token names before it), and
    each top_logprobs entry holds the chosen token and the top k."""
    text_offset: list[int]
    token_logprobs: list[float | None]
    tokens: list[str]
    top_logprobs: list[dict[str, float] | None]


class CompletionChoice(BaseModel):
    index: int
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: Literal["stop", "length"] | None = None
    # vLLM's: the stop token id or stop string that ended the choice (None: end-of-sequence, length)
    stop_reason: int | str | None = None


class Completion(BaseModel):
    """A /v1/completions response, and each of its streamed chunks (`usage` as for chat chunks)."""
    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str = "glmkit"       # a cloud model: the host of the service that answers it
    context_length: int | None     # None: a cloud model's (its service does not say)
    max_model_len: int | None
    family: str | None
    # as vLLM lists LoRA adapters: `parent` the base model's id (None for a base model), `root`
    # the base model of the family (its own id for a base model); `adapter` the adapter's name
    parent: str | None = None
    root: str | None = None
    adapter: str | None = None


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class Embedding(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str          # str: base64 of little-endian float32


class EmbeddingUsage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Embedding]
    model: str
    usage: EmbeddingUsage


class Health(BaseModel):
    status: Literal["ok"] = "ok"
    model: str
    running: int          # sequences in the batch
    waiting: int          # sequences queued for a slot
