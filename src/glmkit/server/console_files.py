"""The console's code-interpreter workspace: the files of a conversation's /mnt/data, and a
person's own code run in its kernel (Run on a code block).

    GET    /api/conversations/{cid}/files               the workspace's files
    PUT    /api/conversations/{cid}/files/{name}        the raw body becomes /mnt/data/NAME
    GET    /api/conversations/{cid}/files/{name}        download one
    POST   /api/conversations/{cid}/run  {"code": ...}  run code, recorded as the person's step

Routes of the console (server/console.py's Console: the owner, the store, the workspaces, the
turns in progress), included with its router when the server has a data directory."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from urllib.parse import quote

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from ..chat.protocols import GLM3Protocol
from ..chat.tool_calls import INTERPRETER, CodeCall
from ..chat.tools import ToolResult
from ..errors import GlmkitError
from .console import TheConsole
from .console_requests import Run
from .errors import APIError, StrictJSONRoute
from .store import NotFound
from .tool_steps import step_view

router = APIRouter(route_class=StrictJSONRoute)


# -- the code interpreter's workspace ----------------------------------------------------------
@router.get("/api/conversations/{cid}/files")
def list_files(cid: str, request: Request, console: TheConsole):
    console.conversation(request, cid)
    return console.workspaces.list(cid)


@router.put("/api/conversations/{cid}/files/{name}")
async def upload(cid: str, name: str, request: Request, console: TheConsole):
    """The raw request body becomes /mnt/data/NAME for the conversation's code (its size bounded
    by the middleware's upload limit, counted as it arrives)."""
    if console.conversation(request, cid)["mode"] != "code":
        raise APIError(400, "files belong to code-interpreter conversations")
    data = await request.body()
    try:
        return await asyncio.to_thread(console.workspaces.save, cid, name, data)
    except GlmkitError as e:
        raise APIError(400, str(e), param="name") from None


@router.get("/api/conversations/{cid}/files/{name:path}")
def download(cid: str, name: str, request: Request, console: TheConsole):
    console.conversation(request, cid)
    try:
        fd, size = console.workspaces.open(cid, name)
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


# -- a person's own code -----------------------------------------------------------------------
class _UserRun:
    """A cell the person runs (Run on a code block): it holds the conversation as a turn does,
    and Stop interrupts it."""

    def __init__(self, kernel):
        self.kernel, self.finished = kernel, threading.Event()

    def stop(self):
        self.kernel.interrupt()


@router.post("/api/conversations/{cid}/run")
async def run_code(cid: str, request: Request, console: TheConsole, body: Run):
    """Run `code` in the conversation's sandboxed kernel (its variables and /mnt/data), recorded
    as a step of the conversation like the model's own code steps, marked as the person's
    (extras.by = "user"), so the model sees the code and its output in the history too."""
    who, store = console.owner(request), console.store
    conv = console.conversation(request, cid)
    if conv["mode"] != "code":
        raise APIError(400, "code runs in Code interpreter conversations only")
    console.mode_on("code")
    console.not_busy(cid)
    kernel = console.workspaces.lease(cid)
    job = console.active[cid] = _UserRun(kernel)
    try:
        started = time.monotonic()
        cell = await asyncio.to_thread(kernel.run, body.code)
        seconds = round(time.monotonic() - started, 3)
        call = CodeCall("user-run", body.code)
        fence = "```python\n" + body.code.rstrip("\n") + "\n```"
        # as the model's own code step would be in its history: ChatGLM3's interpreter segment,
        # or (any other protocol) a fenced block in an assistant message
        metadata = INTERPRETER if type(console.models[conv["model"]].protocol) is GLM3Protocol else ""
        store.append(who, cid, "assistant", fence, metadata, {"by": "user"})
        view = {"name": INTERPRETER, **step_view(call, ToolResult(not cell.error, cell.observation(), value=cell)),
                "by": "user", "seconds": seconds}
        store.append(who, cid, "observation", cell.observation(), "", view)
    except NotFound:
        raise APIError(404, "conversation not found", code="not_found") from None
    finally:
        kernel.release()
        console.active.pop(cid, None)
        job.finished.set()
    return view
