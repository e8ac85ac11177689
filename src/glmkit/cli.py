"""The `glmkit` command."""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from . import __version__
from .errors import GlmkitError

EXIT_COMMANDS = {"stop", "exit", "quit", ":q", "/bye"}


def _model_options(p: argparse.ArgumentParser):
    g = p.add_argument_group("model")
    g.add_argument("-m", "--model", metavar="PATH",
                   help="ChatGLM3 directory (config.json + tokenizer.model + safetensors/.bin shards) or a "
                        ".gguf file; default: $MODEL_PATH, else the embedded SmolLM2-135M-Instruct")
    g.add_argument("--device", default="cpu", help="cpu or cuda (or cuda:N); default cpu")
    g.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                   help="weights and activations; auto = float32 on CPU, float16 on CUDA")
    g.add_argument("--threads", type=_positive, metavar="N", help="CPU threads for PyTorch (default: PyTorch's choice)")
    g.add_argument("--quantize", choices=["auto", "none", "int8", "int4"], default="auto",
                   help="Linear weights: auto = as the checkpoint comes (GGUF Q4_0/Q4_1/Q8_0 stay quantized), "
                        "none = float, int8 = per channel, int4 = group-wise (quantized while loading)")
    g.add_argument("--group-size", type=int, default=128, choices=[32, 64, 128, 256],
                   help="int4 group size (input columns sharing one scale); default 128")


def _positive(text: str) -> int:
    """A count that must be at least 1: 0 would otherwise fall through to a default unnoticed."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a whole number, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _existing_dir(text: str) -> str:
    """A directory that is already there: glmkit does not create one wherever a typo points."""
    if not os.path.isdir(text):
        raise argparse.ArgumentTypeError(f"{text}: no such directory (create it first)")
    return text


def _sampling_options(p: argparse.ArgumentParser):
    g = p.add_argument_group("generation (defaults: the model's official values)")
    g.add_argument("--temperature", type=float, help="0 = greedy; ChatGLM3 default 0.8")
    g.add_argument("--top-p", type=float, help="nucleus sampling mass; ChatGLM3 default 0.8")
    g.add_argument("--top-k", type=int, help="sample among the k most likely tokens (0 = off)")
    g.add_argument("--repetition-penalty", type=float, help="> 1 discourages repeating tokens (1 = off)")
    g.add_argument("--max-new-tokens", type=_positive, default=None, help="most tokens in one reply (default 1024)")
    g.add_argument("--max-length", type=_positive, default=None,
                   help="most tokens of prompt + reply (the official demos' max_length); default: the model's context")
    g.add_argument("--seed", type=int, help="seed the sampler for reproducible replies")
    g.add_argument("--stop", action="append", metavar="TEXT", help="stop the reply at this text (repeatable)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glmkit", description="Run ChatGLM3 and similar models on your own machine.")
    p.add_argument("--version", action="version", version=f"glmkit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    chat = sub.add_parser("chat", help="chat in the terminal (or answer one prompt with -p)",
                          description="Chat in the terminal. Type `clear` to start over, `stop` (or Ctrl-D) to "
                                      "quit; Ctrl-C interrupts an answer and keeps the conversation.")
    chat.add_argument("-p", "--prompt", help="answer this one prompt, print only the reply, and exit")
    chat.add_argument("-s", "--system", help="system prompt for the conversation")
    chat.add_argument("--tools", metavar="SPEC",
                      help="let the model call tools: 'builtin' (calculator, time, unit converter, random "
                           "number), a .py file of @glmkit.tool functions, or a .json/.yaml file of schemas")
    chat.add_argument("--manual", action="store_true",
                      help="with --tools: do not run tools; you type each observation yourself")
    chat.add_argument("--max-steps", type=_positive, default=5, help="most tool calls per message (default 5)")
    chat.add_argument("--code", action="store_true",
                      help="code-interpreter mode: the model writes Python, glmkit runs it in a sandbox "
                           "(bubblewrap: no network, only the workspace is visible, resource limits)")
    chat.add_argument("--workspace", metavar="DIR", default=None, type=_existing_dir,
                      help="with --code: existing directory the code sees as /mnt/data (default: a temporary one, "
                           "removed on exit)")
    chat.add_argument("--unsafe-interpreter", action="store_true",
                      help="with --code: run model-written code WITHOUT a sandbox if none is available (dangerous)")
    _model_options(chat)
    _sampling_options(chat)

    q = sub.add_parser("quantize", help="write a quantized checkpoint once, load it in seconds afterwards",
                       description="Quantize a ChatGLM3 directory tensor by tensor (the float model is never "
                                   "held in memory) into a self-contained directory that glmkit loads with "
                                   "--model and no re-quantization.")
    q.add_argument("source", help="ChatGLM3 directory (config.json, tokenizer.model, weights)")
    q.add_argument("dest", help="new directory to write")
    q.add_argument("--bits", type=int, choices=[4, 8], default=4, help="4 (group-wise) or 8 (per channel); default 4")
    q.add_argument("--group-size", type=int, choices=[32, 64, 128, 256], default=128, help="int4 group size")
    q.add_argument("--output-layer", action="store_true", help="quantize the output layer too")

    sv = sub.add_parser("serve", help="OpenAI-compatible HTTP server with continuous batching",
                        description="Serve the model over an OpenAI-compatible API (chat completions, completions, "
                                    "models, embeddings, health, metrics). Binds 127.0.0.1 unless --host says otherwise.")
    _model_options(sv)
    sv.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; 0.0.0.0 for all)")
    sv.add_argument("--port", type=int, default=8000, help="port (default 8000)")
    sv.add_argument("--api-key", action="append", default=[], metavar="KEY", help="accepted API key (repeatable)")
    sv.add_argument("--api-key-file", metavar="FILE", help="file with one API key per line")
    sv.add_argument("--metrics-public", action="store_true",
                    help="serve /metrics without an API key even when keys are set (e.g. for a scraper)")
    sv.add_argument("--cors-origin", action="append", default=[], metavar="ORIGIN",
                    help="allow browser requests from this origin (repeatable; default: CORS off)")
    sv.add_argument("--max-batch", type=_positive, default=8, help="sequences decoded together (default 8)")
    sv.add_argument("--max-queue", type=_positive, default=64, help="requests allowed to wait; beyond it: 429 (default 64)")
    sv.add_argument("--kv-cache-mb", type=_positive, default=1024,
                    help="memory for the KV cache pool; sets the longest sequence per slot (default 1024)")
    sv.add_argument("--max-tokens", type=_positive, default=4096, help="largest max_tokens a request may ask for")
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
    sv.add_argument("--max-steps", type=_positive, default=5, help="most tool/code steps per request (default 5)")
    sv.add_argument("--unsafe-interpreter", action="store_true", help="with --code: allow running without a sandbox")
    sv.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    sv.add_argument("--scripted-replies", metavar="FILE",
                    help="TESTING ONLY: JSON object {user message: reply}; a chat whose last user message "
                         "matches is decoded under a constraint that forces that reply token by token "
                         "(lets tests drive tool calls through a tiny random model)")

    b = sub.add_parser("bench", help="measure load time, memory, prefill/decode speed or perplexity",
                       description="Measure a model as the engine runs it: model bytes, load time, peak RSS, "
                                   "time to first token, prefill tokens/s and decode ms per step at each batch "
                                   "size; or perplexity of a text with --perplexity.")
    _model_options(b)
    b.add_argument("--random-like", metavar="NAME", help="random weights with a real model's shapes "
                   "(chatglm3-6b, smollm2-135m): no download needed")
    b.add_argument("--quantize-output", action="store_true", help="quantize the output layer too")
    b.add_argument("--batch", type=_int_list, default=[1], help="batch sizes, comma-separated (default 1)")
    b.add_argument("--prompt-tokens", type=_positive, default=128, help="prompt length per row (default 128)")
    b.add_argument("--new-tokens", type=_positive, default=128, help="tokens decoded per row (default 128)")
    b.add_argument("--perplexity", metavar="FILE", help="compute perplexity of this text instead of speed")
    b.add_argument("--window", type=_positive, default=512, help="perplexity context window (default 512)")
    b.add_argument("--stride", type=_positive, default=256, help="perplexity window stride (default 256)")
    b.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    return p


def _int_list(text: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers, got {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError("batch sizes must be positive")
    return values


def _sampling(args) -> dict:
    return dict(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                repetition_penalty=args.repetition_penalty, seed=args.seed)


def _load(args, progress: bool):
    import glmkit
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    model = glmkit.load(args.model, device=args.device, dtype=None if args.dtype == "auto" else args.dtype,
                        progress=progress, quantize=args.quantize, group_size=args.group_size)
    return model


DEFAULT_MAX_NEW_TOKENS = 1024


def cmd_chat(args) -> int:
    model = _load(args, progress=sys.stderr.isatty())
    max_new = args.max_new_tokens or DEFAULT_MAX_NEW_TOKENS
    base = [{"role": "system", "content": args.system}] if args.system else []
    gen = dict(max_new_tokens=max_new, max_length=args.max_length, stop=args.stop, **_sampling(args))
    if args.tools or args.code:
        return tools_chat(model, args, gen)
    if args.prompt is not None:
        messages = base + [{"role": "user", "content": args.prompt}]
        for piece in model.stream_chat(messages, **gen):
            sys.stdout.write(piece)
            sys.stdout.flush()
        sys.stdout.write("\n")
        return 0
    return interactive(model, base, gen, max_new)


def _kernel_pool(args):
    from functools import partial

    from .sandbox import Interpreter, KernelPool
    return KernelPool(partial(Interpreter, unsafe=args.unsafe_interpreter))


def _make_agent(model, args, interpreter):
    import json

    from .chat.agent import Agent
    from .chat.tools import ToolResult, load_tools
    tools = load_tools(args.tools)
    if model.config.family != "chatglm" and (tools or interpreter):
        asked = " and ".join(x for x, on in (("<tool_call> JSON", tools), ("```python blocks", interpreter)) if on)
        print(f"glmkit: note: {model.name} has no ChatGLM3 tool protocol; it is asked for {asked} instead, "
              "which small models often ignore", file=sys.stderr)

    def manual(name, arguments):
        print(f"\n[{name}] called with {json.dumps(arguments, ensure_ascii=False)}", file=sys.stderr)
        text = input("observation (JSON)> ")
        return ToolResult(True, text)

    return Agent(model, tools, max_steps=args.max_steps, system=args.system,
                 observer=manual if args.manual else None, interpreter=interpreter)


def _show_agent(events, out=sys.stdout, log=sys.stderr):
    """The answer on `out`; each step (call, code, result, refusal, why it stopped) on `log`."""
    import json

    from .chat.agent import CodeStep, Finished, Observation, RefusedStep, TextDelta, ToolCallStep

    def call_line(call):
        return f"\n[tool] {call.name}({json.dumps(call.arguments, ensure_ascii=False)})"
    for ev in events:
        if isinstance(ev, TextDelta):
            out.write(ev.text)
            out.flush()
        elif isinstance(ev, ToolCallStep):
            print(call_line(ev.call), file=log, flush=True)
        elif isinstance(ev, CodeStep):
            print(f"\n[running code]\n{ev.call.code}", file=log, flush=True)
        elif isinstance(ev, Observation):
            status = "result" if ev.result.ok else "failed"
            print(f"[{status}] {ev.result.observation}", file=log, flush=True)
        elif isinstance(ev, RefusedStep):
            print(f"[error] {ev.call.name}: {ev.call.reason}", file=log, flush=True)
        elif isinstance(ev, Finished) and ev.reason == "max_steps":
            print("[error] stopped: the model asked for more tool calls than --max-steps allows", file=log, flush=True)
        elif isinstance(ev, Finished) and ev.reason == "tool_calls":
            for call in ev.handed_over:     # a tool given only as a schema, without --manual
                print(call_line(call) + " [not run: no implementation; --manual asks you for its result]",
                      file=log, flush=True)


def tools_chat(model, args, gen) -> int:
    import contextlib
    gen = {k: v for k, v in gen.items() if k != "stop"}
    with contextlib.ExitStack() as cleanup:
        kernel = None
        if args.code:
            kernels = _kernel_pool(args)
            cleanup.callback(kernels.close_all)
            # held for the whole chat; without --workspace, in a temporary one removed with it
            kernel = kernels.acquire("chat", args.workspace)
            kernel.start()
            print(f"[code interpreter: workspace {kernel.workspace} is /mnt/data"
                  f"{'' if kernel.sandboxed else ', NOT SANDBOXED'}"
                  f"{'' if args.workspace else '; removed on exit'}]", file=sys.stderr)
        return _tools_session(model, args, gen, kernel)


def _tools_session(model, args, gen, kernel) -> int:
    agent = _make_agent(model, args, kernel)
    if args.prompt is not None:
        _show_agent(agent.run(args.prompt, **gen))
        sys.stdout.write("\n")
        return 0
    print(f"glmkit {__version__} · {model.name} · tools: {', '.join(agent.tools) or 'none'}"
          + (" · code interpreter" if agent.interpreter is not None else ""))
    print("Type a message. `clear` starts over, `stop` quits, Ctrl-C interrupts an answer.\n")
    for text in _user_lines():
        if text == "clear":
            if kernel is not None:
                kernel.restart()      # a new conversation gets a fresh kernel; the workspace's files stay
            agent = _make_agent(model, args, kernel)
            print("[conversation cleared]\n")
            continue
        sys.stdout.write(f"{model.name}: ")
        try:
            _show_agent(agent.run(text, **gen))
        except KeyboardInterrupt:
            sys.stdout.write(" [interrupted]")
        except GlmkitError as e:
            print(f"\n[error: {e}]", file=sys.stderr)
        sys.stdout.write("\n\n")
    return 0


def _user_lines():
    """The person's messages; `clear` comes through as the word; stop/exit/Ctrl-D end it."""
    try:
        import readline  # noqa: F401  (line editing and history for input())
    except ImportError:
        pass
    while True:
        try:
            text = input("You: ")
        except EOFError:
            print()
            return
        except KeyboardInterrupt:
            print()
            continue
        cmd = text.strip().lower()
        if cmd in EXIT_COMMANDS:
            return
        if cmd == "clear":
            yield "clear"
        elif text.strip():
            yield text


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


def cmd_serve(args) -> int:
    import uvicorn

    from .server.app import ServerConfig, create_app
    model = _load(args, progress=sys.stderr.isatty())
    keys = api_keys(args)
    embedder = None
    if not args.no_embeddings:
        from .server.embeddings import load_embedder
        embedder = load_embedder(args.embedding_model)
    from .chat.tools import load_tools
    server_tools, kernels = load_tools(args.tools), None
    if args.code:
        kernels = _kernel_pool(args)
        kernels.check()       # refuse to start without a sandbox
    app = create_app(model, ServerConfig(api_keys=keys, cors_origins=args.cors_origin, max_batch=args.max_batch,
                                         max_queue=args.max_queue, max_tokens_limit=args.max_tokens,
                                         kv_cache_mb=args.kv_cache_mb, model_id=args.model_id,
                                         scripted_replies=_scripted(args.scripted_replies),
                                         server_tools=server_tools, code_interpreter=kernels,
                                         max_steps=args.max_steps, data_dir=_data_dir(args),
                                         metrics_public=args.metrics_public), embedder=embedder)
    print(f"glmkit {__version__} serving {args.model_id or model.name} on http://{args.host}:{args.port}/v1 "
          f"(batch {args.max_batch}, {app.state.scheduler.max_seq_len} tokens per sequence, "
          f"{'API keys required' if keys else 'no API key'})", file=sys.stderr, flush=True)
    try:
        uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    finally:
        if kernels is not None:
            kernels.close_all()     # the console's idle kernels (a request closes its own)
    return 0


def _data_dir(args) -> str | None:
    if args.no_console:
        return None
    if args.data_dir:
        return args.data_dir
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return os.path.join(base, "glmkit")


def _scripted(path: str | None) -> dict | None:
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


def cmd_quantize(args) -> int:
    import time

    from .models import quantized_checkpoint
    from .models.quantize import QuantConfig
    t0 = time.perf_counter()
    meta = quantized_checkpoint.write(args.source, args.dest, QuantConfig(args.bits, args.group_size, args.output_layer),
                                      progress=sys.stderr.isatty())
    size = sum(f.stat().st_size for f in Path(args.dest).iterdir())
    print(f"wrote {args.dest}: int{meta['bits']}"
          + (f" group {meta['group_size']}" if meta["group_size"] else "")
          + f", {size / 2**20:.1f} MiB, in {time.perf_counter() - t0:.1f} s")
    if meta["int8_fallback_layers"]:
        print(f"{len(meta['int8_fallback_layers'])} layer(s) kept in int8: their width is not a multiple of the group size")
    return 0


def interactive(model, base: list[dict], gen: dict, max_new: int) -> int:
    import signal
    import threading

    from .chat.reply_stream import Cancelled, Reply
    print(f"glmkit {__version__} · {model.name} · context {model.context_length} tokens")
    print("Type a message. `clear` starts over, `stop` quits, Ctrl-C interrupts an answer.\n")
    history = list(base)
    for text in _user_lines():
        if text == "clear":
            history = list(base)
            print("[conversation cleared]\n")
            continue
        messages = history + [{"role": "user", "content": text}]
        reply = Reply()
        shown: list[str] = []
        # Ctrl-C sets an event the reply stream checks between tokens, so the interrupt does not
        # depend on where in the engine the signal lands (one full test run saw a Ctrl-C have no effect)
        interrupted = threading.Event()
        previous = signal.signal(signal.SIGINT, lambda *_: interrupted.set())
        try:
            reserve = min(max_new, max(16, (gen.get("max_length") or model.context_length) // 4))
            messages, dropped = model.fit(messages, reserve, gen.get("max_length"))
            if dropped:
                print(f"[dropped the {dropped} oldest message(s) to fit the context of {model.context_length} tokens]",
                      file=sys.stderr)
            sys.stdout.write(f"{model.name}: ")
            sys.stdout.flush()
            for ev in model.reply(messages, reply=reply, cancel=interrupted, **gen):
                if ev.kind == "segment" and ev.metadata:
                    sys.stdout.write(f"\n[{ev.metadata}]\n")
                elif ev.kind == "text":
                    shown.append(ev.text)
                    sys.stdout.write(ev.text)
                sys.stdout.flush()
        except (KeyboardInterrupt, Cancelled):
            # keep what was shown: the next question may refer to it
            sys.stdout.write(" [interrupted]")
            reply.messages = [{"role": "assistant", "content": "".join(shown)}] if shown else []
        except GlmkitError as e:
            print(f"\n[error: {e}]\n", file=sys.stderr)
            continue
        finally:
            signal.signal(signal.SIGINT, previous)
        sys.stdout.write("\n\n")
        sys.stdout.flush()
        if reply.finish_reason == "length":
            print("[the reply reached the token limit]\n", file=sys.stderr)
        history = messages + reply.messages
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    try:
        if args.command == "chat":
            return cmd_chat(args)
        if args.command == "quantize":
            return cmd_quantize(args)
        if args.command == "serve":
            return cmd_serve(args)
        if args.command == "bench":
            from . import benchmark
            args.progress = sys.stderr.isatty()
            result = benchmark.run(args)
            benchmark.print_table(result)
            if args.json:
                benchmark.write_json(result, args.json)
            return 0
    except GlmkitError as e:
        print(f"glmkit: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # `glmkit chat -p ... | head` closed the pipe: not an error worth a traceback
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    parser.print_help()
    return 2


if __name__ == "__main__":
    sys.exit(main())
