from __future__ import annotations

from typing import Protocol

from .streaming import bytes_to_text


class Tokenizer(Protocol):
    """What the chat layer and the engine need from a tokenizer."""

    vocab_size: int
    eos_id: int

    def encode(self, text: str) -> list[int]:
        """Plain text to ids. Text that spells a special token stays ordinary text."""

    def special_id(self, name: str) -> int:
        """Id of a special token such as '<|user|>' (KeyError if unknown)."""

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes a token contributes to visible text; b'' for special/control tokens."""

    def is_special(self, token_id: int) -> bool:
        """True for ids that never appear as text (role markers, eos, padding rows)."""

    def decode(self, ids: list[int]) -> str:
        """Visible text of a whole id list (special tokens dropped)."""


class ByteTableTokenizer:
    """Shared by the tokenizers that encode through Hugging Face's `tokenizers` (`self._hf`) and keep
    each id's bytes in a table (`self._bytes`; b'' for special and control ids)."""

    _hf: object
    _bytes: list[bytes]
    specials: dict[str, int]
    vocab_size: int
    strip_leading_space = False

    def encode(self, text: str) -> list[int]:
        return self._hf.encode(text, add_special_tokens=False).ids if text else []

    def special_id(self, name: str) -> int:
        return self.specials[name]

    def is_special(self, token_id: int) -> bool:
        return not self.token_bytes(token_id)

    def token_bytes(self, token_id: int) -> bytes:
        return self._bytes[token_id] if 0 <= token_id < self.vocab_size else b""

    def decode(self, ids: list[int]) -> str:
        text = bytes_to_text(b"".join(self.token_bytes(i) for i in ids))
        return text[1:] if self.strip_leading_space and text.startswith(" ") else text
