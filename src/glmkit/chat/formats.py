"""What every chat format provides, and how a checkpoint picks its format."""

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


def chat_format_for(checkpoint) -> ChatFormat:
    family = checkpoint.config.family
    if family == "chatglm":
        from .glm3 import GLM3Format
        return GLM3Format(checkpoint.tokenizer)
    if checkpoint.chat_template:
        from .template import TemplateFormat
        return TemplateFormat(checkpoint.tokenizer, checkpoint.chat_template)
    from ..errors import CheckpointError
    raise CheckpointError(f"{checkpoint.source}: the model has no chat template")
