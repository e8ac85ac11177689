"""The one reply driver: an assistant reply generated through a Backend, token by token.

ReplyTokens is the core: fed one sequence's TokenEvents, it runs them through a reply parser and
the stop strings and keeps the finish reason, usage and, if asked, logprobs.  ReplyStream drives
it for ChatModel.reply (the Python API, the terminal) and so for every agent run (the server's
glmkit_run_tools and its console); the server's API choices feed it from the scheduler's events
directly.  So stop strings, limits, finish reasons and usage behave the same everywhere."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ..engine.requests import SamplingParams, TokenEvent, budget
from ..engine.text import StopStrings
from .backend import Backend
from .formats import ReplyEvent


class ReplyTokens:
    """One reply's TokenEvents in, what is shown out.

    `parser` turns token ids into items (`feed(id)`, then `finish()`): a str is text to show, cut
    by the stop strings (text that may begin one is held back until it cannot); anything else (a
    new segment, a tool call) passes through as it is, after any text held back, and no stop
    string spans it.  The stop id itself is never fed to the parser.  Once `finish_reason` is set
    ("stop": a stop id or a stop string; "length") the caller ends the sequence and calls
    `finish()` for the rest.  With a `tokenizer`, `logprobs` collects an entry per token that the
    engine reported one for, in OpenAI's shape (token, logprob, bytes, top_logprobs)."""

    def __init__(self, parser, stop: list[str] | None = None, tokenizer=None):
        self.parser = parser
        self.stops = StopStrings(stop)
        self.tokenizer = tokenizer
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.token_ids: list[int] = []
        self.logprobs: list[dict] | None = [] if tokenizer is not None else None

    @property
    def stopped_by_string(self) -> bool:
        return self.stops.hit

    def feed(self, ev: TokenEvent) -> list:
        self.completion_tokens += 1
        self.token_ids.append(ev.token)
        if self.logprobs is not None and ev.logprob is not None:
            self.logprobs.append(self._logprob_entry(ev))
        items = self._shown(self.parser.feed(ev.token)) if ev.finish != "stop" else []
        if self.stops.hit or ev.finish:
            self.finish_reason = "stop" if self.stops.hit else ev.finish
        return items

    def finish(self) -> list:
        """What the parser still held, and any text held back for a stop string that never came.
        A stop string found in text the parser held (ChatGLM3 holds a segment's first line as a
        possible name) makes the finish reason "stop", as if it had been found in time."""
        items = self._shown(self.parser.finish())
        tail = self.stops.flush()
        if self.stops.hit:
            self.finish_reason = "stop"
        return items + [tail] if tail else items

    def _shown(self, items) -> list:
        out = []
        for item in items:
            if isinstance(item, str):
                item = self.stops.feed(item)
                if not item:
                    continue
            else:
                held = self.stops.flush()
                if held:
                    out.append(held)
            out.append(item)
        return out

    def _logprob_entry(self, ev: TokenEvent) -> dict:
        def entry(token, logprob):
            b = self.tokenizer.token_bytes(token)
            return {"token": b.decode("utf-8", errors="replace"), "logprob": logprob, "bytes": list(b)}
        return {**entry(ev.token, ev.logprob), "top_logprobs": [entry(t, lp) for t, lp in ev.top_logprobs or ()]}


class AnswerText:
    """A chat format's reply parser as ReplyTokens reads it: the answer's text as str (cut by stop
    strings), segment events and the text of a call being written as ReplyEvents (untouched: a
    call's arguments may hold anything)."""

    def __init__(self, inner):
        self.inner, self.in_call = inner, False

    def feed(self, token_id: int) -> list:
        return self._items(self.inner.feed(token_id))

    def finish(self) -> list:
        return self._items(self.inner.finish())

    def messages(self) -> list[dict]:
        return self.inner.messages()

    def _items(self, events: list[ReplyEvent]) -> list:
        out = []
        for e in events:
            if e.kind == "segment":
                self.in_call = bool(e.metadata)
            out.append(e.text if e.kind == "text" and not self.in_call else e)
        return out


@dataclass
class Reply:
    """Filled in while a reply streams; complete once iteration ends."""
    messages: list[dict] = field(default_factory=list)
    finish_reason: str | None = None      # "stop" or "length"
    prompt_tokens: int = 0
    completion_tokens: int = 0
    token_ids: list[int] = field(default_factory=list)


class Cancelled(Exception):
    """The client went away or pressed Stop; the agent must not act on a half-written reply."""


class ReplyStream:
    """Iterate for the ReplyEvents of the assistant's reply to `messages`; `reply` is filled in.

    Each token event goes through the chat format's reply parser and ReplyTokens.  Stop strings
    cut answer text, not a tool call being written, whose arguments may hold anything; a
    completed one ends generation and the history keeps only the text shown.  `max_length`
    bounds prompt + reply (with the backend's context); `max_new_tokens` the reply.  Leaving the
    iteration early, or setting `cancel` (then Cancelled is raised), frees the backend's slot."""

    def __init__(self, backend: Backend, messages: list[dict], params: SamplingParams,
                 max_new_tokens: int | None = None, max_length: int | None = None, stop: list[str] | None = None,
                 forced_prefix: Sequence[int] = (), reply: Reply | None = None,
                 cancel: threading.Event | None = None):
        self.backend, self.messages, self.params = backend, messages, params
        self.max_new_tokens, self.max_length, self.stop = max_new_tokens, max_length, stop
        self.forced_prefix, self.cancel = forced_prefix, cancel
        self.reply = reply if reply is not None else Reply()

    def __iter__(self) -> Iterator[ReplyEvent]:
        fmt, reply = self.backend.chat_format, self.reply
        prompt = fmt.encode(self.messages)
        max_new = self.max_new_tokens
        if self.max_length is not None:
            max_new = budget(len(prompt), max_new, min(self.max_length, self.backend.context_length))
        handle = self.backend.submit(prompt, self.params, fmt.stop_ids, max_new, forced_prefix=self.forced_prefix)
        reply.prompt_tokens = len(prompt)
        parser = AnswerText(fmt.reply_parser())
        tokens = ReplyTokens(parser, self.stop)
        try:
            for ev in self._events(handle):
                items = tokens.feed(ev)
                reply.completion_tokens, reply.token_ids = tokens.completion_tokens, tokens.token_ids
                yield from map(_event, items)
                if tokens.finish_reason:
                    reply.finish_reason = tokens.finish_reason
                    break
        finally:
            handle.cancel()                  # no-op once finished; frees the slot otherwise
        yield from map(_event, tokens.finish())
        reply.finish_reason = tokens.finish_reason or reply.finish_reason
        reply.messages = parser.messages()
        for m in reply.messages if tokens.stopped_by_string else ():   # the history keeps what was shown
            if not m.get("metadata"):
                cut = min((i for i in (m["content"].find(s) for s in tokens.stops.stops) if i >= 0), default=-1)
                m["content"] = m["content"][:cut] if cut >= 0 else m["content"]

    def _events(self, handle):
        """The handle's events; with `cancel`, checked every 0.1 s while waiting."""
        if self.cancel is None:
            yield from handle
            return
        while True:
            if self.cancel.is_set():
                raise Cancelled()
            try:
                ev = handle.get(timeout=0.1)
            except queue.Empty:
                continue
            yield ev
            if ev.finish:
                return


def _event(item) -> ReplyEvent:
    return ReplyEvent("text", item) if isinstance(item, str) else item
