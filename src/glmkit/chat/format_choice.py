"""Which chat format a checkpoint speaks: ChatGLM3's or GLM-4's own protocol, ChatGLM2's prompt, or
the chat template it ships."""

from __future__ import annotations

from ..errors import CheckpointError
from .formats import ChatFormat
from .glm3 import GLM3Format
from .template import TemplateFormat


def chat_format_for(checkpoint) -> ChatFormat:
    if checkpoint.config.family == "chatglm":
        kind = getattr(checkpoint, "prompt_format", None)
        if kind == "chatglm2":
            from .glm2 import GLM2Format
            return GLM2Format(checkpoint.tokenizer)
        if kind == "glm4":
            from .glm4 import GLM4Format
            return GLM4Format(checkpoint.tokenizer)
        return GLM3Format(checkpoint.tokenizer)
    if checkpoint.chat_template:
        return TemplateFormat(checkpoint.tokenizer, checkpoint.chat_template)
    raise CheckpointError(f"{checkpoint.source}: the model has no chat template")
