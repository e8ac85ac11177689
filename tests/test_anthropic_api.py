"""Anthropic's Messages API (/v1/messages): a real `glmkit serve` on loopback, the official
`anthropic` SDK.  The default model (SmolLM2, a chat-template model) writes tool calls and long
replies when told to by --scripted-replies (a testing aid, see test_server_tools_template.py);
prompt building, parsing and the Anthropic shapes are the production path."""

import json
import os
import re
import time

import anthropic
import httpx
import pytest

from conftest import TINY
from server_helpers import running_server

CALC = {"name": "calculator", "description": "Arithmetic",
        "input_schema": {"type": "object", "properties": {"expression": {"type": "string"}},
                         "required": ["expression"]}}
SCRIPT = {
    "What is 6*7?": 'Let me compute.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>',
    "two sums": 'Both.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>\n'
                '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+2"}}\n</tool_call>',
    "forced": '{"expression": "2+2"}}\n</tool_call>',     # continues the forced start of the call
    "Count.": "one two STOP three four",
    "Go on and on.": "word " * 3000,                     # runs far longer than any test waits
}
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
# greedy: this SDK release has no `temperature` argument, so it goes as a body field, as the API has it
T0 = {"extra_body": {"temperature": 0}}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    f = tmp_path_factory.mktemp("script") / "script.json"
    f.write_text(json.dumps(SCRIPT))
    with running_server("--no-console", "--no-embeddings", "--threads", "2", "--scripted-replies", str(f)) as (b, _):
        yield b


@pytest.fixture(scope="module")
def client(base):
    return anthropic.Anthropic(base_url=base, api_key="x", max_retries=0, timeout=120)


def ask(client, text, **kw):
    return client.messages.create(model="claude-sonnet-4-6", messages=[{"role": "user", "content": text}],
                                  **{"max_tokens": 60, **T0, **kw})


def test_plain_message(client):
    r = client.messages.create(model="claude-sonnet-4-6", messages=FRANCE, max_tokens=20, **T0)
    assert r.type == "message" and r.role == "assistant" and r.id.startswith("msg_")
    assert r.model.startswith("SmolLM2")          # any name is accepted; the served model is named
    [block] = r.content
    assert block.type == "text" and "Paris" in block.text
    assert r.stop_reason in ("end_turn", "max_tokens") and r.stop_sequence is None
    assert r.usage.input_tokens > 10 and 0 < r.usage.output_tokens <= 20


def test_stream_equals_whole(client):
    whole = client.messages.create(model="default", messages=FRANCE, max_tokens=20, **T0)
    with client.messages.stream(model="default", messages=FRANCE, max_tokens=20, **T0) as s:
        text = "".join(s.text_stream)
        final = s.get_final_message()
    assert text == whole.content[0].text == final.content[0].text
    assert (final.stop_reason, final.usage.output_tokens, final.usage.input_tokens) == \
        (whole.stop_reason, whole.usage.output_tokens, whole.usage.input_tokens)
    events = [e.type for e in client.messages.create(model="default", messages=FRANCE, max_tokens=5,
                                                     **T0, stream=True)]
    assert events[:2] == ["message_start", "content_block_start"] and "content_block_delta" in events
    assert events[-3:] == ["content_block_stop", "message_delta", "message_stop"]


def test_max_tokens_and_stop_sequence(client):
    r = ask(client, "Count.", max_tokens=2)
    assert r.stop_reason == "max_tokens" and r.usage.output_tokens == 2
    r = ask(client, "Count.", stop_sequences=["NEVER", "STOP"])
    assert (r.content[0].text, r.stop_reason, r.stop_sequence) == ("one two ", "stop_sequence", "STOP")


def test_tool_use_round_trip(client):
    r = ask(client, "What is 6*7?", tools=[CALC])
    assert r.stop_reason == "tool_use"
    text, call = r.content
    assert (text.type, text.text) == ("text", "Let me compute.\n")
    assert call.type == "tool_use" and call.id.startswith("toolu_")
    assert (call.name, call.input) == ("calculator", {"expression": "6*7"})
    history = [{"role": "user", "content": "What is 6*7?"},
               {"role": "assistant", "content": [b.model_dump() for b in r.content]},
               {"role": "user", "content": [{"type": "tool_result", "tool_use_id": call.id, "content": "42"}]}]
    again = client.messages.create(model="default", messages=history, tools=[CALC], max_tokens=20, **T0)
    assert again.stop_reason in ("end_turn", "max_tokens") and again.content[0].type == "text"
    # the tool's result is in the prompt: it is longer than the first round's by at least the call
    assert again.usage.input_tokens > r.usage.input_tokens + 10


def test_streamed_tool_use_assembles_its_input(client):
    with client.messages.stream(model="default", messages=[{"role": "user", "content": "What is 6*7?"}],
                                tools=[CALC], max_tokens=60, **T0) as s:
        events = list(s)
        final = s.get_final_message()
    partial = "".join(e.delta.partial_json for e in events
                      if e.type == "content_block_delta" and e.delta.type == "input_json_delta")
    assert json.loads(partial) == {"expression": "6*7"}
    assert [b.type for b in final.content] == ["text", "tool_use"] and final.stop_reason == "tool_use"
    assert final.content[1].input == {"expression": "6*7"}


def test_two_calls_in_order_and_forced_tool(client):
    r = ask(client, "two sums", tools=[CALC], max_tokens=120)
    assert [b.type for b in r.content] == ["text", "tool_use", "tool_use"]   # the line break between: no block
    assert [b.input for b in r.content[1:]] == [{"expression": "6*7"}, {"expression": "1+2"}]
    assert len({b.id for b in r.content[1:]}) == 2
    r = ask(client, "forced", tools=[CALC], tool_choice={"type": "tool", "name": "calculator"})
    assert [(b.type, b.input) for b in r.content] == [("tool_use", {"expression": "2+2"})]
    assert r.stop_reason == "tool_use"


def test_count_tokens_is_the_prompt(client):
    n = client.messages.count_tokens(model="x", messages=FRANCE, system="Be brief.").input_tokens
    r = client.messages.create(model="x", messages=FRANCE, system=[{"type": "text", "text": "Be brief."}],
                               max_tokens=1)
    assert n == r.usage.input_tokens > 10


@pytest.mark.parametrize("body, says", [
    ({"model": "m", "messages": FRANCE}, "max_tokens"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "system", "content": "hi"}]}, "role"),
    ({"model": "m", "max_tokens": 5, "messages": [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]}, "image"),
    ({"model": "m", "max_tokens": 5, "messages": FRANCE, "tool_choice": {"type": "tool", "name": "nope"}}, "nope"),
    ({"model": "m", "max_tokens": 5, "messages": [*FRANCE, {"role": "assistant", "content": "Pa"}]}, "prefill"),
])
def test_bad_requests_are_anthropic_shaped_400s(client, body, says):
    with pytest.raises(anthropic.BadRequestError) as e:
        client.post("/v1/messages", body=body, cast_to=httpx.Response)
    assert e.value.status_code == 400 and e.value.body["type"] == "error"
    assert e.value.body["error"]["type"] == "invalid_request_error" and says in e.value.body["error"]["message"]


def test_other_refusals_on_the_path_are_anthropic_shaped(base):
    r = httpx.get(base + "/v1/messages")
    assert r.status_code == 405 and r.json()["type"] == "error"
    r = httpx.post(base + "/v1/messages", content=b"{", headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    # the OpenAI routes keep OpenAI's shape
    assert set(httpx.post(base + "/v1/chat/completions", json={}).json()["error"]) >= {"message", "code"}


def test_disconnect_stops_generation(base):
    def cancelled():
        return int(re.search(r"^glmkit_cancelled_total (\d+)", httpx.get(base + "/metrics").text, re.M).group(1))
    body = {"model": "m", "max_tokens": 4000, "messages": [{"role": "user", "content": "Go on and on."}]}
    before = cancelled()
    with httpx.stream("POST", base + "/v1/messages", json={**body, "stream": True}, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 10:
                break
    wait_for_health(base, running=0)
    with pytest.raises(httpx.ReadTimeout):     # not streamed: the server notices the closed connection
        httpx.post(base + "/v1/messages", json=body, timeout=httpx.Timeout(60, read=2))
    wait_for_health(base, running=0)
    assert cancelled() == before + 2


def test_api_keys_x_api_key_and_anthropic_401():
    with running_server("--model", str(TINY), "--no-console", "--no-embeddings",
                        env={**os.environ, "GLMKIT_API_KEYS": "k-one,k-two"}) as (base, _):
        ok = anthropic.Anthropic(base_url=base, api_key="k-two", max_retries=0)     # sends x-api-key
        assert ok.messages.create(model="m", messages=FRANCE, max_tokens=2).usage.output_tokens >= 1
        with pytest.raises(anthropic.AuthenticationError) as e:
            anthropic.Anthropic(base_url=base, api_key="wrong", max_retries=0).messages.create(
                model="m", messages=FRANCE, max_tokens=2)
        assert e.value.body == {"type": "error", "error": {"type": "authentication_error",
                                                           "message": e.value.body["error"]["message"]}}
        assert httpx.post(base + "/v1/chat/completions", json={}).json()["error"]["code"] == "invalid_api_key"


def wait_for_health(base, running, timeout=15):
    deadline = time.time() + timeout
    while (h := httpx.get(base + "/health").json())["running"] != running:
        assert time.time() < deadline, f"/health still says {h}"
        time.sleep(0.05)
