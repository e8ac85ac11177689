"""How a streaming reply reaches the person: as Markdown (rich) at a terminal, as the plain text the
model wrote when stdout is a pipe or a file (a program reading it gets exactly those characters).

Both have the same four calls: start(name) before a reply, write(text) for each piece, pause()
before a tool step is printed on stderr (the text so far stays on the screen), end(note) after it."""

from __future__ import annotations

import re
import sys

from .terminal import say


def renderer(markdown: bool | None = None):
    """Markdown when stdout is a terminal (unless `markdown` says otherwise), else plain text."""
    if markdown is None:
        markdown = sys.stdout.isatty()
    return MarkdownReply() if markdown else PlainReply()


class PlainReply:
    ends_line = False       # the reply's last line is left open: the caller ends it

    def start(self, name: str | None) -> None:
        if name:
            say(f"{name}: ")

    def write(self, text: str) -> None:
        say(text)

    def pause(self) -> None:
        pass

    def end(self, note: str = "") -> None:
        say(note)


_FENCE = re.compile(r"^ {0,3}(`{3,}|~{3,})")


def stable_end(text: str) -> int:
    """Where the part of `text` that later pieces cannot change ends: after the last blank line
    that is outside a code fence and followed by an unindented line (an indented one may still
    belong to the list item above).  Rendered once, that part is printed for good; only the rest
    is redrawn as pieces come (a live region taller than the screen cannot be redrawn)."""
    end, fence, pos = 0, None, 0
    lines = text.split("\n")
    for i, line in enumerate(lines[:-1]):          # the last line is still being written
        pos += len(line) + 1
        m = _FENCE.match(line)
        if m:
            if fence is None:
                fence = m.group(1)[0]
            elif m.group(1)[0] == fence and not line.strip().strip(fence):
                fence = None
            continue
        nxt = lines[i + 1]
        if fence is None and not line.strip() and nxt[:1] not in ("", " ", "\t"):
            end = pos
    return end


class MarkdownReply:
    """The reply as Markdown, redrawn as it streams (rich.live): finished blocks are printed once
    above the live region, which holds only the block being written."""
    ends_line = True        # rich ends what it draws with a newline

    def __init__(self):
        from rich.console import Console
        self.console = Console(highlight=False, soft_wrap=False)
        self.live = None
        self.text, self.done = "", 0

    def start(self, name: str | None) -> None:
        if name:
            say(f"{name}: \n")       # its own line: the live region below it is redrawn line by line
        self.text, self.done = "", 0

    def _markdown(self, text: str):
        from rich.markdown import Markdown
        return Markdown(text, code_theme="monokai")

    def write(self, text: str) -> None:
        if self.live is None:
            from rich.live import Live
            self.live = Live(console=self.console, refresh_per_second=8, vertical_overflow="visible",
                             transient=False)
            self.live.start()
        self.text += text
        cut = self.done + stable_end(self.text[self.done:])
        if cut > self.done:
            self.live.console.print(self._markdown(self.text[self.done:cut]))
            self.done = cut
        self.live.update(self._markdown(self.text[self.done:]))

    def pause(self) -> None:
        if self.live is not None:
            self.live.update(self._markdown(self.text[self.done:]), refresh=True)
            self.live.stop()
            self.live = None
        self.text, self.done = "", 0

    def end(self, note: str = "") -> None:
        self.pause()
        say(note)
