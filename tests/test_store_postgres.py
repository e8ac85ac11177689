"""`glmkit serve --database postgresql://...`: the console's store on a real PostgreSQL (conftest's
`postgres`, a throwaway server from Debian's package; skipped, saying why, where it is not
installed).  The store's own tests run on PostgreSQL too, in test_store.py."""

import subprocess

import httpx
import pytest

from conftest import TINY, glmkit_bin
from glmkit.server.store import Store, owner_of
from glmkit.server.store_sql import StoreUnavailable
from server_helpers import running_server


def H(key):
    return {"Authorization": f"Bearer {key}"}


def test_serve_keeps_the_console_and_responses_in_postgresql(postgres, tmp_path):
    url = postgres.new_database()
    with running_server("--model", str(TINY), "--data-dir", str(tmp_path), "--database", url,
                        "--api-key", "alice", "--api-key", "bob", "--no-embeddings") as (base, _):
        c = httpx.post(base + "/api/conversations", json={"title": "Shared"}, headers=H("alice")).json()
        r = httpx.post(f"{base}/api/conversations/{c['id']}/messages", headers=H("alice"), timeout=60,
                       json={"content": "Quokka facts", "settings": {"temperature": 0, "max_new_tokens": 4}})
        assert r.status_code == 200 and '"type": "done"' in r.text
        found = httpx.get(base + "/api/conversations", params={"q": "quokka"}, headers=H("alice")).json()
        assert [x["id"] for x in found] == [c["id"]] and "Quokka" in found[0]["match"]
        assert httpx.get(base + "/api/conversations", headers=H("bob")).json() == []
        assert httpx.get(f"{base}/api/conversations/{c['id']}", headers=H("bob")).status_code == 404
        rid = httpx.post(base + "/v1/responses", json={"input": "hi", "max_output_tokens": 4}, headers=H("alice"),
                         timeout=60).json()["id"]
        assert httpx.get(f"{base}/v1/responses/{rid}", headers=H("alice")).status_code == 200
        assert httpx.get(f"{base}/v1/responses/{rid}", headers=H("bob")).status_code == 404
    # it is all in PostgreSQL, where another gateway finds it; none of it in the data directory
    shared = Store(url)
    conv = shared.get(owner_of("alice"), c["id"])
    assert [m["role"] for m in conv["messages"]] == ["user", "assistant"] and conv["title"] == "Shared"
    assert shared.get_response(owner_of("alice"), rid)["messages"][0]["content"] == "hi"
    assert not (tmp_path / "conversations.db").exists()


def test_a_store_that_goes_down_mid_reply_fails_the_response_not_the_connection(postgres, tmp_path):
    """The database goes away while a response is written: a stream (200 sent long before) ends
    with an `error` event and `response.failed`, a whole response is the 503 any store failure
    is; neither names the database.  Once it is back, the next response is kept."""
    import json

    import psycopg
    url = postgres.new_database()
    name = url.rsplit("/", 1)[1]
    with running_server("--model", str(TINY), "--data-dir", str(tmp_path), "--database", url,
                        "--no-embeddings") as (base, _):
        body = {"input": "hi", "max_output_tokens": 4}
        assert httpx.post(base + "/v1/responses", json=body, timeout=60).status_code == 200
        with psycopg.connect(postgres.url(), autocommit=True) as admin:
            # no new connections, and the gateway's open ones dropped: every store call now fails
            admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
            admin.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s", (name,))
            try:
                with httpx.stream("POST", base + "/v1/responses", json={**body, "stream": True}, timeout=60) as r:
                    assert r.status_code == 200
                    events = [json.loads(line[6:]) for line in r.iter_lines() if line.startswith("data: ")]
                assert [e["type"] for e in events[-2:]] == ["error", "response.failed"]
                assert events[-2]["code"] == "store_unavailable" and "127.0.0.1" not in json.dumps(events)
                failed = events[-1]["response"]
                assert failed["status"] == "failed" and failed["error"]["code"] == "store_unavailable"
                assert any(e["type"] == "response.output_text.delta" for e in events)   # the reply did stream
                whole = httpx.post(base + "/v1/responses", json=body, timeout=60)
                assert whole.status_code == 503 and whole.json()["error"]["code"] == "store_unavailable"
                assert "127.0.0.1" not in whole.text
            finally:
                admin.execute(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        again = httpx.post(base + "/v1/responses", json=body, timeout=60)
        assert again.status_code == 200
        assert httpx.get(f"{base}/v1/responses/{again.json()['id']}").status_code == 200


def serve_fails(*args) -> str:
    out = subprocess.run([glmkit_bin(), "serve", "--model", str(TINY), "--no-embeddings", *args],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    [line] = out.stderr.splitlines()
    return line


def test_a_database_that_cannot_be_opened_is_one_line_at_startup(postgres):
    # a role the server does not know (the login refused), with a password that must not be shown
    line = serve_fails("--database", postgres.url("t_none", user="intruder:s3cret"))
    assert line.startswith(f"glmkit: error: postgresql://intruder:***@127.0.0.1:{postgres.port}/t_none: ")
    assert "intruder" in line.split(": ", 2)[2] and "s3cret" not in line
    # no server at that address (port 1: nothing listens there)
    line = serve_fails("--database", "postgresql://glmkit:pw@127.0.0.1:1/db")
    assert "postgresql://glmkit:***@127.0.0.1:1/db: cannot connect" in line and ":pw@" not in line
    assert "postgresql://" in serve_fails("--database", "sqlite:///tmp/x.db")


def test_a_dropped_connection_fails_one_call_and_the_next_reconnects(postgres):
    import psycopg
    s = Store(postgres.new_database())
    cid = s.create("local", "kept")["id"]
    with psycopg.connect(postgres.url(), autocommit=True) as admin:      # as a restart would
        admin.execute("SELECT pg_terminate_backend(%s)", (s._db().conn.info.backend_pid,))
    with pytest.raises(StoreUnavailable, match="127.0.0.1"):             # a 503 for the request that meets it
        s.list("local")
    assert [c["id"] for c in s.list("local")] == [cid]


def test_an_unreachable_store_is_a_503_that_names_no_database():
    from fastapi import FastAPI
    from fastapi.testclient import TestClient

    from glmkit.server.errors import add_error_handlers
    app = FastAPI()
    add_error_handlers(app)

    @app.get("/api/conversations")
    def down():
        raise StoreUnavailable("postgresql://glmkit:***@db.internal/chat: connection refused")

    r = TestClient(app).get("/api/conversations")
    assert r.status_code == 503 and r.headers["retry-after"] == "5"
    assert r.json()["error"]["code"] == "store_unavailable" and "db.internal" not in r.text
