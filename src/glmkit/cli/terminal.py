"""What the plain chat and the tools chat share at the terminal: the person's lines (and the words
that clear or end a session), Ctrl-C during an answer as a cancel event, and a question asked in
the middle of an answer (--manual's observation)."""

from __future__ import annotations

import signal
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

EXIT_COMMANDS = {"stop", "exit", "quit", ":q", "/bye"}
HINT = "Type a message. `clear` starts over, `stop` quits, Ctrl-C interrupts an answer.\n"


def user_lines() -> Iterator[str]:
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
