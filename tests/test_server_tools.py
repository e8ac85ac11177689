"""Tool calls through the API on the tiny ChatGLM3 fixture.

The fixture is a random model: it never writes a tool call on its own.  The server is started
with --scripted-replies (a testing aid, labelled as such in --help): for the listed user
messages the real model runs but decoding is constrained to the scripted tokens.  Everything
after the tokens — reply parsing, the ast tool-call parser, schema validation, OpenAI shaping,
streaming — is the production path."""

import json

import openai
import pytest

from conftest import TINY, reference
from server_helpers import running_server

TRACK = {"type": "function", "function": {"name": "track", "description": "追踪指定股票的实时价格",
                                           "parameters": {"type": "object",
                                                          "properties": {"symbol": {"description": "需要追踪的股票代码"}},
                                                          "required": []}}}
SCRIPT = {
    "帮我查询股票10111的价格": 'track\n ```python\ntool_call(symbol="10111")\n```',
    "先说一句再查": '\n好的，我来查一下。<|assistant|>track\n ```python\ntool_call(symbol="10111")\n```',
    "evil": "track\n ```python\ntool_call(symbol=__import__('os').system('touch /tmp/glmkit-pwned'))\n```",
    "schema": 'weather\n ```python\ntool_call(city=42)\n```',
    "json please": '\n{"answer": 42, "unit": "km"}',
    "bad json": "\n{\"answer\": 4",
    # two calls in one reply: ChatGLM3 writes each as its own assistant segment
    "两只股票": '\n我查两只。<|assistant|>track\n ```python\ntool_call(symbol="10111")\n```'
            '<|assistant|>track\n ```python\ntool_call(symbol="20222")\n```',
    "forced": ' ```python\ntool_call(symbol="30333")\n```',     # continues the forced metadata line
}
WEATHER = {"type": "function", "function": {"name": "weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    f = tmp_path_factory.mktemp("script") / "script.json"
    f.write_text(json.dumps(SCRIPT, ensure_ascii=False))
    with running_server("--model", str(TINY), "--dtype", "float32", "--scripted-replies", str(f)) as (base, _):
        yield openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)


def ask(text):
    return [{"role": "user", "content": text}]


def test_tool_call_non_stream(client):
    r = client.chat.completions.create(model="default", messages=ask("帮我查询股票10111的价格"), tools=[TRACK])
    c = r.choices[0]
    assert c.finish_reason == "tool_calls"
    [call] = c.message.tool_calls
    assert call.function.name == "track" and json.loads(call.function.arguments) == {"symbol": "10111"}
    assert call.id.startswith("call_")


def test_tool_call_stream(client):
    chunks = list(client.chat.completions.create(model="default", messages=ask("先说一句再查"), tools=[TRACK],
                                                 stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks)
    calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert text == "好的，我来查一下。"
    assert len(calls) == 1 and calls[0].function.name == "track"
    assert json.loads(calls[0].function.arguments) == {"symbol": "10111"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_two_calls_in_one_reply_non_stream(client):
    r = client.chat.completions.create(model="default", messages=ask("两只股票"), tools=[TRACK])
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and c.message.content == "我查两只。"
    assert [(t.function.name, json.loads(t.function.arguments)) for t in c.message.tool_calls] == \
        [("track", {"symbol": "10111"}), ("track", {"symbol": "20222"})]
    assert all(t.id.startswith("call_") and t.type == "function" for t in c.message.tool_calls)
    assert len({t.id for t in c.message.tool_calls}) == 2


def test_two_calls_in_one_reply_stream(client):
    chunks = list(client.chat.completions.create(model="default", messages=ask("两只股票"), tools=[TRACK],
                                                 stream=True))
    calls = [tc for ch in chunks for tc in (ch.choices[0].delta.tool_calls or [])]
    assert "".join(ch.choices[0].delta.content or "" for ch in chunks) == "我查两只。"
    assert [tc.index for tc in calls] == [0, 1] and len({tc.id for tc in calls}) == 2
    assert [json.loads(tc.function.arguments) for tc in calls] == [{"symbol": "10111"}, {"symbol": "20222"}]
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_named_tool_choice_forces_the_call(client):
    """The reply starts as the named tool's segment (its metadata line is the forced prefix):
    what the model writes after it is that tool's call."""
    r = client.chat.completions.create(model="default", messages=ask("forced"), tools=[TRACK],
                                       tool_choice={"type": "function", "function": {"name": "track"}})
    c = r.choices[0]
    assert c.finish_reason == "tool_calls" and not c.message.content
    [call] = c.message.tool_calls
    assert call.function.name == "track" and json.loads(call.function.arguments) == {"symbol": "30333"}


def test_hostile_tool_call_is_refused_not_run(client):
    import os
    r = client.chat.completions.create(model="default", messages=ask("evil"), tools=[TRACK])
    c = r.choices[0]
    assert not c.message.tool_calls and c.finish_reason != "tool_calls"
    assert "tool call refused" in c.message.content
    assert not os.path.exists("/tmp/glmkit-pwned")


def test_schema_violation_is_refused(client):
    r = client.chat.completions.create(model="default", messages=ask("schema"), tools=[WEATHER])
    assert not r.choices[0].message.tool_calls and "city" in r.choices[0].message.content


def test_tool_role_round_trip_matches_the_reference_prompt(client, tiny):
    """assistant tool_calls + a tool message become exactly the original's observation turn."""
    case = next(c for c in reference(TINY)["chat_cases"] if c["name"] == "tool_call_observation")
    messages = [{"role": "user", "content": "帮我查询股票10111的价格"},
                {"role": "assistant", "content": None, "tool_calls": [
                    {"id": "call_1", "type": "function", "function": {"name": "track", "arguments": '{"symbol": "10111"}'}}]},
                {"role": "tool", "tool_call_id": "call_1", "content": '{"price": 12412}'}]
    r = client.chat.completions.create(model="default", messages=messages, tools=[TRACK], temperature=0, max_tokens=20)
    assert r.usage.prompt_tokens == len(case["input_ids"])
    # the greedy reply equals what the original's ids decode to through our reply parser
    parser = tiny.format.reply_parser()
    shown = ""
    for t in case["greedy_new_ids"]:
        if t in tiny.format.stop_ids:
            break
        shown += "".join(e.text for e in parser.feed(t) if e.kind == "text")
    shown += "".join(e.text for e in parser.finish() if e.kind == "text")
    assert r.choices[0].message.content == shown


def test_tool_choice_none_and_named(client):
    r = client.chat.completions.create(model="default", messages=ask("帮我查询股票10111的价格"), tools=[TRACK],
                                       tool_choice="none", max_tokens=5, temperature=0)
    assert not r.choices[0].message.tool_calls and r.usage.prompt_tokens < 60   # tools not in the prompt
    with pytest.raises(openai.BadRequestError, match="not among the tools"):
        client.chat.completions.create(model="default", messages=ask("x"), tools=[TRACK],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


def test_response_format_is_validated(client):
    schema = {"type": "json_schema", "json_schema": {"name": "a", "schema": {
        "type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}}}
    ok = client.chat.completions.create(model="default", messages=ask("json please"),
                                        response_format={"type": "json_object"})
    assert json.loads(ok.choices[0].message.content) == {"answer": 42, "unit": "km"}
    ok2 = client.chat.completions.create(model="default", messages=ask("json please"), response_format=schema)
    assert json.loads(ok2.choices[0].message.content)["answer"] == 42
    wrong = dict(schema, json_schema={"name": "a", "schema": {"type": "object", "properties": {
        "answer": {"type": "string"}}}})
    with pytest.raises(openai.UnprocessableEntityError, match="does not match the schema"):
        client.chat.completions.create(model="default", messages=ask("json please"), response_format=wrong)
    with pytest.raises(openai.UnprocessableEntityError, match="not valid JSON"):
        client.chat.completions.create(model="default", messages=ask("bad json"), response_format={"type": "json_object"})
    with pytest.raises(openai.BadRequestError, match="json_schema"):
        client.chat.completions.create(model="default", messages=ask("x"), response_format={"type": "json_schema"})
    # streaming: the failure arrives as an error event before [DONE]
    with pytest.raises(openai.APIError, match="not valid JSON"):
        for _ in client.chat.completions.create(model="default", messages=ask("bad json"), stream=True,
                                                response_format={"type": "json_object"}):
            pass
