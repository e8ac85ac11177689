"""Hostile API input against a real `glmkit serve` on loopback: every bad request is a clear
OpenAI-shaped 4xx, nothing a client sends makes the server reach the network, and nothing stalls
the event loop (/health keeps answering while the hostile request runs)."""

import json
import re
import secrets
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from conftest import TINY, TINY_32K
from server_helpers import running_server

KEY = "hostile-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}
HEALTHY_S = 2.0       # /health while a hostile request runs (the stalls were 5-15 s; a shared CI box needs slack)
SCRIPT = {            # TESTING ONLY: these user messages get these replies, token by token
    "json please": '{"a": 1}',
    "call f": 'f\n ```python\ntool_call(a=1)\n```',
    "count": "\nThe answer is 42. Done, and a few more words.",   # no metadata line: the text streams
    "not json": "plain words",
}


def user(text="hi"):
    return [{"role": "user", "content": text}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    d = tmp_path_factory.mktemp("hostile")
    (d / "script.json").write_text(json.dumps(SCRIPT), encoding="utf-8")
    with running_server("--model", str(TINY_32K), "--dtype", "float32", "--no-embeddings", "--data-dir", str(d / "data"),
                        "--tools", "builtin", "--max-tokens", "64", "--api-key", KEY,
                        "--scripted-replies", str(d / "script.json")) as (base, _):
        yield base


@pytest.fixture(scope="module")
def api(server):
    with httpx.Client(base_url=server, headers=AUTH, timeout=60) as c:
        yield c


def healthy_while(base, fn):
    """Run fn() in a thread while polling /health: (fn's result, slowest /health in seconds)."""
    with ThreadPoolExecutor(1) as pool:
        fut, worst = pool.submit(fn), 0.0
        while True:
            t = time.perf_counter()
            assert httpx.get(base + "/health", timeout=30).status_code == 200
            worst = max(worst, time.perf_counter() - t)
            if fut.done():
                return fut.result(), worst
            time.sleep(0.05)


def assert_400(r, field):
    assert r.status_code == 400, r.text
    err = r.json()["error"]
    assert err["type"] == "invalid_request_error" and field in err["message"] and field in (err["param"] or ""), err
    return err


# -- D3: a client's schema never makes the server connect anywhere --------------------------------------
def test_remote_ref_is_refused_without_any_connection(server, api):
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)
    listener.setblocking(False)
    ref = {"$ref": f"http://127.0.0.1:{listener.getsockname()[1]}/s.json"}
    tools = dict(messages=user("call f"), tools=[
        {"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {"a": ref}}}}])
    bodies = [   # each reply is scripted so that it would be validated against the schema
        ("response_format.json_schema.schema", dict(messages=user("json please"), response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": ref}})),
        ("tools[0].function.parameters", tools),
        ("tools[0].function.parameters", dict(tools, glmkit_run_tools=True)),   # the agent's own check
    ]
    try:
        for field, body in bodies:
            r, slowest = healthy_while(server, lambda: api.post("/v1/chat/completions", timeout=20,
                                                                 json=dict(body, max_tokens=32, temperature=0)))
            assert "nothing is fetched" in assert_400(r, field)["message"]
            assert slowest < HEALTHY_S
        with pytest.raises(BlockingIOError):
            listener.accept()            # nobody connected
    finally:
        listener.close()
    # local references keep working
    local = {"$defs": {"n": {"type": "integer"}}, "type": "object", "properties": {"a": {"$ref": "#/$defs/n"}}}
    r = api.post("/v1/chat/completions", json={"messages": user("json please"), "max_tokens": 32, "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": local}}})
    assert r.status_code == 200 and json.loads(r.json()["choices"][0]["message"]["content"]) == {"a": 1}, r.text


def test_schema_bounds(api):
    deep = {}
    for _ in range(40):
        deep = {"type": "object", "properties": {"a": deep}}
    wide = {"type": "object", "properties": {f"p{i}": {"type": "string"} for i in range(3000)}}
    defs = {f"a{i}": {"allOf": [{"$ref": f"#/$defs/a{i + 1}"}] * 2} for i in range(30)}
    exponential = {"$defs": {**defs, "a30": {"type": "string"}}, "$ref": "#/$defs/a0"}
    for schema, why in [(deep, "deeper than 32"), (wide, "objects and arrays"), (exponential, "expands to more"),
                        ({"type": 5}, "invalid")]:
        r = api.post("/v1/chat/completions", json={"messages": user(), "max_tokens": 1, "tools": [
            {"type": "function", "function": {"name": "f", "parameters": schema}}]})
        assert why in assert_400(r, "tools[0].function.parameters")["message"]


# -- D4: stop strings are bounded and cheap ---------------------------------------------------------------
def test_long_stop_strings_are_refused_and_never_stall(server, api):
    body = {"messages": user("count"), "max_tokens": 5, "stop": ["x" * 200_000, "y" * 200_000]}
    r, slowest = healthy_while(server, lambda: api.post("/v1/chat/completions", json=body))
    assert_400(r, "stop")
    assert slowest < HEALTHY_S
    assert_400(api.post("/v1/completions", json={"prompt": "a", "stop": ["a", "b", "c", "d", "e"]}), "stop")
    # at the bounds: four stop strings of 256 characters, one of them met
    r = api.post("/v1/chat/completions", json={"messages": user("count"), "max_tokens": 32,
                                               "stop": ["42"] + ["é" * 255 + c for c in "xyz"]})
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    assert c["message"]["content"] == "The answer is " and c["finish_reason"] == "stop"


# -- D5: the body limit counts the bytes actually received ----------------------------------------------
def test_chunked_body_over_the_limit_is_413(server, api):
    def chunks():          # 6 MiB, no Content-Length: httpx sends it chunked
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(6 * 64):
            yield b"a" * (16 << 10)
        yield b'"}], "max_tokens": 1}'

    r, slowest = healthy_while(server, lambda: api.post(
        "/v1/chat/completions", content=chunks(), headers={"Content-Type": "application/json"}))
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large", r.text[:300]
    assert slowest < HEALTHY_S
    r = api.post("/v1/chat/completions", content=b" " * (2 << 20), headers={"Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "body_too_large"
    assert httpx.get(server + "/health").status_code == 200


# -- D6: bad input is a 400 naming the field, never a 500 ------------------------------------------------
def _assistant_call(function):
    return {"messages": user() + [{"role": "assistant", "tool_calls": [
        {"id": "c1", "type": "function", "function": function}]}], "max_tokens": 1}


ARGS = "messages[1].tool_calls[0].function"
BAD = [
    ("/v1/chat/completions", {"messages": user(), "max_tokens": 1, "seed": 2**64}, "seed"),
    ("/v1/chat/completions", {"messages": user(), "max_tokens": 1, "seed": -2**63 - 1}, "seed"),
    ("/v1/completions", {"prompt": "a", "max_tokens": 1, "seed": 2**64}, "seed"),
    ("/v1/chat/completions", {"messages": user(), "tools": [{"type": "function", "function": {"name": ["x"]}}]},
     "tools[0].function.name"),
    ("/v1/chat/completions", {"messages": user(), "tools": [{"type": "function", "function": {"name": "x",
                                                                                            "parameters": 5}}]},
     "tools[0].function.parameters"),
    ("/v1/chat/completions", _assistant_call({"name": "x", "arguments": {"a": 1}}), ARGS + ".arguments"),
    ("/v1/chat/completions", _assistant_call("x"), ARGS),
    ("/v1/chat/completions", _assistant_call({"name": "x", "arguments": "1" * 5000}), ARGS + ".arguments"),
    ("/v1/chat/completions", _assistant_call({"name": "x", "arguments": "[" * 50000}), ARGS + ".arguments"),
    ("/v1/chat/completions", _assistant_call({"name": "x", "arguments": '{"a": 1e999}'}), ARGS + ".arguments"),
    ("/v1/chat/completions", {"messages": user(), "tool_choice": {"function": "x"}}, "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text", "text": 5}]}]},
     "messages[0].content"),
]


@pytest.mark.parametrize("path,body,field", BAD, ids=[f"{i}-{b[2]}" for i, b in enumerate(BAD)])
def test_bad_fields_are_400s(api, path, body, field):
    assert_400(api.post(path, json=body), field)


MSG = '{"messages": [{"role": "user", "content": "hi"}], '


@pytest.mark.parametrize("raw,why", [
    (MSG + '"temperature": NaN}', "NaN is not a JSON number"),
    (MSG + '"top_p": Infinity}', "Infinity is not a JSON number"),
    (MSG + '"response_format": {"type": "json_schema", "json_schema": {"schema": {"maximum": -Infinity}}}}',
     "-Infinity is not a JSON number"),
    (MSG + '"response_format": {"type": "json_schema", "json_schema": {"schema": {"maximum": 1e999}}}}',
     "out of range"),
    (MSG + '"max_tokens": ' + "9" * 5000 + "}", "too many digits"),
    (MSG + '"user": "\\ud800"}', "unpaired UTF-16 surrogate"),
    ('{"prompt": "\\udfff x"}', "unpaired UTF-16 surrogate"),
], ids=["nan", "inf", "neg-inf-in-schema", "overflow", "digits", "surrogate", "surrogate-completions"])
def test_malformed_json_is_a_400(api, raw, why):
    path = "/v1/completions" if "prompt" in raw else "/v1/chat/completions"
    r = api.post(path, content=raw, headers={"Content-Type": "application/json"})
    assert r.status_code == 400 and why in r.json()["error"]["message"], r.text


# -- D10: /metrics is bounded, parseable, leak-free and behind the key ------------------------------------
_LABEL = r'[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\[\\"n])*"'
_SAMPLE = re.compile(rf'^([a-zA-Z_:][a-zA-Z0-9_:]*)(\{{{_LABEL}(?:,{_LABEL})*\}})? (-?[0-9.e+-]+|[+-]Inf|NaN)$')
_META = re.compile(r"^# (HELP [a-zA-Z_:][a-zA-Z0-9_:]* .*|TYPE [a-zA-Z_:][a-zA-Z0-9_:]* "
                   r"(counter|gauge|histogram|summary|untyped))$")


def http_series(text: str) -> set[str]:
    """Strictly parse a text exposition; the label sets of glmkit_http_requests_total."""
    assert text.endswith("\n")
    series = set()
    for line in text[:-1].split("\n"):
        if line.startswith("#"):
            assert _META.match(line), line
            continue
        m = _SAMPLE.match(line)
        assert m, f"unparseable sample line: {line!r}"
        if m.group(1) == "glmkit_http_requests_total":
            series.add(m.group(2))
    return series


def test_metrics_are_bounded_and_leak_nothing(server, api):
    cid = api.post("/api/conversations", json={"title": "t"}).json()["id"]
    api.get(f"/api/conversations/{cid}")
    api.get(f"/api/conversations/{cid}/files/secret-report-77.csv")
    api.get("/v1/zz%22%7D%201e9")
    api.get("/v1/zz%0Abroken")
    httpx.get(server + f"/v1/models/{secrets.token_hex(4)}")          # a 401
    before = http_series(api.get("/metrics").text)
    for _ in range(200):
        api.get(f"/v1/{secrets.token_hex(6)}")
        api.get(f"/{secrets.token_hex(6)}")
    text = api.get("/metrics").text
    assert http_series(text) == before | {'{path="/metrics",status="200"}'}
    assert cid not in text and "secret-report" not in text and "zz" not in text
    assert '{path="/api/conversations/{cid}",status="200"}' in text
    assert '{path="/v1/models/{name}",status="401"}' in text and '{path="other",status="404"}' in text


def test_metrics_need_the_key_unless_public(server):
    assert httpx.get(server + "/metrics").status_code == 401
    assert httpx.get(server + "/metrics", headers=AUTH).status_code == 200
    assert httpx.get(server + "/health").status_code == 200            # stays open for probes
    with running_server("--model", str(TINY), "--dtype", "float32", "--no-embeddings", "--no-console",
                        "--api-key", KEY, "--metrics-public") as (base, _):
        r = httpx.get(base + "/metrics")
        assert r.status_code == 200 and http_series(r.text)
        assert httpx.get(base + "/v1/models").status_code == 401


# -- D11: glmkit_run_tools checks and honours the sampling fields ---------------------------------------
def run_tools(api, text, **extra):
    return api.post("/v1/chat/completions", json={"messages": user(text), "glmkit_run_tools": True,
                                                  "temperature": 0, **extra})


def test_run_tools_validates_like_any_request(api):
    err = assert_400(run_tools(api, "count", max_tokens=100_000), "max_tokens")
    assert err["message"] == "max_tokens is limited to 64 on this server"
    assert_400(run_tools(api, "count", presence_penalty=1), "presence_penalty")
    assert_400(run_tools(api, "count", stop=["a"] * 5), "stop")
    full = run_tools(api, "count", max_tokens=32).json()
    assert full["choices"][0]["message"]["content"] == "The answer is 42. Done, and a few more words."
    r = run_tools(api, "count", stop=["42"], max_tokens=32)
    assert r.status_code == 200, r.text
    c = r.json()["choices"][0]
    assert c["message"]["content"] == "The answer is " and c["finish_reason"] == "stop"
    assert r.json()["usage"]["completion_tokens"] < full["usage"]["completion_tokens"]    # generation ended there
    r = run_tools(api, "not json", response_format={"type": "json_object"}, max_tokens=16)
    assert r.status_code == 422 and r.json()["error"]["code"] == "json_validation_failed", r.text
    r = run_tools(api, "json please", max_tokens=16, response_format={"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "object", "required": ["a"]}}})
    assert r.status_code == 200 and json.loads(r.json()["choices"][0]["message"]["content"]) == {"a": 1}, r.text


# -- fuzzing: no input the OpenAPI document allows (or nearly allows) is a 5xx -----------------------------
def test_fuzzed_requests_never_get_a_server_error(server, tmp_path):
    """schemathesis over every operation (auth sent; generation is cheap: --max-tokens 64, tiny model).
    The suite's one fuzz run: it was the slowest test (about 100 s at 30 examples an operation), and
    the coverage phase already sends each operation's boundary values."""
    proc = subprocess.run(
        [str(Path(sys.executable).with_name("schemathesis")), "run", server + "/openapi.json", "-H",
         f"Authorization: Bearer {KEY}", "--checks", "not_a_server_error", "--max-examples", "12",
         "--request-timeout", "60", "--generation-deterministic", "--phases", "examples,coverage,fuzzing"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0 and "generated" in out and "Server error" not in out, out[-4000:]


def test_developer_role_is_the_system_message(api):
    """OpenAI's newer clients send the system prompt as role "developer": the same prompt ids."""
    def usage(role):
        body = {"model": "default", "max_tokens": 1, "temperature": 0,
                "messages": [{"role": role, "content": "Be brief."}, *user()]}
        r = api.post("/v1/chat/completions", json=body)
        assert r.status_code == 200, r.text
        return r.json()["usage"]["prompt_tokens"]
    assert usage("developer") == usage("system")
