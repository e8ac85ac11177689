"""Conversations <-> token ids: chat templates, reply parsing, (later) tools and the agent loop.

Knows token ids and text, never tensors."""

from .formats import ChatFormat, ReplyEvent, chat_format_for
from .messages import validate_messages

__all__ = ["ChatFormat", "ReplyEvent", "chat_format_for", "validate_messages"]
