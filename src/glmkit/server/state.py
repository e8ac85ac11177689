"""What a running server is made of: its configuration (ServerConfig, from `glmkit serve`'s
options) and the one object the routes share (ServerState, at app.state.server)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request

if TYPE_CHECKING:
    from ..chat_model import ChatModel
    from ..engine.scheduler import Scheduler


class ServerConfig:
    def __init__(self, api_keys=(), cors_origins=(), max_batch=8, max_queue=64, max_tokens_limit=4096,
                 max_body_bytes=1 << 20, max_seq_len=None, model_id=None, scripted_replies=None,
                 server_tools=(), code_interpreter=None, max_steps=5, data_dir=None, max_upload_bytes=64 << 20,
                 metrics_public=False, kv_cache_mb=None, engine_thread=True):
        self.api_keys = [k for k in api_keys if k]
        self.metrics_public = metrics_public   # with API keys: serve /metrics without one
        self.cors_origins = list(cors_origins)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_tokens_limit, self.max_body_bytes = max_tokens_limit, max_body_bytes
        self.max_upload_bytes = max_upload_bytes  # a file uploaded into a console workspace
        self.max_seq_len, self.model_id = max_seq_len, model_id
        self.kv_cache_mb = kv_cache_mb      # if set, the KV cache's size, which decides max_seq_len
        # TESTING ONLY: {user message: reply script}; the model's backend is wrapped in a
        # chat.scripted.ScriptedBackend that forces these replies (the one place that does)
        self.scripted_replies = scripted_replies or {}
        # tools the server itself runs (glmkit_run_tools requests, the console's Tool mode), and the
        # sandbox.KernelPool that its code runs in (None: no code runs)
        self.server_tools = {t.name: t for t in server_tools}
        self.code_interpreter = code_interpreter
        self.max_steps = max_steps
        self.data_dir = data_dir      # the web console's conversation store; None: no console
        # True: the app's lifespan runs the scheduler's steps in a thread of their own; False: the
        # caller runs scheduler.run() in a thread it chooses (glmkit serve: its main thread)
        self.engine_thread = engine_thread


@dataclass
class ServerState:
    config: ServerConfig
    chat_model: ChatModel      # generating through `scheduler` (a ScriptedBackend's view of it, in tests)
    scheduler: Scheduler       # every generation of this server, API and console (with a remote
                               # engine: its engine.remote.RemoteLoad, the same questions answered)
    model_id: str              # the name clients use for it
    embedder: Any = None       # models.bert.Embedder for /v1/embeddings, or None
    console: Any = None        # server.console.Console, or None (no --data-dir)
    started: int = field(default_factory=lambda: int(time.time()))
    http_requests: dict = field(default_factory=dict)   # (route template, status) -> count, for /metrics


def server_state(request: Request) -> ServerState:
    return request.app.state.server


# a route's parameter `server: Server` is this app's ServerState
Server = Annotated[ServerState, Depends(server_state)]
