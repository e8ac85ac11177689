"""`glmkit serve`: its options, and what the server is built from: the model, the API keys (from
--api-key, --api-key-file and $GLMKIT_API_KEYS), the embedder, the server's own tools, the
interpreter's KernelPool, the console's data directory and (tests only) scripted replies."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .. import __version__
from ..engine.remote import KINDS as ENGINE_KINDS
from ..errors import GlmkitError
from .options import (add_model_options, default_data_dir, kernel_pool, load_model, positive, remote_model_at,
                      split_adapters)


def add_parser(sub) -> None:
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching",
                        description="Serve the model over an OpenAI-compatible API (chat completions, completions, "
                                    "models, embeddings, health, metrics). Binds 127.0.0.1 unless --host says otherwise.")
    sv.set_defaults(run=cmd_serve)
    add_model_options(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    sv.add_argument("--api-key", action="append", default=[], metavar="KEY", help="accepted API key (repeatable)")
    sv.add_argument("--api-key-file", metavar="FILE",
                    help="file with one API key per line; a line `KEY private_only` marks a key whose requests "
                         "are never answered outside this machine")
    sv.add_argument("--private-only", action="store_true",
                    help="no request is ever answered outside this machine: models served by a cloud service "
                         "or an engine on another host are refused (403), and never a fallback")
    sv.add_argument("--metrics-public", action="store_true",
                    help="serve /metrics without an API key even when keys are set (e.g. for a scraper)")
    sv.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                    help="allow browser requests from this origin (repeatable; default: CORS off)")
    sv.add_argument("--max-batch", type=positive, default=8, help="sequences decoded together (default 8)")
    sv.add_argument("--max-queue", type=positive, default=64, help="requests allowed to wait; beyond it: 429 (default 64)")
    sv.add_argument("--kv-cache-mb", type=positive, default=1024,
                    help="memory for the KV cache pool; sets the longest sequence per slot (default 1024)")
    sv.add_argument("--max-tokens", type=positive, default=4096, help="largest max_tokens a request may ask for")
    sv.add_argument("--model-id", help="model name reported by /v1/models (default: the checkpoint's name)")
    sv.add_argument("--models", metavar="FILE",
                    help="serve several models, each request's `model` choosing one: a YAML file of "
                         "`models: {NAME: {path: DIR, quantize: ...} or {engine: URL, kind: vllm, path: DIR} or "
                         "{openai: URL, model: NAME, api_key_env: VAR}}`, `routes: {default: NAME, fallback: "
                         "{NAME: NAME}}` and `private_only: BOOL` (instead of --model/--engine/--model-id; each model "
                         "has a scheduler of its own, sized by --max-batch/--kv-cache-mb unless its entry "
                         "sets max_batch/kv_cache_mb; the other options apply to every model)")
    sv.add_argument("--embedding-model", metavar="PATH",
                    help="sentence-embedding model directory for /v1/embeddings (default: the one installed with glmkit)")
    sv.add_argument("--no-embeddings", action="store_true", help="do not serve /v1/embeddings")
    sv.add_argument("--data-dir", metavar="DIR", default=None,
                    help="where the web console keeps conversations (SQLite) and their files, and where the "
                         "knowledge bases that requests' glmkit_knowledge name are (`glmkit kb --data-dir`); default "
                         "$GLMKIT_DATA_DIR, else ~/.local/share/glmkit")
    sv.add_argument("--database", metavar="URL",
                    help="keep the console's conversations (and /v1/responses stored for previous_response_id) "
                         "in this PostgreSQL database instead of SQLite in --data-dir, so that several gateways "
                         "share them: postgresql://USER@HOST[:PORT]/DB (a password best from $PGPASSWORD or "
                         "~/.pgpass; needs pip install 'psycopg[binary]'). --data-dir still holds each "
                         "conversation's files (uploads, Code mode's workspace), which are not shared")
    sv.add_argument("--no-console", action="store_true", help="serve the API only, no web console at /")
    sv.add_argument("--tools", metavar="SPEC", help="tools the server runs itself for requests with "
                    "\"glmkit_run_tools\": true ('builtin' or a .py file of @glmkit.tool functions)")
    sv.add_argument("--code", action="store_true", help="let such requests run the model's code in the sandboxed "
                    "interpreter (a fresh workspace per request)")
    sv.add_argument("--max-steps", type=positive, default=5, help="most tool/code steps per request (default 5)")
    sv.add_argument("--unsafe-interpreter", action="store_true", help="with --code: allow running without a sandbox")
    sv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    eg = sv.add_argument_group("remote engine (tokens generated by another server)")
    eg.add_argument("--engine", metavar="URL",
                    help="generate through the engine at URL (another `glmkit serve`, vLLM, or llama.cpp's "
                         "llama-server) instead of loading the weights here; --model names the same model's "
                         "directory or GGUF file, whose tokenizer, config and chat format are read here (not "
                         "its weights)")
    eg.add_argument("--engine-kind", choices=list(ENGINE_KINDS), default="glmkit",
                    help="what serves --engine (default glmkit): glmkit and vllm speak vLLM's token-id "
                         "/v1/completions, llamacpp llama-server's /completion")
    eg.add_argument("--engine-timeout", type=positive, default=60, metavar="S",
                    help="seconds to connect to the engine, and at most between two of its events (default 60)")
    eg.add_argument("--engine-api-key", metavar="KEY", default=os.environ.get("GLMKIT_ENGINE_API_KEY"),
                    help="API key the engine wants (also $GLMKIT_ENGINE_API_KEY)")
    rg = sv.add_argument_group("Ray Serve (the engine as N replicas; pip install 'glmkit[cluster]')")
    rg.add_argument("--ray", action="store_true",
                    help="run the engine as a Ray Serve deployment of --replicas replicas, each loading --model "
                         "with its own continuous batching; this server routes requests to them (the chat "
                         "protocol, tools and console stay here)")
    rg.add_argument("--replicas", type=positive, default=1, metavar="N", help="engine replicas with --ray (default 1)")
    rg.add_argument("--ray-address", metavar="ADDR",
                    help="join the Ray cluster at ADDR (host:port of its head, or 'auto') instead of starting a "
                         "local one; every node needs glmkit and the model at the same path")
    rg.add_argument("--ray-app", default="glmkit-engine", metavar="NAME",
                    help="the Serve application's name on the cluster (default glmkit-engine); each gateway "
                         "sharing a cluster needs its own, or it replaces the other's replicas")
    rg.add_argument("--ray-chunk-ms", type=float, default=50, metavar="MS",
                    help="a replica sends a stream's tokens at most every MS milliseconds, several in one "
                         "message when they come faster (each message costs CPU; default 50, 0: each at once)")
    sv.add_argument("--scripted-replies", metavar="FILE",
                    help="TESTING ONLY: JSON object {user message: reply}; a chat whose last user message "
                         "matches is decoded under a constraint that forces that reply token by token "
                         "(lets tests drive tool calls through a tiny random model)")


def cmd_serve(args) -> int:
    if args.models:
        from . import models_file
        if args.model or args.engine or args.model_id:
            raise GlmkitError("--models names every model (and its id); leave out --model, --engine and --model-id")
        spec = models_file.read(args.models)      # the whole file checked first: before torch is imported
    if args.adapter and (args.models or args.engine):
        raise GlmkitError("--adapter is merged into --model's weights as they load here; with --models or "
                          "--engine no weights load in this process")
    named = split_adapters(args.adapter)[1]       # a mistake in them: one error before anything loads
    if named and args.ray:
        raise GlmkitError("--adapter NAME=DIR (adapters served per request) is not supported with --ray; "
                          "serve them from one process, or one merged --adapter DIR per --ray server")
    if args.ray and (args.models or args.engine):
        raise GlmkitError("--ray serves --model's replicas; leave out --models and --engine")
    if not args.ray and (args.replicas != 1 or args.ray_address):
        raise GlmkitError("--replicas and --ray-address go with --ray")
    if args.ray:
        from ..engine.ray_serve import import_ray
        import_ray()              # one clear error before anything loads
    check_database(args)
    keys, private_keys = api_keys(args)       # a bad keys file: one error before anything loads
    try:
        return _serve(args, spec if args.models else None, keys, private_keys)
    finally:
        if args.ray:
            from ..engine.ray_serve import undeploy
            undeploy(args.ray_app)      # the replicas end (also when starting failed after deploying)


def _serve(args, spec, keys: list[str], private_keys: list[str]) -> int:
    import uvicorn

    from ..chat.tools import load_tools
    from ..server.app import ServerConfig, create_app
    from . import models_file
    if args.models:
        model, default = models_file.load(spec, args), spec.default
    else:
        model = remote_model(args) if args.engine else ray_model(args) if args.ray else \
            load_model(args, progress=sys.stderr.isatty(), named_adapters=True)
        default = None
    embedder = None
    if not args.no_embeddings:
        from ..server.embeddings import load_embedder
        embedder = load_embedder(args.embedding_model)
    server_tools, kernels = load_tools(args.tools), None
    if args.code:
        kernels = kernel_pool(args)
        kernels.check()       # refuse to start without a sandbox
    app = create_app(model, ServerConfig(engine_thread=False, api_keys=keys, cors_origins=args.cors_origin, max_batch=args.max_batch,
                                         max_queue=args.max_queue, max_tokens_limit=args.max_tokens,
                                         kv_cache_mb=args.kv_cache_mb, model_id=args.model_id,
                                         scripted_replies=scripted(args.scripted_replies),
                                         server_tools=server_tools, code_interpreter=kernels,
                                         max_steps=args.max_steps, data_dir=data_dir(args),
                                         metrics_public=args.metrics_public, default_model=default,
                                         model_limits=spec.limits() if args.models else None,
                                         fallbacks=spec.fallbacks if args.models else None,
                                         outside=spec.outside() if args.models else engine_outside(args, model),
                                         private_only=args.private_only or args.models and spec.private_only,
                                         private_keys=private_keys, database=args.database,
                                         knowledge_dir=args.data_dir or default_data_dir()),
                     embedder=embedder)
    state = app.state.server
    adapters = [n for n, m in state.models.items() if m.parent is not None]
    if len(state.models) > len(adapters) + 1:
        what = f"{', '.join(state.models)} (default {state.model_id})"
        batching = "a scheduler per model"
    else:
        what = state.model_id
        batching = f"tokens from {args.engine}" if args.engine else f"batch {args.max_batch}"
        if adapters:
            what += f" and its LoRA adapters {', '.join(adapters)} (per request, batched together)"
        if args.ray:
            batching = f"{args.replicas} Ray Serve replica{'s' if args.replicas > 1 else ''} of batch {args.max_batch}"
    print(f"glmkit {__version__} serving {what} on http://{args.host}:{args.port}/v1 "
          f"({batching}, {state.scheduler.max_seq_len} tokens per sequence, "
          f"{'API keys required' if keys else 'no API key'})" + (f"; web console on http://{args.host}:{args.port}/"
          if state.config.data_dir is not None else "")
          + (f" (conversations in {state.console.store.where})" if args.database else ""), file=sys.stderr, flush=True)
    try:
        return run_http_and_engine(app, uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
    finally:
        if kernels is not None:
            kernels.close_all()     # the console's idle kernels (a request closes its own)


def remote_model(args):
    """A ChatModel over the engine at --engine: --model's tokenizer, config and chat format, no weights."""
    return remote_model_at(args.model, args.engine, args.engine_kind, args.model_id, args.engine_timeout,
                           args.engine_api_key)


def ray_model(args):
    """A ChatModel over --replicas Ray Serve replicas of --model (engine/ray_serve.py): its
    tokenizer, config and chat format read here, its weights loaded by each replica."""
    from ..chat import chat_format_for
    from ..chat_model import ChatModel
    from ..engine.ray_serve import RayBackend, deploy
    from ..models.loader import without_weights
    checkpoint = without_weights(args.model)      # a wrong path: one error before Ray starts
    load = {"device": args.device, "dtype": None if args.dtype == "auto" else args.dtype,
            "quantize": args.quantize, "group_size": args.group_size, "compile": not args.no_compile,
            "adapter": str(Path(args.adapter[0]).resolve()) if args.adapter else None}   # (one, merged)
    handle, _ = deploy(str(checkpoint.source.resolve()), load, args.replicas, args.threads, args.max_batch,
                       args.kv_cache_mb, args.max_queue, address=args.ray_address, app=args.ray_app,
                       log=lambda m: print(f"glmkit: {m}", file=sys.stderr, flush=True),
                       interval=max(0.0, args.ray_chunk_ms) / 1000)
    backend = RayBackend(handle, checkpoint.tokenizer, chat_format_for(checkpoint),
                         args.model_id or checkpoint.config.name, checkpoint.config.context_length,
                         name=args.ray_app, timeout=args.engine_timeout)
    backend.check()
    return ChatModel.over(checkpoint, backend)


def run_http_and_engine(app, config) -> int:
    """HTTP in a thread of its own, the engine's steps in this one (the thread that loaded the
    model).  On CPU that matters: PyTorch's OpenMP runtime stops keeping its worker threads spinning
    between parallel regions once a second thread owns a pool, which made a step run in a separate
    engine thread ~40% slower (engine/scheduler.py).  SIGINT/SIGTERM end the server gracefully as
    uvicorn does (a second SIGINT: at once); the app's shutdown stops the engine, which ends run()."""
    import signal
    import threading

    import uvicorn

    from ..engine.scheduler import Scheduler

    server = uvicorn.Server(config)
    schedulers = [m.scheduler for m in app.state.server.models.values()]
    # this thread runs a local model's steps (the first; with --models the others get threads of
    # their own, as with one model a remote engine's RemoteLoad just waits here)
    scheduler = next((s for s in schedulers if isinstance(s, Scheduler)), schedulers[0])
    others = [s for s in schedulers if s is not scheduler]

    def http():
        try:
            server.run()
        finally:
            for s in others:
                s.stop()
            scheduler.stop()        # also when uvicorn could not start (a port in use)

    def on_signal(signum, frame):
        if server.should_exit and signum == signal.SIGINT:
            server.force_exit = True
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    web = threading.Thread(target=http, name="glmkit-http")
    for s in others:
        s.start()
    scheduler.run(claimed=web.start)
    web.join()
    return 0 if server.started else 1


def api_keys(args) -> tuple[list[str], list[str]]:
    """(every accepted key, the keys marked private_only in --api-key-file)."""
    keys, private = list(args.api_key), []
    if args.api_key_file:
        try:
            lines = Path(args.api_key_file).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise GlmkitError(f"{args.api_key_file}: cannot read API keys ({e.strerror})") from None
        for n, line in enumerate(lines, 1):
            words = line.split()
            if not words or words[0].startswith("#"):
                continue
            if len(words) > 2 or len(words) == 2 and words[1] != "private_only":
                raise GlmkitError(f"{args.api_key_file}: line {n}: expected `KEY` or `KEY private_only`")
            keys.append(words[0])
            if len(words) == 2:
                private.append(words[0])
    keys += [k.strip() for k in os.environ.get("GLMKIT_API_KEYS", "").split(",") if k.strip()]
    return keys, private


def engine_outside(args, model) -> dict[str, str]:
    """The model, when it is generated outside this machine (for --private-only): by --engine on
    another host, or by Ray replicas of a cluster joined at an address (its nodes may be anywhere)."""
    from ..server.cloud_chat import host_of, on_this_machine
    ray_address = (args.ray_address or os.environ.get("RAY_ADDRESS")) if args.ray else None
    if args.engine and not on_this_machine(args.engine):
        where = host_of(args.engine)
    elif ray_address and ray_address != "local":
        where = f"the Ray cluster at {ray_address}"
    else:
        return {}
    if args.private_only:       # every request would be refused
        raise GlmkitError(f"--private-only: the model is generated outside this machine ({where})")
    return {args.model_id or model.name: where}


def data_dir(args) -> str | None:
    """Where the console keeps conversations; None: no console."""
    if args.no_console:
        return None
    return args.data_dir or default_data_dir()


def check_database(args) -> None:
    """--database opened (and migrated) before the model loads: a bad URL, a server that cannot be
    reached or a refused login is one line at once, not after a minute of loading."""
    if not args.database:
        return
    from ..server.store import Store
    from ..server.store_sql import POSTGRES_SCHEMES
    if args.no_console:
        raise GlmkitError("--database keeps the web console's conversations; leave out --no-console")
    if not args.database.startswith(POSTGRES_SCHEMES):
        raise GlmkitError("--database takes a postgresql:// URL (SQLite, the default, needs no --database: "
                          "its file is in --data-dir)")
    Store(args.database).close()


def scripted(path: str | None) -> dict | None:
    if not path:
        return None
    import json
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as e:
        raise GlmkitError(f"{path}: cannot read scripted replies ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in data.items()):
        raise GlmkitError(f"{path}: scripted replies must be a JSON object of strings")
    print("glmkit: TESTING MODE: scripted replies are forced for matching messages", file=sys.stderr)
    return data
