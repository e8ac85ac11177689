"""`glmkit serve`: its options, and what the server is built from: the model, the API keys (from
--api-key, --api-key-file and $GLMKIT_API_KEYS), the embedder, the server's own tools, the
interpreter's KernelPool, the console's data directory and (tests only) scripted replies."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from .. import __version__
from ..errors import GlmkitError
from .options import add_model_options, kernel_pool, load_model, positive


def add_parser(sub) -> None:
    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching",
                        description="Serve the model over an OpenAI-compatible API (chat completions, completions, "
                                    "models, embeddings, health, metrics). Binds 127.0.0.1 unless --host says otherwise.")
    sv.set_defaults(run=cmd_serve)
    add_model_options(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    sv.add_argument("--api-key", action="append", default=[], metavar="KEY", help="accepted API key (repeatable)")
    sv.add_argument("--api-key-file", metavar="FILE", help="file with one API key per line")
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
    sv.add_argument("--embedding-model", metavar="PATH",
                    help="sentence-embedding model directory for /v1/embeddings (default: the one installed with glmkit)")
    sv.add_argument("--no-embeddings", action="store_true", help="do not serve /v1/embeddings")
    sv.add_argument("--data-dir", metavar="DIR", default=None,
                    help="where the web console keeps conversations (SQLite); default ~/.local/share/glmkit")
    sv.add_argument("--no-console", action="store_true", help="serve the API only, no web console at /")
    sv.add_argument("--tools", metavar="SPEC", help="tools the server runs itself for requests with "
                    "\"glmkit_run_tools\": true ('builtin' or a .py file of @glmkit.tool functions)")
    sv.add_argument("--code", action="store_true", help="let such requests run the model's code in the sandboxed "
                    "interpreter (a fresh workspace per request)")
    sv.add_argument("--max-steps", type=positive, default=5, help="most tool/code steps per request (default 5)")
    sv.add_argument("--unsafe-interpreter", action="store_true", help="with --code: allow running without a sandbox")
    sv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sv.add_argument("--scripted-replies", metavar="FILE",
                    help="TESTING ONLY: JSON object {user message: reply}; a chat whose last user message "
                         "matches is decoded under a constraint that forces that reply token by token "
                         "(lets tests drive tool calls through a tiny random model)")


def cmd_serve(args) -> int:
    import uvicorn

    from ..chat.tools import load_tools
    from ..server.app import ServerConfig, create_app
    model = load_model(args, progress=sys.stderr.isatty())
    keys = api_keys(args)
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
                                         metrics_public=args.metrics_public), embedder=embedder)
    print(f"glmkit {__version__} serving {args.model_id or model.name} on http://{args.host}:{args.port}/v1 "
          f"(batch {args.max_batch}, {app.state.server.scheduler.max_seq_len} tokens per sequence, "
          f"{'API keys required' if keys else 'no API key'})" + (f"; web console on http://{args.host}:{args.port}/"
          if app.state.server.config.data_dir is not None else ""), file=sys.stderr, flush=True)
    try:
        return run_http_and_engine(app, uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level))
    finally:
        if kernels is not None:
            kernels.close_all()     # the console's idle kernels (a request closes its own)


def run_http_and_engine(app, config) -> int:
    """HTTP in a thread of its own, the engine's steps in this one (the thread that loaded the
    model).  On CPU that matters: PyTorch's OpenMP runtime stops keeping its worker threads spinning
    between parallel regions once a second thread owns a pool, which made a step run in a separate
    engine thread ~40% slower (engine/scheduler.py).  SIGINT/SIGTERM end the server gracefully as
    uvicorn does (a second SIGINT: at once); the app's shutdown stops the engine, which ends run()."""
    import signal
    import threading

    import uvicorn

    server = uvicorn.Server(config)
    scheduler = app.state.server.scheduler

    def http():
        try:
            server.run()
        finally:
            scheduler.stop()        # also when uvicorn could not start (a port in use)

    def on_signal(signum, frame):
        if server.should_exit and signum == signal.SIGINT:
            server.force_exit = True
        server.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    web = threading.Thread(target=http, name="glmkit-http")
    scheduler.run(claimed=web.start)
    web.join()
    return 0 if server.started else 1


def api_keys(args) -> list[str]:
    keys = list(args.api_key)
    if args.api_key_file:
        try:
            lines = Path(args.api_key_file).read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise GlmkitError(f"{args.api_key_file}: cannot read API keys ({e.strerror})") from None
        keys += [ln.strip() for ln in lines if ln.strip() and not ln.lstrip().startswith("#")]
    keys += [k.strip() for k in os.environ.get("GLMKIT_API_KEYS", "").split(",") if k.strip()]
    return keys


def data_dir(args) -> str | None:
    """Where the console keeps conversations; None: no console."""
    if args.no_console:
        return None
    if args.data_dir:
        return args.data_dir
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "glmkit")


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
