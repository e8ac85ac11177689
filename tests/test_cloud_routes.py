"""Cloud chat models, fallback routes and private_only (`glmkit serve --models FILE`).

Real processes on loopback, the real `openai` client: a second `glmkit serve` stands in for the
cloud service (it wants its own API key, and forces one tool call by script), another is an
engine the gateway generates through, and the gateway serves a model of its own, that engine's
model, and the cloud's, with `routes.fallback: {gpu: cloud}`.  The cloud's key reaches the gateway
only through the environment variable the models file names."""

import json
import os
import re
import time

import httpx
import openai
import pytest

from conftest import TINY, TINY_32K
from server_helpers import running_server

COMMON = ("--no-console", "--no-embeddings", "--dtype", "float32")
HI = [{"role": "user", "content": "你好，介绍一下你自己"}]
TRACK = {"type": "function", "function": {"name": "track", "description": "追踪指定股票的实时价格",
                                           "parameters": {"type": "object",
                                                          "properties": {"symbol": {"type": "string"}}}}}
ASK = [{"role": "user", "content": "帮我查询股票10111的价格"}]
SCRIPT = {ASK[0]["content"]: 'track\n ```python\ntool_call(symbol="10111")\n```'}
CLOUD_KEY = "cloud-secret-4f1c9a"          # the stand-in cloud's own key
KEYS = "open-key\npriv-key private_only\n"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(gateway URL, cloud URL, the engine's process)."""
    d = tmp_path_factory.mktemp("cloud")
    (d / "script.json").write_text(json.dumps(SCRIPT, ensure_ascii=False), encoding="utf-8")
    (d / "keys").write_text(KEYS, encoding="utf-8")
    with running_server("--model", str(TINY_32K), "--api-key", CLOUD_KEY, "--scripted-replies",
                        str(d / "script.json"), *COMMON) as (cloud, _), \
            running_server("--model", str(TINY_32K), "--max-tokens", "30000", *COMMON) as (engine, engine_proc):
        (d / "models.yaml").write_text(f"""
models:
  local: {{path: {TINY}}}
  gpu: {{engine: {engine}, kind: glmkit, path: {TINY_32K}}}
  cloud: {{openai: {cloud}/v1, model: default, api_key_env: TEST_CLOUD_KEY}}
  cloud-badkey: {{openai: {cloud}/v1, model: default, api_key_env: TEST_WRONG_KEY}}
routes:
  default: local
  fallback: {{gpu: cloud}}
""", encoding="utf-8")
        env = {**os.environ, "TEST_CLOUD_KEY": CLOUD_KEY, "TEST_WRONG_KEY": "wrong-key-77aa"}
        with running_server("--models", str(d / "models.yaml"), "--api-key-file", str(d / "keys"), *COMMON,
                            "--max-tokens", "30000",
                            env=env) as (gateway, _):
            yield gateway, cloud, engine_proc


def client(base, key="open-key"):
    return openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0)


def served_by(raw) -> str:
    return raw.headers["x-glmkit-served-by"]


def fallbacks(gateway) -> dict:
    text = httpx.get(gateway + "/metrics", headers={"Authorization": "Bearer open-key"}, timeout=10).text
    return {(a, b, c): int(n) for a, b, c, n in
            re.findall(r'^glmkit_fallbacks_total\{from="([^"]+)",to="([^"]+)",reason="([^"]+)"\} (\d+)$', text, re.M)}


def test_cloud_passes_through(setup):
    """What the cloud answers itself, the gateway answers for `cloud`: whole, streamed, with tools."""
    gateway, cloud, _ = setup
    direct = client(cloud, CLOUD_KEY).chat.completions.create(model="default", messages=HI, max_tokens=12,
                                                              temperature=0)
    raw = client(gateway).chat.completions.with_raw_response.create(model="cloud", messages=HI, max_tokens=12,
                                                                    temperature=0)
    r = raw.parse()
    assert served_by(raw) == "cloud" and r.model == "cloud"
    assert r.choices[0].message.content == direct.choices[0].message.content and r.usage.completion_tokens > 0
    chunks = list(client(gateway).chat.completions.create(model="cloud", messages=HI, max_tokens=12, temperature=0,
                                                          stream=True))
    assert {c.model for c in chunks} == {"cloud"}
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == direct.choices[0].message.content
    # the cloud's tool call comes back as the cloud made it
    r = client(gateway).chat.completions.create(model="cloud", messages=ASK, tools=[TRACK], max_tokens=40)
    [call] = r.choices[0].message.tool_calls
    assert call.function.name == "track" and json.loads(call.function.arguments) == {"symbol": "10111"}


def test_cloud_key_comes_from_the_environment_and_is_never_shown(setup):
    gateway, _, _ = setup
    r = httpx.post(gateway + "/v1/chat/completions", headers={"Authorization": "Bearer open-key"},
                   json={"model": "cloud-badkey", "messages": HI, "max_tokens": 4}, timeout=30)
    assert r.status_code == 502 and "$TEST_WRONG_KEY" in r.json()["error"]["message"]
    assert "wrong-key-77aa" not in r.text and CLOUD_KEY not in r.text


def test_models_routing_and_refusals(setup):
    gateway, _, _ = setup
    cards = {c.id: c for c in client(gateway).models.list().data}
    assert list(cards) == ["local", "gpu", "cloud", "cloud-badkey"]
    assert cards["cloud"].owned_by.startswith("127.0.0.1:") and cards["local"].owned_by == "glmkit"
    raw = client(gateway).chat.completions.with_raw_response.create(model="local", messages=HI, max_tokens=4)
    assert served_by(raw) == "local" and raw.parse().model == "local"
    with pytest.raises(openai.NotFoundError, match="model_not_found|not found"):
        client(gateway).chat.completions.create(model="nope", messages=HI, max_tokens=4)
    # what needs a model glmkit runs is refused by name for a cloud's
    with pytest.raises(openai.BadRequestError, match="only /v1/chat/completions"):
        client(gateway).completions.create(model="cloud", prompt="hi", max_tokens=4)
    r = httpx.post(gateway + "/v1/messages", headers={"x-api-key": "open-key"},
                   json={"model": "cloud", "max_tokens": 4, "messages": HI}, timeout=30)
    assert r.status_code == 400 and "only /v1/chat/completions" in r.text


def test_private_only_key_never_leaves_the_machine(setup):
    gateway, _, _ = setup
    private = client(gateway, "priv-key")
    # the engine on loopback is this machine; a cloud entry is outside even on loopback
    assert [c.id for c in private.models.list().data] == ["local", "gpu"]
    with pytest.raises(openai.PermissionDeniedError, match="private_only"):
        private.chat.completions.create(model="cloud", messages=HI, max_tokens=4)
    # Ollama's listing leaves out what this key may not use rather than refusing the whole list
    tags = httpx.get(gateway + "/api/tags", headers={"Authorization": "Bearer priv-key"}, timeout=30)
    assert tags.status_code == 200 and [m["name"] for m in tags.json()["models"]] == ["local", "gpu"]
    assert private.chat.completions.create(model="gpu", messages=HI, max_tokens=4).model == "gpu"


def test_fallback_only_before_the_first_token(setup):
    """The engine dies while a reply streams from it: that reply ends with an error event (never
    continued by the cloud); afterwards requests for `gpu` are answered by the cloud, said in the
    header, the `model` field and /metrics; a private_only key gets the engine's 502 instead."""
    gateway, _, engine_proc = setup
    assert fallbacks(gateway) == {}
    body = {"model": "gpu", "messages": HI, "max_tokens": 29000, "temperature": 0, "stream": True}
    got = []
    with httpx.stream("POST", gateway + "/v1/chat/completions", json=body, timeout=60,
                      headers={"Authorization": "Bearer open-key"}) as r:
        assert r.headers.get("x-glmkit-served-by") == "gpu", r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                got.append(line[6:])
                if len(got) == 5:
                    engine_proc.kill()
    assert got[-1] == "[DONE]" and json.loads(got[-2])["error"]["code"] == "engine_unavailable"
    assert {json.loads(g).get("model") for g in got[:-2]} == {"gpu"}
    time.sleep(0.5)
    raw = client(gateway).chat.completions.with_raw_response.create(model="gpu", messages=HI, max_tokens=6)
    assert served_by(raw) == "cloud" and raw.parse().model == "cloud"
    stream = client(gateway).chat.completions.create(model="gpu", messages=HI, max_tokens=6, stream=True)
    assert {c.model for c in stream} == {"cloud"}
    assert fallbacks(gateway) == {("gpu", "cloud", "down"): 2}
    with pytest.raises(openai.InternalServerError) as e:       # 502: no fallback outside for this key
        client(gateway, "priv-key").chat.completions.create(model="gpu", messages=HI, max_tokens=4)
    assert e.value.status_code == 502
    assert fallbacks(gateway) == {("gpu", "cloud", "down"): 2}
