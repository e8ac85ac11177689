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
    "睡一会": "interpreter\n```python\nimport time\ntime.sleep(60)\n```",
}
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    f = tmp_path_factory.mktemp("script") / "script.json"
    f.write_text(json.dumps(SCRIPT, ensure_ascii=False))
    args = ["--model", str(TINY_32K), "--dtype", "float32", "--scripted-replies", str(f), "--tools", "builtin",
            "--max-steps", "2", "--max-tokens", "64"]
    if sandbox_available() is None:
        args.append("--code")
    with running_server(*args) as (url, proc):
        yield url, proc


@pytest.fixture(scope="module")
def base(served):
    return served[0]


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


def stream_events(r) -> list[dict]:
    assert r.status_code == 200, r.text
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: {")]


def test_a_streamed_run_shows_each_step_as_it_happens(base):
    """Text chunks and step chunks (no choices, a glmkit_step field) in the order they happen; the
    final message equals the non-streamed run's at temperature 0."""
    events = stream_events(chat(base, "算两个", stream=True))
    steps = [e["glmkit_step"] for e in events if "glmkit_step" in e]
    assert [(s["event"], s["type"], s.get("arguments")) for s in steps] == [
        ("call", "tool", {"expression": "6*7"}), ("result", "tool", {"expression": "6*7"}),
        ("call", "tool", {"expression": "1+2"}), ("result", "tool", {"expression": "1+2"})]
    assert all(e["choices"] == [] for e in events if "glmkit_step" in e)
    assert json.loads(steps[1]["observation"])["result"] == 42
    order = ["step" if "glmkit_step" in e else "text" for e in events if "glmkit_step" in e or
             (e["choices"] and e["choices"][0]["delta"].get("content"))]
    last_step = max(i for i, k in enumerate(order) if k == "step")
    assert "text" in order[last_step:]                     # the answer after the results
    streamed = "".join(e["choices"][0]["delta"].get("content") or "" for e in events[events.index(
        next(e for e in events if e.get("glmkit_step") == steps[-1])):] if e["choices"])
    whole = chat(base, "算两个").json()
    assert streamed == whole["choices"][0]["message"]["content"]
    assert events[-1]["choices"][0]["finish_reason"] == whole["choices"][0]["finish_reason"]
    assert [s for s in steps if s["event"] == "result"] == \
        [dict(st, event="result") for st in whole["glmkit_steps"]]


def test_the_openai_sdk_streams_a_run_and_skips_the_steps(base):
    import openai
    client = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=120)
    chunks = list(client.chat.completions.create(model="default", messages=[{"role": "user", "content": "算一下"}],
                                                 temperature=0, stream=True, extra_body={"glmkit_run_tools": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == chat(base, "算一下").json()["choices"][0]["message"]["content"]


def _kernels_of(pid: int) -> list[int]:
    """Sandboxed kernel processes (bubblewrap) under the server process."""
    import os
    parents, cmds = {}, {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                parents[int(d)] = int(open(f"/proc/{d}/stat").read().rsplit(")", 1)[1].split()[1])
                cmds[int(d)] = open(f"/proc/{d}/cmdline", "rb").read()
            except OSError:
                pass

    def under(p):
        while p > 1:
            if p == pid:
                return True
            p = parents.get(p, 0)
        return False
    return [p for p, c in cmds.items() if b"bwrap" in c and under(p)]


@pytest.mark.skipif(sandbox_available() is not None, reason="no sandbox")
@pytest.mark.parametrize("streamed", [True, False])
def test_a_client_that_leaves_stops_the_run_and_its_cell(served, streamed):
    """The cell sleeps for a minute; once its client goes, the kernel is gone within seconds."""
    import socket
    import time
    from urllib.parse import urlparse
    url, proc = served
    body = json.dumps({"model": "default", "messages": [{"role": "user", "content": "睡一会"}], "temperature": 0,
                       "glmkit_run_tools": True, "stream": streamed}).encode()
    u = urlparse(url)
    sock = socket.create_connection((u.hostname, u.port))
    sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    deadline = time.time() + 60
    while not _kernels_of(proc.pid):           # the run reaches the cell and its kernel starts
        assert time.time() < deadline, "no kernel started"
        time.sleep(0.2)
    time.sleep(1)
    sock.close()                               # the client leaves mid-run
    t0 = time.time()
    while _kernels_of(proc.pid):
        assert time.time() - t0 < 10, "the kernel was left running after its client went"
        time.sleep(0.2)


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
