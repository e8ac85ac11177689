"""The console's Tool and Code-interpreter modes through its JSON API, on the embedded default
model, with a real server, real tools and the real sandbox.  The model's first reply to each
scripted message is forced token by token (--scripted-replies, a testing aid); the tool or
code run, the observation and the model's next reply are the real path."""

import json
import time

import httpx
import pytest

from server_helpers import running_server

PLOT = ("Here is the code.\n```python\nimport matplotlib.pyplot as plt\n"
        "rows = open('/mnt/data/data.csv').read().split()\nprint('rows:', len(rows))\nx = 41\n"
        "plt.plot([1, 2, 3], [1, 4, 9])\nn = open('/mnt/data/result.txt', 'w').write('written by the model')\n```")
SCRIPTS = {
    "plot the data": PLOT,
    "use x": "```python\nprint(x + 1)\n```",
    "crash": "```python\n1 / 0\n```",
    # writes a file first: once it is in the workspace, the cell is running
    "sleep": "```python\nimport time\nn = open('/mnt/data/started.txt', 'w').write('running')\ntime.sleep(120)\n```",
    "escape": "```python\nimport os\nos.symlink('/etc/passwd', '/mnt/data/pw')\nprint('linked')\n```",
    "multiply": '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>',
    "bad tool": '<tool_call>\n{"name": "calculator", "arguments": {"expression": 7}}\n</tool_call>',
    "two sums": '<tool_call>\n{"name": "calculator", "arguments": {"expression": "6*7"}}\n</tool_call>\n'
                '<tool_call>\n{"name": "calculator", "arguments": {"expression": "1+2"}}\n</tool_call>',
}


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    scripts = data / "scripts.json"
    scripts.write_text(json.dumps(SCRIPTS))
    with running_server("--data-dir", str(data / "store"), "--no-embeddings", "--tools", "builtin", "--code",
                        "--max-steps", "2", "--scripted-replies", str(scripts)) as (url, _):
        yield url


def sse(r):
    assert r.status_code == 200, r.text
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]


def say(base, cid, text):
    return sse(httpx.post(f"{base}/api/conversations/{cid}/messages", timeout=120,
                          json={"content": text, "settings": {"temperature": 0, "max_new_tokens": 160}}))


def messages(base, cid):
    return httpx.get(f"{base}/api/conversations/{cid}").json()["messages"]


def say_once_free(base, cid, text, **settings):
    """`say`, once the conversation's stopped turn has let go of it (until then: 409)."""
    def attempt():
        r = httpx.post(f"{base}/api/conversations/{cid}/messages", timeout=120,
                       json={"content": text, "settings": {"temperature": 0, "max_new_tokens": 160, **settings}})
        return None if r.status_code == 409 else [r]
    [r] = wait_for(attempt, "the conversation to be free")
    return sse(r)


def wait_for(condition, what: str, timeout: float = 90):
    """Poll `condition()` until it returns something true, and return that; a generous `timeout`
    only keeps a broken server from hanging the test."""
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.1)
    return value


def test_config_lists_the_modes_and_tools(base):
    cfg = httpx.get(base + "/api/config").json()
    assert cfg["modes"] == ["chat", "tool", "code", "knowledge"] and cfg["unavailable"] == {}
    assert "calculator" in [t["name"] for t in cfg["tools"]]


def test_code_mode_upload_run_plot_download(base):
    cid = httpx.post(base + "/api/conversations", json={"mode": "code"}).json()["id"]
    up = httpx.put(f"{base}/api/conversations/{cid}/files/data.csv", content=b"a,1\nb,2\nc,3\n")
    assert up.json() == {"name": "data.csv", "size": 12}
    events = say(base, cid, "plot the data")
    kinds = [e["type"] for e in events]
    assert kinds[0] == "text" and "code" in kinds and kinds[-1] == "done"
    code = next(e for e in events if e["type"] == "code")
    assert code["code"].startswith("import matplotlib") and code["shown"]
    result = next(e for e in events if e["type"] == "tool_result")
    assert result["ok"] and result["output"].strip() == "rows: 3" and len(result["images"]) == 1
    assert __import__("base64").b64decode(result["images"][0])[:8] == b"\x89PNG\r\n\x1a\n"
    # stored as it happened: the code reply, the run (with its plot), the model's answer after it
    stored = messages(base, cid)
    assert [m["role"] for m in stored] == ["user", "assistant", "observation", "assistant"]
    assert stored[2]["content"] == "```result\nrows: 3\n[Image]\n```" and len(stored[2]["extras"]["images"]) == 1
    # the file the code wrote can be downloaded; the listing shows both files
    names = [f["name"] for f in httpx.get(f"{base}/api/conversations/{cid}/files").json()]
    assert names == ["data.csv", "result.txt"]
    got = httpx.get(f"{base}/api/conversations/{cid}/files/result.txt")
    assert got.text == "written by the model" and "attachment" in got.headers["content-disposition"]
    # the kernel keeps its variables between turns of the conversation
    again = say(base, cid, "use x")
    assert next(e for e in again if e["type"] == "tool_result")["output"].strip() == "42"


def test_code_errors_and_escapes(base):
    cid = httpx.post(base + "/api/conversations", json={"mode": "code"}).json()["id"]
    crash = next(e for e in say(base, cid, "crash") if e["type"] == "tool_result")
    assert not crash["ok"] and "ZeroDivisionError" in crash["output"]
    # a symlink the code leaves in the workspace is neither listed nor served
    assert next(e for e in say(base, cid, "escape") if e["type"] == "tool_result")["output"].strip() == "linked"
    # (the model's own reply after the run may write files of its own; only the link must not show)
    assert "pw" not in [f["name"] for f in httpx.get(f"{base}/api/conversations/{cid}/files").json()]
    assert httpx.get(f"{base}/api/conversations/{cid}/files/pw").status_code == 404
    assert httpx.get(f"{base}/api/conversations/{cid}/files/..%2F..%2Fconversations.db").status_code == 404
    for bad in (".hidden", "..", "a\\b"):
        assert httpx.put(f"{base}/api/conversations/{cid}/files/{bad}", content=b"x").status_code in (400, 404, 405)
    # uploads go only to code conversations
    chat = httpx.post(base + "/api/conversations", json={}).json()["id"]
    assert httpx.put(f"{base}/api/conversations/{chat}/files/a.txt", content=b"x").status_code == 400


def test_tool_mode_runs_the_tool_and_shows_each_step(base):
    cid = httpx.post(base + "/api/conversations", json={"mode": "tool"}).json()["id"]
    events = say(base, cid, "multiply")
    call = next(e for e in events if e["type"] == "tool_call")
    result = next(e for e in events if e["type"] == "tool_result")
    assert call == {"type": "tool_call", "name": "calculator", "arguments": {"expression": "6*7"}}
    assert result["ok"] and json.loads(result["output"])["result"] == 42
    stored = messages(base, cid)
    assert [m["role"] for m in stored] == ["user", "assistant", "observation", "assistant"]
    assert stored[2]["extras"]["name"] == "calculator"
    # arguments that fail the tool's schema are refused, not run; the model is told why
    bad = say(base, cid, "bad tool")
    result = next(e for e in bad if e["type"] == "tool_result")
    assert not result["ok"] and "expression" in result["output"]


def test_tool_mode_runs_every_call_of_a_reply(base):
    cid = httpx.post(base + "/api/conversations", json={"mode": "tool"}).json()["id"]
    events = say(base, cid, "two sums")
    steps = [e for e in events if e["type"] in ("tool_call", "tool_result", "error")]
    assert [e["type"] for e in steps] == ["tool_call", "tool_result", "tool_call", "tool_result"]
    assert [e["arguments"] for e in steps[::2]] == [{"expression": "6*7"}, {"expression": "1+2"}]
    assert [json.loads(e["output"])["result"] for e in steps[1::2]] == [42, 3]
    # each observation is stored with its own run
    stored = messages(base, cid)
    assert [m["role"] for m in stored] == ["user", "assistant", "observation", "observation", "assistant"]
    assert [json.loads(m["extras"]["output"])["result"] for m in stored[2:4]] == [42, 3]
    assert all(m["extras"]["name"] == "calculator" for m in stored[2:4])


def test_stop_mid_answer_keeps_the_text_and_frees_the_conversation(base):
    cid = httpx.post(base + "/api/conversations", json={}).json()["id"]
    shown = ""
    with httpx.stream("POST", f"{base}/api/conversations/{cid}/messages", timeout=60,
                      json={"content": "Write a long story.", "settings": {"max_new_tokens": 400}}) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                ev = json.loads(line[6:])
                shown += ev.get("text", "")
                if len(shown) > 20:
                    # still answering: it cannot be deleted under the running turn
                    assert httpx.delete(f"{base}/api/conversations/{cid}").status_code == 409
                    break        # the browser's Stop: the connection closes mid-stream
    stored = wait_for(lambda: m if len(m := messages(base, cid)) == 2 else None, "the stopped answer to be stored")
    # marked as stopped, with what it used (the tokens shown count)
    extras = stored[1]["extras"]
    assert extras["stopped"] is True and stored[1]["content"].startswith(shown)
    assert extras["usage"]["completion_tokens"] > 0 and extras["finish_reason"] != "length"
    # the conversation is free again
    assert say_once_free(base, cid, "Hi")[-1]["type"] == "done"


def test_settings_are_kept_with_the_conversation_and_validated(base):
    cid = httpx.post(base + "/api/conversations", json={"settings": {"temperature": 0.3}}).json()["id"]
    r = httpx.patch(f"{base}/api/conversations/{cid}", json={"settings": {"temperature": 0.9, "top_k": 5}})
    assert r.json()["settings"] == {"temperature": 0.9, "top_k": 5}
    assert httpx.patch(f"{base}/api/conversations/{cid}", json={"settings": {"evil": 1}}).status_code == 400
    bad = httpx.post(f"{base}/api/conversations/{cid}/messages", json={"content": "x", "settings": {"top_p": 7}})
    assert bad.status_code == 400 and "top_p" in bad.json()["error"]["message"]
    # a conversation's mode can change only while it is empty
    assert httpx.patch(f"{base}/api/conversations/{cid}", json={"mode": "code"}).json()["mode"] == "code"
    say(base, cid, "use x")
    assert httpx.patch(f"{base}/api/conversations/{cid}", json={"mode": "chat"}).status_code == 400


def test_edit_and_resend_replaces_the_rest_of_the_conversation(base):
    cid = httpx.post(base + "/api/conversations", json={}).json()["id"]
    say(base, cid, "First question")
    say(base, cid, "Second question")
    first = messages(base, cid)[0]
    r = httpx.post(f"{base}/api/conversations/{cid}/messages", timeout=120,
                   json={"content": "Edited question", "edit_seq": first["seq"], "settings": {"max_new_tokens": 8}})
    assert sse(r)[-1]["type"] == "done"
    stored = messages(base, cid)
    assert [m["role"] for m in stored] == ["user", "assistant"] and stored[0]["content"] == "Edited question"
    # editing something that is not a user message is refused, and nothing is lost
    bad = httpx.post(f"{base}/api/conversations/{cid}/messages",
                     json={"content": "x", "edit_seq": stored[1]["seq"]})
    assert bad.status_code == 400 and messages(base, cid) == stored


GLM3_SCRIPTS = {
    "算一下": 'calculator\n ```python\ntool_call(expression="6 * 7")\n```',
    "画个图": "interpreter\n```python\nimport matplotlib.pyplot as plt\nplt.plot([1, 2])\nprint('画好了')\n```",
}


@pytest.fixture(scope="module")
def glm3(tmp_path_factory):
    from conftest import TINY_32K
    data = tmp_path_factory.mktemp("glm3")
    (data / "scripts.json").write_text(json.dumps(GLM3_SCRIPTS, ensure_ascii=False))
    with running_server("--model", str(TINY_32K), "--dtype", "float32", "--data-dir", str(data / "store"),
                        "--no-embeddings", "--tools", "builtin", "--code", "--max-steps", "1",
                        "--scripted-replies", str(data / "scripts.json")) as (url, _):
        yield url


def test_chatglm3_protocol_in_the_console(glm3):
    """ChatGLM3 writes calls as metadata segments: they are stored as such (so the next prompt is
    the model's own format) and never shown as answer text."""
    tool = httpx.post(glm3 + "/api/conversations", json={"mode": "tool"}).json()["id"]
    events = say(glm3, tool, "算一下")
    assert next(e for e in events if e["type"] == "tool_call")["arguments"] == {"expression": "6 * 7"}
    assert "tool_call(" not in "".join(e.get("text", "") for e in events)
    stored = messages(glm3, tool)
    assert (stored[1]["role"], stored[1]["metadata"]) == ("assistant", "calculator")
    assert stored[2]["role"] == "observation" and json.loads(stored[2]["content"])["result"] == 42

    code = httpx.post(glm3 + "/api/conversations", json={"mode": "code"}).json()["id"]
    events = say(glm3, code, "画个图")
    cell = next(e for e in events if e["type"] == "code")
    assert cell["code"].startswith("import matplotlib") and not cell["shown"]   # the page draws it
    result = next(e for e in events if e["type"] == "tool_result")
    assert result["output"] == "画好了\n" and len(result["images"]) == 1
    stored = messages(glm3, code)
    assert (stored[1]["metadata"], stored[2]["content"]) == ("interpreter", "```result\n画好了\n[Image]\n```")


def test_stop_interrupts_a_running_cell(base):
    cid = httpx.post(base + "/api/conversations", json={"mode": "code"}).json()["id"]
    files = f"{base}/api/conversations/{cid}/files"
    with httpx.stream("POST", f"{base}/api/conversations/{cid}/messages", timeout=60,
                      json={"content": "sleep", "settings": {"temperature": 0, "max_new_tokens": 160}}) as r:
        lines = r.iter_lines()   # held: once this iterator is dropped the stream closes, and that is Stop
        for line in lines:
            if line.startswith("data: ") and json.loads(line[6:])["type"] == "code":
                break
        # the cell's first line has written its file: it is sleeping in the kernel now
        wait_for(lambda: "started.txt" in [f["name"] for f in httpx.get(files).json()], "the cell to start")
    # Stop (the connection closed mid-run): the cell's run ends as stopped, not at its time limit
    # (30 s; a cell left to run would be stored as "Timed out after 30 s")
    [observation] = wait_for(lambda: [m for m in messages(base, cid) if m["role"] == "observation"],
                             "the stopped run to be stored")
    assert not observation["extras"]["ok"]
    assert observation["extras"]["output"].startswith("Stopped; the kernel was restarted"), observation
    # and the conversation is free again
    assert say_once_free(base, cid, "x", max_new_tokens=1)[-1]["type"] == "done"


def test_the_stop_endpoint_returns_once_the_answer_is_stored(base):
    import threading
    cid = httpx.post(base + "/api/conversations", json={}).json()["id"]
    assert httpx.post(f"{base}/api/conversations/{cid}/stop").json() == {"stopped": False}   # nothing running
    seen = threading.Event()

    def listen():
        with httpx.stream("POST", f"{base}/api/conversations/{cid}/messages", timeout=120,
                          json={"content": "Write a long story.", "settings": {"max_new_tokens": 1000}}) as r:
            for line in r.iter_lines():
                if '"text"' in line:
                    seen.set()
    t = threading.Thread(target=listen)
    t.start()
    assert seen.wait(60)
    assert httpx.post(f"{base}/api/conversations/{cid}/stop", timeout=60).json() == {"stopped": True}
    stored = messages(base, cid)        # no waiting: stored before /stop answered
    assert [m["role"] for m in stored] == ["user", "assistant"] and stored[1]["extras"]["stopped"] is True
    t.join(30)
    assert not t.is_alive()             # and the stream ended


def test_the_api_runs_tools_for_the_default_model_too(base):
    """glmkit_run_tools is accepted for a model with no tool protocol of its own (the tagged
    convention), as the console and the terminal run the same agent on it."""
    r = httpx.post(base + "/v1/chat/completions", timeout=120, json={
        "model": "default", "messages": [{"role": "user", "content": "multiply"}], "temperature": 0,
        "max_tokens": 40, "glmkit_run_tools": True})
    assert r.status_code == 200, r.text
    step = r.json()["glmkit_steps"][0]
    assert (step["name"], step["arguments"], json.loads(step["observation"])["result"]) == \
        ("calculator", {"expression": "6*7"}, 42)


def test_run_a_persons_code_in_the_conversation_kernel(base):
    cid = httpx.post(base + "/api/conversations", json={"mode": "code"}).json()["id"]
    r = httpx.post(f"{base}/api/conversations/{cid}/run", timeout=120, json={"code": "x = 20\nprint(x + 1)"})
    assert r.status_code == 200 and r.json()["ok"] and r.json()["output"].strip() == "21", r.text
    again = httpx.post(f"{base}/api/conversations/{cid}/run", timeout=120, json={"code": "print(x * 2)\n1/0"}).json()
    assert not again["ok"] and "40" in again["output"] and "ZeroDivisionError" in again["output"]   # same kernel
    stored = messages(base, cid)
    assert [(m["role"], m["extras"].get("by")) for m in stored] == [("assistant", "user"), ("observation", "user")] * 2
    assert "x = 20" in stored[0]["content"] and stored[1]["extras"]["output"].strip() == "21"
    # refused: outside Code mode, and with no code; nothing stored
    chat = httpx.post(base + "/api/conversations", json={}).json()["id"]
    assert httpx.post(f"{base}/api/conversations/{chat}/run", json={"code": "print(1)"}).status_code == 400
    assert httpx.post(f"{base}/api/conversations/{cid}/run", json={"code": ""}).status_code == 400
    assert messages(base, chat) == [] and len(messages(base, cid)) == 4
