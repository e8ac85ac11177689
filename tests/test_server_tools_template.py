"""OpenAI tool calls on the embedded default model (a chat-template model without ChatGLM3's
protocol): the tools go into its system message in the tagged convention, and <tool_call> blocks
in its reply come back as `tool_calls`.  A 135M model rarely writes one on its own, so its first
reply to each scripted message is forced token by token (--scripted-replies, a testing aid);
parsing, validation and OpenAI shaping are the production path."""

import json

import openai
import pytest

from glmkit.chat.openai_compat import to_template_messages
from glmkit.chat.protocols import TaggedCallParser
from glmkit.chat.template import PlainReplyParser
from server_helpers import running_server

CALC = {"type": "function", "function": {"name": "calculator", "description": "Arithmetic",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]}}}
SCRIPT = {
    "What is 6*7?": 'Let me compute.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>',
    "broken": '<tool_call>\n{"name": "calculator", "arguments": {"expression": 7}}\n</tool_call>',
    "not json": "<tool_call>\ncalculator(expression='1')\n</tool_call>",
    "forced": '{"expression": "2+2"}}\n</tool_call>',     # continues the forced start of the call
}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    f = tmp_path_factory.mktemp("script") / "script.json"
    f.write_text(json.dumps(SCRIPT))
    with running_server("--no-console", "--no-embeddings", "--scripted-replies", str(f)) as (base, _):
        yield openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)


def ask(client, text, **kw):
    return client.chat.completions.create(model="default", messages=[{"role": "user", "content": text}],
                                          tools=[CALC], max_tokens=60, temperature=0, **kw)


def test_tool_call_non_stream(client):
    c = ask(client, "What is 6*7?").choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content == "Let me compute.\n"
    [call] = c.message.tool_calls
    assert call.function.name == "calculator" and json.loads(call.function.arguments) == {"expression": "6*7"}


def test_tool_call_stream_never_shows_the_tag(client):
    chunks = list(ask(client, "What is 6*7?", stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert text == "Let me compute.\n" and "<" not in text
    assert [json.loads(c.function.arguments) for c in calls] == [{"expression": "6*7"}]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("prompt, why", [("broken", "expression"), ("not json", "not valid JSON")])
def test_bad_calls_are_shown_with_the_reason_not_returned(client, prompt, why):
    c = ask(client, prompt).choices[0]
    assert not c.message.tool_calls and c.finish_reason != "tool_calls"
    assert "tool call refused" in c.message.content and why in c.message.content


def test_named_tool_choice_forces_the_call(client):
    c = ask(client, "forced", tool_choice={"type": "function", "function": {"name": "calculator"}}).choices[0]
    assert c.finish_reason == "tool_calls"
    assert json.loads(c.message.tool_calls[0].function.arguments) == {"expression": "2+2"}


def test_round_trip_shows_the_model_its_call_and_the_result(client, smol):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 6*7?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "calculator", "arguments": '{"expression": "6*7"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"result": 42}'}]
    prompt = smol.tokenizer.decode(smol.encode_chat(to_template_messages(messages, [CALC["function"]])))
    assert prompt.startswith("system\nBe brief.\n\nYou can call functions") and '"name": "calculator"' in prompt
    assert '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>' in prompt
    assert 'tool\n{"result": 42}' in prompt
    r = client.chat.completions.create(model="default", messages=messages, tools=[CALC], max_tokens=20)
    assert r.choices[0].message.content is not None


def test_a_tag_split_across_tokens_is_held_back_until_it_is_known(smol):
    p = TaggedCallParser(PlainReplyParser(smol.tokenizer), {"calculator"})
    shown = []
    for t in smol.tokenizer.encode('So <tool_call>{"name": "calculator", "arguments": {"expression": "1"}}</tool_call> ok <tool'):
        shown += [e.text for e in p.feed(t) if e.kind == "text"]
    shown += [e.text for e in p.finish() if e.kind == "text"]
    visible = "".join(s for s in shown if "tool_call(" not in s)
    assert visible == "So  ok <tool"            # the partial tag at the end is text after all
