"""Ollama's API on a real `glmkit serve` (the embedded default model), driven by the official
`ollama` Python client unchanged: chat and generate, streamed and not, tool calls (forced with
--scripted-replies, as in test_server_tools_template) and their round trip, `format` under a JSON
schema, the model listing, and Ollama's error shape."""

import json
import subprocess
import sys
import time

import httpx
import jsonschema
import ollama
import pytest

from server_helpers import running_server

CALC = {"type": "function", "function": {"name": "calculator", "description": "Arithmetic",
        "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                       "required": ["expression"]}}}
SCRIPT = {"What is 6*7?": 'Let me compute.\n<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}'
                          '\n</tool_call>'}
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
GREEDY = {"temperature": 0, "num_predict": 10}
PERSON = {"type": "object", "additionalProperties": False, "required": ["name", "age", "role"],
          "properties": {"name": {"type": "string", "maxLength": 8},
                         "age": {"type": "integer", "minimum": 0, "maximum": 130},
                         "role": {"enum": ["admin", "user", "guest"]}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    f = tmp_path_factory.mktemp("script") / "script.json"
    f.write_text(json.dumps(SCRIPT))
    with running_server("--no-console", "--no-embeddings", "--threads", "2", "--scripted-replies", str(f)) as (base, _):
        yield base


@pytest.fixture(scope="module")
def client(server):
    return ollama.Client(host=server, timeout=120)


def test_chat_stream_equals_non_stream(client):
    full = client.chat(model="default", messages=FRANCE, options=GREEDY, stream=False)
    assert full.done and full.done_reason in ("stop", "length") and full.message.role == "assistant"
    assert full.message.content.strip() and not full.message.tool_calls
    assert full.prompt_eval_count > 10 and 0 < full.eval_count <= GREEDY["num_predict"]
    assert full.total_duration >= full.eval_duration > 0 and full.load_duration == 0
    chunks = list(client.chat(model="default", messages=FRANCE, options=GREEDY, stream=True))
    assert [c.done for c in chunks] == [False] * (len(chunks) - 1) + [True]
    assert "".join(c.message.content or "" for c in chunks) == full.message.content
    last = chunks[-1]
    assert last.done_reason == full.done_reason and last.eval_count == full.eval_count
    assert last.prompt_eval_count == full.prompt_eval_count
    # options: num_predict cuts the reply, a stop string ends it before the string
    short = client.chat(model="default", messages=FRANCE, options={"temperature": 0, "num_predict": 2})
    assert short.done_reason == "length" and short.eval_count == 2
    assert full.message.content.startswith(short.message.content)
    word = full.message.content.split()[1]
    cut = client.chat(model="default", messages=FRANCE, options={**GREEDY, "stop": [word]})
    assert cut.message.content == full.message.content[:full.message.content.index(word)]
    assert cut.done_reason == "stop"


def test_tool_call_and_round_trip(client):
    messages = [{"role": "user", "content": "What is 6*7?"}]
    r = client.chat(model="default", messages=messages, tools=[CALC], options=GREEDY | {"num_predict": 60})
    [call] = r.message.tool_calls
    assert call.function.name == "calculator" and call.function.arguments == {"expression": "6*7"}
    assert r.message.content == "Let me compute.\n" and r.done_reason == "stop"
    # streamed: the call is one chunk's tool_calls, never tag text
    chunks = list(client.chat(model="default", messages=messages, tools=[CALC], stream=True,
                              options=GREEDY | {"num_predict": 60}))
    calls = [c for ch in chunks for c in ch.message.tool_calls or []]
    assert [(c.function.name, c.function.arguments) for c in calls] == [("calculator", {"expression": "6*7"})]
    assert "".join(ch.message.content or "" for ch in chunks) == "Let me compute.\n"
    # the result goes back as a tool message; the model answers (not scripted: free text)
    messages += [r.message, {"role": "tool", "content": "42", "tool_name": "calculator"}]
    after = client.chat(model="default", messages=messages, tools=[CALC], options={"temperature": 0, "num_predict": 3})
    assert after.done and isinstance(after.message.content, str)


def test_format(client):
    """Decoded under the schema: a sampled reply still parses and matches (bounded: short)."""
    r = client.chat(model="default", messages=[{"role": "user", "content": "Describe a person as JSON."}],
                    format=PERSON, options={"temperature": 1.0, "top_p": 1.0, "seed": 7, "num_predict": 40})
    assert r.done_reason == "stop"
    jsonschema.validate(json.loads(r.message.content), PERSON)
    r = client.generate(model="default", prompt="Give me a JSON object.", format="json",
                        options={"temperature": 0, "num_predict": 40})
    assert r.done_reason == "stop" and isinstance(json.loads(r.response), dict)
    cut = client.generate(model="default", prompt="Give me a JSON object.", format="json", options={"num_predict": 2})
    assert cut.done_reason == "length" and cut.response.startswith("{")    # incomplete, not an error


def test_generate_stream_and_not(client):
    full = client.generate(model="default", prompt="What is the capital of France?", options=GREEDY)
    assert full.done and full.response.strip() and full.eval_count > 0
    chunks = list(client.generate(model="default", prompt="What is the capital of France?", options=GREEDY,
                                  stream=True))
    assert "".join(c.response for c in chunks) == full.response and chunks[-1].done
    assert chunks[-1].done_reason == full.done_reason
    raw = client.generate(model="default", prompt="The capital of France is", raw=True,
                          options={"temperature": 0, "num_predict": 2})
    assert raw.done_reason == "length" and raw.eval_count == 2
    # a raw prompt has fewer tokens than the same text in the chat format
    assert raw.prompt_eval_count < full.prompt_eval_count


def test_list_show_ps_version(client, server):
    [m] = client.list().models
    assert m.model.startswith("SmolLM2") and m.details.format == "gguf" and m.details.family == "llama"
    assert m.size > 10**7 and m.details.parameter_size.endswith("M") and m.details.quantization_level
    for name in (m.model, m.model + ":latest", "default"):
        shown = client.show(name)
        assert shown.details.family == "llama" and shown.modelinfo["llama.context_length"] >= 1024
        assert "temperature" in shown.parameters and "tools" in shown.capabilities
    assert [p.model for p in client.ps().models] == [m.model]
    assert httpx.get(server + "/api/version").json()["version"]
    # Ollama's way to load a model: no messages, no prompt
    assert client.chat(model="default").done_reason == "load"
    assert client.generate(model="default").done_reason == "load"


def test_errors_are_ollama_shaped(client, server):
    for call in (lambda: client.chat(model="llama3", messages=FRANCE), lambda: client.show("nope"),
                 lambda: client.generate(model="nope", prompt="hi", stream=True).__next__()):
        with pytest.raises(ollama.ResponseError) as e:
            call()
        assert e.value.status_code == 404 and e.value.error.startswith("model '")
    bad = [({"model": "default", "messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
           ({"model": "default", "messages": FRANCE, "options": {"temperature": -1}}, "options.temperature"),
           ({"model": "default", "messages": FRANCE, "options": {"num_predict": 10**6}}, "num_predict"),
           ({"model": "default", "messages": FRANCE, "format": "yaml"}, "format"),
           ({"model": "default", "messages": FRANCE, "format": {"type": "nonsense"}}, "format"),
           ({"model": "default", "messages": [{"role": "user", "content": "x", "images": ["aGk="]}]}, "images"),
           ({"model": "default", "prompt": "x", "raw": True, "format": "json"}, "raw")]
    for body, says in bad:
        path = "/api/generate" if "prompt" in body else "/api/chat"
        r = httpx.post(server + path, json=body)
        assert r.status_code == 400 and isinstance(r.json()["error"], str) and says in r.json()["error"], r.text
    r = httpx.post(server + "/api/chat", content=b'{"model": NaN}', headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and "NaN" in r.json()["error"]
    # the server is still up, and unknown options are ignored
    r = client.chat(model="default", messages=FRANCE, options={"num_ctx": 99999, "mirostat": 2, "num_predict": 1})
    assert r.done


def test_a_client_that_goes_away_stops_the_generation(server):
    with httpx.stream("POST", server + "/api/generate", timeout=60, json={
            "model": "default", "prompt": "Write a long story.", "options": {"num_predict": 2000}}) as r:
        assert json.loads(next(r.iter_lines()))["done"] is False
    for _ in range(100):          # the engine frees the slot once the stream is closed
        health = httpx.get(server + "/health").json()
        if health["running"] == 0:
            break
        time.sleep(0.1)
    assert health["running"] == 0 and health["waiting"] == 0


def test_the_routes_load_without_torch():
    """Like the other routers: only create_app's scheduler needs torch (the listing imports it late)."""
    code = "import sys, glmkit.server.ollama_api; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr
