"""create_app: the FastAPI application, wired from its parts.

Each model has one continuous-batching Scheduler that serves everything asked of it (API requests
and agent runs alike); with several models (`glmkit serve --models FILE`), each request's `model`
picks one (ServerState.pick).  The routers (openai_routes, embeddings, console) share one ServerState at app.state.server; every
request passes the Guard middleware (request id, API keys, body limit, /metrics counts) and every
refusal is shaped by server.errors.  This is the one module of the server that needs torch (the
scheduler)."""

from __future__ import annotations

from contextlib import asynccontextmanager

from fastapi import FastAPI
from starlette.routing import Route

from .. import __version__
from ..engine.scheduler import Scheduler
from . import (anthropic_api, console, console_files, console_knowledge, embeddings, ollama_api, openai_routes,
               responses_api)
from .cloud_chat import CloudChat
from .errors import StrictJSONRoute, add_error_handlers
from .middleware import Guard
from .state import ServedModel, ServerConfig, ServerState

__all__ = ["ServerConfig", "create_app"]


def create_app(chat_model, config: ServerConfig | None = None, embedder=None) -> FastAPI:
    """`chat_model`: the ChatModel to serve, or {name: ChatModel or CloudChat} for several
    (config.default_model names the default, a ChatModel; None: the first ChatModel)."""
    config = config or ServerConfig()
    clouds = {}
    if isinstance(chat_model, dict):
        chat_models = {n: m for n, m in chat_model.items() if not isinstance(m, CloudChat)}
        clouds = {n: m for n, m in chat_model.items() if isinstance(m, CloudChat)}
    else:
        chat_models = {config.model_id or chat_model.name: chat_model}
    default = config.default_model or next(iter(chat_models))
    served = {name: _served(name, m, config) for name, m in chat_models.items()}
    served = {default: served.pop(default), **served}      # the default first (listed first, too)
    first = served[default]
    for name in list(served):          # each LoRA adapter served unmerged: `<model>:<adapter>`, after its model
        served.update((s.model_id, s) for s in _adapters(served[name], chat_models[name], config))
    server = ServerState(config, first.chat_model, first.scheduler, default, embedder, models=served, clouds=clouds)
    schedulers = list({id(m.scheduler): m.scheduler for m in served.values()}.values())   # adapters share theirs

    @asynccontextmanager
    async def lifespan(app):
        if config.engine_thread:
            for scheduler in schedulers:
                scheduler.start()
        try:
            yield
        finally:
            for scheduler in schedulers:
                scheduler.stop()
            for cloud in clouds.values():
                await cloud.aclose()

    # no /docs or /redoc: FastAPI's pages load Swagger UI and ReDoc from a CDN, and the server
    # fetches nothing at run time (offline); /openapi.json describes the API
    app = FastAPI(title="glmkit", version=__version__, lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible API for ChatGLM3 and similar models, served by glmkit.")
    app.router.route_class = StrictJSONRoute
    app.state.server = server
    add_error_handlers(app)
    if config.cors_origins:
        from fastapi.middleware.cors import CORSMiddleware
        app.add_middleware(CORSMiddleware, allow_origins=config.cors_origins, allow_methods=["*"],
                           allow_headers=["*"])
    routers = [openai_routes.router, anthropic_api.router, responses_api.router, ollama_api.router]
    if embedder is not None:
        routers.append(embeddings.router)
    if config.data_dir is not None:
        server.console = console.Console(server)
        routers += [console.router, console_files.router, console_knowledge.router]
    for router in routers:
        app.include_router(router)
    # every route, for /metrics to name a request that was refused before routing (FastAPI keeps
    # an included router as one entry of app.router.routes, which names no route)
    routes = [r for router in (app.router, *routers) for r in router.routes if isinstance(r, Route)]
    app.add_middleware(Guard, config=config, counts=server.http_requests, routes=routes)
    return app


def _served(name: str, chat_model, config: ServerConfig) -> ServedModel:
    """A model as the server serves it: generating through a scheduler of its own, sized by the
    server's options (remote: its engine's RemoteLoad)."""
    if chat_model.remote:
        # tokens come from an engine elsewhere (engine/remote.py): what the routes ask of a
        # scheduler (/health, /metrics, the server's lifetime) is its RemoteLoad
        scheduler = chat_model.backend.scheduler
    else:
        compiled = dict(compile=chat_model.compile, progress=chat_model.compile_progress)   # as glmkit.load() said
        sizes = {"max_batch": config.max_batch, "kv_cache_mb": config.kv_cache_mb, **config.model_limits.get(name, {})}
        if sizes["kv_cache_mb"]:
            scheduler = Scheduler.from_memory(chat_model.model, sizes["kv_cache_mb"], sizes["max_batch"],
                                              max_queue=config.max_queue, **compiled)
        else:
            scheduler = Scheduler(chat_model.model, max_batch=sizes["max_batch"], max_seq_len=config.max_seq_len,
                                  max_queue=config.max_queue, **compiled)
        chat_model.serve_with(scheduler)    # the model's one engine: API requests and agent runs share it
    if config.scripted_replies:
        from ..chat.scripted import ScriptedBackend
        chat_model = chat_model.with_backend(ScriptedBackend(chat_model.backend, by_message=config.scripted_replies))
    return ServedModel(name, chat_model, scheduler)


def _adapters(base: ServedModel, chat_model, config: ServerConfig) -> list[ServedModel]:
    """The model's LoRA adapters served unmerged (`--adapter NAME=DIR`), each its own model id
    `<model>:<NAME>` generating through the model's own scheduler, in the same batches."""
    out = []
    for adapter in chat_model.adapters:
        view = chat_model.with_adapter(adapter)
        if config.scripted_replies:
            from ..chat.scripted import ScriptedBackend
            view = view.with_backend(ScriptedBackend(view.backend, by_message=config.scripted_replies))
        out.append(ServedModel(f"{base.model_id}:{adapter}", view, base.scheduler, parent=base.model_id,
                               adapter=adapter))
    return out
