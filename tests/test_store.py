"""The conversation store: migrations, owners, concurrent writers, and kill -9 mid-write.

Every test runs on both databases the store supports: a SQLite file (the default) and a fresh
database on a throwaway PostgreSQL server (conftest's `postgres`; those runs are skipped, saying
why, where PostgreSQL or psycopg is not installed)."""

import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time

import pytest

from glmkit.server.store import MIGRATIONS, NotFound, Store, owner_of


@pytest.fixture(params=["sqlite", "postgresql"])
def where(request, tmp_path):
    """Where a test's store lives: a SQLite file's path, or a new PostgreSQL database's URL."""
    if request.param == "sqlite":
        return tmp_path / "c.db"
    return request.getfixturevalue("postgres").new_database()


def is_sqlite(where) -> bool:
    return not str(where).startswith("postgresql://")


def count(store: Store, table: str) -> int:
    return store._db().execute(f"SELECT COUNT(*) AS n FROM {table}").fetchone()["n"]


def test_migrations_from_an_empty_database(where):
    s = Store(where)
    assert s.version == len(MIGRATIONS) and count(s, "schema_version") == 1
    if is_sqlite(where):
        assert sqlite3.connect(where).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    Store(where)   # reopening runs nothing twice
    assert Store(where).version == len(MIGRATIONS)


def test_every_older_version_migrates_to_the_latest(where, request):
    for version in range(len(MIGRATIONS)):
        if is_sqlite(where):
            at = where.with_name(f"v{version}.db")
        else:
            at = request.getfixturevalue("postgres").new_database()
        assert Store(at, version=version).version == version
        s = Store(at)
        assert s.version == len(MIGRATIONS) and count(s, "schema_version") == 1
        c = s.create("local", "after the migrations", model="m")    # the newest schema (migration 4) works
        s.append("local", c["id"], "user", "searchable text")
        assert [x["id"] for x in s.search("local", "searchable")] == [c["id"]]


def test_concurrent_first_opens_migrate_once(where):
    # several gateways (here threads, each with a Store and so a connection of its own) opening a
    # new database at the same moment: one migrates, the others wait for it and find it done
    start, opened, failed = threading.Barrier(6), [], []

    def open_it():
        start.wait()
        try:
            opened.append(Store(where).version)
        except Exception as e:          # reported below, with what it was
            failed.append(repr(e))

    threads = [threading.Thread(target=open_it) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert failed == [] and opened == [len(MIGRATIONS)] * 6
    assert count(Store(where), "schema_version") == 1


def test_crud_owners_and_export(where):
    s = Store(where)
    alice, bob = owner_of("key-a"), owner_of("key-b")
    assert alice != bob and "key-a" not in alice
    c = s.create(alice, "First", mode="code", settings={"temperature": 0.6})
    s.append(alice, c["id"], "user", "你好 $x^2$")
    s.append(alice, c["id"], "assistant", "Hello!", extras={"images": []})
    s.append(alice, c["id"], "assistant", "print(1)", metadata="interpreter")
    assert [m["seq"] for m in s.get(alice, c["id"])["messages"]] == [1, 2, 3]
    assert s.list(bob) == [] and [x["id"] for x in s.list(alice)] == [c["id"]]
    assert abs(s.get(alice, c["id"])["created"] - time.time()) < 60      # a timestamp keeps its seconds
    # another owner can neither see nor change it, and is told nothing more than "not found"
    for intrusion in (lambda: s.get(bob, c["id"]), lambda: s.append(bob, c["id"], "user", "intrusion"),
                      lambda: s.rename(bob, c["id"], "Mine"), lambda: s.update_settings(bob, c["id"], {}),
                      lambda: s.update_mode(bob, c["id"], "chat"), lambda: s.update_model(bob, c["id"], "x"),
                      lambda: s.truncate(bob, c["id"], 0), lambda: s.delete(bob, c["id"])):
        with pytest.raises(NotFound):
            intrusion()
    assert s.search(bob, "你好") == [] and s.search(bob, "First") == []
    s.rename(alice, c["id"], "Renamed")
    s.truncate(alice, c["id"], 1)
    conv = s.get(alice, c["id"])
    assert conv["title"] == "Renamed" and len(conv["messages"]) == 1 and conv["settings"] == {"temperature": 0.6}
    assert conv["mode"] == "code" and conv["messages"][0]["content"] == "你好 $x^2$"
    assert s.export_markdown(alice, c["id"]).startswith("# Renamed")
    assert '"你好 $x^2$"' in s.export_json(alice, c["id"])
    # a NUL is stored (PostgreSQL's text cannot hold one: it is kept there as U+FFFD)
    s.append(alice, c["id"], "user", "a\x00b")
    assert s.get(alice, c["id"])["messages"][-1]["content"] in ("a\x00b", "a\ufffdb")
    s.delete(alice, c["id"])
    assert s.list(alice) == []


def test_responses_are_kept_per_owner(where):
    s = Store(where)
    alice, bob = owner_of("key-a"), owner_of("key-b")
    messages = [{"role": "user", "content": "你好"}, {"role": "assistant", "content": "Hi"}]
    s.save_response(alice, "resp_1", None, messages, {"id": "resp_1", "output_text": "Hi"})
    s.save_response(alice, "resp_2", "resp_1", messages * 2, {"id": "resp_2"})
    assert s.get_response(alice, "resp_1") == {"messages": messages, "response": {"id": "resp_1", "output_text": "Hi"}}
    assert s.get_response(alice, "resp_2")["messages"] == messages * 2
    for intrusion in (lambda: s.get_response(bob, "resp_1"), lambda: s.delete_response(bob, "resp_1")):
        with pytest.raises(NotFound):
            intrusion()
    s.delete_response(alice, "resp_1")
    with pytest.raises(NotFound):
        s.get_response(alice, "resp_1")
    with pytest.raises(NotFound):
        s.delete_response(alice, "resp_1")


def _writer(path, owner, n):
    s = Store(path)
    c = s.create(owner, f"writer {owner}")
    for i in range(n):
        s.append(owner, c["id"], "user", f"message {i}")


def test_concurrent_writers(where):
    path = str(where)
    Store(path)
    procs = [mp.get_context("spawn").Process(target=_writer, args=(path, f"w{i}", 60)) for i in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    s = Store(path)
    for i in range(4):
        [conv] = s.list(f"w{i}")
        assert [m["content"] for m in s.get(f"w{i}", conv["id"])["messages"]] == [f"message {k}" for k in range(60)]


KILL_SCRIPT = r"""
import sys
from glmkit.server.store import Store
s = Store(sys.argv[1])
c = s.create("local", "crash test")
print(c["id"], flush=True)
i = 0
while True:
    s.append("local", c["id"], "user", f"m{i}")
    print(i, flush=True)
    i += 1
"""


def test_concurrent_appends_to_one_conversation_take_turns(where):
    s = Store(where)
    cid = s.create("local", "busy")["id"]
    start, failed = threading.Barrier(4), []

    def writer(k):
        start.wait()
        try:
            for i in range(25):
                s.append("local", cid, "user", f"{k}:{i}")     # each thread: a connection of its own
        except Exception as e:
            failed.append(repr(e))

    threads = [threading.Thread(target=writer, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    messages = s.get("local", cid)["messages"]
    assert failed == [] and [m["seq"] for m in messages] == list(range(1, 101))
    for k in range(4):
        assert [m["content"] for m in messages if m["content"].startswith(f"{k}:")] == [f"{k}:{i}" for i in range(25)]


def test_kill_9_loses_nothing_committed(where):
    path = str(where)
    proc = subprocess.Popen([sys.executable, "-c", KILL_SCRIPT, str(path)], stdout=subprocess.PIPE, text=True)
    cid = proc.stdout.readline().strip()
    acknowledged = -1
    deadline = time.time() + 30
    while acknowledged < 300 and time.time() < deadline:
        acknowledged = int(proc.stdout.readline())
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    conv = Store(path).get("local", cid)
    contents = [m["content"] for m in conv["messages"]]
    # every append acknowledged before the kill is there; the writer may have committed a few more
    # (it runs ahead of our reading), and what is there is an untorn prefix, in order
    assert len(contents) >= acknowledged + 1
    assert contents == [f"m{i}" for i in range(len(contents))]
    if is_sqlite(where):
        assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_search_is_full_text_owner_scoped_and_follows_edits(where):
    # a database written before the search index (version 2) gets it, with its old messages
    old = Store(where, version=2)
    with old._tx() as db:
        db.execute("INSERT INTO conversations VALUES ('c0', ?, 'Old', 'chat', '{}', 1, 1)", (owner_of("key-a"),))
        db.execute("INSERT INTO messages (conversation_id, seq, role, content, created) "
                   "VALUES ('c0', 1, 'assistant', 'An archived Zanzibar note', 1)")
    old.close()
    s = Store(where)
    alice, bob = owner_of("key-a"), owner_of("key-b")
    assert [c["id"] for c in s.search(alice, "zanzibar")] == ["c0"]
    a = s.create(alice, "Trip planning")
    s.append(alice, a["id"], "user", "Where should I go?")
    s.append(alice, a["id"], "assistant", "Try Zanzibar: the beaches of Zanzíbar are lovely.")
    b = s.create(bob, "Bob's")
    s.append(bob, b["id"], "assistant", "Zanzibar for Bob")
    found = s.search(alice, "ZANZIB")                     # a prefix, any case
    assert {c["id"] for c in found} == {"c0", a["id"]} and "Zanzibar" in found[0]["match"]
    assert [c["id"] for c in s.search(bob, "zanzibar")] == [b["id"]]     # never another owner's
    assert [c["id"] for c in s.search(alice, "planning")] == [a["id"]]    # titles too
    assert [c["id"] for c in s.search(alice, "PLAN")] == [a["id"]]        # any case
    s.append(bob, b["id"], "user", "你好世界")
    assert [c["id"] for c in s.search(bob, "你好")] == [b["id"]] and s.search(alice, "你好") == []
    assert s.search(alice, 'beaches"* NEAR(') == [] and len(s.search(alice, '(beaches"*')) == 1 and s.search(alice, '"*()') == []   # text, not syntax
    s.truncate(alice, a["id"], 1)                         # the reply is gone, and so is the hit
    assert [c["id"] for c in s.search(alice, "zanzibar")] == ["c0"]
    s.delete(alice, "c0")
    assert s.search(alice, "zanzibar") == []
