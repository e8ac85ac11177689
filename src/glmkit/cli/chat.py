"""`glmkit chat`: its options, and the plain terminal chat, one prompt (-p) or a session.

The model's SamplingParams are made once here (cmd_chat) and passed down as `params=`; with
--tools or --code the agent runs the chat instead (tools_chat.py).  Both share terminal.py."""

from __future__ import annotations

import sys

from .. import __version__
from ..errors import GlmkitError
from . import tools_chat
from .options import add_model_options, add_sampling_options, existing_dir, load_model, positive, sampling_params
from .terminal import HINT, ctrl_c_cancels, say, user_lines


def add_parser(sub) -> None:
    chat = sub.add_parser("chat", help="chat in the terminal (or answer one prompt with -p)",
                          description="Chat in the terminal. Type `clear` to start over, `stop` (or Ctrl-D) to "
                                      "quit; Ctrl-C interrupts an answer and keeps the conversation.")
    chat.set_defaults(run=cmd_chat)
    chat.add_argument("-p", "--prompt", help="answer this one prompt, print only the reply, and exit")
    chat.add_argument("-s", "--system", help="system prompt for the conversation")
    chat.add_argument("--tools", metavar="SPEC",
                      help="let the model call tools: 'builtin' (calculator, time, unit converter, random "
                           "number), a .py file of @glmkit.tool functions, or a .json/.yaml file of schemas")
    chat.add_argument("--manual", action="store_true",
                      help="with --tools: do not run tools; you type each observation yourself")
    chat.add_argument("--max-steps", type=positive, default=5, help="most tool calls per message (default 5)")
    chat.add_argument("--code", action="store_true",
                      help="code-interpreter mode: the model writes Python, glmkit runs it in a sandbox "
                           "(bubblewrap: no network, only the workspace is visible, resource limits)")
    chat.add_argument("--workspace", metavar="DIR", default=None, type=existing_dir,
                      help="with --code: existing directory the code sees as /mnt/data (default: a temporary one, "
                           "removed on exit)")
    chat.add_argument("--unsafe-interpreter", action="store_true",
                      help="with --code: run model-written code WITHOUT a sandbox if none is available (dangerous)")
    add_model_options(chat)
    add_sampling_options(chat)


def cmd_chat(args) -> int:
    # one prompt (-p) decodes eagerly: it ends before a first compilation would, and would share the
    # CPU with it.  A session starts compiling now, while the user types (engine/compiled_step.py)
    model = load_model(args, progress=sys.stderr.isatty(), compile=args.prompt is None)
    model.start_compiling()
    params = sampling_params(args, model)
    if args.tools or args.code:
        return tools_chat.run(model, args, params)
    base = [{"role": "system", "content": args.system}] if args.system else []
    if args.prompt is not None:
        for piece in model.stream_chat(base + [{"role": "user", "content": args.prompt}], params=params,
                                       max_new_tokens=args.max_new_tokens, max_length=args.max_length,
                                       stop=args.stop):
            say(piece)
        say("\n")
        return 0
    return interactive(model, args, params, base)


def interactive(model, args, params, base: list[dict]) -> int:
    """A session: each answer streams; Ctrl-C ends it early and keeps what was shown; the oldest
    turns are dropped when the conversation outgrows the context."""
    from ..chat.reply_stream import Cancelled, Reply
    print(f"glmkit {__version__} · {model.name} · context {model.context_length} tokens")
    print(HINT)
    history = list(base)
    # room kept for the reply when old turns are dropped: a quarter of the context, at most a reply
    reserve = min(args.max_new_tokens, max(16, (args.max_length or model.context_length) // 4))
    for text in user_lines():
        if text == "clear":
            history = list(base)
            print("[conversation cleared]\n")
            continue
        messages = history + [{"role": "user", "content": text}]
        reply = Reply()
        shown: list[str] = []
        with ctrl_c_cancels() as cancel:
            try:
                messages, dropped = model.fit(messages, reserve, args.max_length)
                if dropped:
                    print(f"[dropped the {dropped} oldest message(s) to fit the context of {model.context_length} "
                          "tokens]", file=sys.stderr)
                say(f"{model.name}: ")
                for piece in model.stream_chat(messages, params=params, max_new_tokens=args.max_new_tokens,
                                               max_length=args.max_length, stop=args.stop, reply=reply, cancel=cancel):
                    shown.append(piece)
                    say(piece)
            except Cancelled:
                # keep what was shown: the next question may refer to it
                say(" [interrupted]")
                reply.messages = [{"role": "assistant", "content": "".join(shown)}] if shown else []
            except GlmkitError as e:
                print(f"\n[error: {e}]\n", file=sys.stderr)
                continue
        say("\n\n")
        if reply.finish_reason == "length":
            print("[the reply reached the token limit]\n", file=sys.stderr)
        history = messages + reply.messages
    return 0
