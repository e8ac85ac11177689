"""The knowledge store: knowledge bases, their documents and passages, a full-text index and a
vector index, in one SQLite file (DATA_DIR/knowledge/knowledge.db), with each document's original
file beside it (DATA_DIR/knowledge/files/<kb id>/).

Why one SQLite file: a passage, its FTS5 row and its vector are written and deleted in one
transaction, so a crash never leaves a vector without its passage, and deleting a document is
complete by construction.  The vectors live in sqlite-vec's vec0 tables (one per knowledge base,
its dimension the knowledge base's embedding model's; cosine distance), exact nearest-neighbour
search in C that answers 10,000 passages in milliseconds, with no server, no second store to keep
in step, and a wheel of a few hundred KB.  Searches read them from an in-memory copy where one fits
(knowledge/vectors.py).  LanceDB would be a second store (a directory of
Arrow files beside the database) that no SQLite transaction covers.

Python's own sqlite3 may be built without extension loading (this machine's is); then the
bundled SQLite of `sqlean.py` (the same DB-API) is used.

Lexical terms: FTS5's unicode61 tokenizer splits on spaces and punctuation, so a run of Chinese
would be one token; each CJK run is therefore segmented with jieba (search mode: words and the
shorter words inside them) before it is indexed, and queries are segmented the same way.  The
passage text itself is stored raw in `chunks`; each knowledge base's FTS5 table (kb_terms_<id>,
beside its kb_vectors_<id>) holds only the segmented terms, so a query ranks that knowledge
base's passages alone, by its own BM25 statistics.

Ownership as in server/store.py: every knowledge base has an owner ("local" for the terminal, a
hash of the API key for the server), each lookup starts from (owner, name), and every query on
documents or passages is scoped by the knowledge base's id that lookup returned.  Numbered
migrations from the first schema (knowledge/schema.py, with the connection), so a database written by
an earlier glmkit opens in a later one.
"""

from __future__ import annotations

import json
import re
import shutil
import struct
import threading
import time
from contextlib import contextmanager
from pathlib import Path

from ..errors import GlmkitError
from .schema import FTS_OPTIONS, WORDS_ONLY, connect, migrate
from .schema import terms_table as _fts
from .schema import vector_table as _vec
from .vectors import VectorCache, nearest


NAME = re.compile(r"[\w][\w.\- ]{0,63}")


def words_only(kb: dict) -> bool:
    return kb.get("embedder") == WORDS_ONLY


class KnowledgeError(GlmkitError):
    pass


class NotFound(KnowledgeError):
    pass


def sqlite_module():
    """A DB-API sqlite3 that can load sqlite-vec: Python's own when it allows extensions, else sqlean.py's."""
    import sqlite3
    if hasattr(sqlite3.Connection, "enable_load_extension"):
        return sqlite3
    try:
        import sqlean
    except ImportError:
        raise KnowledgeError("this Python's sqlite3 cannot load extensions; knowledge bases need "
                             "`pip install sqlean.py` (SQLite with extensions) for the vector index") from None
    return sqlean


# -- lexical terms ---------------------------------------------------------------------------
_CJK_RUN = re.compile(r"[\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff]+")
_jieba = None
_jieba_lock = threading.Lock()


def _segmenter():
    global _jieba
    with _jieba_lock:
        if _jieba is None:
            import logging

            import jieba
            jieba.setLogLevel(logging.WARNING)
            jieba.initialize()
            _jieba = jieba
    return _jieba


def terms(text: str) -> str:
    """The text with each run of Chinese segmented into space-separated words (jieba's search
    mode: the words and the shorter words inside them); everything else as it was."""
    if not _CJK_RUN.search(text):
        return text
    jieba = _segmenter()
    return _CJK_RUN.sub(lambda m: " " + " ".join(jieba.cut_for_search(m.group())) + " ", text)


def vector_bytes(v) -> bytes:
    return struct.pack(f"<{len(v)}f", *v)


class KnowledgeStore:
    def __init__(self, data_dir: str | Path, version: int | None = None):
        self.root = Path(data_dir) / "knowledge"
        self.path = self.root / "knowledge.db"
        self.files = self.root / "files"
        self._local = threading.local()
        self._sqlite = sqlite_module()
        self._vectors = VectorCache()
        try:
            with self._tx() as db:
                migrate(db, version)
        except self._sqlite.Error as e:
            raise KnowledgeError(f"{self.path}: cannot open the knowledge store: {' '.join(str(e).split())}") from None

    @property
    def version(self) -> int:
        return self._db().execute("SELECT version FROM schema_version").fetchone()["version"]

    def _db(self):
        db = getattr(self._local, "db", None)
        if db is None:
            sqlite = self._sqlite
            self.root.mkdir(parents=True, exist_ok=True)
            db = connect(sqlite, self.path)
            self._local.db = db
        return db

    def close(self) -> None:
        db = getattr(self._local, "db", None)
        if db is not None:
            self._local.db = None
            db.close()

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

    # -- knowledge bases -------------------------------------------------------------------
    def create(self, owner: str, name: str, embedder: str, dim: int, embedder_path: str = "") -> dict:
        if not NAME.fullmatch(name):
            raise KnowledgeError(f"{name!r}: a knowledge base's name is letters, digits, '.', '-', '_' or spaces "
                                 "(at most 64, starting with a letter or digit)")
        with self._tx() as db:
            if db.execute("SELECT 1 FROM kbs WHERE owner = ? AND name = ?", (owner, name)).fetchone():
                raise KnowledgeError(f"knowledge base {name!r} already exists")
            kb_id = db.execute("INSERT INTO kbs (owner, name, embedder, embedder_path, dim, created) "
                               "VALUES (?, ?, ?, ?, ?, ?)",
                               (owner, name, embedder, embedder_path, int(dim), time.time())).lastrowid
            if embedder != WORDS_ONLY:
                db.execute(f"CREATE VIRTUAL TABLE {_vec(kb_id)} USING vec0(embedding float[{int(dim)}] "
                           "distance_metric=cosine)")
            db.execute(f"CREATE VIRTUAL TABLE {_fts(kb_id)} USING fts5({FTS_OPTIONS})")
        return self.get(owner, name)

    def get(self, owner: str, name: str) -> dict:
        row = self._db().execute("SELECT * FROM kbs WHERE owner = ? AND name = ?", (owner, name)).fetchone()
        if row is None:
            raise NotFound(f"no knowledge base {name!r} (`glmkit kb create {name}` makes one)")
        return dict(row)

    def list(self, owner: str) -> list[dict]:
        return [dict(r) for r in self._db().execute(
            "SELECT k.*, (SELECT COUNT(*) FROM documents d WHERE d.kb_id = k.id) AS documents, "
            "(SELECT COUNT(*) FROM chunks c WHERE c.kb_id = k.id) AS chunks "
            "FROM kbs k WHERE owner = ? ORDER BY name", (owner,))]

    def delete(self, owner: str, name: str) -> None:
        """The knowledge base and everything in it: passages, terms, vectors, files."""
        kb = self.get(owner, name)
        with self._tx() as db:
            db.execute(f"DROP TABLE IF EXISTS {_fts(kb['id'])}")
            db.execute("DELETE FROM chunks WHERE kb_id = ?", (kb["id"],))
            db.execute("DELETE FROM documents WHERE kb_id = ?", (kb["id"],))
            db.execute(f"DROP TABLE IF EXISTS {_vec(kb['id'])}")
            db.execute("DELETE FROM kbs WHERE id = ? AND owner = ?", (kb["id"], owner))
        self._vectors.forget(kb["id"])
        shutil.rmtree(self.files / str(kb["id"]), ignore_errors=True)

    # -- documents -------------------------------------------------------------------------
    def documents(self, kb: dict) -> list[dict]:
        return [dict(r) for r in self._db().execute(
            "SELECT d.*, (SELECT COUNT(*) FROM chunks c WHERE c.document_id = d.id) AS chunks "
            "FROM documents d WHERE kb_id = ? ORDER BY name", (kb["id"],))]

    def document(self, kb: dict, name: str) -> dict:
        """By name, or by the path it was added from."""
        db = self._db()
        row = db.execute("SELECT * FROM documents WHERE kb_id = ? AND name = ?", (kb["id"], name)).fetchone()
        if row is None:
            rows = db.execute("SELECT * FROM documents WHERE kb_id = ? AND source = ?",
                              (kb["id"], str(Path(name).resolve()))).fetchall()
            row = rows[0] if len(rows) == 1 else None
        if row is None:
            raise NotFound(f"no document {name!r} in {kb['name']!r}")
        return dict(row)

    def by_hash(self, kb: dict, sha256: str) -> dict | None:
        row = self._db().execute("SELECT * FROM documents WHERE kb_id = ? AND sha256 = ?", (kb["id"], sha256)).fetchone()
        return dict(row) if row else None

    def by_source(self, kb: dict, source: str) -> dict | None:
        row = self._db().execute("SELECT * FROM documents WHERE kb_id = ? AND source = ?", (kb["id"], source)).fetchone()
        return dict(row) if row else None

    def name_taken(self, kb: dict, name: str) -> bool:
        return self._db().execute("SELECT 1 FROM documents WHERE kb_id = ? AND name = ?",
                                  (kb["id"], name)).fetchone() is not None

    def known_vectors(self, kb: dict, hashes: list[str]) -> dict[str, bytes]:
        """Vectors already in this knowledge base for passages with these hashes (re-adding a
        changed file embeds only the passages that changed)."""
        out: dict[str, bytes] = {}
        if words_only(kb):
            return out
        db = self._db()
        wanted = list(dict.fromkeys(hashes))
        for i in range(0, len(wanted), 500):
            part = wanted[i:i + 500]
            marks = ",".join("?" * len(part))
            for r in db.execute(f"SELECT c.sha256 AS h, v.embedding AS e FROM chunks c JOIN {_vec(kb['id'])} v "
                                f"ON v.rowid = c.id WHERE c.kb_id = ? AND c.sha256 IN ({marks})", (kb["id"], *part)):
                out.setdefault(r["h"], bytes(r["e"]))
        return out

    def put(self, kb: dict, meta: dict, chunks: list, vectors: list[bytes], original: Path,
            replace: dict | None = None) -> dict:
        """Add a document (replacing `replace`, the same document's earlier version, in the same
        transaction): its row, its passages with their terms and vectors, and a copy of the file."""
        folder = self.files / str(kb["id"])
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".incoming-{time.time_ns()}"
        shutil.copyfile(original, tmp)
        try:
            with self._tx() as db:
                if replace is not None:
                    self._delete_rows(db, kb, replace["id"])
                doc_id = db.execute(
                    "INSERT INTO documents (kb_id, name, source, kind, sha256, bytes, pages, file, added) "
                    "VALUES (?, ?, ?, ?, ?, ?, ?, '', ?)",
                    (kb["id"], meta["name"], meta["source"], meta["kind"], meta["sha256"], meta["bytes"],
                     meta.get("pages"), time.time())).lastrowid
                file = folder / f"{doc_id}{Path(meta['name']).suffix.lower()}"
                db.execute("UPDATE documents SET file = ? WHERE id = ?", (str(file.relative_to(self.root)), doc_id))
                for c, vec in zip(chunks, vectors):
                    cid = db.execute(
                        "INSERT INTO chunks (kb_id, document_id, seq, text, heading, page, line, paragraph, sha256) "
                        "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)",
                        (kb["id"], doc_id, c.seq, c.text, c.heading, c.page, c.line, c.paragraph, c.sha256)).lastrowid
                    db.execute(f"INSERT INTO {_fts(kb['id'])} (rowid, terms) VALUES (?, ?)", (cid, terms(c.for_index())))
                    if vec is not None:      # None: a knowledge base indexed by words only
                        db.execute(f"INSERT INTO {_vec(kb['id'])} (rowid, embedding) VALUES (?, ?)", (cid, vec))
                _changed(db, kb)
            tmp.replace(file)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        if replace is not None and replace["file"] and (self.root / replace["file"]) != file:
            (self.root / replace["file"]).unlink(missing_ok=True)
        return self.document(kb, meta["name"])

    def remove(self, kb: dict, name: str) -> dict:
        """Delete a document completely: its passages, their terms and vectors, its row, its file."""
        doc = self.document(kb, name)
        with self._tx() as db:
            self._delete_rows(db, kb, doc["id"])
        if doc["file"]:
            (self.root / doc["file"]).unlink(missing_ok=True)
        return doc

    def _delete_rows(self, db, kb: dict, doc_id: int) -> None:
        ids = [r["id"] for r in db.execute("SELECT id FROM chunks WHERE document_id = ? AND kb_id = ?",
                                           (doc_id, kb["id"]))]
        for i in range(0, len(ids), 500):
            part = ids[i:i + 500]
            marks = ",".join("?" * len(part))
            db.execute(f"DELETE FROM {_fts(kb['id'])} WHERE rowid IN ({marks})", part)
            if not words_only(kb):
                db.execute(f"DELETE FROM {_vec(kb['id'])} WHERE rowid IN ({marks})", part)
        db.execute("DELETE FROM chunks WHERE document_id = ? AND kb_id = ?", (doc_id, kb["id"]))
        db.execute("DELETE FROM documents WHERE id = ? AND kb_id = ?", (doc_id, kb["id"]))
        _changed(db, kb)

    def chunks(self, kb: dict, document: dict | None = None) -> list[dict]:
        sql = ("SELECT c.*, d.name AS document FROM chunks c JOIN documents d ON d.id = c.document_id "
               "WHERE c.kb_id = ?")
        args: tuple = (kb["id"],)
        if document is not None:
            sql += " AND c.document_id = ?"
            args += (document["id"],)
        return [dict(r) for r in self._db().execute(sql + " ORDER BY d.name, c.seq", args)]

    # -- search ----------------------------------------------------------------------------
    def lexical(self, kb: dict, fts_query: str, k: int) -> list[tuple[int, float]]:
        """(chunk id, bm25) best first: FTS5 matches of `fts_query` in this knowledge base only."""
        if not fts_query:
            return []
        table = _fts(kb["id"])          # this knowledge base's rows only: no join, no other owner's
        rows = self._db().execute(f"SELECT rowid, bm25({table}) AS score FROM {table} WHERE {table} MATCH ? "
                                  "ORDER BY score LIMIT ?", (fts_query, k))
        return [(r["rowid"], -r["score"]) for r in rows]

    def dense(self, kb: dict, vector: bytes, k: int) -> list[tuple[int, float]]:
        """(chunk id, cosine similarity) best first, over this knowledge base's vectors: exact, as
        sqlite-vec's KNN over its vec0 table gives, but from the in-memory copy (vectors.py) when
        there is one, a matrix-vector product instead of reading every vector from SQLite."""
        if words_only(kb):
            return []
        m = self._vectors.matrix(self._db(), kb["id"])
        if m is None:
            rows = self._db().execute(f"SELECT rowid, distance FROM {_vec(kb['id'])} WHERE embedding MATCH ? AND k = ?",
                                      (vector, k))
            return [(r["rowid"], 1.0 - r["distance"]) for r in rows]
        return nearest(*m, vector, k)

    def passages(self, kb: dict, ids: list[int]) -> dict[int, dict]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        # `+c.kb_id`: still only this knowledge base's, but not a reason to pick the chunks_hash
        # index, which made SQLite walk every passage of the knowledge base (7 ms at 10,000)
        # instead of looking up these few by id
        rows = self._db().execute(
            f"SELECT c.id, c.seq, c.text, c.heading, c.page, c.line, c.paragraph, d.name AS document, d.kind "
            f"FROM chunks c JOIN documents d ON d.id = c.document_id WHERE c.id IN ({marks}) AND +c.kb_id = ?",
            (*ids, kb["id"]))
        return {r["id"]: dict(r) for r in rows}

    # -- export ----------------------------------------------------------------------------
    def export(self, kb: dict, out: Path) -> int:
        """The original files and every passage (passages.jsonl) into the directory `out`."""
        out.mkdir(parents=True, exist_ok=True)
        docs = self.documents(kb)
        for d in docs:
            if d["file"] and (self.root / d["file"]).is_file():
                shutil.copyfile(self.root / d["file"], out / d["name"].replace("/", "_"))
        with open(out / "passages.jsonl", "w", encoding="utf-8") as f:
            for c in self.chunks(kb):
                f.write(json.dumps({k: c[k] for k in ("document", "seq", "heading", "page", "line", "paragraph", "text")},
                                   ensure_ascii=False) + "\n")
        return len(docs)

    def counts(self, kb: dict | None = None) -> dict[str, int]:
        """Rows in each table (all owners, or one knowledge base): for checking that a delete is complete."""
        db = self._db()
        out = {"documents": db.execute("SELECT COUNT(*) FROM documents").fetchone()[0],
               "chunks": db.execute("SELECT COUNT(*) FROM chunks").fetchone()[0],
               "fts": sum(db.execute(f"SELECT COUNT(*) FROM {_fts(i)}").fetchone()[0]
                          for (i,) in db.execute("SELECT id FROM kbs").fetchall())}
        if kb is not None:
            out["vectors"] = 0 if words_only(kb) else db.execute(f"SELECT COUNT(*) FROM {_vec(kb['id'])}").fetchone()[0]
        return out



def _changed(db, kb: dict) -> None:
    db.execute("UPDATE kbs SET generation = generation + 1 WHERE id = ?", (kb["id"],))
