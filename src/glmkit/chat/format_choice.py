"""Which chat format a checkpoint speaks: ChatGLM3's own protocol, or the chat template it ships."""

from __future__ import annotations

from ..errors import CheckpointError
from .formats import ChatFormat
from .glm3 import GLM3Format
from .template import TemplateFormat


def chat_format_for(checkpoint) -> ChatFormat:
    if checkpoint.config.family == "chatglm":
        return GLM3Format(checkpoint.tokenizer)
    if checkpoint.chat_template:
        return TemplateFormat(checkpoint.tokenizer, checkpoint.chat_template)
    raise CheckpointError(f"{checkpoint.source}: the model has no chat template")
