"""glmkit: run ChatGLM3 (and models like it) on your own machines.

`glmkit.load(path)` gives a ChatModel; torch is imported only when a model is (the chat layer and
the server's protocol code are torch-free)."""

from .version import __version__  # noqa: E402,F401

from .errors import CheckpointError, ContextLengthError, GlmkitError  # noqa: E402

# imported on first use, so that `glmkit --help` and `import glmkit` stay light (no jsonschema,
# jinja2 or torch until something needs them)
_LAZY = {"load": "chat_model", "ChatModel": "chat_model", "Agent": "chat.agent", "Reply": "chat.reply_stream",
         "Tool": "chat.tool_definitions", "tool": "chat.tool_definitions"}


def __getattr__(name):
    if name in _LAZY:
        import importlib
        return getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    raise AttributeError(f"module 'glmkit' has no attribute {name!r}")


__all__ = ["load", "ChatModel", "Reply", "tool", "Tool", "Agent", "GlmkitError", "CheckpointError", "ContextLengthError", "__version__"]
