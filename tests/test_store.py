"""The conversation store: migrations, owners, concurrent writers, and kill -9 mid-write."""

import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import time

import pytest

from glmkit.server.store import MIGRATIONS, NotFound, Store, owner_of


def test_migrations_from_an_empty_database(tmp_path):
    s = Store(tmp_path / "c.db")
    assert s.version == len(MIGRATIONS)
    assert sqlite3.connect(tmp_path / "c.db").execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    Store(tmp_path / "c.db")   # reopening runs nothing twice
    assert Store(tmp_path / "c.db").version == len(MIGRATIONS)


def test_crud_owners_and_export(tmp_path):
    s = Store(tmp_path / "c.db")
    alice, bob = owner_of("key-a"), owner_of("key-b")
    assert alice != bob and "key-a" not in alice
    c = s.create(alice, "First", mode="code", settings={"temperature": 0.6})
    s.append(alice, c["id"], "user", "你好 $x^2$")
    s.append(alice, c["id"], "assistant", "Hello!", extras={"images": []})
    s.append(alice, c["id"], "assistant", "print(1)", metadata="interpreter")
    assert [m["seq"] for m in s.get(alice, c["id"])["messages"]] == [1, 2, 3]
    assert s.list(bob) == [] and [x["id"] for x in s.list(alice)] == [c["id"]]
    with pytest.raises(NotFound):
        s.get(bob, c["id"])
    with pytest.raises(NotFound):
        s.append(bob, c["id"], "user", "intrusion")
    s.rename(alice, c["id"], "Renamed")
    s.truncate(alice, c["id"], 1)
    conv = s.get(alice, c["id"])
    assert conv["title"] == "Renamed" and len(conv["messages"]) == 1 and conv["settings"] == {"temperature": 0.6}
    assert s.export_markdown(alice, c["id"]).startswith("# Renamed")
    assert '"你好 $x^2$"' in s.export_json(alice, c["id"])
    s.delete(alice, c["id"])
    assert s.list(alice) == []


def _writer(path, owner, n):
    s = Store(path)
    c = s.create(owner, f"writer {owner}")
    for i in range(n):
        s.append(owner, c["id"], "user", f"message {i}")


def test_concurrent_writers(tmp_path):
    path = tmp_path / "c.db"
    Store(path)
    procs = [mp.get_context("spawn").Process(target=_writer, args=(str(path), f"w{i}", 60)) for i in range(4)]
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


def test_kill_9_loses_nothing_committed(tmp_path):
    path = tmp_path / "c.db"
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
    assert sqlite3.connect(path).execute("PRAGMA integrity_check").fetchone()[0] == "ok"


def test_search_is_full_text_owner_scoped_and_follows_edits(tmp_path):
    # a database written before the search index (version 2) gets it, with its old messages
    old = sqlite3.connect(tmp_path / "c.db")
    old.execute("CREATE TABLE schema_version (version INTEGER NOT NULL)")
    old.execute("INSERT INTO schema_version VALUES (2)")
    for sql in MIGRATIONS[:2]:
        old.executescript(sql)
    old.execute("INSERT INTO conversations VALUES ('c0', ?, 'Old', 'chat', '{}', 1, 1)", (owner_of("key-a"),))
    old.execute("INSERT INTO messages (conversation_id, seq, role, content, created) "
                "VALUES ('c0', 1, 'assistant', 'An archived Zanzibar note', 1)")
    old.commit()
    old.close()
    s = Store(tmp_path / "c.db")
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
    assert s.search(alice, 'beaches"* NEAR(') == [] and len(s.search(alice, '(beaches"*')) == 1 and s.search(alice, '"*()') == []   # text, not syntax
    s.truncate(alice, a["id"], 1)                         # the reply is gone, and so is the hit
    assert [c["id"] for c in s.search(alice, "zanzibar")] == ["c0"]
    s.delete(alice, "c0")
    assert s.search(alice, "zanzibar") == []
