"""Tokenizers: text <-> token ids, one module per model family.

Every tokenizer exposes the same small surface (see `base.Tokenizer`): `encode` for plain text
(never produces special ids), `special_id(name)` for role markers, and `token_bytes(id)` so that
streaming can assemble UTF-8 byte by byte without ever showing a special token.
"""

from .base import Tokenizer
from .streaming import IncrementalDecoder

__all__ = ["Tokenizer", "IncrementalDecoder"]
