"""What every chat format provides: prompt ids for a conversation, and a parser that turns the
reply's ids into ReplyEvents (format_choice.py picks a checkpoint's format)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol


@dataclass
class ReplyEvent:
    """Something the reply parser learned from the tokens so far.

    kind "segment": a new assistant segment begins; `metadata` names a tool/interpreter ('' for
    plain text).  kind "text": visible text of the current segment."""
    kind: str
    text: str = ""
    metadata: str = ""


class ReplyParser(Protocol):
    def feed(self, token_id: int) -> list[ReplyEvent]: ...
    def finish(self) -> list[ReplyEvent]: ...
    def messages(self) -> list[dict]:
        """The reply as history messages (the official format), after finish()."""


class ChatFormat(Protocol):
    name: str
    stop_ids: frozenset[int]

    def encode(self, messages: list[dict]) -> list[int]:
        """Prompt ids for a conversation, ending with the cue for the assistant to answer."""

    def reply_parser(self) -> ReplyParser: ...

