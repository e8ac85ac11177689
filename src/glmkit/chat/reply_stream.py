"""The one reply driver: an assistant reply generated through a Backend, as ReplyEvents.

Used by ChatModel.reply (the Python API, the terminal) and by the server's ScheduledModel (agent
runs in the API and the console), so stop strings, limits, sampling and usage behave the same
everywhere."""

from __future__ import annotations

import queue
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field

from ..engine.requests import SamplingParams, budget
from ..engine.text import StopStrings
from .backend import Backend
from .formats import ReplyEvent


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

    Each token event goes through the chat format's reply parser (the stop id itself is never
    text).  Stop strings cut answer text, not a tool call being written, whose arguments may hold
    anything; a completed one ends generation and the history keeps only the text shown.
    `max_length` bounds prompt + reply (with the backend's context); `max_new_tokens` the reply.
    Leaving the iteration early, or setting `cancel` (then Cancelled is raised), frees the
    backend's slot."""

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
        parser, stops = fmt.reply_parser(), StopStrings(self.stop)
        in_call = False

        def shown(events):
            nonlocal in_call
            for e in events:
                if e.kind == "segment":
                    held = stops.flush()     # text held for a possible stop string ends with its segment
                    if held:
                        yield ReplyEvent("text", held)
                    in_call = bool(e.metadata)
                elif e.kind == "text" and not in_call:
                    e = ReplyEvent("text", stops.feed(e.text))
                    if not e.text:
                        continue
                yield e
        try:
            for ev in self._events(handle):
                reply.completion_tokens += 1
                reply.token_ids.append(ev.token)
                if ev.finish != "stop":
                    yield from shown(parser.feed(ev.token))
                if stops.hit or ev.finish:
                    reply.finish_reason = "stop" if stops.hit else ev.finish
                    break
        finally:
            handle.cancel()                  # no-op once finished; frees the slot otherwise
        yield from shown(parser.finish())
        tail = stops.flush()
        if tail:
            yield ReplyEvent("text", tail)
        reply.messages = parser.messages()
        for m in reply.messages if stops.hit else ():   # the history keeps what was shown
            if not m.get("metadata"):
                cut = min((i for i in (m["content"].find(s) for s in stops.stops) if i >= 0), default=-1)
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
