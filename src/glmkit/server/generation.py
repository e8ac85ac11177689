"""One choice of a completion: scheduler token events -> OpenAI-shaped deltas.

Wires the chat layer (a protocol's call parser around the format's reply parser, stop strings)
to the engine's token stream; knows nothing of HTTP."""

from __future__ import annotations

import asyncio
import base64
import queue
from dataclasses import dataclass, field

from ..chat.openai_compat import openai_tool_call
from ..chat.tool_calls import Call, CodeCall, RefusedCall
from ..engine import StopStrings
from ..engine.requests import TokenEvent
from ..engine.scheduler import Handle


async def events(handle: Handle):
    """Async iteration over a sequence's TokenEvents without blocking the event loop."""
    loop = asyncio.get_running_loop()
    ready = asyncio.Event()
    handle.on_event(lambda: loop.call_soon_threadsafe(ready.set))
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


@dataclass
class Delta:
    content: str = ""
    tool_calls: list[dict] = field(default_factory=list)
    logprobs: list[dict] = field(default_factory=list)


class ChoiceStream:
    """Turns the token events of one choice into deltas; `result` holds the totals.

    `parser` is a protocol's call parser (chat.protocols): it gives text, ToolCalls (each becomes
    a `tool_calls` entry, several in one reply included) and RefusedCalls (shown as what the model
    wrote, with the reason).  A named tool_choice forces the start of the call (the backend's
    forced_prefix): those tokens arrive as events like any other."""

    def __init__(self, tokenizer, parser, stop: list[str] | None, want_logprobs: bool):
        self.tok = tokenizer
        self.parser = parser
        self.stops = StopStrings(stop)
        self.want_logprobs = want_logprobs
        self.content = ""
        self.tool_calls: list[dict] = []
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.all_logprobs: list[dict] = []

    def feed(self, ev: TokenEvent) -> Delta:
        d = Delta()
        self.completion_tokens += 1
        if self.want_logprobs and ev.logprob is not None:
            d.logprobs.append(self._logprob_entry(ev))
            self.all_logprobs.append(d.logprobs[-1])
        if ev.finish != "stop":          # the stop token itself is never text
            for item in self.parser.feed(ev.token):
                self._item(item, d)
        if ev.finish:
            self.finish(ev.finish, d)
        return d

    def finish(self, reason: str, d: Delta | None = None) -> Delta:
        d = d or Delta()
        for item in self.parser.finish():
            self._item(item, d)
        tail = self.stops.flush()
        if tail:
            self._say(tail, d)
        self.finish_reason = "tool_calls" if self.tool_calls else ("stop" if self.stops.hit else reason)
        return d

    @property
    def stopped_by_string(self) -> bool:
        return self.stops.hit

    def _item(self, item, d: Delta):
        if isinstance(item, str):
            self._say(item, d)
        elif isinstance(item, RefusedCall):    # not a tool call: the client sees what the model wrote and why
            self._say(f"{item.written}\n(tool call refused: {item.reason})", d)
        else:
            call = openai_tool_call(item, index=len(self.tool_calls))
            self.tool_calls.append(call)
            d.tool_calls.append(call)

    def _say(self, text: str, d: Delta):
        shown = self.stops.feed(text)
        self.content += shown
        d.content += shown

    def _logprob_entry(self, ev: TokenEvent) -> dict:
        def entry(tok, lp):
            b = self.tok.token_bytes(tok)
            return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}
        out = entry(ev.token, ev.logprob)
        out["top_logprobs"] = [entry(t, lp) for t, lp in (ev.top_logprobs or [])]
        return out


def step_view(call: Call, result) -> dict:
    """What a client is shown of one tool or code run (chat.tools.ToolResult): code runs give the
    cell's own output and its plots as base64 PNG, tool runs (and refused calls) their observation."""
    cell = result.value if isinstance(call, CodeCall) else None
    return {"ok": result.ok, "output": cell.text if cell else result.observation,
            "images": [base64.b64encode(i).decode() for i in cell.images] if cell else []}
