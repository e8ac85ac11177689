"""The console's knowledge bases: a JSON API over glmkit.knowledge for the request's owner.

    GET    /api/knowledge                               the owner's knowledge bases
    POST   /api/knowledge              {"name": ...}    create one
    DELETE /api/knowledge/{kb}                          delete it, everything in it
    GET    /api/knowledge/{kb}/documents                its documents
    PUT    /api/knowledge/{kb}/files/{name}             the raw body is a document (PDF, DOCX, Markdown, HTML, text)
    DELETE /api/knowledge/{kb}/documents/{name}         remove one

The owner is the console's (`Console.owner`: the API key's hash, "local" on a server without
keys, as `glmkit kb` at the terminal), the same one glmkit_knowledge requests use, so a key
reaches its own knowledge bases only, from the API or the console; another key's name is a 404,
the same as a name nobody has.  An upload is bounded as a workspace upload is (ServerConfig.max_upload_bytes,
counted by the middleware for a PUT under /files/ as the body arrives).

Embedding: with the server's embedding model a knowledge base is indexed by meaning and by
words; without one (--no-embeddings) by words only (knowledge.index.WORDS_ONLY: no vectors, no
vector table), and retrieval is lexical for it, as server.knowledge decides.  A knowledge base indexed with a model this server does not have takes no new documents
here (its vectors could not be made); `glmkit kb add` can add them."""

from __future__ import annotations

import asyncio
import re
import threading
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from pydantic import BaseModel, ConfigDict, Field

from ..errors import GlmkitError
from ..knowledge.index import KnowledgeError, NotFound, words_only
from .errors import APIError, StrictJSONRoute
from .knowledge import knowledge_dir, store_at

_FILE_NAME = re.compile(r"^[^/\\\x00-\x1f]{1,200}$")     # as workspace uploads
_locks: dict[int, threading.Lock] = {}   # one upload at a time into each knowledge base
_locks_lock = threading.Lock()


class NewKnowledgeBase(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str = Field(min_length=1, max_length=64)


def _console(request: Request):
    return request.app.state.server.console


TheConsole = Annotated[object, Depends(_console)]
router = APIRouter(route_class=StrictJSONRoute)


def _store(console):
    console.mode_on("knowledge")
    try:
        return store_at(knowledge_dir(console.config))
    except KnowledgeError as e:
        raise APIError(500, str(e), "server_error") from None


def _kb(store, who: str, name: str) -> dict:
    try:
        return store.get(who, name)
    except NotFound:
        raise APIError(404, f"no knowledge base {name!r}", param="kb", code="knowledge_base_not_found") from None


def _public(kb: dict) -> dict:
    return {"name": kb["name"], "embedder": kb["embedder"], "words_only": words_only(kb),
            "documents": kb.get("documents", 0), "passages": kb.get("chunks", 0), "created": kb["created"]}


def embedder_for(server, kb: dict):
    """What embeds a new document's passages for `kb`, or a 400 saying why none here can."""
    from ..knowledge.ingest import WordsOnly
    if words_only(kb):
        return WordsOnly()
    embedder = server.embedder
    if embedder is None or embedder.name != kb["embedder"] or embedder.dim != kb["dim"]:
        have = "has no embedding model (--no-embeddings)" if embedder is None else f"embeds with {embedder.name}"
        raise APIError(400, f"{kb['name']!r} was indexed with {kb['embedder']} and this server {have}: its "
                            f"documents can be added with `glmkit kb add`", param="kb")
    return embedder


@router.get("/api/knowledge")
def list_knowledge_bases(request: Request, console: TheConsole):
    store = _store(console)
    return [_public(kb) for kb in store.list(console.owner(request))]


@router.post("/api/knowledge")
def create_knowledge_base(request: Request, console: TheConsole, body: NewKnowledgeBase):
    store, who = _store(console), console.owner(request)
    try:
        store.get(who, body.name)
    except NotFound:
        pass
    else:
        raise APIError(409, f"knowledge base {body.name!r} already exists", param="name", code="exists")
    from ..knowledge.ingest import WordsOnly
    embedder = console.server.embedder or WordsOnly()
    try:
        kb = store.create(who, body.name, embedder.name, embedder.dim)
    except KnowledgeError as e:        # a name it cannot have, or made meanwhile
        raise APIError(400, str(e), param="name") from None
    return _public(kb)


@router.delete("/api/knowledge/{kb}")
def delete_knowledge_base(kb: str, request: Request, console: TheConsole):
    store, who = _store(console), console.owner(request)
    row = _kb(store, who, kb)
    with _lock(row["id"]):
        store.delete(who, row["name"])
    return {"deleted": row["name"]}


@router.get("/api/knowledge/{kb}/documents")
def list_documents(kb: str, request: Request, console: TheConsole):
    store = _store(console)
    return [{k: d[k] for k in ("name", "kind", "pages", "bytes", "chunks", "added")}
            for d in store.documents(_kb(store, console.owner(request), kb))]


@router.delete("/api/knowledge/{kb}/documents/{name:path}")
def remove_document(kb: str, name: str, request: Request, console: TheConsole):
    store = _store(console)
    row = _kb(store, console.owner(request), kb)
    try:
        with _lock(row["id"]):
            doc = store.document(row, name)
            if doc["name"] != name:           # by name only here, never by a path on the server
                raise NotFound(name)
            store.remove(row, name)
    except NotFound:
        raise APIError(404, f"no document {name!r} in {row['name']!r}", code="not_found") from None
    return {"deleted": name}


@router.put("/api/knowledge/{kb}/files/{name}")
async def upload_document(kb: str, name: str, request: Request, console: TheConsole):
    """The raw request body is the document NAME (its type from its extension); re-sending a name
    with new content replaces that document, the same content under another name is not added
    twice (status "duplicate")."""
    store = _store(console)
    row = _kb(store, console.owner(request), kb)
    if not _FILE_NAME.match(name) or name.startswith("."):
        raise APIError(400, "a file name must be a plain name, without '/' and not starting with '.'", param="name")
    embedder = embedder_for(console.server, row)
    data = await request.body()
    return await asyncio.to_thread(_ingest, store, row, name, data, embedder, console.config.max_upload_bytes)


def _ingest(store, kb: dict, name: str, data: bytes, embedder, max_bytes: int) -> dict:
    """Add the uploaded bytes as the document `name`: written where each upload of that name into
    this knowledge base is written (so it is the same source, and new content replaces the old),
    added as `glmkit kb add` adds a file, then removed (the store keeps its own copy)."""
    from ..knowledge.ingest import add_file
    incoming = store.root / "incoming" / str(int(kb["id"]))
    with _lock(kb["id"]):
        incoming.mkdir(parents=True, exist_ok=True)
        path = incoming / name
        try:
            path.write_bytes(data)
            try:
                outcome = add_file(store, kb, path, embedder, max_bytes)
            except GlmkitError as e:              # BadDocument: the parser's one line
                raise APIError(400, f"{name}: {e}", param="file") from None
            except (Exception, RecursionError) as e:  # a parser's own failure: one line, as `glmkit kb add`
                raise APIError(400, f"{name}: could not be read ({type(e).__name__})", param="file") from None
        finally:
            Path(path).unlink(missing_ok=True)
    return {"name": outcome.name or name, "status": outcome.status, "passages": outcome.chunks,
            "pages": outcome.pages, "detail": outcome.detail}


def _lock(kb_id: int) -> threading.Lock:
    with _locks_lock:
        return _locks.setdefault(int(kb_id), threading.Lock())
