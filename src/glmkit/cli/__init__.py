"""The `glmkit` command: the parser (each subcommand's module adds its own part) and `main`,
which runs the chosen subcommand and turns a user's error into one line and an exit status.

chat.py: `glmkit chat` (tools_chat.py for --tools/--code, terminal.py for what both chats share
at the terminal, slash.py for the session's /commands, chat_log.py for its SQLite log); logs.py:
`glmkit logs`, that log read back; export.py: `glmkit export`, the console's conversations as
fine-tuning data; finetune.py: `glmkit finetune`, a LoRA adapter trained on it; kb.py: `glmkit kb`, knowledge bases; serve.py, quantize.py, bench.py, models.py:
the other subcommands; options.py: the option
groups they share and what those build (the model, the SamplingParams, the KernelPool)."""

from __future__ import annotations

import argparse
import os
import sys

from .. import __version__
from ..errors import GlmkitError
from . import bench, chat, export, finetune, kb, logs, models, quantize, serve


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="glmkit", description="Run ChatGLM3 and similar models on your own machine.")
    p.add_argument("--version", action="version", version=f"glmkit {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for command in (chat, logs, kb, quantize, serve, bench, models, export, finetune):
        command.add_parser(sub)       # each sets `run`, the function that carries it out
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.command is None:
        parser.print_help()
        return 0
    return leave(run(args))


def run(args) -> int:
    try:
        return args.run(args)
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


def leave(status: int) -> int:
    """The command's exit status, or the exit itself while a background compilation still runs
    (engine/compiled_step.py's `glmkit-compile` thread, e.g. a session quit in its first minute):
    the interpreter's teardown would then abort in PyTorch's C++ ("terminate called without an
    active exception", SIGABRT).  Everything of ours is done by now (replies shown, the log
    committed, kernels and workspaces closed by the command), so the process ends at once."""
    import threading
    if any(t.name == "glmkit-compile" and t.is_alive() for t in threading.enumerate()):
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status or 0)
    return status
