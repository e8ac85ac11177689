"""The glmkit_run_tools extension of /v1/chat/completions: the server runs its own tools and code
interpreter between generations, and answers once the model has (non-streaming, n=1).

It is the chat layer's Agent over the server's scheduler, as in the console.  A call to one of
the client's own tools ends the run and comes back as `tool_calls`, as without the extension.
The request's SamplingParams and token limit are the ones a plain request gets (built and
checked by the caller, openai_routes); stop strings end each generation, and response_format is
checked on the final answer.  What ran is listed in `glmkit_steps`."""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
import uuid

from ..chat.agent import Agent, Finished, Observation, TextDelta
from ..chat.openai_compat import content_text, openai_tool_call
from ..chat.tool_definitions import Tool
from ..engine.requests import SamplingParams
from ..errors import GlmkitError
from .errors import APIError
from .openai_requests import ChatCompletionRequest
from .openai_responses import AssistantMessage, ChatChoice, ChatCompletion, ToolCallOut, Usage
from .scheduled_model import ScheduledModel
from .tool_steps import glmkit_step


def _check(server, body: ChatCompletionRequest) -> None:
    """What the extension cannot do, each a 400 naming the field."""
    if not server.config.server_tools and server.config.code_interpreter is None:
        raise APIError(400, "this server runs no tools itself (start it with --tools and/or --code)",
                       param="glmkit_run_tools")
    if body.stream or body.n != 1:
        raise APIError(400, "glmkit_run_tools works with stream=false and n=1", param="glmkit_run_tools")
    if not server.chat_model.protocol.native:
        raise APIError(400, f"model {server.model_id!r} has no tool-calling protocol", param="glmkit_run_tools")
    if body.logprobs:
        raise APIError(400, "logprobs are not available with glmkit_run_tools", param="logprobs")
    if body.tool_choice not in (None, "auto"):
        raise APIError(400, "glmkit_run_tools lets the model choose its tools (tool_choice 'auto')",
                       param="tool_choice")


async def run_tools(server, body: ChatCompletionRequest, params: SamplingParams, max_new_tokens: int,
                    json_check=None) -> ChatCompletion:
    _check(server, body)
    config = server.config
    client_tools = [Tool(t["name"], t["description"], t["parameters"]) for t in body.flat_tools()]
    tools = client_tools + [t for t in config.server_tools.values() if t.name not in {c.name for c in client_tools}]
    messages = body.message_dicts()
    system = next((m for m in messages if m.get("role") == "system"), None)
    try:
        # the first system message is the agent's (which lists the tools); the rest is history
        history = server.chat_model.protocol.api_messages([m for m in messages if m is not system], [])
        system_text = content_text(system.get("content")) if system else None
    except GlmkitError as e:
        raise APIError(400, str(e), param="messages") from None
    model = ScheduledModel(server.chat_model, threading.Event(), max_new_tokens, stop=body.stops(), params=params)
    # the request's own kernel, in a temporary workspace, made only if the model writes code
    kernel = (config.code_interpreter.lease(f"request-{uuid.uuid4().hex}")
              if config.code_interpreter is not None else None)
    agent = Agent(model, tools, max_steps=config.max_steps, system=system_text, interpreter=kernel)
    agent.messages += history

    def work():
        try:
            return list(agent.run(None))
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
    steps, content, generation_over = [], "", False
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
    message, finish = AssistantMessage(content=content), model.finish_reason
    if finished.reason == "max_steps":
        finish = "length"
    elif finished.reason == "tool_calls":
        message = AssistantMessage(content=content or None,      # what the model wrote before its calls
                                   tool_calls=[ToolCallOut(**openai_tool_call(c)) for c in finished.handed_over])
        finish = "tool_calls"
    elif json_check and (problem := await asyncio.to_thread(json_check, content)):
        raise APIError(422, problem, "invalid_response_error", param="response_format",
                       code="json_validation_failed")
    usage = Usage(prompt_tokens=model.prompt_tokens, completion_tokens=model.completion_tokens,
                  total_tokens=model.prompt_tokens + model.completion_tokens)
    return ChatCompletion(id="chatcmpl-" + secrets.token_hex(12), created=int(time.time()), model=server.model_id,
                          choices=[ChatChoice(index=0, message=message, finish_reason=finish)], usage=usage,
                          glmkit_steps=steps)
