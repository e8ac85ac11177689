"""Byte-exact incremental detokenization.

Tokens map to *bytes*, not characters: one Chinese character or emoji is often split over
several byte-fallback tokens.  We therefore accumulate bytes and release only the longest prefix
that is complete UTF-8, so a stream never shows half a character (or a U+FFFD in its place).
"""

from __future__ import annotations

import codecs


def _replace_each_byte(err: UnicodeDecodeError):
    # one U+FFFD per undecodable byte, as SentencePiece's decoder does
    return "\ufffd" * (err.end - err.start), err.end


BYTEWISE = "glmkit-bytewise"
codecs.register_error(BYTEWISE, _replace_each_byte)


def bytes_to_text(data: bytes) -> str:
    return data.decode("utf-8", errors=BYTEWISE)


class IncrementalDecoder:
    def __init__(self, tokenizer, strip_leading_space: bool = False):
        self._tok = tokenizer
        self._utf8 = codecs.getincrementaldecoder("utf-8")(errors=BYTEWISE)
        # SentencePiece marks word starts with a space; its decode() drops the one that begins
        # the whole text.  We mirror that when asked, so streamed text equals decode().
        self._strip_leading_space = strip_leading_space
        self._started = False

    def feed(self, token_id: int) -> str:
        """Text completed by this token (possibly ''): incomplete UTF-8 stays buffered."""
        data = self._tok.token_bytes(token_id)
        if not data:
            return ""
        text = self._utf8.decode(data)
        return self._lstrip_once(text)

    def flush(self) -> str:
        """End of stream: whatever bytes remain, invalid ones shown as U+FFFD."""
        return self._lstrip_once(self._utf8.decode(b"", final=True))

    def _lstrip_once(self, text: str) -> str:
        if not text or self._started:
            return text
        self._started = True
        if self._strip_leading_space and text.startswith(" "):
            text = text[1:]
        return text
