"""The web console's HTTP side, one APIRouter: a static page plus a small JSON API over the
conversation store.  The server includes it when it has a data directory (--data-dir), with the
console's other routers: the code interpreter's workspace files and Run (console_files) and the
knowledge bases (console_knowledge).

Answers in every mode are produced by the chat layer's Agent over the server's scheduler
(console_turns), so the console shares the API's engine, tool parser, agent loop and sandbox.
The user's message is stored when it arrives and each reply message as it completes; a reply
stopped from the browser is stored as far as it was shown.

Every JSON body is decoded strictly, as the API's are (server.errors), and validated by the
models below, whose sampling fields are the API's own; a refusal is one 4xx message and changes
nothing.  A stored value that is not valid now (an older version's) is dropped when read, and
named in `warnings`."""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from typing import Annotated
from urllib.parse import quote

from fastapi import APIRouter, Depends, Request
from fastapi.responses import FileResponse, PlainTextResponse, StreamingResponse
from pydantic import ValidationError

from ..engine.requests import DEFAULT_MAX_NEW_TOKENS, SamplingParams
from ..errors import GlmkitError
from ..chat.capabilities import small_model_note
from .auth import request_key
from .state import server_state
from .console_turns import Turn
from .errors import APIError, StrictJSONRoute
from .knowledge import knowledge_dir, lookup
from .console_requests import (CONTENT_MAX, MODES, SYSTEM_MAX, TITLE_MAX, ConsoleSettings, ConversationPatch,
                               NewConversation, Send, slug, title_of)
from .store import NotFound, Store, owner_of
from .workspace import Workspaces

STATIC = Path(__file__).with_name("static")
log = logging.getLogger("glmkit.console")

KNOWLEDGE_TOP_K = 5       # passages a Knowledge mode message is answered from
SAMPLING = ("temperature", "top_p", "top_k", "repetition_penalty")
CSP = ("default-src 'self'; img-src 'self' data:; media-src 'none'; object-src 'none'; frame-src 'none'; "
       "base-uri 'none'; form-action 'none'; style-src 'self'")


class Console:
    """The console's part of a running server: the store, the workspaces, the turns in progress,
    and the rules every route applies (owners, settings, modes)."""

    def __init__(self, server):
        config, chat_model = server.config, server.chat_model
        self.server, self.config, self.chat_model = server, config, chat_model
        # every model the server serves (its default first): a conversation is answered by the
        # one it names, '' (or one no longer served) by the default
        self.models = {name: m.chat_model for name, m in server.models.items()}
        self.default_model = server.model_id
        self.limit = config.max_tokens_limit
        self.defaults = dict(chat_model.default_sampling, max_new_tokens=min(DEFAULT_MAX_NEW_TOKENS, self.limit),
                             system="")
        self.store = Store(config.database or Path(config.data_dir) / "conversations.db")
        self.workspaces = Workspaces(Path(config.data_dir) / "workspaces", config.code_interpreter)
        self.active: dict[str, Turn] = {}       # conversation id -> its turn in progress
        self.modes = {                          # mode -> why it is off (None: on)
            "chat": None,
            "tool": None if config.server_tools else "start the server with --tools builtin (or a tools file)",
            "code": None if config.code_interpreter else "start the server with --code",
            "knowledge": None if knowledge_dir(config) else "start the server with --data-dir"}
        self.reported: set[str] = set()         # conversations whose unreadable stored values were logged
        # Tool and Code modes' plain note for a small model without a native tool protocol
        self.note = small_model_note(chat_model, "glmkit serve -m PATH/TO/chatglm3-6b")
        # what the page shows for a conversation answered by each model: its sampling defaults and note
        self.per_model = {name: {"defaults": {**self.defaults, **m.default_sampling},
                                 "note": small_model_note(m, "glmkit serve -m PATH/TO/chatglm3-6b")}
                          for name, m in self.models.items()}

    def owner(self, request: Request) -> str:
        return owner_of(request_key(request) if self.config.api_keys else None)

    def checked(self, settings: ConsoleSettings) -> dict:
        """Settings from a request, as stored: only what was given."""
        out = settings.model_dump(exclude_none=True)
        if out.get("max_new_tokens", 0) > self.limit:
            raise APIError(400, f"settings.max_new_tokens: at most {self.limit} on this server (its --max-tokens)",
                           param="settings.max_new_tokens")
        return out

    def readable(self, conv: dict) -> dict:
        """A conversation as the store has it, with any stored value that is not valid now (written
        by an older version, or by hand) dropped: its default applies, and `warnings` says so."""
        warnings = list(conv.pop("warnings", ()))
        settings = {}
        for k, v in conv["settings"].items():
            try:
                one = self.checked(ConsoleSettings.model_validate({k: v}))
            except ValidationError as e:
                warnings.append(f"the stored setting {str(k)[:40]!r} is ignored ({e.errors()[0]['msg']}); "
                                f"the default applies")
            except APIError as e:
                warnings.append(f"the stored setting {str(k)[:40]!r} is ignored ({e.message}); the default applies")
            else:
                settings.update(one)
        conv["settings"] = settings
        if conv["model"] and conv["model"] not in self.models:
            warnings.append(f"the stored model {conv['model'][:40]!r} is not served now; the default "
                            f"({self.default_model}) answers")
            conv["model"] = ""
        conv["model"] = conv["model"] or self.default_model
        if conv["mode"] not in MODES:
            warnings.append(f"the stored mode {conv['mode'][:40]!r} is unknown; the conversation is a chat")
            conv["mode"] = "chat"
        if warnings:
            conv["warnings"] = warnings
            if conv["id"] not in self.reported:
                self.reported.add(conv["id"])
                log.warning("conversation %s: %s", conv["id"], "; ".join(warnings))
        return conv

    def conversation(self, request: Request, cid: str) -> dict:
        try:
            return self.readable(self.store.get(self.owner(request), cid))
        except NotFound:
            raise APIError(404, "conversation not found", code="not_found") from None

    def not_busy(self, cid: str):
        if cid in self.active:
            raise APIError(409, "this conversation is still answering; stop it first", code="busy")

    def served(self, model: str, request: Request) -> str:
        """A model a request names, checked: this server must serve it, and (private_only) it must
        be answered on this machine."""
        if model not in self.models:
            raise APIError(400, f"model {model[:40]!r} is not served here (models: {', '.join(self.models)})",
                           param="model")
        server_state(request).allowed(model)
        return model

    def visible(self, request: Request) -> list[str]:
        """The models this request may pick (a private_only one: those on this machine)."""
        state = server_state(request)
        return [m for m in self.models if not (state.private and m in state.config.outside)]

    async def retrieve(self, request: Request, conv: dict, body, content: str | None):
        """Knowledge mode: the passages of the owner's knowledge base `body.kb` for the message
        this turn answers (the new or edited one; regenerating, the last one), as the API's
        glmkit_knowledge retrieves them (server.knowledge.lookup).  None: there is no message,
        which send() refuses as in every mode."""
        if not body.kb:
            raise APIError(400, "Knowledge mode answers from a knowledge base: kb is required", param="kb")
        question = content
        if body.regenerate:
            users = [m for m in conv["messages"] if m["role"] == "user"]
            question = users[-1]["content"] if users else None
        if not question:
            return None
        return await asyncio.to_thread(lookup, self.server, self.owner(request), body.kb, question, KNOWLEDGE_TOP_K,
                                       "hybrid", "kb")

    def mode_on(self, mode: str, param: str | None = None):
        if self.modes[mode]:
            raise APIError(400, f"{mode} mode is off: {self.modes[mode]}", param=param)


def _console(request: Request) -> Console:
    return request.app.state.server.console


TheConsole = Annotated[Console, Depends(_console)]
router = APIRouter(route_class=StrictJSONRoute)


@router.get("/", include_in_schema=False)
def index():
    # the page loads only its own files, and nothing that a reply contains can make the
    # browser fetch from elsewhere (images only inline; no media, frames or plugins)
    return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": CSP})


@router.get("/static/{name:path}", include_in_schema=False)
def static(name: str):
    path = (STATIC / name).resolve()
    if STATIC.resolve() not in path.parents or not path.is_file():
        raise APIError(404, "not found")
    return FileResponse(path)


@router.get("/api/config")
def console_config(console: TheConsole, request: Request):
    config, modes = console.config, console.modes
    models = console.visible(request)
    return {"model": console.chat_model.name, "models": models, "default_model": console.default_model,
            "defaults": console.defaults, "auth_required": bool(config.api_keys),
            "limits": {"max_new_tokens": console.limit, "system": SYSTEM_MAX, "title": TITLE_MAX,
                       "content": CONTENT_MAX},
            "modes": [m for m, why in modes.items() if why is None],
            "unavailable": {m: why for m, why in modes.items() if why},
            "tools": [t.spec() for t in config.server_tools.values()],
            "note": console.note, "per_model": {m: console.per_model[m] for m in models}}


@router.get("/api/conversations")
def list_conversations(request: Request, console: TheConsole, q: str = ""):
    """The owner's conversations, newest first; with `q`, those whose title or a message holds
    each of its words (full-text, each `match` a snippet of the first matching message)."""
    if len(q) > 200:
        raise APIError(400, "q: at most 200 characters", param="q")
    who = console.owner(request)
    found = console.store.search(who, q) if q.strip() else console.store.list(who)
    return [console.readable(c) for c in found]


@router.post("/api/conversations")
def create_conversation(request: Request, console: TheConsole, body: NewConversation | None = None):
    body = body or NewConversation()         # no body: a new chat with the defaults
    console.mode_on(body.mode, param="mode")
    model = console.served(body.model, request) if body.model is not None else ""
    return console.readable(console.store.create(console.owner(request), body.title, body.mode,
                                                 console.checked(body.settings), model))


@router.get("/api/conversations/{cid}")
def get_conversation(cid: str, request: Request, console: TheConsole):
    return console.conversation(request, cid)


@router.patch("/api/conversations/{cid}")
def patch_conversation(cid: str, request: Request, console: TheConsole, body: ConversationPatch | None = None):
    body = body or ConversationPatch()
    who, conv, store = console.owner(request), console.conversation(request, cid), console.store
    # everything is checked before anything changes: a refused PATCH changes nothing
    settings = console.checked(body.settings) if body.settings is not None else None
    new_mode = body.mode is not None and body.mode != conv["mode"]
    if new_mode:
        if conv["messages"]:
            raise APIError(400, "a conversation's mode can change only before its first message", param="mode")
        console.mode_on(body.mode, param="mode")
    try:
        if body.title is not None:
            store.rename(who, cid, body.title)
        if settings is not None:
            store.update_settings(who, cid, settings)
        if new_mode:
            store.update_mode(who, cid, body.mode)
    except NotFound:              # deleted meanwhile
        raise APIError(404, "conversation not found", code="not_found") from None
    return console.conversation(request, cid)


@router.delete("/api/conversations/{cid}")
async def delete_conversation(cid: str, request: Request, console: TheConsole):
    # async, like send(): the check and the delete cannot interleave with a turn starting
    console.conversation(request, cid)
    console.not_busy(cid)
    console.store.delete(console.owner(request), cid)
    try:
        await asyncio.to_thread(console.workspaces.remove, cid)
    except GlmkitError:
        pass           # an id no workspace can have (not made by this server): nothing to remove
    return {"deleted": cid}


@router.get("/api/conversations/{cid}/export")
def export(cid: str, request: Request, console: TheConsole, format: str = "md"):
    conv = console.conversation(request, cid)
    name = quote(f"{slug(conv['title'])}.{'json' if format == 'json' else 'md'}")
    disposition = {"Content-Disposition": f"attachment; filename*=UTF-8''{name}"}
    if format == "json":
        return PlainTextResponse(console.store.export_json(console.owner(request), cid), media_type="application/json",
                                 headers=disposition)
    return PlainTextResponse(console.store.export_markdown(console.owner(request), cid), media_type="text/markdown",
                             headers=disposition)


@router.delete("/api/conversations/{cid}/messages")
async def clear(cid: str, request: Request, console: TheConsole):
    """Clear: the conversation stays (title, settings, files); its messages and variables go."""
    console.conversation(request, cid)
    console.not_busy(cid)
    console.store.truncate(console.owner(request), cid, 0)
    await asyncio.to_thread(console.workspaces.close_kernel, cid)
    return console.conversation(request, cid)


# -- answering ---------------------------------------------------------------------------------
@router.post("/api/conversations/{cid}/stop")
async def stop(cid: str, request: Request, console: TheConsole):
    """Stop the answer in progress and return once what was shown is stored (the browser's
    Stop does not rely on the server noticing a closed connection)."""
    console.conversation(request, cid)
    turn = console.active.get(cid)
    if turn is None:
        return {"stopped": False}
    turn.stop()
    await asyncio.to_thread(turn.finished.wait, 60)
    return {"stopped": True}


@router.post("/api/conversations/{cid}/messages")
async def send(cid: str, request: Request, console: TheConsole, body: Send | None = None):
    body = body or Send()
    who, store = console.owner(request), console.store
    conv = console.conversation(request, cid)
    console.not_busy(cid)
    console.mode_on(conv["mode"])
    model = console.served(body.model if body.model is not None else conv["model"], request)
    # each one valid; the defaults are the answering model's (its family's sampling)
    settings = {**console.defaults, **console.models[model].default_sampling, **conv["settings"],
                **console.checked(body.settings)}
    params = SamplingParams(**{k: settings[k] for k in SAMPLING})   # checked together (a GlmkitError is a 400)
    content = body.content if body.content and body.content.strip() else None
    msgs = conv["messages"]
    retrieved = None
    if conv["mode"] == "knowledge":       # the passages first: a refusal (no such kb) changes nothing
        retrieved = await console.retrieve(request, conv, body, content)
        conv = console.conversation(request, cid)     # as it is now, after the wait
        console.not_busy(cid)
        msgs = conv["messages"]
    if body.regenerate:
        last_user = max((m["seq"] for m in msgs if m["role"] == "user"), default=None)
        if last_user is None:
            raise APIError(400, "nothing to regenerate")
        content = None
        store.truncate(who, cid, last_user)
    elif body.edit_seq is not None:
        if not any(m["seq"] == body.edit_seq and m["role"] == "user" for m in msgs) or not content:
            raise APIError(400, "edit_seq must name a user message, and content is required")
        store.truncate(who, cid, body.edit_seq - 1)
        store.append(who, cid, "user", content)
    else:
        if not content:
            raise APIError(400, "content is required", param="content")
        store.append(who, cid, "user", content)
    if model != conv["model"]:        # the picker's choice answers this turn and the next ones
        store.update_model(who, cid, model)
    if conv["title"] == "New conversation" and content:
        store.rename(who, cid, title_of(content))
    history = [{"role": m["role"], "content": m["content"], **({"metadata": m["metadata"]} if m["metadata"] else {})}
               for m in store.get(who, cid)["messages"]]
    mode = conv["mode"]
    kernel = console.workspaces.lease(cid) if mode == "code" else None

    def finished():
        console.active.pop(cid, None)
        if kernel is not None:
            kernel.release()
    try:
        turn = Turn(store, who, cid, {
            "max_steps": console.config.max_steps,
            "system": (settings.get("system") or None) if mode in ("chat", "knowledge") else None,  # else the mode's own
            "tools": list(console.config.server_tools.values()) if mode == "tool" else (),
            "interpreter": kernel}, history,
            {"chat_model": console.models[model], "params": params, "max_new_tokens": settings["max_new_tokens"]},
            knowledge=retrieved)
        console.active[cid] = turn
        turn.start(on_finish=finished)
    except BaseException:
        finished()
        raise

    async def stream():
        try:
            while True:
                ev = await turn.events.get()
                yield "data: " + json.dumps(ev, ensure_ascii=False) + "\n\n"
                if ev["type"] == "done":
                    return
        finally:
            turn.stop()           # the browser pressed Stop or went away (no-op once done)

    return StreamingResponse(stream(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
