"""glmkit: run ChatGLM3 (and models like it) on your own machines."""

__version__ = "0.1.0"

from .chat.agent import Agent  # noqa: E402
from .chat.tool_definitions import Tool, tool  # noqa: E402
from .chat_model import ChatModel, Reply, load  # noqa: E402
from .errors import CheckpointError, ContextLengthError, GlmkitError  # noqa: E402

__all__ = ["load", "ChatModel", "Reply", "tool", "Tool", "Agent", "GlmkitError", "CheckpointError", "ContextLengthError", "__version__"]
