"""Conversations kept server-side, in SQLite.

WAL mode (readers never block the writer; a crash loses at most the transaction in flight),
one short transaction per change, and numbered migrations from the very first schema, so a
database written by any earlier glmkit opens in a later one.  Each conversation belongs to an
owner (a hash of the API key that created it, or "local"), and every query is scoped by owner.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sqlite3
import threading
import time
import uuid
from contextlib import contextmanager
from pathlib import Path

MIGRATIONS = [
    # 1: conversations and their messages
    """
    CREATE TABLE conversations (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        title TEXT NOT NULL,
        mode TEXT NOT NULL DEFAULT 'chat',
        settings TEXT NOT NULL DEFAULT '{}',
        created REAL NOT NULL,
        updated REAL NOT NULL
    );
    CREATE INDEX conversations_owner ON conversations(owner, updated DESC);
    CREATE TABLE messages (
        id INTEGER PRIMARY KEY AUTOINCREMENT,
        conversation_id TEXT NOT NULL REFERENCES conversations(id) ON DELETE CASCADE,
        seq INTEGER NOT NULL,
        role TEXT NOT NULL,
        content TEXT NOT NULL,
        metadata TEXT NOT NULL DEFAULT '',
        extras TEXT NOT NULL DEFAULT '{}',
        created REAL NOT NULL,
        UNIQUE (conversation_id, seq)
    );
    """,
    # 2: /v1/responses kept for previous_response_id: the whole conversation through each response
    # (input and output, as OpenAI chat messages) and the response object that GET returns
    """
    CREATE TABLE responses (
        id TEXT PRIMARY KEY,
        owner TEXT NOT NULL,
        created REAL NOT NULL,
        previous_id TEXT,
        messages TEXT NOT NULL,
        response TEXT NOT NULL
    );
    CREATE INDEX responses_owner ON responses(owner, created);
    """,
    # 3: full-text search over messages (the console's search box), kept in step with `messages`
    # by triggers; the index is external-content (the text lives once, in `messages`).  A list:
    # trigger bodies hold semicolons, so these statements are not split on them.
    [
        "CREATE VIRTUAL TABLE messages_fts USING fts5(content, content='messages', content_rowid='id', "
        "tokenize='unicode61 remove_diacritics 2')",
        "CREATE TRIGGER messages_fts_insert AFTER INSERT ON messages BEGIN "
        "INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content); END",
        "CREATE TRIGGER messages_fts_delete AFTER DELETE ON messages BEGIN "
        "INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content); END",
        "CREATE TRIGGER messages_fts_update AFTER UPDATE OF content ON messages BEGIN "
        "INSERT INTO messages_fts(messages_fts, rowid, content) VALUES ('delete', old.id, old.content); "
        "INSERT INTO messages_fts(rowid, content) VALUES (new.id, new.content); END",
        "INSERT INTO messages_fts(messages_fts) VALUES ('rebuild')",      # messages written before this
    ],
    # 4: the model a conversation is answered by (`serve --models`: the console's model picker);
    # '' (every conversation before this): the server's default model
    "ALTER TABLE conversations ADD COLUMN model TEXT NOT NULL DEFAULT ''",
]

SEARCH_TERMS_MAX = 8


def owner_of(api_key: str | None) -> str:
    """Conversations are keyed by a hash of the API key, never the key itself."""
    return "local" if not api_key else "key:" + hashlib.sha256(api_key.encode()).hexdigest()[:32]


class NotFound(KeyError):
    pass


class Store:
    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._local = threading.local()
        with self._tx() as db:  # one transaction: concurrent first opens cannot both migrate
            db.execute("CREATE TABLE IF NOT EXISTS schema_version (version INTEGER NOT NULL)")
            row = db.execute("SELECT version FROM schema_version").fetchone()
            version = row[0] if row else 0
            if row is None:
                db.execute("INSERT INTO schema_version VALUES (0)")
            for n, sql in enumerate(MIGRATIONS[version:], start=version + 1):
                for statement in filter(str.strip, sql.split(";") if isinstance(sql, str) else sql):
                    db.execute(statement)
                db.execute("UPDATE schema_version SET version = ?", (n,))

    @property
    def version(self) -> int:
        return self._db().execute("SELECT version FROM schema_version").fetchone()[0]

    def _db(self) -> sqlite3.Connection:
        db = getattr(self._local, "db", None)
        if db is None:
            db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=True)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=NORMAL")   # durable at each WAL checkpoint; no corruption on crash
            db.execute("PRAGMA foreign_keys=ON")
            db.row_factory = sqlite3.Row
            # text that is not UTF-8 (written by hand or by another tool) reads as U+FFFD, not an error
            db.text_factory = lambda b: b.decode("utf-8", "replace")
            self._local.db = db
        return db

    @contextmanager
    def _tx(self):
        db = self._db()
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    # -- conversations ---------------------------------------------------------------------
    def create(self, owner: str, title: str = "New conversation", mode: str = "chat", settings: dict | None = None,
               model: str = "") -> dict:
        cid, now = uuid.uuid4().hex, time.time()
        with self._tx() as db:
            db.execute("INSERT INTO conversations (id, owner, title, mode, settings, created, updated, model) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                       (cid, owner, title, mode, json.dumps(settings or {}, allow_nan=False), now, now, model))
        return self.get(owner, cid)

    def list(self, owner: str) -> list[dict]:
        rows = self._db().execute("SELECT * FROM conversations WHERE owner = ? ORDER BY updated DESC", (owner,))
        return [self._conv(r, []) for r in rows]

    def search(self, owner: str, query: str, limit: int = 50) -> list[dict]:
        """The owner's conversations whose title, or one of whose messages, holds every word of `query` (each
        word matches as a prefix, case- and accent-insensitively), newest first, each with a
        plain-text `match`: a snippet of the first matching message ("" for a title match)."""
        words = re.findall(r"\w+", query)[:SEARCH_TERMS_MAX]
        if not words:
            return []
        fts = " ".join('"' + w.replace('"', '""') + '"*' for w in words)   # quoted: never FTS syntax
        db = self._db()
        hits: dict[str, str] = {}
        for r in db.execute(
                "SELECT m.conversation_id AS cid, snippet(messages_fts, 0, '', '', '…', 12) AS match "
                "FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid "
                "JOIN conversations c ON c.id = m.conversation_id "
                "WHERE messages_fts MATCH ? AND c.owner = ? ORDER BY m.seq", (fts, owner)):
            hits.setdefault(r["cid"], _text(r["match"]))
        like = [f"%{w}%" for w in words]
        for r in db.execute("SELECT id FROM conversations WHERE owner = ?" + " AND title LIKE ?" * len(like),
                            (owner, *like)):
            hits.setdefault(r["id"], "")
        if not hits:
            return []
        marks = ",".join("?" * len(hits))
        rows = db.execute(f"SELECT * FROM conversations WHERE owner = ? AND id IN ({marks}) "
                          f"ORDER BY updated DESC LIMIT ?", (owner, *hits, limit))
        return [dict(self._conv(r, []), match=hits[r["id"]]) for r in rows]

    def get(self, owner: str, cid: str) -> dict:
        row = self._db().execute("SELECT * FROM conversations WHERE id = ? AND owner = ?", (cid, owner)).fetchone()
        if row is None:
            raise NotFound(cid)
        warnings: list[str] = []
        conv = self._conv(row, warnings)
        conv["messages"] = [self._msg(r, warnings) for r in self._db().execute(
            "SELECT * FROM messages WHERE conversation_id = ? ORDER BY seq", (cid,))]
        if warnings:
            conv["warnings"] = warnings
        return conv

    def rename(self, owner: str, cid: str, title: str) -> None:
        self._set(owner, cid, "title", title)

    def update_settings(self, owner: str, cid: str, settings: dict) -> None:
        self._set(owner, cid, "settings", json.dumps(settings, allow_nan=False))

    def update_mode(self, owner: str, cid: str, mode: str) -> None:
        self._set(owner, cid, "mode", mode)

    def update_model(self, owner: str, cid: str, model: str) -> None:
        self._set(owner, cid, "model", model)

    def _set(self, owner: str, cid: str, column: str, value) -> None:
        assert column in ("title", "settings", "mode", "model")  # a column name, never user text
        with self._tx() as db:
            if db.execute(f"UPDATE conversations SET {column} = ?, updated = ? WHERE id = ? AND owner = ?",
                          (value, time.time(), cid, owner)).rowcount == 0:
                raise NotFound(cid)

    def delete(self, owner: str, cid: str) -> None:
        with self._tx() as db:
            if db.execute("DELETE FROM conversations WHERE id = ? AND owner = ?", (cid, owner)).rowcount == 0:
                raise NotFound(cid)

    # -- messages --------------------------------------------------------------------------
    def append(self, owner: str, cid: str, role: str, content: str, metadata: str = "", extras: dict | None = None) -> dict:
        """Add one complete message (written as it completes: a crash loses at most the one in flight)."""
        now = time.time()
        with self._tx() as db:
            if db.execute("SELECT 1 FROM conversations WHERE id = ? AND owner = ?", (cid, owner)).fetchone() is None:
                raise NotFound(cid)
            seq = db.execute("SELECT COALESCE(MAX(seq), 0) + 1 FROM messages WHERE conversation_id = ?",
                             (cid,)).fetchone()[0]
            db.execute("INSERT INTO messages (conversation_id, seq, role, content, metadata, extras, created) "
                       "VALUES (?, ?, ?, ?, ?, ?, ?)", (cid, seq, role, content, metadata, json.dumps(extras or {}), now))
            db.execute("UPDATE conversations SET updated = ? WHERE id = ?", (now, cid))
        return {"seq": seq, "role": role, "content": content, "metadata": metadata, "extras": extras or {}}

    def truncate(self, owner: str, cid: str, keep_through_seq: int) -> None:
        """Drop messages after `keep_through_seq` (regenerate, or edit-and-resend)."""
        with self._tx() as db:
            if db.execute("SELECT 1 FROM conversations WHERE id = ? AND owner = ?", (cid, owner)).fetchone() is None:
                raise NotFound(cid)
            db.execute("DELETE FROM messages WHERE conversation_id = ? AND seq > ?", (cid, keep_through_seq))

    # -- /v1/responses ----------------------------------------------------------------------
    def save_response(self, owner: str, rid: str, previous_id: str | None, messages: list[dict],
                      response: dict) -> None:
        with self._tx() as db:
            db.execute("INSERT INTO responses VALUES (?, ?, ?, ?, ?, ?)",
                       (rid, owner, time.time(), previous_id, json.dumps(messages, ensure_ascii=False, allow_nan=False),
                        json.dumps(response, ensure_ascii=False, allow_nan=False)))

    def get_response(self, owner: str, rid: str) -> dict:
        """{"messages": the conversation through it, "response": the response object}; NotFound
        for an id that is not there or is another owner's (the two look the same)."""
        row = self._db().execute("SELECT messages, response FROM responses WHERE id = ? AND owner = ?",
                                 (rid, owner)).fetchone()
        if row is None:
            raise NotFound(rid)
        try:
            messages, response = json.loads(row["messages"]), json.loads(row["response"])
        except (TypeError, ValueError, RecursionError):
            raise NotFound(rid) from None       # an unreadable row (a hand edit) is as good as gone
        if not isinstance(messages, list) or not isinstance(response, dict):
            raise NotFound(rid)
        return {"messages": messages, "response": response}

    def delete_response(self, owner: str, rid: str) -> None:
        with self._tx() as db:
            if db.execute("DELETE FROM responses WHERE id = ? AND owner = ?", (rid, owner)).rowcount == 0:
                raise NotFound(rid)

    # -- export ----------------------------------------------------------------------------
    def export_json(self, owner: str, cid: str) -> str:
        return json.dumps(self.get(owner, cid), ensure_ascii=False, indent=2)

    def export_markdown(self, owner: str, cid: str) -> str:
        conv = self.get(owner, cid)
        lines = [f"# {conv['title']}", ""]
        for m in conv["messages"]:
            who = m["role"].capitalize() + (f" ({m['metadata']})" if m["metadata"] else "")
            lines += [f"**{who}:**", "", m["content"], ""]
        return "\n".join(lines)

    # -- reading rows: whatever a row holds (an older version's values, a hand edit), what comes
    # out is plain JSON-safe data; a value that cannot be read is dropped and named in `warnings`
    @staticmethod
    def _conv(r, warnings: list[str]) -> dict:
        conv = {"id": _text(r["id"]), "title": _text(r["title"]), "mode": _text(r["mode"]), "model": _text(r["model"]),
                "settings": _object(r["settings"], "settings", warnings),
                "created": _number(r["created"]), "updated": _number(r["updated"])}
        if warnings:
            conv["warnings"] = warnings
        return conv

    @staticmethod
    def _msg(r, warnings: list[str]) -> dict:
        return {"seq": r["seq"], "role": _text(r["role"]), "content": _text(r["content"]),
                "metadata": _text(r["metadata"]),
                "extras": _object(r["extras"], f"extras of message {r['seq']}", warnings)}


def _text(value) -> str:
    if isinstance(value, bytes):
        return value.decode("utf-8", "replace")
    return value if isinstance(value, str) else str(value)


def _number(value) -> float:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return 0.0
    return value if math.isfinite(value) else 0.0


def _object(text, what: str, warnings: list[str]) -> dict:
    """A stored JSON object; older versions wrote non-finite numbers as Infinity/NaN."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError, RecursionError):
        warnings.append(f"the stored {what} are not readable JSON and are ignored")
        return {}
    if not isinstance(value, dict):
        warnings.append(f"the stored {what} are not a JSON object and are ignored")
        return {}
    out = {}
    for k, v in value.items():
        try:
            json.dumps(v, allow_nan=False)
        except (ValueError, RecursionError):
            warnings.append(f"the stored {what}: {k[:40]!r} holds a number that is not finite and is ignored")
            continue
        out[k] = v
    return out
