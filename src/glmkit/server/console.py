"""The web console's HTTP side: a static page plus a small JSON API over the conversation store.

Answers in every mode are produced by the chat layer's Agent over the server's scheduler
(console_turns), so the console shares the API's engine, tool parser, agent loop and sandbox.
The user's message is stored when it arrives and each reply message as it completes; a reply
stopped from the browser is stored as far as it was shown."""

from __future__ import annotations

import asyncio
import json
import os
from pathlib import Path
from urllib.parse import quote

from fastapi import Request
from fastapi.responses import FileResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, Field

from ..errors import GlmkitError
from .console_turns import Turn
from .store import NotFound, Store, owner_of
from .workspace import Workspaces

STATIC = Path(__file__).with_name("static")


class NewConversation(BaseModel):
    title: str = Field("New conversation", max_length=200)
    mode: str = Field("chat", pattern="^(chat|tool|code)$")
    settings: dict = Field(default_factory=dict)


class ConversationPatch(BaseModel):
    title: str | None = Field(None, max_length=200)
    settings: dict | None = None
    mode: str | None = Field(None, pattern="^(chat|tool|code)$")   # only while it has no messages


class Send(BaseModel):
    content: str | None = Field(None, max_length=100_000)
    regenerate: bool = False          # drop the last assistant turn and answer again
    edit_seq: int | None = None       # replace the user message at this seq and answer again
    settings: dict = Field(default_factory=dict)


SETTINGS = ("temperature", "top_p", "top_k", "repetition_penalty", "max_new_tokens", "system")


CSP = ("default-src 'self'; img-src 'self' data:; media-src 'none'; object-src 'none'; frame-src 'none'; "
       "base-uri 'none'; form-action 'none'; style-src 'self'")


def add_console_routes(app, store: Store, chat_model, scheduler, config, APIError, request_key):
    """`request_key(request)`: the API key a request carries (the same rule as authentication)."""
    defaults = dict(chat_model.default_sampling, max_new_tokens=1024, system="")
    workspaces = Workspaces(Path(config.data_dir) / "workspaces", config.code_interpreter)
    app.state.workspaces = workspaces
    app.router.on_shutdown.append(workspaces.close_all)
    active: dict[str, Turn] = {}       # conversation id -> its turn in progress
    modes = {"chat": None,
             "tool": None if config.server_tools else "start the server with --tools builtin (or a tools file)",
             "code": None if config.code_interpreter else "start the server with --code"}

    def owner(request: Request) -> str:
        return owner_of(request_key(request) if config.api_keys else None)

    def conv_or_404(request, cid):
        try:
            return store.get(owner(request), cid)
        except NotFound:
            raise APIError(404, "conversation not found", code="not_found") from None

    def not_busy(cid):
        if cid in active:
            raise APIError(409, "this conversation is still answering; stop it first", code="busy")

    def mode_on(mode, param=None):
        if modes[mode]:
            raise APIError(400, f"{mode} mode is off: {modes[mode]}", param=param)

    def clean_settings(settings: dict) -> dict:
        unknown = set(settings) - set(SETTINGS)
        if unknown:
            raise APIError(400, f"unknown settings: {', '.join(sorted(unknown))}", param="settings")
        return settings

    @app.get("/", include_in_schema=False)
    def index():
        # the page loads only its own files, and nothing that a reply contains can make the
        # browser fetch from elsewhere (images only inline; no media, frames or plugins)
        return FileResponse(STATIC / "index.html", headers={"Content-Security-Policy": CSP})

    @app.get("/static/{name:path}", include_in_schema=False)
    def static(name: str):
        path = (STATIC / name).resolve()
        if STATIC.resolve() not in path.parents or not path.is_file():
            raise APIError(404, "not found")
        return FileResponse(path)

    @app.get("/api/config")
    def console_config():
        return {"model": chat_model.name, "defaults": defaults, "auth_required": bool(config.api_keys),
                "modes": [m for m, why in modes.items() if why is None],
                "unavailable": {m: why for m, why in modes.items() if why},
                "tools": [t.spec() for t in config.server_tools.values()]}

    @app.get("/api/conversations")
    def list_conversations(request: Request):
        return store.list(owner(request))

    @app.post("/api/conversations")
    def create_conversation(body: NewConversation, request: Request):
        mode_on(body.mode, param="mode")
        return store.create(owner(request), body.title, body.mode, clean_settings(body.settings))

    @app.get("/api/conversations/{cid}")
    def get_conversation(cid: str, request: Request):
        return conv_or_404(request, cid)

    @app.patch("/api/conversations/{cid}")
    def patch_conversation(cid: str, body: ConversationPatch, request: Request):
        conv = conv_or_404(request, cid)
        if body.title is not None:
            store.rename(owner(request), cid, body.title)
        if body.settings is not None:
            store.update_settings(owner(request), cid, clean_settings(body.settings))
        if body.mode is not None and body.mode != conv["mode"]:
            if conv["messages"]:
                raise APIError(400, "a conversation's mode can change only before its first message", param="mode")
            mode_on(body.mode, param="mode")
            store.update_mode(owner(request), cid, body.mode)
        return store.get(owner(request), cid)

    @app.delete("/api/conversations/{cid}")
    async def delete_conversation(cid: str, request: Request):
        # async, like send(): the check and the delete cannot interleave with a turn starting
        conv_or_404(request, cid)
        not_busy(cid)
        store.delete(owner(request), cid)
        await asyncio.to_thread(workspaces.remove, cid)
        return {"deleted": cid}

    @app.get("/api/conversations/{cid}/export")
    def export(cid: str, request: Request, format: str = "md"):
        conv_or_404(request, cid)
        if format == "json":
            return PlainTextResponse(store.export_json(owner(request), cid), media_type="application/json")
        return PlainTextResponse(store.export_markdown(owner(request), cid), media_type="text/markdown")

    @app.delete("/api/conversations/{cid}/messages")
    async def clear(cid: str, request: Request):
        """Clear: the conversation stays (title, settings, files); its messages and variables go."""
        conv_or_404(request, cid)
        not_busy(cid)
        store.truncate(owner(request), cid, 0)
        await asyncio.to_thread(workspaces.close_kernel, cid)
        return store.get(owner(request), cid)

    # -- the code interpreter's workspace ----------------------------------------------------
    @app.get("/api/conversations/{cid}/files")
    def list_files(cid: str, request: Request):
        conv_or_404(request, cid)
        return workspaces.list(cid)

    @app.put("/api/conversations/{cid}/files/{name}")
    async def upload(cid: str, name: str, request: Request):
        """The raw request body becomes /mnt/data/NAME for the conversation's code."""
        conv = conv_or_404(request, cid)
        if conv["mode"] != "code":
            raise APIError(400, "files belong to code-interpreter conversations")
        data = bytearray()
        async for chunk in request.stream():      # bounded even without a Content-Length
            data += chunk
            if len(data) > config.max_upload_bytes:
                raise APIError(413, f"the file is larger than {config.max_upload_bytes} bytes", code="body_too_large")
        try:
            return await asyncio.to_thread(workspaces.save, cid, name, bytes(data))
        except GlmkitError as e:
            raise APIError(400, str(e), param="name") from None

    @app.get("/api/conversations/{cid}/files/{name:path}")
    def download(cid: str, name: str, request: Request):
        conv_or_404(request, cid)
        try:
            fd, size = workspaces.open(cid, name)
        except (OSError, ValueError, GlmkitError):
            raise APIError(404, f"no file {name!r} in this conversation's workspace", code="not_found") from None
        f = os.fdopen(fd, "rb")   # closed when read out, or when dropped if the client goes away first

        def chunks():   # from the descriptor that was checked, never the path again
            with f:
                while block := f.read(1 << 16):
                    yield block
        filename = quote(name.rsplit("/", 1)[-1])
        return StreamingResponse(chunks(), media_type="application/octet-stream", headers={
            "Content-Length": str(size), "Content-Disposition": f"attachment; filename*=UTF-8''{filename}"})

    # -- answering ---------------------------------------------------------------------------
    @app.post("/api/conversations/{cid}/stop")
    async def stop(cid: str, request: Request):
        """Stop the answer in progress and return once what was shown is stored (the browser's
        Stop does not rely on the server noticing a closed connection)."""
        conv_or_404(request, cid)
        turn = active.get(cid)
        if turn is None:
            return {"stopped": False}
        turn.stop()
        await asyncio.to_thread(turn.finished.wait, 60)
        return {"stopped": True}

    @app.post("/api/conversations/{cid}/messages")
    async def send(cid: str, body: Send, request: Request):
        who = owner(request)
        conv = conv_or_404(request, cid)
        not_busy(cid)
        mode_on(conv["mode"])
        settings = {**defaults, **conv["settings"], **clean_settings(body.settings)}
        try:
            gen = {"temperature": float(settings["temperature"]), "top_p": float(settings["top_p"]),
                   "top_k": int(settings["top_k"]), "repetition_penalty": float(settings["repetition_penalty"])}
            chat_model.params(**gen)
            max_new = int(settings["max_new_tokens"])
        except (ValueError, TypeError) as e:
            raise APIError(400, f"bad settings: {e}", param="settings") from None
        msgs = conv["messages"]
        if body.regenerate:
            last_user = max((m["seq"] for m in msgs if m["role"] == "user"), default=None)
            if last_user is None:
                raise APIError(400, "nothing to regenerate")
            store.truncate(who, cid, last_user)
        elif body.edit_seq is not None:
            if not any(m["seq"] == body.edit_seq and m["role"] == "user" for m in msgs) or not body.content:
                raise APIError(400, "edit_seq must name a user message, and content is required")
            store.truncate(who, cid, body.edit_seq - 1)
            store.append(who, cid, "user", body.content)
        else:
            if not body.content:
                raise APIError(400, "content is required")
            store.append(who, cid, "user", body.content)
        if conv["title"] == "New conversation" and body.content:
            store.rename(who, cid, body.content.strip().splitlines()[0][:60] or "New conversation")
        history = [{"role": m["role"], "content": m["content"], **({"metadata": m["metadata"]} if m["metadata"] else {})}
                   for m in store.get(who, cid)["messages"]]
        mode = conv["mode"]
        script = config.script_for(chat_model, history[-1]["content"] if history[-1]["role"] == "user" else None)
        kernel = workspaces.acquire(cid) if mode == "code" else None

        def finished():
            active.pop(cid, None)
            if kernel is not None:
                workspaces.release(cid)
        try:
            turn = Turn(store, who, cid, {
                "max_steps": config.max_steps,
                "system": (settings.get("system") or None) if mode == "chat" else None,  # else the mode's own
                "tools": list(config.server_tools.values()) if mode == "tool" else (),
                "interpreter": kernel}, history,
                {"chat_model": chat_model, "scheduler": scheduler, "max_new_tokens": max_new},
                dict(gen, max_new_tokens=max_new), [script] if script else None)
            active[cid] = turn
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
