"""ChatGLM3's tokenizer: SentencePiece plus nine special tokens appended after its vocabulary.

Reimplemented from the facts of the original `tokenization_chatglm.py` (nothing of the model
repository is imported): special ids are `sp_size + i` in the order below, the chat builder
encodes every message with plain SentencePiece (so user text spelling `<|system|>` stays text),
and decoding for users drops ids 0/1/2, the specials and the padding rows above them.
"""

from __future__ import annotations

from pathlib import Path

import sentencepiece as spm

from ..errors import CheckpointError
from .streaming import bytes_to_text

SPECIAL_TOKENS = (
    "[MASK]", "[gMASK]", "[sMASK]", "sop", "eop",
    "<|system|>", "<|user|>", "<|assistant|>", "<|observation|>",
)


class ChatGLM3Tokenizer:
    strip_leading_space = True  # SentencePiece's dummy prefix

    def __init__(self, model_file: str | Path):
        model_file = Path(model_file)
        if not model_file.is_file():
            raise CheckpointError(f"{model_file}: tokenizer.model is missing")
        try:
            self.sp = spm.SentencePieceProcessor(model_file=str(model_file))
        except Exception as e:  # sentencepiece raises RuntimeError/OSError with C++ text
            raise CheckpointError(f"{model_file}: not a SentencePiece model ({e})") from None
        self.sp_size = self.sp.vocab_size()
        self.specials = {name: self.sp_size + i for i, name in enumerate(SPECIAL_TOKENS)}
        self.vocab_size = self.sp_size + len(SPECIAL_TOKENS)
        self.eos_id = self.sp.eos_id()
        self.pad_id = self.sp.unk_id()  # the original pads with the unk id (0)
        self._bytes = [self._piece_bytes(i) for i in range(self.sp_size)]

    def _piece_bytes(self, i: int) -> bytes:
        sp = self.sp
        if sp.is_control(i) or sp.is_unknown(i):
            return b""
        piece = sp.id_to_piece(i)
        if sp.is_byte(i):  # "<0xAB>"
            return bytes([int(piece[3:5], 16)])
        return piece.replace("\u2581", " ").encode("utf-8")

    def encode(self, text: str) -> list[int]:
        return self.sp.encode(text) if text else []

    def special_id(self, name: str) -> int:
        return self.specials[name]

    def is_special(self, token_id: int) -> bool:
        return token_id >= self.sp_size or not self._bytes[token_id]

    def token_bytes(self, token_id: int) -> bytes:
        if 0 <= token_id < self.sp_size:
            return self._bytes[token_id]
        return b""

    def decode(self, ids: list[int]) -> str:
        text = bytes_to_text(b"".join(self.token_bytes(i) for i in ids))
        return text[1:] if text.startswith(" ") else text  # drop the dummy-prefix space
