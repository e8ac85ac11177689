"""The agent loop: generate -> tool calls -> run each -> observations -> generate again.

Every step is reported as an event (a small union of dataclasses, below) so the terminal, the API
and the console can show which tool was called with which arguments and what came back.  How a
call is written depends on the model (chat.protocols); the loop does not.  Every call of a reply
is run, in the order written, each followed by its observation.  A refused or failing call is an
error observation the model can react to.  After `max_steps` rounds of calls the model answers
once more with what it has; a further call is not run."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Literal

from .protocols import protocol_for
from .tool_calls import INTERPRETER, Call, CodeCall, RefusedCall, ToolCall, ToolCallError, validate_arguments
from .tool_definitions import Tool, as_tool
from .tools import ToolResult, run_tool


@dataclass(frozen=True)
class TextDelta:
    """Answer text, as it streams."""
    text: str


@dataclass(frozen=True)
class ToolCallStep:
    """A tool is about to run with these arguments."""
    call: ToolCall


@dataclass(frozen=True)
class CodeStep:
    """The interpreter is about to run this code."""
    call: CodeCall


@dataclass(frozen=True)
class RefusedStep:
    """A call that will not run; its reason is the observation the model gets."""
    call: RefusedCall


@dataclass(frozen=True)
class Observation:
    """What a call gave back (to the model: `result.observation`)."""
    call: Call
    result: ToolResult


@dataclass(frozen=True)
class Finished:
    """The run is over: the model answered; or it asked for calls after `max_steps` rounds (not
    run); or it called tools that the caller runs itself (`handed_over`, never run here)."""
    reason: Literal["answered", "max_steps", "tool_calls"]
    handed_over: tuple[ToolCall, ...] = ()


AgentEvent = TextDelta | ToolCallStep | CodeStep | RefusedStep | Observation | Finished


class Agent:
    def __init__(self, model, tools=(), max_steps: int = 5, system: str | None = None, observer=None,
                 interpreter=None):
        """`model` is anything with ChatModel's `reply()` and `format` (the server passes one that
        generates through its scheduler).  `observer(name, arguments) -> ToolResult`, if given,
        replaces running the tool (manual mode: a person types the observation).  Without one, a
        call to a tool that has no function ends the run, handed over in its Finished event.
        `interpreter` (glmkit.sandbox's Interpreter) runs the model's code in the sandbox."""
        self.model = model
        self.observer = observer
        self.interpreter = interpreter
        self.tools: dict[str, Tool] = {t.name: t for t in map(as_tool, tools)}
        self.max_steps = max_steps
        self.protocol = protocol_for(model.format)
        system_message = self.protocol.system_message([t.spec() for t in self.tools.values()],
                                                      interpreter is not None, system)
        self.messages: list[dict] = [system_message] if system_message else []

    def run(self, user_text: str | None, knowledge: list[dict] | None = None, **gen) -> Iterator[AgentEvent]:
        """Answer one user message (None: answer the history as it stands), calling tools as the
        model asks.  `knowledge`: passages (chat.knowledge_context.passages) the message is
        answered from, put into the prompt as the model's protocol carries context."""
        from .reply_stream import Reply
        if user_text is not None and knowledge is not None:
            from .knowledge_context import knowledge_turn
            self.messages += knowledge_turn(self.protocol, user_text, knowledge)
        elif user_text is not None:
            self.messages.append({"role": "user", "content": user_text})
        runnable = set(self.tools) | ({INTERPRETER} if self.interpreter is not None else set())
        rounds = 0
        while True:
            reply = Reply()
            events = self.model.reply(self.messages, reply=reply, **gen)
            for text in self.protocol.visible_text(events, runnable):
                yield TextDelta(text)
            calls = self.protocol.find_calls(reply.messages, runnable)
            self.messages += reply.messages
            if not calls:
                yield Finished("answered")
                return
            if rounds >= self.max_steps:       # the model had its answer turn after the last round
                yield Finished("max_steps")
                return
            handed_over = []
            for call in map(self._checked, calls):
                if self._handed_over(call):
                    handed_over.append(call)
                    continue
                yield self._step(call)
                result = self._result(call)
                self.messages.append({"role": self.protocol.observation_role, "content": result.observation})
                yield Observation(call, result)
            if handed_over:
                yield Finished("tool_calls", tuple(handed_over))
                return
            rounds += 1

    def _handed_over(self, call: Call) -> bool:
        """A call of a tool the caller runs (an API client's own function)."""
        return isinstance(call, ToolCall) and self.tools[call.name].function is None and self.observer is None

    def _checked(self, call: Call) -> Call:
        """A handed-over call meets its schema here: no run_tool will check it."""
        if self._handed_over(call):
            try:
                validate_arguments(call.arguments, self.tools[call.name].parameters)
            except ToolCallError as e:
                return RefusedCall(call.id, call.name, str(e))
        return call

    @staticmethod
    def _step(call: Call) -> ToolCallStep | CodeStep | RefusedStep:
        if isinstance(call, ToolCall):
            return ToolCallStep(call)
        return CodeStep(call) if isinstance(call, CodeCall) else RefusedStep(call)

    def _result(self, call: Call) -> ToolResult:
        if isinstance(call, RefusedCall):
            return ToolResult(False, json.dumps({"error": f"tool call refused: {call.reason}"}, ensure_ascii=False),
                              error=call.reason)
        if isinstance(call, CodeCall):
            cell = self.interpreter.run(call.code)
            return ToolResult(not cell.error, cell.observation(), value=cell)
        if self.observer is not None:
            return self.observer(call.name, call.arguments)
        return run_tool(self.tools[call.name], call.arguments)
