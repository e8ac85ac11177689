"""What a client is shown of a tool or code run that the server made: the console's tool_result
events (stored with the observation), and the API's glmkit_steps."""

from __future__ import annotations

import base64

from ..chat.agent import Observation
from ..chat.tool_calls import INTERPRETER, Call, CodeCall, ToolCall
from .openai_responses import CodeStep, ToolStep


def step_view(call: Call, result) -> dict:
    """One run (chat.tools.ToolResult): code runs give the cell's own output and its plots as
    base64 PNG, tool runs (and refused calls) their observation."""
    cell = result.value if isinstance(call, CodeCall) else None
    return {"ok": result.ok, "output": cell.text if cell else result.observation,
            "images": [base64.b64encode(i).decode() for i in cell.images] if cell else []}


def glmkit_step(ev: Observation) -> ToolStep | CodeStep:
    """An entry of glmkit_steps: a tool or code run, or a refused call (its code or arguments
    null), and what it gave back."""
    call = ev.call
    if call.name == INTERPRETER:
        return CodeStep(code=call.code if isinstance(call, CodeCall) else None, **step_view(call, ev.result))
    return ToolStep(name=call.name, arguments=call.arguments if isinstance(call, ToolCall) else None,
                    ok=ev.result.ok, observation=ev.result.observation)
