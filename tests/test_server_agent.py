"""`glmkit serve --tools ... --code`: the server runs tools and the sandboxed interpreter itself for
requests that set the extension field "glmkit_run_tools" (tiny ChatGLM3 fixture, decoding of the
first step constrained by --scripted-replies; everything after is the real path)."""

import json

import httpx
import pytest

from conftest import TINY_32K
from glmkit.sandbox import sandbox_available
from server_helpers import running_server

SCRIPT = {
    "算一下": 'calculator\n ```python\ntool_call(expression="6 * 7")\n```',
    "写代码": "interpreter\n```python\nprint(sum(range(1, 101)))\n```",
    "坏代码": "interpreter\n```python\nprint(1)",        # the fence never closes
    "巴黎天气": 'get_weather\n ```python\ntool_call(city="Paris")\n```',
    # two calls in one reply, one segment each (unfenced: ChatGLM3 accepts the bare call too)
    "算两个": 'calculator\ntool_call(expression="6*7")<|assistant|>calculator\ntool_call(expression="1+2")',
    "算一下再查天气": 'calculator\ntool_call(expression="6*7")<|assistant|>get_weather\ntool_call(city="Oslo")',
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    f = tmp_path_factory.mktemp("script") / "script.json"
    f.write_text(json.dumps(SCRIPT, ensure_ascii=False))
    args = ["--model", str(TINY_32K), "--dtype", "float32", "--scripted-replies", str(f), "--tools", "builtin",
            "--max-steps", "2", "--max-tokens", "64"]
    if sandbox_available() is None:
        args.append("--code")
    with running_server(*args) as (url, _):
        yield url


def chat(base, text, **extra):
    body = {"model": "default", "messages": [{"role": "user", "content": text}], "temperature": 0,
            "glmkit_run_tools": True, **extra}
    return httpx.post(base + "/v1/chat/completions", json=body, timeout=120)


def test_server_runs_a_builtin_tool(base):
    r = chat(base, "算一下")
    assert r.status_code == 200, r.text
    steps = r.json()["glmkit_steps"]
    assert steps[0] == {"type": "tool", "name": "calculator", "arguments": {"expression": "6 * 7"}, "ok": True,
                        "observation": json.dumps({"expression": "6 * 7", "result": 42})}
    assert r.json()["usage"]["completion_tokens"] > 0


@pytest.mark.skipif(sandbox_available() is not None, reason="no sandbox")
def test_server_runs_code_in_the_sandbox(base):
    r = chat(base, "写代码")
    assert r.status_code == 200, r.text
    step = r.json()["glmkit_steps"][0]
    assert step["type"] == "code" and step["code"] == "print(sum(range(1, 101)))"
    assert step["ok"] and step["output"] == "5050\n"


def test_server_runs_every_call_of_a_reply_in_order(base):
    r = chat(base, "算两个")
    assert r.status_code == 200, r.text
    steps = r.json()["glmkit_steps"]
    assert [(s["type"], s["name"], s["arguments"], s["ok"]) for s in steps] == [
        ("tool", "calculator", {"expression": "6*7"}, True), ("tool", "calculator", {"expression": "1+2"}, True)]
    assert [json.loads(s["observation"])["result"] for s in steps] == [42, 3]
    assert r.json()["choices"][0]["finish_reason"] != "tool_calls"


def test_server_runs_its_calls_and_returns_the_client_s(base):
    """One reply calling a server tool and a client tool: the first runs here, the second comes
    back as tool_calls for the client."""
    r = chat(base, "算一下再查天气", tools=[WEATHER])
    assert r.status_code == 200, r.text
    [step] = r.json()["glmkit_steps"]
    assert step["name"] == "calculator" and json.loads(step["observation"])["result"] == 42
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and choice["message"]["content"] is None
    [call] = choice["message"]["tool_calls"]
    assert call["id"].startswith("call_") and call["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}


def test_extension_needs_non_streaming(base):
    assert chat(base, "算一下", stream=True).status_code == 400


def test_a_client_tool_is_returned_not_run(base):
    """With the extension on, a call to one of the client's own tools still comes back as
    tool_calls for the client to run, as it would without the extension."""
    r = chat(base, "巴黎天气", tools=[WEATHER])
    assert r.status_code == 200, r.text
    choice = r.json()["choices"][0]
    assert choice["finish_reason"] == "tool_calls" and r.json()["glmkit_steps"] == []
    [call] = choice["message"]["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}


@pytest.mark.skipif(sandbox_available() is not None, reason="no sandbox")
def test_a_refused_code_segment_is_a_failed_step_not_a_500(base):
    r = chat(base, "坏代码")
    assert r.status_code == 200, r.text
    step = r.json()["glmkit_steps"][0]
    assert step["type"] == "code" and not step["ok"] and "unterminated" in step["output"]
