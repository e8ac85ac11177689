"""The glmkit_run_tools extension of /v1/chat/completions: the server runs its own tools and code
interpreter between generations (n=1), answering once the model has, or streaming as it goes.

It is the chat layer's Agent over the server's scheduler, as in the console, for every model the
agent accepts (a model with no tool protocol of its own is asked for the tagged convention).  A
call to one of the client's own tools ends the run and comes back as `tool_calls`, as without the
extension.  The request's SamplingParams and token limit are the ones a plain request gets (built
and checked by the caller, openai_routes); stop strings end each generation, and response_format
is checked on the final answer.  What ran is listed in `glmkit_steps`.

Streamed, answer text arrives as ordinary chunks and each step as a chunk with no choices and a
`glmkit_step` field ({"event": "call"|"result", ...}): a chunk with empty `choices` is what OpenAI
clients already skip (it is how usage arrives), so they ignore steps safely.  A client that leaves
(streaming or not) stops the run: generation is cancelled and the running cell interrupted."""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
import uuid
from collections.abc import AsyncIterator

from starlette.requests import Request

from ..chat.agent import Agent, CodeStep, Finished, Observation, RefusedStep, TextDelta, ToolCallStep
from ..chat.openai_compat import content_text, openai_tool_call
from ..chat.tool_definitions import Tool
from ..engine.requests import SamplingParams
from ..errors import GlmkitError
from .errors import APIError, error_body
from .knowledge import prompt_history
from .openai_requests import ChatCompletionRequest
from .openai_responses import AssistantMessage, ChatChoice, ChatCompletion, ToolCallOut, Usage
from .scheduled_model import ScheduledModel
from .tool_steps import glmkit_step

DISCONNECT_POLL_S = 0.25     # how often a non-streamed run checks that its client is still there


def _check(server, body: ChatCompletionRequest) -> None:
    """What the extension cannot do, each a 400 naming the field."""
    if not server.config.server_tools and server.config.code_interpreter is None:
        raise APIError(400, "this server runs no tools itself (start it with --tools and/or --code)",
                       param="glmkit_run_tools")
    if body.n != 1:
        raise APIError(400, "glmkit_run_tools works with n=1", param="glmkit_run_tools")
    if body.logprobs:
        raise APIError(400, "logprobs are not available with glmkit_run_tools", param="logprobs")
    if body.tool_choice not in (None, "auto"):
        raise APIError(400, "glmkit_run_tools lets the model choose its tools (tool_choice 'auto')",
                       param="tool_choice")


class _Run:
    """One agent run: its model adapter (with the cancel event), its kernel, its events."""

    def __init__(self, server, body: ChatCompletionRequest, params: SamplingParams, max_new_tokens: int,
                 retrieved=None):
        config = server.config
        client_tools = [Tool(t["name"], t["description"], t["parameters"]) for t in body.flat_tools()]
        tools = client_tools + [t for t in config.server_tools.values() if t.name not in {c.name for c in client_tools}]
        messages = body.message_dicts()
        system = next((m for m in messages if m.get("role") == "system"), None)
        try:
            # the first system message is the agent's (which lists the tools); the rest is history
            history = server.chat_model.protocol.api_messages([m for m in messages if m is not system], [])
            history = prompt_history(history, server.chat_model.protocol, retrieved)     # glmkit_knowledge
            system_text = content_text(system.get("content")) if system else None
        except GlmkitError as e:
            raise APIError(400, str(e), param="messages") from None
        self.server, self.retrieved = server, retrieved
        self.model = ScheduledModel(server.chat_model, threading.Event(), max_new_tokens, stop=body.stops(),
                                    params=params)
        # the request's own kernel, in a temporary workspace, made only if the model writes code
        self.kernel = (config.code_interpreter.lease(f"request-{uuid.uuid4().hex}")
                       if config.code_interpreter is not None else None)
        self.agent = Agent(self.model, tools, max_steps=config.max_steps, system=system_text, interpreter=self.kernel)
        self.agent.messages += history
        self.id, self.created = "chatcmpl-" + secrets.token_hex(12), int(time.time())

    def events(self):
        """The agent's events (blocking; run in a worker thread); the kernel goes when they end."""
        try:
            yield from self.agent.run(None)
        finally:
            if self.kernel is not None:
                self.kernel.close()      # with its workspace

    def stop(self):
        """The client left (or the server is stopping): no more tokens, interrupt the cell."""
        self.model.cancel.set()
        if self.kernel is not None:
            self.kernel.interrupt()

    def usage(self) -> Usage:
        m = self.model
        return Usage(prompt_tokens=m.prompt_tokens, completion_tokens=m.completion_tokens,
                     total_tokens=m.prompt_tokens + m.completion_tokens)


async def run_tools(server, body: ChatCompletionRequest, params: SamplingParams, max_new_tokens: int,
                    json_check=None, request: Request | None = None, retrieved=None):
    """`retrieved`: glmkit_knowledge's passages (server.knowledge), which the last user message
    is answered from; the response's glmkit_citations are read from the final answer."""
    _check(server, body)
    run = _Run(server, body, params, max_new_tokens, retrieved)
    if body.stream:
        from fastapi.responses import StreamingResponse
        usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_sse(run, json_check, usage), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache"})
    work = asyncio.ensure_future(asyncio.to_thread(lambda: list(run.events())))
    try:
        while not work.done():
            await asyncio.wait({work}, timeout=DISCONNECT_POLL_S)
            if not work.done() and request is not None and await request.is_disconnected():
                run.stop()              # the thread sees the cancel, ends its generation, closes the kernel
        evs = work.result()
    except asyncio.CancelledError:    # e.g. the server shutting down: stop generating and running code
        run.stop()
        raise
    steps, content, generation_over, finished = [], "", False, None
    for ev in evs:
        if isinstance(ev, TextDelta):     # the answer is the last generation's text
            content = (content if not generation_over else "") + ev.text
            generation_over = False
        elif isinstance(ev, Observation):
            steps.append(glmkit_step(ev))
            generation_over = True
        elif isinstance(ev, Finished):
            finished = ev
    if generation_over:                   # the last generation wrote no text
        content = ""
    message, finish = _final(run, finished, content)
    if finish not in ("length", "tool_calls") and json_check and (problem := await asyncio.to_thread(json_check, content)):
        raise APIError(422, problem, "invalid_response_error", param="response_format",
                       code="json_validation_failed")
    return ChatCompletion(id=run.id, created=run.created, model=server.model_id,
                          choices=[ChatChoice(index=0, message=message, finish_reason=finish)], usage=run.usage(),
                          glmkit_steps=steps, **(retrieved.fields(content) if retrieved is not None else {}))


def _final(run: _Run, finished: Finished | None, content: str) -> tuple[AssistantMessage, str]:
    finish = run.model.finish_reason
    if finished is not None and finished.reason == "max_steps":
        return AssistantMessage(content=content), "length"
    if finished is not None and finished.reason == "tool_calls":
        return (AssistantMessage(content=content or None,      # what the model wrote before its calls
                                 tool_calls=[ToolCallOut(**openai_tool_call(c)) for c in finished.handed_over]),
                "tool_calls")
    return AssistantMessage(content=content), finish


def _step_event(ev) -> dict | None:
    """A step as the stream shows it: a call about to run, or what it gave back."""
    if isinstance(ev, ToolCallStep):
        return {"event": "call", "type": "tool", "name": ev.call.name, "arguments": ev.call.arguments}
    if isinstance(ev, CodeStep):
        return {"event": "call", "type": "code", "code": ev.call.code}
    if isinstance(ev, RefusedStep):
        return {"event": "call", "type": "refused", "name": ev.call.name, "reason": ev.call.reason}
    if isinstance(ev, Observation):
        return {"event": "result", **glmkit_step(ev).model_dump()}
    return None


async def _sse(run: _Run, json_check, include_usage: bool) -> AsyncIterator[str]:
    """The run as server-sent events: text chunks, step chunks, the final chunk, [DONE]."""
    loop = asyncio.get_running_loop()
    q: asyncio.Queue = asyncio.Queue()
    done = object()

    def work():
        try:
            for ev in run.events():
                loop.call_soon_threadsafe(q.put_nowait, ev)
        except BaseException as e:          # shown to the client as an error event
            loop.call_soon_threadsafe(q.put_nowait, e)
        finally:
            loop.call_soon_threadsafe(q.put_nowait, done)

    def chunk(choices: list, **extra) -> str:
        body = {"id": run.id, "object": "chat.completion.chunk", "created": run.created,
                "model": run.server.model_id, "choices": choices, **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    thread = threading.Thread(target=work, name="glmkit-run-tools", daemon=True)
    thread.start()
    content, finished = "", None
    try:
        yield chunk([{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}])
        while (ev := await q.get()) is not done:
            if isinstance(ev, BaseException):
                msg = str(ev) if isinstance(ev, GlmkitError) else "the tool run failed"
                yield f"data: {json.dumps(error_body(msg, 'server_error'))}\n\n"
                continue
            if isinstance(ev, TextDelta):
                content += ev.text
                yield chunk([{"index": 0, "delta": {"content": ev.text}, "finish_reason": None}])
            elif isinstance(ev, Finished):
                finished = ev
            elif (step := _step_event(ev)) is not None:
                if isinstance(ev, Observation):
                    content = ""                # the answer is the last generation's text
                yield chunk([], glmkit_step=step)
        message, finish = _final(run, finished, content)
        delta = {"tool_calls": [dict(c.model_dump(), index=i) for i, c in enumerate(message.tool_calls)]} \
            if message.tool_calls else {}
        if finish not in ("length", "tool_calls") and json_check and (problem := await asyncio.to_thread(json_check, content)):
            yield f"data: {json.dumps(error_body(problem, 'invalid_response_error', 'response_format', 'json_validation_failed'))}\n\n"
        yield chunk([{"index": 0, "delta": delta, "finish_reason": finish}])
        if include_usage:
            yield chunk([], usage=run.usage().model_dump())
        if run.retrieved is not None:       # glmkit_knowledge: as server.knowledge says, before [DONE]
            fields = run.retrieved.fields(content)
            yield chunk([], glmkit_citations=[c.model_dump() for c in fields["glmkit_citations"]],
                        glmkit_knowledge=fields["glmkit_knowledge"].model_dump())
        yield "data: [DONE]\n\n"
    finally:
        if thread.is_alive():           # the client left mid-run
            run.stop()
