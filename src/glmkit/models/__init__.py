"""Checkpoint formats (ChatGLM3 HF directories, GGUF) and the model blocks they fill."""

from .config import ModelConfig
from .loader import Checkpoint, load_checkpoint
from .transformer import Transformer

__all__ = ["ModelConfig", "Checkpoint", "load_checkpoint", "Transformer"]
