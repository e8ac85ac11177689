"""What the plain chat and the tools chat share at the terminal: the person's lines (and the words
that clear or end a session; \"\"\" blocks and pastes as one message), what is piped into stdin,
Ctrl-C during an answer as a cancel event, a question asked in the middle of an answer (--manual's
observation), and --verbose's line."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

EXIT_COMMANDS = {"stop", "exit", "quit", ":q", "/bye"}
HINT = ('Type a message. /help lists the commands; """ starts a multi-line message (end it with """); '
        "Ctrl-C interrupts an answer, Ctrl-D or /bye quits.\n")
FENCE = '"""'


class Message(str):
    """Text that is a message whatever it starts with: a \"\"\" block or a paste, never a command."""


def user_lines() -> Iterator[str]:
    """The person's messages; `clear` comes through as the word; stop/exit/Ctrl-D end it.

    A line `\"\"\"` (or `\"\"\"text`) starts a block that a line ending in `\"\"\"` ends, sent as one
    Message (Ollama's way).  A bracketed paste of several lines also comes back from readline as
    one line holding newlines: it is one Message too, not one message per line."""
    try:
        import readline  # noqa: F401  (line editing, history and bracketed paste for input())
    except ImportError:
        pass
    while True:
        try:
            text = input("You: ")
            if text.lstrip().startswith(FENCE):
                text = Message(read_block(text.lstrip()[len(FENCE):]))
            elif "\n" in text:
                text = Message(text)
        except EOFError:
            print()
            return
        except KeyboardInterrupt:       # also abandons a block being typed
            print()
            continue
        cmd = text.strip().lower()
        if not isinstance(text, Message):
            if cmd in EXIT_COMMANDS:
                return
            if cmd == "clear":
                yield "clear"
                continue
        if text.strip():
            yield text


def read_block(first: str) -> str:
    """The rest of a \"\"\" block whose first line (after the \"\"\") is `first`."""
    lines = []
    line = first
    while True:
        end = line.rstrip()
        if end.endswith(FENCE) and (lines or end != ""):
            lines.append(end[:-len(FENCE)])
            return "\n".join(lines).strip("\n")
        lines.append(line)
        line = input("... ")


def is_command(text: str) -> bool:
    """A typed line that starts with "/" (a block or a paste never is: its text goes to the model)."""
    return not isinstance(text, Message) and text.lstrip().startswith("/")


def run_session(session, commands, answer: Callable[[str], object]) -> None:
    """The loop both chats run until the person quits: each line is `clear`, a /command
    (`commands.handle` is False for /bye) or a message for `answer`.  A \"\"\" block that says
    "clear" is a message like any other."""
    for text in user_lines():
        if text == "clear" and not isinstance(text, Message):
            session.clear()
            print("[conversation cleared]\n")
        elif is_command(text):
            if not commands.handle(text):
                return
        else:
            answer(text)


@contextmanager
def ctrl_c_cancels(also: Callable[[], object] | None = None) -> Iterator[threading.Event]:
    """Inside: Ctrl-C sets the event yielded (the reply stream checks it between tokens and raises
    chat.reply_stream.Cancelled) instead of raising KeyboardInterrupt, which may surface anywhere
    in the engine, or not at all (one full test run saw a Ctrl-C have no effect).  `also` is called
    too, in a thread of its own (e.g. Lease.interrupt, to stop a running cell): the handler runs
    in the main thread, which may be holding the very lock that `also` takes."""
    cancel = threading.Event()

    def interrupted(*_):
        cancel.set()
        if also is not None:
            threading.Thread(target=also, name="glmkit-interrupt", daemon=True).start()
    previous = signal.signal(signal.SIGINT, interrupted)
    try:
        yield cancel
    finally:
        signal.signal(signal.SIGINT, previous)


def ask(prompt: str) -> str:
    """input() in the middle of an answer, where Ctrl-C raises KeyboardInterrupt again: a person
    at this prompt expects Ctrl-C to abandon it, not to wait for Enter."""
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        return input(prompt)
    finally:
        signal.signal(signal.SIGINT, previous)


def say(text: str) -> None:
    """Answer text as it streams: shown at once."""
    sys.stdout.write(text)
    sys.stdout.flush()


def print_sources(answer: str, passages: list[dict], blank_line: bool = False) -> None:
    """--kb: the passages the answer cites (else those it was given) under it, on stdout."""
    from ..chat.knowledge_context import sources_lines
    say("\n".join(sources_lines(answer, passages)) + ("\n\n" if blank_line else "\n"))


def piped_stdin() -> str | None:
    """What is piped or redirected into the command (`cat notes.txt | glmkit chat -p ...`); None
    when stdin is a terminal, or a device such as /dev/null (nothing was given: a service started
    with stdin closed still answers its -p)."""
    import os
    import stat
    try:
        if sys.stdin is None or sys.stdin.isatty():
            return None
        mode = os.fstat(sys.stdin.fileno()).st_mode
    except (OSError, ValueError):
        return None
    if not (stat.S_ISFIFO(mode) or stat.S_ISREG(mode) or stat.S_ISSOCK(mode)):
        return None
    # not UTF-8 (a binary file piped by mistake): U+FFFD for what cannot be read, not a traceback
    return sys.stdin.buffer.read().decode("utf-8", "replace")


def one_shot_prompt(prompt: str | None, piped: str | None) -> str | None:
    """The message of a one-shot answer: -p, then what was piped in after a blank line; what was
    piped in alone without -p; None for an interactive session."""
    if piped is None:
        return prompt
    piped = piped.strip("\n")
    if prompt is None:
        return piped
    return f"{prompt}\n\n{piped}" if piped else prompt


def after_reply(reply, seconds: float, max_new_tokens: int, verbose: bool, blank_line: bool = False) -> None:
    """What both chats say on stderr once a reply is over: that it reached the token limit (it is
    cut, and a code block in it may be incomplete), and --verbose's line.  `reply`: anything with
    finish_reason, completion_tokens and prompt_tokens."""
    if reply.finish_reason == "length":
        print(f"{chr(10) if blank_line else ''}[the reply reached the token limit (max_new_tokens {max_new_tokens})]",
              file=sys.stderr)
    if verbose:
        print(stats_line(reply, seconds), file=sys.stderr)


def stats_line(reply, seconds: float) -> str:
    """--verbose's line after a reply: its tokens, their rate and the prompt's tokens."""
    rate = reply.completion_tokens / seconds if seconds > 0 else 0.0
    return f"[{reply.completion_tokens} tokens, {rate:.1f} tokens/s, prompt {reply.prompt_tokens} tokens]"
