"""`glmkit chat`: its options, and the plain terminal chat, one prompt (-p, or piped in) or a session.

The model's SamplingParams are made once here (cmd_chat) and passed down as `params=` (a session's
/set makes new ones: slash.Settings); with --tools or --code the agent runs the chat instead
(tools_chat.py).  Both share terminal.py (lines, Ctrl-C), render.py (Markdown at a terminal),
slash.py (/commands) and chat_log.py (every exchange logged, and -c/--cid to resume one)."""

from __future__ import annotations

import sys
import time
from contextlib import nullcontext

from .. import __version__
from ..errors import GlmkitError
from . import tools_chat
from .chat_log import ChatLog, Recorder, log_path, resume
from .options import add_model_options, add_sampling_options, existing_dir, load_model, positive, sampling_params
from .render import renderer
from .slash import Commands, Settings
from .terminal import (HINT, after_reply, ctrl_c_cancels, one_shot_prompt, piped_stdin, print_sources,
                       run_session, say)


def add_parser(sub) -> None:
    chat = sub.add_parser("chat", help="chat in the terminal (or answer one prompt with -p)",
                          description="Chat in the terminal. /help lists the commands (/set, /system, /save, "
                                      "...); a line \"\"\" starts a multi-line message; Ctrl-C interrupts an answer "
                                      "and keeps the conversation; /bye, `stop` or Ctrl-D quits.  Every exchange is "
                                      "logged (see `glmkit logs`) unless --no-log.  Text piped in is the prompt, or "
                                      "is added to -p's after a blank line.")
    chat.set_defaults(run=cmd_chat)
    chat.add_argument("-p", "--prompt", help="answer this one prompt, print only the reply, and exit")
    chat.add_argument("-s", "--system", help="system prompt for the conversation")
    chat.add_argument("-c", "--continue", dest="continue_latest", action="store_true",
                      help="continue the most recent logged conversation (its messages are the history)")
    chat.add_argument("--cid", metavar="ID", help="continue the logged conversation with this id (see `glmkit logs`)")
    chat.add_argument("--no-log", action="store_true",
                      help="do not log this chat (default: logged in $GLMKIT_DATA_DIR or ~/.local/share/glmkit)")
    chat.add_argument("-v", "--verbose", action="store_true",
                      help="after each reply, print its tokens, tokens/s and prompt tokens on stderr")
    chat.add_argument("--server", metavar="URL",
                      help="talk to a running `glmkit serve` at URL (e.g. http://127.0.0.1:8000) instead of "
                           "loading a model: starts at once ($GLMKIT_API_KEY is sent as its API key)")
    chat.add_argument("--tools", metavar="SPEC",
                      help="let the model call tools: 'builtin' (calculator, time, unit converter, random "
                           "number), a .py file of @glmkit.tool functions, or a .json/.yaml file of schemas")
    chat.add_argument("--manual", action="store_true",
                      help="with --tools: do not run tools; you type each observation yourself")
    chat.add_argument("--max-steps", type=positive, default=5, help="most tool calls per message (default 5)")
    chat.add_argument("--code", action="store_true",
                      help="code-interpreter mode: the model writes Python, glmkit runs it in a sandbox "
                           "(bubblewrap: no network, only the workspace is visible, resource limits); "
                           "/run runs the last code block of the conversation")
    chat.add_argument("--workspace", metavar="DIR", default=None, type=existing_dir,
                      help="with --code: existing directory the code sees as /mnt/data (default: a temporary one, "
                           "removed on exit)")
    chat.add_argument("--unsafe-interpreter", action="store_true",
                      help="with --code: run model-written code WITHOUT a sandbox if none is available (dangerous)")
    chat.add_argument("--kb", metavar="NAME",
                      help="answer each message from this knowledge base (`glmkit kb`): the passages retrieved for "
                           "it go into the prompt, the answer cites them as [n], and its sources are printed under it")
    chat.add_argument("--passages", dest="kb_top_k", type=positive, default=5, metavar="N",
                      help="with --kb: how many passages each message is given (default 5; --top-k is sampling's)")
    chat.add_argument("--data-dir", metavar="DIR", default=None,
                      help="where the chat log and knowledge bases are kept (default: $GLMKIT_DATA_DIR, "
                           "else ~/.local/share/glmkit)")
    add_model_options(chat)
    add_sampling_options(chat)


def cmd_chat(args) -> int:
    # what needs no model is checked first: a wrong --cid or an empty pipe fails in a moment
    args.prompt = one_shot_prompt(args.prompt, piped_stdin())
    if args.prompt is not None and not args.prompt.strip():
        raise GlmkitError("nothing to answer: the prompt (and what was piped in) is empty")
    history, logged_system, cid = resume(args.continue_latest, args.cid, args.data_dir)
    system = args.system if args.system is not None else logged_system
    knowledge = None
    if args.kb:
        if args.server:
            raise GlmkitError("--kb retrieves here and answers with the model loaded here; with --server, send "
                              "\"glmkit_knowledge\" in the API request instead")
        from .kb import ChatKnowledge
        knowledge = ChatKnowledge(args.kb, args.data_dir, args.kb_top_k)     # a wrong name fails before the model loads
    recorder = Recorder(None if args.no_log else open_log(args.data_dir), "", cid)
    try:
        return run_chat(args, recorder, system, history, knowledge)
    finally:
        if recorder.log is not None:
            recorder.log.close()
        if knowledge is not None:
            knowledge.close()


def open_log(data_dir: str | None = None) -> ChatLog | None:
    """The chat log, or None with one warning when it cannot be opened (a data directory that is a
    file, no permission, a database locked too long): the chat itself does not need it."""
    try:
        return ChatLog(log_path(data_dir))
    except (OSError, GlmkitError) as e:
        print(f"glmkit: warning: not logging this chat: {e}", file=sys.stderr)
        return None


def run_chat(args, recorder: Recorder, system: str | None, history: list[dict], knowledge=None) -> int:
    if args.server:
        if args.tools or args.code:
            raise GlmkitError("--tools and --code run the model here; with --server only the plain chat is available")
        from .remote import RemoteModel
        model = RemoteModel(args.server)
    else:
        # one prompt (-p) decodes eagerly: it ends before a first compilation would, and would share the
        # CPU with it.  A session starts compiling now, while the user types (engine/compiled_step.py)
        model = load_model(args, progress=sys.stderr.isatty(), compile=args.prompt is None)
    model.start_compiling()
    recorder.model_name = model.name
    settings = Settings(model, args, sampling_params(args, model))
    if args.tools or args.code:
        return tools_chat.run(model, args, settings, recorder, system, history, knowledge)
    session = PlainSession(model, args, settings, recorder, system, history, knowledge)
    if args.prompt is not None:
        session.answer(args.prompt, renderer(), one_shot=True)
        return 0
    return interactive(session)


class PlainSession:
    """A conversation with the model: its system prompt, its user and assistant messages, the
    sampling (Settings) and the log it is written to.  What /commands act on (slash.Commands)."""

    def __init__(self, model, args, settings: Settings, recorder: Recorder, system: str | None, history: list[dict],
                 knowledge=None):
        self.model, self.args, self.settings, self.recorder = model, args, settings, recorder
        self.system, self.history = system, list(history)
        self.knowledge = knowledge      # kb.ChatKnowledge (--kb), or None

    @property
    def conversation_id(self) -> str | None:
        return self.recorder.conversation_id

    def clear(self) -> None:
        self.history = []
        self.recorder.new_conversation()

    def set_system(self, text: str) -> None:
        self.system = text

    def conversation(self) -> list[dict]:
        return list(self.history)

    def load(self, messages: list[dict], system: str | None) -> None:
        self.history = list(messages)
        if system is not None:
            self.system = system
        self.recorder.new_conversation()    # a loaded conversation is logged from here as a new one

    def tool_names(self) -> list[str]:
        return []

    def answer(self, text: str, out, one_shot: bool = False) -> None:
        """Stream the answer to `text` through `out` (render.py).  A session's: Ctrl-C ends it early
        and keeps what was shown; the oldest turns are dropped when the conversation outgrows the
        context; an error is shown and the session goes on.  A one-shot's (-p): Ctrl-C ends the
        command and an error is main's to report, as before."""
        from ..chat.reply_stream import Cancelled, Reply
        a, model = self.args, self.model
        base = [{"role": "system", "content": self.system}] if self.system else []
        turn, passages = [{"role": "user", "content": text}], None
        if self.knowledge is not None:      # the passages go where the model's protocol carries context
            from ..chat.knowledge_context import knowledge_turn
            passages = self.knowledge.passages(text)
            turn = knowledge_turn(model.protocol, text, passages)
        messages = base + self.history + turn
        reply, shown = Reply(), []
        # room kept for the reply when old turns are dropped: a quarter of the context, at most a reply
        reserve = min(a.max_new_tokens, max(16, (a.max_length or model.context_length) // 4))
        started = time.monotonic()
        with (ctrl_c_cancels() if not one_shot else nullcontext()) as cancel:   # a one-shot's Ctrl-C ends it
            try:
                if not one_shot or self.history:        # a fresh -p reports an overlong prompt as it always did
                    messages, dropped = model.fit(messages, reserve, a.max_length)
                    if dropped:
                        print(f"[dropped the {dropped} oldest message(s) to fit the context of "
                              f"{model.context_length} tokens]", file=sys.stderr)
                out.start(None if one_shot else model.name)
                for piece in model.stream_chat(messages, params=self.settings.params, max_new_tokens=a.max_new_tokens,
                                               max_length=a.max_length, stop=a.stop, reply=reply, cancel=cancel):
                    shown.append(piece)
                    out.write(piece)
            except Cancelled:
                # keep what was shown: the next question may refer to it
                out.end(" [interrupted]")
                reply.messages = [{"role": "assistant", "content": "".join(shown)}] if shown else []
            except KeyboardInterrupt:      # a one-shot's Ctrl-C: leave the terminal as it was (cursor shown)
                out.pause()
                raise
            except GlmkitError as e:
                if one_shot:
                    out.pause()
                    raise
                out.pause()
                print(f"\n[error: {e}]\n", file=sys.stderr)
                return
            else:
                out.end()
        elapsed = time.monotonic() - started
        say("\n" if one_shot or out.ends_line else "\n\n")
        if passages is not None:
            print_sources("".join(shown), passages, blank_line=not one_shot)
        after_reply(reply, elapsed, a.max_new_tokens, a.verbose)
        self.history = [m for m in messages if m["role"] != "system"] + reply.messages
        self.recorder.record(text, self.system, "".join(shown), reply, elapsed)


def interactive(session: PlainSession) -> int:
    model = session.model
    print(f"glmkit {__version__} · {model.name} · context {model.context_length} tokens")
    if session.history:
        print(f"[continuing conversation {session.conversation_id}: {len(session.history)} messages]")
    print(HINT)
    out = renderer()
    run_session(session, Commands(session, model, session.settings), lambda text: session.answer(text, out))
    return 0
