"""glmkit: run ChatGLM3 (and models like it) on your own machines.

`glmkit.load(path)` gives a ChatModel; torch is imported only when a model is (the chat layer and
the server's protocol code are torch-free)."""

from .version import __version__  # noqa: E402,F401

from .chat.agent import Agent  # noqa: E402
from .chat.reply_stream import Reply  # noqa: E402
from .chat.tool_definitions import Tool, tool  # noqa: E402
from .errors import CheckpointError, ContextLengthError, GlmkitError  # noqa: E402


def __getattr__(name):
    if name in ("load", "ChatModel"):
        from . import chat_model
        return getattr(chat_model, name)
    raise AttributeError(f"module 'glmkit' has no attribute {name!r}")


__all__ = ["load", "ChatModel", "Reply", "tool", "Tool", "Agent", "GlmkitError", "CheckpointError", "ContextLengthError", "__version__"]
