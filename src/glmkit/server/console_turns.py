"""One answer in a console conversation: the chat layer's Agent, run in a worker thread.

All four console modes are the same loop with different tools: Chat (none), Tool (the server's
tools), Code interpreter (the conversation's sandboxed kernel), Knowledge (none; the user's
message is answered from passages of a knowledge base, put into the prompt as the API's
glmkit_knowledge puts them, and the reply is stored with the passages it cites).  Events go to the browser as they
happen; messages go to the store as each completes, so a crash or a Stop loses at most the text
in flight (and Stop keeps even that, marked as stopped)."""

from __future__ import annotations

import asyncio
import logging
import threading
import time

from ..chat.agent import Agent, CodeStep, Finished, Observation, RefusedStep, TextDelta, ToolCallStep
from ..chat.knowledge_context import citations, with_knowledge
from ..chat.reply_stream import Cancelled
from ..errors import GlmkitError
from .scheduled_model import ScheduledModel
from .tool_steps import step_view

log = logging.getLogger("glmkit.console")


class Turn:
    def __init__(self, store, who: str, cid: str, agent_args: dict, history: list[dict], model_args: dict,
                 knowledge=None):
        """`agent_args` for the chat layer's Agent, `model_args` for its ScheduledModel (the
        conversation's SamplingParams and token limit); `history`: the stored messages;
        `knowledge`: server.knowledge.Retrieved, the passages the last user message is answered
        from (in the prompt only: the store keeps the message as typed, and the citations)."""
        self.store, self.who, self.cid = store, who, cid
        self.cancel = threading.Event()
        self.done = False
        self.finished = threading.Event()    # everything stored, conversation free again
        self.agent = Agent(ScheduledModel(cancel=self.cancel, **model_args), **agent_args)
        self.agent.messages += history
        self.knowledge = knowledge
        if knowledge is not None:
            self.agent.messages = with_knowledge(self.agent.messages, self.agent.protocol, knowledge.passages)
        self.events: asyncio.Queue = asyncio.Queue()
        self._loop = asyncio.get_running_loop()
        self._saved = len(self.agent.messages)
        self._text = ""                      # shown but not yet stored
        self._generation_text = ""           # shown by the generation in progress (or the last one)
        self._generation_over = False        # its calls have begun running
        self._started = time.monotonic()
        self.stats: dict = {}                 # usage and speed, sent with "done" and stored with the reply

    def _stats(self) -> dict:
        """Tokens over every generation of the turn, its speed (completion tokens per second of
        the whole turn, prompt processing included), and how its last generation ended."""
        model = self.agent.model
        seconds = max(time.monotonic() - self._started, 1e-6)
        self.stats = {"usage": {"prompt_tokens": model.prompt_tokens, "completion_tokens": model.completion_tokens},
                      "tokens_per_second": round(model.completion_tokens / seconds, 1),
                      "finish_reason": model.finish_reason}
        return self.stats

    def start(self, on_finish=None):
        """Run in a worker thread; `on_finish()` is called from it once everything is stored."""
        def run():
            try:
                self._run()
            finally:
                if on_finish:
                    on_finish()
                self.finished.set()
        threading.Thread(target=run, name=f"glmkit-turn-{self.cid[:8]}", daemon=True).start()

    def stop(self):
        """The browser pressed Stop or went away: no further generation, and a running cell is
        interrupted (its kernel restarts) rather than left to run out its time limit."""
        if self.done:           # a stream that ends after its turn must not touch a later one
            return
        self.cancel.set()
        if self.agent.interpreter is not None:
            self.agent.interpreter.interrupt()

    def _emit(self, ev: dict):
        self._loop.call_soon_threadsafe(self.events.put_nowait, ev)

    def _sync(self, observation_extras: dict | None = None, reply_extras: dict | None = None):
        """Store the agent's new messages (each one is complete when it reaches agent.messages);
        an observation among them is stored with what the browser was shown of its run, and the
        last one, if an assistant's reply, with `reply_extras` (the turn's usage)."""
        new = self.agent.messages[self._saved:]
        for i, m in enumerate(new):
            extras = (observation_extras or {}) if m["role"] == "observation" else {}
            if reply_extras and i == len(new) - 1 and m["role"] == "assistant":
                extras = {**reply_extras, **self._cited(m["content"])}
            self.store.append(self.who, self.cid, m["role"], m["content"], m.get("metadata", ""), extras)
        self._saved = len(self.agent.messages)

    def _cited(self, reply: str) -> dict:
        """A Knowledge reply's extras: the passages it cites as [n] (n, document, position, text, ...)
        and where they came from; {} in the other modes."""
        k = self.knowledge
        if k is None:
            return {}
        return {"citations": citations(reply, k.passages),
                "knowledge": {"kb": k.kb, "mode": k.mode, "passages": len(k.passages), **({"note": k.note} if k.note else {})}}

    def _run(self):
        if self.knowledge is not None:
            k = self.knowledge
            self._emit({"type": "knowledge", "kb": k.kb, "passages": len(k.passages), "note": k.note})
        try:
            for ev in self.agent.run(None):
                if isinstance(ev, TextDelta):
                    if self._generation_over:
                        self._generation_text, self._generation_over = "", False
                    self._text += ev.text
                    self._generation_text += ev.text
                    self._emit({"type": "text", "text": ev.text})
                    continue
                if isinstance(ev, Observation):    # its message is the one new since the call's step
                    extras = {"name": ev.call.name, **step_view(ev.call, ev.result)}
                    self._sync(extras)
                    self._emit({"type": "tool_result", **extras})
                    continue
                self._sync(reply_extras=self._stats() if isinstance(ev, Finished) else None)
                self._text = ""                     # that text is part of the messages just stored
                self._generation_over = True
                self._step(ev)
            self._sync()
        except Cancelled:
            self._sync_partial()
        except GlmkitError as e:          # a prompt too long for the context, a full queue, ...
            self._emit({"type": "error", "text": str(e)})
            self._sync_partial()
        except Exception as e:  # noqa: BLE001 - reported to the browser; the server stays up
            log.exception("console turn failed")
            self._emit({"type": "error", "text": f"internal error: {type(e).__name__}: {e}"})
            self._sync_partial()
        finally:
            self.done = True
            self._emit({"type": "done", **self.stats})   # always: the browser's stream must end

    def _step(self, ev):
        """A call about to run, or the end of the run, as the browser is told of it."""
        if isinstance(ev, CodeStep):        # `shown`: the model wrote it as visible text
            self._emit({"type": "code", "code": ev.call.code, "shown": ev.call.code in self._generation_text})
        elif isinstance(ev, ToolCallStep):
            self._emit({"type": "tool_call", "name": ev.call.name, "arguments": ev.call.arguments})
        elif isinstance(ev, RefusedStep):
            self._emit({"type": "error", "text": ev.call.reason})
        elif isinstance(ev, Finished) and ev.reason == "max_steps":
            self._emit({"type": "error", "text": f"stopped after {self.agent.max_steps} rounds of tool calls "
                                                 f"(max_steps)"})
        elif isinstance(ev, Finished) and ev.reason == "tool_calls":
            for call in ev.handed_over:     # a tool the server has only a schema for: shown, not run
                self._emit({"type": "tool_call", "name": call.name, "arguments": call.arguments})
                self._emit({"type": "error", "text": f"{call.name} has no implementation on this server; "
                                                     "it was not run"})

    def _sync_partial(self):
        """Stopped or failed mid-reply: keep the complete messages and, marked, the text shown."""
        try:
            self._sync()
            if self._text:
                self.store.append(self.who, self.cid, "assistant", self._text, extras={"stopped": True, **self._stats(),
                                                                                   **self._cited(self._text)})
                self._text = ""
        except Exception:  # noqa: BLE001 - e.g. the conversation was deleted meanwhile
            log.exception("could not store the rest of a console turn")
