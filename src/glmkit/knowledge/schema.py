"""The knowledge store's SQLite file: its connection (WAL, foreign keys, sqlite-vec loaded) and its
numbered migrations, so a database written by an earlier glmkit opens in a later one
(knowledge/index.py is the store itself).

Tables: kbs (a knowledge base: owner, name, embedding model, dimension, generation), documents,
chunks (the passages, raw text), and for each knowledge base kb_terms_<id> (FTS5: the passages'
jieba-segmented terms, rowid = chunks.id) and kb_vectors_<id> (sqlite-vec vec0: their vectors,
cosine; none for a knowledge base indexed by words only).
"""

from __future__ import annotations

from pathlib import Path

from .. import migrations

# the embedder of a knowledge base indexed by words only (made where no embedding model was, as
# by the console of a server started with --no-embeddings): it has no vector table
WORDS_ONLY = "none (words only)"


def vector_table(kb_id: int) -> str:
    return f"kb_vectors_{int(kb_id)}"          # an integer, never user text


def terms_table(kb_id: int) -> str:
    return f"kb_terms_{int(kb_id)}"            # an integer, never user text


FTS_OPTIONS = "terms, tokenize='porter unicode61 remove_diacritics 2'"


def _terms_per_kb(db) -> None:
    """Migration 2.  One FTS5 table for all knowledge bases made a query rank every matching
    passage of every knowledge base (BM25 for each, and a join to `chunks` for each to keep the
    asked one's): 10,000 matches cost tens of ms.  With a table per knowledge base the match is
    that knowledge base's rows only, and BM25's statistics (document frequencies, mean length)
    are its own, never another owner's."""
    for (kb_id,) in db.execute("SELECT id FROM kbs").fetchall():
        db.execute(f"CREATE VIRTUAL TABLE {terms_table(kb_id)} USING fts5({FTS_OPTIONS})")
        db.execute(f"INSERT INTO {terms_table(kb_id)} (rowid, terms) SELECT f.rowid, f.terms FROM chunks_fts f "
                   "JOIN chunks c ON c.id = f.rowid WHERE c.kb_id = ?", (kb_id,))
    db.execute("DROP TABLE chunks_fts")


def _drop_placeholder_vectors(db) -> None:
    """Migration 4: a knowledge base indexed by words only kept a vector table of placeholders."""
    for (kb_id,) in db.execute("SELECT id FROM kbs WHERE embedder = ?", (WORDS_ONLY,)).fetchall():
        db.execute(f"DROP TABLE IF EXISTS {vector_table(kb_id)}")


MIGRATIONS = [
    # 1: knowledge bases, documents, passages and the passages' FTS5 terms (rowid = chunks.id)
    [
        """CREATE TABLE kbs (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            owner TEXT NOT NULL,
            name TEXT NOT NULL,
            embedder TEXT NOT NULL,
            embedder_path TEXT NOT NULL DEFAULT '',
            dim INTEGER NOT NULL,
            created REAL NOT NULL,
            UNIQUE (owner, name))""",
        """CREATE TABLE documents (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            kb_id INTEGER NOT NULL REFERENCES kbs(id) ON DELETE CASCADE,
            name TEXT NOT NULL,
            source TEXT NOT NULL,
            kind TEXT NOT NULL,
            sha256 TEXT NOT NULL,
            bytes INTEGER NOT NULL,
            pages INTEGER,
            file TEXT NOT NULL,
            added REAL NOT NULL,
            UNIQUE (kb_id, name))""",
        "CREATE INDEX documents_hash ON documents(kb_id, sha256)",
        """CREATE TABLE chunks (
            id INTEGER PRIMARY KEY AUTOINCREMENT,
            kb_id INTEGER NOT NULL REFERENCES kbs(id) ON DELETE CASCADE,
            document_id INTEGER NOT NULL REFERENCES documents(id) ON DELETE CASCADE,
            seq INTEGER NOT NULL,
            text TEXT NOT NULL,
            heading TEXT NOT NULL DEFAULT '',
            page INTEGER,
            line INTEGER,
            paragraph INTEGER,
            sha256 TEXT NOT NULL)""",
        "CREATE INDEX chunks_document ON chunks(document_id, seq)",
        "CREATE INDEX chunks_hash ON chunks(kb_id, sha256)",
        "CREATE VIRTUAL TABLE chunks_fts USING fts5(terms, tokenize='porter unicode61 remove_diacritics 2')",
    ],
    # 2: each knowledge base's terms in its own FTS5 table, as its vectors are (_terms_per_kb)
    _terms_per_kb,
    # 3: a counter bumped by every change to a knowledge base's passages, in the same transaction:
    # a process's in-memory copy of the vectors (knowledge/vectors.py) is current while it matches
    ["ALTER TABLE kbs ADD COLUMN generation INTEGER NOT NULL DEFAULT 0"],
    # 4: a knowledge base indexed by words only has no vector table (it had one of placeholders)
    _drop_placeholder_vectors,
]


def connect(sqlite, path: Path):
    """A connection to the store at `path` with `sqlite` (a DB-API module that can load
    extensions): autocommit (transactions are explicit), WAL, foreign keys, rows by name, and
    sqlite-vec loaded."""
    path.parent.mkdir(parents=True, exist_ok=True)
    db = sqlite.connect(str(path), timeout=30, isolation_level=None, check_same_thread=True)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.execute("PRAGMA foreign_keys=ON")
    db.row_factory = sqlite.Row
    db.text_factory = lambda b: b.decode("utf-8", "replace")
    import sqlite_vec
    db.enable_load_extension(True)
    sqlite_vec.load(db)
    db.enable_load_extension(False)
    return db


def migrate(db, version: int | None = None) -> None:
    """Bring the schema to `version` (all of MIGRATIONS when None), inside the caller's transaction."""
    migrations.migrate(db, MIGRATIONS[:version])
