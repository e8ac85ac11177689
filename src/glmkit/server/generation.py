"""One choice of a completion: scheduler token events -> OpenAI-shaped deltas.

Wires the chat layer (reply parser, tool-call parser, stop strings) to the engine's token
stream; knows nothing of HTTP."""

from __future__ import annotations

import asyncio
import base64
import json
import queue
import secrets
from dataclasses import dataclass, field

from ..chat.tool_calls import ToolCallError, parse_tool_call, validate_arguments
from ..engine import StopStrings
from ..engine.scheduler import Handle, TokenEvent


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
    """Turns the token events of one choice into deltas; `result` holds the totals."""

    def __init__(self, tokenizer, parser, stop: list[str] | None, tools: dict[str, dict] | None,
                 want_logprobs: bool):
        self.tok = tokenizer
        self.parser = parser
        self.stops = StopStrings(stop)
        self.tools = tools or {}
        self.want_logprobs = want_logprobs
        self.content = ""
        self.tool_calls: list[dict] = []
        self.finish_reason: str | None = None
        self.completion_tokens = 0
        self.all_logprobs: list[dict] = []
        self._segment_tool: str | None = None   # name of the tool whose call is being written
        self._segment_text = ""

    def feed(self, ev: TokenEvent) -> Delta:
        d = Delta()
        self.completion_tokens += 1
        if self.want_logprobs and ev.logprob is not None:
            d.logprobs.append(self._logprob_entry(ev))
            self.all_logprobs.append(d.logprobs[-1])
        if ev.finish != "stop":          # the stop token itself is never text
            for e in self.parser.feed(ev.token):
                self._event(e, d)
        if ev.finish:
            self.finish(ev.finish, d)
        return d

    def finish(self, reason: str, d: Delta | None = None) -> Delta:
        d = d or Delta()
        for e in self.parser.finish():
            self._event(e, d)
        self._close_segment(d)
        tail = self.stops.flush()
        if tail:
            self._say(tail, d)
        self.finish_reason = "tool_calls" if self.tool_calls else ("stop" if self.stops.hit else reason)
        return d

    @property
    def stopped_by_string(self) -> bool:
        return self.stops.hit

    def _event(self, e, d: Delta):
        if e.kind == "segment":
            self._close_segment(d)
            self._segment_tool = e.metadata if e.metadata in self.tools else None
            if e.metadata and self._segment_tool is None:
                self._say(f"\n[{e.metadata}]\n" if self.content else f"[{e.metadata}]\n", d)
        elif e.kind == "text":
            if self._segment_tool is not None:
                self._segment_text += e.text
            else:
                self._say(e.text, d)

    def _say(self, text: str, d: Delta):
        shown = self.stops.feed(text)
        self.content += shown
        d.content += shown

    def _close_segment(self, d: Delta):
        name, text = self._segment_tool, self._segment_text
        self._segment_tool, self._segment_text = None, ""
        if name is None:
            return
        try:
            args = parse_tool_call(text)
            validate_arguments(args, self.tools[name].get("parameters"))
        except ToolCallError as err:
            # not executed, not a tool call: the client sees what the model wrote and why
            self._say(f"[{name}] {text.strip()}\n(tool call refused: {err})", d)
            return
        call = {"index": len(self.tool_calls), "id": "call_" + secrets.token_hex(12), "type": "function",
                "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)}}
        self.tool_calls.append(call)
        d.tool_calls.append(call)

    def _logprob_entry(self, ev: TokenEvent) -> dict:
        def entry(tok, lp):
            b = self.tok.token_bytes(tok)
            return {"token": b.decode("utf-8", errors="replace"), "logprob": lp, "bytes": list(b)}
        out = entry(ev.token, ev.logprob)
        out["top_logprobs"] = [entry(t, lp) for t, lp in (ev.top_logprobs or [])]
        return out


def step_view(name: str, result) -> dict:
    """What a client is shown of one tool or code run (chat.tools.ToolResult): code runs give the
    cell's own output and its plots as base64 PNG, tool runs their observation."""
    cell = result.value if name == "interpreter" else None      # None too if the code was refused
    return {"ok": result.ok, "output": cell.text if cell else result.observation,
            "images": [base64.b64encode(i).decode() for i in cell.images] if cell else []}
