"""Every model family through a real server (issue 13, item 4): quantized while loading (int8),
chat and streaming with the real `openai` client, a tool call in the family's protocol (the tagged
convention: these families have none of their own), and the console's tool mode running a real
tool.  ChatGLM3 and GLM-4 have their own modules (test_server_tools.py, test_glm4.py).

Each family is a tiny checkpoint written by transformers' own classes (test_hf_families.py), with
a context long enough for a tool prompt; ChatGLM2 is the ChatGLM3 fixture under a ChatGLM2 release
name.  The model's first reply to the tool request is forced token by token (--scripted-replies);
everything after the tokens is the production path."""

import json
import shutil

import httpx
import openai
import pytest

from server_helpers import running_server

pytest.importorskip("transformers")

CALL = '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>'
CALC = {"type": "function", "function": {"name": "calculator", "description": "arithmetic",
                                          "parameters": {"type": "object", "properties": {"expression": {"type": "string"}},
                                                         "required": ["expression"]}}}
FAMILIES = ["llama3", "qwen2.5", "llama2", "mistral", "chatglm2"]


@pytest.fixture(scope="module", params=FAMILIES)
def served(request, tmp_path_factory):
    name = request.param
    root = tmp_path_factory.mktemp(name)
    model = root / "model"
    if name == "chatglm2":
        from conftest import TINY_32K
        shutil.copytree(TINY_32K, model)
        cfg = json.loads((model / "config.json").read_text())
        (model / "config.json").write_text(json.dumps(dict(cfg, _name_or_path="THUDM/chatglm2-6b-32k")))
    else:
        from test_hf_families import write_family
        model.mkdir()
        write_family(name, model, max_position_embeddings=4096,
                     **({"sliding_window": 4096} if name == "mistral" else {}))
    (root / "scripts.json").write_text(json.dumps({"算一下": CALL}, ensure_ascii=False))
    with running_server("--model", str(model), "--quantize", "int8", "--data-dir", str(root / "store"),
                        "--no-embeddings", "--tools", "builtin", "--max-steps", "1",
                        "--scripted-replies", str(root / "scripts.json")) as (url, _):
        yield name, url


def test_chat_stream_tools_and_console(served):
    name, url = served
    client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0, timeout=120)
    hello = [{"role": "user", "content": "Hello there! How are you?"}]
    whole = client.chat.completions.create(model="default", messages=hello, max_tokens=8, temperature=0)
    text = whole.choices[0].message.content
    assert isinstance(text, str) and whole.usage.completion_tokens > 0
    assert not any(s in text for s in ("<|", "</s>", "<s>", "[INST]", "[gMASK]")), (name, text)
    chunks = client.chat.completions.create(model="default", messages=hello, max_tokens=8, temperature=0, stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == text, name

    r = client.chat.completions.create(model="default", messages=[{"role": "user", "content": "算一下"}], tools=[CALC])
    [call] = r.choices[0].message.tool_calls
    assert (call.function.name, json.loads(call.function.arguments)) == ("calculator", {"expression": "6*7"}), name
    assert r.choices[0].finish_reason == "tool_calls"

    conv = httpx.post(url + "/api/conversations", json={"mode": "tool"}).json()["id"]
    r = httpx.post(f"{url}/api/conversations/{conv}/messages", timeout=120,
                   json={"content": "算一下", "settings": {"temperature": 0, "max_new_tokens": 120}})
    events = [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]
    assert next(e for e in events if e["type"] == "tool_call")["arguments"] == {"expression": "6*7"}, name
    result = next(e for e in events if e["type"] == "tool_result")
    assert result["ok"] and json.loads(result["output"])["result"] == 42, (name, result)
