"""The two databases the conversation store (store.py) runs on, and the little that differs.

SQLite is the default: a file in the data directory, nothing to install or run.  PostgreSQL
(`glmkit serve --database postgresql://...`) lets several gateways share one store.  The store
writes its SQL once, with `?` placeholders and rows read by column name; a dialect here opens
connections that take that SQL, and holds what cannot be written once: how a write transaction
begins, how writers to one conversation are serialized, and full-text search.  psycopg is imported
only when a postgresql:// URL is opened, so the SQLite path needs nothing new.
"""

from __future__ import annotations

import re
import sqlite3
from pathlib import Path
from urllib.parse import unquote, urlsplit

from ..errors import GlmkitError

POSTGRES_SCHEMES = ("postgresql://", "postgres://")


class StoreUnavailable(GlmkitError):
    """The database server cannot be reached (or refuses the login): at startup one line, and
    later, while a request waits on it, a 503 (server/errors.py), which does not blame the request."""


def dialect_for(where: str | Path) -> SQLite | Postgres:
    """A postgresql:// (or postgres://) URL: PostgreSQL; anything else is a SQLite file's path."""
    if isinstance(where, str) and where.startswith(POSTGRES_SCHEMES):
        return Postgres(where)
    return SQLite(Path(where))


class SQLite:
    name = "sqlite"
    # BEGIN IMMEDIATE takes the database's write lock at once: one writer at a time, so a
    # read-then-write (the next message's seq) needs no row lock, and concurrent first opens
    # cannot both migrate
    begin = "BEGIN IMMEDIATE"
    for_update = ""
    like = "LIKE"                  # case-insensitive for ASCII in SQLite

    def __init__(self, path: Path):
        self.path = path
        self.errors = sqlite3.Error
        self.where = str(path)

    def connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        db = sqlite3.connect(self.path, timeout=30, isolation_level=None, check_same_thread=True)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=NORMAL")   # durable at each WAL checkpoint; no corruption on crash
        db.execute("PRAGMA foreign_keys=ON")
        db.row_factory = sqlite3.Row
        # text that is not UTF-8 (written by hand or by another tool) reads as U+FFFD, not an error
        db.text_factory = lambda b: b.decode("utf-8", "replace")
        return db

    def usable(self, db) -> bool:
        return True

    def lock_migrations(self, db) -> None:
        pass                       # BEGIN IMMEDIATE already holds the write lock

    def message_hits(self, db, owner: str, words: list[str]):
        """(cid, match) rows: messages of `owner` holding every word as a prefix, by seq; `match`
        a plain-text snippet.  FTS5's unicode61 tokenizer folds case and accents."""
        fts = " ".join('"' + w.replace('"', '""') + '"*' for w in words)   # quoted: never FTS syntax
        return db.execute(
            "SELECT m.conversation_id AS cid, snippet(messages_fts, 0, '', '', '…', 12) AS match "
            "FROM messages_fts JOIN messages m ON m.id = messages_fts.rowid "
            "JOIN conversations c ON c.id = m.conversation_id "
            "WHERE messages_fts MATCH ? AND c.owner = ? ORDER BY m.seq", (fts, owner))


class Postgres:
    name = "postgresql"
    # READ COMMITTED, as PostgreSQL's default; what BEGIN IMMEDIATE gives SQLite comes from row locks
    # (for_update on the conversation a change is made to) and, for migrations, an advisory lock
    begin = "BEGIN"
    for_update = " FOR UPDATE"
    like = "ILIKE"                 # LIKE is case-sensitive in PostgreSQL
    MIGRATION_LOCK = 0x676C6D6B6974   # any constant bigint, the same in every glmkit ("glmkit")

    def __init__(self, url: str):
        self.url = url
        self.where = redact(url)
        try:
            import psycopg
        except ImportError:
            raise GlmkitError(f"{self.where}: a PostgreSQL store needs psycopg: "
                              "pip install 'psycopg[binary]'") from None
        self.psycopg = psycopg
        self.errors = psycopg.Error

    def connect(self) -> _PgConnection:
        from psycopg.rows import dict_row
        try:
            conn = self.psycopg.connect(self.url, autocommit=True, row_factory=dict_row, connect_timeout=10)
        except self.psycopg.Error as e:
            raise StoreUnavailable(f"{self.where}: cannot connect to the conversation database: "
                                   f"{self.message(e)}") from None
        return _PgConnection(conn, self)

    def message(self, e: Exception) -> str:
        """psycopg's error as one line, without the URL's password: libpq quotes a URL it cannot
        parse whole."""
        text = " ".join(str(e).split()) or type(e).__name__
        for secret in sorted(secrets(self.url), key=len, reverse=True):
            text = text.replace(secret, "***")
        return text

    def usable(self, db: _PgConnection) -> bool:
        # a connection the server dropped (a restart, a failover) is opened anew, not kept failing
        return not (db.conn.closed or db.conn.broken)

    def lock_migrations(self, db) -> None:
        # held until the transaction ends: a second gateway opening at the same moment waits, then
        # finds the schema at the new version (CREATE TABLE IF NOT EXISTS alone races in PostgreSQL)
        db.execute("SELECT pg_advisory_xact_lock(?)", (self.MIGRATION_LOCK,))

    def message_hits(self, db, owner: str, words: list[str]):
        """As SQLite's: every word a prefix (`word:*`), folded to lower case by the 'simple'
        configuration (accents are not folded: that needs the unaccent extension, which a
        gateway's database user may not be allowed to create), in a message's first 100,000
        characters.  Each word is a quoted lexeme, never tsquery syntax.  The WHERE expression is
        the one migration 3 indexes (GIN)."""
        query = " & ".join("'" + w.replace("'", "''").replace("\\", "\\\\") + "':*" for w in words)
        return db.execute(
            "SELECT m.conversation_id AS cid, ts_headline('simple', left(m.content, 100000), q, "
            "'StartSel=\"\", StopSel=\"\", MaxWords=12, MinWords=8, ShortWord=0') AS match "
            "FROM messages m JOIN conversations c ON c.id = m.conversation_id, to_tsquery('simple', ?) q "
            "WHERE to_tsvector('simple', left(m.content, 100000)) @@ q AND c.owner = ? ORDER BY m.seq",
            (query, owner))


class _PgConnection:
    """A psycopg connection that takes the store's SQL as sqlite3 does: `?` placeholders (the
    store's SQL holds no literal ? or %, so the swap is exact) and rows as mappings."""

    def __init__(self, conn, dialect: Postgres):
        self.conn, self.dialect = conn, dialect

    def execute(self, sql: str, params=()):
        # PostgreSQL's text cannot hold NUL, which SQLite's can: one in a message or title is kept
        # as U+FFFD rather than failing the request
        params = tuple(p.replace("\x00", "\ufffd") if isinstance(p, str) else p for p in params)
        try:
            return self.conn.execute(sql.replace("?", "%s"), params or None)
        except self.dialect.psycopg.OperationalError as e:
            # the server went away (a restart, a failover) or gave up on the statement: the
            # request that met it gets a 503; the thread's next one opens a new connection
            raise StoreUnavailable(f"{self.dialect.where}: {self.dialect.message(e)}") from e

    def close(self) -> None:
        self.conn.close()

    def __del__(self):
        # a thread's connection goes when its thread (or the Store) does; an open psycopg
        # connection left to the garbage collector would warn
        self.conn.close()


def secrets(url: str) -> set[str]:
    """The passwords a URL holds (in its userinfo, or password= parameters), as written and decoded;
    found without a URL parser, as the URL may be one that does not parse."""
    found = set(re.findall(r"^[A-Za-z][A-Za-z0-9+.-]*://[^:@/]*:([^@]+)@", url))
    found |= set(re.findall(r"[?&]password=([^&]+)", url, flags=re.IGNORECASE))
    return {s for p in found for s in (p, unquote(p))}


def redact(url: str) -> str:
    """The URL with its password (in the userinfo or a password= parameter) shown as ***."""
    try:
        parts = urlsplit(url)
    except ValueError:                 # a URL that does not parse: its passwords, wherever they are
        for secret in sorted(secrets(url), key=len, reverse=True):
            url = url.replace(secret, "***")
        return url
    userinfo, at, hostport = parts.netloc.rpartition("@")
    if ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    query = re.sub(r"(?i)\bpassword=[^&]*", "password=***", parts.query)
    return parts._replace(netloc=userinfo + at + hostport, query=query).geturl()
