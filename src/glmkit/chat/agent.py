"""The agent loop: generate -> tool call -> run the tool -> observation -> generate again.

Every step is reported as an AgentEvent so the terminal, the API and the console can show which
tool was called with which arguments and what came back.  A refused or failing call is an error
observation the model can react to; the loop stops after `max_steps` tool calls."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass, field

from .glm3 import TOOLS_PREAMBLE

# ChatGLM3's own code-interpreter system prompt (what the model was trained with)
INTERPRETER_SYSTEM = ("你是一位智能AI助手，你叫ChatGLM，你连接着一台电脑，但请注意不能联网。在使用Python解决任务时，"
                      "你可以运行代码并得到结果，如果运行结果有错误，你需要尽可能对代码进行改进。"
                      "你可以处理用户上传到电脑上的文件，文件默认存储路径是/mnt/data/。")
from .tool_calls import ToolCallError, parse_tool_call
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
        """`observer(name, arguments) -> ToolResult`, if given, replaces running the tool (manual mode:
        a person types the observation).  `interpreter` (chat.interpreter.Interpreter) runs the
        model's `interpreter` segments in the sandbox."""
        self.model = model
        self.observer = observer
        self.interpreter = interpreter
        self.tools: dict[str, Tool] = {t.name: t for t in map(as_tool, tools)}
        self.max_steps = max_steps
        self.system = system
        self.messages: list[dict] = []
        if interpreter is not None and not self.tools:
            self.messages.append({"role": "system", "content": system or INTERPRETER_SYSTEM})
        elif self.tools:
            self.messages.append({"role": "system", "content": system or TOOLS_PREAMBLE,
                                  "tools": [t.spec() for t in self.tools.values()]})
        elif system:
            self.messages.append({"role": "system", "content": system})

    def run(self, user_text: str, script: list[list[int]] | None = None, **gen) -> Iterator[AgentEvent]:
        """Answer one user message, calling tools as the model asks.

        `script` (testing aid): per generation step, token ids decoding is constrained to."""
        from ..chat_model import Reply
        self.messages.append({"role": "user", "content": user_text})
        steps = 0
        while True:
            reply = Reply()
            forced = script[steps] if script and steps < len(script) else None
            in_call = False
            for ev in self.model.reply(self.messages, reply=reply, forced=forced, **gen):
                if ev.kind == "segment":
                    in_call = bool(ev.metadata)
                elif ev.kind == "text" and not in_call:
                    yield AgentEvent("text", ev.text)       # plain answer text, streamed
            segments = reply.messages
            runnable = set(self.tools) | ({"interpreter"} if self.interpreter is not None else set())
            call = next((seg for seg in segments if seg.get("metadata", "").strip() in runnable), None)
            self.messages += segments
            if call is None:
                yield AgentEvent("done")
                return
            name = call["metadata"].strip()
            if name == "interpreter":
                from .interpreter import extract_code
                code = extract_code(call["content"])
                yield AgentEvent("code", text=code, name=name)
                cell = self.interpreter.run(code)
                result = ToolResult(not cell.error, cell.observation(), value=cell, extras={"images": cell.images})
            else:
                try:
                    args = parse_tool_call(call["content"])
                    yield AgentEvent("tool_call", name=name, arguments=args)
                    result = self.observer(name, args) if self.observer else run_tool(self.tools[name], args)
                except ToolCallError as e:
                    result = ToolResult(False, json.dumps({"error": f"tool call refused: {e}"}, ensure_ascii=False),
                                        error=str(e))
                    yield AgentEvent("error", text=str(e), name=name)
            yield AgentEvent("tool_result", name=name, result=result)
            self.messages.append({"role": "observation", "content": result.observation})
            steps += 1
            if steps >= self.max_steps:
                yield AgentEvent("error", text=f"stopped after {self.max_steps} tool calls (max_steps)")
                yield AgentEvent("done")
                return
