"""A one-line spinner on stderr while something slow runs (loading a model): a start that shows
nothing for seconds looks hung.  Only on a terminal; piped output stays clean."""

from __future__ import annotations

import itertools
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

FRAMES = "⠋⠙⠹⠸⠼⠴⠦⠧⠇⠏"
DELAY_S = 0.15   # a start quicker than this shows nothing at all


@contextmanager
def spinner(text: str, stream=None) -> Iterator[None]:
    stream = stream or sys.stderr
    if not stream.isatty():
        yield
        return
    done = threading.Event()

    def spin():
        start = time.monotonic()
        if done.wait(DELAY_S):
            return
        for frame in itertools.cycle(FRAMES):
            stream.write(f"\r{frame} {text} {time.monotonic() - start:.0f} s ")
            stream.flush()
            if done.wait(0.1):
                break
        stream.write("\r\033[K")      # leave the line empty for what comes next
        stream.flush()
    thread = threading.Thread(target=spin, name="glmkit-spinner", daemon=True)
    thread.start()
    try:
        yield
    finally:
        done.set()
        thread.join()
