"""The OpenAI-compatible server: a real `glmkit serve` on loopback, the real `openai` SDK."""

import concurrent.futures as cf
import time

import httpx
import openai
import pytest

from conftest import TINY
from server_helpers import running_server

FRANCE = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def smol_server():
    with running_server("--max-batch", "4", "--threads", "2") as (base, proc):
        yield base


@pytest.fixture(scope="module")
def client(smol_server):
    return openai.OpenAI(base_url=smol_server + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_and_health(client, smol_server):
    models = client.models.list().data
    assert len(models) == 1 and models[0].id.startswith("SmolLM2-135M-Instruct")
    card = httpx.get(smol_server + "/v1/models").json()["data"][0]
    assert card["context_length"] >= 1024
    assert httpx.get(smol_server + "/health").json()["status"] == "ok"


def test_chat_non_stream_answers_paris(client):
    r = client.chat.completions.create(model="default", messages=FRANCE, temperature=0, max_tokens=30)
    c = r.choices[0]
    assert "Paris" in c.message.content and c.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 10 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_chat_stream_equals_non_stream(client):
    full = client.chat.completions.create(model="default", messages=FRANCE, temperature=0, max_tokens=30)
    chunks = list(client.chat.completions.create(model="default", messages=FRANCE, temperature=0, max_tokens=30,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == full.choices[0].message.content
    finals = [ch.choices[0].finish_reason for ch in chunks if ch.choices and ch.choices[0].finish_reason]
    assert finals == [full.choices[0].finish_reason]
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_one_token_answer_streams(client):
    chunks = list(client.chat.completions.create(model="default", messages=FRANCE, temperature=0, max_tokens=1,
                                                 stream=True))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text.strip() and chunks[-1].choices[0].finish_reason == "length"


def test_n_stop_seed_logprobs(client):
    r = client.chat.completions.create(model="default", messages=FRANCE, n=2, temperature=1.0, seed=5, max_tokens=20)
    assert [c.index for c in r.choices] == [0, 1]
    again = client.chat.completions.create(model="default", messages=FRANCE, n=2, temperature=1.0, seed=5, max_tokens=20)
    assert [c.message.content for c in r.choices] == [c.message.content for c in again.choices]
    stopped = client.chat.completions.create(model="default", messages=FRANCE, temperature=0, max_tokens=30, stop=["Paris"])
    assert "Paris" not in stopped.choices[0].message.content and stopped.choices[0].finish_reason == "stop"
    lp = client.chat.completions.create(model="default", messages=FRANCE, temperature=0, max_tokens=5,
                                        logprobs=True, top_logprobs=3)
    entries = lp.choices[0].logprobs.content
    assert len(entries) == lp.usage.completion_tokens
    assert all(len(e.top_logprobs) == 3 and e.logprob <= 0 for e in entries)
    assert entries[0].logprob == pytest.approx(entries[0].top_logprobs[0].logprob)  # greedy took the best


def test_completions_endpoint(client):
    r = client.completions.create(model="default", prompt="The capital of France is", max_tokens=5, temperature=0)
    assert r.choices[0].text and r.usage.prompt_tokens > 0


def test_embeddings(client):
    r = client.embeddings.create(model="default", input=["a cat", "a kitten", "stock prices fell"])
    v = [d.embedding for d in r.data]
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731
    assert len(v[0]) == 384 and abs(dot(v[0], v[0]) - 1) < 1e-4
    assert dot(v[0], v[1]) > dot(v[0], v[2])


def test_errors_are_openai_shaped(smol_server, client):
    bad = httpx.post(smol_server + "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request_error"
    assert "X-Request-Id" in bad.headers
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="default", messages=[{"role": "wizard", "content": "x"}])
    with pytest.raises(openai.BadRequestError, match="context"):
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": "word " * 20000}])
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="gpt-4", messages=FRANCE)
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="default", messages=FRANCE, temperature=-1)
    assert httpx.get(smol_server + "/health").status_code == 200   # still up


def test_concurrent_streams_equal_solo_output():
    """Batched = unbatched, in float32 on the ChatGLM3 fixture (whose greedy top-1 margins are
    known to be safe, tests/fixtures/README.md).  In bf16 the 1-row and n-row matmul kernels round
    differently, so near-ties may go either way; that is arithmetic, not batching."""
    prompts = [[{"role": "user", "content": q}] for q in ("你好", "What is the capital of China?", "写一首诗", "1+1=?")]
    with running_server("--model", str(TINY), "--max-batch", "4", "--dtype", "float32") as (base, _):
        client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
        solo = [client.chat.completions.create(model="default", messages=p, temperature=0, max_tokens=40)
                .choices[0].message.content for p in prompts]

        def stream(p):
            return "".join(ch.choices[0].delta.content or "" for ch in client.chat.completions.create(
                model="default", messages=p, temperature=0, max_tokens=40, stream=True) if ch.choices)

        with cf.ThreadPoolExecutor(4) as pool:
            together = list(pool.map(stream, prompts))
        m = httpx.get(base + "/metrics").text
    assert together == solo
    assert all(solo)
    assert "glmkit_generated_tokens_total" in m


def test_disconnect_frees_the_slot(smol_server):
    body = {"model": "default", "messages": [{"role": "user", "content": "Write a very long story."}],
            "max_tokens": 2000, "stream": True, "temperature": 0.8}
    with httpx.stream("POST", smol_server + "/v1/chat/completions", json=body, timeout=60) as r:
        for i, _ in enumerate(r.iter_lines()):
            if i > 5:
                break
    wait_for_health(smol_server, running=0, waiting=0, timeout=20)
    m = httpx.get(smol_server + "/metrics").text
    assert "glmkit_cancelled_total" in m and "glmkit_time_to_first_token_seconds_bucket" in m


def test_api_keys_and_overload():
    keys_env = {"GLMKIT_API_KEYS": "k-one,k-two"}
    import os
    with running_server("--max-batch", "1", "--max-queue", "1", "--no-embeddings", "--no-console",
                        env={**os.environ, **keys_env}) as (base, _):
        anon = httpx.post(base + "/v1/chat/completions", json={"model": "default", "messages": FRANCE})
        assert anon.status_code == 401 and anon.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=base + "/v1", api_key="k-two", max_retries=0)
        assert ok.models.list().data[0].id.startswith("SmolLM2-135M-Instruct")
        # one slot, one queue place: with one request running and one waiting, the next is turned away
        # with 429.  The running request must hold its slot while /health is polled: ignore_eos and
        # 4000 tokens keep it decoding for many seconds on any CPU (a short reply could end, and the
        # waiting one run and end, before the poll; CI once saw exactly that).  Closing a stream
        # cancels its request, so nothing runs on after each step.
        hdr = {"Authorization": "Bearer k-one"}
        long = {"model": "default", "messages": FRANCE, "max_tokens": 4000, "temperature": 0,
                "ignore_eos": True, "stream": True}
        with httpx.Client(base_url=base, headers=hdr, timeout=120) as c:
            with c.stream("POST", "/v1/chat/completions", json=long):
                wait_for_health(base, running=1, waiting=0)
                with c.stream("POST", "/v1/chat/completions", json=long):
                    wait_for_health(base, running=1, waiting=1)
                    busy = c.post("/v1/chat/completions", json={"model": "default", "messages": FRANCE,
                                                                "max_tokens": 1})
                    still = httpx.get(base + "/health").json()
            assert busy.status_code == 429, busy.text
            assert (still["running"], still["waiting"]) == (1, 1)     # the queue was full the whole time
            assert busy.headers["Retry-After"] and busy.json()["error"]["code"] == "queue_full"
            wait_for_health(base, running=0, waiting=0)              # both streams closed: their places freed
            again = c.post("/v1/chat/completions", json={"model": "default", "messages": FRANCE, "max_tokens": 1})
            assert again.status_code == 200, again.text


def wait_for_health(base, running, waiting, timeout=60):
    """Until /health reports these scheduler counts (sequences in the batch, and queued)."""
    deadline = time.time() + timeout
    while True:
        h = httpx.get(base + "/health").json()
        if (h["running"], h["waiting"]) == (running, waiting):
            return
        assert time.time() < deadline, f"/health still says {h}, not running={running} waiting={waiting}"
        time.sleep(0.02)


def test_content_parts(client):
    parts = [{"type": "text", "text": "What is the capital "}, {"type": "text", "text": "of France?"}]
    r = client.chat.completions.create(model="default", messages=[{"role": "user", "content": parts}],
                                       temperature=0, max_tokens=20)
    assert "Paris" in r.choices[0].message.content
    image = [{"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}]
    with pytest.raises(openai.BadRequestError, match="only text content parts"):
        client.chat.completions.create(model="default", messages=[{"role": "user", "content": image}])


def test_sigterm_lets_a_running_stream_finish_then_exits_cleanly():
    """glmkit serve runs the engine in its main thread and HTTP in another (cli/serve.py): a
    SIGTERM must still end it as uvicorn alone did, the answer being streamed finishing first."""
    import signal
    import threading
    with running_server("--no-embeddings", "--no-console", "--threads", "2") as (base, proc):
        got = {}

        def stream():
            with httpx.stream("POST", base + "/v1/chat/completions", timeout=120,
                              json={"messages": [{"role": "user", "content": "Write a long story about the sea."}],
                                    "stream": True, "max_tokens": 40, "temperature": 0,
                                    "stream_options": {"include_usage": True}}) as r:
                got["lines"] = [line for line in r.iter_lines() if line.startswith("data: ")]

        t = threading.Thread(target=stream)
        t.start()
        deadline = time.monotonic() + 60
        while "glmkit_generated_tokens_total 0" in httpx.get(base + "/metrics").text:   # under way
            assert time.monotonic() < deadline
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        t.join(timeout=120)
        assert proc.wait(timeout=60) == 0
        assert got["lines"][-1] == "data: [DONE]" and '"completion_tokens":40' in got["lines"][-2].replace(" ", "")


def test_a_port_in_use_is_one_clear_error_not_a_hang(smol_server):
    import subprocess

    from conftest import glmkit_bin
    port = smol_server.rsplit(":", 1)[1]
    proc = subprocess.run([glmkit_bin(), "serve", "--port", port, "--no-embeddings", "--no-console"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "address already in use" in proc.stderr.lower()


def test_response_format_constrains_the_reply(client):
    """json_schema and json_object replies always parse and match (decoding is constrained), at
    temperature 1, streamed and not; a schema the grammar library cannot compile is a 400."""
    import json

    import jsonschema
    schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "population": {"type": "integer", "minimum": 0},
                                               "tags": {"type": "array", "items": {"enum": ["big", "old"]}, "maxItems": 2}},
              "required": ["city", "population", "tags"], "additionalProperties": False}
    fmt = {"type": "json_schema", "json_schema": {"name": "city", "schema": schema, "strict": True}}
    r = client.chat.completions.create(model="default", messages=FRANCE, temperature=1.0, n=3, max_tokens=80,
                                       response_format=fmt)
    for c in r.choices:     # a reply cut at max_tokens is incomplete (finish_reason says so), not an error
        if c.finish_reason == "stop":
            jsonschema.validate(json.loads(c.message.content), schema)
        else:
            assert c.finish_reason == "length" and c.message.content.startswith("{")
    cut = client.chat.completions.create(model="default", messages=FRANCE, max_tokens=3, response_format=fmt)
    assert cut.choices[0].finish_reason == "length" and cut.choices[0].message.content.startswith("{")
    chunks = client.chat.completions.create(model="default", messages=FRANCE, temperature=1.0, max_tokens=80,
                                            response_format={"type": "json_object"}, stream=True)
    chunks = [c.choices[0] for c in chunks if c.choices]
    text, finish = "".join(c.delta.content or "" for c in chunks), chunks[-1].finish_reason
    assert isinstance(json.loads(text), dict) if finish == "stop" else (finish == "length" and text.startswith("{"))
    bad = {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "string", "pattern": "(?<=a)b"}}}
    with pytest.raises(openai.BadRequestError, match="cannot be used to constrain"):
        client.chat.completions.create(model="default", messages=FRANCE, response_format=bad)


def test_strict_tool_arguments_always_match_the_schema(client):
    """A named tool with strict: true: the call's arguments are decoded under its schema."""
    import json

    import jsonschema
    params = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                               "unit": {"enum": ["celsius", "fahrenheit"]},
                                               "days": {"type": "integer", "minimum": 1, "maximum": 7}},
              "required": ["city", "unit", "days"], "additionalProperties": False}
    tool = {"type": "function", "function": {"name": "forecast", "parameters": params, "strict": True}}
    r = client.chat.completions.create(model="default", messages=FRANCE, temperature=1.0, n=3, max_tokens=60,
                                       tools=[tool], tool_choice={"type": "function", "function": {"name": "forecast"}})
    for c in r.choices:
        [call] = c.message.tool_calls
        assert call.function.name == "forecast" and c.finish_reason == "tool_calls"
        jsonschema.validate(json.loads(call.function.arguments), params)


def test_tokenize_and_detokenize(smol_server):
    """llama.cpp server's /tokenize and /detokenize: text typed as a special token stays text."""
    text = "Hello <|im_start|> wörld 🙂"
    ids = httpx.post(smol_server + "/tokenize", json={"content": text}).json()["tokens"]
    assert 1 not in ids and len(ids) > 5                   # 1 is <|im_start|>
    assert httpx.post(smol_server + "/detokenize", json={"tokens": ids}).json()["content"] == text
    pieces = httpx.post(smol_server + "/tokenize", json={"content": "Hi 🙂", "with_pieces": True}).json()["tokens"]
    assert [p["id"] for p in pieces] == httpx.post(smol_server + "/tokenize", json={"content": "Hi 🙂"}).json()["tokens"]
    assert pieces[0]["piece"] == "Hi"
    r = httpx.post(smol_server + "/detokenize", json={"tokens": [10**9]})
    assert r.status_code == 400 and "outside the vocabulary" in r.json()["error"]["message"]
    assert httpx.post(smol_server + "/detokenize", json={"tokens": [1, *ids, 2]}).json()["content"] == text
