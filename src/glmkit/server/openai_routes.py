"""The OpenAI-compatible endpoints, one APIRouter: /v1/chat/completions, /v1/completions, /v1/models,
llama.cpp server's /tokenize and /detokenize, and the operator's /health and /metrics.

A chat request becomes a prompt here (the model's chat format, its tool-call protocol, a forced
tool's start of call); server.completions answers it; glmkit_run_tools requests go to
server.run_tools.  Every check of a request's parameters is in its model (openai_requests)."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse

from ..chat.protocols import TaggedCallParser
from ..chat.template import PlainReplyParser
from ..errors import GlmkitError, GrammarError
from . import knowledge, routing
from .completions import Answer, submit
from .errors import APIError, StrictJSONRoute
from .metrics import render_metrics
from .openai_requests import ChatCompletionRequest, CompletionRequest, DetokenizeRequest, TokenizeRequest
from .openai_responses import ChatCompletion, Completion, ErrorResponse, Health, ModelCard, ModelList
from .run_tools import run_tools
from .state import Server, ServerState

ERRORS = {status: {"model": ErrorResponse} for status in (400, 401, 404, 413, 415, 422, 429)}
router = APIRouter(route_class=StrictJSONRoute, responses=ERRORS)
SSE_HEADERS = {"Cache-Control": "no-cache"}


@router.get("/health", response_model=Health)
def health(server: Server):
    return Health(model=server.model_id, running=server.scheduler.running, waiting=server.scheduler.queue_length)


@router.get("/metrics", response_class=PlainTextResponse)
def metrics(server: Server):
    # one model: its series unlabelled, as always; several: each series per model (a `model` label)
    # (a LoRA adapter's model shares its base model's scheduler: counted there, once)
    bases = {name: m.scheduler for name, m in server.models.items() if m.parent is None}
    schedulers = bases if len(bases) > 1 else server.scheduler
    return render_metrics(schedulers, server.http_requests, server.fallbacks_done)


@router.get("/v1/models", response_model=ModelList)
def models(server: Server):
    """Every model a request may name (for a private_only request: those on this machine)."""
    names = [n for n in [*server.models, *server.clouds] if not (server.private and n in server.config.outside)]
    return ModelList(data=[_model_card(server, name) for name in names])


@router.get("/v1/models/{name}", response_model=ModelCard)
def model(name: str, server: Server):
    if name not in server.models and name not in server.clouds:   # the exact name: "default" is no id
        raise APIError(404, f"model {name!r} not found; this server serves {server.names()}",
                       code="model_not_found")
    server.allowed(name)
    return _model_card(server, name)


@router.post("/v1/chat/completions", response_model=ChatCompletion,
             responses={200: {"content": {"text/event-stream": {}}}})
async def chat_completions(body: ChatCompletionRequest, server: Server, request: Request, response: Response):
    """Answered by the model the request names, or (routes.fallback) by its fallback when that one
    cannot start (server.routing); `x-glmkit-served-by` and the reply's `model` name what answered."""
    name = server.model_name(body.model)
    if body.glmkit_run_tools:      # tools may have run before a failure: never run again elsewhere
        served_by, reply = name, await _start_chat(server, name, body, request)
    else:
        served_by, reply = await routing.with_fallback(server, name, lambda n: _start_chat(server, n, body, request))
    if isinstance(reply, Answer):
        retrieved = reply.knowledge
        if body.stream:
            reply = StreamingResponse(_with_citations(reply) if retrieved else reply.sse(),
                                      media_type="text/event-stream", headers=SSE_HEADERS)
        else:
            whole = await reply.whole()
            if retrieved is not None:
                content = whole.choices[0].message.content or ""
                whole = whole.model_copy(update=retrieved.fields(content))
            reply = whole
    elif isinstance(reply, dict):                   # a cloud model's reply, as its service shaped it
        reply = JSONResponse(reply)
    elif hasattr(reply, "__anext__"):               # a cloud model's events (else run_tools' response)
        reply = StreamingResponse(reply, media_type="text/event-stream", headers=SSE_HEADERS)
    (reply if isinstance(reply, Response) else response).headers["x-glmkit-served-by"] = served_by
    return reply


async def _start_chat(server: ServerState, name: str, body: ChatCompletionRequest, request: Request):
    """Begin answering with model `name`: an Answer whose choices have been submitted (with a
    fallback configured: and have their first tokens), a cloud model's reply, or (glmkit_run_tools)
    the whole response."""
    if name in server.clouds:
        server.allowed(name)
        if body.glmkit_knowledge is not None:
            knowledge.check(server, body, cloud=True)
        return await server.clouds[name].start(await request.json())
    server = server.pick(name)
    retrieved = None
    if body.glmkit_knowledge is not None:
        knowledge.check(server, body)
        retrieved = await knowledge.retrieve(server, request, body)
    json_check = body.json_checker()
    if body.tools or json_check:
        await asyncio.to_thread(body.check_schemas)     # jsonschema's meta-schema check is slow
    chat_model = server.chat_model
    params = body.to_sampling_params(chat_model.default_sampling)
    max_new = body.max_new_tokens(server.config.max_tokens_limit)
    if body.glmkit_run_tools:
        return await run_tools(server, body, params, max_new, json_check, request, retrieved)
    prompt, choices = await chat_choices(server, body, params, max_new, json_check, retrieved)
    answer = Answer(server.model_id, True, len(prompt), choices, json_check, _include_usage(body),
                    knowledge=retrieved)
    if server.fallback_for(name) is not None:
        await answer.start()       # a failure before the first token may still be answered elsewhere
    return answer


async def chat_choices(server: ServerState, body: ChatCompletionRequest, params, max_new: int, json_check,
                       retrieved: knowledge.Retrieved | None = None):
    """A chat request's prompt and its submitted choices (constrained to response_format's schema,
    or to a forced strict tool's): /v1/chat/completions and /v1/responses share this.
    `retrieved`: glmkit_knowledge's passages, which the last user message is answered from."""
    chat_model = server.chat_model
    tools = body.flat_tools() if body.tool_choice != "none" else []
    if json_check and not tools:     # with tools the reply may be a call instead: checked, not constrained
        try:
            grammar = await asyncio.to_thread(chat_model.json_grammar, body.response_format.schema())
        except GrammarError as e:
            raise APIError(400, str(e), param="response_format") from None
        params = replace(params, grammar=grammar)
    forced = body.forced_tool(tools)
    protocol = chat_model.protocol
    try:
        history = knowledge.prompt_history(protocol.api_messages(body.message_dicts(), tools), protocol, retrieved)
        prompt = await asyncio.to_thread(chat_model.encode_chat, history)
    except GlmkitError as e:
        raise APIError(400, str(e), param="messages") from None
    # a forced tool: the reply starts as that tool's call (ChatGLM3, GLM-4: its metadata line)
    start = protocol.forced_start(forced) if forced else ""
    schemas = {t["name"]: t.get("parameters") for t in tools}
    if forced and body.strict_tool(forced):      # the arguments after the forced start follow the schema
        try:
            grammar = await asyncio.to_thread(chat_model.json_grammar, schemas[forced] or {"type": "object"}, True)
        except GrammarError as e:
            raise APIError(400, str(e), param="tools") from None
        if grammar is not None:
            params = replace(params, grammar=grammar)
    choices = submit(chat_model.backend, body.n, prompt, params, chat_model.format.stop_ids, max_new,
                     lambda: protocol.call_parser(chat_model.format.reply_parser(), schemas), body.stops(),
                     logprobs=(body.top_logprobs or 0) if body.logprobs else None,
                     forced_prefix=chat_model.tokenizer.encode(start) if start else ())
    return prompt, choices


async def _with_citations(answer: Answer):
    """A glmkit_knowledge answer's events, with one more chunk (no choices; glmkit_citations and
    glmkit_knowledge) before [DONE] (server.knowledge)."""
    async for event in answer.sse():
        if event == "data: [DONE]\n\n":
            fields = answer.knowledge.fields(answer.choices[0].content)
            body = {"id": answer.id, "object": "chat.completion.chunk", "created": answer.created,
                    "model": answer.model, "choices": [],
                    "glmkit_citations": [c.model_dump() for c in fields["glmkit_citations"]],
                    "glmkit_knowledge": fields["glmkit_knowledge"].model_dump()}
            yield "data: " + json.dumps(body, ensure_ascii=False) + "\n\n"
        yield event


@router.post("/v1/completions", response_model=Completion, responses={200: {"content": {"text/event-stream": {}}}})
async def completions(body: CompletionRequest, server: Server):
    server = server.pick(body.model)
    chat_model = server.chat_model
    tokenizer = chat_model.tokenizer
    params = body.to_sampling_params(chat_model.default_sampling)
    max_new = body.max_new_tokens(server.config.max_tokens_limit)
    prompts = [await _prompt_ids(p, tokenizer, i, len(body.prompt_batch()) > 1)
               for i, p in enumerate(body.prompt_batch())]
    # vLLM's stop rule: end-of-sequence (unless ignore_eos) and the request's stop_token_ids
    asked = frozenset(body.stop_token_ids or ())
    _check_ids(list(asked), tokenizer, "stop_token_ids")
    stop_ids = asked | (frozenset() if body.ignore_eos else {tokenizer.eos_id})
    choices = []
    for prompt in prompts:          # choice i of prompt k is choice k * n + i, as vLLM numbers them
        # all visible text is the reply: a call parser without tools calls nothing
        submit(chat_model.backend, body.n, prompt, params, stop_ids, max_new,
               lambda: TaggedCallParser(PlainReplyParser(tokenizer), {}), body.stops(),
               logprobs=body.logprobs, prompt_param="prompt", reason_ids=asked - {tokenizer.eos_id}, choices=choices)
    name = None
    if body.logprobs is not None:
        name = (lambda t: f"token_id:{t}") if body.return_tokens_as_token_ids else \
            (lambda t: tokenizer.token_bytes(t).decode("utf-8", errors="replace"))
    answer = Answer(server.model_id, False, sum(map(len, prompts)), choices, include_usage=_include_usage(body),
                    token_name=name)
    if body.stream:
        return StreamingResponse(answer.sse(), media_type="text/event-stream", headers=SSE_HEADERS)
    return await answer.whole()


async def _prompt_ids(prompt: str | list[int], tokenizer, index: int, batch: bool) -> list[int]:
    """A prompt's token ids: text through the tokenizer (as ordinary text), or vLLM's ids as they
    are, after checking each is a token of the vocabulary."""
    param = f"prompt[{index}]" if batch else "prompt"
    if isinstance(prompt, str):
        ids = await asyncio.to_thread(tokenizer.encode, prompt)
    else:
        ids = list(prompt)
        _check_ids(ids, tokenizer, param)
    if not ids:
        raise APIError(400, "the prompt is empty", param=param)
    return ids


def _check_ids(ids: list[int], tokenizer, param: str):
    bad = next((i for i in ids if not 0 <= i < tokenizer.vocab_size), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary (0..{tokenizer.vocab_size - 1})", param=param)


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, server: Server):
    """llama.cpp server's shape: {"tokens": [...]}, or with_pieces: [{"id", "piece"}] (the
    piece as text where its bytes are UTF-8, else its bytes as a list)."""
    tok = server.chat_model.tokenizer
    ids = await asyncio.to_thread(tok.encode, body.content)
    if not body.with_pieces:
        return {"tokens": ids}
    pieces = []
    for i in ids:
        data = tok.token_bytes(i)
        try:
            piece = data.decode("utf-8")
        except UnicodeDecodeError:
            piece = list(data)
        pieces.append({"id": i, "piece": piece})
    return {"tokens": pieces}


@router.post("/detokenize")
async def detokenize(body: DetokenizeRequest, server: Server):
    tok = server.chat_model.tokenizer
    vocab = server.chat_model.config.vocab_size
    bad = next((i for i in body.tokens if not 0 <= i < vocab), None)
    if bad is not None:
        raise APIError(400, f"token id {bad} is outside the vocabulary (0..{vocab - 1})", param="tokens")
    return {"content": await asyncio.to_thread(tok.decode, body.tokens)}


def _include_usage(body) -> bool:
    return bool(body.stream_options and body.stream_options.include_usage)


def _model_card(server: ServerState, name: str) -> ModelCard:
    if name in server.clouds:
        return ModelCard(id=name, created=server.started, owned_by=server.clouds[name].host, context_length=None,
                         max_model_len=None, family=None)
    served = server.models[name]
    server = server.pick(name)
    n = server.scheduler.max_seq_len
    return ModelCard(id=server.model_id, created=server.started, context_length=n, max_model_len=n,
                     family=server.chat_model.config.family, parent=served.parent,
                     root=served.parent or served.model_id, adapter=served.adapter)
