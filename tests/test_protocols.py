"""Tool calls and code for models without ChatGLM3's protocol (the default model): the tagged
convention in chat.protocols, driven through the real Agent with decoding scripted."""

import json

import pytest
from conftest import scripted

from glmkit.chat.agent import Agent, CodeStep, Finished, Observation, TextDelta, ToolCallStep
from glmkit.chat.builtin_tools import calculator
from glmkit.sandbox import Interpreter, Limits
from glmkit.chat.protocols import MAX_CALLS_PER_REPLY, TaggedProtocol
from glmkit.chat.scripted import scripted_reply_ids
from glmkit.chat.tool_calls import CodeCall, RefusedCall, ToolCall

CALC = [calculator]


def call_text(name, args) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


@pytest.mark.parametrize("text, expect", [
    (call_text("calculator", {"expression": "2+3"}), ToolCall("-", "calculator", {"expression": "2+3"})),
    ('<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"1\\"}"}</tool_call>',
     ToolCall("-", "calculator", {"expression": "1"})),
    ("<tool_call>{'name': 'calculator'}</tool_call>", RefusedCall("-", "?", "not valid JSON")),
    ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', RefusedCall("-", "rm_rf", "no tool named")),
    ('<tool_call>{"name": "calculator", "arguments": [1]}</tool_call>', RefusedCall("-", "calculator", "JSON object")),
    ('<tool_call>["calculator"]</tool_call>', RefusedCall("-", "?", "JSON object")),
    ("<tool_call>" + "[" * 100_000 + "</tool_call>", RefusedCall("-", "?", "longer than")),
    ("<tool_call>" + "[" * 5000 + "]" * 5000 + "</tool_call>", RefusedCall("-", "?", "nested too deeply")),
    ('<tool_call>{"name": "interpreter", "arguments": {}}</tool_call>', RefusedCall("-", "interpreter", "no tool named")),
    ("Just an answer.", None),
])
def test_tagged_calls_are_parsed_as_data(text, expect):
    """Straight from the JSON to a ToolCall (or a RefusedCall with its reason); every call has its own id."""
    calls = TaggedProtocol().find_calls([{"role": "assistant", "content": text}], {"calculator", "interpreter"})
    if expect is None:
        assert calls == []
        return
    [call] = calls
    assert type(call) is type(expect) and call.name == expect.name and call.id.startswith("call_")
    if isinstance(expect, ToolCall):
        assert call.arguments == expect.arguments
    else:
        assert expect.reason in call.reason


def test_every_call_of_a_reply_is_returned_in_order():
    text = ("First " + call_text("calculator", {"expression": "1+1"}) + " then code\n```python\nprint(2)\n```\n"
            + call_text("calculator", {"expression": "3"}) + call_text("nope", {}))
    calls = TaggedProtocol().find_calls([{"role": "assistant", "content": text}], {"calculator", "interpreter"})
    assert [type(c) for c in calls] == [ToolCall, CodeCall, ToolCall, RefusedCall]
    assert [c.arguments for c in calls[::2]] == [{"expression": "1+1"}, {"expression": "3"}]
    assert calls[1].code == "print(2)" and "no tool named 'nope'" in calls[3].reason
    assert len({c.id for c in calls}) == 4
    # a reply cannot make the agent run any number of calls: past the cap, one refusal says so
    many = call_text("calculator", {"expression": "1"}) * (MAX_CALLS_PER_REPLY + 5)
    calls = TaggedProtocol().find_calls([{"role": "assistant", "content": many}], {"calculator"})
    assert len(calls) == MAX_CALLS_PER_REPLY + 1 and all(isinstance(c, ToolCall) for c in calls[:-1])
    assert isinstance(calls[-1], RefusedCall) and "at most" in calls[-1].reason


def test_python_fence_is_code_only_with_an_interpreter():
    seg = [{"role": "assistant", "content": "Let me compute.\n```python\nprint(2**10)\n```\n"}]
    assert TaggedProtocol().find_calls(seg, {"calculator"}) == []
    [call] = TaggedProtocol().find_calls(seg, {"interpreter"})
    assert isinstance(call, CodeCall) and call.name == "interpreter" and call.code == "print(2**10)"
    # a ```js block is shown, not run
    assert TaggedProtocol().find_calls([{"role": "assistant", "content": "```js\nx()\n```"}], {"interpreter"}) == []


@pytest.mark.parametrize("text, code", [
    ("```js\nx()\n```\nthen\n``` py \n  print(1)\n\t```", "print(1)"),   # the first python block
    ("see ````python\nprint(2)\n```", "print(2)"),                        # an opener is the line's last ```
    ("```python ```\nprint(3)\n```", None),                               # ...followed only by a language
    ("```python\nprint(4)", None),                                        # an unclosed block is not code
])
def test_python_fences_are_found_by_a_linear_scan(text, code):
    calls = TaggedProtocol().find_calls([{"role": "assistant", "content": text}], {"interpreter"})
    assert [c.code for c in calls] == ([code] if code else [])


def test_default_model_tool_round_trip(smol):
    script = [scripted_reply_ids(smol.tokenizer, call_text("calculator", {"expression": "6*7"}), chatglm=False)]
    agent = Agent(scripted(smol, *script), tools=CALC, max_steps=2)
    assert '"name": "calculator"' in agent.messages[0]["content"]   # the tools are listed as JSON
    events = list(agent.run("What is 6*7?", temperature=0, max_new_tokens=60))
    step = next(e for e in events if isinstance(e, ToolCallStep))
    result = next(e for e in events if isinstance(e, Observation))
    assert step.call.name == "calculator" and step.call.arguments == {"expression": "6*7"}
    assert result.call == step.call and result.result.ok and json.loads(result.result.observation)["result"] == 42
    first_answer = "".join(e.text for e in events[:events.index(step)] if isinstance(e, TextDelta))
    assert "tool_call" not in first_answer             # the call is a step, not text shown to the user
    assert "<tool_call>" in agent.messages[2]["content"]   # while the history keeps what the model wrote
    assert [m["role"] for m in agent.messages] == ["system", "user", "assistant", "observation", "assistant"]
    # the observation reaches the model in its template's tool role
    prompt = smol.tokenizer.decode(smol.encode_chat(agent.messages[:4]))
    assert prompt.rstrip().endswith("assistant") and "tool\n" + agent.messages[3]["content"] in prompt
    assert events[-1] == Finished("answered")


def test_default_model_runs_both_calls_of_one_reply(smol):
    """Two <tool_call> blocks in one reply: both run, in order, each with its observation, and the
    model answers after both."""
    two = "Two sums.\n" + call_text("calculator", {"expression": "6*7"}) + "\n" + call_text("calculator", {"expression": "1+2"})
    script = [scripted_reply_ids(smol.tokenizer, two, chatglm=False)]
    agent = Agent(scripted(smol, *script), tools=CALC, max_steps=2)
    events = list(agent.run("6*7 and 1+2?", temperature=0, max_new_tokens=80))
    steps = [e for e in events if not isinstance(e, TextDelta)]
    assert [type(e) for e in steps] == [ToolCallStep, Observation, ToolCallStep, Observation, Finished]
    assert [e.call.arguments for e in steps[0:4:2]] == [{"expression": "6*7"}, {"expression": "1+2"}]
    assert [e.call for e in steps[1:4:2]] == [e.call for e in steps[0:4:2]]
    assert [json.loads(e.result.observation)["result"] for e in steps[1:4:2]] == [42, 3]
    assert steps[-1] == Finished("answered")
    assert "".join(e.text for e in events[:events.index(steps[0])] if isinstance(e, TextDelta)) == "Two sums.\n\n"
    roles = [m["role"] for m in agent.messages]
    assert roles == ["system", "user", "assistant", "observation", "observation", "assistant"]
    assert [json.loads(m["content"])["result"] for m in agent.messages[3:5]] == [42, 3]


def test_default_model_runs_code_in_the_sandbox(smol, tmp_path):
    with Interpreter(tmp_path, Limits(wall_seconds=20)) as it:
        text = "I'll run it.\n```python\nprint(sum(range(101)))\n```"
        script = [scripted_reply_ids(smol.tokenizer, text, chatglm=False)]
        agent = Agent(scripted(smol, *script), interpreter=it, max_steps=2)
        events = list(agent.run("Sum 0..100", temperature=0, max_new_tokens=60))
    code = next(e for e in events if isinstance(e, CodeStep))
    assert code.call.code == "print(sum(range(101)))"
    result = next(e for e in events if isinstance(e, Observation))
    assert result.call == code.call and result.result.observation == "```result\n5050\n```"
    # the code was shown as it streamed (it is part of the answer text for such models)
    assert "print(sum(range(101)))" in "".join(e.text for e in events if isinstance(e, TextDelta))
