"""The Anthropic Messages API: POST /v1/messages (whole or streamed) and /v1/messages/count_tokens,
so that Anthropic's SDKs and tools work against this server unchanged.

A request becomes a prompt exactly as a chat completion does (anthropic_requests turns its
messages into OpenAI-style ones for the model's protocol) and is answered by the same
server.completions.submit and Choice; only the shape differs.  The reply is one sequence of
content-block events (`_block_events`): streamed, they are the server-sent events; whole, they are
folded into the message, so both always say the same.  Refusals are Anthropic-shaped
(server.errors.for_path).

Model names: any is accepted and the served id is echoed.  Anthropic clients send names such as
"claude-sonnet-4-5" that they cannot be told to change: a name this server serves (--models)
picks that model, any other gets the default; the response's `model` says which model answered."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections.abc import AsyncIterator
from dataclasses import replace

from fastapi import APIRouter, Request
from fastapi.responses import Response, StreamingResponse

from ..chat.tool_calls import ToolCall
from ..errors import GlmkitError, GrammarError
from .completions import Choice, submit
from .errors import APIError, StrictJSONRoute, anthropic_error_body
from .anthropic_requests import CountTokensRequest, MessagesRequest
from .state import Server, ServerState

log = logging.getLogger("glmkit.server")
router = APIRouter(route_class=StrictJSONRoute)
SSE_HEADERS = {"Cache-Control": "no-cache"}


@router.post("/v1/messages", responses={200: {"content": {"text/event-stream": {}}}})
async def messages(body: MessagesRequest, server: Server, request: Request):
    server = _chosen(body, server)
    chat_model = server.chat_model
    prompt, tools = await _prompt(body, server)
    params = body.to_sampling_params(chat_model.default_sampling)
    # max_tokens is required, so clients send a ceiling (often far above any local model's
    # needs): at most the server's --max-tokens; a reply cut there says stop_reason max_tokens
    max_new = min(body.max_tokens, server.config.max_tokens_limit)
    protocol = chat_model.protocol
    forced = body.forced_tool(tools)
    start = protocol.forced_start(forced) if forced else ""    # the reply starts as that tool's call
    schemas = {t["name"]: t["parameters"] for t in tools}
    if forced and body.strict_tool(forced):     # its arguments after the forced start follow the schema
        try:
            grammar = await asyncio.to_thread(chat_model.json_grammar, schemas[forced], True)
        except GrammarError as e:
            raise APIError(400, str(e), param="tools") from None
        if grammar is not None:
            params = replace(params, grammar=grammar)
    [choice] = submit(chat_model.backend, 1, prompt, params, chat_model.format.stop_ids, max_new,
                      lambda: protocol.call_parser(chat_model.format.reply_parser(), schemas),
                      body.stop_sequences or [], forced_prefix=chat_model.tokenizer.encode(start) if start else ())
    reply = _Reply(server.model_id, len(prompt), choice, request.scope.get("state", {}).get("request_id", ""))
    if body.stream:     # a client that goes away cancels the stream, whose end cancels the sequence
        return StreamingResponse(reply.sse(), media_type="text/event-stream", headers=SSE_HEADERS)
    return await _unless_gone(request, reply.whole(), choice)


@router.post("/v1/messages/count_tokens")
async def count_tokens(body: CountTokensRequest, server: Server):
    prompt, _ = await _prompt(body, _chosen(body, server))
    return {"input_tokens": len(prompt)}


def _chosen(body: CountTokensRequest, server: ServerState) -> ServerState:
    """The model the request names if this server serves it, else the default (see above)."""
    return server.pick(body.model if body.model in server.models or body.model in server.clouds else None)


async def _prompt(body: CountTokensRequest, server: ServerState) -> tuple[list[int], list[dict]]:
    """The request's prompt (token ids) and the tools it offers the model."""
    if body.tools:
        await asyncio.to_thread(body.check_schemas)     # jsonschema's meta-schema check is slow
    tools = body.flat_tools()
    chat_model = server.chat_model
    try:
        history = chat_model.protocol.api_messages(body.message_dicts(), tools)
        return await asyncio.to_thread(chat_model.encode_chat, history), tools
    except GlmkitError as e:
        raise APIError(400, str(e), param="messages") from None


async def _unless_gone(request: Request, whole, choice: Choice):
    """`whole` awaited, unless the client disconnects first: then its sequence is cancelled (a
    non-streamed reply would otherwise run to its end for nobody)."""
    async def gone():
        while (await request.receive())["type"] != "http.disconnect":
            pass
    answer, watch = asyncio.ensure_future(whole), asyncio.ensure_future(gone())
    try:
        await asyncio.wait({answer, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watch.cancel()
        if not answer.done():
            answer.cancel()
            choice.handle.cancel()
    if not answer.done():
        return Response(status_code=499)      # nobody reads it
    return answer.result()


class _Reply:
    """One choice as an Anthropic message."""

    def __init__(self, model: str, input_tokens: int, choice: Choice, request_id: str):
        self.model, self.input_tokens, self.choice, self.request_id = model, input_tokens, choice, request_id
        self.id = "msg_" + secrets.token_hex(12)

    def _message(self, content: list[dict], stop_reason: str | None, stop_sequence: str | None,
                 output_tokens: int) -> dict:
        return {"id": self.id, "type": "message", "role": "assistant", "model": self.model, "content": content,
                "stop_reason": stop_reason, "stop_sequence": stop_sequence,
                "usage": {"input_tokens": self.input_tokens, "output_tokens": output_tokens}}

    def _stop(self) -> tuple[str, str | None]:
        """stop_reason and stop_sequence, once the choice has ended."""
        tokens = self.choice.tokens
        if self.choice.calls:
            return "tool_use", None
        if tokens.stopped_by_string:
            return "stop_sequence", tokens.stops.matched
        return ("max_tokens", None) if tokens.finish_reason == "length" else ("end_turn", None)

    async def _block_events(self) -> AsyncIterator[dict]:
        """content_block_start/_delta/_stop events, in the order the model wrote text and calls.
        Text that is only whitespace before a call or the end makes no block (the model's line
        breaks around its calls; Anthropic's API refuses such blocks when a client sends them back)."""
        index, in_text, held = 0, False, ""
        async for piece in self.choice.pieces():
            for item in piece.items:
                if isinstance(item, str):
                    if not in_text:
                        held += item
                        if not held.strip():
                            continue
                        item, held, in_text = held, "", True
                        yield {"type": "content_block_start", "index": index, "content_block": {"type": "text", "text": ""}}
                    yield {"type": "content_block_delta", "index": index, "delta": {"type": "text_delta", "text": item}}
                elif isinstance(item, ToolCall):
                    if in_text:
                        yield {"type": "content_block_stop", "index": index}
                        index, in_text = index + 1, False
                    held = ""
                    # the call is whole when the parser gives it: its input is one delta
                    yield {"type": "content_block_start", "index": index, "content_block": {
                        "type": "tool_use", "id": "toolu_" + item.id.removeprefix("call_"), "name": item.name,
                        "input": {}}}
                    yield {"type": "content_block_delta", "index": index, "delta": {
                        "type": "input_json_delta", "partial_json": json.dumps(item.arguments, ensure_ascii=False)}}
                    yield {"type": "content_block_stop", "index": index}
                    index += 1
        if in_text:
            yield {"type": "content_block_stop", "index": index}

    async def whole(self) -> dict:
        content: list[dict] = []
        partial = ""
        async for ev in self._block_events():
            if ev["type"] == "content_block_start":
                content.append(dict(ev["content_block"]))
                partial = ""
            elif ev["type"] == "content_block_delta":
                if ev["delta"]["type"] == "text_delta":
                    content[-1]["text"] += ev["delta"]["text"]
                else:
                    partial += ev["delta"]["partial_json"]
            elif content[-1]["type"] == "tool_use":
                content[-1]["input"] = json.loads(partial)
        return self._message(content, *self._stop(), self.choice.tokens.completion_tokens)

    async def sse(self) -> AsyncIterator[str]:
        try:
            yield _event({"type": "message_start", "message": self._message([], None, None, 0)})
            try:
                async for ev in self._block_events():
                    yield _event(ev)
            except Exception as e:     # the response has begun: a failure can only be an event
                log.exception("internal error in streamed request %s", self.request_id)
                status = 400 if isinstance(e, GlmkitError) else 500
                message = str(e) if status == 400 else f"internal error (request id {self.request_id})"
                yield _event(anthropic_error_body(status, message))
                return
            reason, sequence = self._stop()
            yield _event({"type": "message_delta", "delta": {"stop_reason": reason, "stop_sequence": sequence},
                          "usage": {"output_tokens": self.choice.tokens.completion_tokens}})
            yield _event({"type": "message_stop"})
        finally:
            self.choice.handle.cancel()      # no-op once finished; frees the slot if the client went away


def _event(data: dict) -> str:
    return f"event: {data['type']}\ndata: {json.dumps(data, ensure_ascii=False)}\n\n"
