"""The web console's JSON API on a real server: pages, auth and per-key isolation (modes: test_console_modes)."""

import json

import httpx
import pytest

from conftest import TINY
from server_helpers import running_server


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    with running_server("--model", str(TINY), "--data-dir", str(data), "--api-key", "alice", "--api-key", "bob",
                        "--no-embeddings") as (url, _):
        yield url


def H(key):
    return {"Authorization": f"Bearer {key}"}


def sse(r):
    return [json.loads(line[6:]) for line in r.text.splitlines() if line.startswith("data: ")]


def test_page_and_static_files_are_served_offline(base):
    import re
    page = httpx.get(base + "/")
    assert page.status_code == 200 and "/static/app.js" in page.text
    # everything the page loads comes from this server: no absolute URL in a src or href
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert refs and all(r.startswith("/static/") for r in refs), refs
    for ref in refs:
        assert httpx.get(base + ref).status_code == 200, ref
    assert "http" not in httpx.get(base + "/static/app.js").text
    assert httpx.get(base + "/static/../app.py").status_code == 404
    assert httpx.get(base + "/static/vendor/../../app.py").status_code == 404


def test_conversation_lifecycle_and_owners(base):
    assert httpx.get(base + "/api/conversations").status_code == 401
    c = httpx.post(base + "/api/conversations", json={}, headers=H("alice")).json()
    r = httpx.post(base + f"/api/conversations/{c['id']}/messages",
                   json={"content": "你好", "settings": {"temperature": 0, "max_new_tokens": 8}}, headers=H("alice"))
    events = sse(r)
    assert events[-1]["type"] == "done"
    text = "".join(e["text"] for e in events if e["type"] == "text")
    conv = httpx.get(base + f"/api/conversations/{c['id']}", headers=H("alice")).json()
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant"]
    assert conv["messages"][1]["content"] == text and conv["title"] == "你好"
    # another key sees nothing of it
    assert httpx.get(base + "/api/conversations", headers=H("bob")).json() == []
    assert httpx.get(base + f"/api/conversations/{c['id']}", headers=H("bob")).status_code == 404
    # regenerate replaces the answer; rename; export; delete
    r2 = httpx.post(base + f"/api/conversations/{c['id']}/messages", json={"regenerate": True,
                    "settings": {"temperature": 0, "max_new_tokens": 8}}, headers=H("alice"))
    assert sse(r2)[-1]["type"] == "done"
    assert len(httpx.get(base + f"/api/conversations/{c['id']}", headers=H("alice")).json()["messages"]) == 2
    httpx.patch(base + f"/api/conversations/{c['id']}", json={"title": "Renamed"}, headers=H("alice"))
    md = httpx.get(base + f"/api/conversations/{c['id']}/export?format=md", headers=H("alice")).text
    assert md.startswith("# Renamed") and "你好" in md
    assert httpx.delete(base + f"/api/conversations/{c['id']}", headers=H("alice")).status_code == 200
    assert httpx.get(base + "/api/conversations", headers=H("alice")).json() == []


def test_a_server_restart_keeps_conversations_and_files(tmp_path):
    args = ("--model", str(TINY), "--data-dir", str(tmp_path), "--no-embeddings", "--code")
    with running_server(*args) as (url, _):
        cid = httpx.post(url + "/api/conversations", json={"mode": "code", "settings": {"top_k": 3}}).json()["id"]
        httpx.put(f"{url}/api/conversations/{cid}/files/notes.txt", content="keep me".encode())
        sse(httpx.post(f"{url}/api/conversations/{cid}/messages",
                       json={"content": "你好", "settings": {"temperature": 0, "max_new_tokens": 4}}, timeout=60))
        before = httpx.get(f"{url}/api/conversations/{cid}").json()
    with running_server(*args) as (url, _):
        after = httpx.get(f"{url}/api/conversations/{cid}").json()
        assert after == before and [m["role"] for m in after["messages"]][:2] == ["user", "assistant"]
        assert after["settings"] == {"top_k": 3} and after["mode"] == "code"
        assert httpx.get(f"{url}/api/conversations/{cid}/files/notes.txt").text == "keep me"


def test_x_api_key_clients_are_their_own_owner(base):
    c = httpx.post(base + "/api/conversations", json={"title": "via X-API-Key"}, headers={"X-API-Key": "alice"}).json()
    assert c["id"] in [x["id"] for x in httpx.get(base + "/api/conversations", headers=H("alice")).json()]
    assert c["id"] not in [x["id"] for x in httpx.get(base + "/api/conversations", headers={"X-API-Key": "bob"}).json()]
    httpx.delete(f"{base}/api/conversations/{c['id']}", headers=H("alice"))


def test_search_usage_export_name_and_no_cdn_docs(base):
    c = httpx.post(base + "/api/conversations", json={"title": "Trip to Paris!"}, headers=H("alice")).json()
    events = sse(httpx.post(base + f"/api/conversations/{c['id']}/messages", timeout=60, headers=H("alice"),
                            json={"content": "Quokka facts", "settings": {"temperature": 0, "max_new_tokens": 4}}))
    done = events[-1]
    # the final event carries usage and speed, and the reply is stored with them
    assert done["type"] == "done" and done["usage"]["completion_tokens"] == 4 and done["usage"]["prompt_tokens"] > 0
    assert done["finish_reason"] == "length" and done["tokens_per_second"] > 0
    reply = httpx.get(base + f"/api/conversations/{c['id']}", headers=H("alice")).json()["messages"][-1]
    assert reply["extras"]["usage"] == done["usage"] and reply["extras"]["finish_reason"] == "length"
    # full-text search, by the owner only
    found = httpx.get(base + "/api/conversations", params={"q": "quokka"}, headers=H("alice")).json()
    assert [x["id"] for x in found] == [c["id"]] and "Quokka" in found[0]["match"]
    assert httpx.get(base + "/api/conversations", params={"q": "quokka"}, headers=H("bob")).json() == []
    assert httpx.get(base + "/api/conversations", params={"q": "x" * 201}, headers=H("alice")).status_code == 400
    # an export is named after its conversation
    r = httpx.get(base + f"/api/conversations/{c['id']}/export?format=md", headers=H("alice"))
    assert r.headers["content-disposition"].endswith("trip-to-paris.md")
    # the tiny ChatGLM3 has the native protocol: no small-model note
    assert httpx.get(base + "/api/config", headers=H("alice")).json()["note"] is None
    # no page that would load Swagger UI from a CDN; the schema stays
    assert httpx.get(base + "/docs").status_code == 404 and httpx.get(base + "/openapi.json").status_code == 200
    httpx.delete(f"{base}/api/conversations/{c['id']}", headers=H("alice"))
