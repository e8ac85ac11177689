"""GLM-4-9B's tokenizer as its original layout ships it: `tokenizer.model` is a tiktoken ranks
file (one `base64(token bytes) rank` per line), not a SentencePiece model.

It runs on OpenAI's `tiktoken` (Rust byte-pair encoder), given the ranks and GLM-4's split
pattern; nothing is downloaded (only named encodings such as cl100k are fetched, and none is
used).  The facts, from the original `tokenization_chatglm.py` of glm-4-9b-chat (nothing of it is
imported): the ranks are the ordinary vocabulary, text is encoded with no special tokens at all,
and the special tokens follow the ranks as added tokens, their ids written in
`tokenizer_config.json` (`added_tokens_decoder`; 151329.. in the release).
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from pathlib import Path

from ..errors import CheckpointError
from .base import ByteTableTokenizer

# GLM-4's pre-tokenizer split (the original tokenizer's `pat_str`)
PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# the release's special tokens in id order, from the first id after the ranks (used when
# tokenizer_config.json does not list them)
SPECIAL_TOKENS = ("<|endoftext|>", "[MASK]", "[gMASK]", "[sMASK]", "<sop>", "<eop>", "<|system|>", "<|user|>",
                  "<|assistant|>", "<|observation|>", "<|begin_of_image|>", "<|end_of_image|>",
                  "<|begin_of_video|>", "<|end_of_video|>")
_RANK_LINE = re.compile(rb"[A-Za-z0-9+/]+={0,2} \d+\r?\n")


def is_tiktoken_file(path: Path) -> bool:
    """True when `path` starts like a tiktoken ranks file (a SentencePiece model is protobuf)."""
    try:
        with open(path, "rb") as f:
            head = f.read(256)
    except OSError:
        return False
    return bool(_RANK_LINE.match(head))


class GLM4Tokenizer(ByteTableTokenizer):
    def __init__(self, model_file: str | Path):
        import tiktoken
        model_file = Path(model_file)
        ranks = _read_ranks(model_file)
        missing = [b for b in range(256) if bytes([b]) not in ranks]
        if missing:
            raise CheckpointError(f"{model_file}: the ranks lack single-byte tokens (e.g. byte {missing[0]}); "
                                  "text with those bytes could not be encoded")
        self._enc = tiktoken.Encoding(name=f"glmkit-glm4-{len(ranks)}", pat_str=PATTERN,
                                      mergeable_ranks=ranks, special_tokens={})
        self.n_words = len(ranks)
        self.specials = _special_ids(model_file.parent / "tokenizer_config.json", self.n_words)
        self.vocab_size = max([self.n_words - 1, *self.specials.values()]) + 1
        self._bytes = [b""] * self.vocab_size
        for token, rank in ranks.items():
            self._bytes[rank] = token
        self.eos_id = self.specials["<|endoftext|>"]
        self.pad_id = self.eos_id

    def encode(self, text: str) -> list[int]:
        # ordinary text only: `<|user|>` typed by a user stays characters
        return self._enc.encode_ordinary(text) if text else []


def _read_ranks(path: Path) -> dict[bytes, int]:
    ranks: dict[bytes, int] = {}
    try:
        lines = path.read_bytes().splitlines()
    except FileNotFoundError:
        raise CheckpointError(f"{path}: tokenizer.model is missing") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            token, rank = line.split()
            ranks[base64.b64decode(token, validate=True)] = int(rank)
        except (ValueError, binascii.Error):
            raise CheckpointError(f"{path}: line {n} is not `base64-token rank` (a GLM-4 tiktoken ranks file)") from None
    if sorted(ranks.values()) != list(range(len(ranks))):
        raise CheckpointError(f"{path}: ranks are not 0..{len(ranks) - 1}, each once")
    return ranks


def _special_ids(config_file: Path, first: int) -> dict[str, int]:
    """Special token -> id from tokenizer_config.json's added_tokens_decoder, else the release's order."""
    try:
        added = json.loads(config_file.read_text(encoding="utf-8")).get("added_tokens_decoder") or {}
    except FileNotFoundError:
        added = {}
    except (ValueError, AttributeError) as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    specials = {}
    for key, tok in added.items():
        if isinstance(tok, dict) and isinstance(tok.get("content"), str) and str(key).isdigit():
            specials[tok["content"]] = int(key)
    if not specials:
        specials = {name: first + i for i, name in enumerate(SPECIAL_TOKENS)}
    missing = [t for t in ("<|endoftext|>", "[gMASK]", "<sop>", "<|system|>", "<|user|>", "<|assistant|>",
                           "<|observation|>") if t not in specials]
    if missing:
        raise CheckpointError(f"{config_file}: added_tokens_decoder lacks GLM-4's special token(s) {', '.join(missing)}")
    if any(i < first for i in specials.values()):
        raise CheckpointError(f"{config_file}: a special token's id falls inside the ranks (below {first})")
    return specials
