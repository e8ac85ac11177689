"""OpenAI tool calls on the embedded default model (a chat-template model without ChatGLM3's
protocol): the tools go into its system message in the tagged convention, and <tool_call> blocks
in its reply come back as `tool_calls`.  A 135M model rarely writes one on its own, so its first
reply to each scripted message is forced token by token (--scripted-replies, a testing aid);
parsing, validation and OpenAI shaping are the production path."""

import json

import openai
import pytest

from glmkit.chat.protocols import TaggedProtocol
from glmkit.chat.protocols import TaggedCallParser
from glmkit.chat.template import PlainReplyParser
from glmkit.chat.tool_calls import RefusedCall, ToolCall
from server_helpers import running_server

CALC = {"type": "function", "function": {"name": "calculator", "description": "Arithmetic",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]}}}
SCRIPT = {
    "What is 6*7?": 'Let me compute.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>',
    "broken": '<tool_call>\n{"name": "calculator", "arguments": {"expression": 7}}\n</tool_call>',
    "not json": "<tool_call>\ncalculator(expression='1')\n</tool_call>",
    "forced": '{"expression": "2+2"}}\n</tool_call>',     # continues the forced start of the call
    "two sums": 'Both.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>\n'
                '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+2"}}\n</tool_call>',
}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    f = tmp_path_factory.mktemp("script") / "script.json"
    f.write_text(json.dumps(SCRIPT))
    with running_server("--no-console", "--no-embeddings", "--scripted-replies", str(f)) as (base, _):
        yield openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)


def ask(client, text, **kw):
    return client.chat.completions.create(model="default", messages=[{"role": "user", "content": text}],
                                          tools=[CALC], temperature=0, **{"max_tokens": 60, **kw})


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


def test_two_calls_in_one_reply_non_stream(client):
    c = ask(client, "two sums", max_tokens=120).choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content == "Both.\n\n"
    assert [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls] == \
        [("calculator", {"expression": "6*7"}), ("calculator", {"expression": "1+2"})]
    assert len({t.id for t in c.message.tool_calls}) == 2


def test_two_calls_in_one_reply_stream(client):
    chunks = list(ask(client, "two sums", max_tokens=120, stream=True))
    calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "Both.\n\n"
    assert [tc.index for tc in calls] == [0, 1] and len({tc.id for tc in calls}) == 2
    assert [json.loads(tc.function.arguments) for tc in calls] == [{"expression": "6*7"}, {"expression": "1+2"}]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


@pytest.mark.parametrize("prompt, why", [("broken", "expression"), ("not json", "not valid JSON")])
def test_bad_calls_are_shown_with_the_reason_not_returned(client, prompt, why):
    c = ask(client, prompt).choices[0]
    assert not c.message.tool_calls and c.finish_reason != "tool_calls"
    assert "tool call refused" in c.message.content and why in c.message.content
    # shown as the model wrote it (its JSON), not rewritten in another protocol
    assert c.message.content.startswith("<tool_call>") and "tool_call(" not in c.message.content


def test_named_tool_choice_forces_the_call(client):
    c = ask(client, "forced", tool_choice={"type": "function", "function": {"name": "calculator"}}).choices[0]
    assert c.finish_reason == "tool_calls"
    assert json.loads(c.message.tool_calls[0].function.arguments) == {"expression": "2+2"}


def test_round_trip_shows_the_model_its_call_and_the_result(client, smol):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 6*7?"},
                {"role": "assistant", "content": None, "tool_calls": [{"id": "call_1", "type": "function", "function": {
                    "name": "calculator", "arguments": '{"expression": "6*7"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"result": 42}'}]
    prompt = smol.tokenizer.decode(smol.encode_chat(TaggedProtocol().api_messages(messages, [CALC["function"]])))
    assert prompt.startswith("system\nBe brief.\n\nYou can call functions") and '"name": "calculator"' in prompt
    assert '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>' in prompt
    assert 'tool\n{"result": 42}' in prompt
    r = client.chat.completions.create(model="default", messages=messages, tools=[CALC], max_tokens=20)
    assert r.choices[0].message.content is not None


def test_a_tag_split_across_tokens_is_held_back_until_it_is_known(smol):
    p = TaggedCallParser(PlainReplyParser(smol.tokenizer), {"calculator": CALC["function"]["parameters"]})
    items = []
    for t in smol.tokenizer.encode('So <tool_call>{"name": "calculator", "arguments": {"expression": "1"}}</tool_call> ok <tool'):
        items += p.feed(t)
    items += p.finish()
    assert "".join(i for i in items if isinstance(i, str)) == "So  ok <tool"   # the partial tag at the end is text after all
    [call] = [i for i in items if not isinstance(i, str)]
    assert isinstance(call, ToolCall) and (call.name, call.arguments) == ("calculator", {"expression": "1"})


def test_the_stream_checks_arguments_against_the_schema(smol):
    p = TaggedCallParser(PlainReplyParser(smol.tokenizer), {"calculator": CALC["function"]["parameters"]})
    items = []
    for t in smol.tokenizer.encode('<tool_call>{"name": "calculator", "arguments": {"expression": 7}}</tool_call>'):
        items += p.feed(t)
    [refused] = items + p.finish()
    assert isinstance(refused, RefusedCall) and "expression" in refused.reason
    assert refused.written == '<tool_call>{"name": "calculator", "arguments": {"expression": 7}}</tool_call>'
