"""Tokenizers shipped as `tokenizer.json` (Llama 2/3, Mistral, Qwen2.5 ...), run by Hugging Face's
`tokenizers` (Rust, well kept; the file is its own format, so it reads it exactly as transformers does).

Two things differ from how transformers uses the same file:
- Text is always encoded as text: `encode_special_tokens` is on, so a user typing `<|im_start|>` or
  `</s>` gets ordinary pieces.  Role markers and BOS come from the chat template, whose own text the
  chat layer (chat/template.py) turns into special ids.
- Streaming needs the bytes of each token, which `tokenizers` does not expose; they follow from the
  decoder the file declares: byte-level BPE (GPT-2's byte-to-character table) or SentencePiece-style
  pieces (`▁` for a space, `<0x0A>` byte-fallback tokens).
"""

from __future__ import annotations

import json
from pathlib import Path

from ..errors import CheckpointError
from .gguf_bpe import _bytes_to_unicode
from .base import ByteTableTokenizer


class HFJsonTokenizer(ByteTableTokenizer):
    def __init__(self, path: Path, eos_token: str | None = None, bos_token: str | None = None):
        from tokenizers import Tokenizer
        try:
            raw = json.loads(path.read_text(encoding="utf-8"))     # its metadata: specials, decoder
            self._hf = Tokenizer.from_file(str(path))
        except FileNotFoundError:
            raise CheckpointError(f"{path.parent}: no tokenizer.json (needed for this model family)") from None
        except Exception as e:
            raise CheckpointError(f"{path}: not a readable tokenizer.json ({str(e).splitlines()[0][:200]})") from None
        self._hf.encode_special_tokens = True
        self.vocab_size = self._hf.get_vocab_size(with_added_tokens=True)
        added = raw.get("added_tokens") or []
        # (byte-fallback pieces <0x0A> are bytes, even where a file lists them among its added tokens)
        self.specials = {t["content"]: t["id"] for t in added if t.get("special") and not _is_byte_piece(t["content"])}
        byte_level = "ByteLevel" in json.dumps(raw.get("decoder") or {}) or \
            "ByteLevel" in json.dumps(raw.get("pre_tokenizer") or {})
        # SentencePiece-style files drop the space that starts the whole text when decoding
        self.strip_leading_space = not byte_level and "Strip" in json.dumps(raw.get("decoder") or {})
        self._bytes = self._token_bytes(byte_level)
        self.eos_id = self._id_of(eos_token, path, "eos_token") if eos_token else None
        self.bos_id = self._id_of(bos_token, path, "bos_token") if bos_token else None
        self.bos_token, self.eos_token = bos_token, eos_token

    def _id_of(self, token: str, path: Path, field: str) -> int:
        i = self._hf.token_to_id(token)
        if i is None:
            raise CheckpointError(f"{path.parent / 'tokenizer_config.json'}: {field} {token!r} is not in tokenizer.json")
        return i

    def _token_bytes(self, byte_level: bool) -> list[bytes]:
        inv = {c: b for b, c in _bytes_to_unicode().items()}
        out = [b""] * self.vocab_size
        specials = set(self.specials.values())
        for piece, i in self._hf.get_vocab(with_added_tokens=True).items():
            if i >= self.vocab_size or i in specials:
                continue
            if byte_level:
                out[i] = bytes(inv[c] for c in piece) if all(c in inv for c in piece) else piece.encode("utf-8")
            elif _is_byte_piece(piece):
                out[i] = bytes([int(piece[3:5], 16)])
            else:
                out[i] = piece.replace("\u2581", " ").encode("utf-8")
        return out


def _is_byte_piece(piece: str) -> bool:
    return len(piece) == 6 and piece.startswith("<0x") and piece.endswith(">")
