"""ChatModel's `reply()` contract, generated through the server's scheduler.

The chat layer's Agent drives a model through `reply()`.  In the server it runs in a worker
thread with this adapter, so agent turns share continuous batching with API requests instead of
calling the model directly (which would race the scheduler's thread for it)."""

from __future__ import annotations

import queue
import threading

from ..chat.formats import ReplyEvent
from ..chat_model import Reply
from ..engine import StopStrings
from ..engine.scheduler import SeqRequest


class Cancelled(Exception):
    """The client went away or pressed Stop; the agent must not act on a half-written reply."""


class ScheduledModel:
    def __init__(self, chat_model, scheduler, cancel: threading.Event, max_new_tokens: int, seed: int | None = None,
                 stop: list[str] | None = None):
        self.chat_model = chat_model
        self.format = chat_model.format
        self.scheduler = scheduler
        self.cancel = cancel
        self.max_new_tokens = max_new_tokens
        self.seed = seed
        self.stop = stop or []    # a request's stop strings: each generation ends at one, as in the API
        # totals over every generation of a run (API usage), and how the last one ended
        self.prompt_tokens = self.completion_tokens = 0
        self.finish_reason: str | None = None

    def reply(self, messages: list[dict], reply: Reply | None = None, forced: list[int] | None = None,
              max_new_tokens: int | None = None, **sampling):
        reply = reply if reply is not None else Reply()
        prompt = self.chat_model.encode_chat(messages)
        reply.prompt_tokens = len(prompt)
        params = self.chat_model.params(**sampling)
        params.seed = self.seed
        handle = self.scheduler.submit(SeqRequest(prompt, params, max_new_tokens or self.max_new_tokens,
                                                  self.format.stop_ids, forced=forced))
        self.prompt_tokens += len(prompt)
        parser = self.format.reply_parser()
        stops, in_call = StopStrings(self.stop), False

        def shown(events):    # stop strings apply to answer text, not to a call being written
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
            while True:
                if self.cancel.is_set():
                    raise Cancelled()
                try:
                    ev = handle.get(timeout=0.1)
                except queue.Empty:
                    continue
                reply.completion_tokens += 1
                self.completion_tokens += 1
                reply.token_ids.append(ev.token)
                if ev.finish != "stop":          # the stop token itself is never text
                    yield from shown(parser.feed(ev.token))
                if stops.hit or ev.finish:
                    reply.finish_reason = self.finish_reason = "stop" if stops.hit else ev.finish
                    break
        finally:
            handle.cancel()                      # no-op once finished; frees the slot otherwise
        yield from shown(parser.finish())
        tail = stops.flush()
        if tail:
            yield ReplyEvent("text", tail)
        reply.messages = parser.messages()
        for m in reply.messages if stops.hit else ():   # the history keeps what the client saw
            if not m.get("metadata"):
                cut = min((i for i in (m["content"].find(s) for s in stops.stops) if i >= 0), default=-1)
                m["content"] = m["content"][:cut] if cut >= 0 else m["content"]
