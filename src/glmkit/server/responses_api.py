"""OpenAI's Responses API: POST /v1/responses, GET and DELETE /v1/responses/{id}.

A request becomes a chat completion request (server.responses_requests) and is answered by the
chat endpoint's machinery (openai_routes.chat_choices, server.completions: one choice, its
pieces as they decode, client-disconnect cancellation); here its pieces become Responses output
items, whole or as the Responses event stream.  One path builds both: the whole response is the
event stream consumed on the server.

Responses are kept (store, the default) in the console's store (SQLite, or --database's
PostgreSQL), under the same owner as its conversations (a hash of the request's API key), with the
whole conversation through each one, so that previous_response_id continues it.  Without a data
directory (--no-console) nothing is kept and previous_response_id is refused."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import secrets
import time
from collections.abc import AsyncIterator
from contextlib import contextmanager

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from .auth import request_key
from .completions import Choice
from .errors import STORE_DOWN, APIError, StrictJSONRoute
from .openai_routes import ERRORS, SSE_HEADERS, chat_choices
from .responses_requests import ResponsesRequest
from .state import Server, ServerState
from .store import NotFound, owner_of
from .store_sql import StoreUnavailable

router = APIRouter(route_class=StrictJSONRoute, responses=ERRORS)


def _owner(request: Request, server: ServerState) -> str:
    # the console's rule (Console.owner), so one key's responses and conversations share an owner
    return owner_of(request_key(request) if server.config.api_keys else None)


def _store(server: ServerState):
    return server.console.store if server.console is not None else None


def _not_found(rid: str, param: str | None = None, code: str = "response_not_found") -> APIError:
    # another owner's response is "not found" too: nothing tells that it exists
    return APIError(404, f"response {rid[:128]!r} not found", param=param, code=code)


@router.post("/v1/responses", responses={200: {"content": {"text/event-stream": {}}}})
async def create_response(body: ResponsesRequest, request: Request, server: Server):
    server = server.pick(body.model)
    store, owner = _store(server), _owner(request, server)
    history: list[dict] = []
    if body.previous_response_id:
        if store is None:
            raise APIError(400, "this server keeps no responses (it runs without a data directory: --no-console)",
                           param="previous_response_id", code="previous_response_not_found")
        try:
            kept = await asyncio.to_thread(store.get_response, owner, body.previous_response_id)
        except NotFound:
            raise _not_found(body.previous_response_id, "previous_response_id", "previous_response_not_found") \
                from None
        history = kept["messages"]
    new = body.input_messages()
    chat = body.chat_request(history + new)
    max_new = body.max_new_tokens(server.config.max_tokens_limit)
    with _responses_params():
        json_check = chat.json_checker()
        if chat.tools or json_check:
            await asyncio.to_thread(chat.check_schemas)     # jsonschema's meta-schema check is slow
        params = chat.to_sampling_params(server.chat_model.default_sampling)
        prompt, [choice] = await chat_choices(server, chat, params, max_new, json_check)
    run = ResponseRun(server.model_id, body, params, len(prompt), choice, json_check,
                      store if body.store else None, owner, history + new)
    if body.stream:
        return StreamingResponse(run.sse(), media_type="text/event-stream", headers=SSE_HEADERS)
    return await run.whole()


@router.get("/v1/responses/{rid}")
async def get_response(rid: str, request: Request, server: Server):
    store = _store(server)
    try:
        if store is None:
            raise NotFound(rid)
        return (await asyncio.to_thread(store.get_response, _owner(request, server), rid))["response"]
    except NotFound:
        raise _not_found(rid) from None


@router.delete("/v1/responses/{rid}")
async def delete_response(rid: str, request: Request, server: Server):
    store = _store(server)
    try:
        if store is None:
            raise NotFound(rid)
        await asyncio.to_thread(store.delete_response, _owner(request, server), rid)
    except NotFound:
        raise _not_found(rid) from None
    return {"id": rid, "object": "response", "deleted": True}


# the chat request's field names, as this request names them
_PARAMS = [(re.compile(r"^messages\b"), "input"), (re.compile(r"^response_format(\.json_schema)?"), "text.format"),
           (re.compile(r"^tools\[(\d+)\]\.function\."), r"tools[\1].")]


@contextmanager
def _responses_params():
    """A refusal of the chat machinery names the field of the Responses request, not the chat
    request's (`text.format.schema`, not `response_format.json_schema.schema`)."""
    try:
        yield
    except APIError as e:
        if e.param:
            new = e.param
            for pattern, to in _PARAMS:
                new = pattern.sub(to, new)
            e.message = e.message.replace(e.param + ":", new + ":")
            e.param = new
        raise


class ResponseRun:
    """One response in the making: its choice's pieces as Responses output items and events."""

    def __init__(self, model: str, body: ResponsesRequest, params, prompt_tokens: int, choice: Choice,
                 json_check, store, owner: str, messages: list[dict]):
        self.model, self.body, self.params = model, body, params
        self.prompt_tokens, self.choice, self.json_check = prompt_tokens, choice, json_check
        self.store, self.owner, self.messages = store, owner, messages   # store None: not kept
        self.id = "resp_" + secrets.token_hex(16)
        self.created = int(time.time())
        self.output: list[dict] = []      # the output items so far
        self.final: dict | None = None    # the response object, once complete

    # -- the response object -----------------------------------------------------------------
    def snapshot(self, status: str) -> dict:
        b = self.body
        fmt = b.text.format.model_dump(by_alias=True, exclude_none=True) if b.text else {"type": "text"}
        done = status in ("completed", "incomplete")
        usage = None
        if done:
            n = self.choice.tokens.completion_tokens
            usage = {"input_tokens": self.prompt_tokens, "input_tokens_details": {"cached_tokens": 0},
                     "output_tokens": n, "output_tokens_details": {"reasoning_tokens": 0},
                     "total_tokens": self.prompt_tokens + n}
        return {
            "id": self.id, "object": "response", "created_at": self.created, "status": status,
            "completed_at": int(time.time()) if status == "completed" else None,
            "error": None,
            "incomplete_details": {"reason": "max_output_tokens"} if status == "incomplete" else None,
            "instructions": b.instructions, "max_output_tokens": b.max_output_tokens, "model": self.model,
            "output": list(self.output), "parallel_tool_calls": b.parallel_tool_calls is not False,
            "previous_response_id": b.previous_response_id, "reasoning": {"effort": None, "summary": None},
            "store": self.store is not None, "temperature": self.params.temperature, "text": {"format": fmt},
            "tool_choice": (b.tool_choice.model_dump() if hasattr(b.tool_choice, "model_dump")
                            else b.tool_choice or "auto"),
            "tools": [t.model_dump() for t in b.tools or []], "top_p": self.params.top_p,
            "truncation": "disabled", "usage": usage, "user": b.user, "metadata": b.metadata or {},
        }

    # -- the event stream --------------------------------------------------------------------
    async def events(self) -> AsyncIterator[dict]:
        """The Responses events of this response, without sequence numbers; at the end `final`
        is the response object (kept, if it is to be kept)."""
        yield {"type": "response.created", "response": self.snapshot("in_progress")}
        yield {"type": "response.in_progress", "response": self.snapshot("in_progress")}
        message: dict | None = None       # the message item being written
        text: list[str] = []              # all its text: the conversation keeps one assistant message
        async for piece in self.choice.pieces():
            if piece.content:
                if message is None:
                    message = self._message_item()
                    for ev in self._open_message(message):
                        yield ev
                message["content"][0]["text"] += piece.content
                text.append(piece.content)
                yield {"type": "response.output_text.delta", "item_id": message["id"],
                       "output_index": len(self.output) - 1, "content_index": 0, "delta": piece.content,
                       "logprobs": []}
            for call in piece.calls:
                if message is not None:      # text, then a call: the message is done
                    for ev in self._close_message(message, "completed"):
                        yield ev
                    message = None
                for ev in self._call_events(call):
                    yield ev
        incomplete = self.choice.finish_reason == "length"
        if message is None and not self.choice.calls:     # an empty reply is still a message
            message = self._message_item()
            for ev in self._open_message(message):
                yield ev
        if message is not None:
            for ev in self._close_message(message, "incomplete" if incomplete else "completed"):
                yield ev
        # validated where not constrained (a reply cut short is incomplete, not invalid)
        if self.json_check is not None and not self.choice.calls and not incomplete:
            if problem := await asyncio.to_thread(self.json_check, self.choice.content):
                yield {"type": "error", "code": "json_validation_failed", "message": problem, "param": "text.format"}
                return
        status = "incomplete" if incomplete else "completed"
        self.final = self.snapshot(status)
        if self.store is not None:
            reply = {"role": "assistant", "content": "".join(text)}
            if self.choice.calls:
                reply["tool_calls"] = [{"id": c.id, "type": "function", "function": {
                    "name": c.name, "arguments": _arguments(c)}} for c in self.choice.calls]
            try:
                await asyncio.to_thread(self.store.save_response, self.owner, self.id,
                                        self.body.previous_response_id, [*self.messages, reply], self.final)
            except StoreUnavailable as e:
                # the reply is written but cannot be kept: a stream has sent 200 long ago, so it ends
                # with an error and a failed response (as OpenAI's does), not a broken connection;
                # whole() turns the error into the 503 any other store failure is
                logging.getLogger("glmkit.server").error("%s", e)
                self.final = {**self.final, "status": "failed", "completed_at": None,
                              "error": {"code": "store_unavailable", "message": STORE_DOWN}}
                yield {"type": "error", "code": "store_unavailable", "message": STORE_DOWN, "param": None}
                yield {"type": "response.failed", "response": self.final}
                return
        yield {"type": f"response.{status}", "response": self.final}

    def _message_item(self) -> dict:
        item = {"type": "message", "id": "msg_" + secrets.token_hex(16), "status": "in_progress",
                "role": "assistant", "content": [{"type": "output_text", "text": "", "annotations": [],
                                                  "logprobs": []}]}
        self.output.append(item)
        return item

    def _open_message(self, item: dict) -> list[dict]:
        index = len(self.output) - 1
        return [{"type": "response.output_item.added", "output_index": index, "item": {**item, "content": []}},
                {"type": "response.content_part.added", "item_id": item["id"], "output_index": index,
                 "content_index": 0, "part": {"type": "output_text", "text": "", "annotations": [], "logprobs": []}}]

    def _close_message(self, item: dict, status: str) -> list[dict]:
        index = self.output.index(item)
        item["status"] = status
        part = item["content"][0]
        return [{"type": "response.output_text.done", "item_id": item["id"], "output_index": index,
                 "content_index": 0, "text": part["text"], "logprobs": []},
                {"type": "response.content_part.done", "item_id": item["id"], "output_index": index,
                 "content_index": 0, "part": dict(part)},
                {"type": "response.output_item.done", "output_index": index, "item": dict(item)}]

    def _call_events(self, call) -> list[dict]:
        args = _arguments(call)
        item = {"type": "function_call", "id": "fc_" + secrets.token_hex(16), "call_id": call.id,
                "name": call.name, "arguments": args, "status": "completed"}
        self.output.append(item)
        index = len(self.output) - 1
        # the call arrives whole (a call parser gives complete, checked calls): one delta
        return [{"type": "response.output_item.added", "output_index": index,
                 "item": {**item, "arguments": "", "status": "in_progress"}},
                {"type": "response.function_call_arguments.delta", "item_id": item["id"], "output_index": index,
                 "delta": args},
                {"type": "response.function_call_arguments.done", "item_id": item["id"], "output_index": index,
                 "name": call.name, "arguments": args},
                {"type": "response.output_item.done", "output_index": index, "item": dict(item)}]

    # -- whole, or streamed ------------------------------------------------------------------
    async def whole(self) -> dict:
        try:
            async for ev in self.events():
                if ev["type"] == "error" and ev["code"] == "store_unavailable":
                    raise StoreUnavailable(ev["message"])
                if ev["type"] == "error":
                    raise APIError(422, ev["message"], "invalid_response_error", param="text.format",
                                   code="json_validation_failed")
        finally:
            self.choice.handle.cancel()
        return self.final

    async def sse(self) -> AsyncIterator[str]:
        try:
            n = 0
            async for ev in self.events():
                ev["sequence_number"] = n
                n += 1
                yield f"event: {ev['type']}\ndata: {json.dumps(ev, ensure_ascii=False)}\n\n"
        finally:      # the client went away: the engine stops on this sequence (no-op if finished)
            self.choice.handle.cancel()


def _arguments(call) -> str:
    return json.dumps(call.arguments, ensure_ascii=False)
