"""OpenAI's Responses API (/v1/responses) on a real `glmkit serve`, through the real `openai` SDK:
text, usage, instructions, the event stream, a function tool round trip over previous_response_id,
owners (one API key cannot read or continue another's response), store=False, constrained JSON,
and bad input as one 400.  One server for the module (the embedded default model, two API keys,
a data directory, scripted replies for the tool call)."""

import json
import os
import time

import httpx
import jsonschema
import openai
import pytest

from glmkit.server.store import MIGRATIONS, NotFound, Store
from server_helpers import running_server

CALC = {"type": "function", "name": "calculator", "description": "Arithmetic", "strict": False,
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]}}
SCRIPT = {"What is 6*7?": 'Let me compute.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}'
                          '\n</tool_call>'}
FRANCE = "What is the capital of France?"


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("responses")
    (d / "script.json").write_text(json.dumps(SCRIPT))
    env = {**os.environ, "GLMKIT_API_KEYS": "k-one,k-two"}
    with running_server("--no-embeddings", "--threads", "2", "--data-dir", str(d / "data"),
                        "--scripted-replies", str(d / "script.json"), env=env) as (base, _):
        yield base


def sdk(base, key="k-one"):
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def client(server):
    return sdk(server)


def ask(client, input, **kw):
    return client.responses.create(model="default", input=input, **{"temperature": 0, "max_output_tokens": 16, **kw})


def test_text_usage_and_instructions(client):
    r = ask(client, FRANCE)
    assert r.id.startswith("resp_") and r.object == "response" and r.status in ("completed", "incomplete")
    assert r.output_text.strip() and r.output[0].type == "message" and r.output[0].role == "assistant"
    u = r.usage
    assert u.input_tokens > 5 and u.output_tokens > 0 and u.total_tokens == u.input_tokens + u.output_tokens
    if r.status == "incomplete":
        assert r.incomplete_details.reason == "max_output_tokens" and u.output_tokens == 16
    # (longer than the template's default system message, which instructions replace)
    rules = "You are a geography tutor. Answer in one word, in French, without punctuation. " * 4
    told = ask(client, FRANCE, instructions=rules)
    assert told.instructions == rules
    assert told.usage.input_tokens > u.input_tokens + 40      # the instructions are in the prompt
    # ...and only in that one: previous_response_id carries the conversation, not the instructions
    later = ask(client, "And of Spain?", previous_response_id=told.id)
    assert later.instructions is None
    assert later.usage.input_tokens < told.usage.input_tokens + told.usage.output_tokens + 20


def test_stream_events_in_order_and_text_equals_non_stream(client):
    whole = ask(client, FRANCE)
    events = list(ask(client, FRANCE, stream=True))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-4:] == ["response.output_text.done", "response.content_part.done", "response.output_item.done",
                          f"response.{whole.status}"]
    assert set(types[4:-4]) == {"response.output_text.delta"}
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == whole.output_text == events[-1].response.output_text
    assert events[-1].response.usage.output_tokens == whole.usage.output_tokens


def test_function_call_round_trip_over_previous_response_id(client):
    first = ask(client, "What is 6*7?", tools=[CALC], max_output_tokens=60)
    kinds = [o.type for o in first.output]
    assert kinds == ["message", "function_call"] and first.output_text == "Let me compute.\n"
    call = first.output[1]
    assert call.name == "calculator" and json.loads(call.arguments) == {"expression": "6*7"}
    assert call.call_id.startswith("call_") and call.id.startswith("fc_")
    second = ask(client, [{"type": "function_call_output", "call_id": call.call_id, "output": "42"}],
                 previous_response_id=first.id, tools=[CALC], max_output_tokens=8)
    assert second.previous_response_id == first.id and second.output_text.strip()
    # the stored conversation (question, the call, its output) is in the second prompt
    assert second.usage.input_tokens > first.usage.input_tokens + first.usage.output_tokens
    # the same conversation sent whole, statelessly, makes the same prompt
    again = ask(client, [{"role": "user", "content": "What is 6*7?"},
                         {"role": "assistant", "content": [{"type": "output_text", "text": "Let me compute.\n"}]},
                         {"type": "function_call", "call_id": call.call_id, "name": "calculator",
                          "arguments": call.arguments},
                         {"type": "function_call_output", "call_id": call.call_id, "output": "42"}],
                tools=[CALC], store=False, max_output_tokens=8)
    assert again.usage.input_tokens == second.usage.input_tokens and again.output_text == second.output_text


def test_function_call_streams_as_its_events(client):
    events = list(ask(client, "What is 6*7?", tools=[CALC], max_output_tokens=60, stream=True))
    types = [e.type for e in events]
    i = types.index("response.function_call_arguments.delta")
    assert types[i - 2:i + 4] == ["response.output_item.done", "response.output_item.added",
                                  "response.function_call_arguments.delta", "response.function_call_arguments.done",
                                  "response.output_item.done", "response.completed"]
    assert json.loads(events[i + 1].arguments) == {"expression": "6*7"}
    assert [o.type for o in events[-1].response.output] == ["message", "function_call"]


def test_owners_store_false_and_unknown_ids(server, client):
    mine = ask(client, FRANCE, max_output_tokens=4)
    assert client.responses.retrieve(mine.id).output_text == mine.output_text
    other = sdk(server, "k-two")
    with pytest.raises(openai.NotFoundError) as e:
        ask(other, "and Spain?", previous_response_id=mine.id)
    assert e.value.body["code"] == "previous_response_not_found"
    with pytest.raises(openai.NotFoundError):
        other.responses.retrieve(mine.id)
    with pytest.raises(openai.NotFoundError):
        other.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError):
        ask(client, "more", previous_response_id="resp_nonexistent")
    unkept = ask(client, FRANCE, max_output_tokens=4, store=False)
    assert unkept.store is False
    with pytest.raises(openai.NotFoundError):
        ask(client, "more", previous_response_id=unkept.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(unkept.id)
    client.responses.delete(mine.id)
    with pytest.raises(openai.NotFoundError):
        client.responses.retrieve(mine.id)
    assert httpx.get(server + f"/v1/responses/{unkept.id}").status_code == 401     # no key at all


def test_json_schema_format_constrains_the_reply(client):
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer", "minimum": 0}},
              "required": ["city", "population"], "additionalProperties": False}
    fmt = {"format": {"type": "json_schema", "name": "city", "schema": schema, "strict": True}}
    r = ask(client, FRANCE, temperature=1.0, max_output_tokens=60, text=fmt)
    assert r.status == "completed" and r.text.format.type == "json_schema"
    jsonschema.validate(json.loads(r.output_text), schema)
    # greedy: json_object bounds no string, so a sampled key can run past any token limit (this API
    # has no seed), and a reply cut there is valid JSON only up to the cut
    events = list(ask(client, FRANCE, temperature=0, max_output_tokens=200, text={"format": {"type": "json_object"}},
                      stream=True))
    assert events[-1].response.status == "completed"
    assert isinstance(json.loads(events[-1].response.output_text), dict)


@pytest.mark.parametrize("body, param", [
    ({"input": [{"role": "user", "content": [{"type": "input_image", "image_url": "x"}]}]}, "input[0].content"),
    ({"input": [{"type": "function_call", "call_id": "c", "name": "f", "arguments": "[1]"}]}, "input[0]"),
    ({"input": [{"type": "reasoning", "summary": []}]}, "input[0]"),
    ({"input": "hi", "tools": [{"type": "web_search"}]}, "tools[0].type"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x"}}}, "text.format"),
    ({"input": "hi", "tool_choice": {"type": "function", "name": "nope"}}, "tool_choice"),
    ({"input": "hi", "max_output_tokens": 10**6}, "max_output_tokens"),
    ({"input": []}, "input"),
    ({"input": "hi", "text": {"format": {"type": "json_schema", "name": "x", "schema": {"$ref": "http://e.com/s"}}}},
     "text.format.schema"),
    ({"input": "hi", "tools": [{**CALC, "parameters": {"$ref": "http://e.com/s"}}]}, "tools[0].parameters"),
])
def test_bad_input_is_one_clear_400(server, body, param):
    r = httpx.post(server + "/v1/responses", json={"model": "default", **body},
                   headers={"Authorization": "Bearer k-one"}, timeout=60)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["param"] == param and error["message"].startswith(param), r.text


def test_store_keeps_responses_per_owner(tmp_path):
    s = Store(tmp_path / "c.db")
    assert s.version == len(MIGRATIONS)
    s.save_response("a", "resp_1", None, [{"role": "user", "content": "hi"}], {"id": "resp_1"})
    assert s.get_response("a", "resp_1")["messages"] == [{"role": "user", "content": "hi"}]
    for call in (lambda: s.get_response("b", "resp_1"), lambda: s.delete_response("b", "resp_1")):
        with pytest.raises(NotFound):
            call()
    s.delete_response("a", "resp_1")
    with pytest.raises(NotFound):
        s.get_response("a", "resp_1")


def test_a_client_that_goes_away_frees_its_slot(server):
    body = {"model": "default", "input": "Write a very long story.", "max_output_tokens": 2000, "stream": True,
            "temperature": 0.8}
    with httpx.stream("POST", server + "/v1/responses", json=body, headers={"Authorization": "Bearer k-one"},
                      timeout=60) as r:
        for line in r.iter_lines():
            if "response.output_text.delta" in line:
                break
    deadline = time.time() + 30
    while (h := httpx.get(server + "/health").json())["running"] or h["waiting"]:
        assert time.time() < deadline, h
        time.sleep(0.05)
