"""What kind of model directory this is, and how to read each kind: the one dispatch shared by the
loader, `glmkit quantize` and `glmkit models`.

    ChatGLM directories (model_type chatglm, models/hf_chatglm.py), told apart by their files:
      chatglm3   tokenizer.model is SentencePiece
      chatglm2   the same files; ChatGLM2-6B / CodeGeeX2-6B by name, an older prompt
      glm4       tokenizer.model is a tiktoken ranks file (GLM-4-9B's original layout)
    transformers directories (models/hf_transformers.py):
      llama, mistral, qwen2 by model_type; glm4 for GlmForCausalLM (GLM-4's -hf layout)

Everything here reads metadata only (config.json, a tokenizer file's first bytes)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

from . import hf_chatglm, hf_transformers
from .config import ModelConfig

PROMPT_FORMATS = {"chatglm2": "chatglm2", "glm4": "glm4"}   # family -> the chat format it needs beyond its files'


def is_transformers_dir(path: Path) -> bool:
    return hf_transformers.model_type(path) in hf_transformers.FAMILIES


def family(path: Path) -> str:
    """The family name `glmkit models` shows, and the chat format's key."""
    kind = hf_transformers.model_type(path)
    if kind == hf_transformers.GLM:
        return "glm4"
    if kind in hf_transformers.FAMILIES:
        return kind
    from ..tokenizers.glm4 import is_tiktoken_file
    if is_tiktoken_file(path / "tokenizer.model"):
        return "glm4"
    return "chatglm2" if hf_chatglm.is_chatglm2(path) else "chatglm3"


def layout(path: Path) -> str:
    return "transformers directory" if is_transformers_dir(path) else "ChatGLM directory"


def read_config(path: Path) -> ModelConfig:
    return hf_transformers.read_config(path) if is_transformers_dir(path) else hf_chatglm.read_config(path)


def tokenizer_and_template(path: Path):
    """(tokenizer, the chat template it ships, or None where glmkit writes the format itself)."""
    if is_transformers_dir(path):
        return hf_transformers.tokenizer_and_template(path)
    from ..tokenizers.glm4 import GLM4Tokenizer, is_tiktoken_file
    if is_tiktoken_file(path / "tokenizer.model"):
        return GLM4Tokenizer(path / "tokenizer.model"), None
    from ..tokenizers.chatglm3 import ChatGLM3Tokenizer
    return ChatGLM3Tokenizer(path / "tokenizer.model"), None


def iter_state(path: Path, cfg: ModelConfig) -> Iterator:
    """(file, glmkit parameter name, tensor) for each weight, streamed."""
    return hf_transformers.iter_state(path, cfg) if is_transformers_dir(path) else hf_chatglm.iter_state(path)


def prompt_format(path: Path) -> str | None:
    return PROMPT_FORMATS.get(family(path))
