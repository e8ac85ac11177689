from __future__ import annotations

from typing import Protocol


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
