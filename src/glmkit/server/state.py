"""What a running server is made of: its configuration (ServerConfig, from `glmkit serve`'s
options), the models it serves (ServedModel, one per name; `--models FILE` names several), and
the one object the routes share (ServerState, at app.state.server)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING, Annotated, Any

from fastapi import Depends, Request

from .auth import request_key
from .errors import APIError

if TYPE_CHECKING:
    from ..chat_model import ChatModel
    from ..engine.scheduler import Scheduler


class ServerConfig:
    def __init__(self, api_keys=(), cors_origins=(), max_batch=8, max_queue=64, max_tokens_limit=4096,
                 max_body_bytes=1 << 20, max_seq_len=None, model_id=None, scripted_replies=None,
                 server_tools=(), code_interpreter=None, max_steps=5, data_dir=None, max_upload_bytes=64 << 20,
                 metrics_public=False, kv_cache_mb=None, engine_thread=True, default_model=None, model_limits=None,
                 fallbacks=None, outside=None, private_only=False, private_keys=(), database=None,
                 knowledge_dir=None):
        self.api_keys = [k for k in api_keys if k]
        # private_only (the server) or a key of private_keys (a request): no request is answered
        # by a model in `outside` ({name: host}: a cloud service or an engine on another machine),
        # not even as a fallback
        self.private_only = private_only
        self.private_keys = frozenset(k for k in private_keys if k)
        self.outside = dict(outside or {})
        # {model: the model that answers when it cannot (down, timed out, busy)}: routes.fallback
        self.fallbacks = dict(fallbacks or {})
        self.metrics_public = metrics_public   # with API keys: serve /metrics without one
        self.cors_origins = list(cors_origins)
        self.max_batch, self.max_queue = max_batch, max_queue
        self.max_tokens_limit, self.max_body_bytes = max_tokens_limit, max_body_bytes
        self.max_upload_bytes = max_upload_bytes  # a file uploaded into a console workspace
        self.max_seq_len, self.model_id = max_seq_len, model_id
        # with several models: the name of the one a request without a model (or "default") gets;
        # None: the first
        self.default_model = default_model
        # {model name: {"max_batch": n, "kv_cache_mb": n}}: a model's own sizes over the ones above
        self.model_limits = model_limits or {}
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
        # a postgresql:// URL: the console's conversations (and kept /v1/responses) live there,
        # shared with other gateways, instead of in data_dir's SQLite file; data_dir still holds
        # the conversations' workspaces (uploaded and generated files)
        self.database = database
        # where knowledge bases are kept (DATA_DIR/knowledge/, as `glmkit kb --data-dir` keeps them)
        # for glmkit_knowledge requests; None: the server answers from none
        self.knowledge_dir = knowledge_dir
        # True: the app's lifespan runs the scheduler's steps in a thread of their own; False: the
        # caller runs scheduler.run() in a thread it chooses (glmkit serve: its main thread)
        self.engine_thread = engine_thread


# names that SDK examples send and that mean "whatever this server serves": its default model
GENERIC_NAMES = ("default", "glmkit")


@dataclass
class ServedModel:
    """One model of the server: the name clients use, and what generates for it."""
    model_id: str
    chat_model: ChatModel
    scheduler: Scheduler      # its own continuous batching (remote: the engine's RemoteLoad)
    # a LoRA adapter served unmerged (`--adapter NAME=DIR`, id `<parent>:<NAME>`): the base model's
    # id and the adapter's name; its scheduler is the parent's, the batches shared (models/lora.py)
    parent: str | None = None
    adapter: str | None = None


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
    # every model by name, the default first; one server's chat_model/scheduler/model_id above
    # are the default's, so a route that names no model (and every single-model server) uses them
    models: dict[str, ServedModel] = field(default_factory=dict)
    # chat models another service answers (server.cloud_chat.CloudChat): /v1/chat/completions only
    clouds: dict[str, Any] = field(default_factory=dict)
    private: bool = False      # this request may not leave the machine (ServerConfig.private_only/keys)
    fallbacks_done: dict = field(default_factory=dict)  # (from, to, reason) -> count, for /metrics

    def __post_init__(self):
        if not self.models:
            self.models = {self.model_id: ServedModel(self.model_id, self.chat_model, self.scheduler)}

    def find(self, name: str | None) -> ServedModel | None:
        """The model a request's `model` names: None, "", "default" and "glmkit" are the default;
        None when this server serves no such model."""
        if not name or name in GENERIC_NAMES:
            return self.models[self.model_id]
        return self.models.get(name)

    def model_name(self, name: str | None, param: str = "model") -> str:
        """The id of the model (served here or a cloud's) that a request's `model` names; the
        API's 404 when there is none."""
        if name in self.clouds:
            return name
        served = self.find(name)
        if served is None:
            raise APIError(404, f"model {name!r} not found; this server serves {self.names()}", param=param,
                           code="model_not_found")
        return served.model_id

    def pick(self, name: str | None, param: str = "model") -> ServerState:
        """This state as a route for the model `name` sees it (its chat_model, scheduler and
        model_id; everything else shared), or the API's 404 for a model it does not serve, as
        OpenAI and vLLM answer it."""
        if name in self.clouds:
            self.allowed(name, param)
            raise APIError(400, f"model {name!r} is answered by {self.clouds[name].host} through its chat API: "
                                "only /v1/chat/completions reaches it", param=param, code="model_not_supported")
        served = self.models[self.model_name(name, param)]
        self.allowed(served.model_id, param)
        if served.model_id == self.model_id:
            return self
        return replace(self, chat_model=served.chat_model, scheduler=served.scheduler, model_id=served.model_id)

    def names(self) -> str:
        return ", ".join(repr(n) for n in [*self.models, *self.clouds] if self.private is False
                         or n not in self.config.outside)

    def allowed(self, name: str, param: str = "model") -> None:
        """A 403 when this request is private and `name` is answered outside this machine."""
        if self.private and name in self.config.outside:
            who = "this server" if self.config.private_only else "this API key"
            raise APIError(403, f"model {name!r} is answered outside this machine ({self.config.outside[name]}) "
                                f"and {who} is private_only", "permission_error", param=param, code="private_only")

    def fallback_for(self, name: str) -> str | None:
        """The model that answers for `name` when it cannot: routes.fallback, unless this request
        may not leave the machine and that model is outside it."""
        target = self.config.fallbacks.get(name)
        return None if target is None or self.private and target in self.config.outside else target


def server_state(request: Request) -> ServerState:
    """The server as this request sees it: private when the server or the request's key says so."""
    state = request.app.state.server
    config = state.config
    if config.outside and (config.private_only or config.private_keys and request_key(request) in config.private_keys):
        return replace(state, private=True)
    return state


# a route's parameter `server: Server` is this app's ServerState
Server = Annotated[ServerState, Depends(server_state)]
