"""create_app driven in-process (FastAPI's TestClient, the tiny ChatGLM3 fixture): the error shapes
every refusal has, the response bodies against their pydantic models, and one reply behaviour
(stop strings, max tokens, finish reasons, usage) across the API routes, glmkit_run_tools, the
console and the Python API.  test_server*.py prove the same over a real process."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from fastapi.testclient import TestClient

import glmkit
from conftest import TINY, TINY_32K
from glmkit.chat.builtin_tools import BUILTIN
from glmkit.chat.tool_definitions import as_tool
from glmkit.engine import GenerationRequest
from glmkit.server.app import ServerConfig, create_app
from glmkit.server.openai_responses import (ChatCompletion, ChatCompletionChunk, Completion, ErrorResponse, Health,
                                         ModelCard, ModelList)

ANSWER = "The answer is 42. Done, and a few more words."
SCRIPT = {"count": "\n" + ANSWER}      # no metadata line: plain text, 25 tokens and the end
LIMIT = 8                              # the run-tools server's --max-tokens: less than the script
KEY = "test-key"


def user(text="hi"):
    return [{"role": "user", "content": text}]


def app_for(model=TINY, **config):
    """An app over its own copy of the model (an app makes the model generate through its scheduler)."""
    return create_app(glmkit.load(model), ServerConfig(**config))


@pytest.fixture(scope="module")
def api():
    with TestClient(create_app(glmkit.load(TINY), ServerConfig(max_tokens_limit=64,
                                                                scripted_replies=SCRIPT))) as client:
        yield client


@pytest.fixture(scope="module")
def tools_api(tmp_path_factory):
    """Server tools, a console, a --max-tokens below the script's length (the 32k fixture: the
    tools' system prompt alone is longer than the other's context)."""
    data = tmp_path_factory.mktemp("data")
    app = app_for(TINY_32K, max_tokens_limit=LIMIT, scripted_replies=SCRIPT, server_tools=[as_tool(f) for f in BUILTIN],
                  data_dir=data)
    with TestClient(app) as client:
        yield client


def error(r, status, param=None, code=None, says=""):
    """An OpenAI-shaped error body, exactly."""
    assert r.status_code == status, r.text
    body = ErrorResponse.model_validate(r.json()).error
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert (body.param, body.code) == (param, code), r.text
    assert says in body.message and "\n" not in body.message, body.message
    return body


def sse(r) -> list:
    lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(line) for line in lines[:-1]]


# -- error shapes ----------------------------------------------------------------------------------
@pytest.mark.parametrize("raw, says", [
    (b"{not json", "is not valid JSON: Expecting property name"),
    (b'{"messages": [], "temperature": NaN}', "NaN is not a JSON number"),
    (b'{"messages": [{"role": "user", "content": "\\ud800"}]}', "unpaired UTF-16 surrogate"),
    (b'{"messages": 1e999}', "out of range"),
    (b"\xff{}", "not valid UTF-8"),
    (b'[{"role": "user", "content": "hi"}]', "must be a JSON object"),
])
def test_malformed_bodies_are_one_400(api, raw, says):
    for path in ("/v1/chat/completions", "/v1/completions"):
        error(api.post(path, content=raw, headers={"Content-Type": "application/json"}), 400, says=says)


def test_the_console_decodes_bodies_the_same_way(tools_api):
    for path in ("/v1/chat/completions", "/api/conversations"):
        error(tools_api.post(path, content=b'{"title": NaN}', headers={"Content-Type": "application/json"}), 400,
              says="the request body is not valid JSON: NaN is not a JSON number")
        error(tools_api.post(path, content=b'{"title": "x"}', headers={"Content-Type": "text/plain"}), 415,
              says="Content-Type: application/json")


def test_a_body_that_is_not_declared_json_is_415(api):
    for ctype in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {"Content-Type": ctype} if ctype else {}
        error(api.post("/v1/chat/completions", content=json.dumps({"messages": user()}).encode(), headers=headers),
              415, says="Content-Type: application/json")
    assert api.post("/v1/chat/completions", json={"messages": user(), "max_tokens": 1},
                    headers={"Content-Type": "application/vnd.api+json"}).status_code == 200


@pytest.mark.parametrize("body, param", [
    ({"messages": user(), "temperature": -1}, "temperature"),
    ({"messages": user(), "top_p": 0}, "top_p"),
    ({"messages": user(), "seed": 2**64}, "seed"),
    ({"messages": user(), "max_tokens": 0}, "max_tokens"),
    ({"messages": user(), "n": 17}, "n"),
    ({"messages": user(), "stop": ["a"] * 5}, "stop"),
    ({"messages": user(), "presence_penalty": 1}, "presence_penalty"),
    ({"messages": [{"role": "wizard", "content": "x"}]}, "messages[0].role"),
    ({"messages": user(), "tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools[0].function.name"),
    ({}, "messages"),
])
def test_validation_errors_name_the_field(api, body, param):
    error(api.post("/v1/chat/completions", json=body), 400, param=param, says=f"{param}: ")


def test_unknown_model_is_404(api):
    error(api.post("/v1/chat/completions", json={"model": "gpt-4", "messages": user()}), 404, param="model",
          code="model_not_found", says="'gpt-4' not found")
    error(api.get("/v1/models/gpt-4"), 404, code="model_not_found")
    assert api.post("/v1/chat/completions", json={"model": "default", "messages": user(), "max_tokens": 1}
                    ).status_code == 200


def test_context_length_exceeded(api):
    long = "word " * 400          # the fixture's context is 256 tokens
    error(api.post("/v1/chat/completions", json={"messages": user(long), "max_tokens": 1}), 400, param="messages",
          code="context_length_exceeded", says="context limit is 256 tokens")
    error(api.post("/v1/completions", json={"prompt": long, "max_tokens": 1}), 400, param="prompt",
          code="context_length_exceeded")


def test_max_tokens_over_the_server_limit(api):
    error(api.post("/v1/chat/completions", json={"messages": user(), "max_tokens": 65}), 400, param="max_tokens",
          says="max_tokens is limited to 64 on this server")
    error(api.post("/v1/completions", json={"prompt": "a", "max_completion_tokens": 65}), 400, param="max_tokens")


def test_api_keys():
    with TestClient(app_for(api_keys=[KEY, "other"])) as client:
        error(client.get("/v1/models"), 401, code="invalid_api_key", says="API key")
        error(client.get("/v1/models", headers={"Authorization": "Bearer wrong"}), 401, code="invalid_api_key")
        error(client.get("/metrics"), 401, code="invalid_api_key")
        assert client.get("/v1/models", headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
        assert client.get("/v1/models", headers={"X-API-Key": "other"}).status_code == 200
        assert client.get("/health").status_code == 200                    # probes need no key
    with TestClient(app_for(api_keys=[KEY], metrics_public=True)) as client:
        assert client.get("/metrics").status_code == 200
        error(client.get("/v1/models"), 401, code="invalid_api_key")


def test_bodies_over_the_limit_are_413():
    with TestClient(app_for(max_body_bytes=1000)) as client:
        big = {"messages": user("x" * 2000)}
        error(client.post("/v1/chat/completions", json=big), 413, code="body_too_large", says="1000 bytes")

        def chunks():          # no Content-Length: the bytes received are counted
            yield b'{"messages": [{"role": "user", "content": "'
            for _ in range(10):
                yield b"x" * 500
            yield b'"}]}'
        error(client.post("/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"}),
              413, code="body_too_large")
        assert client.get("/health").status_code == 200


def test_a_full_queue_is_429_and_admits_no_choice():
    """No scheduler thread (the TestClient is not started): a sequence queued here stays queued,
    so the queue is full, deterministically."""
    app = app_for(max_batch=1, max_queue=2)
    scheduler = app.state.server.scheduler
    prompt = app.state.server.chat_model.encode_chat(user())
    waiting = scheduler.submit(GenerationRequest(prompt, max_new_tokens=2))
    client = TestClient(app)
    r = client.post("/v1/chat/completions", json={"messages": user(), "max_tokens": 2, "n": 2})
    body = error(r, 429, code="queue_full", says="already waiting")
    assert body.type == "rate_limit_exceeded" and r.headers["Retry-After"]
    assert client.get("/health").json()["waiting"] == 2       # the queued one and the admitted choice
    assert len(list(waiting)) == 2                            # runs the steps in this thread
    list(scheduler.submit(GenerationRequest(prompt, max_new_tokens=1)))
    assert scheduler.stats.cancelled == 1                     # the admitted choice gave its place back
    assert scheduler.queue_length == 0 and scheduler.running == 0


# -- responses validate against their models -------------------------------------------------------
def test_chat_completion_bodies(api):
    r = api.post("/v1/chat/completions", json={"messages": user("count"), "max_tokens": 64, "logprobs": True,
                                               "top_logprobs": 2})
    body = ChatCompletion.model_validate(r.json())
    [choice] = body.choices
    assert choice.message.content == ANSWER and choice.finish_reason == "stop"
    assert "tool_calls" not in r.json()["choices"][0]["message"] and "glmkit_steps" not in r.json()
    assert len(choice.logprobs.content) == body.usage.completion_tokens == 26       # the end token too
    assert all(len(e.top_logprobs) == 2 for e in choice.logprobs.content)
    assert body.usage.total_tokens == body.usage.prompt_tokens + body.usage.completion_tokens


def test_chat_stream_chunks(api):
    body = {"messages": user("count"), "max_tokens": 64, "stream": True}
    chunks = [ChatCompletionChunk.model_validate(c) for c in sse(api.post("/v1/chat/completions", json=body))]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == ANSWER
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].finish_reason for c in chunks if c.choices[0].finish_reason] == ["stop"]
    raw = sse(api.post("/v1/chat/completions", json=body))
    assert all("usage" not in c for c in raw)                 # only with stream_options.include_usage
    raw = sse(api.post("/v1/chat/completions", json={**body, "stream_options": {"include_usage": True}}))
    assert all(c["usage"] is None for c in raw[:-1]) and raw[-1]["choices"] == []
    assert ChatCompletionChunk.model_validate(raw[-1]).usage.completion_tokens == 26


def test_completion_bodies(api):
    r = api.post("/v1/completions", json={"prompt": "The capital", "max_tokens": 3, "n": 2, "seed": 1,
                                          "logprobs": 1, "temperature": 1})
    body = Completion.model_validate(r.json())
    assert [c.index for c in body.choices] == [0, 1] and body.usage.completion_tokens == 6
    assert all(len(c.logprobs.tokens) == 3 and c.finish_reason == "length" for c in body.choices)
    streamed = sse(api.post("/v1/completions", json={"prompt": "The capital", "max_tokens": 3, "n": 2, "seed": 1,
                                                     "temperature": 1, "stream": True}))
    texts = ["".join(c["choices"][0]["text"] for c in streamed if c["choices"][0]["index"] == i) for i in (0, 1)]
    assert texts == [c.text for c in body.choices]            # the same seeds, the same text
    for c in streamed:
        Completion.model_validate(c)


def test_models_and_health(api):
    cards = ModelList.model_validate(api.get("/v1/models").json())
    card = ModelCard.model_validate(api.get(f"/v1/models/{cards.data[0].id}").json())
    assert card == cards.data[0] and card.context_length == card.max_model_len == 256
    assert Health.model_validate(api.get("/health").json()) == Health(model=card.id, running=0, waiting=0)
    paths = api.get("/openapi.json").json()["paths"]
    assert {"/v1/chat/completions", "/v1/completions", "/v1/models"} <= set(paths)
    assert "/v1/embeddings" not in paths and "/api/conversations" not in paths     # not served here


# -- one reply behaviour everywhere -----------------------------------------------------------------
def test_stop_strings_and_max_tokens_match_the_python_api(api):
    model = api.app.state.server.chat_model          # the scripted view the routes use
    for extra, kw in (({"stop": ["42"]}, {"stop": ["42"]}), ({"max_tokens": 5}, {"max_new_tokens": 5})):
        r = ChatCompletion.model_validate(api.post("/v1/chat/completions", json={
            "messages": user("count"), "temperature": 0, "max_tokens": 64, **extra}).json())
        reply = glmkit.Reply()
        text = "".join(ev.text for ev in model.reply(user("count"), **{"max_new_tokens": 64, **kw}, reply=reply,
                                                       temperature=0) if ev.kind == "text")
        assert (r.choices[0].message.content, r.choices[0].finish_reason, r.usage.completion_tokens) == \
            (text, reply.finish_reason, reply.completion_tokens)
    assert text == "The answer is" and reply.finish_reason == "length"
    stopped = api.post("/v1/chat/completions", json={"messages": user("count"), "stop": "42", "stream": True})
    assert "".join(c["choices"][0]["delta"].get("content", "") for c in sse(stopped)) == "The answer is "


def run_tools(client, **extra):
    return client.post("/v1/chat/completions", json={"messages": user("count"), "glmkit_run_tools": True,
                                                     "temperature": 0, **extra})


def test_run_tools_honours_max_tokens(tools_api):
    full = ChatCompletion.model_validate(run_tools(tools_api).json())      # the server's --max-tokens
    assert full.usage.completion_tokens == LIMIT and full.choices[0].finish_reason == "length"
    assert ANSWER.startswith(full.choices[0].message.content) and full.glmkit_steps == []
    short = ChatCompletion.model_validate(run_tools(tools_api, max_tokens=4).json())
    assert short.usage.completion_tokens == 4 and short.choices[0].message.content == "The answer"
    plain = tools_api.post("/v1/chat/completions", json={"messages": user("count"), "temperature": 0,
                                                         "max_tokens": 4}).json()
    assert plain["choices"][0]["message"] == short.choices[0].message.model_dump(exclude_none=True)
    stopped = ChatCompletion.model_validate(run_tools(tools_api, stop=["answer"]).json())
    assert stopped.choices[0].message.content == "The " and stopped.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("bad", [
    {"max_tokens": LIMIT + 1}, {"max_completion_tokens": 10**6}, {"max_tokens": 0}, {"presence_penalty": 0.5},
    {"frequency_penalty": -1}, {"temperature": 3}, {"top_p": 0}, {"top_k": -1}, {"repetition_penalty": 0},
    {"seed": 2**64}, {"stop": ["a"] * 5}, {"stop": "x" * 257},
], ids=lambda b: "-".join(map(str, b)))
def test_run_tools_refuses_what_a_plain_request_refuses(tools_api, bad):
    plain = tools_api.post("/v1/chat/completions", json={"messages": user("count"), "temperature": 0, **bad})
    tools = run_tools(tools_api, **bad)
    error(plain, 400, param=next(iter(bad)) if "max_completion" not in str(bad) else "max_tokens")
    assert (tools.status_code, tools.json()) == (plain.status_code, plain.json())


def test_the_console_answers_through_the_same_reply(tools_api):
    cid = tools_api.post("/api/conversations", json={"settings": {"temperature": 0}}).json()["id"]
    r = tools_api.post(f"/api/conversations/{cid}/messages", json={"content": "count",
                                                                   "settings": {"max_new_tokens": 4}})
    events = sse_console(r)
    assert "".join(e["text"] for e in events if e["type"] == "text") == "The answer"
    done = events[-1]       # the final event carries the turn's usage
    assert done["type"] == "done" and 0 < done["usage"]["completion_tokens"] <= 4 and done["usage"]["prompt_tokens"] > 0
    error(tools_api.post(f"/api/conversations/{cid}/messages", json={"content": "x", "settings": {"top_p": 0}}), 400,
          param="settings.top_p")


def sse_console(r) -> list:
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]


def test_only_the_wiring_needs_torch():
    """Routes, models, errors, the console: importable without torch (only create_app's scheduler needs it)."""
    code = ("import sys; import glmkit.server.openai_routes, glmkit.server.console, glmkit.server.embeddings, "
            "glmkit.server.run_tools, glmkit.server.middleware, glmkit.server.completions; "
            "print('torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=Path(__file__).parent)
    assert out.returncode == 0 and out.stdout.strip() == "False", out.stderr


def test_a_conversations_next_turn_reuses_its_prefix():
    """The API's second turn extends the first: its history's keys and values are reused (the
    scheduler's prefix cache), counted at /metrics, and the reply is the one a cold server gives."""
    def hits(client):
        line = next(x for x in client.get("/metrics").text.splitlines()
                    if x.startswith("glmkit_prefix_cache_hit_tokens_total "))
        return int(line.split()[1])

    system = {"role": "system", "content": "你是一个乐于助人的助手，回答要简洁。" * 3}
    first = [system, {"role": "user", "content": "你好"}]
    replies = {}
    for cold in (True, False):
        app = app_for(TINY)
        if cold:
            app.state.server.scheduler.prefix.enabled = False
        with TestClient(app) as client:
            a = client.post("/v1/chat/completions", json={"model": "default", "messages": first, "max_tokens": 12,
                                                           "temperature": 0}).json()
            second = first + [a["choices"][0]["message"], {"role": "user", "content": "再说一遍"}]
            b = client.post("/v1/chat/completions", json={"model": "default", "messages": second, "max_tokens": 12,
                                                           "temperature": 0}).json()
            replies[cold] = (a["choices"][0]["message"]["content"], b["choices"][0]["message"]["content"])
            reused = hits(client)
            assert reused == 0 if cold else reused >= a["usage"]["prompt_tokens"]
    assert replies[True] == replies[False]
