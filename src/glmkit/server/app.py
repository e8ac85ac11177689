"""The FastAPI application: OpenAI-compatible endpoints over one continuous-batching scheduler."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import math
import re
import secrets
import time
import uuid

import jsonschema
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from .. import __version__
from ..chat.json_schema import MAX_CONTAINERS, SchemaRefused, check_schema, loads_bounded
from ..chat.json_schema import validate as validate_json
from ..chat.openai_compat import flat_tools, openai_tool_call, to_glm_messages, to_template_messages
from ..chat.protocols import TaggedCallParser, protocol_for
from ..chat.template import TOOL_CALL_OPEN
from ..chat.tool_calls import INTERPRETER, CodeCall, ToolCall
from ..chat.template import PlainReplyParser  # /v1/completions: all visible text is the reply
from ..engine import SamplingParams
from ..engine.requests import QueueFull
from ..engine.scheduler import Scheduler
from ..errors import ContextLengthError, GlmkitError
from .generation import ChoiceStream, events, step_view
from .metrics import render_metrics, route_label
from .schemas import ChatCompletionRequest, CompletionRequest, NamedToolChoice, SamplingFields

log = logging.getLogger("glmkit.server")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def error_body(message: str, type_: str, param=None, code=None) -> dict:
    return {"error": {"message": message, "type": type_, "param": param, "code": code}}


class BodyTooLarge(StarletteHTTPException):
    """Raised from `receive` once a body is over its limit (FastAPI passes HTTPExceptions on
    from body reading, so it becomes the 413 below wherever the body is read)."""
    code = "body_too_large"

    def __init__(self, limit: int):
        super().__init__(413, f"request body is larger than {limit} bytes")


def _not_a_number(name):
    raise ValueError(f"{name} is not a JSON number")


def _finite(text):
    if not math.isfinite(f := float(text)):
        raise ValueError(f"{text[:20]} is out of range")
    return f


def strict_json(body: bytes):
    """JSON as RFC 8259 has it: no NaN/Infinity, no number that overflows, no lone UTF-16
    surrogate (text nothing downstream could encode).  JSONDecodeError otherwise: a 400."""
    try:
        value = json.loads(body, parse_constant=_not_a_number, parse_float=_finite)
    except json.JSONDecodeError:
        raise
    except RecursionError:
        raise json.JSONDecodeError("nested too deeply", "", 0) from None
    except ValueError as e:     # ours, invalid UTF-8, or an integer past Python's 4300 digits
        why = "a number has too many digits" if "integer string conversion" in str(e) else str(e)
        raise json.JSONDecodeError(why, "", 0) from None
    if re.search(rb"\\u[dD][89a-fA-F]", body):    # surrogate escapes: check that they all paired up
        stack = [value]
        while stack:
            v = stack.pop()
            if isinstance(v, str):
                try:
                    v.encode()
                except UnicodeEncodeError:
                    raise json.JSONDecodeError("text holds an unpaired UTF-16 surrogate", "", 0) from None
            elif isinstance(v, (dict, list)):
                stack += [*v.keys(), *v.values()] if isinstance(v, dict) else v
    return value


class _StrictJSONRequest(Request):
    async def json(self):
        if not hasattr(self, "_json"):   # for every route
            self._json = strict_json(await self.body())
        return self._json


class _StrictJSONRoute(APIRoute):
    def get_route_handler(self):
        handler = super().get_route_handler()

        async def strict(request: Request):
            return await handler(_StrictJSONRequest(request.scope, request.receive))
        return strict


class ServerConfig:
    def __init__(self, api_keys=(), cors_origins=(), max_batch=8, max_queue=64, max_tokens_limit=4096,
                 max_body_bytes=1 << 20, max_seq_len=None, model_id=None, scripted_replies=None,
                 server_tools=(), code_interpreter=None, max_steps=5, data_dir=None, max_upload_bytes=64 << 20,
                 metrics_public=False, kv_cache_mb=None):
        self.api_keys = [k for k in api_keys if k]
        self.metrics_public = metrics_public   # with API keys: serve /metrics without one
        self.cors_origins = list(cors_origins)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_tokens_limit, self.max_body_bytes = max_tokens_limit, max_body_bytes
        self.max_upload_bytes = max_upload_bytes  # a file uploaded into a console workspace
        self.max_seq_len, self.model_id = max_seq_len, model_id
        self.kv_cache_mb = kv_cache_mb      # if set, the KV cache's size, which decides max_seq_len
        # TESTING ONLY: {user message: reply script}; the model's backend is wrapped in a
        # chat.scripted.ScriptedBackend that forces these replies (the one place that does)
        self.scripted_replies = scripted_replies or {}
        # tools the server itself runs (glmkit_run_tools requests, the console's Tool mode), and the
        # sandbox.KernelPool that its code runs in (None: no code runs)
        self.server_tools = {t.name: t for t in server_tools}
        self.code_interpreter = code_interpreter
        self.max_steps = max_steps
        self.data_dir = data_dir      # the web console's conversation store; None: no console


def create_app(chat_model, config: ServerConfig | None = None, embedder=None) -> FastAPI:
    config = config or ServerConfig()
    model_id = config.model_id or chat_model.name
    if config.kv_cache_mb:
        scheduler = Scheduler.from_memory(chat_model.model, config.kv_cache_mb, config.max_batch,
                                          max_queue=config.max_queue)
    else:
        scheduler = Scheduler(chat_model.model, max_batch=config.max_batch, max_seq_len=config.max_seq_len,
                              max_queue=config.max_queue)
    chat_model.serve_with(scheduler)    # the model's one engine: API requests and agent runs share it
    if config.scripted_replies:
        from ..chat.scripted import ScriptedBackend
        chat_model = chat_model.with_backend(ScriptedBackend(chat_model.backend, by_message=config.scripted_replies))
    app = FastAPI(title="glmkit", version=__version__,
                  description="OpenAI-compatible API for ChatGLM3 and similar models, served by glmkit.")
    app.router.route_class = _StrictJSONRoute
    app.state.scheduler, app.state.chat_model, app.state.config = scheduler, chat_model, config
    protocol = protocol_for(chat_model.format)     # how this model writes tool calls
    app.state.started = int(time.time())
    app.state.http_requests = {}

    @app.on_event("startup")
    def _start():
        scheduler.start()

    @app.on_event("shutdown")
    def _stop():
        scheduler.stop()

    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])

    app.add_middleware(_Guard, config=config, counts=app.state.http_requests, routes=app.router.routes)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        return JSONResponse(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status,
                            headers=exc.headers)

    @app.exception_handler(QueueFull)
    async def _queue_full(request: Request, exc: QueueFull):
        return JSONResponse(error_body(str(exc), "rate_limit_exceeded", code="queue_full"), status_code=429,
                            headers={"Retry-After": "2"})

    @app.exception_handler(GlmkitError)
    async def _user_error(request: Request, exc: GlmkitError):
        # anything the request did wrong that the chat/engine layers caught: a 400, never a 500
        code = "context_length_exceeded" if isinstance(exc, ContextLengthError) else None
        return JSONResponse(error_body(str(exc), "invalid_request_error", code=code), status_code=400)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in _field_path(first.get("loc", ()))).lstrip(".")
        msg = first.get("msg", "invalid request").removeprefix("Value error, ")
        if first.get("type") == "json_invalid":
            why = (first.get("ctx") or {}).get("error")
            msg, loc = f"request body is not valid JSON{f' ({why})' if why else ''}", None
        return JSONResponse(error_body(f"{loc + ': ' if loc else ''}{msg}", "invalid_request_error", loc or None),
                            status_code=400)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        return JSONResponse(error_body(str(exc.detail), "invalid_request_error", code=getattr(exc, "code", None)),
                            status_code=exc.status_code, headers=exc.headers)

    # -- endpoints --------------------------------------------------------------------------
    @app.get("/health")
    def health():
        return {"status": "ok", "model": model_id, "running": scheduler.running, "waiting": scheduler.queue_length}

    @app.get("/metrics", response_class=PlainTextResponse)
    def metrics():
        return render_metrics(scheduler, app.state.http_requests)

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [_model_card(model_id, chat_model, scheduler, app.state.started)]}

    @app.get("/v1/models/{name}")
    def model(name: str):
        if name != model_id:
            raise APIError(404, f"model {name!r} not found; this server serves {model_id!r}", code="model_not_found")
        return _model_card(model_id, chat_model, scheduler, app.state.started)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        _check_model(body.model, model_id)
        json_check = _json_checker(body.response_format)
        if body.tools or json_check:
            await asyncio.to_thread(_check_schemas, body)     # jsonschema's meta-schema check is slow
        if body.glmkit_run_tools:
            return await _run_tools(body, json_check)
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        tools = _flat_tools(body) if body.tool_choice != "none" else []
        forced = _forced_tool(body.tool_choice, tools)
        glm3 = chat_model.config.family == "chatglm"
        try:
            glm = to_glm_messages(messages, tools) if glm3 else to_template_messages(messages, tools)
            prompt = await asyncio.to_thread(chat_model.encode_chat, glm)
        except GlmkitError as e:
            raise APIError(400, str(e), param="messages") from None
        # a forced tool: the reply starts as that tool's call (ChatGLM3: its metadata line)
        start = (f"{forced}\n" if glm3 else f'{TOOL_CALL_OPEN}\n{{"name": {json.dumps(forced)}, "arguments": ') \
            if forced else ""
        prefix = chat_model.tokenizer.encode(start) if start else []
        top = body.top_logprobs if body.logprobs else None
        return await _complete(request, body, prompt, prefix, tools, "chat.completion",
                               logprobs=(top or 0) if body.logprobs else None, json_check=json_check)

    async def _run_tools(body: ChatCompletionRequest, json_check):
        """Extension: the server runs its own tools / interpreter between generations (non-streaming).

        The chat layer's Agent over the scheduler, as in the console.  A call to one of the
        client's own tools ends the run and is returned as `tool_calls`, as without the extension.
        Sampling fields are checked as for any request; stop strings end each generation, and
        response_format is checked on the final answer."""
        import threading

        from ..chat.agent import Agent, Finished, Observation, TextDelta
        from ..chat.tool_definitions import Tool
        from .scheduled_model import ScheduledModel
        if not config.server_tools and config.code_interpreter is None:
            raise APIError(400, "this server runs no tools itself (start it with --tools and/or --code)",
                           param="glmkit_run_tools")
        if body.stream or body.n != 1:
            raise APIError(400, "glmkit_run_tools works with stream=false and n=1", param="glmkit_run_tools")
        if chat_model.config.family != "chatglm":
            raise APIError(400, f"model {model_id!r} has no tool-calling protocol", param="glmkit_run_tools")
        if body.logprobs:
            raise APIError(400, "logprobs are not available with glmkit_run_tools", param="logprobs")
        if body.tool_choice not in (None, "auto"):
            raise APIError(400, "glmkit_run_tools lets the model choose its tools (tool_choice 'auto')",
                           param="tool_choice")
        max_new, stop, base = _sampling(body)
        client_tools = [Tool(t["name"], t["description"], t["parameters"]) for t in _flat_tools(body)]
        tools = client_tools + [t for t in config.server_tools.values() if t.name not in {c.name for c in client_tools}]
        messages = [m.model_dump(exclude_none=True) for m in body.messages]
        try:
            history = to_glm_messages(messages, [t.spec() for t in tools])
        except GlmkitError as e:
            raise APIError(400, str(e), param="messages") from None
        model = ScheduledModel(chat_model, threading.Event(), max_new, seed=body.seed, stop=stop)
        # the request's own kernel, in a temporary workspace, made only if the model writes code
        kernel = (config.code_interpreter.lease(f"request-{uuid.uuid4().hex}")
                  if config.code_interpreter is not None else None)
        agent = Agent(model, tools, max_steps=config.max_steps, interpreter=kernel)
        if tools or any(m["role"] == "system" for m in history):
            agent.messages = history    # the request's own system message (to_glm_messages put the tools in it)
        else:
            agent.messages += history   # after the interpreter's system prompt
        gen = dict(temperature=base.temperature, top_p=base.top_p, top_k=base.top_k,
                   repetition_penalty=base.repetition_penalty)

        def work():
            try:
                return list(agent.run(None, **gen))
            finally:
                if kernel is not None:
                    kernel.close()      # with its workspace
        try:
            evs = await asyncio.to_thread(work)
        except asyncio.CancelledError:    # e.g. the server shutting down: stop generating and running code
            model.cancel.set()
            if kernel is not None:
                kernel.interrupt()
            raise
        steps, content, finish, generation_over = [], "", model.finish_reason, False
        for ev in evs:
            if isinstance(ev, TextDelta):     # the answer is the last generation's text
                content = (content if not generation_over else "") + ev.text
                generation_over = False
            elif isinstance(ev, Observation):
                steps.append(_step(ev))
                generation_over = True
            elif isinstance(ev, Finished):
                finished = ev
        if generation_over:                   # the last generation wrote no text
            content = ""
        msg = {"role": "assistant", "content": content}
        if finished.reason == "max_steps":
            finish = "length"
        elif finished.reason == "tool_calls":
            msg["content"] = content or None      # what the model wrote before its calls
            msg["tool_calls"] = [openai_tool_call(c) for c in finished.handed_over]
            finish = "tool_calls"
        elif json_check:
            problem = await asyncio.to_thread(json_check, content)
            if problem:
                raise APIError(422, problem, "invalid_response_error", param="response_format",
                               code="json_validation_failed")
        usage = {"prompt_tokens": model.prompt_tokens, "completion_tokens": model.completion_tokens,
                 "total_tokens": model.prompt_tokens + model.completion_tokens}
        return {"id": "chatcmpl-" + secrets.token_hex(12), "object": "chat.completion", "created": int(time.time()),
                "model": model_id, "choices": [{"index": 0, "message": msg, "finish_reason": finish, "logprobs": None}],
                "usage": usage, "glmkit_steps": steps}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        _check_model(body.model, model_id)
        if isinstance(body.prompt, list):
            if len(body.prompt) != 1:
                raise APIError(400, "send one prompt per request", param="prompt")
            text = body.prompt[0]
        else:
            text = body.prompt
        prompt = await asyncio.to_thread(chat_model.tokenizer.encode, text)
        if not prompt:
            raise APIError(400, "the prompt is empty", param="prompt")
        return await _complete(request, body, prompt, [], [], "text_completion", logprobs=body.logprobs, raw=True)

    if embedder is not None:
        from .embeddings import add_embedding_routes
        add_embedding_routes(app, embedder, APIError)

    if config.data_dir is not None:
        from pathlib import Path

        from .console import add_console_routes
        from .store import Store
        app.state.store = Store(Path(config.data_dir) / "conversations.db")
        add_console_routes(app, app.state.store, chat_model, config, APIError, request_key)

    # -- shared completion path -------------------------------------------------------------
    def _sampling(body: SamplingFields):
        """(max new tokens, stop strings, SamplingParams) of a request: the same checks for all."""
        if body.presence_penalty or body.frequency_penalty:
            raise APIError(400, "presence_penalty and frequency_penalty are not supported; "
                                "use repetition_penalty", param="presence_penalty")
        max_new = body.max_completion_tokens or body.max_tokens or config.max_tokens_limit
        if max_new > config.max_tokens_limit:
            raise APIError(400, f"max_tokens is limited to {config.max_tokens_limit} on this server", param="max_tokens")
        try:
            base = chat_model.params(temperature=body.temperature, top_p=body.top_p, top_k=body.top_k,
                                     repetition_penalty=body.repetition_penalty)
        except GlmkitError as e:
            raise APIError(400, str(e)) from None
        return max_new, body.stops(), base

    async def _complete(request, body: SamplingFields, prompt, prefix, tools, kind, logprobs=None, raw=False,
                        json_check=None):
        max_new, stop, base = _sampling(body)
        schemas = {t["name"]: t.get("parameters") for t in tools}
        stop_ids = chat_model.format.stop_ids if not raw else frozenset({chat_model.tokenizer.eos_id})
        handles, streams = [], []
        try:
            for i in range(body.n):
                seed = None if body.seed is None else body.seed + i
                params = SamplingParams(base.temperature, base.top_p, base.top_k, base.repetition_penalty, seed)
                handles.append(chat_model.backend.submit(prompt, params, stop_ids, max_new, logprobs, prefix))
                if raw:     # all visible text is the reply: a call parser without tools calls nothing
                    parser = TaggedCallParser(PlainReplyParser(chat_model.tokenizer), {})
                else:
                    parser = protocol.call_parser(chat_model.format.reply_parser(), schemas)
                streams.append(ChoiceStream(chat_model.tokenizer, parser, stop, logprobs is not None))
        except QueueFull:
            for h in handles:  # choices already admitted for this request give their slots back
                h.cancel()
            raise
        except ContextLengthError as e:
            raise APIError(400, str(e), param="messages", code="context_length_exceeded") from None
        except GlmkitError as e:
            raise APIError(400, str(e)) from None
        cid = ("chatcmpl-" if kind == "chat.completion" else "cmpl-") + secrets.token_hex(12)
        created = int(time.time())
        usage = {"prompt_tokens": len(prompt), "completion_tokens": 0, "total_tokens": 0}
        if body.stream:
            return StreamingResponse(_sse(request, cid, created, kind, handles, streams, usage, body,
                                          json_check),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        for h, st in zip(handles, streams):
            async for ev in events(h):
                st.feed(ev)
                if st.stopped_by_string:
                    h.cancel()
                    st.finish("stop")
                    break
        for i, st in enumerate(streams):
            problem = await asyncio.to_thread(json_check, st.content) if json_check and not st.tool_calls else None
            if problem:
                raise APIError(422, f"choice {i}: {problem}", "invalid_response_error", param="response_format",
                               code="json_validation_failed")
        return _final(cid, created, kind, streams, usage)

    async def _sse(request, cid, created, kind, handles, streams, usage, body, json_check=None):
        obj = "chat.completion.chunk" if kind == "chat.completion" else "text_completion"
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(i, delta=None, finish=None, logprobs=None, text=None):
            if kind == "chat.completion":
                choice = {"index": i, "delta": delta or {}, "finish_reason": finish, "logprobs": logprobs}
            else:
                choice = {"index": i, "text": text or "", "finish_reason": finish, "logprobs": logprobs}
            c = {"id": cid, "object": obj, "created": created, "model": model_id, "choices": [choice]}
            if include_usage:
                c["usage"] = None
            return "data: " + json.dumps(c, ensure_ascii=False) + "\n\n"

        try:
            for i, (h, st) in enumerate(zip(handles, streams)):
                if kind == "chat.completion":
                    yield chunk(i, {"role": "assistant", "content": ""})
                async for ev in events(h):
                    d = st.feed(ev)
                    if st.stopped_by_string:
                        h.cancel()
                        d2 = st.finish("stop")
                        d.content += d2.content
                        d.tool_calls += d2.tool_calls
                    lp = {"content": d.logprobs} if d.logprobs else None
                    if d.content or d.tool_calls or lp:
                        if kind == "chat.completion":
                            delta = {}
                            if d.content:
                                delta["content"] = d.content
                            if d.tool_calls:
                                delta["tool_calls"] = d.tool_calls
                            yield chunk(i, delta, logprobs=lp)
                        else:
                            yield chunk(i, text=d.content, logprobs=_completion_logprobs(d.logprobs))
                    if st.finish_reason:
                        break
                yield chunk(i, {}, finish=st.finish_reason) if kind == "chat.completion" else chunk(i, finish=st.finish_reason)
                problem = await asyncio.to_thread(json_check, st.content) \
                    if json_check and not st.tool_calls else None
                if problem:  # validated, not constrained: say so in the stream, as OpenAI streams errors
                    yield "data: " + json.dumps(error_body(f"choice {i}: {problem}", "invalid_response_error",
                                                           "response_format", "json_validation_failed")) + "\n\n"
            if include_usage:
                done = sum(s.completion_tokens for s in streams)
                u = dict(usage, completion_tokens=done, total_tokens=usage["prompt_tokens"] + done)
                yield "data: " + json.dumps({"id": cid, "object": obj, "created": created, "model": model_id,
                                             "choices": [], "usage": u}) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for h in handles:
                h.cancel()

    def _final(cid, created, kind, streams, usage):
        choices = []
        for i, st in enumerate(streams):
            if kind == "chat.completion":
                msg = {"role": "assistant", "content": st.content if (st.content or not st.tool_calls) else None}
                if st.tool_calls:
                    msg["tool_calls"] = [{k: v for k, v in c.items() if k != "index"} for c in st.tool_calls]
                choice = {"index": i, "message": msg, "finish_reason": st.finish_reason, "logprobs": None}
                if st.want_logprobs:
                    choice["logprobs"] = {"content": st.all_logprobs}
            else:
                choice = {"index": i, "text": st.content, "finish_reason": st.finish_reason,
                          "logprobs": _completion_logprobs(st.all_logprobs) if st.want_logprobs else None}
            choices.append(choice)
        done = sum(s.completion_tokens for s in streams)
        u = dict(usage, completion_tokens=done, total_tokens=usage["prompt_tokens"] + done)
        return {"id": cid, "object": kind, "created": created, "model": model_id, "choices": choices, "usage": u}

    return app


def _completion_logprobs(entries: list[dict] | None):
    if not entries:
        return None
    return {"tokens": [e["token"] for e in entries], "token_logprobs": [e["logprob"] for e in entries],
            "top_logprobs": [{t["token"]: t["logprob"] for t in e["top_logprobs"]} for e in entries]}


def _step(ev) -> dict:
    """One entry of glmkit_steps from an agent's Observation: a tool or code run, or a refused
    call (its code or arguments null), and what it gave back."""
    call = ev.call
    if call.name == INTERPRETER:
        return {"type": "code", "code": call.code if isinstance(call, CodeCall) else None, **step_view(call, ev.result)}
    return {"type": "tool", "name": call.name, "arguments": call.arguments if isinstance(call, ToolCall) else None,
            "ok": ev.result.ok, "observation": ev.result.observation}


def request_key(request: Request) -> str:
    """The API key a request carries: `Authorization: Bearer KEY` or `X-API-Key: KEY`."""
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else request.headers.get("x-api-key", "")


def _authorized(request: Request, keys: list[str]) -> bool:
    token = request_key(request)
    ok = False
    for k in keys:  # constant-time compare against every key
        ok |= hmac.compare_digest(token.encode(), k.encode())
    return ok


class _Guard:
    """Pure ASGI middleware around every request: request id, API keys, the body limit on the
    bytes actually received (chunked bodies too, not just a declared Content-Length), per-route
    counts for /metrics, and a logged JSON 500 for any fault a handler did not turn into an error."""

    def __init__(self, app, config: ServerConfig, counts: dict, routes: list):
        self.app, self.config, self.counts, self.routes = app, config, counts, routes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        cfg, request = self.config, Request(scope)
        rid = request.headers.get("x-request-id") or uuid.uuid4().hex
        scope.setdefault("state", {})["request_id"] = rid
        path, status, received, started = scope["path"], 500, 0, False
        limit = cfg.max_upload_bytes if scope["method"] == "PUT" and "/files/" in path else cfg.max_body_bytes

        async def counted_receive():
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(limit)
            return message

        async def tagged_send(message):
            nonlocal status, started
            if message["type"] == "http.response.start":
                status, started = message["status"], True
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            declared = int(request.headers.get("content-length") or 0)
        except ValueError:
            declared = 0
        guarded = path.startswith(("/v1", "/api")) or path == "/metrics" and not cfg.metrics_public
        resp = None
        if declared > limit:
            resp = _error(413, f"request body is larger than {limit} bytes", code="body_too_large")
        elif cfg.api_keys and guarded and not _authorized(request, cfg.api_keys):
            resp = _error(401, "invalid or missing API key (send 'Authorization: Bearer KEY')", code="invalid_api_key")
        try:
            if resp is None:
                try:
                    await self.app(scope, counted_receive, tagged_send)
                except BodyTooLarge as e:   # read outside FastAPI's body handling
                    resp = _error(413, e.detail, code=e.code)
                except Exception:
                    log.exception("internal error in request %s", rid)
                    resp = _error(500, f"internal error (request id {rid})", "server_error")
                if started:
                    return                  # a response already began: nothing more can be said
            if resp is not None:
                await resp(scope, receive, tagged_send)
        finally:
            key = (route_label(scope, self.routes), status)
            self.counts[key] = self.counts.get(key, 0) + 1


def _error(status: int, message: str, type_: str = "invalid_request_error", code: str | None = None) -> JSONResponse:
    return JSONResponse(error_body(message, type_, code=code), status_code=status)


def _field_path(loc) -> list:
    """A pydantic error location as the request's field path (body and union member tags dropped)."""
    out = []
    for p in loc[1:] if loc and loc[0] == "body" else loc:
        if isinstance(p, str) and not p.isidentifier() or p in ("str", "int", "float", "bool", "list", "dict") \
                or isinstance(p, str) and p[:1].isupper():
            break
        out.append(p)
    return out


def _check_model(requested: str | None, model_id: str):
    # clients must send some model name; accept ours, and the generic names SDK examples use
    if requested and requested != model_id and requested not in ("default", "glmkit"):
        raise APIError(404, f"model {requested!r} not found; this server serves {model_id!r}", param="model",
                       code="model_not_found")


def _json_checker(fmt):
    """response_format is validated, not enforced during decoding: returns a function that says
    what is wrong with a reply (None when it is acceptable), or None for plain text."""
    if fmt is None or fmt.type == "text":
        return None
    if fmt.type == "json_schema" and fmt.json_schema is None:
        raise APIError(400, "response_format json_schema needs json_schema.schema (an object)",
                       param="response_format.json_schema")
    schema = fmt.json_schema.schema_ if fmt.type == "json_schema" else None   # checked by _check_schemas

    def check(content: str) -> str | None:
        try:
            value = loads_bounded(content)
        except ValueError as e:
            return f"the model's reply is not valid JSON ({e}); glmkit validates " \
                   "response_format but does not constrain decoding, so ask for JSON in the prompt too"
        if fmt.type == "json_object" and not isinstance(value, dict):
            return "the model's reply is JSON but not an object"
        if schema is not None:
            try:
                validate_json(value, schema)
            except jsonschema.ValidationError as e:
                return f"the model's reply does not match the schema: {e.message}"
        return None
    return check


def _flat_tools(body) -> list[dict]:
    return flat_tools([t.model_dump() for t in body.tools or []])


def _check_schemas(body) -> None:
    """Every client schema of a request, before any use: bounded (one budget for all of them),
    well-formed, and with local references only (chat.json_schema).  Runs in a worker thread."""
    items = [(f"tools[{i}].function.parameters", t.function.parameters) for i, t in enumerate(body.tools or [])
             if t.function.parameters is not None]
    fmt = body.response_format
    if fmt is not None and fmt.type == "json_schema" and fmt.json_schema is not None:
        items.append(("response_format.json_schema.schema", fmt.json_schema.schema_))
    budget = MAX_CONTAINERS
    for param, schema in items:
        try:
            budget -= check_schema(schema, budget)
        except SchemaRefused as e:
            raise APIError(400, f"{param}: {e}", param=param) from None


def _forced_tool(choice, tools: list[dict]) -> str | None:
    if choice in (None, "auto", "none"):
        return None
    names = [t["name"] for t in tools]
    if choice == "required":
        if len(names) == 1:
            return names[0]
        raise APIError(400, "tool_choice 'required' needs exactly one tool here; name the function instead",
                       param="tool_choice")
    if isinstance(choice, NamedToolChoice):
        name = choice.function.name
        if name not in names:
            raise APIError(400, f"tool_choice names {name!r}, which is not among the tools", param="tool_choice")
        return name
    raise APIError(400, "tool_choice must be 'auto', 'none', 'required' or a named function", param="tool_choice")


def _model_card(model_id, chat_model, scheduler, created) -> dict:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "glmkit",
            "context_length": scheduler.max_seq_len, "max_model_len": scheduler.max_seq_len,
            "family": chat_model.config.family}
