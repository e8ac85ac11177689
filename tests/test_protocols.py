"""Tool calls and code for models without ChatGLM3's protocol (the default model): the tagged
convention in chat.protocols, driven through the real Agent with decoding scripted."""

import json

import pytest

from glmkit.chat.agent import Agent
from glmkit.chat.builtin_tools import calculator
from glmkit.sandbox import Interpreter, Limits
from glmkit.chat.protocols import TaggedProtocol
from glmkit.chat.scripted import scripted_reply_ids

CALC = [calculator]


def call_text(name, args) -> str:
    return "<tool_call>\n" + json.dumps({"name": name, "arguments": args}) + "\n</tool_call>"


@pytest.mark.parametrize("text, expect", [
    (call_text("calculator", {"expression": "2+3"}), ("calculator", {"expression": "2+3"}, None)),
    ('<tool_call>{"name": "calculator", "arguments": "{\\"expression\\": \\"1\\"}"}</tool_call>',
     ("calculator", {"expression": "1"}, None)),
    ("<tool_call>{'name': 'calculator'}</tool_call>", ("?", None, "not valid JSON")),
    ('<tool_call>{"name": "rm_rf", "arguments": {}}</tool_call>', ("rm_rf", None, "no tool named")),
    ('<tool_call>{"name": "calculator", "arguments": [1]}</tool_call>', ("calculator", None, "JSON object")),
    ('<tool_call>["calculator"]</tool_call>', ("?", None, "JSON object")),
    ("<tool_call>" + "[" * 100_000 + "</tool_call>", ("?", None, "longer than")),
    ("<tool_call>" + "[" * 5000 + "]" * 5000 + "</tool_call>", ("?", None, "nested too deeply")),
    ('<tool_call>{"name": "interpreter", "arguments": {}}</tool_call>', ("interpreter", None, "no tool named")),
    ("Just an answer.", None),
])
def test_tagged_calls_are_parsed_as_data(text, expect):
    call = TaggedProtocol().find_call([{"role": "assistant", "content": text}], {"calculator", "interpreter"})
    if expect is None:
        assert call is None
        return
    name, args, error = expect
    assert call.name == name and call.arguments == args
    assert (call.error is None) if error is None else (error in call.error)


def test_python_fence_is_code_only_with_an_interpreter():
    seg = [{"role": "assistant", "content": "Let me compute.\n```python\nprint(2**10)\n```\n"}]
    assert TaggedProtocol().find_call(seg, {"calculator"}) is None
    call = TaggedProtocol().find_call(seg, {"interpreter"})
    assert call.name == "interpreter" and call.code == "print(2**10)"
    # a ```js block is shown, not run
    assert TaggedProtocol().find_call([{"role": "assistant", "content": "```js\nx()\n```"}], {"interpreter"}) is None


@pytest.mark.parametrize("text, code", [
    ("```js\nx()\n```\nthen\n``` py \n  print(1)\n\t```", "print(1)"),   # the first python block
    ("see ````python\nprint(2)\n```", "print(2)"),                        # an opener is the line's last ```
    ("```python ```\nprint(3)\n```", None),                               # ...followed only by a language
    ("```python\nprint(4)", None),                                        # an unclosed block is not code
])
def test_python_fences_are_found_by_a_linear_scan(text, code):
    call = TaggedProtocol().find_call([{"role": "assistant", "content": text}], {"interpreter"})
    assert (call and call.code) == code


def test_default_model_tool_round_trip(smol):
    agent = Agent(smol, tools=CALC, max_steps=2)
    assert '"name": "calculator"' in agent.messages[0]["content"]   # the tools are listed as JSON
    script = [scripted_reply_ids(smol.tokenizer, call_text("calculator", {"expression": "6*7"}), chatglm=False)]
    events = list(agent.run("What is 6*7?", script=script, temperature=0, max_new_tokens=60))
    call = next(e for e in events if e.kind == "tool_call")
    result = next(e for e in events if e.kind == "tool_result")
    assert call.arguments == {"expression": "6*7"} and result.result.ok and json.loads(result.result.observation)["result"] == 42
    first_answer = "".join(e.text for e in events[:events.index(call)] if e.kind == "text")
    assert "tool_call" not in first_answer             # the call is a step, not text shown to the user
    assert "<tool_call>" in agent.messages[2]["content"]   # while the history keeps what the model wrote
    assert [m["role"] for m in agent.messages] == ["system", "user", "assistant", "observation", "assistant"]
    # the observation reaches the model in its template's tool role
    prompt = smol.tokenizer.decode(smol.encode_chat(agent.messages[:4]))
    assert prompt.rstrip().endswith("assistant") and "tool\n" + agent.messages[3]["content"] in prompt
    assert events[-1].kind == "done"


def test_default_model_runs_code_in_the_sandbox(smol, tmp_path):
    with Interpreter(tmp_path, Limits(wall_seconds=20)) as it:
        agent = Agent(smol, interpreter=it, max_steps=2)
        text = "I'll run it.\n```python\nprint(sum(range(101)))\n```"
        script = [scripted_reply_ids(smol.tokenizer, text, chatglm=False)]
        events = list(agent.run("Sum 0..100", script=script, temperature=0, max_new_tokens=60))
    assert next(e for e in events if e.kind == "code").text == "print(sum(range(101)))"
    assert next(e for e in events if e.kind == "tool_result").result.observation == "```result\n5050\n```"
    # the code was shown as it streamed (it is part of the answer text for such models)
    assert "print(sum(range(101)))" in "".join(e.text for e in events if e.kind == "text")
