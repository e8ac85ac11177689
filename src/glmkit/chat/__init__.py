"""Conversations <-> token ids: chat formats (ChatGLM3's protocol, a checkpoint's chat template),
reply parsing, tool calls and tools, the agent loop, and the mapping from OpenAI's messages.

Knows token ids and text, never tensors; the agent runs code in the interpreter it is handed
(glmkit.sandbox)."""

from .format_choice import chat_format_for
from .formats import ChatFormat, ReplyEvent
from .messages import validate_messages

__all__ = ["ChatFormat", "ReplyEvent", "chat_format_for", "validate_messages"]
