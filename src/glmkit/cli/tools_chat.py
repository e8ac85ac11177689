"""`glmkit chat --tools/--code`: the terminal chat run by the Agent, which calls tools and runs
the model's code between generations.

Generation is the plain chat's: the same SamplingParams, --max-new-tokens, --max-length and
--stop, and Ctrl-C sets the reply's cancel event (terminal.ctrl_c_cancels).  The interpreter's
kernel lives in a sandbox.KernelPool, as the console's do: the chat owns its workspace, the pool
the kernel in it, and each answer holds it through a Lease, so that Ctrl-C also stops a running
cell.  The answer goes to stdout (as Markdown at a terminal: render.py); every step (call, code,
result, refusal) to stderr.  The session's /commands are slash.py's, plus /run with --code: the
last complete Python block of the conversation, run in the chat's kernel."""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile
import time
from types import SimpleNamespace

from .. import __version__
from ..errors import GlmkitError
from .chat_log import Recorder
from .options import kernel_pool
from .render import PlainReply, renderer
from .slash import Commands, Settings
from .terminal import HINT, after_reply, ask, ctrl_c_cancels, print_sources, run_session, say

KERNEL_KEY = "chat"     # the terminal chat's one kernel in its pool


def run(model, args, params, recorder: Recorder | None = None, system: str | None = None,
        history: list[dict] = (), knowledge=None) -> int:
    """The tools chat for `model`: `args.prompt` answered once, or a session.  `recorder`: the
    log (None: not logged); `system` and `history`: the conversation to continue; `knowledge`:
    the knowledge base each message is answered from (kb.ChatKnowledge, --kb), or None."""
    from ..chat.agent import Agent
    from ..chat.capabilities import small_model_note
    from ..chat.tools import ToolResult, load_tools
    tools = load_tools(args.tools)
    note = small_model_note(model)
    if not model.protocol.native:
        asked = " and ".join(x for x, on in (("<tool_call> JSON", tools), ("```python blocks", args.code)) if on)
        print(f"glmkit: note: {model.name} has no tool protocol of its own; it is asked for {asked} instead"
              + ("" if note else ", which small models often ignore"), file=sys.stderr)
    if note:        # once, in the words the web console can share (chat/capabilities.py)
        print(f"glmkit: note: {note}", file=sys.stderr)
    watched = Watched(model)

    def manual(name, arguments):
        print(f"\n[{name}] called with {json.dumps(arguments, ensure_ascii=False)}", file=sys.stderr)
        return ToolResult(True, ask("observation (JSON)> "))

    def new_agent(interpreter, system):
        return Agent(watched, tools, max_steps=args.max_steps, system=system,
                     observer=manual if args.manual else None, interpreter=interpreter)

    with contextlib.ExitStack() as cleanup:
        kernels = workspace = None
        if args.code:
            # entered first, so removed last: the kernels working in it are closed before
            workspace = args.workspace or cleanup.enter_context(
                tempfile.TemporaryDirectory(prefix="glmkit-workspace-", ignore_cleanup_errors=True))
            kernels = kernel_pool(args)
            cleanup.callback(kernels.close_all)
            # made now, so that a missing sandbox is refused before the first question; it starts at the first cell
            kernel = kernels.acquire(KERNEL_KEY, workspace)
            kernels.release(KERNEL_KEY)
            print(f"[code interpreter: workspace {kernel.workspace} is /mnt/data"
                  f"{'' if kernel.sandboxed else ', NOT SANDBOXED'}"
                  f"{'' if args.workspace else '; removed on exit'}]", file=sys.stderr)
        settings = params if isinstance(params, Settings) else Settings(model, args, params)
        session = Session(args, settings, new_agent, kernels, workspace, watched,
                          recorder or Recorder(None, model.name), system, history, [t.name for t in tools],
                          knowledge)
        if args.prompt is not None:
            session.answer_once(args.prompt)
            return 0
        print(f"glmkit {__version__} · {model.name} · tools: {', '.join(t.name for t in tools) or 'none'}"
              + (" · code interpreter" if kernels is not None else ""))
        if session.history:
            print(f"[continuing conversation {session.conversation_id}: {len(session.history)} messages]")
        print(HINT)
        extra = {"/run": ("run the last complete Python code block of the conversation", session.run_last_block)} \
            if kernels is not None else {}
        out = renderer()

        def answer(text: str) -> None:
            out.start(model.name)
            session.answer(text, out)
            say("\n" if out.ends_line else "\n\n")
        run_session(session, Commands(session, model, settings, extra), answer)
        return 0


class Watched:
    """The model as the agent sees it, keeping each generation's Reply: how many tokens, and
    whether the last one stopped at the token limit (the Agent's events do not say)."""

    def __init__(self, model):
        self._model = model
        self.replies: list = []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def reply(self, messages, reply=None, **gen):
        self.replies.append(reply)
        return self._model.reply(messages, reply=reply, **gen)

    def summary(self):
        """One answer's generations as one Reply-like record (for the log and --verbose)."""
        done = [r for r in self.replies if r is not None]
        if not done:
            return SimpleNamespace(finish_reason=None, prompt_tokens=0, completion_tokens=0)
        return SimpleNamespace(finish_reason=done[-1].finish_reason, prompt_tokens=done[0].prompt_tokens,
                               completion_tokens=sum(r.completion_tokens for r in done))


class Session:
    """One conversation with the agent.  Each answer is given by a fresh Agent (its system message
    made from the session's system prompt, which /system changes) over the history so far, holding
    that answer's Lease on the chat's kernel (as each console turn does): an interrupted answer's
    lease refuses further cells, the next answer's does not."""

    def __init__(self, args, settings, new_agent, kernels, workspace, watched, recorder, system, history, tool_names,
                 knowledge=None):
        self.args, self.settings = args, settings
        self.knowledge = knowledge          # kb.ChatKnowledge (--kb), or None
        self.passages: list[dict] | None = None     # what the answer in progress was given
        self.new_agent, self.kernels, self.workspace = new_agent, kernels, workspace
        self.watched, self.recorder, self._tool_names = watched, recorder, tool_names
        self.system = system if system is not None else args.system
        self.history: list[dict] = list(history)     # the conversation after the agent's system message
        self.cut: dict[str, str] = {}     # replies that may be incomplete (their text -> why), never /run

    # -- what /commands act on (slash.Commands) ------------------------------------------------
    @property
    def conversation_id(self):
        return self.recorder.conversation_id

    def clear(self) -> None:
        self.history, self.cut = [], {}
        self.recorder.new_conversation()
        if self.kernels is not None:
            self.kernels.close(KERNEL_KEY)    # a new conversation gets a fresh kernel; the workspace's files stay

    def set_system(self, text: str) -> None:
        self.system = text

    def conversation(self) -> list[dict]:
        """What /save writes: the text of the conversation, the person's messages and the model's
        answers.  Tool calls and their observations are left out (/load takes only text, so a
        file cannot slip calls into a prompt)."""
        return [{"role": m["role"], "content": m["content"]} for m in self.history
                if m.get("role") in ("user", "assistant") and not m.get("metadata") and isinstance(m.get("content"), str)]

    def load(self, messages, system) -> None:
        self.history, self.cut = list(messages), {}
        if system is not None:
            self.system = system
        self.recorder.new_conversation()

    def tool_names(self) -> list[str]:
        return list(self._tool_names) + (["python (code interpreter)"] if self.kernels is not None else [])

    # -- answers ---------------------------------------------------------------------------
    def answer_once(self, text: str) -> None:
        """-p: the answer alone; Ctrl-C ends the command (exit 130), an error is main's to report."""
        out, answer = renderer(), []
        started = time.monotonic()
        with self._turn() as agent:
            try:
                show(self._run(agent, text, cancel=None), [], out, answer)
            finally:
                out.pause()
        if not out.ends_line:
            say("\n")
        self._sources("".join(answer), one_shot=True)
        self._after(text, "".join(answer), started, one_shot=True)

    def answer(self, text: str, out=None) -> None:
        """A session's answer: Ctrl-C stops it (and a running cell) and keeps what was shown, as
        the plain chat does; an error is shown and the session goes on."""
        from ..chat.reply_stream import Cancelled
        out = out or PlainReply()
        shown: list[str] = []      # the text of the generation in progress, not yet in the agent's messages
        answer: list[str] = []     # all the answer's text, for the log
        started = time.monotonic()
        with self._turn() as agent:
            stop_cell = agent.interpreter.interrupt if agent.interpreter is not None else None
            with ctrl_c_cancels(also=stop_cell) as cancel:
                try:
                    show(self._run(agent, text, cancel), shown, out, answer)
                    out.end()
                except (Cancelled, KeyboardInterrupt):      # KeyboardInterrupt: at --manual's prompt (terminal.ask)
                    out.end(" [interrupted]")
                    if shown:     # the next question may refer to it
                        agent.messages.append({"role": "assistant", "content": "".join(shown)})
                        self.cut["".join(shown)] = "was interrupted"
                except GlmkitError as e:
                    out.pause()
                    print(f"\n[error: {e}]", file=sys.stderr)
                    return
        self._sources("".join(answer))
        self._after(text, "".join(answer), started)

    def _sources(self, answer: str, one_shot: bool = False) -> None:
        if self.passages is not None:
            if not one_shot:
                say("\n" if answer.endswith("\n") else "\n\n")
            print_sources(answer, self.passages)

    def _after(self, text: str, answer: str, started: float, one_shot: bool = False) -> None:
        """The token-limit note, --verbose's line and the log, once an answer is over."""
        elapsed = time.monotonic() - started
        summary = self.watched.summary()
        if summary.finish_reason == "length":
            last = next((m for m in reversed(self.history) if m.get("role") == "assistant"), None)
            if last is not None:
                self.cut[last.get("content", "")] = "was cut at the token limit"
        after_reply(summary, elapsed, self.args.max_new_tokens, self.args.verbose, blank_line=not one_shot)
        self.recorder.record(text, self.system, answer, summary, elapsed)

    @contextlib.contextmanager
    def _turn(self):
        lease = self.kernels.lease(KERNEL_KEY, self.workspace) if self.kernels is not None else None
        agent = self.new_agent(lease, self.system)
        head = len(agent.messages)          # the agent's own system message
        agent.messages = agent.messages + self.history
        self.watched.replies = []
        try:
            yield agent
        finally:
            self.history = agent.messages[head:]
            if lease is not None:
                lease.release()      # the kernel stays up, variables and all, for the next answer

    def _run(self, agent, text: str, cancel):
        a = self.args
        self.passages = self.knowledge.passages(text) if self.knowledge is not None else None
        return agent.run(text, knowledge=self.passages, params=self.settings.params, max_new_tokens=a.max_new_tokens,
                         max_length=a.max_length, stop=a.stop, cancel=cancel)

    # -- /run ------------------------------------------------------------------------------
    def run_last_block(self, arg: str) -> None:
        """/run: the last complete Python block that the person or the model wrote, run in the
        chat's kernel and shown as the model's code steps are.  Not one from a reply that was
        cut at the token limit (or interrupted): its code may be incomplete."""
        found = last_code_block(self.history, self.cut)
        if found is None:
            raise GlmkitError("no complete ```python block in the conversation to run")
        code, why_not = found
        if why_not:
            raise GlmkitError(f"the last code block is in a reply that {why_not}, so it may be incomplete; "
                              "not run (ask again, or /set max_new_tokens higher)")
        lease = self.kernels.lease(KERNEL_KEY, self.workspace)
        try:
            with ctrl_c_cancels(also=lease.interrupt):
                print(f"[running code]\n{code}", file=sys.stderr, flush=True)
                cell = lease.run(code)
        finally:
            lease.release()
        print(f"[{'failed' if cell.error else 'result'}] {cell.observation()}", file=sys.stderr, flush=True)


PYTHON = {"", "python", "py", "python3", "ipython"}


def code_blocks(text: str) -> list[str]:
    """The complete fenced blocks of `text` written as Python (or with no language), in order.  A
    fence still open at the end is not a block."""
    blocks, lang, body = [], None, []
    for line in text.split("\n"):
        stripped = line.strip()
        if lang is None:
            if stripped.startswith("```"):
                lang, body = stripped[3:].strip().lower(), []
        elif stripped == "```":
            if lang in PYTHON:
                blocks.append("\n".join(body))
            lang = None
        else:
            body.append(line)
    return blocks


def last_code_block(messages: list[dict], cut: dict[str, str]) -> tuple[str, str | None] | None:
    """(code, None) for the last complete Python block of the person's or the model's messages;
    (code, why) when the newest message that has one is a reply that may be incomplete; None."""
    for m in reversed(messages):
        if m.get("role") not in ("user", "assistant") or not isinstance(m.get("content"), str):
            continue
        blocks = code_blocks(m["content"])
        if m["role"] == "assistant" and m["content"] in cut and "```" in m["content"]:
            return (blocks[-1] if blocks else ""), cut[m["content"]]
        if blocks:
            return blocks[-1], None
    return None


def show(events, shown: list[str], out=None, answer: list[str] | None = None) -> None:
    """The answer on stdout through `out` (render.py; plain text if None); each step (call, code,
    result, refusal, why it stopped) on stderr.  `shown` holds the text of the generation in
    progress (a step starts the next one); `answer`, if given, all of the answer's text."""
    out = out or PlainReply()
    from ..chat.agent import CodeStep, Finished, Observation, RefusedStep, TextDelta, ToolCallStep

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def call_line(call):
        return f"\n[tool] {call.name}({json.dumps(call.arguments, ensure_ascii=False)})"
    for ev in events:
        if isinstance(ev, TextDelta):
            shown.append(ev.text)
            if answer is not None:
                answer.append(ev.text)
            out.write(ev.text)
            continue
        shown.clear()       # that text is in the agent's messages now
        out.pause()         # the text so far stays on the screen; the step goes below it
        if isinstance(ev, ToolCallStep):
            log(call_line(ev.call))
        elif isinstance(ev, CodeStep):
            log(f"\n[running code]\n{ev.call.code}")
        elif isinstance(ev, Observation):
            log(f"[{'result' if ev.result.ok else 'failed'}] {ev.result.observation}")
        elif isinstance(ev, RefusedStep):
            log(f"[error] {ev.call.name}: {ev.call.reason}")
        elif isinstance(ev, Finished) and ev.reason == "max_steps":
            log("[error] stopped: the model asked for more tool calls than --max-steps allows")
        elif isinstance(ev, Finished) and ev.reason == "tool_calls":
            for call in ev.handed_over:     # a tool given only as a schema, without --manual
                log(call_line(call) + " [not run: no implementation; --manual asks you for its result]")
