"""The console's JSON API under hostile input, on a real `glmkit serve` (D7 and its neighbours).

Bad input gets one readable 4xx message and changes nothing; a bad value already in the store
(written by an older version) is dropped when read, never a 500 and never a locked-out key."""

import json
import sqlite3

import httpx
import pytest

from conftest import TINY
from glmkit.server.store import owner_of
from server_helpers import running_server

LIMIT = 256                      # the server's --max-tokens
KEY = {"Authorization": "Bearer alice"}
JSON = {**KEY, "Content-Type": "application/json"}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    data = tmp_path_factory.mktemp("data")
    with running_server("--model", str(TINY), "--data-dir", str(data), "--api-key", "alice",
                        "--max-tokens", str(LIMIT), "--no-embeddings") as (url, proc):
        with httpx.Client(base_url=url, headers=KEY, timeout=60) as client:
            yield client, data / "conversations.db", proc


@pytest.fixture
def api(server):
    return server[0]


@pytest.fixture
def conv(api):
    """A conversation with one exchange and some settings, and a way to check it is unchanged."""
    c = api.post("/api/conversations", json={"title": "Kept", "settings": {"temperature": 0.5, "top_k": 3}}).json()
    r = api.post(f"/api/conversations/{c['id']}/messages", json={"content": "你好", "settings": {"max_new_tokens": 4}})
    assert r.status_code == 200 and '"done"' in r.text
    c = api.get(f"/api/conversations/{c['id']}").json()
    yield c
    api.delete(f"/api/conversations/{c['id']}")


def raw(api, method, path, body: str | bytes, headers=JSON):
    return api.request(method, path, content=body.encode() if isinstance(body, str) else body, headers=headers)


def refused(r, *words, status=(400, 413, 415, 422)):
    """One readable message, a 4xx."""
    assert r.status_code in status, (r.status_code, r.text)
    msg = r.json()["error"]["message"]
    assert isinstance(msg, str) and msg.strip() and "\n" not in msg and "internal" not in msg, msg
    for w in words:
        assert w.lower() in msg.lower(), msg
    return msg


def unchanged(api, conv):
    now = api.get(f"/api/conversations/{conv['id']}")
    assert now.status_code == 200, now.text
    now = now.json()
    assert {k: now[k] for k in ("title", "mode", "settings", "messages")} == \
        {k: conv[k] for k in ("title", "mode", "settings", "messages")}


# -- the reproductions from the issue --------------------------------------------------------
@pytest.mark.parametrize("settings", ['{"top_k": Infinity}', '{"max_new_tokens": Infinity}',
                                      '{"temperature": NaN}', '{"top_p": -Infinity}', '{"repetition_penalty": 1e400}'])
def test_non_finite_settings_are_refused_on_create(api, settings):
    before = api.get("/api/conversations").json()
    refused(raw(api, "POST", "/api/conversations", '{"settings": %s}' % settings))
    assert api.get("/api/conversations").json() == before


def test_system_must_be_a_string(api, conv):
    refused(api.post("/api/conversations", json={"settings": {"system": 5}}), "system")
    refused(api.patch(f"/api/conversations/{conv['id']}", json={"settings": {"system": 5}}), "system")
    refused(api.post(f"/api/conversations/{conv['id']}/messages",
                     json={"content": "again", "settings": {"system": 5}}), "system")
    refused(api.post("/api/conversations", json={"settings": {"system": "x" * 100_001}}), "system")
    unchanged(api, conv)


def test_a_patch_with_infinity_is_refused_and_the_key_is_not_locked_out(api, conv):
    refused(raw(api, "PATCH", f"/api/conversations/{conv['id']}", '{"settings": {"top_k": Infinity}}'), "Infinity")
    assert api.get("/api/conversations").status_code == 200
    unchanged(api, conv)


def test_non_finite_settings_in_a_message_store_nothing(api, conv):
    for body in ('{"content": "x", "settings": {"max_new_tokens": Infinity}}',
                 '{"content": "x", "settings": {"top_k": NaN}}', '{"content": NaN}', '{"edit_seq": Infinity}'):
        refused(raw(api, "POST", f"/api/conversations/{conv['id']}/messages", body))
    unchanged(api, conv)


def test_max_new_tokens_is_limited_by_the_server(api, conv):
    assert api.get("/api/config").json()["defaults"]["max_new_tokens"] <= LIMIT
    refused(api.post("/api/conversations", json={"settings": {"max_new_tokens": LIMIT + 1}}), str(LIMIT))
    refused(api.patch(f"/api/conversations/{conv['id']}", json={"settings": {"max_new_tokens": 10**6}}), str(LIMIT))
    refused(api.post(f"/api/conversations/{conv['id']}/messages",
                     json={"content": "x", "settings": {"max_new_tokens": LIMIT + 1}}), str(LIMIT))
    for bad in (0, -1, 2.5, "many"):
        refused(api.patch(f"/api/conversations/{conv['id']}", json={"settings": {"max_new_tokens": bad}}))
    unchanged(api, conv)
    ok = api.patch(f"/api/conversations/{conv['id']}", json={"settings": {"max_new_tokens": LIMIT}})
    assert ok.status_code == 200 and ok.json()["settings"] == {"max_new_tokens": LIMIT}


# -- a bad value already in the store ----------------------------------------------------------
def test_a_bad_value_stored_by_an_older_version_is_dropped_on_read(server, api):
    _, db_path, _ = server
    cid = api.post("/api/conversations", json={"title": "old"}).json()["id"]
    db = sqlite3.connect(db_path, timeout=30)
    # as an earlier glmkit stored them: json.dumps writes Infinity; any type was accepted
    db.execute("UPDATE conversations SET settings = ? WHERE id = ?", (json.dumps(
        {"top_k": float("inf"), "temperature": 0.5, "system": 5, "max_new_tokens": 10**6, "evil": 1,
         "top_p": float("nan")}), cid))
    db.commit()
    db.close()
    listed = api.get("/api/conversations")
    assert listed.status_code == 200, listed.text
    got = api.get(f"/api/conversations/{cid}")
    assert got.status_code == 200, got.text
    conv = got.json()
    assert conv["settings"] == {"temperature": 0.5}          # the rest dropped: defaults apply
    assert next(c for c in listed.json() if c["id"] == cid)["settings"] == {"temperature": 0.5}
    warned = " ".join(conv["warnings"])
    assert all(k in warned for k in ("top_k", "system", "max_new_tokens", "evil", "top_p")), warned
    assert api.get(f"/api/conversations/{cid}/export?format=json").status_code == 200
    json.loads(api.get(f"/api/conversations/{cid}/export?format=json").text)    # standard JSON
    # the conversation still answers, and a PATCH writes clean settings back
    r = api.post(f"/api/conversations/{cid}/messages", json={"content": "hi", "settings": {"max_new_tokens": 4}})
    assert r.status_code == 200 and '"done"' in r.text
    fixed = api.patch(f"/api/conversations/{cid}", json={"settings": {"top_k": 2}}).json()
    assert fixed["settings"] == {"top_k": 2} and "warnings" not in fixed


def test_rows_an_older_version_or_a_hand_edit_could_leave_are_readable(server, api):
    _, db_path, _ = server
    owner = owner_of("alice")
    db = sqlite3.connect(db_path, timeout=30)
    rows = {
        "a" * 32: ("t", "chat", "not json at all"),
        "b" * 32: ("t", "chat", "[1, 2]"),
        "c" * 32: ("t", "weird-mode", '{"top_k": "many"}'),
        "d" * 32: (b"\xff\xfe blob title", "chat", "{}"),
        "e" * 32: (42, "chat", "{}"),
    }
    for cid, (title, mode, settings) in rows.items():
        db.execute("INSERT INTO conversations (id, owner, title, mode, settings, created, updated) "
                   "VALUES (?, ?, ?, ?, ?, 1.0, 1.0)", (cid, owner, title, mode, settings))
    db.execute("INSERT INTO messages (conversation_id, seq, role, content, metadata, extras, created) "
               "VALUES (?, 1, 'user', CAST(X'68C3FF6921' AS TEXT), '', 'garbage', 1.0)", ("a" * 32,))
    db.execute("INSERT INTO messages (conversation_id, seq, role, content, metadata, extras, created) "
               "VALUES (?, 2, 'observation', 'x', 7, '{\"ok\": NaN, \"output\": \"x\"}', 1.0)", ("a" * 32,))
    db.commit()
    db.close()
    try:
        listed = api.get("/api/conversations")
        assert listed.status_code == 200, listed.text
        assert set(rows) <= {c["id"] for c in listed.json()}
        for cid in rows:
            got = api.get(f"/api/conversations/{cid}")
            assert got.status_code == 200, (cid, got.text)
            c = got.json()
            assert isinstance(c["title"], str) and c["mode"] in ("chat", "tool", "code") and isinstance(c["settings"], dict)
            for fmt in ("md", "json"):
                assert api.get(f"/api/conversations/{cid}/export?format={fmt}").status_code == 200
        a = api.get("/api/conversations/" + "a" * 32).json()
        assert a["settings"] == {} and a["warnings"]
        assert [m["extras"] for m in a["messages"]] == [{}, {"output": "x"}]
        assert a["messages"][0]["content"].startswith("h") and a["messages"][1]["metadata"] == "7"
        assert api.get("/api/conversations/" + "c" * 32).json()["mode"] == "chat"
        r = api.post("/api/conversations/" + "c" * 32 + "/messages", json={"content": "hi", "settings": {"max_new_tokens": 4}})
        assert r.status_code == 200 and '"done"' in r.text
    finally:
        for cid in rows:
            assert api.delete(f"/api/conversations/{cid}").status_code == 200


# -- other bad input ---------------------------------------------------------------------------
def test_wrong_types_get_one_readable_message_and_change_nothing(api, conv):
    cid = conv["id"]
    before = api.get("/api/conversations").json()
    for body in ({"title": 5}, {"title": ["x"]}, {"title": "x" * 201}, {"mode": "evil"}, {"mode": 5},
                 {"settings": "fast"}, {"settings": [1]}, {"settings": {"top_k": "many"}}, {"settings": {"evil": 1}},
                 {"settings": {"top_p": 7}}):
        refused(api.post("/api/conversations", json=body))
    assert api.get("/api/conversations").json() == before
    for body in ({"title": 5}, {"title": None, "settings": {"temperature": -1}}, {"mode": ["chat"]},
                 {"title": "new title", "mode": "code"},          # mode after messages: the title stays too
                 {"title": "new title", "settings": {"top_k": -1}}):
        refused(api.patch(f"/api/conversations/{cid}", json=body))
    for body in ({"content": 5}, {"content": ["x"]}, {"content": "x" * 100_001}, {"content": "   \n "},
                 {"regenerate": "perhaps"}, {"edit_seq": "first"}, {"edit_seq": 1.5}, {"edit_seq": 10**30},
                 {"edit_seq": 2, "content": "x"}, {"content": "x", "settings": None}):
        refused(api.post(f"/api/conversations/{cid}/messages", json=body))
    unchanged(api, conv)


def test_bodies_that_are_not_a_json_object(api, conv):
    cid = conv["id"]
    for method, path in (("POST", "/api/conversations"), ("PATCH", f"/api/conversations/{cid}"),
                         ("POST", f"/api/conversations/{cid}/messages")):
        for body in ("[]", '"x"', "5", "null", "{", '{"title": "a",}', "{'title': 'a'}", "[" * 100_000,
                     b'{"title": "\xff\xfe"}', '{"title": "\\ud800"}', '{"content": "a\\udfff"}',
                     '{"title": 1e999}', '{"edit_seq": ' + "9" * 5000 + "}"):
            msg = refused(raw(api, method, path, body))
            assert "error parsing" not in msg
        refused(raw(api, method, path, '{"title": "x"}', headers={**KEY, "Content-Type": "text/plain"}))
        assert "Infinity" in refused(raw(api, method, path, '{"title": Infinity}'))
    unchanged(api, conv)


def test_a_huge_body_without_a_length_is_cut_off(api, conv):
    def chunks():
        yield b'{"title": "'
        for _ in range(64):
            yield b"a" * 65536
        yield b'"}'
    for method, path in (("POST", "/api/conversations"), ("PATCH", f"/api/conversations/{conv['id']}")):
        r = api.request(method, path, content=chunks(), headers=JSON)
        refused(r, status=(413,))
    unchanged(api, conv)


def test_hostile_fuzz_over_every_console_endpoint(server, api, conv):
    """Hand-written hostile bodies and ids at every console endpoint: never a 5xx, the server
    stays up, and no message is lost."""
    _, _, proc = server
    cid = conv["id"]
    ids = [cid, "0" * 32, "..", "%2e%2e", "%00", "x" * 3000, "%ff", "%ED%A0%80", "é", "a%20b", "null", "-1"]
    bodies = ["", "{}", "[]", "null", "true", "0", '""', "{", "}", "\x00", "NaN", "Infinity",
              '{"settings": null}', '{"settings": {"top_k": 1e309}}', '{"settings": {"temperature": "NaN"}}',
              '{"settings": {"top_k": 9e99}}', '{"settings": {"top_k": -0.0}}', '{"settings": {"": 1}}',
              '{"title": {"$gt": ""}}', '{"title": "\\u0000"}', '{"mode": "chat\\u0000"}', '{"mode": null}',
              '{"content": {"text": "x"}}', '{"content": null, "edit_seq": null, "regenerate": null}',
              '{"regenerate": true}', '{"edit_seq": -1, "content": "x"}', '{"edit_seq": 0, "content": "x"}',
              '{"settings": {"system": null, "max_new_tokens": 0}}', '{"settings": {"system": ["a"]}}',
              '{"__proto__": {"x": 1}}', '{"title": "a", "title": 5}', "[" * 5000 + "]" * 5000,
              b"\xc3\x28", b"\xef\xbb\xbf{}", '{"title": "\\ud83d"}']
    json_endpoints = [("POST", "/api/conversations"), ("PATCH", "/api/conversations/{id}"),
                      ("POST", "/api/conversations/{id}/messages"), ("POST", "/api/conversations/{id}/run")]
    other_endpoints = [("GET", "/api/conversations/{id}"), ("GET", "/api/conversations?q={id}"), ("POST", "/api/conversations/{id}/stop"),
                       ("GET", "/api/conversations/{id}/export?format={id}"), ("GET", "/api/conversations/{id}/files"),
                       ("GET", "/api/conversations/{id}/files/{id}"), ("PUT", "/api/conversations/{id}/files/{id}"),
                       ("DELETE", "/api/conversations/{id}/messages"), ("DELETE", "/api/conversations/{id}")]
    seen = []

    def hit(method, path, body):
        r = raw(api, method, path, body)
        seen.append(r.status_code)
        assert r.status_code < 500, (method, path, body, r.status_code, r.text)
        if r.status_code >= 400:
            refused(r, status=range(400, 500))

    for method, template in json_endpoints:
        for i in (ids[:4] if "{id}" in template else ids[:1]):
            for body in bodies:
                if not (body == '{"regenerate": true}' and i == cid):   # valid: it would answer again
                    hit(method, template.replace("{id}", i), body)
    for method, template in other_endpoints:
        for i in ids:
            if not (method == "DELETE" and i == cid):                 # the one real conversation stays
                for body in ("", "null", '{"settings": {"top_k": Infinity}}', b"\xff"):
                    hit(method, template.replace("{id}", i), body)
    assert proc.poll() is None and api.get("/health").status_code == 200
    assert len(seen) > 400
    # whatever the fuzz created or renamed is a readable conversation; no message was lost
    for c in api.get("/api/conversations").json():
        assert api.get(f"/api/conversations/{c['id']}").status_code == 200
    assert api.get(f"/api/conversations/{cid}").json()["messages"] == conv["messages"]
