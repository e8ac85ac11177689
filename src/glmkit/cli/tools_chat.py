"""`glmkit chat --tools/--code`: the terminal chat run by the Agent, which calls tools and runs
the model's code between generations.

Generation is the plain chat's: the same SamplingParams, --max-new-tokens, --max-length and
--stop, and Ctrl-C sets the reply's cancel event (terminal.ctrl_c_cancels).  The interpreter's
kernel lives in a sandbox.KernelPool, as the console's do: the chat owns its workspace, the pool
the kernel in it, and each answer holds it through a Lease, so that Ctrl-C also stops a running
cell.  The answer goes to stdout; every step (call, code, result, refusal) to stderr."""

from __future__ import annotations

import contextlib
import json
import sys
import tempfile

from .. import __version__
from ..errors import GlmkitError
from .options import kernel_pool
from .terminal import HINT, ask, ctrl_c_cancels, say, user_lines

KERNEL_KEY = "chat"     # the terminal chat's one kernel in its pool


def run(model, args, params) -> int:
    """The tools chat for `model`: `args.prompt` answered once, or a session."""
    from ..chat.agent import Agent
    from ..chat.tools import ToolResult, load_tools
    tools = load_tools(args.tools)
    if not model.protocol.native:
        asked = " and ".join(x for x, on in (("<tool_call> JSON", tools), ("```python blocks", args.code)) if on)
        print(f"glmkit: note: {model.name} has no tool protocol of its own; it is asked for {asked} instead, "
              "which small models often ignore", file=sys.stderr)

    def manual(name, arguments):
        print(f"\n[{name}] called with {json.dumps(arguments, ensure_ascii=False)}", file=sys.stderr)
        return ToolResult(True, ask("observation (JSON)> "))

    def new_agent(interpreter):
        return Agent(model, tools, max_steps=args.max_steps, system=args.system,
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
        session = Session(args, params, new_agent, kernels, workspace)
        if args.prompt is not None:
            session.answer_once(args.prompt)
            return 0
        print(f"glmkit {__version__} · {model.name} · tools: {', '.join(t.name for t in tools) or 'none'}"
              + (" · code interpreter" if kernels is not None else ""))
        print(HINT)
        for text in user_lines():
            if text == "clear":
                session.clear()
                print("[conversation cleared]\n")
                continue
            say(f"{model.name}: ")
            session.answer(text)
            say("\n\n")
        return 0


class Session:
    """One conversation with the agent.  Each answer is given by a fresh Agent over the history so
    far, holding that answer's Lease on the chat's kernel (as each console turn does): an
    interrupted answer's lease refuses further cells, the next answer's does not."""

    def __init__(self, args, params, new_agent, kernels, workspace):
        self.args, self.params = args, params
        self.new_agent, self.kernels, self.workspace = new_agent, kernels, workspace
        self.messages: list[dict] | None = None     # None: a new conversation (only the agent's system message)

    def clear(self) -> None:
        self.messages = None
        if self.kernels is not None:
            self.kernels.close(KERNEL_KEY)    # a new conversation gets a fresh kernel; the workspace's files stay

    def answer_once(self, text: str) -> None:
        """-p: the answer alone; Ctrl-C ends the command (exit 130), an error is main's to report."""
        with self._turn() as agent:
            show(self._run(agent, text, cancel=None), [])
        say("\n")

    def answer(self, text: str) -> None:
        """A session's answer: Ctrl-C stops it (and a running cell) and keeps what was shown, as
        the plain chat does; an error is shown and the session goes on."""
        from ..chat.reply_stream import Cancelled
        shown: list[str] = []      # the text of the generation in progress, not yet in the agent's messages
        with self._turn() as agent:
            stop_cell = agent.interpreter.interrupt if agent.interpreter is not None else None
            with ctrl_c_cancels(also=stop_cell) as cancel:
                try:
                    show(self._run(agent, text, cancel), shown)
                except (Cancelled, KeyboardInterrupt):      # KeyboardInterrupt: at --manual's prompt (terminal.ask)
                    say(" [interrupted]")
                    if shown:     # the next question may refer to it
                        agent.messages.append({"role": "assistant", "content": "".join(shown)})
                except GlmkitError as e:
                    print(f"\n[error: {e}]", file=sys.stderr)

    @contextlib.contextmanager
    def _turn(self):
        lease = self.kernels.lease(KERNEL_KEY, self.workspace) if self.kernels is not None else None
        agent = self.new_agent(lease)
        if self.messages is not None:
            agent.messages = self.messages
        try:
            yield agent
        finally:
            self.messages = agent.messages
            if lease is not None:
                lease.release()      # the kernel stays up, variables and all, for the next answer

    def _run(self, agent, text: str, cancel):
        a = self.args
        return agent.run(text, params=self.params, max_new_tokens=a.max_new_tokens, max_length=a.max_length,
                         stop=a.stop, cancel=cancel)


def show(events, shown: list[str]) -> None:
    """The answer on stdout; each step (call, code, result, refusal, why it stopped) on stderr.
    `shown` holds the text of the generation in progress (a step starts the next one)."""
    from ..chat.agent import CodeStep, Finished, Observation, RefusedStep, TextDelta, ToolCallStep

    def log(line: str) -> None:
        print(line, file=sys.stderr, flush=True)

    def call_line(call):
        return f"\n[tool] {call.name}({json.dumps(call.arguments, ensure_ascii=False)})"
    for ev in events:
        if isinstance(ev, TextDelta):
            shown.append(ev.text)
            say(ev.text)
            continue
        shown.clear()       # that text is in the agent's messages now
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
