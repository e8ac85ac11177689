"""The glmkit_knowledge extension of /v1/chat/completions: the last user message is answered from a
knowledge base of the request's owner, and the reply's [n] citations come back as data.

    {"messages": [...], "glmkit_knowledge": {"kb": "handbook", "top_k": 5, "mode": "hybrid"}}

The knowledge base is looked up by (owner, name), the owner being the request's API key's hash
(store.owner_of, as the console's conversations; "local", as `glmkit kb`, on a server without
keys): a key never reaches another key's documents, and a name it does not own is a 404, the
same whether or not another owner has one.  The passages go into the prompt as the model's
protocol carries context (chat.knowledge_context: ChatGLM3's observation of a knowledge_search
call; a delimited block in the user message for other models); the system message is untouched.

Dense retrieval needs the embedding model the knowledge base was indexed with: the server's own
(/v1/embeddings') when it is that one; otherwise (--no-embeddings, another model) retrieval is by
words only, and `glmkit_knowledge.note` says so.

The response carries `glmkit_citations` (the passages the reply cites, in order of first
mention: n, document, position, text, page/heading/line/paragraph) and `glmkit_knowledge` (the
knowledge base, the retrieval mode, every passage given, with its score).  Streamed, both come in
one extra chunk with no choices, after the last choice chunk (and the usage chunk) and before
[DONE]: OpenAI clients skip a chunk with empty `choices`, as with glmkit_run_tools' steps.
Passages never go to a model outside this machine (a cloud model is refused).
"""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

from starlette.requests import Request

from ..chat.knowledge_context import citations, passages, with_knowledge
from ..chat.openai_compat import content_text
from .auth import request_key
from .errors import APIError
from .openai_requests import ChatCompletionRequest, KnowledgeRequest
from .openai_responses import KnowledgeInfo, KnowledgePassage
from .store import owner_of

PARAM = "glmkit_knowledge"
_stores: dict[str, object] = {}
_stores_lock = threading.Lock()


@dataclass
class Retrieved:
    """What one request was given: its knowledge base's name, how it was searched, the passages."""
    kb: str
    mode: str
    note: str | None
    passages: list[dict]

    def citations(self, reply: str) -> list[KnowledgePassage]:
        return [KnowledgePassage(**c) for c in citations(reply, self.passages)]

    def info(self) -> KnowledgeInfo:
        return KnowledgeInfo(kb=self.kb, mode=self.mode, note=self.note,
                             passages=[KnowledgePassage(**p) for p in self.passages])

    def fields(self, reply: str) -> dict:
        """The response's glmkit_citations and glmkit_knowledge for `reply`."""
        return {"glmkit_citations": self.citations(reply), "glmkit_knowledge": self.info()}


def store_at(data_dir: str):
    """The knowledge store under `data_dir`, one per server process (its connections are per thread)."""
    from ..knowledge.index import KnowledgeStore
    with _stores_lock:
        store = _stores.get(data_dir)
        if store is None:
            store = _stores[data_dir] = KnowledgeStore(data_dir)
        return store


_store = store_at


def check(server, body: ChatCompletionRequest, cloud: bool = False) -> None:
    """What the extension cannot do, each a 400 naming the field."""
    if cloud:
        raise APIError(400, "glmkit_knowledge passages are given only to models on this machine, not to a "
                            "cloud model", param=PARAM)
    if getattr(server.config, "knowledge_dir", None) is None:
        raise APIError(400, "this server keeps no knowledge bases (start it with --data-dir)", param=PARAM)
    if body.n != 1:
        raise APIError(400, "glmkit_knowledge works with n=1", param=PARAM)
    if body.messages[-1].role != "user":
        raise APIError(400, "glmkit_knowledge answers the last message, which must be the user's", param="messages")


def owner(server, request: Request) -> str:
    return owner_of(request_key(request) if server.config.api_keys else None)


async def retrieve(server, request: Request, body: ChatCompletionRequest) -> Retrieved:
    """The passages for the request's last user message, from its owner's knowledge base."""
    spec: KnowledgeRequest = body.glmkit_knowledge
    question = content_text(body.message_dicts()[-1].get("content"))
    if not question.strip():
        raise APIError(400, "the last user message is empty: there is nothing to retrieve for", param="messages")
    return await asyncio.to_thread(lookup, server, owner(server, request), spec.kb, question, spec.top_k, spec.mode)


def lookup(server, who: str, name: str, question: str, top_k: int = 5, mode: str = "hybrid",
           param: str = f"{PARAM}.kb") -> Retrieved:
    """The passages of `who`'s knowledge base `name` for `question` (blocking: run it in a
    thread); a name `who` does not own is a 404, whoever else owns one.  The console's Knowledge
    mode answers the same way (server.console_knowledge)."""
    from ..knowledge.index import KnowledgeError, NotFound, words_only
    from ..knowledge.retrieval import search
    embedder = server.embedder
    try:
        store = _store(knowledge_dir(server.config))
        kb = store.get(who, name)
    except NotFound:
        raise APIError(404, f"no knowledge base {name!r}", param=param, code="knowledge_base_not_found") from None
    except KnowledgeError as e:
        raise APIError(500, str(e), "server_error") from None
    note = None
    if mode != "lexical" and words_only(kb):       # made without an embedding model (the console's, --no-embeddings)
        if mode == "dense":
            raise APIError(400, f"{kb['name']!r} is indexed by words only", param=f"{PARAM}.mode")
        mode, note = "lexical", f"{kb['name']!r} is indexed by words only (it was made without an embedding model)"
    elif mode != "lexical" and (embedder is None or embedder.name != kb["embedder"] or embedder.dim != kb["dim"]):
        if mode == "dense":
            raise APIError(400, _no_dense(embedder, kb), param=f"{PARAM}.mode")
        mode, note = "lexical", _no_dense(embedder, kb) + "; retrieved by words only"
    hits = search(store, kb, question, embedder if mode != "lexical" else None, top_k=top_k, mode=mode)
    return Retrieved(kb["name"], mode, note, passages(hits))


def knowledge_dir(config) -> str | None:
    """Where the server keeps knowledge bases: --data-dir's (`glmkit kb --data-dir`'s)."""
    return getattr(config, "knowledge_dir", None)


def _no_dense(embedder, kb: dict) -> str:
    if embedder is None:
        return "this server has no embedding model (--no-embeddings)"
    return f"{kb['name']!r} was indexed with {kb['embedder']} and this server embeds with {embedder.name}"


def prompt_history(history: list[dict], protocol, retrieved: Retrieved | None) -> list[dict]:
    """The request's history (protocol.api_messages') with its last user message answered from
    the retrieved passages; unchanged without glmkit_knowledge."""
    if retrieved is None:
        return history
    try:
        return with_knowledge(history, protocol, retrieved.passages)
    except ValueError as e:
        raise APIError(400, f"glmkit_knowledge: {e}", param="messages") from None
