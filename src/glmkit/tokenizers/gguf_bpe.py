"""Byte-level BPE tokenizers (GPT-2 style) described by a GGUF file's metadata.

The vocabulary and merges come from `tokenizer.ggml.*`; the pre-tokenizer regex is chosen by
`tokenizer.ggml.pre` the way llama.cpp chooses it.  The merging itself is done by Hugging Face's
`tokenizers` (Rust, well kept) so we do not maintain a BPE implementation of our own.

Control tokens (`<|im_start|>` ...) are deliberately *not* registered with `tokenizers`: text is
always encoded as text, and the chat layer inserts special ids itself.
"""

from __future__ import annotations

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers

from ..errors import CheckpointError
from .base import ByteTableTokenizer

# GGUF token types (llama.cpp's llama_token_type)
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer families, as llama.cpp's llama-vocab groups them.
_DIGITS_THEN_GPT2 = {"smollm", "starcoder", "refact", "codeshell", "command-r", "exaone", "minerva"}
_GPT2 = {"gpt2", "default", "gpt-2", "olmo", "jais", "bloom", "poro-chat", "viking"}


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte <-> printable-character table."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class GGUFBPETokenizer(ByteTableTokenizer):
    strip_leading_space = False

    def __init__(self, tokens: list[str], token_types: list[int], merges: list[str], pre: str,
                 eos_id: int, bos_id: int | None = None, source: str = "GGUF file"):
        if pre not in _DIGITS_THEN_GPT2 | _GPT2:
            raise CheckpointError(f"{source}: unsupported BPE pre-tokenizer {pre!r}")
        vocab = {t: i for i, t in enumerate(tokens)}
        pairs = [tuple(m.split(" ", 1)) for m in merges]
        self._hf = HFTokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False, byte_fallback=False))
        byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        if pre in _DIGITS_THEN_GPT2:
            self._hf.pre_tokenizer = pre_tokenizers.Sequence(
                [pre_tokenizers.Digits(individual_digits=True), byte_level])
        else:
            self._hf.pre_tokenizer = byte_level
        self._hf.decoder = decoders.ByteLevel()
        self.vocab_size = len(tokens)
        self.eos_id = eos_id
        self.bos_id = bos_id
        self.specials = {t: i for i, (t, ty) in enumerate(zip(tokens, token_types)) if ty in (CONTROL, USER_DEFINED)}
        inv = {c: b for b, c in _bytes_to_unicode().items()}
        self._bytes = []
        for t, ty in zip(tokens, token_types):
            if ty == CONTROL or ty == UNUSED:
                self._bytes.append(b"")
            elif ty == USER_DEFINED:
                self._bytes.append(t.encode("utf-8"))
            else:
                self._bytes.append(bytes(inv[c] for c in t) if all(c in inv for c in t) else t.encode("utf-8"))

    def state(self) -> dict:
        """Everything this tokenizer is, as JSON values: models/gguf_cache.py keeps it so that a
        later start skips the GGUF reader and the table building above (about a second)."""
        return {"hf": self._hf.to_str(), "bytes": [b.decode("latin-1") for b in self._bytes],
                "specials": self.specials, "eos_id": self.eos_id, "bos_id": self.bos_id}

    @classmethod
    def from_state(cls, state: dict) -> "GGUFBPETokenizer":
        tok = cls.__new__(cls)
        tok._hf = HFTokenizer.from_str(state["hf"])
        tok._bytes = [s.encode("latin-1") for s in state["bytes"]]
        tok.vocab_size = len(tok._bytes)
        tok.specials = {str(k): int(v) for k, v in state["specials"].items()}
        tok.eos_id, tok.bos_id = int(state["eos_id"]), state["bos_id"]
        return tok
