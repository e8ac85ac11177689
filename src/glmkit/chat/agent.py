"""The agent loop: generate -> tool call -> run the tool -> observation -> generate again.

Every step is reported as an AgentEvent so the terminal, the API and the console can show which
tool was called with which arguments and what came back.  How a call is written depends on the
model (chat.protocols); the loop does not.  A refused or failing call is an error observation the
model can react to.  After `max_steps` calls the model answers once more with what it has; a
further call is not run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

from .protocols import INTERPRETER, protocol_for
from .tool_calls import ToolCallError, validate_arguments
from .tools import Tool, ToolResult, as_tool, run_tool


@dataclass
class AgentEvent:
    kind: str                  # "text", "tool_call", "code", "tool_result", "error", "done"
    text: str = ""
    name: str = ""
    arguments: dict = field(default_factory=dict)
    result: ToolResult | None = None


class Agent:
    def __init__(self, model, tools=(), max_steps: int = 5, system: str | None = None, observer=None,
                 interpreter=None):
        """`model` is anything with ChatModel's `reply()` and `format` (the server passes one that
        generates through its scheduler).  `observer(name, arguments) -> ToolResult`, if given,
        replaces running the tool (manual mode: a person types the observation).  Without one, a
        call to a tool that has no function ends the run with the call in `pending`.  `interpreter`
        (chat.interpreter.Interpreter) runs the model's code in the sandbox."""
        self.model = model
        self.observer = observer
        self.interpreter = interpreter
        self.tools: dict[str, Tool] = {t.name: t for t in map(as_tool, tools)}
        self.max_steps = max_steps
        self.protocol = protocol_for(model.format)
        system_message = self.protocol.system_message([t.spec() for t in self.tools.values()],
                                                      interpreter is not None, system)
        self.messages: list[dict] = [system_message] if system_message else []
        self.pending = None    # a call to a tool without an implementation, left for the caller

    def run(self, user_text: str | None, script: list[list[int]] | None = None, **gen) -> Iterator[AgentEvent]:
        """Answer one user message (None: answer the history as it stands), calling tools as the
        model asks.  `script` (testing aid): per generation step, token ids decoding is constrained to."""
        from ..chat_model import Reply
        if user_text is not None:
            self.messages.append({"role": "user", "content": user_text})
        self.pending = None
        runnable = set(self.tools) | ({INTERPRETER} if self.interpreter is not None else set())
        steps = 0
        while True:
            reply = Reply()
            forced = script[steps] if script and steps < len(script) else None
            in_call = False
            hide_calls = self.protocol.reply_filter(set(self.tools))
            events = self.model.reply(self.messages, reply=reply, forced=forced, **gen)
            if hide_calls is not None:
                events = _filtered(events, hide_calls)
            for ev in events:
                if ev.kind == "segment":
                    in_call = bool(ev.metadata)
                elif ev.kind == "text" and not in_call:
                    yield AgentEvent("text", ev.text)       # answer text, streamed
            segments = reply.messages
            call = self.protocol.find_call(segments, runnable)
            self.messages += segments
            if call is None:
                yield AgentEvent("done")
                return
            if steps >= self.max_steps:       # the model had its answer turn after the last call
                yield AgentEvent("error", text=f"stopped after {self.max_steps} tool calls (max_steps)")
                yield AgentEvent("done")
                return
            if not call.error and call.name != INTERPRETER and self.tools[call.name].function is None \
                    and self.observer is None:
                # a tool the caller runs (an API client's own function): hand the call over
                try:
                    validate_arguments(call.arguments, self.tools[call.name].parameters)
                except ToolCallError as e:
                    call.error = str(e)
                else:
                    self.pending = call
                    yield AgentEvent("tool_call", name=call.name, arguments=call.arguments)
                    yield AgentEvent("done")
                    return
            if call.error:
                result = ToolResult(False, json.dumps({"error": f"tool call refused: {call.error}"},
                                                      ensure_ascii=False), error=call.error)
                yield AgentEvent("error", text=call.error, name=call.name)
            elif call.name == INTERPRETER:
                yield AgentEvent("code", text=call.code, name=call.name)
                cell = self.interpreter.run(call.code)
                result = ToolResult(not cell.error, cell.observation(), value=cell)
            else:
                yield AgentEvent("tool_call", name=call.name, arguments=call.arguments)
                result = self.observer(call.name, call.arguments) if self.observer else \
                    run_tool(self.tools[call.name], call.arguments)
            yield AgentEvent("tool_result", name=call.name, result=result)
            self.messages.append({"role": self.protocol.observation_role, "content": result.observation})
            steps += 1


def _filtered(events, f):
    for ev in events:
        yield from f.filter([ev])
    yield from f.filter([], final=True)
