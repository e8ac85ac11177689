"""Answering one completion request: its n choices, submitted to the engine together, read through
the chat layer's ReplyTokens, and returned whole or as server-sent events.

A choice's reply parser is a protocol's call parser (chat.protocols): it gives text, ToolCalls
(each a `tool_calls` entry, several in one reply included) and RefusedCalls (shown as what the
model wrote, with the reason).  A named tool_choice forces the start of the call (the backend's
forced_prefix): those tokens arrive as events like any other.  Nothing here knows HTTP beyond
the shape of an event stream."""

from __future__ import annotations

import asyncio
import json
import queue
import secrets
import threading
import time
import weakref
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..chat.backend import TokenStream
from ..chat.openai_compat import openai_tool_call
from ..chat.reply_stream import ReplyTokens
from ..chat.tool_calls import RefusedCall, ToolCall
from ..engine.requests import SamplingParams, TokenEvent
from ..errors import ContextLengthError, GlmkitError
from .errors import APIError, error_body
from .openai_responses import (AssistantMessage, ChatChoice, ChatCompletion, ChatCompletionChunk, ChoiceLogprobs,
                            ChunkChoice, Completion, CompletionChoice, CompletionLogprobs, Delta, ToolCallOut,
                            Usage)


class _Waker:
    """Wakes an event loop's waiting streams from the engine's thread with one call_soon_threadsafe
    (one write to the loop's self-pipe) for all the streams a step gave events to, not one each:
    with 16 streams that was ~5% of the engine thread's time."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.ready: list[asyncio.Event] = []

    def __call__(self, ready: asyncio.Event):
        with self.lock:
            first = not self.ready
            self.ready.append(ready)
        if first:
            self.loop.call_soon_threadsafe(self._wake)

    def _wake(self):
        with self.lock:
            ready, self.ready = self.ready, []
        for r in ready:
            r.set()


_wakers: "weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _Waker]" = weakref.WeakKeyDictionary()


async def events(handle: TokenStream):
    """Async iteration over a sequence's TokenEvents without blocking the event loop."""
    loop = asyncio.get_running_loop()
    waker = _wakers.get(loop) or _wakers.setdefault(loop, _Waker(loop))
    ready = asyncio.Event()
    handle.on_event(lambda: waker(ready))
    try:
        while True:
            try:
                ev = handle.get_nowait()
            except queue.Empty:
                await ready.wait()
                ready.clear()
                continue
            yield ev
            if ev.finish:
                return
    finally:
        handle.cancel()  # no-op if finished; frees the slot if the client went away


class _AsClientsSeeIt:
    """A call parser's items as an API client is shown them: a refused call is text, what the
    model wrote and why (so stop strings apply to it like any text)."""

    def __init__(self, inner):
        self.inner = inner

    def feed(self, token_id: int) -> list:
        return self._items(self.inner.feed(token_id))

    def finish(self) -> list:
        return self._items(self.inner.finish())

    @staticmethod
    def _items(items) -> list:
        return [f"{i.written}\n(tool call refused: {i.reason})" if isinstance(i, RefusedCall) else i for i in items]


@dataclass
class Piece:
    """What one token event added to a choice."""
    content: str = ""
    calls: list[ToolCall] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)
    items: list = field(default_factory=list)     # the text and calls in the order they came
    events: list[TokenEvent] = field(default_factory=list)   # the engine's, for /v1/completions' logprobs


class Choice:
    """One choice: a submitted sequence and the ReplyTokens reading it; `content` and `calls`
    hold what was shown so far."""

    def __init__(self, handle: TokenStream, parser, stop: list[str], tokenizer=None,
                 reason_ids: frozenset[int] = frozenset()):
        """`tokenizer`: given when the client asked for logprobs.  `reason_ids`: stop ids that
        `stop_reason` names (vLLM's stop_token_ids; not end-of-sequence, which vLLM leaves unnamed)."""
        self.handle = handle
        self.tokens = ReplyTokens(_AsClientsSeeIt(parser), stop, tokenizer)
        self.content = ""
        self.calls: list[ToolCall] = []
        self.events: list[TokenEvent] = []
        self.reason_ids = reason_ids
        self._begun = None      # (first event, the rest) once start() has waited for it

    async def start(self) -> None:
        """Wait for the first event, raising what the engine raised instead (down, busy): so that
        a fallback route can still answer a request that nothing has been sent for."""
        rest = events(self.handle)
        self._begun = (await anext(rest), rest)

    async def _events(self) -> AsyncIterator[TokenEvent]:
        if self._begun is None:
            async for ev in events(self.handle):
                yield ev
            return
        (first, rest), self._begun = self._begun, None
        yield first
        if not first.finish:
            async for ev in rest:
                yield ev

    @property
    def stop_reason(self) -> int | str | None:
        """vLLM's stop_reason: the stop string or requested stop token id that ended the choice."""
        if self.tokens.stopped_by_string:
            return self.tokens.stops.matched
        if self.tokens.finish_reason == "stop" and self.events and self.events[-1].token in self.reason_ids:
            return self.events[-1].token
        return None

    @property
    def finish_reason(self) -> str | None:
        reason = self.tokens.finish_reason
        return "tool_calls" if reason and self.calls else reason

    async def pieces(self) -> AsyncIterator[Piece]:
        """A Piece per token event until the choice ends (then `finish_reason` is set)."""
        async for ev in self._events():
            seen = len(self.tokens.logprobs or ())
            items = self.tokens.feed(ev)
            if self.tokens.finish_reason:
                self.handle.cancel()         # after a stop string the engine must stop too
                items += self.tokens.finish()
            self.events.append(ev)
            piece = Piece(logprobs=(self.tokens.logprobs or [])[seen:], items=items, events=[ev])
            for item in items:
                if isinstance(item, str):
                    piece.content += item
                else:
                    piece.calls.append(item)
            self.content += piece.content
            self.calls += piece.calls
            yield piece
            if self.tokens.finish_reason:
                return


def submit(backend, n: int, prompt: list[int], params: SamplingParams, stop_ids: frozenset[int], max_new: int,
           new_parser: Callable, stop: list[str], logprobs: int | None = None, forced_prefix=(),
           prompt_param: str = "messages", reason_ids: frozenset[int] = frozenset(),
           choices: list[Choice] | None = None) -> list[Choice]:
    """Submit n choices (choice i samples with seed + i); none, if the engine refuses one.
    `new_parser()`: a fresh reply parser per choice; `logprobs`: None, or the top-k to report.
    `choices`: those already submitted for the same request (a batch of prompts), appended to and
    cancelled with these if the engine refuses one."""
    choices = [] if choices is None else choices
    try:
        for i in range(n):
            seeded = params if params.seed is None else replace(params, seed=params.seed + i)
            handle = backend.submit(prompt, seeded, stop_ids, max_new, logprobs, forced_prefix)
            choices.append(Choice(handle, new_parser(), stop, backend.tokenizer if logprobs is not None else None,
                                  reason_ids))
    except BaseException as e:
        for c in choices:      # choices already admitted for this request give their slots back
            c.handle.cancel()
        if isinstance(e, ContextLengthError):
            raise APIError(400, str(e), param=prompt_param, code="context_length_exceeded") from None
        raise                  # QueueFull: a 429; another GlmkitError: a 400 (server.errors)
    return choices


@dataclass
class Answer:
    """A request's choices and how they are shaped: chat.completion(.chunk) or text_completion."""
    model: str
    chat: bool
    prompt_tokens: int
    choices: list[Choice]
    json_check: Callable[[str], str | None] | None = None    # response_format: what is wrong with a reply
    include_usage: bool = False                              # stream_options.include_usage
    # /v1/completions with logprobs: how a token is named there (its text, or vLLM's "token_id:<id>")
    token_name: Callable[[int], str] | None = None
    knowledge: Any = None        # server.knowledge.Retrieved: a glmkit_knowledge request's passages
    id: str = ""
    created: int = field(default_factory=lambda: int(time.time()))

    def __post_init__(self):
        self.id = self.id or ("chatcmpl-" if self.chat else "cmpl-") + secrets.token_hex(12)

    def usage(self) -> Usage:
        done = sum(c.tokens.completion_tokens for c in self.choices)
        return Usage(prompt_tokens=self.prompt_tokens, completion_tokens=done, total_tokens=self.prompt_tokens + done)

    async def _problem(self, choice: Choice) -> str | None:
        # a reply cut at the token limit is incomplete, not invalid: OpenAI returns it as it is,
        # with finish_reason "length" saying so
        if self.json_check is None or choice.calls or choice.finish_reason == "length":
            return None
        return await asyncio.to_thread(self.json_check, choice.content)

    async def start(self) -> None:
        """Wait until every choice has its first token (see Choice.start); cancels them all if one fails."""
        try:
            for c in self.choices:
                await c.start()
        except BaseException:
            for c in self.choices:
                c.handle.cancel()
            raise

    async def whole(self) -> ChatCompletion | Completion:
        for c in self.choices:      # a remote engine's failure: EngineUnavailable, a 502 (server.errors)
            async for _ in c.pieces():
                pass
        for i, c in enumerate(self.choices):
            if problem := await self._problem(c):
                raise APIError(422, f"choice {i}: {problem}", "invalid_response_error", param="response_format",
                               code="json_validation_failed")
        head = dict(id=self.id, created=self.created, model=self.model, usage=self.usage())
        if self.chat:
            return ChatCompletion(**head, choices=[ChatChoice(
                index=i, finish_reason=c.finish_reason,
                message=AssistantMessage(content=c.content if c.content or not c.calls else None,
                                         tool_calls=[ToolCallOut(**openai_tool_call(t)) for t in c.calls] or None),
                logprobs=ChoiceLogprobs(content=c.tokens.logprobs) if c.tokens.logprobs is not None else None)
                for i, c in enumerate(self.choices)])
        return Completion(**head, choices=[CompletionChoice(
            index=i, text=c.content, finish_reason=c.finish_reason, stop_reason=c.stop_reason,
            logprobs=self._completion_logprobs(c.events, 0)) for i, c in enumerate(self.choices)])

    async def sse(self) -> AsyncIterator[str]:
        """The choices one after another as `data:` events, then the usage (if asked) and [DONE].
        A reply that fails response_format is an error event after its last chunk."""
        try:
            for i, c in enumerate(self.choices):
                if self.chat:
                    yield self._event(self._chunk(i, Delta(role="assistant", content="")))
                calls = sent = 0
                async for piece in c.pieces():
                    if not self.chat:       # as vLLM: a chunk per token, the last with the finish reason
                        yield self._event(self._text_chunk(i, c, piece, sent))
                        sent += len(piece.content)
                        continue
                    if piece.content or piece.calls or piece.logprobs:
                        tool_calls = [ToolCallOut(**openai_tool_call(t, index=calls + k))
                                      for k, t in enumerate(piece.calls)]
                        calls += len(tool_calls)
                        yield self._event(self._chunk(i, Delta(content=piece.content or None,
                                                               tool_calls=tool_calls or None), piece.logprobs))
                if self.chat:
                    yield self._event(self._chunk(i, Delta(), finish=c.finish_reason))
                if problem := await self._problem(c):   # validated, not constrained: said in the stream
                    yield "data: " + json.dumps(error_body(f"choice {i}: {problem}", "invalid_response_error",
                                                           "response_format", "json_validation_failed")) + "\n\n"
            if self.include_usage:
                cls = ChatCompletionChunk if self.chat else Completion
                yield self._event(cls(id=self.id, created=self.created, model=self.model, choices=[],
                                      usage=self.usage()))
            yield "data: [DONE]\n\n"
        except GlmkitError as e:    # the engine failed mid-stream (a remote one went away): said, then ended
            yield "data: " + json.dumps(error_body(str(e), "engine_error", code="engine_unavailable")) + "\n\n"
            yield "data: [DONE]\n\n"
        finally:
            for c in self.choices:
                c.handle.cancel()

    def _chunk(self, i: int, delta: Delta, logprobs: list[dict] | None = None, finish: str | None = None):
        return ChatCompletionChunk(id=self.id, created=self.created, model=self.model, choices=[ChunkChoice(
            index=i, delta=delta, finish_reason=finish, logprobs=ChoiceLogprobs(content=logprobs) if logprobs else None)])

    def _text_chunk(self, i: int, c: Choice, piece: Piece, sent: int) -> Completion:
        last = c.tokens.finish_reason is not None
        return Completion(id=self.id, created=self.created, model=self.model, choices=[CompletionChoice(
            index=i, text=piece.content, finish_reason=c.finish_reason if last else None,
            stop_reason=c.stop_reason if last else None, logprobs=self._completion_logprobs(piece.events, sent))])

    def _completion_logprobs(self, events: list[TokenEvent], offset: int) -> CompletionLogprobs | None:
        """vLLM's completion logprobs for `events`, the first token at `offset` in the text."""
        name = self.token_name
        if name is None or not events:
            return None
        tokens = [name(ev.token) for ev in events]
        offsets = [offset]
        for t in tokens[:-1]:
            offsets.append(offsets[-1] + len(t))
        return CompletionLogprobs(
            text_offset=offsets, tokens=tokens,
            token_logprobs=[None if ev.logprob is None else max(ev.logprob, -9999.0) for ev in events],
            top_logprobs=[None if ev.logprob is None else
                          {name(t): max(lp, -9999.0) for t, lp in [(ev.token, ev.logprob), *(ev.top_logprobs or ())]}
                          for ev in events])

    def _event(self, chunk) -> str:
        # usage: on every chunk (null until the last) only when the client asked for it
        return "data: " + chunk.model_dump_json(exclude=None if self.include_usage else {"usage"}) + "\n\n"

