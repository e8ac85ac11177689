"""Several models in one server (`glmkit serve --models FILE`), each request's `model` choosing one.

One real server on loopback serves the two tiny checkpoints (TINY as "tiny", TINY_32K as
"tiny-32k", the default), each with a scheduler of its own; the real `openai` client talks to it.
Each model's greedy reply must be that model's own in-process reply, and the two models' replies
differ (checked), so a request answered by the wrong model fails these tests.  The models file's
mistakes are each one line naming the file and the field, before anything loads."""

import json
import re
import sqlite3
import subprocess
import time

import httpx
import openai
import pytest

from conftest import TINY, TINY_32K, glmkit_bin
from server_helpers import free_port, running_server

HI = [{"role": "user", "content": "你好，介绍一下你自己"}]
MODELS_YAML = f"""
models:
  tiny: {{path: {TINY}, max_batch: 2}}
  tiny-32k: {{path: {TINY_32K}, quantize: none}}
routes:
  default: tiny-32k
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("multi")


@pytest.fixture(scope="module")
def base(data_dir):
    (data_dir / "models.yaml").write_text(MODELS_YAML, encoding="utf-8")
    with running_server("--models", str(data_dir / "models.yaml"), "--dtype", "float32", "--no-embeddings",
                        "--data-dir", str(data_dir / "data"), "--max-tokens", "64") as (url, _):
        yield url


@pytest.fixture(scope="module")
def client(base):
    return openai.OpenAI(base_url=base + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def alone(tiny, tiny32k):
    """Each model's greedy reply to HI, served alone in this process."""
    replies = {"tiny": tiny.chat(HI, max_new_tokens=24, temperature=0)[0],
               "tiny-32k": tiny32k.chat(HI, max_new_tokens=24, temperature=0)[0]}
    # otherwise a request routed to the wrong model would pass
    assert replies["tiny"] != replies["tiny-32k"] and all(replies.values())
    return replies


def requests_total(base) -> dict:
    text = httpx.get(base + "/metrics", timeout=10).text
    return {m: int(n) for m, n in re.findall(r'^glmkit_requests_total\{model="([^"]+)"\} (\d+)$', text, re.M)}


def test_models_lists_both_default_first(client):
    cards = client.models.list().data
    assert [c.id for c in cards] == ["tiny-32k", "tiny"]
    assert all(c.object == "model" and c.owned_by for c in cards)
    # glmkit's extra fields, per model
    assert {c.id: c.model_extra["family"] for c in cards} == {"tiny-32k": "chatglm", "tiny": "chatglm"}
    assert client.models.retrieve("tiny").id == "tiny"


def test_each_model_answers_as_it_does_alone(client, alone):
    for name, text in alone.items():
        r = client.chat.completions.create(model=name, messages=HI, max_tokens=24, temperature=0)
        assert r.model == name and r.choices[0].message.content == text
        # streamed: the same
        stream = client.chat.completions.create(model=name, messages=HI, max_tokens=24, temperature=0, stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == text


def test_completions_route_by_model(client, tiny, tiny32k):
    prompt = "The capital of France is"
    for name, model in (("tiny", tiny), ("tiny-32k", tiny32k)):
        r = client.completions.create(model=name, prompt=prompt, max_tokens=12, temperature=0, logprobs=0,
                                      extra_body={"return_tokens_as_token_ids": True, "ignore_eos": True})
        ids = [int(t.removeprefix("token_id:")) for t in r.choices[0].logprobs.tokens]
        expected = model.generate(model.tokenizer.encode(prompt), 12, stop_ids=(), temperature=0)
        assert r.model == name and ids == expected


def test_unknown_model_is_openais_404(client, base):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="gpt-4o", messages=HI, max_tokens=4)
    body = e.value.response.json()
    assert body == {"error": {"message": body["error"]["message"], "type": "invalid_request_error",
                              "code": "model_not_found", "param": "model"}}
    assert "'gpt-4o'" in body["error"]["message"] and "'tiny'" in body["error"]["message"]
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny-64k", prompt="x", max_tokens=4)
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("default")          # a route, not a model's id
    r = httpx.post(base + "/v1/responses", json={"model": "nope", "input": "hi"}, timeout=30)
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    assert httpx.get(base + "/health").status_code == 200      # still serving


def test_default_and_omitted_model_go_to_the_default_route(client, base, alone):
    r = client.chat.completions.create(model="default", messages=HI, max_tokens=24, temperature=0)
    assert r.model == "tiny-32k" and r.choices[0].message.content == alone["tiny-32k"]
    r = httpx.post(base + "/v1/chat/completions", json={"messages": HI, "max_tokens": 24, "temperature": 0},
                   timeout=60).json()
    assert r["model"] == "tiny-32k" and r["choices"][0]["message"]["content"] == alone["tiny-32k"]


def test_other_apis_route_by_model(base, alone):
    # Responses API
    r = httpx.post(base + "/v1/responses", json={"model": "tiny", "input": HI[0]["content"],
                                                 "max_output_tokens": 24, "temperature": 0}, timeout=60).json()
    assert r["model"] == "tiny" and r["output"][0]["content"][0]["text"] == alone["tiny"]
    # Anthropic messages: a served name picks it; any other name (a client's "claude-...") the default
    body = {"messages": HI, "max_tokens": 24, "temperature": 0}
    r = httpx.post(base + "/v1/messages", json={**body, "model": "tiny"}, timeout=60).json()
    assert r["model"] == "tiny" and r["content"][0]["text"] == alone["tiny"]
    r = httpx.post(base + "/v1/messages", json={**body, "model": "claude-sonnet-4-5"}, timeout=60).json()
    assert r["model"] == "tiny-32k" and r["content"][0]["text"] == alone["tiny-32k"]
    # Ollama: a tag after the name, and the longest name that matches ("tiny-32k", not "tiny")
    r = httpx.post(base + "/api/chat", json={"model": "tiny-32k:latest", "messages": HI, "stream": False,
                                             "options": {"temperature": 0, "num_predict": 24}}, timeout=60).json()
    assert r["model"] == "tiny-32k" and r["message"]["content"] == alone["tiny-32k"]
    assert [m["name"] for m in httpx.get(base + "/api/tags").json()["models"]] == ["tiny-32k", "tiny"]


def test_metrics_carry_a_model_label(client, base):
    before = requests_total(base)
    assert set(before) == {"tiny", "tiny-32k"}
    client.chat.completions.create(model="tiny", messages=HI, max_tokens=2)
    client.chat.completions.create(model="tiny", messages=HI, max_tokens=2)
    client.chat.completions.create(model="tiny-32k", messages=HI, max_tokens=2)
    after = requests_total(base)
    assert after == {"tiny": before["tiny"] + 2, "tiny-32k": before["tiny-32k"] + 1}
    text = httpx.get(base + "/metrics").text
    assert re.search(r'^glmkit_time_to_first_token_seconds_bucket\{model="tiny",le="\+Inf"\} [1-9]', text, re.M)
    assert re.search(r'^glmkit_time_to_first_token_seconds_count\{model="tiny-32k"\} [1-9]', text, re.M)
    assert not re.search(r"^glmkit_requests_total ", text, re.M)     # every series says its model
    # each model's own scheduler, sized by its entry (tiny: max_batch 2) or the options (8)
    slots = re.findall(r'^glmkit_batch_slots\{model="([^"]+)"\} (\d+)$', text, re.M)
    assert slots == [("tiny-32k", "8"), ("tiny", "2")]


def sse(r):
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]


def test_console_conversation_on_the_second_model_stores_it(base):
    config = httpx.get(base + "/api/config").json()
    assert config["models"] == ["tiny-32k", "tiny"] and config["default_model"] == "tiny-32k"
    # what the page shows for each model's conversations: its own sampling defaults, and no
    # small-model note (both speak ChatGLM3's protocol)
    assert set(config["per_model"]) == {"tiny-32k", "tiny"}
    assert all(p["note"] is None and p["defaults"]["max_new_tokens"] == config["defaults"]["max_new_tokens"]
               for p in config["per_model"].values())
    c = httpx.post(base + "/api/conversations", json={}).json()
    assert c["model"] == "tiny-32k"                    # the default until a message names one
    settings = {"temperature": 0, "max_new_tokens": 4}
    # a model this server does not serve: refused, nothing stored
    r = httpx.post(base + f"/api/conversations/{c['id']}/messages", json={"content": "hi", "model": "gpt-4o",
                                                                          "settings": settings})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    assert httpx.get(base + f"/api/conversations/{c['id']}").json()["messages"] == []
    before = requests_total(base)
    r = httpx.post(base + f"/api/conversations/{c['id']}/messages", json={"content": "你好", "model": "tiny",
                                                                          "settings": settings}, timeout=60)
    assert sse(r)[-1]["type"] == "done"
    conv = httpx.get(base + f"/api/conversations/{c['id']}").json()
    assert conv["model"] == "tiny" and [m["role"] for m in conv["messages"]] == ["user", "assistant"]
    assert requests_total(base) == {**before, "tiny": before["tiny"] + 1}      # "tiny" answered
    # the next message without a model: the conversation's, not the default
    r = httpx.post(base + f"/api/conversations/{c['id']}/messages", json={"content": "再说一次", "settings": settings},
                   timeout=60)
    assert sse(r)[-1]["type"] == "done"
    assert requests_total(base) == {**before, "tiny": before["tiny"] + 2}
    assert any(c2["id"] == c["id"] and c2["model"] == "tiny" for c2 in httpx.get(base + "/api/conversations").json())
    page = httpx.get(base + "/").text
    assert 'id="model-pick"' in page


def test_a_stored_model_no_longer_served_falls_back_to_the_default(base, data_dir):
    c = httpx.post(base + "/api/conversations", json={"model": "tiny"}).json()
    assert c["model"] == "tiny"
    db = sqlite3.connect(data_dir / "data" / "conversations.db", timeout=30)
    db.execute("UPDATE conversations SET model = 'retired-model' WHERE id = ?", (c["id"],))
    db.commit()
    db.close()
    conv = httpx.get(base + f"/api/conversations/{c['id']}").json()
    assert conv["model"] == "tiny-32k" and "retired-model" in conv["warnings"][0]
    assert httpx.post(base + "/api/conversations", json={"model": "nope"}).status_code == 400


# -- the models file's mistakes ---------------------------------------------------------------------
BAD = {
    "unknown key": ("models:\n  a: {path: /m, quantise: int4}\n", "models.a.quantise", "unknown field"),
    "missing path": ("models:\n  a: {quantize: int4}\n", "models.a.path", "required"),
    "engine with a local option": ("models:\n  a: {engine: http://gpu:8000, path: /m, quantize: int4}\n",
                                   "models.a.quantize", "not to one an engine serves"),
    "engine without path": ("models:\n  a: {engine: http://gpu:8000, kind: vllm}\n", "models.a.path", "required"),
    "engine not a URL": ("models:\n  a: {engine: gpu-box, path: /m}\n", "models.a.engine", "URL"),
    "default names no model": ("models:\n  a: {path: /m}\nroutes: {default: b}\n", "routes.default", "'b'"),
    "cloud key in the file": ("models:\n  a: {path: /m}\n  c: {openai: 'https://x/v1', model: m, api_key: sk-1}\n",
                              "models.c.api_key", "environment variable"),
    "cloud not a URL": ("models:\n  a: {path: /m}\n  c: {openai: gpt-4o, model: m}\n", "models.c.openai", "URL"),
    "cloud without model": ("models:\n  a: {path: /m}\n  c: {openai: 'https://x/v1'}\n", "models.c.model",
                            "required"),
    "cloud key variable not a name": ("models:\n  a: {path: /m}\n  c: {openai: 'https://x/v1', model: m, "
                                      "api_key_env: 'sk-1 2'}\n", "models.c.api_key_env", "pattern"),
    "only cloud models": ("models:\n  c: {openai: 'https://x/v1', model: m}\n", "models", "at least one"),
    "cloud as default": ("models:\n  a: {path: /m}\n  c: {openai: 'https://x/v1', model: m}\nroutes: {default: c}\n",
                         "routes.default", "cloud model"),
    "fallback to no model": ("models:\n  a: {path: /m}\nroutes: {fallback: {a: b}}\n", "routes.fallback.a", "'b'"),
    "fallback from no model": ("models:\n  a: {path: /m}\nroutes: {fallback: {b: a}}\n", "routes.fallback", "'b'"),
    "fallback to itself": ("models:\n  a: {path: /m}\nroutes: {fallback: {a: a}}\n", "routes.fallback.a",
                           "own fallback"),
    "fallback not a mapping": ("models:\n  a: {path: /m}\nroutes: {fallback: [a]}\n", "routes.fallback",
                               "dictionary"),
    "private_only not a boolean": ("models:\n  a: {path: /m}\nprivate_only: sometimes\n", "private_only",
                                   "true or false"),
    "reserved name": ("models:\n  default: {path: /m}\n", "models.default", "reserved"),
    "no models": ("routes: {default: a}\n", "models", "required"),
    "not YAML": ("models:\n  a: {path: /m\n", "not valid YAML", "line"),
}


@pytest.mark.parametrize("case", BAD, ids=list(BAD))
def test_a_bad_models_file_is_one_line_naming_file_and_field(case, tmp_path):
    text, field, why = BAD[case]
    f = tmp_path / "models.yaml"
    f.write_text(text, encoding="utf-8")
    started = time.monotonic()
    proc = subprocess.run([glmkit_bin(), "serve", "--models", str(f), "--no-embeddings"], capture_output=True,
                          text=True, timeout=60)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 1 and len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert lines[0].startswith(f"glmkit: error: {f}: ") and field in lines[0] and why in lines[0], lines[0]
    assert time.monotonic() - started < 30          # refused before any model loads


def serve_fails(tmp_path, models_yaml: str) -> tuple[str, str]:
    """(the file, serve's stderr) for a models file whose serving must fail: exit 1, no traceback."""
    f = tmp_path / "models.yaml"
    f.write_text(models_yaml, encoding="utf-8")
    proc = subprocess.run([glmkit_bin(), "serve", "--models", str(f), "--no-embeddings", "--no-console"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    return str(f), proc.stderr


def test_a_models_file_entry_that_cannot_load_names_its_entry(tmp_path):
    f, err = serve_fails(tmp_path, f"models:\n  good: {{path: {TINY}}}\n  bad: {{path: {tmp_path / 'nowhere'}}}\n")
    assert f"glmkit: error: {f}: models.bad.path: " in err


def test_an_engine_entry_whose_engine_is_down_names_its_entry(tmp_path):
    f, err = serve_fails(tmp_path, f"models:\n  gpu: {{engine: http://127.0.0.1:{free_port()}, kind: vllm, path: {TINY}}}\n")
    assert f"glmkit: error: {f}: models.gpu.engine: cannot reach the engine" in err


def test_a_cloud_entry_whose_key_variable_is_unset_names_it(tmp_path, monkeypatch):
    monkeypatch.delenv("GLMKIT_TEST_UNSET_KEY", raising=False)
    f, err = serve_fails(tmp_path, "models:\n  c: {openai: 'http://127.0.0.1:9/v1', model: m, "
                                   f"api_key_env: GLMKIT_TEST_UNSET_KEY}}\n  a: {{path: {TINY}}}\n")
    assert f"glmkit: error: {f}: models.c.api_key_env: the environment variable GLMKIT_TEST_UNSET_KEY" in err


def test_models_file_excludes_model_options(tmp_path):
    f = tmp_path / "models.yaml"
    f.write_text(f"models:\n  a: {{path: {TINY}}}\n", encoding="utf-8")
    proc = subprocess.run([glmkit_bin(), "serve", "--models", str(f), "--model", str(TINY)], capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and "leave out --model" in proc.stderr and "Traceback" not in proc.stderr
