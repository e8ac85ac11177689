"""Blocks -> passages (chunks) small enough for the embedding model and a prompt.

A passage never spans two sections (a heading path) or two PDF pages, so its position is one
place.  Inside a section, paragraphs are packed until the next would pass `target` units; a
paragraph that does not fit is split at sentence ends (。！？；… and . ! ? followed by space),
and a sentence still too long at a word or character boundary.  Size is counted in units close
to the embedding model's tokens: one per CJK character, 1.3 per Latin word (so `limit` = 200
stays inside MiniLM's 256 tokens with the heading added).

The text is kept exactly as the document had it (whitespace inside a paragraph included).
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass

from .parsers import Block

TARGET = 120
LIMIT = 200

_CJK = r"\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff\u3040-\u30ff\uac00-\ud7af"
_UNITS = re.compile(f"[{_CJK}]|[^\\s{_CJK}]+")
_SENTENCE = re.compile(r"[^\n]+?(?:[。！？；…]+[”’\"')）]*|[.!?;]+[\"'”’)\]]*(?=\s|$)|$)\s*", re.S | re.M)


@dataclass
class Chunk:
    seq: int
    text: str
    heading: str
    page: int | None
    line: int | None
    paragraph: int | None

    @property
    def sha256(self) -> str:
        return hashlib.sha256(f"{self.heading}\n{self.text}".encode()).hexdigest()

    def for_index(self) -> str:
        """What the lexical and dense indexes see: the heading path, then the text."""
        return f"{self.heading}\n{self.text}" if self.heading else self.text


def units(text: str) -> float:
    n = 0.0
    for m in _UNITS.finditer(text):
        n += 1.0 if len(m.group()) == 1 and re.match(f"[{_CJK}]", m.group()) else 1.3
    return n


def sentences(text: str) -> list[str]:
    parts = [m.group().strip() for m in _SENTENCE.finditer(text) if m.group().strip()]
    return parts or [text]


def _hard_split(text: str, limit: int) -> list[str]:
    """A sentence longer than `limit` units: cut at word boundaries (or between CJK characters)."""
    out, cur, n = [], [], 0.0
    for m in re.finditer(f"[{_CJK}]|\\S+\\s*|\\s+", text):
        u = units(m.group())
        if cur and n + u > limit:
            out.append("".join(cur).strip())
            cur, n = [], 0.0
        cur.append(m.group())
        n += u
    if cur and "".join(cur).strip():
        out.append("".join(cur).strip())
    return out


def _pieces(text: str, limit: int) -> list[str]:
    if units(text) <= limit:
        return [text]
    out = []
    for s in sentences(text):
        out += [s] if units(s) <= limit else _hard_split(s, limit)
    return out


def _joiner(a: str, b: str) -> str:
    return "" if (a and b and re.match(f"[{_CJK}，。！？；：]", a[-1]) and re.match(f"[{_CJK}]", b[0])) else " "


def chunk(blocks: list[Block], target: int = TARGET, limit: int = LIMIT) -> list[Chunk]:
    chunks: list[Chunk] = []
    cur: list[str] = []        # paragraphs of the passage being packed (joined by a blank line)
    size = 0.0
    first: Block | None = None  # the block the passage starts in: its position
    last: Block | None = None   # the block of the last piece: its sentences join with a space

    def emit():
        nonlocal cur, size, first, last
        if cur and first is not None:
            chunks.append(Chunk(len(chunks), "\n\n".join(cur).strip(), " > ".join(first.heading), first.page,
                                first.line, first.paragraph))
        cur, size, first, last = [], 0.0, None, None

    for b in blocks:
        if first is not None and (b.heading != first.heading or b.page != first.page):
            emit()
        for piece in _pieces(b.text.strip(), limit):
            u = units(piece)
            if cur and size + u > target:
                emit()
            if first is None:
                first = b
            if cur and last is b:
                cur[-1] += _joiner(cur[-1], piece) + piece
            else:
                cur.append(piece)
            last = b
            size += u
    emit()
    return chunks
